"""Reliability, second pass (docs/GUARANTEES.md): what an adversarial user could still break after the
first pass (tests/test_reliability.py), through the soup scripts' command lines on CPU with tiny zoos.

Classes: (1) memory bounded before a checkpoint is unpacked (zip bombs; with the other bad ingredients
in tests/test_reliability.py), (2) validator crashes on odd keys, layouts and dtypes, (3) two files for
one ingredient, (4) an untrusted results file, (5) two runs on one soup, (6) an untrusted MEHL --resume
state, (7) numbers that overflow (learning rate, seeds), (8) a missing Fashion-MNIST offline, (9)
smaller ones. Every refusal is one `error:` line, exit 2, no traceback, and nothing is written that a
later run could trust."""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import MEHL_soup_layer
import uniform_soup
from tests.conftest import ROOT, make_zoo
from tests.helpers import QUICK, SCRIPTS, argv, cli, last_line, nothing_written, refused
from tests.models import TINY_CNN
from utils.files import results
from utils.files.state_dicts import load_state_dict
from utils.runtime.errors import UserError, run_main


def soup_lines(folder):
    return [r for r in results.read(folder / "results.jsonl") if r["method"] != "individual"]


# ------------------------------------------------------------------------------ 2. validator crashes
def non_string_key(sd):
    sd[3] = torch.zeros(2)
    return "holds a key that is not a string (3, int): not a state dict"


def tuple_key(sd):
    sd[("features", 0)] = torch.zeros(2)
    return "holds a key that is not a string (('features', 0), tuple)"


def sparse_tensor(sd):
    sd["classifier.bias"] = sd["classifier.bias"].to_sparse()
    return "tensor classifier.bias has layout sparse_coo: only dense tensors are accepted"


def meta_tensor(sd):
    sd["classifier.bias"] = torch.empty(10, device="meta")
    return "tensor classifier.bias is a meta tensor (a shape without data)"


def float8_tensor(sd):
    sd["classifier.weight"] = sd["classifier.weight"].to(torch.float8_e4m3fn)
    return "tensor classifier.weight has dtype float8_e4m3fn: only float16/bfloat16/float32/float64"


def complex_tensor(sd):
    sd["classifier.bias"] = sd["classifier.bias"].to(torch.complex64)
    return "tensor classifier.bias has dtype complex64"


def complex_integer_slot(sd):
    sd["features.1.num_batches_tracked"] = torch.zeros((), dtype=torch.complex128)
    return "tensor features.1.num_batches_tracked has dtype complex128"


ODD = [non_string_key, tuple_key, sparse_tensor, meta_tensor, float8_tensor, complex_tensor,
       complex_integer_slot]
ODD_CASES = [(f, s) for f in ODD for s in ("uniform", "mehl")]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("spoil, script", ODD_CASES, ids=[f"{f.__name__}-{s}" for f, s in ODD_CASES])
def test_odd_keys_layouts_and_dtypes_are_one_line(capsys, zoo, out, fmnist_root, spoil, script):
    bad = zoo / "model_2.pt"
    sd = torch.load(bad, weights_only=True)
    expected = spoil(sd)
    torch.save(sd, bad)
    line = refused(capsys, script, argv(zoo, fmnist_root, out, first=QUICK[script]))
    assert line.startswith(f"error: {bad}: ") and expected in line, line
    nothing_written(out)


def test_odd_safetensors_dtype_is_one_line(capsys, zoo, out, fmnist_root):
    from safetensors.torch import save_file
    sd = torch.load(zoo / "model_1.pt", weights_only=True)
    sd["classifier.weight"] = sd["classifier.weight"].to(torch.float8_e5m2)
    (zoo / "model_1.pt").unlink()
    save_file(sd, str(zoo / "model_1.safetensors"))
    line = refused(capsys, "greedy", argv(zoo, fmnist_root, out))
    assert line.startswith(f"error: {zoo / 'model_1.safetensors'}: tensor classifier.weight has dtype "
                           "float8_e5m2"), line
    nothing_written(out)


# ------------------------------------------------------------------------- 3. ambiguous ingredients
@pytest.mark.parametrize("script, other", [("greedy", "model_1.safetensors"), ("learned", "model_01.pt"),
                                           ("uniform", "model_1.pth")])
def test_two_files_for_one_ingredient_are_refused_naming_both(capsys, zoo, out, fmnist_root, script,
                                                              other):
    from safetensors.torch import save_file
    sd = make_zoo(zoo.parent / "other", 2, seed=7) / "model_1.pt"
    if other.endswith(".safetensors"):
        save_file(torch.load(sd, weights_only=True), str(zoo / other))
    else:
        shutil.copy(sd, zoo / other)
    line = refused(capsys, script, argv(zoo, fmnist_root, out, first=QUICK[script]))
    names = sorted([str(zoo / "model_1.pt"), str(zoo / other)])
    assert line == (f"error: ingredient 1 is ambiguous: {names[0]} and {names[1]} both stand for it "
                    "(remove or rename all but one)"), line
    nothing_written(out)


# ------------------------------------------------------------------------------- 4. the results file
def test_torn_last_line_is_not_glued_to_the_next(caplog, zoo, out, fmnist_root):
    db = out / "results.jsonl"
    db.write_text('{"method": "individual", "index": 0}\n{"method": "uniform", "heldo')  # torn
    with caplog.at_level(logging.WARNING):
        record = uniform_soup.main(argv(zoo, fmnist_root, out))
    lines = db.read_text().split("\n")
    assert lines[1] == '{"method": "uniform", "heldo' and json.loads(lines[2]) == json.loads(
        json.dumps(record, default=str))
    assert len(soup_lines(out)) == 1
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 1 line(s)" in warnings[0] and "line 2" in warnings[0], warnings
    # the rerun finds its line (it was not lost by gluing) and appends nothing
    assert uniform_soup.main(argv(zoo, fmnist_root, out))["time"] == record["time"]
    assert len(soup_lines(out)) == 1


@pytest.mark.parametrize("junk", [b"[1, 2, 3]\n", b'"a string"\n', b"42\n", b"null\n",
                                  b'{"method": "uniform", "args": \xff\xfe}\n', b"\xc3\x28\n",
                                  b"[" * 100000 + b"\n"],
                         ids=["list", "string", "number", "null", "bad-utf8-object", "bad-utf8",
                              "deep-nesting"])
def test_unusable_results_lines_are_skipped_and_counted(caplog, zoo, out, fmnist_root, junk):
    """After a first line that is a JSON object (a first line that is not one is another kind of file:
    test_a_file_whose_first_line_is_not_a_json_object_is_never_appended_to)."""
    db = out / "results.jsonl"
    junk = b'{"method": "individual", "index": 99}\n' + junk
    db.write_bytes(junk)
    with caplog.at_level(logging.WARNING):
        first = uniform_soup.main(argv(zoo, fmnist_root, out))
        again = uniform_soup.main(argv(zoo, fmnist_root, out))
    assert again["time"] == first["time"]  # the rerun found the finished run: not appended twice
    assert len(soup_lines(out)) == 1
    assert db.read_bytes().startswith(junk)  # earlier lines are never deleted
    warnings = [r.getMessage() for r in caplog.records if "skipped 1 line(s)" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, though the file is read several times


def test_invalid_utf8_line_does_not_hide_a_finished_run(zoo, out, fmnist_root):
    uniform_soup.main(argv(zoo, fmnist_root, out))
    with open(out / "results.jsonl", "ab") as f:
        f.write(b"\xff\xfe not text\n")
    uniform_soup.main(argv(zoo, fmnist_root, out))
    assert len(soup_lines(out)) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["device", "fifo", "folder-link"])
def test_results_path_that_is_not_a_regular_file(tmp_path, zoo, out, fmnist_root, kind):
    """As a process with a timeout: reading /dev/zero or a FIFO would never end."""
    db = out / "results.jsonl"
    if kind == "device":
        os.symlink("/dev/zero", db)
        what = "is a character device (a symbolic link to /dev/zero), not a regular file"
    elif kind == "fifo":
        os.mkfifo(db)
        what = "is a FIFO (named pipe), not a regular file"
    else:
        os.symlink(tmp_path, db)
        what = "is a folder"
    done = subprocess.run([sys.executable, str(ROOT / "greedy_soup.py"),
                           *argv(zoo, fmnist_root, out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    line = last_line(done)
    assert line.startswith(f"error: --results-db {db} ") and what in line, line
    assert not (out / "soup.pt").exists()


# ------------------------------------------------------------------------ 5. two runs, one soup path
HOLDER = ("import sys, time; from utils.files import lock; lock.acquire(sys.argv[1]); "
          "print('held', flush=True); time.sleep(120)")


@pytest.mark.slow
@pytest.mark.parametrize("script", ["uniform", "mehl"])
def test_a_second_run_on_the_same_soup_is_refused_naming_the_holder(capsys, zoo, out, fmnist_root, script):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out / "soup.pt")], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused(capsys, script, argv(zoo, fmnist_root, out, first=QUICK[script]))
        assert line == (f"error: output {out / 'soup.pt'} is in use by another run (pid {holder.pid}, "
                        f"lock {out / '.soup.pt.lock'}): wait for it to finish or choose another path"), line
        assert not (out / "results.jsonl").exists() and not (out / "soup.pt").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # the kernel dropped the killed holder's lock: the run goes ahead
    SCRIPTS[script].main(argv(zoo, fmnist_root, out, first=QUICK[script]))
    assert load_state_dict(out / "soup.pt")


@pytest.mark.slow
def test_two_runs_started_together_one_is_refused(zoo, out, fmnist_root):
    """Two processes, same --save-soup, different ranges: never a soup of one beside the other's
    recipe. One finishes, the other is refused (the lock) or, if the first had already finished,
    refuses the existing soup."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "uniform_soup.py"),
                               *argv(zoo, fmnist_root, out, "--params_end", end)],
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for end in (2, 3)]
    codes = [p.wait(timeout=120) for p in procs]
    errs = [p.stderr.read() for p in procs]
    assert sorted(codes) == [0, 2], errs
    loser = errs[codes.index(2)].strip().splitlines()[-1]
    assert "is in use by another run (pid " in loser or "exists: refusing to overwrite" in loser, loser
    recipe = json.loads((out / "soup.recipe.json").read_text())
    [line] = soup_lines(out)
    assert len(recipe["ingredients"]) == len(line["ingredients"])  # soup, recipe and line of one run


# ------------------------------------------------------------------------------- 6. the MEHL state
MEHL_ARGS = ["--model_batch", "1", "--stop-after-groups", "1"]


@pytest.fixture(scope="module")
def mehl_state(tmp_path_factory, fmnist_root):
    """A real state after one group of three (K=1), with its zoo."""
    base = tmp_path_factory.mktemp("mehlstate")
    zoo = make_zoo(base / "zoo", 3)
    out = base / "out"
    out.mkdir()
    assert MEHL_soup_layer.main(argv(zoo, fmnist_root, out, *MEHL_ARGS, first=QUICK["mehl"])) is None
    return zoo, out / "soup.state.pt"


def _tampered(mehl_state, tmp_path, edit):
    """A copy of the zoo and the state (the fingerprints record the zoo's files) with `edit` applied."""
    zoo, state_file = mehl_state
    copy = tmp_path / "zoo"
    shutil.copytree(zoo, copy, copy_function=shutil.copy2)  # same size, mtime and contents
    out = tmp_path / "out"
    out.mkdir()
    state = torch.load(state_file, weights_only=True)
    state["config"]["model_location"] = str(copy.resolve())
    for item in state["config"]["ingredient_files"]:
        item["path"] = str(copy / os.path.basename(item["path"]))
    edit(state, copy)
    torch.save(state, out / "soup.state.pt")
    return copy, out


STATE_EDITS = {
    "missing-soup": (lambda s, z: s.pop("soup"), "the state file lacks the field(s) soup"),
    "missing-rng": (lambda s, z: s.pop("data_rng"), "lacks the field(s) data_rng"),
    "config-not-dict": (lambda s, z: s.update(config=[1, 2]), "its config is a list, not a dict"),
    "no-fingerprints": (lambda s, z: s["config"].pop("ingredient_files"),
                        "records no ingredient fingerprints"),
    "soup-too-short": (lambda s, z: s.update(soup=s["soup"][:-1]), "soup has shape"),
    "soup-nan": (lambda s, z: s["soup"].__setitem__(0, float("nan")), "soup holds NaN or Inf"),
    "soup-float64": (lambda s, z: s.update(soup=s["soup"].double()), "soup is torch.float64"),
    "soup-sparse": (lambda s, z: s.update(soup=s["soup"].to_sparse()), "soup is not a dense tensor"),
    "alpha-wrong-shape": (lambda s, z: s.update(alpha=s["alpha"][:, :2]), "alpha has shape"),
    "alpha-inf": (lambda s, z: s["alpha"].__setitem__((0, 0), float("inf")), "alpha holds NaN or Inf"),
    "order-repeats": (lambda s, z: s.update(order=[0, 0, 1]), "order is not a permutation of the 3"),
    "order-short": (lambda s, z: s.update(order=[0, 1]), "order is not a permutation of the 3"),
    "order-not-ints": (lambda s, z: s.update(order=[0.0, 1.0, 2.0]), "order is not a permutation"),
    "group-out-of-range": (lambda s, z: s.update(next_group=7), "next_group 7 is not in [0, 3]"),
    "group-negative": (lambda s, z: s.update(next_group=-1), "next_group -1 is not in [0, 3]"),
    "group-skipped": (lambda s, z: s.update(next_group=2), "the log of finished groups has 1 entries"),
    "models-epoch-out-of-range": (lambda s, z: s.update(models_epoch=1), "models_epoch 1 is not in [0, 1)"),
    "rng-garbage": (lambda s, z: s.update(models_rng=torch.zeros(3, dtype=torch.uint8)),
                    "models_rng is not a generator state"),
    "seconds-nan": (lambda s, z: s.update(seconds=float("nan")), "seconds nan is not a finite number"),
    "ingredient-replaced": (lambda s, z: torch.save(torch.load(z / "model_0.pt", weights_only=True)
                                                    | {"classifier.bias": torch.ones(10)}, z / "model_0.pt"),
                            "ingredient {zoo}/model_0.pt ("),
    "ingredient-touched": (lambda s, z: os.utime(z / "model_2.pt", ns=(1, 1)),
                           "ingredient {zoo}/model_2.pt (modification time) changed since the state"),
    "ingredient-same-size-and-time": (lambda s, z: _same_size_and_time(z / "model_1.pt"),
                                      "ingredient {zoo}/model_1.pt (contents) changed"),
}


def _same_size_and_time(path):
    st = path.stat()
    sd = torch.load(path, weights_only=True)
    sd["classifier.bias"] = sd["classifier.bias"] + 1
    torch.save(sd, path)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("case", STATE_EDITS)
def test_resume_state_is_validated_field_by_field(capsys, tmp_path, mehl_state, fmnist_root, case):
    edit, expected = STATE_EDITS[case]
    zoo, out = _tampered(mehl_state, tmp_path, edit)
    line = refused(capsys, "mehl", argv(zoo, fmnist_root, out, "--model_batch", "1", "--resume", first=QUICK["mehl"]))
    expected = expected.format(zoo=zoo)
    assert line.startswith(f"error: --resume {out / 'soup.state.pt'}") and expected in line, line
    assert not (out / "soup.pt").exists() and not (out / "results.jsonl").exists()


def test_untampered_copy_resumes(tmp_path, mehl_state, fmnist_root):
    """The control for the cases above: the same copying, no edit, resumes and finishes."""
    zoo, out = _tampered(mehl_state, tmp_path, lambda s, z: None)
    record = MEHL_soup_layer.main(argv(zoo, fmnist_root, out, "--model_batch", "1", "--resume", first=QUICK["mehl"]))
    assert len(record["groups"]) == 3 and (out / "soup.pt").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
@pytest.mark.parametrize("content", ["hostile", "text", "empty"])
def test_hostile_or_unreadable_state_file_is_one_line(tmp_path, zoo, out, fmnist_root, content):
    state = out / "soup.state.pt"
    marker = tmp_path / "pwned"
    if content == "hostile":
        torch.save({"version": 1, "payload": _Payload(marker)}, state)
    else:
        state.write_text("" if content == "empty" else "not a state\n")
    done = cli("mehl", argv(zoo, fmnist_root, out, "--resume", first=QUICK["mehl"]))
    line = last_line(done)
    assert line.startswith(f"error: --resume {state}: not a readable MEHL state file: "), line
    assert len([x for x in done.stderr.splitlines() if x.startswith("error")]) == 1
    assert not done.stderr.strip().splitlines()[-1].startswith(" ") and not marker.exists()


# ---------------------------------------------------------------------------------------- 7. numbers
@pytest.mark.parametrize("script, extra, expected", [
    ("mehl", ["--lr", "1e30"], "try a smaller --lr (now 1e+30)"),
    ("mehl", ["--lr", "1e30", "--optimizer", "sgd"], "try a smaller --lr (now 1e+30)"),
])
def test_diverging_learning_never_writes_a_soup(capsys, zoo, out, fmnist_root, script, extra, expected):
    line = refused(capsys, script, argv(zoo, fmnist_root, out, *extra, first=QUICK[script]))
    assert "became non-finite (NaN or Inf)" in line and expected in line, line
    if script == "mehl":
        assert " in group " in line and ", step " in line, line
    assert not (out / "soup.pt").exists() and not soup_lines(out)
    assert not (out / "soup.state.pt").exists() or torch.isfinite(
        torch.load(out / "soup.state.pt", weights_only=True)["soup"]).all()


@pytest.mark.parametrize("script, extra, message", [
    ("mehl", ["--lr", "1e300"], "--lr must be at most 3.40282e+37 (a tenth of the largest float32), got "
     "1e+300"),
    ("learned", ["--lr", "1e38"], "--lr must be at most 3.40282e+37 (a tenth of the largest float32), got "
     "1e+38"),
    ("mehl", ["--lr", "1e30", "--wd", "1e10"],
     "--lr times --wd must be at most 3.40282e+37, got 1e+30 x 1e+10"),
])
def test_a_learning_rate_beyond_float32_is_refused(capsys, zoo, out, fmnist_root, script, extra, message):
    line = refused(capsys, script, argv(zoo, fmnist_root, out, *extra, first=QUICK[script]))
    assert line == f"error: {message}", line
    nothing_written(out)


@pytest.mark.parametrize("script, flag, value", [
    ("mehl", "--randomseed", str(2**70)),
    ("mehl", "--randomseed", "-1"),
    ("mehl", "--randomseed", str(2**64)),
    ("learned", "--seed", str(2**64)),
    ("greedy", "--split-seed", "-1"),
    ("uniform", "--split-seed", str(2**80)),
])
def test_seeds_are_range_checked(capsys, zoo, out, fmnist_root, script, flag, value):
    line = refused(capsys, script, argv(zoo, fmnist_root, out, flag, value, first=QUICK[script]))
    assert line == (f"error: {flag} must be an integer in [0, 2**64 - 1] (what torch.Generator takes), "
                    f"got {value}"), line
    nothing_written(out)


@pytest.mark.parametrize("script, flag", [("mehl", "--randomseed"), ("learned", "--seed")])
def test_the_largest_seed_works(zoo, out, fmnist_root, script, flag):
    record = SCRIPTS[script].main(argv(zoo, fmnist_root, out, flag, str(2**64 - 1), first=QUICK[script]))
    assert record["args"][flag.lstrip("-")] == 2**64 - 1


def test_a_soup_with_a_non_finite_number_is_never_written(tmp_path):
    from utils.files.soup_io import save_soup
    sd = {"w": torch.tensor([1.0, float("inf")])}
    with pytest.raises(UserError, match=r"refusing to write .*soup\.pt: tensor w of the soup holds NaN"):
        save_soup(sd, tmp_path / "soup.pt", "uniform", [], {})
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ 8. data location
def test_missing_fashion_mnist_offline_is_one_line_and_leaves_nothing(capsys, monkeypatch, tmp_path, zoo,
                                                                      out):
    from datasets import fashion_mnist
    monkeypatch.setattr(fashion_mnist, "online", lambda *a, **k: False, raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    line = refused(capsys, "uniform", argv(zoo, empty, out))
    assert line.startswith("error: Fashion-MNIST not found; looked in ") and "(offline, so no download " \
        "was tried)" in line, line
    assert os.listdir(empty) == []
    nothing_written(out)


def test_a_failed_download_leaves_nothing(capsys, monkeypatch, tmp_path, zoo, out):
    import torchvision.datasets
    from datasets import fashion_mnist

    class Broken:
        def __init__(self, root, train=True, download=False):
            raw = os.path.join(root, "FashionMNIST", "raw")
            os.makedirs(raw, exist_ok=True)
            open(os.path.join(raw, "train-images-idx3-ubyte.gz"), "wb").write(b"half")
            print("Downloading http://example/train-images-idx3-ubyte.gz")
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(fashion_mnist, "online", lambda *a, **k: True, raising=False)
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Broken)
    target = tmp_path / "new-folder"
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_main(uniform_soup.main, argv(zoo, target, out))
    captured = capsys.readouterr()
    assert "Downloading" not in captured.out + captured.err
    line = [x for x in captured.err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "(the download failed: " in line[0] and "Error downloading" in line[0], line
    assert not target.exists()


# ------------------------------------------------------------------------------------- 9. smaller
def test_ingredient_that_is_a_device_says_what_it_is(capsys, zoo, out, fmnist_root):
    (zoo / "model_1.pt").unlink()
    os.symlink("/dev/zero", zoo / "model_1.pt")
    line = refused(capsys, "learned", argv(zoo, fmnist_root, out, first=QUICK["learned"]))
    assert line == (f"error: {zoo / 'model_1.pt'}: is a character device (a symbolic link to /dev/zero), "
                    "not a checkpoint file"), line
    nothing_written(out)


def test_ingredient_that_is_a_fifo_or_a_folder(capsys, zoo, out, fmnist_root):
    (zoo / "model_1.pt").unlink()
    os.mkfifo(zoo / "model_1.pt")
    line = refused(capsys, "uniform", argv(zoo, fmnist_root, out))
    assert line == f"error: {zoo / 'model_1.pt'}: is a FIFO (named pipe), not a checkpoint file", line
    (zoo / "model_1.pt").unlink()
    (zoo / "model_1.pt").mkdir()
    line = refused(capsys, "uniform", argv(zoo, fmnist_root, out))
    assert line == f"error: {zoo / 'model_1.pt'}: is a folder, not a checkpoint file", line
    nothing_written(out)


def test_resume_path_that_is_a_folder_is_refused_before_work(capsys, tmp_path, zoo, out, fmnist_root):
    folder = tmp_path / "statedir"
    folder.mkdir()
    line = refused(capsys, "mehl", argv(zoo, fmnist_root, out, "--resume", folder, first=QUICK["mehl"]))
    assert line == f"error: --resume {folder} is a folder: give a file name", line
    nothing_written(out)
    assert os.listdir(folder) == []


def test_rebuild_names_a_missing_ingredient(zoo, out, fmnist_root):
    from utils.files.soup_io import rebuild
    uniform_soup.main(argv(zoo, fmnist_root, out))
    (zoo / "model_2.pt").unlink()
    with pytest.raises(UserError) as info:
        rebuild(out / "soup.recipe.json")
    assert str(info.value) == (f"{out / 'soup.recipe.json'}: ingredient {(zoo / 'model_2.pt').resolve()} "
                               "is missing (no such checkpoint file); the soup cannot be rebuilt without it")
    recipe = out / "soup.recipe.json"
    recipe.write_text("{not json")
    with pytest.raises(UserError, match="not a readable soup recipe"):
        rebuild(recipe)


def test_many_line_messages_become_one_line(capsys):
    def main(argv):
        raise UserError("first\n  second\n\nthird")
    with pytest.raises(SystemExit):
        run_main(main, [])
    assert capsys.readouterr().err == "error: first second third\n"


# ------------------------------------------------- 10. the scripts' own flags and outputs (issue 31.4, 5, 7)
def script_module(name):
    """scripts/<name>.py as a module (scripts/ is not a package for every script)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"hostile_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line(capsys, main, args):
    """`main(args)` through run_main as a user runs it: exit 2 and its one `error:` line (argparse's own
    refusals end in `<prog>: error: ...` after its usage line)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, [str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def tree(*folders):
    return {str(p): p.read_bytes() if p.is_file() else None for f in folders for p in sorted(f.rglob("*"))}


@pytest.mark.parametrize("extra, said", [
    (["--counts", "abc"], "error: --counts 'abc': give comma-separated whole numbers >= 1 or 'all', got 'abc'"),
    (["--counts", "2,,3"], "error: --counts '2,,3': give comma-separated whole numbers >= 1 or 'all', got ''"),
    (["--counts", "0"], "error: --counts '0': give comma-separated whole numbers >= 1 or 'all', got '0'"),
    (["--counts", "9"], "error: --counts 9: the zoo holds 3 ingredients"),
    (["--timeout", "0"], "error: --timeout must be a finite number > 0, got 0.0"),
    (["--timeout", "nan"], "error: --timeout must be a finite number > 0, got nan"),
    (["--timeout", "-1"], "error: --timeout must be a finite number > 0, got -1.0"),
    (["--test-size", "0"], "error: --test-size must be a whole number >= 1, got 0"),
    (["--synthetic-zoo", "-2"], "error: --synthetic-zoo must be a whole number >= 0, got -2"),
    (["--num-classes", "0"], "error: --num-classes must be a whole number >= 1, got 0"),
    (["--methods", "soup"], "error: --methods: unknown ['soup']; known: uniform, greedy, learned, learned+"),
    (["--device", "bogus"], "error: argument --device: expected auto, cpu, cuda or cuda:N, got 'bogus'"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bench_baselines_flags_are_one_line(capsys, tmp_path, zoo, extra, said):
    bench = script_module("bench_baselines")
    out = tmp_path / "bench"
    line = one_line(capsys, bench.main, ["--model-location", zoo, "--arch", TINY_CNN, "--out", out, *extra])
    assert line.endswith(said) if said.startswith("error: argument") else line == said, line
    assert not out.exists()


def test_bench_baselines_timeout_is_a_failed_row_not_a_traceback(tmp_path, zoo, fmnist_root):
    """--timeout 0.01 raised subprocess.TimeoutExpired out of the script: each run is now a failed row."""
    bench = script_module("bench_baselines")
    rows = bench.main(["--model-location", str(zoo), "--arch", TINY_CNN, "--data-location", str(fmnist_root),
                       "--counts", "2", "--methods", "uniform", "--out", str(tmp_path / "b"), "--timeout", "0.01",
                       "--device", "cpu"])
    assert rows == [{"method": "uniform", "n": 2, "error": ["stopped after --timeout 0.01 s"],
                     "wall_s": rows[0]["wall_s"]}]
    assert json.loads((tmp_path / "b" / "bench.json").read_text())["rows"] == rows


def test_bench_outputs_never_land_on_an_input_or_another_kind_of_file(capsys, tmp_path, zoo, fmnist_root):
    """`bench_mehl.py --out zoo/model_0.pt` overwrote an ingredient with JSON (issue 31.5)."""
    mehl, baselines = script_module("bench_mehl"), script_module("bench_baselines")
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    before = tree(zoo, fmnist_root, tmp_path)
    base = ["--model-location", zoo, "--arch", TINY_CNN, "--data-location", fmnist_root, "--ks", "2",
            "--device", "cpu"]
    line = one_line(capsys, mehl.main, [*base, "--out", zoo / "model_0.pt"])
    assert line.startswith(f"error: --out {zoo / 'model_0.pt'} is also ingredient model_0.pt of --model-location"), line
    line = one_line(capsys, mehl.main, [*base, "--out", zoo / "model_7.pt"])
    assert line.startswith(f"error: --out {zoo / 'model_7.pt'} would be read as ingredient model_7.pt"), line
    data_file = fmnist_root / "train-labels-idx1-ubyte.gz"
    line = one_line(capsys, mehl.main, [*base, "--out", data_file])
    assert line.startswith(f"error: --out {data_file} is also a file of the data set"), line
    line = one_line(capsys, mehl.main, [*base, "--out", notes])
    assert line.startswith(f"error: --out {notes} exists and is not a file this script wrote"), line
    line = one_line(capsys, mehl.main, [*base, "--out", tmp_path])
    assert line == f"error: --out {tmp_path} is a folder: give a file name", line
    line = one_line(capsys, mehl.main, [*base, "--out", tmp_path / ("n" * 250 + ".json")])
    assert "its name is too long for" in line, line
    draws = script_module("greedy_draws")
    line = one_line(capsys, draws.main, ["--zoo", zoo, "--out", zoo / "model_9.pt"])
    assert line.startswith(f"error: --out {zoo / 'model_9.pt'} would be read as ingredient model_9.pt"), line
    line = one_line(capsys, baselines.main, ["--model-location", zoo, "--arch", TINY_CNN, "--out", notes,
                                             "--counts", "2"])
    assert line == f"error: --out {notes} is a file: give a folder", line
    (fmnist_root / "uniform_2.jsonl").symlink_to(zoo / "model_1.pt")  # a results file that is an ingredient
    try:
        line = one_line(capsys, baselines.main, ["--model-location", zoo, "--arch", TINY_CNN, "--out", fmnist_root,
                                                 "--counts", "2", "--methods", "uniform"])
    finally:
        (fmnist_root / "uniform_2.jsonl").unlink()
    assert line.startswith(f"error: --out {fmnist_root / 'uniform_2.jsonl'} is also ingredient model_1.pt"), line
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "uniform_2.jsonl").write_bytes(b"PK\x03\x04 someone's file")
    line = one_line(capsys, baselines.main, ["--model-location", zoo, "--arch", TINY_CNN, "--out", tmp_path / "b",
                                             "--counts", "2", "--methods", "uniform"])
    assert line.startswith(f"error: --out {tmp_path / 'b' / 'uniform_2.jsonl'} is not a results file"), line
    assert tree(zoo, fmnist_root, tmp_path) == {**before, str(tmp_path / "b"): None,
                                                str(tmp_path / "b" / "uniform_2.jsonl"): b"PK\x03\x04 someone's file"}


@pytest.mark.parametrize("extra, said", [
    (["--ks", "abc"], "error: --ks 'abc': give whole numbers >= 1 or 'all'"),
    (["--ks", "0"], "error: --ks '0': give whole numbers >= 1 or 'all'"),
    (["--layer-size", "-1"], "error: --layer-size must be a whole number >= 0, got -1"),
    (["--threads", "0"], "error: --threads must be a whole number >= 1, got 0"),
    (["--num-classes", "0"], "error: --num-classes must be a whole number >= 1, got 0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bench_mehl_flags_are_one_line(capsys, tmp_path, zoo, extra, said):
    mehl = script_module("bench_mehl")
    line = one_line(capsys, mehl.main, ["--model-location", zoo, "--arch", TINY_CNN, "--out",
                                        tmp_path / "b.json", *extra])
    assert line == said, line
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("extra, said", [
    (["--deadline", "0"], "error: --deadline must be a finite number > 0, got 0.0"),
    (["--deadline", "nan"], "error: --deadline must be a finite number > 0, got nan"),
    (["--memory-limit", "1e300"], "error: --memory-limit must be a finite number > 0 and <= 1.07374e+09, got 1e+300"),
    (["--memory-limit", "-1"], "error: --memory-limit must be a finite number > 0 and <= 1.07374e+09, got -1.0"),
    (["--k", "many"], "error: --k must be a whole number >= 1 or 'auto', got 'many'"),
    (["--k", "0"], "error: --k must be a whole number >= 1 or 'auto', got '0'"),
    (["--fraction", "nan"], "error: --fraction must be in (0, 1], got nan"),
    (["--python", "/nonexistent/python"], "error: --python /nonexistent/python: not an executable file"),
    (["--arch", "no-such-arch"], "error: unknown --arch 'no-such-arch'; known: "),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_paper_scale_flags_are_one_line(capsys, tmp_path, extra, said):
    from scripts import paper_scale
    line = one_line(capsys, paper_scale.main, ["--out", tmp_path / "ps", *extra])
    assert line.startswith(said), line
    assert not (tmp_path / "ps").exists()


def test_paper_scale_out_that_cannot_hold_its_files_is_one_line(capsys, tmp_path):
    from scripts import paper_scale
    blocker = tmp_path / "a file"
    blocker.write_text("mine")
    line = one_line(capsys, paper_scale.main, ["--out", blocker / "ps"])
    assert line.startswith(f"error: --out {blocker / 'ps' / 'paper_scale.json'}: cannot write in"), line
    line = one_line(capsys, paper_scale.main, ["--out", tmp_path / ("p" * 256)])
    assert line.startswith("error: --out ") and "File name too long" in line, line
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize("extra, said", [
    (["--device", "bogus"], "error: argument --device: expected auto, cpu, cuda or cuda:N, got 'bogus'"),
    (["--lr", "nan"], "error: --lr must be a finite number, got nan"),
    (["--wd", "inf"], "error: --wd must be a finite number, got inf"),
    (["--mixup", "nan"], "error: --mixup must be a finite number, got nan"),
    (["--test-size", "-1"], "error: --test-size must be a whole number >= 0, got -1"),
    (["--workers", "-1"], "error: --workers must be a whole number >= 0, got -1"),
    (["--frozen-blocks", "-1"], "error: --frozen-blocks must be a whole number >= 0, got -1"),
    (["--seed", str(2**64)], "error: --seed must be an integer in [0, 2**64 - 1]"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_finetune_flags_are_one_line(capsys, tmp_path, extra, said):
    import finetune
    line = one_line(capsys, finetune.main, ["--arch", TINY_CNN, "--out-dir", tmp_path / "ft", *extra])
    assert line.endswith(said) if said.startswith("error: argument") else line.startswith(said), line
    assert not (tmp_path / "ft").exists()


def test_finetune_outputs_are_checked_before_the_work(capsys, tmp_path, fmnist_root):
    import finetune
    base = ["--arch", TINY_CNN, "--linear-probe", "--data-location", fmnist_root, "--device", "cpu"]
    blocker = tmp_path / "a file"
    blocker.write_text("mine")
    line = one_line(capsys, finetune.main, [*base, "--out-dir", blocker])
    assert line == f"error: --out-dir {blocker / 'model_0.pt'}: {blocker} is a file, not a folder", line
    (tmp_path / "ft" / "model_0.json").mkdir(parents=True)
    line = one_line(capsys, finetune.main, [*base, "--out-dir", tmp_path / "ft"])
    assert line == f"error: --out-dir {tmp_path / 'ft' / 'model_0.json'} is a folder: give a file name", line
    assert blocker.read_text() == "mine" and os.listdir(tmp_path / "ft") == ["model_0.json"]
