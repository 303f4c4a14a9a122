"""report.py's paired statistics (issue 28): p-values and intervals from the predictions files the
results lines name, the modeljoust marks, the claims, and predictions files that cannot be used
(truncated, wrong length, wrong dtype, wrong sha256): one warning each, that comparison left out and
said so, nothing crashes. Also issue 31's report parts: seeds of mixed types, and the results file
streamed (memory held does not grow with what a line holds)."""
import json
import logging
import tracemalloc

import numpy as np
import pytest

import report
from tests.models import TINY_CNN
from utils.files import predictions
from utils.soup import stats

N = 2000
SHIFTS = ("noise", "blur")


def rows_of(labels, right):
    """Predictions rows: label, then top-1 = the label where `right`, else another class."""
    rows = np.full((len(labels), 6), -1, np.int16)
    rows[:, 0] = labels
    rows[:, 1] = np.where(right, labels, (labels + 1) % 10)
    rows[:, 2] = np.where(right, (labels + 1) % 10, labels)
    return rows


def model(db, rng, labels, p_right, method, **extra):
    """A results line of a model right on each example with probability p_right (per set), its
    predictions written as the soup scripts write them."""
    kept, acc = {}, {}
    for name in ("heldout", "test", *(f"shift/{s}" for s in SHIFTS)):
        right = rng.random(N) < p_right
        kept[name] = rows_of(labels[name], right)
        acc[name] = 100.0 * right.mean()
    shifts = {s: acc[f"shift/{s}"] for s in SHIFTS}
    return {"method": method, "dataset": "FashionMNIST", "arch": TINY_CNN, "model_location": "zoo",
            "heldout": acc["heldout"], "test": acc["test"], "shifts": shifts,
            "shift_mean": sum(shifts.values()) / len(shifts), "missing_shifts": [],
            "predictions": predictions.save(db, kept), **extra}


def study(tmp_path, seed_types=(1, 2)):
    db = tmp_path / "results.jsonl"
    rng = np.random.default_rng(0)
    labels = {name: rng.integers(0, 10, N) for name in ("heldout", "test", *(f"shift/{s}" for s in SHIFTS))}
    lines = [model(db, rng, labels, 0.80, "individual", index=0, path="zoo/model_0.pt"),
             model(db, rng, labels, 0.78, "individual", index=1, path="zoo/model_1.pt"),
             model(db, rng, labels, 0.70, "uniform", ingredients=[0, 1], args={"exclude_top": 0}),
             model(db, rng, labels, 0.80, "greedy", ingredients=[0], args={"exclude_top": 0})]
    for seed in seed_types:
        lines.append(model(db, rng, labels, 0.81, "MEHL-Soup+", ingredients=[0, 1],
                           args={"exclude_top": 0, "randomseed": seed}))
    db.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return db, lines


def section(text, heading):
    """The lines of report.md under `heading`, up to the next heading."""
    part = text.split(f"## {heading}", 1)[1]
    return part.split("\n## ", 1)[0].splitlines()


def pair_row(text, name):
    return next(r for r in section(text, "Paired comparisons") if r.startswith(f"| {name} |"))


def correct(db, line, name):
    rows = predictions.load(db, line["predictions"])[name]
    return rows[:, 1] == rows[:, 0]


def test_the_report_shows_p_values_intervals_marks_and_claims(tmp_path):
    db, lines = study(tmp_path)
    out = tmp_path / "rep"
    table = report.main(["--results-db", str(db), "--out", str(out)])
    text = (out / "report.md").read_text()
    best, uniform, greedy, mehl1 = lines[0], lines[2], lines[3], lines[4]
    # uniform against the best ingredient (#0, best on held-out) on test: the exact McNemar p and interval
    a, b = correct(db, uniform, "test"), correct(db, best, "test")
    p = stats.mcnemar(a, b)
    low, high = stats.bootstrap_interval((a, b))
    want = f"{100 * (a.mean() - b.mean()):+.2f} [{low:+.2f}, {high:+.2f}] {report.fmt_p(p)}"
    row = pair_row(text, "uniform soup")
    assert row.split("|")[2].strip() == want
    # the shift mean: a paired bootstrap over the sets
    pairs = [(correct(db, uniform, f"shift/{s}"), correct(db, best, f"shift/{s}")) for s in SHIFTS]
    low, high, p = stats.bootstrap(pairs)
    assert f"[{low:+.2f}, {high:+.2f}] {report.fmt_p(p)}" in row.split("|")[3]
    # each MEHL-Soup+ seed has its row, against greedy too
    assert "| MEHL-Soup+ seed 1 |" in text and "| MEHL-Soup+ seed 2 |" in text
    # modeljoust marks: uniform (70 %) is far below the best; the best test accuracy is bold
    main_rows = {r.split("|")[1].strip(): r.split("|") for r in table.splitlines()[2:]}
    assert "**" not in main_rows["uniform soup"][3] and "**" in "".join(c[3] for c in main_rows.values())
    # the claim "uniform < best" is significantly right on test
    claim = next(r for r in text.splitlines() if r.startswith("| uniform soup < best ingredient |"))
    assert claim.split("|")[3].strip() == "right"
    assert "Comparisons left out" not in text
    for png in ("ingredients.png", "scatter.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:-100])
    elif how == "wrong length":
        arr = np.load(path)[:-10]
        np.save(path.with_suffix(".tmp.npy"), arr)
        path.with_suffix(".tmp.npy").replace(path)
    elif how == "wrong dtype":
        arr = np.load(path).astype(np.int32)
        np.save(path.with_suffix(".tmp.npy"), arr)
        path.with_suffix(".tmp.npy").replace(path)
    elif how == "wrong sha256":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))


@pytest.mark.parametrize("how", ["truncated", "wrong length", "wrong dtype", "wrong sha256", "missing"])
def test_an_unusable_predictions_file_is_one_warning_and_its_comparisons_are_left_out(tmp_path, caplog, how):
    db, lines = study(tmp_path)
    uniform = tmp_path / lines[2]["predictions"]["file"]
    if how == "missing":
        uniform.unlink()
    else:
        damage(uniform, how)
    out = tmp_path / "rep"
    with caplog.at_level(logging.WARNING):
        report.main(["--results-db", str(db), "--out", str(out)])
    warned = [r.getMessage() for r in caplog.records if str(uniform) in r.getMessage()]
    assert len(warned) == 1, warned
    words = {"truncated": "truncated", "wrong length": "wrong length", "wrong dtype": "wrong dtype",
             "wrong sha256": "sha256", "missing": "cannot be read"}[how]
    assert words in warned[0]
    text = (out / "report.md").read_text()
    row = pair_row(text, "uniform soup")
    assert row.split("|")[2].strip() == "-"                       # that comparison is left out
    assert "Comparisons left out" in text and words in text and "uniform" in text
    assert "p=" in pair_row(text, "greedy soup")                                        # the others are still made


def test_a_line_without_predictions_still_reports_without_p_values(tmp_path):
    db, lines = study(tmp_path)
    for r in lines:
        r.pop("predictions")
    db.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "rep"
    table = report.main(["--results-db", str(db), "--out", str(out)])
    text = (out / "report.md").read_text()
    assert "uniform soup" in table and "p=" not in text and "p<" not in text
    assert report.NO_PREDICTIONS in text


def test_seeds_of_mixed_types_are_one_row_not_a_traceback(tmp_path):
    db, _ = study(tmp_path, seed_types=(1, "2"))
    table = report.main(["--results-db", str(db), "--out", str(tmp_path / "rep")])
    assert "MEHL-Soup+ (mean ± sd of 2 seeds)" in table


def test_the_results_file_streams(tmp_path):
    """A results file of 200 lines, each with 100 KB of arguments the report does not read: what the
    report keeps is a small part of the file (it held every parsed line whole before)."""
    db = tmp_path / "big.jsonl"
    line = {"method": "individual", "index": 0, "heldout": 80.0, "test": 79.0, "dataset": "FashionMNIST",
            "arch": TINY_CNN, "path": "zoo/model_0.pt", "args": {"junk": "x" * 100_000, "exclude_top": 0}}
    with open(db, "w") as f:
        for i in range(200):
            f.write(json.dumps({**line, "index": i}) + "\n")
    size = db.stat().st_size
    tracemalloc.start()
    lines = report.load([db])
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(lines) == 200 and lines[5]["index"] == 5 and lines[5]["args"] == {"exclude_top": 0}
    assert held < size / 20, (held, size)
