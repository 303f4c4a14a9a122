"""The fast path always falls back (utils/soup/segmented.py) and checks itself in a run
(utils/run/mehl.py's `check_fast_path`): an import or compile error of any kind hands over to the
per-block loop, said once; running out of memory is raised; on the first group the kernels are compared
with the loop on the run's own rows, and a mismatch or an error turns them off; the results line says
which path ran. On the CPU, with Triton's interpreter standing in for a GPU."""
import logging
import sys
from functools import partial

import pytest
import torch
from torch.testing import assert_close

import MEHL_soup_layer as mehl_script
import utils.soup
from tests import helpers
from tests.conftest import make_zoo
from utils.run import mehl
from utils.soup import hyperplane, segmented

BOUNDS = [(0, 4), (4, 4), (4, 1500), (1500, 1509)]
KERNELS = segmented._kernels  # cached: emptied around each test that imports it anew


@pytest.fixture
def fresh(monkeypatch):
    """The fast path as in a new process, interpreted on CPU tensors; its cache emptied again after."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(segmented, "failure", None)
    KERNELS.cache_clear()
    yield
    KERNELS.cache_clear()


def rows(n=3, width=1509, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P = segmented.empty_rows(n, width, torch.float32, "cpu")
    P.copy_(torch.randn(n, width, generator=gen))
    return P, torch.randn(width, generator=gen)


def test_an_import_error_other_than_import_error_hands_over_once(fresh, monkeypatch, caplog):
    import triton.language as tl
    monkeypatch.delattr(tl.standard, "_sum_combine")  # a later Triton without the private name
    monkeypatch.delitem(sys.modules, "utils.soup.segmented_kernels", raising=False)  # imported anew
    monkeypatch.delattr(utils.soup, "segmented_kernels", raising=False)
    P, g = rows()
    with caplog.at_level(logging.WARNING):
        assert not segmented.supports(P, g, BOUNDS)
        assert not segmented.supports(P, g, BOUNDS)
    assert segmented.failure.startswith("the kernels' source: AttributeError")
    assert caplog.text.count("fixed-launch block products are off") == 1
    assert_close(hyperplane.project(P, g, BOUNDS), hyperplane.project_blocks(P, g, BOUNDS))


def test_no_triton_is_the_loop_silently(fresh, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    P, g = rows()
    with caplog.at_level(logging.WARNING):
        assert not segmented.supports(P, g, BOUNDS)
    assert segmented.failure is None and "off in this process" not in caplog.text


class Failing:
    def __init__(self, error):
        self.error = error

    def __getitem__(self, grid):
        def launch(*args, **meta):
            raise self.error
        return launch


def test_out_of_memory_is_raised_not_swallowed(fresh, monkeypatch):
    """torch.cuda.OutOfMemoryError: the name torch 2.4 has (torch.OutOfMemoryError is it from 2.5 on)."""
    assert segmented.OUT_OF_MEMORY is torch.cuda.OutOfMemoryError
    monkeypatch.setattr(segmented, "_kernels", lambda interpret: dict.fromkeys(
        ("project_partials", "project_blocks", "combine"), Failing(torch.cuda.OutOfMemoryError("no room"))))
    P, g = rows()
    with pytest.raises(torch.cuda.OutOfMemoryError):
        segmented.project(P, g, BOUNDS)
    assert segmented.failure is None


def test_the_self_check_passes_on_kernels_that_agree(fresh):
    P, g = rows()
    assert mehl.check_fast_path(P, BOUNDS, g, torch.empty(P.shape[1])) == "kernels"
    assert segmented.failure is None
    assert mehl.products_record("kernels") == ("kernels", None)


@pytest.mark.parametrize("how", ["wrong", "nan", "raises"])
def test_the_self_check_turns_off_kernels_that_disagree_or_fail(fresh, monkeypatch, caplog, how):
    real = segmented.combine

    def combine(X, P, bounds, out, accumulate=False):
        if how == "raises":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        done = real(X, P, bounds, out, accumulate)
        done[700] += 1e-2 * done.abs().max() if how == "wrong" else float("nan")  # one number off
        return done

    monkeypatch.setattr(segmented, "combine", combine)
    P, g = rows()
    with caplog.at_level(logging.WARNING):
        assert mehl.check_fast_path(P, BOUNDS, g, torch.empty(P.shape[1])) == "loop"
    assert segmented.failure.startswith("self-check")
    assert ("illegal memory access" in segmented.failure) == (how == "raises")
    assert caplog.text.count("off in this process") == 1
    assert not segmented.supports(P, g, BOUNDS)  # the loop from here on
    path, why = mehl.products_record("loop")
    assert path == "loop" and why == segmented.failure


def test_off_cuda_the_record_says_loop():
    assert mehl.check_fast_path(*rows()[:1], BOUNDS, rows()[1], torch.empty(1509)) == "loop"
    path, why = mehl.products_record("loop")
    assert path == "loop" and "CUDA" in why


argv = partial(helpers.argv, heldout=4, batch_size=15, device=None,
               first=("--epochs", 1, "--no-epoch-test", "--model_batch", 2))


def test_a_run_records_the_path_and_wrong_kernels_leave_the_loops_soup(tmp_path, fmnist_root, monkeypatch):
    zoo = make_zoo(tmp_path / "zoo", 3)
    loop = mehl_script.main(argv(zoo, fmnist_root, tmp_path / "loop"))
    assert loop["block_products"] == "loop" and "CUDA" in loop["block_products_why"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(segmented, "failure", None)
    kernels = mehl_script.main(argv(zoo, fmnist_root, tmp_path / "kernels"))
    assert kernels["block_products"] == "kernels" and kernels["block_products_why"] is None
    monkeypatch.setattr(segmented, "project", lambda P, g, bounds, scale=None: torch.full(
        (P.shape[0], len(bounds)), 3.0))  # wrong numbers
    wrong = mehl_script.main(argv(zoo, fmnist_root, tmp_path / "wrong"))
    assert wrong["block_products"] == "loop" and wrong["block_products_why"].startswith("self-check")
    a = torch.load(tmp_path / "loop" / "soup.pt", weights_only=True)
    b = torch.load(tmp_path / "wrong" / "soup.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the check changed nothing; the loop ran every step
    c = torch.load(tmp_path / "kernels" / "soup.pt", weights_only=True)
    for k in a:
        assert_close(c[k], a[k], atol=1e-5, rtol=1e-4)
