"""Reliability and security of the four soup scripts (docs/GUARANTEES.md), on CPU with tiny zoos:
untrusted checkpoints, bad ingredients, bad arguments and data, unwritable outputs and a full disk.

Every refusal must come before any learning or evaluation (no results line, no soup), as one line
`error: ...` on stderr with exit status 2 and no traceback. Kills are in test_kills.py, failures of one
rank under torchrun in test_distributed_failures.py."""
import errno
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import torch

import greedy_soup
import MEHL_soup_layer
import uniform_soup
from tests.conftest import ROOT
from tests.helpers import FILES, QUICK, SCRIPTS, argv, cli, copy_for_a_user, last_line, nothing_written, refused
from tests.models import TINY_CNN
from utils.archs import get_arch
from utils.files import state_dicts
from utils.files.state_dicts import load_state_dict
from utils.runtime.errors import run_main


# ------------------------------------------------------------------------- 1. untrusted checkpoints
class Payload:
    """Unpickling this runs `touch <marker>`: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_zip(path, marker):
    sd = get_arch(TINY_CNN).build(10).state_dict()
    torch.save({**sd, "payload": Payload(marker)}, path)  # torch's zip format


def evil_legacy(path, marker):
    with open(path, "wb") as f:  # a bare pickle stream (torch's legacy format)
        pickle.dump({"payload": Payload(marker)}, f)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("maker", [evil_zip, evil_legacy])
def test_code_in_a_checkpoint_never_runs(capsys, tmp_path, zoo, out, fmnist_root, script, maker):
    marker = tmp_path / "pwned"
    maker(zoo / "model_1.pt", marker)
    line = refused(capsys, script, argv(zoo, fmnist_root, out, first=QUICK[script]))
    assert f"{zoo / 'model_1.pt'}: refused to load" in line and "nothing in it was run" in line
    assert not marker.exists()
    nothing_written(out)


@pytest.mark.slow
def test_code_in_a_checkpoint_through_the_command_line(tmp_path, zoo, out, fmnist_root):
    marker = tmp_path / "pwned"
    evil_zip(zoo / "model_2.pt", marker)
    done = cli("mehl", argv(zoo, fmnist_root, out, first=QUICK["mehl"]))
    assert last_line(done).startswith(f"error: {zoo / 'model_2.pt'}: refused to load: the pickle asks for "
                                      "objects outside plain tensors (weights_only=True; nothing in it "
                                      "was run)")
    assert not marker.exists()
    nothing_written(out)


def test_safetensors_and_wrapped_state_dicts_are_ingredients(tmp_path, zoo, out, fmnist_root):
    from safetensors.torch import save_file
    sds = [torch.load(zoo / f"model_{i}.pt", weights_only=True) for i in range(3)]
    (zoo / "model_1.pt").unlink()
    save_file(sds[1], str(zoo / "model_1.safetensors"))
    torch.save({"state_dict": sds[2], "epoch": 3}, zoo / "model_2.pt")  # a training checkpoint
    record = uniform_soup.main(argv(zoo, fmnist_root, out))
    assert record["ingredients"] == [0, 1, 2]
    soup = load_state_dict(out / "soup.pt")
    for k, v in sds[0].items():
        if v.is_floating_point():
            torch.testing.assert_close(soup[k], torch.stack([sd[k] for sd in sds]).mean(0))


# ----------------------------------------------------------------------------- 2. bad ingredients
def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "not a readable checkpoint (truncated or another format)"


def text_file(path):
    path.write_text("this is not a checkpoint\n")
    return "not a readable checkpoint (truncated or another format)"


def empty_file(path):
    path.write_bytes(b"")
    return "not a readable checkpoint (truncated or another format)"


def a_bare_tensor(path):
    torch.save(torch.zeros(3), path)
    return "holds no state dict of tensors (found Tensor)"


def _edit(path, fn):
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


def missing_key(path):
    _edit(path, lambda sd: sd.pop("classifier.bias"))
    return "does not match the architecture: missing keys: classifier.bias"


def unexpected_key(path):
    _edit(path, lambda sd: sd.update({"extra.weight": torch.zeros(2)}))
    return "does not match the architecture: unexpected keys: extra.weight"


def misshaped_key(path):
    _edit(path, lambda sd: sd.update({"classifier.bias": torch.zeros(3)}))
    return "does not match the architecture: mis-shaped: classifier.bias (3,) (expected (10,))"


def nan_value(path):
    _edit(path, lambda sd: sd["features.0.weight"].view(-1).__setitem__(5, float("nan")))
    return "tensor features.0.weight holds NaN or Inf"


def inf_in_a_buffer(path):
    _edit(path, lambda sd: sd["features.1.running_var"].__setitem__(0, float("inf")))
    return "tensor features.1.running_var holds NaN or Inf"


def integer_weights(path):
    _edit(path, lambda sd: sd.update({"classifier.bias": torch.zeros(10, dtype=torch.int64)}))
    return "tensor classifier.bias is torch.int64, the architecture expects torch.float32"


BAD = [truncated, text_file, empty_file, a_bare_tensor, missing_key, unexpected_key, misshaped_key,
       nan_value, inf_in_a_buffer, integer_weights]


# Checkpoints whose unpacking is bounded before anything is read (a zip bomb, a legacy pickle that declares
# more than it holds, a file larger than a checkpoint of the arch, torch's pre-1.0 tar format); what they
# return follows the file's name and a colon in the refusal.
def zip_bomb(path):
    """torch's zip format whose entries are deflated: 128 MiB of zeros in one storage (the state dict
    is valid: the 10-number bias is a view of it), about 130 KB on disk."""
    sd = get_arch(TINY_CNN).build(10).state_dict()
    sd["classifier.bias"] = torch.zeros(2**25)[:10]  # torch.save writes the whole storage
    plain = path.with_name("plain.tmp")
    torch.save(sd, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_DEFLATED,
                         compresslevel=1)
    plain.unlink()
    assert path.stat().st_size < 2**20
    return ": its zip entries unpack to 128.0 MiB, more than a checkpoint of this architecture may hold"


def legacy_declares_more_than_it_holds(path):
    """torch's legacy (non-zip) format: the pickle declares a 128 MiB storage, the file is cut after
    200 KB (torch allocates the declared size before reading the bytes)."""
    sd = get_arch(TINY_CNN).build(10).state_dict()
    sd["classifier.bias"] = torch.zeros(2**25)[:10]
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    with open(path, "r+b") as f:
        f.truncate(200_000)
    return ": its pickle declares storages of 128.0 MiB"


def oversized_file(path):
    sd = get_arch(TINY_CNN).build(10).state_dict()
    sd["classifier.bias"] = torch.zeros(2**25)[:10]
    torch.save(sd, path)  # stored, not compressed: 128 MiB on disk
    return ": the file is 128.0 MiB, more than a checkpoint of this architecture may hold"


def old_tar_format(path):
    with tarfile.open(path, "w") as tar:
        member = tmp = path.with_name("pickle")
        tmp.write_bytes(b"\x80\x02}q\x00.")
        tar.add(member, arcname="pickle")
        tmp.unlink()
    return ": a torch checkpoint in the pre-1.0 tar format is not accepted"


# every bad file through every script; the bounded unpacking of the other formats through one script each
CASES = [(spoil, s) for spoil in BAD + [zip_bomb] for s in SCRIPTS] + [
    (legacy_declares_more_than_it_holds, "mehl"), (oversized_file, "greedy"), (old_tar_format, "uniform")]


@pytest.mark.parametrize("spoil, script", CASES, ids=[f"{f.__name__}-{s}" for f, s in CASES])
def test_bad_ingredient_is_refused_before_work(capsys, zoo, out, fmnist_root, script, spoil):
    bad = zoo / "model_2.pt"
    expected = spoil(bad)
    line = refused(capsys, script, argv(zoo, fmnist_root, out, first=QUICK[script]))
    assert line.startswith(f"error: {bad}") and expected in line, line
    nothing_written(out)


@pytest.mark.slow
def test_a_zip_bomb_does_not_raise_peak_memory(tmp_path, zoo, out, fmnist_root):
    """As a process: the refused bomb costs no more peak memory than a refusal of a small bad file."""
    def peak(spoil):
        shutil.copy(zoo / "model_0.pt", zoo / "model_1.pt")
        spoil(zoo / "model_1.pt")
        code = ("import sys, uniform_soup; from utils.runtime.errors import run_main\n"
                "from utils.runtime.memory import resident_peak_bytes\n"
                "try:\n    run_main(uniform_soup.main, sys.argv[1:])\n"
                "finally:\n    print('PEAK', resident_peak_bytes(), file=sys.stderr)\n")
        done = subprocess.run([sys.executable, "-c", code, *argv(zoo, fmnist_root, out)],
                              capture_output=True, text=True, cwd=ROOT, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        assert "error: " in done.stderr, done.stderr[-2000:]
        return int(done.stderr.split("PEAK ")[-1].split()[0])

    peak(lambda p: p.write_bytes(b"not a checkpoint"))  # warm: the first run fills the data cache
    small = peak(lambda p: p.write_bytes(b"not a checkpoint"))
    bomb = peak(zip_bomb)
    assert bomb < small + 64 * 2**20, (small, bomb)  # the bomb would add 128 MiB (twice: inflate, copy)


def test_mixed_dtypes_are_cast_with_a_warning_naming_the_file(caplog, zoo, out, fmnist_root):
    """Decision: a float16 / bfloat16 / float64 ingredient beside float32 ones is cast to the
    architecture's dtype (exact for the half types), with one warning per file; not refused."""
    sds = [torch.load(zoo / f"model_{i}.pt", weights_only=True) for i in range(3)]
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sds[1].items()}, zoo / "model_1.pt")
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in sds[2].items()}, zoo / "model_2.pt")
    state_dicts._CAST_WARNED.clear()
    with caplog.at_level(logging.WARNING):
        greedy_soup.main(argv(zoo, fmnist_root, out))
    warnings = [r.getMessage() for r in caplog.records if "were cast" in r.getMessage()]
    assert warnings == [f"{zoo / 'model_1.pt'}: floating tensors stored as float16 were cast to the "
                        "architecture's float32",
                        f"{zoo / 'model_2.pt'}: floating tensors stored as float64 were cast to the "
                        "architecture's float32"]  # once per file, though greedy reads them twice
    soup = load_state_dict(out / "soup.pt")
    assert all(v.dtype == sds[0][k].dtype for k, v in soup.items())


# ----------------------------------------------------------------------- 3. bad arguments and data
BAD_ARGS = [
    ("uniform", ["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    ("uniform", ["--workers", "-1"], "error: --workers must be >= 0, got -1"),
    ("greedy", ["--test-size", "0"], "error: --test-size must be >= 1, got 0"),
    ("greedy", ["--heldout-per-class", "0"], "error: --heldout-per-class must be >= 1, got 0"),
    ("uniform", ["--exclude-top", "-1"], "error: --exclude-top must be >= 0, got -1"),
    ("greedy", ["--exclude-top", "3"], "error: --exclude-top 3 leaves no ingredient: the range holds 3"),
    ("uniform", ["--params_start", "2", "--params_end", "1"], "error: --params_start 2 must be < "
     "--params_end 1"),
    ("uniform", ["--params_start", "2", "--params_end", "2"], "error: --params_start 2 must be < "
     "--params_end 2"),
    ("mehl", ["--params_start", "-1"], "error: --params_start must be >= 0, got -1"),
    ("uniform", ["--params_end", "5"], "ingredient(s) missing in"),
    ("uniform", ["--datasets", "MNIST"], "error: unknown --datasets 'MNIST'; known: FashionMNIST, ImageNet, "
     "CIFAR10, CIFAR100"),
    ("greedy", ["--arch", "resnet50"], "error: unknown --arch 'resnet50'; known: "),
    ("learned", ["--lr", "0"], "error: --lr must be a finite number > 0, got 0.0"),
    ("learned", ["--lr", "-0.1"], "error: --lr must be a finite number > 0, got -0.1"),
    ("learned", ["--lr", "inf"], "error: --lr must be a finite number > 0, got inf"),
    ("learned", ["--lr", "nan"], "error: --lr must be a finite number > 0, got nan"),
    ("learned", ["--wd", "nan"], "error: --wd must be a finite number >= 0, got nan"),
    ("learned", ["--epochs", "-1"], "error: --epochs must be >= 0, got -1"),
    ("learned", ["--layer-size", "-1"], "error: --layer-size must be >= 0, got -1"),
    ("learned", ["--memory-limit", "0"], "error: --memory-limit must be a finite number of GiB > 0, got 0.0"),
    ("mehl", ["--model_batch", "0"], "error: --model_batch must be >= 1, got 0"),
    ("mehl", ["--models_epochs", "0"], "error: --models_epochs must be >= 1, got 0"),
    ("mehl", ["--epochs", "0"], "error: --epochs must be >= 1, got 0"),
    ("mehl", ["--layer-size", "-5"], "error: --layer-size must be >= 0, got -5"),
    ("mehl", ["--labelsmooth", "1"], "error: --labelsmooth must be in [0, 1), got 1.0"),
    ("mehl", ["--labelsmooth", "-0.1"], "error: --labelsmooth must be in [0, 1), got -0.1"),
    ("mehl", ["--lr", "inf"], "error: --lr must be a finite number > 0, got inf"),
    ("mehl", ["--wd", "-1"], "error: --wd must be a finite number >= 0, got -1.0"),
    ("mehl", ["--stop-after-groups", "0"], "error: --stop-after-groups must be >= 1, got 0"),
]


@pytest.mark.parametrize("script, extra, message", BAD_ARGS, ids=[" ".join(a[1]) for a in BAD_ARGS])
def test_bad_argument_is_one_line_exit_2(capsys, zoo, out, fmnist_root, script, extra, message):
    line = refused(capsys, script, argv(zoo, fmnist_root, out, *extra, first=QUICK[script]))
    assert line.startswith(message) if message.startswith("error:") else message in line, line
    nothing_written(out)


@pytest.mark.slow
@pytest.mark.parametrize("script, extra, message", [
    ("uniform", ["--batch-size", "0"], "error: --batch-size must be >= 1, got 0"),
    ("learned", ["--lr", "nan"], "error: --lr must be a finite number > 0, got nan"),
    ("mehl", ["--labelsmooth", "1.5"], "error: --labelsmooth must be in [0, 1), got 1.5"),
])
def test_bad_argument_through_the_command_line(zoo, out, fmnist_root, script, extra, message):
    assert last_line(cli(script, argv(zoo, fmnist_root, out, *extra, first=QUICK[script]))) == message
    nothing_written(out)


@pytest.mark.parametrize("extra, message", [
    (["--optimizer", "adam"], "error: argument --optimizer: invalid choice: 'adam' (choose from 'adamw', "
     "'sgd')"),
    (["--batch-size", "many"], "error: argument --batch-size/--batch_size: invalid int value: 'many'"),
    (["--device", "tpu"], "error: argument --device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["--device", "cuda:x"], "error: argument --device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
])
def test_malformed_flag_values_are_argparse_errors(capsys, zoo, out, fmnist_root, extra, message):
    """Values argparse itself rejects: its usage line, then one `prog: error: ...` line, exit 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(MEHL_soup_layer.main, argv(zoo, fmnist_root, out, *extra, first=QUICK["mehl"]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(message), err
    nothing_written(out)


def test_data_folder_with_the_wrong_layout(capsys, tmp_path, zoo, out, fmnist_root):
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    swap = {"train-images-idx3-ubyte.gz": "train-labels-idx1-ubyte.gz",
            "train-labels-idx1-ubyte.gz": "train-images-idx3-ubyte.gz"}
    for name in os.listdir(fmnist_root):  # train images and labels exchanged
        (swapped / swap.get(name, name)).write_bytes((fmnist_root / name).read_bytes())
    line = refused(capsys, "uniform", argv(zoo, swapped, out))
    assert line == (f"error: {swapped}: train images must be N x H x W and labels N long (got shapes "
                    "(600,) and (600, 28, 28)): are the files swapped?"), line
    nothing_written(out)
    (swapped / "train-images-idx3-ubyte.gz").write_text("not gzip")
    line = refused(capsys, "greedy", argv(zoo, swapped, out))
    assert line.startswith(f"error: {swapped / 'train-images-idx3-ubyte.gz'}: not a readable IDX file"), line
    nothing_written(out)


def test_empty_heldout_split(capsys, tmp_path, zoo, out, fmnist_root):
    index = tmp_path / "none.npy"
    np.save(index, np.zeros(600, dtype=np.uint8))  # the fixture's train set has 600 images
    args = [a for a in argv(zoo, fmnist_root, out, "--heldout-index", index, first=QUICK["mehl"],
                             heldout=None)]
    line = refused(capsys, "mehl", args)
    assert line == "error: the held-out split of FashionMNIST is empty"
    nothing_written(out)
    np.save(index, np.zeros(7, dtype=np.uint8))
    line = refused(capsys, "learned", argv(zoo, fmnist_root, out, "--heldout-index", index,
                                             first=QUICK["learned"], heldout=None))
    assert line == f"error: --heldout-index {index}: expected a 0/1 array of length 600, got shape (7,)"


@pytest.mark.parametrize("script", SCRIPTS)
def test_existing_output_is_refused_unless_overwrite(capsys, zoo, out, fmnist_root, script):
    (out / "soup.pt").write_bytes(b"precious")
    line = refused(capsys, script, argv(zoo, fmnist_root, out, first=QUICK[script]))
    assert line == (f"error: --save-soup {out / 'soup.pt'} exists: refusing to overwrite it (pass "
                    "--overwrite or another path)")
    assert (out / "soup.pt").read_bytes() == b"precious"
    assert not (out / "results.jsonl").exists()
    SCRIPTS[script].main(argv(zoo, fmnist_root, out, "--overwrite", first=QUICK[script]))
    assert load_state_dict(out / "soup.pt")  # replaced by a real soup


# ------------------------------------------------------------------- 6. unwritable output, full disk
@pytest.mark.parametrize("script", ["uniform", "mehl"])
def test_output_under_a_file_is_refused_before_work(capsys, tmp_path, zoo, fmnist_root, script):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    args = argv(zoo, fmnist_root, tmp_path, first=QUICK[script])
    args[args.index("--save-soup") + 1] = str(blocker / "soup.pt")
    line = refused(capsys, script, args)
    assert line == f"error: --save-soup {blocker / 'soup.pt'}: {blocker} is a file, not a folder"
    args = argv(zoo, fmnist_root, tmp_path, first=QUICK[script])
    args[args.index("--results-db") + 1] = str(blocker / "deeper" / "results.jsonl")
    line = refused(capsys, script, args)
    assert line.startswith(f"error: --results-db {blocker / 'deeper' / 'results.jsonl'}: cannot write in "
                           f"{blocker / 'deeper'}: "), line
    assert not (tmp_path / "soup.pt").exists()


def full_disk(monkeypatch, target_suffix):
    """Make writes of temporary files for `target_suffix` fail half-way with ENOSPC, as a full disk does
    (the bytes written so far stay in the temporary file, which must then be removed)."""
    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)) and f"{target_suffix}." in os.path.basename(str(f)):
            with open(f, "wb") as handle:
                handle.write(b"half a soup")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("script", SCRIPTS)
def test_disk_full_while_writing_the_soup(capsys, monkeypatch, zoo, out, fmnist_root, script):
    full_disk(monkeypatch, "soup.pt")
    line = refused(capsys, script, argv(zoo, fmnist_root, out, first=QUICK[script]))
    assert line.startswith(f"error: could not write {out / 'soup.pt'}: No space left on device"), line
    assert not (out / "soup.pt").exists()
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    # the results line marks a finished run: none was written, so a rerun makes the soup
    assert not [r for r in _records(out) if r["method"] != "individual"]
    monkeypatch.undo()
    SCRIPTS[script].main(argv(zoo, fmnist_root, out, *(["--resume"] if script == "mehl" else []), first=QUICK[script]))
    assert load_state_dict(out / "soup.pt")
    assert len([r for r in _records(out) if r["method"] != "individual"]) == 1


def test_torch_save_on_a_really_full_disk_is_one_line(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError ("unexpected pos"), safetensors as its own
    error: both become a UserError naming the file, with the free space, and no temporary file."""
    from utils.runtime.errors import UserError

    def broken(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(UserError, match=r"could not write .*m\.pt: \[enforce fail.*\(free space in "):
        state_dicts.save_state_dict({"w": torch.zeros(3)}, tmp_path / "m.pt")
    assert os.listdir(tmp_path) == []


def _records(folder):
    from utils.files import results
    return results.read(folder / "results.jsonl")


def test_the_guarantees_name_every_argument_that_does_not_define_a_run():
    """docs/GUARANTEES.md lists the arguments outside a run's identity: it names each flag of
    NOT_DEFINING, and none of the shared flags that define a run."""
    from tests.conftest import ROOT
    from utils.run import cli
    text = (ROOT / "docs" / "GUARANTEES.md").read_text()
    paragraph = text[text.index("Arguments that change neither the soup"):text.index("`utils.run.cli.NOT_DEFINING`")]
    for dest in cli.NOT_DEFINING:
        if dest not in ("method", "local-rank"):  # set by a script / an alias of --local_rank
            assert f"`--{dest}`" in paragraph or f"`--{dest.replace('_', '-')}`" in paragraph, dest
    for action in cli.soup_parser("", "x")._actions:
        if action.option_strings and action.dest not in cli.NOT_DEFINING and action.dest != "help":
            assert not any(f"`{o}`" in paragraph for o in action.option_strings), action.dest


# ------------------------------------------------------------------- the device, the memory bounds
def test_device_cuda_n_is_honoured_without_local_rank(monkeypatch):
    """Issue 29.7: `--device cuda:1` was ignored in favour of LOCAL_RANK (0 when unset). Under torchrun
    each rank keeps the GPU of its LOCAL_RANK. (No GPU here: CUDA's answers are stood in for.)"""
    from utils.runtime import distributed
    from utils.runtime.errors import UserError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup("cuda:2") == torch.device("cuda", 2)
    assert distributed.setup("cuda") == torch.device("cuda", 0)
    assert distributed.setup("auto") == torch.device("cuda", 0)
    with pytest.raises(UserError, match=r"^--device cuda:7: CUDA device 7 does not exist here \(4 visible\)$"):
        distributed.setup("cuda:7")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.setup("cuda:2") == torch.device("cuda", 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="^--device cuda:1 was asked for but no CUDA device is visible$"):
        distributed.setup("cuda:1")


def test_a_memory_limit_too_large_to_count_in_bytes_is_one_line(capsys, zoo, out, fmnist_root):
    """`--memory-limit 1e300 --model_batch auto` ended in OverflowError (int of an infinite byte count)."""
    for script, extra in (("mehl", ["--model_batch", "auto"]), ("learned", [])):
        line = refused(capsys, script, argv(zoo, fmnist_root, out, "--memory-limit", "1e300", *extra,
                                            first=QUICK[script]))
        assert line == "error: --memory-limit must be at most 1073741824 GiB (an exbibyte), got 1e+300", line
        nothing_written(out)


def cgroup_tree(tmp_path, version, listed, files):
    """A stand-in cgroup mount under `tmp_path` and the /proc/self/cgroup listing `listed`; `files`:
    {relative path: text}. Returns (root, proc)."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{listed}\n" if version == 2 else f"9:pids:/\n4:memory:{listed}\n0::/\n")
    return root, proc


GIB = 2**30


@pytest.mark.parametrize("case, version, listed, files, expected", [
    ("v2 limit", 2, "/job", {"job/memory.max": f"{3 * GIB // 2}", "job/memory.current": f"{GIB}",
                             "job/memory.stat": f"anon 1\ninactive_file {GIB // 4}\n"}, 3 * GIB // 4),
    ("v2 parent's limit", 2, "/a/b", {"a/memory.max": f"{2 * GIB}", "a/memory.current": f"{GIB}",
                                      "a/b/memory.max": "max", "a/b/memory.current": f"{GIB}"}, GIB),
    ("v2 no limit", 2, "/a", {"a/memory.max": "max", "a/memory.current": f"{GIB}"}, None),
    ("v2 inside a namespace", 2, "/not/mounted/here", {"memory.max": f"{GIB}", "memory.current": "0"}, GIB),
    ("v1 limit", 1, "/job", {"memory/job/memory.limit_in_bytes": f"{3 * GIB // 2}",
                             "memory/job/memory.usage_in_bytes": f"{GIB}",
                             "memory/job/memory.stat": "total_inactive_file 0\n"}, GIB // 2),
    ("v1 no limit", 1, "/job", {"memory/job/memory.limit_in_bytes": "9223372036854771712",
                                "memory/job/memory.usage_in_bytes": f"{GIB}"}, None),
    ("unreadable", 2, "/a", {"a/memory.max": "garbage", "a/memory.current": "1"}, None),
])
def test_the_planner_reads_the_memory_cgroup(monkeypatch, tmp_path, case, version, listed, files, expected):
    """Issue 31.9: `--model_batch auto` planned against the host's MemAvailable inside a 1.5 GiB cgroup.
    The bound is what the cgroup's limit leaves (less the usage that cannot be reclaimed), for every
    reader of available memory (the planner, Learned-Soup's check, the decoded-image cache)."""
    from utils.run import plan
    from utils.runtime import memory
    root, proc = cgroup_tree(tmp_path, version, listed, files)
    assert memory.cgroup_available(str(root), str(proc)) == expected
    monkeypatch.setattr(memory, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(memory, "PROC_CGROUP", str(proc))
    host = memory._proc_bytes("/proc/meminfo", "MemAvailable")
    available = memory.mem_available()
    assert available == (host if expected is None else min(host, expected))
    if expected is not None:
        rss = memory.status_bytes("VmRSS")
        assert plan.capacity_bytes(torch.device("cpu")) <= expected + rss + 2**20  # VmRSS read a moment apart


# ------------------------------------------------------------------- files this user may not open
def test_a_permission_error_from_anywhere_is_one_line(capsys, monkeypatch, zoo, out, fmnist_root):
    """An unreadable ingredient raised PermissionError out of the preflight (issue 31.7); run_main says any
    PermissionError in one line (root opens every file: the kernel's refusal is stood in for here, and
    test_unreadable_files_are_one_line_for_a_user meets the real one)."""
    import builtins
    real_open = builtins.open
    target = str(zoo / "model_1.pt")

    def refuse(file, *a, **k):
        if os.fspath(file) == target:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), target)
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", refuse)
    for script in ("uniform", "learned"):
        line = refused(capsys, script, argv(zoo, fmnist_root, out, first=QUICK[script]))
        assert line == (f"error: {target}: this user may not open it (Permission denied): give this user access "
                        "to it, or choose another path"), line
        nothing_written(out)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root, and no setpriv to drop to a user")
def test_unreadable_files_are_one_line_for_a_user(tmp_path_factory):
    """As the user nobody (root opens every file): an ingredient made unreadable (chmod 000), a results
    file made unreadable, a results file that may be read but not appended to (chmod 444: refused before
    the work, nothing written)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from tests.conftest import make_fmnist, make_zoo
    shared = Path(tempfile.mkdtemp(prefix="soup-user-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        code = copy_for_a_user(shared)
        zoo, data = make_zoo(shared / "zoo", 3), make_fmnist(shared / "data", n_train=100, n_test=20)
        subprocess.run(["chmod", "-R", "a+rX", str(zoo), str(data)], check=True)
        out = shared / "out"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        python = os.path.join(os.path.realpath(sys.prefix), "bin", os.path.basename(sys.executable))
        env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HOME": str(out),
               "MODEL_SOUPS_CACHE": str(out / "cache")}
        can = subprocess.run([*as_user, python, "-c", "import torch"], capture_output=True, text=True, timeout=120,
                             cwd=shared, env=env)
        if can.returncode != 0:
            pytest.skip(f"the user nobody cannot run {python} with torch (it sits in a folder that user may not "
                        f"read?): {(can.stderr.strip().splitlines() or ['?'])[-1]}")

        def run(script, results_db):
            done = subprocess.run([*as_user, python, str(code / FILES[script]),
                                   *argv(zoo, data, out, "--results-db", results_db, first=QUICK[script])],
                                  capture_output=True, text=True, timeout=300, cwd=shared, env=env)
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
            lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
            assert len(lines) == 1, done.stderr[-3000:]
            assert not (out / "soup.pt").exists()
            return lines[0]

        (zoo / "model_1.pt").chmod(0o000)
        line = run("uniform", out / "results.jsonl")
        assert line.startswith(f"error: {zoo / 'model_1.pt'}: ") and "Permission denied" in line, line
        (zoo / "model_1.pt").chmod(0o644)
        secret = shared / "secret.jsonl"
        secret.write_text('{"method": "individual", "index": 9}\n')
        secret.chmod(0o000)
        line = run("greedy", secret)
        assert str(secret) in line and "Permission denied" in line, line
        locked = shared / "locked.jsonl"
        locked.write_text('{"method": "individual", "index": 9}\n')
        locked.chmod(0o444)
        line = run("learned", locked)
        assert line == f"error: --results-db {locked}: cannot be appended to (Permission denied)", line
        assert locked.read_text() == '{"method": "individual", "index": 9}\n'
    finally:
        shutil.rmtree(shared, ignore_errors=True)
