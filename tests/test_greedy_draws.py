"""scripts/greedy_draws.py: greedy soup on the zoo's held-out split and on random selection sets."""
import json
import sys
from pathlib import Path

import pytest

import greedy_soup
from tests.conftest import make_zoo
from tests.helpers import argv
from tests.models import TINY_CNN
from utils.runtime.errors import run_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import greedy_draws  # noqa: E402

DATA = ["--arch", TINY_CNN, "--heldout-per-class", "3", "--test-size", "20", "--finetune-size", "0",
        "--frozen-blocks", "0"]


def draws_argv(zoo, fmnist_root, *extra):
    return ["--zoo", str(zoo), "--data-location", str(fmnist_root), *DATA, *extra]


def test_its_greedy_soup_on_the_held_out_split_is_greedy_soup_py(tmp_path, fmnist_root):
    zoo = make_zoo(tmp_path / "zoo", 5, noise=0.3)
    record = greedy_draws.main(draws_argv(zoo, fmnist_root, "--draws", "40",
                                          "--out", str(tmp_path / "d.json")))
    greedy = greedy_soup.main(argv(zoo, fmnist_root, tmp_path, heldout=3, test_size=20))
    assert record["heldout"]["kept"] == greedy["ingredients"]
    best = greedy["steps"][0]["heldout"]  # the best ingredient's held-out accuracy
    assert record["heldout"]["gain"] == pytest.approx(greedy["heldout"] - best, abs=1e-9)
    assert record["selection_size"] == 30 and record["pool"] == 50
    assert sum(record["draws_kept_share"].values()) == pytest.approx(1.0)
    assert json.loads((tmp_path / "d.json").read_text())["draws"] == 40


def test_another_split_or_a_missing_zoo_is_refused(tmp_path, fmnist_root, capsys):
    zoo = make_zoo(tmp_path / "zoo", 3)
    (zoo / "model_1.json").write_text(json.dumps({"data": {"heldout": "drawn", "per_class": 7}}))
    for args, words in ((draws_argv(zoo, fmnist_root), "was trained with the split"),
                        (draws_argv(tmp_path / "nothing", fmnist_root), "no such folder"),
                        (draws_argv(zoo, fmnist_root, "--draws", "0"), "--draws must be >= 1")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run_main(greedy_draws.main, args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and words in err and "Traceback" not in err, err[-1500:]


def test_sizes_draw_selection_sets_of_each_size(tmp_path, fmnist_root, capsys):
    zoo = make_zoo(tmp_path / "zoo", 4, noise=0.3)
    record = greedy_draws.main(draws_argv(zoo, fmnist_root, "--draws", "10", "--sizes", "10", "50"))
    assert [c["size"] for c in record["sizes"]] == [10, 50]
    for c in record["sizes"]:
        assert sum(c["draws_kept_share"].values()) == pytest.approx(1.0)
    # a selection set of the whole pool is the same set every draw: one kept count, every time
    assert list(record["sizes"][1]["draws_kept_share"].values()) == [1.0]
    with pytest.raises(SystemExit) as exit_info:
        run_main(greedy_draws.main, draws_argv(zoo, fmnist_root, "--sizes", "51"))
    assert exit_info.value.code == 2 and "--sizes 51" in capsys.readouterr().err
