"""report.py's inputs (issue 21, class 8): a results file holding several zoos is reported one section
per zoo; a recipe, coefficients sidecar or results line that cannot be used is a warning naming it, and
the rows that need it are left out; a bad --out is one `error:` line, exit 2, before any work."""
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import report
from tests.conftest import ROOT
from tests.helpers import copy_for_a_user
from tests.models import TINY_CNN
from utils.runtime.errors import run_main


def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def zoo_lines(folder, dataset="FashionMNIST", arch=TINY_CNN, best=80.0):
    """The lines a zoo's runs append: each ingredient's (naming its file), then uniform and greedy soups
    (naming --model-location), as utils/run/individual.py and utils/files/results.py write them."""
    folder = str(Path(folder).resolve())
    rows = [{"method": "individual", "index": i, "path": f"{folder}/model_{i}.pt", "dataset": dataset,
             "arch": arch, "heldout": best - i, "test": best - i, "shifts": {}, "shift_mean": None}
            for i in range(3)]
    for method, acc in (("uniform", best - 2.5), ("greedy", best + 0.5)):
        rows.append({"method": method, "dataset": dataset, "arch": arch, "ingredients": [0, 1, 2],
                     "model_location": folder, "heldout": acc, "test": acc, "shifts": {}, "shift_mean": None,
                     "seconds": 3.0, "peak_memory_bytes": 10**9, "soup_file": None,
                     "range_fingerprints": ["a", "b", "c"], "args": {"exclude_top": 0}})
    return rows


def refused(capsys, argv):
    """report.py run as a user runs it: the one `error:` line (exit 2, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(report.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------ several zoos
@pytest.mark.parametrize("differ", ["model_location", "dataset", "arch"])
def test_two_zoos_in_one_results_file_are_reported_one_section_each(tmp_path, caplog, differ):
    first = zoo_lines(tmp_path / "zoo_a", best=80.0)
    other = {"model_location": {}, "dataset": {"dataset": "CIFAR10"}, "arch": {"arch": "tiny-mlp"}}[differ]
    second = zoo_lines(tmp_path / ("zoo_b" if differ == "model_location" else "zoo_a"), best=60.0, **other)
    db = write_lines(tmp_path / "r.jsonl", first + second)
    out = tmp_path / "rep"
    with caplog.at_level(logging.WARNING):
        printed = report.main(["--results-db", str(db), "--out", str(out)])
    assert "2 zoos" in caplog.text
    text = (out / "report.md").read_text()
    sections = text.split("\n## Zoo ")[1:]
    assert len(sections) == 2, text
    # each zoo's own best ingredient and soups: 80 / 77.5 / 80.5 and 60 / 57.5 / 60.5, never mixed
    for section, best in zip(sections, (80.0, 60.0)):
        assert f"| best individual (#0) | {best:.2f} |" in section
        assert f"| uniform soup | {best - 2.5:.2f} |" in section
        assert f"| greedy soup | {best + 0.5:.2f} |" in section
        assert "3 ingredients, held-out" in section
    assert "CIFAR10" in sections[1] if differ == "dataset" else "tiny-mlp" in sections[1] if differ == "arch" \
        else "zoo_b" in sections[1]
    assert printed.count("| best individual (#0) |") == 2
    for k in (1, 2):
        assert (out / f"zoo{k}-ingredients.png").read_bytes()[:4] == b"\x89PNG"


def test_model_location_picks_one_zoo(tmp_path):
    db = write_lines(tmp_path / "r.jsonl", zoo_lines(tmp_path / "zoo_a", best=80.0)
                     + zoo_lines(tmp_path / "zoo_b", best=60.0))
    out = tmp_path / "rep"
    table = report.main(["--results-db", str(db), "--out", str(out), "--model-location", str(tmp_path / "zoo_b")])
    text = (out / "report.md").read_text()
    assert "## Zoo" not in text and "| best individual (#0) | 60.00 |" in table and "80.00" not in table


def test_model_location_of_no_zoo_is_one_line(tmp_path, capsys):
    db = write_lines(tmp_path / "r.jsonl", zoo_lines(tmp_path / "zoo_a"))
    line = refused(capsys, ["--results-db", str(db), "--out", str(tmp_path / "rep"),
                            "--model-location", str(tmp_path / "elsewhere")])
    assert "elsewhere" in line and "zoo_a" in line


def test_a_zoo_folder_of_links_is_one_zoo(tmp_path):
    """The ingredients' lines name the resolved file (the target of a link), the soups' lines the folder
    of links: still one zoo."""
    real, links = tmp_path / "downloads", tmp_path / "zoo"
    real.mkdir()
    links.mkdir()
    for i in range(3):
        (real / f"model_{i}.pt").write_bytes(b"x")
        (links / f"model_{i}.pt").symlink_to(real / f"model_{i}.pt")
    rows = zoo_lines(links)
    for r in rows[:3]:
        r["path"] = str((real / Path(r["path"]).name).resolve())
    db = write_lines(tmp_path / "r.jsonl", rows)
    table = report.main(["--results-db", str(db), "--out", str(tmp_path / "rep")])
    assert "## Zoo" not in (tmp_path / "rep" / "report.md").read_text()
    assert "| best individual (#0) | 80.00 |" in table


def test_lines_that_record_no_folder_join_the_one_zoo_of_their_dataset(tmp_path):
    """Older soup lines without model_location, beside ingredients' lines that name their files, and
    hand-written lines that name neither: one zoo, not three."""
    rows = zoo_lines(tmp_path / "zoo")
    for r in rows[3:]:
        del r["model_location"]
    rows.append({"method": "MEHL-Soup+", "dataset": "FashionMNIST", "arch": TINY_CNN, "ingredients": [0, 1, 2],
                 "heldout": 83.0, "test": 83.0, "shifts": {}, "args": {"exclude_top": 0}})
    table = report.main(["--results-db", str(write_lines(tmp_path / "r.jsonl", rows)), "--out", str(tmp_path / "rep")])
    assert "## Zoo" not in (tmp_path / "rep" / "report.md").read_text()
    for row in ("| best individual (#0) | 80.00 |", "| uniform soup | 77.50 |", "| MEHL-Soup+ | 83.00 |"):
        assert row in table


# ----------------------------------------------------------------------------- recipes and sidecars
def learned_pair(tmp_path):
    """Three ingredients and two learned soups over them (MEHL-Soup+ and Learned-Soup+), each with its
    recipe, and their results lines."""
    g = torch.Generator().manual_seed(0)
    sds = [{"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g)} for _ in range(3)]
    for i, sd in enumerate(sds):
        torch.save(sd, tmp_path / f"model_{i}.pt")
    rows = []
    for stem, method in (("good", "Learned-Soup+"), ("bad", "MEHL-Soup+")):
        torch.save({k: sum(sd[k] for sd in sds) / 2 for k in sds[0]}, tmp_path / f"{stem}.pt")
        recipe = {"method": method, "soup": f"{stem}.pt", "args": {},
                  "ingredients": [{"path": str(tmp_path / f"model_{i}.pt"), "sha256": "x"} for i in range(3)],
                  "coefficients": {"names": ["w", "b"], "blocks": [["w"], ["b"]],
                                   "alpha": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]}}
        (tmp_path / f"{stem}.recipe.json").write_text(json.dumps(recipe))
        rows.append({"method": method, "dataset": "FashionMNIST", "arch": TINY_CNN, "ingredients": [0, 1, 2],
                     "heldout": 80.0, "test": 80.0, "shifts": {}, "soup_file": str(tmp_path / f"{stem}.pt"),
                     "args": {"exclude_top": 0}, "alpha": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]})
    return write_lines(tmp_path / "r.jsonl", rows)


BAD_RECIPES = {
    "bad JSON": "{not json",
    "ingredients a number": '{"ingredients": 5}',
    "a list": "[1, 2]",
    "no ingredients": '{"coefficients": null}',
    "an ingredient without a path": '{"ingredients": [{"sha256": "x"}]}',
    "coefficients without blocks": None,  # built below from the good recipe
    "alpha of the wrong shape": None,
    "a block naming no tensor of the soup": None,
    "an ingredient that is no checkpoint": None,
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_a_bad_recipe_is_a_warning_and_its_soup_row_left_out(tmp_path, caplog, case):
    db = learned_pair(tmp_path)
    recipe_file = tmp_path / "bad.recipe.json"
    recipe = json.loads(recipe_file.read_text())
    text = BAD_RECIPES[case]
    if case == "coefficients without blocks":
        del recipe["coefficients"]["blocks"]
    elif case == "alpha of the wrong shape":
        recipe["coefficients"]["alpha"] = [[0.5, 0.5], [0.5]]
    elif case == "a block naming no tensor of the soup":
        recipe["coefficients"]["blocks"] = [["w"], ["nope"]]
    elif case == "an ingredient that is no checkpoint":
        (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
        recipe["ingredients"][2]["path"] = str(tmp_path / "junk.pt")
    recipe_file.write_text(text if text is not None else json.dumps(recipe))
    with caplog.at_level(logging.WARNING):
        report.main(["--results-db", str(db), "--out", str(tmp_path / "rep")])
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| Learned-Soup+ | 2 |" in text  # the other soup's row is kept
    assert "| MEHL-Soup+" not in text.split("How far each soup went")[1].split("Removing")[0]
    named = str(tmp_path / ("junk.pt" if case == "an ingredient that is no checkpoint" else "bad.recipe.json"))
    assert named in caplog.text and "left out" in caplog.text


BAD_SIDECARS = {"alpha": ["{not json", "[1, 2]", '{"alpha": "x"}', '{"alpha": [[1, "a"]]}',
                          '{"alpha": [[1, 2], [3]]}'],
                "coefficients": ['{"blocks": 5}', '{"ingredients": [0], "blocks": [{"alpha": {}}]}',
                                 '{"ingredients": 3, "blocks": [{"alpha": {"0": 1}}]}', "null"]}


@pytest.mark.parametrize("kind,text", [(k, t) for k, ts in BAD_SIDECARS.items() for t in ts])
def test_a_bad_coefficients_sidecar_is_a_warning_and_its_figure_left_out(tmp_path, caplog, kind, text):
    soup = tmp_path / "mehl.pt"
    (tmp_path / f"mehl.{kind}.json").write_text(text)
    rows = [{"method": "individual", "index": 0, "heldout": 80.0, "test": 80.0, "shifts": {}},
            {"method": "MEHL-Soup+", "ingredients": [0, 1], "heldout": 81.0, "test": 81.0, "shifts": {},
             "soup_file": str(soup), "args": {"exclude_top": 0}}]
    db = write_lines(tmp_path / "r.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        report.main(["--results-db", str(db), "--out", str(tmp_path / "rep")])
    assert str(tmp_path / f"mehl.{kind}.json") in caplog.text and "left out" in caplog.text
    assert not (tmp_path / "rep" / "coefficients.png").exists()
    assert "| MEHL-Soup+ | 81.00 |" in (tmp_path / "rep" / "report.md").read_text()


def test_an_alpha_in_a_results_line_that_is_no_matrix_is_a_warning(tmp_path, caplog):
    rows = [{"method": "MEHL-Soup+", "ingredients": [0, 1], "heldout": 81.0, "test": 81.0, "shifts": {},
             "alpha": "0.5 0.5", "args": {"exclude_top": 0}}]
    with caplog.at_level(logging.WARNING):
        report.main(["--results-db", str(write_lines(tmp_path / "r.jsonl", rows)), "--out", str(tmp_path / "rep")])
    assert "not a matrix of numbers" in caplog.text and not (tmp_path / "rep" / "coefficients.png").exists()


def test_coefficients_of_another_width_than_the_lines_ingredients_are_drawn(tmp_path):
    """A sidecar of three ingredients beside a line that names two (a sidecar left by another run): the
    figure is drawn, its columns numbered, not a traceback."""
    (tmp_path / "mehl.alpha.json").write_text(json.dumps({"alpha": [[0.2, 0.3, 0.5], [1.0, -0.5, 0.5]]}))
    rows = [{"method": "MEHL-Soup+", "ingredients": [0, 1], "heldout": 81.0, "test": 81.0, "shifts": {},
             "soup_file": str(tmp_path / "mehl.pt"), "args": {"exclude_top": 0}}]
    report.main(["--results-db", str(write_lines(tmp_path / "r.jsonl", rows)), "--out", str(tmp_path / "rep")])
    assert (tmp_path / "rep" / "coefficients.png").read_bytes()[:4] == b"\x89PNG"


ALPHA = [[0.2, 0.3, 0.5], [1.0, -0.5, 0.5]]
COEFFICIENTS_FILES = {  # the file written now, and the two that earlier versions wrote
    "coefficients.json": {"ingredients": [{"path": f"/zoo/model_{i}.pt", "sha256": "0" * 64} for i in range(3)],
                          "blocks": [["a"], ["b"]], "alpha": ALPHA, "summary": {}, "soup_sha256": "1" * 64},
    "alpha.json": {"ingredients": [f"/zoo/model_{i}.pt" for i in range(3)], "blocks": [["a"], ["b"]],
                   "alpha": ALPHA, "summary": {}},
    "coefficients.json (Learned-Soup, earlier)": {
        "ingredients": [0, 1, 2], "temperature": 1.0,
        "blocks": [{"tensors": [name], "alpha": {str(i): v for i, v in enumerate(row)}}
                   for name, row in zip("ab", ALPHA)]}}


@pytest.mark.parametrize("name", list(COEFFICIENTS_FILES))
def test_the_report_reads_the_coefficients_file_and_those_of_earlier_versions(tmp_path, name):
    (tmp_path / f"mehl.{name.split()[0]}").write_text(json.dumps(COEFFICIENTS_FILES[name]))
    rows = [{"method": "MEHL-Soup+", "ingredients": [0, 1, 2], "heldout": 81.0, "test": 81.0, "shifts": {},
             "soup_file": str(tmp_path / "mehl.pt"), "args": {"exclude_top": 0}}]
    assert report.coefficients_of(rows[0]) == ALPHA
    report.main(["--results-db", str(write_lines(tmp_path / "r.jsonl", rows)), "--out", str(tmp_path / "rep")])
    assert (tmp_path / "rep" / "coefficients.png").read_bytes()[:4] == b"\x89PNG"


def test_the_coefficients_file_is_read_before_an_earlier_versions_alpha_file(tmp_path):
    (tmp_path / "mehl.alpha.json").write_text(json.dumps({"alpha": [[9.0, -8.0]]}))
    (tmp_path / "mehl.coefficients.json").write_text(json.dumps(COEFFICIENTS_FILES["coefficients.json"]))
    assert report.coefficients_of({"soup_file": str(tmp_path / "mehl.pt")}) == ALPHA


@pytest.mark.parametrize("bad", [{"heldout": "85"}, {"shifts": [1, 2]}, {"args": {"randomseed": [1]}},
                                 {"method": 5}, {"ingredients": 3}, {"args": {"exclude_top": "2"}}])
def test_a_results_line_with_fields_of_the_wrong_type_is_left_out_with_a_warning(tmp_path, caplog, bad):
    rows = zoo_lines(tmp_path / "zoo")
    rows.append({**rows[-1], "heldout": 99.0, "test": 99.0, **bad})  # a later greedy line: else the one shown
    db = write_lines(tmp_path / "r.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        table = report.main(["--results-db", str(db), "--out", str(tmp_path / "rep")])
    assert f"{db}: 1 results line(s) left out" in caplog.text
    assert "| greedy soup | 80.50 |" in table


# ------------------------------------------------------------------------------------------- --out
def no_work(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the results were read before --out was checked")
    monkeypatch.setattr(report, "load", boom)


def test_out_naming_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    db = write_lines(tmp_path / "r.jsonl", zoo_lines(tmp_path / "zoo"))
    (tmp_path / "taken").write_text("keep me")
    no_work(monkeypatch)
    line = refused(capsys, ["--results-db", str(db), "--out", str(tmp_path / "taken")])
    assert "is a file" in line and str(tmp_path / "taken") in line
    assert (tmp_path / "taken").read_text() == "keep me"
    # the results file itself as --out
    before = db.read_bytes()
    assert "is a file" in refused(capsys, ["--results-db", str(db), "--out", str(db)])
    assert db.read_bytes() == before


def test_out_under_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    db = write_lines(tmp_path / "r.jsonl", zoo_lines(tmp_path / "zoo"))
    (tmp_path / "taken").write_text("keep me")
    no_work(monkeypatch)
    line = refused(capsys, ["--results-db", str(db), "--out", str(tmp_path / "taken" / "deeper" / "rep")])
    assert f"is under {tmp_path / 'taken'}, which is a file" in line
    assert (tmp_path / "taken").read_text() == "keep me"


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's sysfs")
def test_out_a_folder_one_may_not_write_is_one_line(tmp_path, capsys, monkeypatch):
    """/sys/kernel exists and not even root may write into it; a folder made read-only (chmod 555) is
    the user's case, and stops every user but root."""
    db = write_lines(tmp_path / "r.jsonl", zoo_lines(tmp_path / "zoo"))
    no_work(monkeypatch)
    line = refused(capsys, ["--results-db", str(db), "--out", "/sys/kernel"])
    assert "cannot write into the folder" in line and "/sys/kernel" in line
    assert "/sys/kernel/report" in refused(capsys, ["--results-db", str(db), "--out", "/sys/kernel/report"])
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        line = refused(capsys, ["--results-db", str(db), "--out", str(tmp_path / "ro")])
        assert "cannot write into the folder" in line and not list((tmp_path / "ro").iterdir())


def test_out_whose_report_would_replace_the_results_file_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "rep"
    out.mkdir()
    db = write_lines(out / "report.md", zoo_lines(tmp_path / "zoo"))
    before = db.read_bytes()
    no_work(monkeypatch)
    assert "would replace the results file" in refused(capsys, ["--results-db", str(db), "--out", str(out)])
    assert db.read_bytes() == before


def test_out_with_a_folder_in_the_place_of_an_output_is_one_line(tmp_path, capsys, monkeypatch):
    db = write_lines(tmp_path / "r.jsonl", zoo_lines(tmp_path / "zoo"))
    (tmp_path / "rep" / "report.md").mkdir(parents=True)
    no_work(monkeypatch)
    assert "in the way" in refused(capsys, ["--results-db", str(db), "--out", str(tmp_path / "rep")])


def test_an_output_name_that_is_a_symbolic_link_loop_is_one_line(tmp_path, capsys, monkeypatch):
    """`--out/report.md` linked to itself raised RuntimeError from Path.resolve (issue 31.7); the outputs
    go through the shared path check (utils.files.paths.check_writable)."""
    db = write_lines(tmp_path / "r.jsonl", zoo_lines(tmp_path / "zoo"))
    out = tmp_path / "rep"
    out.mkdir()
    for name in ("report.md", "scatter.png"):
        (out / name).symlink_to(out / name)
        no_work(monkeypatch)
        line = refused(capsys, ["--results-db", str(db), "--out", str(out)])
        assert line == f"error: --out {out / name}: not a usable path (Too many levels of symbolic links)", line
        (out / name).unlink()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"), reason="root, and no setpriv to drop to a user")
def test_a_read_only_out_folder_and_an_unreadable_results_file_are_one_line_for_a_user():
    """As an ordinary user sees them (root reads and writes anywhere: as root, report.py runs as the
    user nobody through setpriv): an --out folder made read-only (chmod 555), a results file made
    unreadable (chmod 000). What it runs is a copy in a folder every user may read; the Python must be
    one that user may run (else the test is skipped, saying so)."""
    shared = Path(tempfile.mkdtemp(prefix="report-user-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        code = copy_for_a_user(shared, packages=("utils",), scripts=("report.py",))
        db = write_lines(shared / "r.jsonl", zoo_lines(shared / "zoo"))
        db.chmod(0o644)
        (shared / "ro").mkdir()
        (shared / "ro").chmod(0o555)
        (shared / "mpl").mkdir()
        (shared / "mpl").chmod(0o777)
        (shared / "secret.jsonl").write_text(db.read_text())
        (shared / "secret.jsonl").chmod(0o000)
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(shared / "mpl")}
        # the environment by its own place (a checkout's .venv may be a link to one outside a private folder)
        python = os.path.join(os.path.realpath(sys.prefix), "bin", os.path.basename(sys.executable))
        can = subprocess.run([*as_user, python, "-c", "import torch, matplotlib, tqdm"], capture_output=True,
                             text=True, timeout=120, cwd=shared, env=env)
        if can.returncode != 0:
            pytest.skip(f"the user nobody cannot run {python} with torch and matplotlib (it sits in a folder "
                        f"that user may not read?): {(can.stderr.strip().splitlines() or ['?'])[-1]}")
        for results_db, out, said in ((db, shared / "ro", "cannot write into the folder"),
                                      (shared / "secret.jsonl", shared / "rep", "cannot be read")):
            done = subprocess.run([*as_user, python, str(code / "report.py"), "--results-db", str(results_db),
                                   "--out", str(out)], capture_output=True, text=True, timeout=120, cwd=shared,
                                  env=env)
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
            last = done.stderr.strip().splitlines()[-1]
            assert last.startswith("error: ") and said in last, done.stderr[-3000:]
        assert list((shared / "ro").iterdir()) == [] and not (shared / "rep").exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
