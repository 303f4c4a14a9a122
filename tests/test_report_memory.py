"""report.py streams the ingredients (issue 22): its peak resident memory with recipes that name 24
stand-in ingredients exceeds its peak with 6 by at most one ingredient.

The stand-ins are plain state dicts of 4.2 M float32 numbers (16.8 MB), big enough to stand out from
the noise of a process's resident set; the soups, recipes and results lines are written by the code the
soup scripts use (`soup_io.save_soup`, `outputs.result_record`, `results.append`). Each peak is the
process's own high-water mark (VmHWM), measured in a fresh process."""
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT
from utils.files import results
from utils.files.soup_io import save_soup
from utils.run import outputs

SHAPES = {"enc.weight": (2048, 1024), "enc.bias": (2048,), "dec.weight": (2048, 1024), "dec.bias": (2048,)}
INGREDIENT_BYTES = 4 * sum(torch.Size(s).numel() for s in SHAPES.values())
BLOCKS = {"MEHL-Soup+": [["enc.weight", "enc.bias"], ["dec.weight", "dec.bias"]],
          "Learned-Soup+": [[name] for name in SHAPES]}


def standins(zoo, n):
    """n ingredients model_{i}.pt: one start plus seeded noise each."""
    zoo.mkdir(parents=True)
    base = {k: torch.randn(s, generator=torch.Generator().manual_seed(0)) for k, s in SHAPES.items()}
    for i in range(n):
        g = torch.Generator().manual_seed(i + 1)
        torch.save({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, zoo / f"model_{i}.pt")
    return base


def soups_over(folder, zoo, n, base):
    """A results file with a MEHL-Soup+ and a Learned-Soup+ over model_0 .. model_{n-1}, each soup with its
    recipe, as the soup scripts write them."""
    folder.mkdir()
    paths = [zoo / f"model_{i}.pt" for i in range(n)]
    db = folder / "results.jsonl"
    setup = SimpleNamespace(bundle=SimpleNamespace(split={"heldout": "drawn", "per_class": 5}),
                            started=time.time(), device=torch.device("cpu"), paths=paths, dataset="FashionMNIST",
                            arch="standin", model_location=str(zoo), results_db=db,
                            arguments={"randomseed": 1, "exclude_top": 0})
    for k, (method, blocks) in enumerate(BLOCKS.items()):
        soup = {name: v + 0.05 * (k + 1) for name, v in base.items()}
        alpha = [[(i % 3) - 0.5 for i in range(n)] for _ in blocks]
        out = SimpleNamespace(path=folder / f"{method}.pt")
        save_soup(soup, out.path, method, paths, setup.arguments,
                  coefficients={"names": list(SHAPES), "blocks": blocks, "alpha": alpha})
        scores = {"heldout": 80.0, "test": 79.0, "shifts": {}, "shift_mean": None, "missing_shifts": []}
        results.append(db, outputs.result_record(setup, out, method, paths, scores, blocks=len(blocks)))
    return db


def peak_of_report(db, out):
    """report.py on `db` in a fresh process: its peak resident bytes.

    glibc's malloc is given a fixed mmap threshold. By default the threshold follows the largest block
    freed (up to 32 MB), so freed tensors stay in the heap and the peak moves by a few tensors from run
    to run whatever the code holds (measured: 795 to 845 MiB for the same code and 3 to 24 ingredients).
    With a fixed threshold every freed tensor goes back to the system, and the peak counts what the code
    holds (795.6 to 795.9 MiB over the same runs)."""
    code = ("import sys, report; from utils.runtime.memory import resident_peak_bytes; "
            "report.main(sys.argv[1:]); print('PEAK', resident_peak_bytes())")
    done = subprocess.run([sys.executable, "-c", code, "--results-db", str(db), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                               "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert done.returncode == 0, done.stderr[-3000:]
    return int(re.search(r"^PEAK (\d+)$", done.stdout, re.M).group(1))


@pytest.mark.slow
def test_report_peak_memory_does_not_grow_with_the_ingredients(tmp_path):
    zoo = tmp_path / "zoo"
    base = standins(zoo, 24)
    peaks = {}
    for n in (6, 24):
        db = soups_over(tmp_path / f"soups_{n}", zoo, n, base)
        peaks[n] = peak_of_report(db, tmp_path / f"report_{n}")
        report = (tmp_path / f"report_{n}" / "report.md").read_text()
        for method, blocks in BLOCKS.items():  # the distances were measured, over every ingredient
            name = f"{method} seed 1" if method.startswith("MEHL") else method
            assert f"| {name} | {len(blocks)} |" in report, report
    print(f"report.py peak RSS: 6 ingredients {peaks[6] / 2**20:.1f} MiB, 24 ingredients {peaks[24] / 2**20:.1f} "
          f"MiB, difference {(peaks[24] - peaks[6]) / 2**20:+.1f} MiB; one ingredient {INGREDIENT_BYTES / 2**20:.1f} MiB")
    assert peaks[24] - peaks[6] <= INGREDIENT_BYTES
