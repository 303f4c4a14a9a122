"""Issue 31, classes 1 and 3 beyond the decoded-image cache (tests/test_decoded.py has its own): every
record that stands for a file (utils/files/identity.py `stamp`) changes when the file's bytes do, even
when its size and modification time are set back, and a file name that is not UTF-8 goes through the
results lines and the recipe in a form that gives back its bytes."""
import json
import os
import shutil

import torch

from tests.helpers import SCRIPTS, argv
from utils.files import identity, results, soup_io


def swap_in_place(a, b):
    """Write a's bytes into b and b's into a, without a new inode, and set both times back."""
    data = {p: p.read_bytes() for p in (a, b)}
    assert len(data[a]) == len(data[b])
    times = {p: os.stat(p) for p in (a, b)}
    for p, q in ((a, b), (b, a)):
        with open(p, "r+b") as f:
            f.write(data[q])
        os.utime(p, ns=(times[p].st_atime_ns, times[p].st_mtime_ns))
    return times


def test_the_stamp_changes_with_the_bytes_whatever_the_times_say(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"y" * 100)
    before = identity.stamp(a), identity.stamp(b)
    times = swap_in_place(a, b)
    assert os.stat(a).st_mtime_ns == times[a].st_mtime_ns and os.stat(a).st_size == times[a].st_size
    assert (identity.stamp(a), identity.stamp(b)) != before and identity.stamp(a) != before[0]
    c = tmp_path / "c"  # another file put in a's place, its times copied
    c.write_bytes(b"y" * 100)
    shutil.copystat(a, c)
    stamp = identity.stamp(a)
    os.replace(c, a)
    assert identity.stamp(a) != stamp


def test_individual_accuracies_and_the_finished_line_follow_the_bytes(zoo, fmnist_root, tmp_path):
    """Greedy soup, then two ingredients swapped in place with their times set back: the rerun of the
    same command is not taken as done, and each ingredient's accuracies are those of its new bytes."""
    out = tmp_path / "out"
    out.mkdir()
    args = argv(zoo, fmnist_root, out)
    first = SCRIPTS["greedy"].main(args)
    assert SCRIPTS["greedy"].main(args) == first  # the finished line: nothing done again
    count = len(results.read(out / "results.jsonl"))
    swap_in_place(zoo / "model_0.pt", zoo / "model_1.pt")
    (out / "soup.pt").unlink()  # the rerun may write it again (its recipe describes the old bytes)
    again = SCRIPTS["greedy"].main(args)
    lines = results.read(out / "results.jsonl")
    assert again is not first and again["time"] >= first["time"] and len(lines) == count + 3
    assert sorted(r["index"] for r in lines[count:] if r["method"] == "individual") == [0, 1]


def test_a_file_name_that_is_not_utf8_goes_through_the_results_and_the_recipe(zoo, fmnist_root, tmp_path):
    """Ingredients and outputs in folders named with a byte that is not UTF-8: the results line and the
    recipe hold the names escaped (plain ASCII JSON, read back as the same bytes), and the soup is
    rebuilt from its recipe."""
    own = tmp_path / os.fsdecode(b"zoo_\xe9")
    shutil.copytree(zoo, own)
    out = tmp_path / os.fsdecode(b"out_\xe9")
    out.mkdir()
    record = SCRIPTS["uniform"].main(argv(own, fmnist_root, out))
    raw = (out / "results.jsonl").read_bytes() + (out / "soup.recipe.json").read_bytes()
    raw.decode("ascii")  # escaped, so every reader of the files takes them as UTF-8
    line = results.read(out / "results.jsonl")[-1]
    assert os.fsencode(line["soup_file"]) == os.fsencode(out / "soup.pt") == os.fsencode(record["soup_file"])
    assert os.fsencode(line["model_location"]) == os.fsencode(own)
    recipe = json.loads((out / "soup.recipe.json").read_text())
    assert [os.fsencode(i["path"]) for i in recipe["ingredients"]] == \
        [os.fsencode(own / f"model_{i}.pt") for i in range(3)]
    soup = torch.load(line["soup_file"], weights_only=True)
    rebuilt = soup_io.rebuild(out / "soup.recipe.json")
    assert all(torch.equal(rebuilt[k], v) for k, v in soup.items())
    assert SCRIPTS["uniform"].main(argv(own, fmnist_root, out)) == record  # the rerun finds its line
