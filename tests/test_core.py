"""Core utils: blocks, flatten, identical parameters, state-dict I/O, results, exact distributed eval."""
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from tests import reference
from utils.files import results
from utils.files.state_dicts import load_state_dict, save_state_dict
from utils.run.evaluation import accuracy
from utils.run.layout import Differences
from utils.runtime import distributed
from utils.runtime.errors import UserError
from utils.soup import sampling
from utils.soup.blocks import make_blocks


def test_blocks_zero_one_per_tensor_and_huge_one_block():
    sizes = [5, 3, 10, 1, 7]
    assert make_blocks(sizes, 0) == [[0], [1], [2], [3], [4]]
    assert make_blocks(sizes, sum(sizes)) == [[0, 1, 2, 3, 4]]
    # a new block starts once the current one holds MORE than S numbers
    assert make_blocks(sizes, 6) == [[0, 1], [2], [3, 4]]
    assert make_blocks(sizes, 8) == [[0, 1, 2], [3, 4]]
    ids = reference.block_ids(sizes, make_blocks(sizes, 6))
    assert ids.tolist() == [0] * 8 + [1] * 10 + [2] * 8
    with pytest.raises(ValueError):
        make_blocks(sizes, -1)


def test_differences_stream_and_detect():
    base = {"a": torch.ones(3), "b": torch.zeros(2), "c": torch.arange(3.0), "m": torch.ones(2)}
    diff = Differences(base, ["a", "b", "c"], ["m"])
    assert diff.add(dict(base, a=torch.ones(3) * 2, m=torch.ones(2) * 3)) == ["a", "m"]
    assert diff.add(dict(base, a=torch.ones(3) * 5)) == []          # found once, reported once
    assert diff.identical_params() == ["b", "c"] and diff.differing_buffers() == ["m"]
    torch.testing.assert_close(diff.buffer_means()["m"], torch.ones(2) * 5 / 3)
    alone = Differences(base, ["a", "b"], [])
    assert alone.identical_params() == ["a", "b"] and alone.buffer_means() == {}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_io_both_formats(tmp_path, suffix):
    sd = {"w": torch.randn(3, 2), "n": torch.tensor(7)}
    path = save_state_dict(sd, tmp_path / f"m{suffix}")
    back = load_state_dict(path)
    torch.testing.assert_close(back["w"], sd["w"], rtol=0, atol=0)
    assert back["n"].item() == 7
    with pytest.raises(UserError, match="exists"):
        save_state_dict(sd, path)
    save_state_dict(sd, path, overwrite=True)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


class Boom:
    def __reduce__(self):
        return (os.system, ("touch boom-marker",))


def test_code_in_pickle_is_refused(tmp_path):
    marker = tmp_path / "boom-marker"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": Boom()}, path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(UserError, match="refused"):
            load_state_dict(path)
    finally:
        os.chdir(cwd)
    assert not marker.exists()


def test_results_append_never_truncates(tmp_path):
    path = tmp_path / "r.jsonl"
    results.append(path, {"method": "a", "acc": 1.0})
    results.append(path, {"method": "b", "acc": 2.0})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["method"] for line in lines] == ["a", "b"]
    with open(path, "a") as f:
        f.write('{"method": "torn"')  # a torn last line is skipped when reading
    assert [r["method"] for r in results.read(path)] == ["a", "b"]
    assert results.latest(results.read(path), {"method": "b"})["acc"] == 2.0


def test_shard_range_contiguous_first_ones_longer():
    parts = [sampling.shard_range(7, 3, i) for i in range(3)]
    assert parts == [(0, 3), (3, 5), (5, 7)]
    assert [sampling.shard_range(1, 2, i) for i in range(2)] == [(0, 1), (1, 1)]


class Fixed(nn.Module):
    """Predicts class = first feature, so accuracy is known exactly."""

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0].long(), 3).float()


def _eval_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    device = distributed.setup("cpu")
    x = torch.tensor([[0.0], [1.0], [2.0], [0.0], [1.0], [2.0], [0.0]])
    y = torch.tensor([0, 1, 1, 0, 2, 2, 1])  # 4 of 7 right
    acc = accuracy(Fixed(), TensorDataset(x, y), device, batch_size=2)
    out[rank] = acc
    distributed.teardown()


@pytest.mark.slow
def test_distributed_accuracy_is_exact_on_odd_sizes():
    from tests.conftest import free_port
    single = accuracy(Fixed(), TensorDataset(torch.tensor([[0.0], [1.0], [2.0], [0.0], [1.0], [2.0], [0.0]]),
                                             torch.tensor([0, 1, 1, 0, 2, 2, 1])), torch.device("cpu"),
                      batch_size=2)
    out = mp.Manager().dict()
    mp.spawn(_eval_worker, args=(2, free_port(), out), nprocs=2, join=True)
    assert single == pytest.approx(100 * 4 / 7)
    assert out[0] == out[1] == pytest.approx(single)


def test_learning_mode_turns_dropout_off_and_bn_by_rule():
    from utils.run.batchnorm import set_mode
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    x = torch.randn(8, 4)
    set_mode(model, frozen_stats=True)
    assert not model[1].training and not model[2].training
    torch.testing.assert_close(model(x), model(x))  # deterministic: no dropout masks
    set_mode(model, frozen_stats=False)
    assert model[1].training and not model[2].training


def test_one_method_of_names_both_learned_families():
    from utils.files.soup_io import method_of
    assert method_of("MEHL-Soup", plus=False) == "MEHL-Soup" and method_of("MEHL-Soup", plus=True) == "MEHL-Soup+"
    assert method_of("Learned-Soup", plus=True) == "Learned-Soup+"
