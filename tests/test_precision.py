"""--precision (utils/run/precision.py): fp32 is the released arithmetic, untouched; amp_bf16 runs every
forward of learning and of every evaluation under bfloat16 autocast, with float32 logits, loss,
coefficients and soup; it defines a run (results, individual lines, --resume), fp32 lines written before
the flag existed still count as fp32."""
import json

import pytest
import torch
from torch import nn

from tests.helpers import SCRIPTS, argv, refused
from tests.models import TinyCNN
from utils.files import results
from utils.run import cli, inputs, mehl, precision
from utils.soup import learned

QUICK = {"uniform": [], "greedy": [], "learned": ["--epochs", "1", "--layerwise"],
         "mehl": ["--epochs", "1", "--model_batch", "2", "--no-epoch-test"]}


@pytest.fixture
def forwards(monkeypatch):
    """Whether each TinyCNN forward ran under CPU bfloat16 autocast."""
    seen = []
    real = TinyCNN.forward

    def recording(self, x):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(self, x)
    monkeypatch.setattr(TinyCNN, "forward", recording)
    return seen


@pytest.fixture
def losses(monkeypatch):
    """The dtype of the logits each learning loss was computed on."""
    seen = []
    for module in (mehl, learned):
        real = module.F.cross_entropy

        def recording(logits, *args, real=real, **kwargs):
            seen.append(logits.dtype)
            return real(logits, *args, **kwargs)
        monkeypatch.setattr(module.F, "cross_entropy", recording)
    return seen


def test_fp32_is_the_module_itself_and_amp_bf16_returns_float32_logits():
    model = nn.Sequential(nn.Linear(8, 4))
    plain = inputs.Inputs("data", model, 0)
    assert inputs.in_precision(plain, "fp32", "cpu") is plain
    inner = []
    model[0].register_forward_hook(lambda m, i, out: inner.append(out.dtype))
    x = torch.randn(5, 8)
    amp = inputs.in_precision(plain, "amp_bf16", "cpu")
    out = amp.forward(x)
    assert inner == [torch.bfloat16] and out.dtype == torch.float32
    assert torch.allclose(out, model(x), atol=5e-2) and not torch.equal(out, model(x))
    assert amp.key_prefix == "model." and amp.dataset == "data"  # the model's tensors one level down
    assert dict(amp.forward.named_parameters()).keys() == {"model." + k for k, _ in model.named_parameters()}


@pytest.mark.parametrize("script", ["uniform", "greedy", "learned", "mehl"])
def test_amp_bf16_runs_every_forward_under_autocast_and_keeps_float32(script, zoo, fmnist_root, out, forwards,
                                                                    losses):
    record = SCRIPTS[script].main(argv(zoo, fmnist_root, out, "--precision", "amp_bf16", first=QUICK[script]))
    assert forwards and all(forwards)                           # learning and every evaluation
    assert losses == [torch.float32] * len(losses)              # the loss on float32 logits
    assert record["args"]["precision"] == "amp_bf16"
    soup = torch.load(out / "soup.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in soup.values() if v.is_floating_point())


@pytest.mark.parametrize("script", ["learned", "mehl"])
def test_fp32_runs_no_forward_under_autocast_and_amp_bf16_moves_the_soup_a_little(script, zoo, fmnist_root,
                                                                                   tmp_path, forwards):
    soups, records = {}, {}
    for p in ("fp32", "amp_bf16"):
        out = tmp_path / p
        records[p] = SCRIPTS[script].main(argv(zoo, fmnist_root, out, "--precision", p, first=QUICK[script]))
        soups[p] = torch.load(out / "soup.pt", weights_only=True)
        if p == "fp32":
            assert forwards and not any(forwards)
    diff = max((soups["fp32"][k] - soups["amp_bf16"][k]).norm() / soups["fp32"][k].norm()
               for k in soups["fp32"] if soups["fp32"][k].is_floating_point() and soups["fp32"][k].norm() > 0)
    assert 0 < diff < 0.05


def test_individual_lines_are_per_precision_and_old_lines_count_as_fp32(zoo, fmnist_root, out):
    db = out / "results.jsonl"

    def individual_lines():
        return [r for r in results.read(db) if r.get("method") == "individual"]
    SCRIPTS["greedy"].main(argv(zoo, fmnist_root, out, name="a"))
    assert [r["precision"] for r in individual_lines()] == ["fp32"] * 3
    SCRIPTS["greedy"].main(argv(zoo, fmnist_root, out, "--precision", "amp_bf16", name="b"))
    assert sorted(r["precision"] for r in individual_lines()) == ["amp_bf16"] * 3 + ["fp32"] * 3
    # lines written before the flag existed: no "precision" field; an fp32 run reuses them
    lines = [json.loads(line) for line in db.read_text().splitlines()]
    db.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "precision"}) + "\n"
                          for r in lines if r.get("precision", "fp32") == "fp32"))
    SCRIPTS["greedy"].main(argv(zoo, fmnist_root, out, name="c"))
    assert len(individual_lines()) == 3


def test_precision_defines_a_run_and_fp32_matches_runs_made_before_the_flag():
    assert "precision" not in cli.NOT_DEFINING
    assert cli.run_key({"lr": 0.1, "precision": "fp32"}) == cli.run_key({"lr": 0.1})
    assert cli.run_key({"lr": 0.1, "precision": "amp_bf16"}) != cli.run_key({"lr": 0.1})


def test_a_finished_run_is_found_only_at_its_precision(zoo, fmnist_root, out):
    first = SCRIPTS["uniform"].main(argv(zoo, fmnist_root, out))
    assert SCRIPTS["uniform"].main(argv(zoo, fmnist_root, out, "--precision", "fp32")) == first
    with pytest.raises(Exception, match="exists"):  # not the finished run: its soup file is refused
        SCRIPTS["uniform"].main(argv(zoo, fmnist_root, out, "--precision", "amp_bf16"))


@pytest.mark.parametrize("made, now", [("fp32", "amp_bf16"), ("amp_bf16", "fp32")])
def test_resume_refuses_a_state_of_another_precision(made, now, zoo, fmnist_root, out, capsys):
    args = ["--epochs", "1", "--model_batch", "1", "--no-epoch-test", "--stop-after-groups", "1"]
    assert SCRIPTS["mehl"].main(argv(zoo, fmnist_root, out, "--precision", made, first=args)) is None
    line = refused(capsys, "mehl", argv(zoo, fmnist_root, out, "--precision", now, "--resume", first=args))
    assert f"--precision {made!r} in the state, {now!r} now" in line


def test_an_unknown_precision_is_argparse_s_one_line(zoo, fmnist_root, out, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS["uniform"].main(argv(zoo, fmnist_root, out, "--precision", "fp16"))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and "Traceback" not in err and len(errors) == 1
    assert errors[0].endswith("error: argument --precision: invalid choice: 'fp16' (choose from 'fp32', 'amp_bf16')")


def test_amp_bf16_on_a_cpu_without_bfloat16_says_it_is_slow(monkeypatch, caplog):
    monkeypatch.setattr(precision, "_cpu_has_bf16", lambda: False)
    precision.warn_if_slow("fp32", "cpu")
    precision.warn_if_slow("amp_bf16", "cuda")
    assert not caplog.records
    precision.warn_if_slow("amp_bf16", "cpu")
    assert "many times slower than fp32" in caplog.text
