"""Issue 31, class 6 (and 31.7's JSON depth): memory is bounded before a small hostile file is read,
whoever reads it. Every torch file goes through one check (utils/files/state_dicts.check_unpacked_size):
the sizes its zip records and its pickle declare must fit in the file itself (torch stores records
uncompressed), so a deflated record of GBs in a file of a few MB is refused unread, also where no
architecture gives a bound (a --resume state, a soup read by report.py or a recipe's rebuild). A range
of ingredients is checked against the files present before anything is built from it; a recipe is read
with its size and nesting bounded. Each ends in one line."""
import io
import json
import tracemalloc
import zipfile

import pytest
import torch

from tests.helpers import QUICK, argv, refused
from utils.files import ingredients, soup_io
from utils.files.state_dicts import load_state_dict
from utils.runtime.errors import UserError

RECORD = 64 * 2**20  # the inflated size of the hostile record (small enough for a test to write)


def deflated(path, obj):
    """`obj` saved by torch, then every record deflated: a file of a few hundred KB that declares
    RECORD bytes and more."""
    plain = io.BytesIO()
    torch.save(obj, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename), compress_type=zipfile.ZIP_DEFLATED,
                         compresslevel=1)
    assert path.stat().st_size < RECORD // 32
    return path


@pytest.fixture
def never_loaded(monkeypatch):
    """torch.load fails the test: the refusal must come before it."""
    def boom(*args, **kwargs):
        raise AssertionError("torch.load was called on a file that declares more than it holds")
    monkeypatch.setattr(torch, "load", boom)


def test_a_resume_state_holding_a_deflated_record_is_refused_unread(zoo, fmnist_root, out, capsys, monkeypatch):
    state = deflated(out / "soup.state.pt", {"version": 1, "soup": torch.zeros(RECORD // 4)})
    real = torch.load
    loaded = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loaded.append(a) or real(*a, **k))
    line = refused(capsys, "mehl", argv(zoo, fmnist_root, out, "--resume", first=QUICK["mehl"]))
    assert line.startswith(f"error: --resume {state}: its zip entries unpack to 64.0 MiB, more than the file")
    assert "refused unread" in line and "compressed" in line
    assert not any(str(a[0]) == str(state) for a in loaded)


def test_a_soup_or_ingredient_read_without_an_architecture_is_bounded_by_its_file(tmp_path, never_loaded):
    """report.py reads the soups named in results lines, `rebuild` a recipe's ingredients: no
    architecture bound there, the file's own size is the bound."""
    soup = deflated(tmp_path / "soup.pt", {"w": torch.zeros(RECORD // 4)})
    with pytest.raises(UserError, match=r"its zip entries unpack to 64\.0 MiB, more than the file \(0\.\d MiB\)"):
        load_state_dict(soup)
    recipe = tmp_path / "soup.recipe.json"
    recipe.write_text(json.dumps({"ingredients": [{"path": str(soup), "sha256": "x"}], "coefficients": None}))
    with pytest.raises(UserError, match="more than the file"):
        soup_io.rebuild(recipe, check_hashes=False)


def test_a_legacy_pickle_declaring_more_than_its_file_is_refused_unread(tmp_path, never_loaded):
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(RECORD // 4)}, path, _use_new_zipfile_serialization=False)
    with open(path, "r+b") as f:
        f.truncate(200_000)
    with pytest.raises(UserError, match=r"its pickle declares storages of 64\.0 MiB, more than the file"):
        load_state_dict(path)


def test_a_huge_range_is_checked_against_the_files_present(zoo):
    tracemalloc.start()
    try:
        for end in (10**7, 3_000_000_000):
            with pytest.raises(UserError, match=rf"^{end - 3} ingredient\(s\) missing .* model_3\.pt, model_4\.pt"):
                ingredients.ingredient_paths(zoo, 0, end)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # a list of the missing indices of the first range alone: about 400 MB
    assert ingredients.ingredient_paths(zoo, 1, 3) == [zoo / "model_1.pt", zoo / "model_2.pt"]


def test_a_deeply_nested_recipe_beside_the_soup_is_one_line(zoo, fmnist_root, out, capsys):
    (out / "soup.pt").write_bytes(b"")
    (out / "soup.recipe.json").write_text("[" * 100_000 + "]" * 100_000)
    line = refused(capsys, "uniform", argv(zoo, fmnist_root, out))
    assert "soup.pt exists" in line
    with pytest.raises(UserError, match="nested more than 64 levels deep"):
        soup_io.read_recipe(out / "soup.recipe.json")
    with pytest.raises(UserError, match="nested more than 64 levels deep"):
        soup_io.rebuild(out / "soup.recipe.json")


def test_a_recipe_larger_than_any_recipe_is_not_read_whole(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"ingredients": [{"path": "x" * 2000}]}))
    with pytest.raises(ValueError, match="larger than"):
        soup_io.read_json(path, limit=1000)
    assert soup_io.read_json(path, limit=10_000)["ingredients"][0]["path"] == "x" * 2000


def test_report_reads_a_soup_named_in_a_results_line_bounded_by_its_file(tmp_path, monkeypatch, caplog):
    """report.py on a results file whose MEHL-Soup+ soup was replaced by a small file declaring a large
    deflated record: a warning naming it, the rest of the report written, the record never inflated."""
    import report
    from tests.test_report_memory import soups_over, standins
    zoo = tmp_path / "zoo"
    db = soups_over(tmp_path / "soups", zoo, 2, standins(zoo, 2))
    soup = tmp_path / "soups" / "MEHL-Soup+.pt"
    deflated(soup, {"enc.weight": torch.zeros(RECORD // 4)})
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (_ for _ in ()).throw(AssertionError(f))
                        if str(f) == str(soup) else real(f, *a, **k))
    report.main(["--results-db", str(db), "--out", str(tmp_path / "report")])
    assert (tmp_path / "report" / "report.md").is_file()
    assert f"{soup}: its zip entries unpack to" in caplog.text and "more than the file" in caplog.text
