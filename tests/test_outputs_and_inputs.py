"""Outputs against inputs (docs/GUARANTEES.md, "Outputs are never an input, atomic, and never silently overwritten"):
an output path that is an ingredient, a data file, the held-out index or another output of the run is
one line, exit 2, before anything is read or written (no results line, no lock file, no temporary
file); a lock never truncates a file that is not its own; a soup and its recipe are replaced as a pair,
and a full disk is said in those words."""
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, make_fmnist
from tests.helpers import QUICK, SCRIPTS, argv, refused
from tests.models import TINY_CNN
from utils.files import lock, soup_io, state_dicts
from utils.files.state_dicts import load_state_dict
from utils.runtime.errors import UserError

TORCH_FULL_DISK = "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"


def snapshot(*folders):
    """Every file and link under `folders` (hidden ones included) with its bytes or link target."""
    seen = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                mode = os.lstat(p).st_mode
                seen[p] = (("link", os.readlink(p)) if stat.S_ISLNK(mode) else
                           ("file", open(p, "rb").read()) if stat.S_ISREG(mode) else ("other", mode))
    return seen


def set_flag(args, flag, value):
    """`args` with `flag` set to `value` (replaced where present, else added)."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = str(value)
    else:
        args += [flag, str(value)]
    return args


def refused_untouched(capsys, script, args, *folders):
    """The one error line of a refused run, after asserting that nothing under `folders` changed."""
    before = snapshot(*folders)
    line = refused(capsys, script, args)
    assert snapshot(*folders) == before, "a file was written, changed or left"
    return line


# ------------------------------------------------------------------------- 1. outputs that collide
@pytest.mark.parametrize("script", SCRIPTS)
def test_results_file_named_as_the_soup_is_refused(capsys, zoo, out, fmnist_root, script):
    for soup in ("soup.pt", "soup.safetensors"):
        args = argv(zoo, fmnist_root, out, "--save-soup", out / soup, "--results-db", out / soup,
                    first=QUICK[script])
        line = refused_untouched(capsys, script, args, out, zoo)
        assert line == (f"error: --results-db {out / soup} is also the soup (--save-soup): give each "
                        "output a file of its own")


def test_soup_named_as_an_ingredient_is_refused_even_with_overwrite(capsys, zoo, out, fmnist_root):
    args = argv(zoo, fmnist_root, out, "--save-soup", zoo / "model_0.pt", "--overwrite")
    line = refused_untouched(capsys, "uniform", args, out, zoo)
    assert line == (f"error: --save-soup {zoo / 'model_0.pt'} is also ingredient model_0.pt of --model-location "
                    f"{zoo}: an output never replaces an input (--overwrite does not change that); "
                    "choose another path")


def test_soup_named_as_a_new_ingredient_of_the_zoo_is_refused(capsys, zoo, out, fmnist_root):
    """model_3.pt in a zoo of 3 would be souped by every later run of the folder."""
    line = refused_untouched(capsys, "greedy", argv(zoo, fmnist_root, out, "--save-soup", zoo / "model_3.pt"),
                             out, zoo)
    assert line.startswith(f"error: --save-soup {zoo / 'model_3.pt'} would be read as ingredient model_3.pt "
                           f"of --model-location {zoo}: "), line


@pytest.mark.parametrize("case", ["ingredient", "symlink to an ingredient", "hard link to an ingredient",
                                  "lock file", "recipe", "coefficients", "through a linked folder",
                                  "temporary of the soup"])
def test_results_file_on_another_file_of_the_run_is_refused(capsys, tmp_path, zoo, out, fmnist_root, case):
    results = {"ingredient": zoo / "model_1.pt", "symlink to an ingredient": out / "results.jsonl",
               "hard link to an ingredient": out / "results.jsonl", "lock file": out / ".soup.pt.lock",
               "recipe": out / "soup.recipe.json", "coefficients": out / "soup.coefficients.json",
               "through a linked folder": tmp_path / "elsewhere" / "soup.pt",
               "temporary of the soup": out / ".soup.pt.results.tmp"}[case]
    if case == "symlink to an ingredient":
        results.symlink_to(zoo / "model_1.pt")
    elif case == "hard link to an ingredient":
        os.link(zoo / "model_1.pt", results)
    elif case == "through a linked folder":
        results.parent.symlink_to(out)
    expected = {"lock file": f"the lock file of the soup (--save-soup {out / 'soup.pt'})",
                "recipe": f"the recipe file of the soup (--save-soup {out / 'soup.pt'})",
                "coefficients": f"the coefficients file of the soup (--save-soup {out / 'soup.pt'})",
                "through a linked folder": "the soup (--save-soup)"}.get(
        case, f"ingredient model_1.pt of --model-location {zoo}")
    verb = "is named like a temporary file of the soup (--save-soup), which writing it removes" \
        if case == "temporary of the soup" else f"is also {expected}"
    args = argv(zoo, fmnist_root, out, "--results-db", results, first=QUICK["learned"])
    line = refused_untouched(capsys, "learned", args, out, zoo)
    assert line.startswith(f"error: --results-db {results} {verb}: "), line


def test_results_file_on_the_heldout_index_or_a_data_file_is_refused(capsys, tmp_path, zoo, out):
    import numpy as np
    data = make_fmnist(tmp_path / "data", n_train=100, n_test=20)  # its own copy: a broken run would spoil it
    index = tmp_path / "heldout.npy"
    np.save(index, (np.arange(100) % 10 == 0).astype(np.uint8))
    args = argv(zoo, data, out, "--heldout-index", index, heldout=None)
    line = refused_untouched(capsys, "uniform", set_flag(args, "--results-db", index), out, zoo, tmp_path)
    assert line.startswith(f"error: --results-db {index} is also the held-out index (--heldout-index): "), line
    data_file = data / "train-labels-idx1-ubyte.gz"
    line = refused_untouched(capsys, "uniform", set_flag(args, "--results-db", data_file), out, zoo, tmp_path)
    assert line.startswith(f"error: --results-db {data_file} is also a file of the data set "
                           f"(--data-location {data}): an output never replaces an input"), line


def individual_script():
    """scripts/individual.py as a module (scripts/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("individual_script", ROOT / "scripts" / "individual.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_individual_step_never_appends_to_an_input(capsys, monkeypatch, tmp_path, zoo, fmnist_root):
    """scripts/individual.py writes only results lines: its --results-db is checked as the soup
    scripts' is, against the ingredients, the data (given or at its standard place) and the index."""
    import datasets.fashion_mnist
    script = individual_script()
    base = ["--model-location", str(zoo), "--arch", TINY_CNN, "--heldout-per-class", "3", "--test-size", "20",
            "--device", "cpu"]
    before = snapshot(zoo, fmnist_root)
    for results, expected in ((zoo / "model_0.pt", f"is also ingredient model_0.pt of --model-location {zoo}"),
                              (fmnist_root / "train-labels-idx1-ubyte.gz",
                               f"is also a file of the data set (--data-location {fmnist_root})")):
        with pytest.raises(UserError) as err:
            script.main(base + ["--data-location", str(fmnist_root), "--results-db", str(results)])
        assert str(err.value).startswith(f"--results-db {results} {expected}: "), str(err.value)
    assert snapshot(zoo, fmnist_root) == before
    system = make_fmnist(tmp_path / "system", n_train=100, n_test=20)
    monkeypatch.setattr(datasets.fashion_mnist, "SYSTEM_DIR", system)
    before = snapshot(system)
    with pytest.raises(UserError) as err:
        script.main(base + ["--results-db", str(system / "t10k-labels-idx1-ubyte.gz")])
    assert f"is also a file of the data set (its standard place {system})" in str(err.value), str(err.value)
    assert snapshot(system) == before


@pytest.mark.parametrize("script", ["uniform", "mehl", "finetune"])
def test_a_file_of_the_data_sets_standard_place_is_refused(capsys, monkeypatch, tmp_path, zoo, out, script):
    """Without --data-location the data set is read from its standard place, known only once it is read:
    an output there is refused then, before any work (the run's lock file beside its soup is all that
    was made; it never touches a file that is not a lock)."""
    import datasets.fashion_mnist
    import finetune
    system = make_fmnist(tmp_path / "system", n_train=100, n_test=20)
    monkeypatch.setattr(datasets.fashion_mnist, "SYSTEM_DIR", system)
    data_file = system / "train-labels-idx1-ubyte.gz"
    expected = (f"is also a file of the data set (its standard place {system}): an output never replaces "
                "an input")
    if script == "finetune":
        (system / "model_0.pt").write_bytes(b"not a model")  # a file of the data set named as the output
        before = snapshot(system)
        with pytest.raises(UserError) as err:
            finetune.main(["--out-dir", str(system), "--index", "0", "--linear-probe", "--heldout-per-class", "3",
                           "--finetune-size", "64", "--test-size", "30", "--device", "cpu", "--arch", TINY_CNN,
                           "--overwrite"])
        assert str(err.value).startswith(f"--out-dir {system / 'model_0.pt'} {expected}"), str(err.value)
        assert snapshot(system) == before
        return
    args = argv(zoo, None, out, "--results-db", data_file, heldout=3, first=QUICK[script])
    i = args.index("--data-location")
    del args[i:i + 2]
    line = refused_untouched(capsys, script, args, zoo, system)
    assert line.startswith(f"error: --results-db {data_file} {expected}"), line


def test_mehl_outputs_known_only_later_are_checked_first(capsys, monkeypatch, tmp_path, zoo, fmnist_root):
    """MEHL's default soup is runs/MEHL-Soup.pt or runs/MEHL-Soup+.pt (the block count decides), and its
    state is --resume's file or the one beside the soup: each is checked before any work."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs"
    out.mkdir()
    base = argv(zoo, fmnist_root, out, first=QUICK["mehl"], name=None)
    for extra, expected in (
            (["--results-db", "runs/MEHL-Soup+.pt"],
             "--results-db runs/MEHL-Soup+.pt is also the soup (the default --save-soup of MEHL-Soup+)"),
            (["--results-db", "runs/MEHL-Soup.state.pt"],
             "--results-db runs/MEHL-Soup.state.pt is also the MEHL state file (beside the soup)"),
            (["--resume", "runs/r.jsonl", "--results-db", "runs/r.jsonl"],
             "--results-db runs/r.jsonl is also the MEHL state file (--resume)"),
            (["--save-soup", "runs/s.pt", "--resume", "runs/s.pt"],
             "--resume runs/s.pt is also the soup (--save-soup)"),
            (["--resume", str(zoo / "model_2.pt")],
             f"--resume {zoo / 'model_2.pt'} is also ingredient model_2.pt of --model-location {zoo}")):
        line = refused_untouched(capsys, "mehl", base + extra, tmp_path, zoo)
        assert line.startswith(f"error: {expected}: "), (line, expected)


def test_finetune_never_writes_over_what_it_reads(zoo, fmnist_root):
    """finetune.py: the ingredient it writes is not its start model (--init, by default model_0.pt of
    --out-dir) nor --pretrained, --overwrite or not."""
    import finetune
    tiny = ["--data-location", str(fmnist_root), "--out-dir", str(zoo), "--heldout-per-class", "3",
            "--finetune-size", "64", "--test-size", "30", "--batch-size", "16", "--device", "cpu",
            "--arch", TINY_CNN, "--overwrite"]
    before = snapshot(zoo)
    for extra, expected in ((["--index", "0"], f"--out-dir {zoo / 'model_0.pt'} is also the start model (--init, "
                                                 f"by default {zoo / 'model_0.pt'})"),
                            (["--index", "1", "--init", str(zoo / "model_1.pt")],
                             f"--out-dir {zoo / 'model_1.pt'} is also the start model (--init {zoo / 'model_1.pt'})"),
                            (["--index", "2", "--linear-probe", "--pretrained", str(zoo / "model_2.pt")],
                             f"--out-dir {zoo / 'model_2.pt'} is also the pre-trained weights (--pretrained)")):
        with pytest.raises(UserError) as err:
            finetune.main(tiny + extra)
        assert str(err.value).startswith(f"{expected}: an output never replaces an input"), str(err.value)
    assert snapshot(zoo) == before


def test_a_run_with_distinct_paths_still_works(zoo, out, fmnist_root):
    """The check is not a refusal of everything: the zoo's folder may hold the outputs beside it."""
    record = SCRIPTS["uniform"].main(argv(zoo, fmnist_root, out, "--save-soup", zoo / "soup.pt",
                                          "--results-db", zoo / "results.jsonl"))
    assert record["soup_file"] == str(zoo / "soup.pt") and load_state_dict(zoo / "soup.pt")


# ---------------------------------------------------------------------------- the lock's own file
@pytest.mark.parametrize("case", ["other data", "symlink", "hard link", "fifo"])
def test_lock_never_truncates_a_file_that_is_not_its_own(tmp_path, case):
    victim = tmp_path / "precious.jsonl"
    victim.write_text('{"method": "uniform"}\n')
    soup = tmp_path / "soup.pt"
    lock_file = soup_io.sidecar(soup, "lock")
    if case == "other data":
        shutil.copy(victim, lock_file)
        victim = lock_file
    elif case == "symlink":
        lock_file.symlink_to(victim)
    elif case == "hard link":
        os.link(victim, lock_file)
    else:
        os.mkfifo(lock_file)
    before = snapshot(tmp_path)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("taking the lock blocked (a FIFO opened for writing)"))
    signal.alarm(20)
    try:
        with pytest.raises(UserError) as err:
            lock.acquire(soup)
    finally:
        signal.alarm(0)
    assert str(err.value).startswith(f"output {soup}: its lock file {lock_file} "), str(err.value)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before
    lock.release_all()


def test_lock_file_of_an_earlier_run_is_reused(tmp_path):
    soup = tmp_path / "soup.pt"
    soup_io.sidecar(soup, "lock").write_text("4242\n")  # what a killed run leaves
    lock.acquire(soup)
    assert soup_io.sidecar(soup, "lock").read_text() == f"{os.getpid()}\n"
    lock.release_all()


# ------------------------------------------------------------- 7. the soup and its recipe as a pair
class Killed(BaseException):
    """Stands for SIGKILL in-process: not an Exception, so no handler in the code turns it into an error."""


def pair_of(soup):
    """The soup's bytes and its recipe's."""
    return soup.read_bytes(), soup_io.sidecar(soup, "recipe").read_bytes()


def temporaries(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def fake_free_space(monkeypatch, folder, free):
    """shutil.disk_usage reports `free` bytes for `folder` (what a full disk reports)."""
    real = shutil.disk_usage

    def usage(path):
        u = real(path)
        return type(u)(u.total, u.total - free, free) if os.path.samefile(path, folder) else u

    monkeypatch.setattr(shutil, "disk_usage", usage)


def fill_disk_while_writing(monkeypatch, soup):
    """Writing the soup's temporary file fails half-way as on a full disk: torch.save raises the
    RuntimeError torch gives then, safetensors the error its Rust writer gives."""
    real_save = torch.save

    def torch_save(obj, f, *a, **k):
        if os.path.basename(str(f)).startswith(f".{soup.name}."):
            open(f, "wb").write(b"half a soup")
            raise RuntimeError(TORCH_FULL_DISK)
        return real_save(obj, f, *a, **k)

    def save_file(tensors, filename, *a, **k):
        open(filename, "wb").write(b"half a soup")
        raise Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                        '"No space left on device" })')

    monkeypatch.setattr(torch, "save", torch_save)
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_full_disk_while_replacing_a_soup_keeps_the_old_pair(capsys, monkeypatch, zoo, out, fmnist_root, suffix):
    soup = out / f"soup{suffix}"
    SCRIPTS["uniform"].main(argv(zoo, fmnist_root, out, "--save-soup", soup))
    old, results = pair_of(soup), (out / "results.jsonl").read_bytes()
    fill_disk_while_writing(monkeypatch, soup)
    fake_free_space(monkeypatch, out, 200 * 1024)
    line = refused(capsys, "uniform", argv(zoo, fmnist_root, out, "--save-soup", soup, "--overwrite",
                                           "--params_end", "2"))
    assert line == f"error: could not write {soup}: No space left on device (free space in {out}: 0.2 MiB)"
    assert pair_of(soup) == old, "the soup or its recipe was replaced"
    assert (out / "results.jsonl").read_bytes() == results
    assert temporaries(out) == []


def test_full_disk_is_said_in_those_words_whatever_the_library_says(monkeypatch, tmp_path):
    """The errno decides where there is one (also on an error raised from it); else the free space."""
    sd = {"w": torch.zeros(1000)}

    def raising(err):
        def save(obj, f, *a, **k):
            open(f, "wb").write(b"partial")
            raise err
        return save

    cases = [(RuntimeError(TORCH_FULL_DISK), 0, "No space left on device"),
             (RuntimeError(TORCH_FULL_DISK), 1 << 40, TORCH_FULL_DISK),
             (OSError(errno.ENOSPC, "write failed"), 1 << 40, "No space left on device"),
             (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), 1 << 40, os.strerror(errno.EDQUOT))]
    wrapped = RuntimeError("file write failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "short write")
    cases.append((wrapped, 1 << 40, "No space left on device"))
    for err, free, reason in cases:
        monkeypatch.setattr(torch, "save", raising(err))
        fake_free_space(monkeypatch, tmp_path, free)
        with pytest.raises(UserError) as info:
            state_dicts.save_state_dict(sd, tmp_path / "m.pt")
        assert str(info.value).startswith(f"could not write {tmp_path / 'm.pt'}: {reason} (free space in "), \
            (str(info.value), reason)
        assert os.listdir(tmp_path) == []


def test_a_kill_between_the_renames_is_told_apart(capsys, monkeypatch, zoo, out, fmnist_root):
    """Killed after the new recipe is renamed into place, before the soup: the recipe (it records the
    soup file's sha256) does not describe the old soup beside it, so a rerun without --overwrite does not
    take that soup for a leftover of its own; the command itself (with --overwrite) completes the pair."""
    soup = out / "soup.pt"
    SCRIPTS["uniform"].main(argv(zoo, fmnist_root, out))
    old_soup = soup.read_bytes()
    assert soup_io.recipe_describes(soup_io.recipe_beside(soup), soup)
    command = argv(zoo, fmnist_root, out, "--overwrite", "--params_end", "2")
    real_replace = os.replace

    def replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        if str(dst).endswith(".recipe.json"):
            raise Killed(dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        SCRIPTS["uniform"].main(command)
    monkeypatch.undo()
    recipe = soup_io.recipe_beside(soup)
    assert soup.read_bytes() == old_soup and recipe["args"]["params_end"] == 2
    assert not soup_io.recipe_describes(recipe, soup)
    line = refused(capsys, "uniform", [a for a in command if a != "--overwrite"])
    assert line == (f"error: --save-soup {soup} exists: refusing to overwrite it (pass --overwrite or another "
                    "path) (its recipe records this command but not this soup file's sha256: a run may have "
                    "been interrupted while replacing it)")
    assert soup.read_bytes() == old_soup
    SCRIPTS["uniform"].main(command)
    assert soup_io.recipe_describes(soup_io.recipe_beside(soup), soup) and soup.read_bytes() != old_soup


@pytest.mark.slow
def test_a_real_failing_write_keeps_the_old_pair(tmp_path, zoo, out, fmnist_root):
    """A file size limit (RLIMIT_FSIZE, as a quota or a full disk would stop it) makes the soup's real
    write fail half-way in a process of its own: one line, exit 2, the old pair and no temporary."""
    import resource
    soup = out / "soup.pt"
    SCRIPTS["uniform"].main(argv(zoo, fmnist_root, out))
    old = pair_of(soup)
    limit = (len(old[0]) + len(old[1])) // 2  # above the recipe's size, below the soup's
    assert len(old[1]) < limit < len(old[0])

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    done = subprocess.run([sys.executable, str(ROOT / "uniform_soup.py"),
                           *argv(zoo, fmnist_root, out, "--overwrite", "--params_end", "2")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, preexec_fn=limited,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: could not write {soup}: "), done.stderr[-3000:]
    assert pair_of(soup) == old
    assert temporaries(out) == []


# --------------------------------------------------- 8. every output can be written, checked before work
def test_a_soup_name_whose_sidecar_temporaries_pass_name_max_is_refused_before_work(capsys, zoo, out,
                                                                                   fmnist_root):
    """Learned-Soup writes <stem>.coefficients.json through `.<stem>.coefficients.json.<random>.tmp`: a
    stem of 230 characters is a soup name of 233 bytes, its temporaries pass 255 (issue 31.4). The run is
    refused before it learns, and so is every name whose longest temporary would not fit."""
    from utils.files.paths import longest_name
    for stem_length in (230, 246):
        name = "s" * stem_length
        args = argv(zoo, fmnist_root, out, first=QUICK["learned"], name=name)
        line = refused_untouched(capsys, "learned", args, out, zoo)
        assert line.startswith(("error: --save-soup ", "error: the soup's ")), line
        assert f"{out / name}" in line and f": its name is too long for {out} (its temporary file name takes " \
            in line and "more than the 255 the folder allows): choose a shorter name" in line, line
    name_max = os.pathconf(out, "PC_NAME_MAX")
    longest = max(n for n in range(1, name_max) if longest_name("s" * n + ".coefficients.json") <= name_max)
    learned = SCRIPTS["learned"].main(argv(zoo, fmnist_root, out, first=QUICK["learned"], name="s" * longest))
    assert learned["soup_file"].endswith("s" * longest + ".pt")  # the longest name that fits is written


def test_a_sidecar_that_exists_as_a_folder_is_refused_before_work(capsys, zoo, out, fmnist_root):
    for script, kind in (("uniform", "recipe"), ("learned", "coefficients"), ("mehl", "coefficients")):
        folder = soup_io.sidecar(out / "soup.pt", kind)
        folder.mkdir()
        line = refused_untouched(capsys, script, argv(zoo, fmnist_root, out, first=QUICK[script]), out, zoo)
        assert line == f"error: the soup's {kind} file {folder} is a folder: give a file name", line
        folder.rmdir()


def test_a_results_file_that_cannot_be_appended_to_is_refused_before_learning(capsys, monkeypatch, zoo, out,
                                                                              fmnist_root):
    """As root every file can be opened: the refusal of the kernel (EACCES, EROFS) is what `open` raises
    for the results file when it is opened for appending."""
    import builtins
    db = out / "results.jsonl"
    db.write_text('{"method": "individual", "index": 7}\n')
    real_open = builtins.open

    def read_only(file, mode="r", *a, **k):
        if os.fspath(file) == str(db) and ("a" in mode or "w" in mode):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *a, **k)

    before = snapshot(out, zoo)
    with monkeypatch.context() as patched:
        patched.setattr(builtins, "open", read_only)
        line = refused(capsys, "learned", argv(zoo, fmnist_root, out, first=QUICK["learned"]))
    assert snapshot(out, zoo) == before
    assert line == f"error: --results-db {db}: cannot be appended to (Permission denied)", line


@pytest.mark.parametrize("first", [b"PK\x03\x04 a zip", b"\n\n[1, 2]\n{}\n", b"not json\n"],
                         ids=["a soup", "a list after blank lines", "text"])
def test_a_file_whose_first_line_is_not_a_json_object_is_never_appended_to(capsys, zoo, out, fmnist_root, first):
    """--results-db naming another run's soup: refused, not appended to (issue 31.5); a results line
    written after it would spoil it."""
    db = out / "other.pt"
    db.write_bytes(first + b"\x00" * 1000)
    for script in ("uniform", "learned"):
        line = refused_untouched(capsys, script, argv(zoo, fmnist_root, out, "--results-db", db,
                                                      first=QUICK[script]), out, zoo)
        assert line == (f"error: --results-db {db} is not a results file (its first line is not a JSON object): "
                        "refusing to append to it; give a new or a results file"), line


def test_an_unreadable_results_file_is_one_line(capsys, monkeypatch, zoo, out, fmnist_root):
    import builtins
    db = out / "results.jsonl"
    db.write_text('{"method": "individual", "index": 7}\n')
    real_open = builtins.open

    def unreadable(file, mode="r", *a, **k):
        if os.fspath(file) == str(db):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *a, **k)

    before = snapshot(out, zoo)
    with monkeypatch.context() as patched:
        patched.setattr(builtins, "open", unreadable)
        line = refused(capsys, "greedy", argv(zoo, fmnist_root, out))
    assert snapshot(out, zoo) == before
    assert str(db) in line and line.endswith("cannot be read (Permission denied)"), line
