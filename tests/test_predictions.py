"""Per-example predictions (issue 28): every results line a soup script writes names a predictions
file whose top-1 column gives exactly the line's accuracies; a cached ingredient line is used only with
its predictions; utils/files/predictions.py writes atomically and reads as untrusted input."""
import json

import numpy as np
import pytest

import greedy_soup
import uniform_soup
from tests.conftest import make_zoo
from tests.helpers import argv
from utils.files import predictions
from utils.run import evaluation


def lines_of(db):
    return [json.loads(x) for x in db.read_text().splitlines()]


def test_every_line_names_predictions_that_give_its_accuracies(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 3, noise=0.3)
    out = tmp_path / "out"
    greedy_soup.main(argv(zoo, fmnist_root, out, heldout=3, test_size=20))
    uniform_soup.main(argv(zoo, fmnist_root, out, heldout=3, test_size=20, name="uniform"))
    db = out / "results.jsonl"
    lines = lines_of(db)
    assert [r["method"] for r in lines] == ["individual"] * 3 + ["greedy", "uniform"]
    for r in lines:
        kept = predictions.load(db, r["predictions"])
        assert kept["heldout"].shape == (30, 6) and kept["test"].shape == (20, 6)
        for name, value in (("heldout", r["heldout"]), ("test", r["test"]),
                            *((f"shift/{s}", v) for s, v in r["shifts"].items())):
            rows = kept[name]
            assert 100.0 * np.mean(rows[:, 1] == rows[:, 0]) == pytest.approx(value, abs=1e-9), name
            assert ((rows[:, 1:] >= 0) & (rows[:, 1:] < 10)).all()                  # 10 classes: 5 real ones
            assert all(len(set(row)) == 5 for row in rows[:, 1:].tolist())          # five different classes
        # the same examples, in the same order, in every file
        assert (kept["test"][:, 0] == predictions.load(db, lines[0]["predictions"])["test"][:, 0]).all()


def test_a_cached_ingredient_line_comes_with_its_predictions(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 3, noise=0.3)
    out = tmp_path / "out"
    greedy_soup.main(argv(zoo, fmnist_root, out, heldout=3, test_size=20))
    db = out / "results.jsonl"
    uniform_soup.main(argv(zoo, fmnist_root, out, "--exclude-top", "1", heldout=3, test_size=20, name="u"))
    assert [r["method"] for r in lines_of(db)].count("individual") == 3       # taken from the cache
    # a line whose predictions file is gone (or a line of an older file, without one) is evaluated again
    first = lines_of(db)[0]
    (db.parent / first["predictions"]["file"]).unlink()
    uniform_soup.main(argv(zoo, fmnist_root, out, "--exclude-top", "2", heldout=3, test_size=20, name="u2"))
    again = [r for r in lines_of(db) if r["method"] == "individual"]
    assert len(again) == 4 and again[-1]["index"] == first["index"]
    assert again[-1]["test"] == first["test"]
    predictions.load(db, again[-1]["predictions"])


def test_save_is_content_named_and_load_checks_the_field(tmp_path):
    db = tmp_path / "r.jsonl"
    rows = np.arange(60, dtype=np.int16).reshape(10, 6)
    field = predictions.save(db, {"test": rows})
    assert predictions.save(db, {"test": rows}) == field                 # same bytes, same file
    assert len(list(predictions.folder_of(db).iterdir())) == 1           # no temporary file left
    assert (predictions.load(db, field)["test"] == rows).all()
    for bad in (None, [], {**field, "sha256": "x"}, {**field, "sets": [["test", -1]]},
                {**field, "sets": [["test", 5], ["test", 5]]}, {**field, "file": ""},
                {**field, "sets": [["test", True]]}):
        with pytest.raises(predictions.Unusable):
            predictions.load(db, bad)
    with pytest.raises(predictions.Unusable, match="wrong length"):
        predictions.load(db, {**field, "sets": [["test", 9]]})
    (predictions.folder_of(db) / "dir.npy").mkdir()
    with pytest.raises(predictions.Unusable, match="not a regular file"):
        predictions.load(db, {**field, "file": f"{db.name}.predictions/dir.npy"})


def test_evaluation_rows_are_the_top5_in_order(tmp_path):
    import torch
    from torch.utils.data import TensorDataset
    x = torch.randn(70, 4)
    y = torch.randint(0, 8, (70,))
    model = torch.nn.Linear(4, 8)
    evaluation.CHUNK_ROWS, old = 16, evaluation.CHUNK_ROWS     # several chunks
    try:
        acc, rows = evaluation.accuracy(model, TensorDataset(x, y), torch.device("cpu"), batch_size=7, keep=True)
    finally:
        evaluation.CHUNK_ROWS = old
    with torch.no_grad():
        top = model(x).topk(5, dim=1).indices
    assert rows.dtype == np.int16 and rows.shape == (70, 6)
    assert (rows[:, 0] == y.numpy()).all() and (rows[:, 1:] == top.numpy()).all()
    assert acc == pytest.approx(100.0 * (top[:, 0] == y).double().mean().item())
