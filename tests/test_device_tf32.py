"""--device cuda:N (utils/runtime/distributed.py picks the device: LOCAL_RANK under torchrun, else N) and
--tf32 (utils/run/precision.py): off by default as released, on in every recipe, and part of the run's
identity (results line, rerun key, individual lines, --resume)."""
import pytest
import torch

from tests.helpers import SCRIPTS, argv, refused
from utils.files import results
from utils.run import cli, precision
from utils.runtime import distributed
from utils.runtime.errors import UserError


@pytest.fixture
def cuda_devices(monkeypatch):
    """Pretend 2 CUDA devices are visible; record the devices set."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    return chosen


def test_device_cuda_n_is_honoured_without_local_rank(cuda_devices):
    assert distributed.setup("cuda:1") == torch.device("cuda", 1)
    assert distributed.setup("cuda") == torch.device("cuda", 0)
    assert cuda_devices == [1, 0]


def test_local_rank_picks_the_device_under_torchrun(cuda_devices, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.setup("cuda:0") == torch.device("cuda", 1)


def test_a_device_that_does_not_exist_is_a_user_error(cuda_devices):
    with pytest.raises(UserError, match="--device cuda:2: CUDA device 2 does not exist here"):
        distributed.setup("cuda:2")


def test_the_device_flag_takes_an_index_and_refuses_other_words(zoo, fmnist_root, out, capsys):
    args = SCRIPTS["uniform"].parse_args(argv(zoo, fmnist_root, out, device="cuda:3"))
    assert args.device == "cuda:3"
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS["uniform"].parse_args(argv(zoo, fmnist_root, out, device="gpu"))
    assert exit_info.value.code == 2
    assert "expected auto, cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err


@pytest.fixture
def matmul_precision():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


def test_tf32_off_leaves_torch_s_defaults_and_on_allows_it(matmul_precision):
    torch.set_float32_matmul_precision("highest")
    precision.use_tf32(False)
    assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
    precision.use_tf32(True)
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32


def test_tf32_defines_a_run_and_off_matches_runs_made_before_the_flag():
    assert "tf32" not in cli.NOT_DEFINING
    assert cli.run_key({"lr": 0.1, "tf32": False}) == cli.run_key({"lr": 0.1})
    assert cli.run_key({"lr": 0.1, "tf32": True}) != cli.run_key({"lr": 0.1})


@pytest.mark.parametrize("script", ["uniform", "greedy"])
def test_every_recipe_turns_tf32_on_and_records_it(script, zoo, fmnist_root, out, matmul_precision):
    torch.set_float32_matmul_precision("highest")
    SCRIPTS[script].main(argv(zoo, fmnist_root, out, name="off"))
    assert torch.get_float32_matmul_precision() == "highest"
    SCRIPTS[script].main(argv(zoo, fmnist_root, out, "--tf32", name="on"))
    assert torch.get_float32_matmul_precision() == "high"
    lines = results.read(out / "results.jsonl")
    soups = [r for r in lines if r["method"] != "individual"]
    assert [r["args"]["tf32"] for r in soups] == [False, True]
    if script == "greedy":  # the individual accuracies are evaluated again at the other arithmetic
        assert sorted(r["tf32"] for r in lines if r["method"] == "individual") == [False] * 3 + [True] * 3


def test_resume_refuses_a_state_made_with_the_other_tf32(zoo, fmnist_root, out, capsys, matmul_precision):
    args = ["--epochs", "1", "--model_batch", "1", "--no-epoch-test", "--stop-after-groups", "1"]
    assert SCRIPTS["mehl"].main(argv(zoo, fmnist_root, out, "--tf32", first=args)) is None
    line = refused(capsys, "mehl", argv(zoo, fmnist_root, out, "--resume", first=args))
    assert "--tf32 True in the state, False now" in line
