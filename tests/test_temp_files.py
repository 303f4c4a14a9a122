"""Issue 31, classes 2 and 9 (second bullet): every write goes through a temporary file no one can
predict (`.<name>.tmp` in a folder `.<name>.<random>.tmp` that mkdtemp makes, O_EXCL | O_NOFOLLOW),
renamed into place, so a link planted at a name a run would use never sends its bytes elsewhere; cleanup
removes only temporary files a write of this toolkit left (never an input named like one, never a live
write's); outputs take the umask's mode."""
import os
import socket
import stat

import pytest
import torch

from tests.test_decoded import batches, bundle, tree, uncached  # noqa: F401 - tree: the module's fixture
from utils.files.state_dicts import atomic_write, remove_leftovers, save_state_dict, temporary
from utils.run import decoded


@pytest.fixture
def umask():
    """Sets the process's umask for a test (`umask(mask)`), and puts the old one back after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_take_the_umasks_mode(tmp_path, umask, mask):
    umask(mask)
    soup, text = tmp_path / "soup.pt", tmp_path / "soup.recipe.json"
    save_state_dict({"w": torch.ones(3)}, soup)
    save_state_dict({"w": torch.ones(3)}, tmp_path / "soup.safetensors")
    atomic_write(text, lambda tmp: open(tmp, "w").write("{}"))
    for path in (soup, text, tmp_path / "soup.safetensors"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path


def test_the_decoded_cache_writes_through_no_planted_link_and_takes_the_umasks_mode(tree, tmp_path, umask):  # noqa: F811
    """The names the cache used to write (`.<key>.<host>.<pid>.tmp`, `.<key>.json.<pid>.tmp`) are links to
    files outside the cache: the run writes neither."""
    umask(0o022)
    folder = tmp_path / "cache"
    folder.mkdir()
    heldout = bundle(tree).heldout
    entry = decoded._entry(folder, heldout, decoded.stages(heldout.transform))
    outside = [tmp_path / "outside-data", tmp_path / "outside-header"]
    for target in outside:
        target.write_bytes(b"")
    os.symlink(outside[0], folder / f".{entry.key}.{socket.gethostname()}.{os.getpid()}.tmp")
    os.symlink(outside[1], folder / f".{entry.header.name}.{os.getpid()}.tmp")
    decoded.configure(str(folder))
    assert torch.equal(torch.cat(batches(heldout)), uncached(heldout))
    assert [t.read_bytes() for t in outside] == [b"", b""]
    assert entry.data.is_file() and not entry.data.is_symlink() and entry.header.is_file()
    assert stat.S_IMODE(os.stat(entry.data).st_mode) == 0o644 == stat.S_IMODE(os.stat(entry.header).st_mode)
    assert sorted(p.name for p in folder.iterdir() if not p.is_symlink()) == sorted([entry.data.name, entry.header.name])


def test_cleanup_removes_only_what_a_killed_write_left(tmp_path):
    soup = tmp_path / "soup.pt"
    named_like = tmp_path / ".soup.pt.anything.tmp"      # an input named like a temporary file
    named_like.write_bytes(b"an input")
    folder_like = tmp_path / ".soup.pt.data.tmp"         # a folder of the user's
    folder_like.mkdir()
    (folder_like / "keep").write_bytes(b"x")
    killed = temporary(soup)                            # a write killed: its lock is released
    os.close(killed[2])
    renamed = temporary(soup)                           # killed after its rename, before its folder went
    os.replace(renamed[1], tmp_path / "elsewhere")
    os.close(renamed[2])
    live = temporary(soup)                              # a write still under way (its lock is held)
    atomic_write(soup, lambda tmp: open(tmp, "wb").write(b"soup"))
    assert soup.read_bytes() == b"soup" and named_like.read_bytes() == b"an input"
    assert (folder_like / "keep").read_bytes() == b"x"
    assert not killed[0].exists() and not renamed[0].exists() and live[1].exists()
    os.close(live[2])
    remove_leftovers(soup)
    assert not live[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([soup.name, named_like.name, folder_like.name,
                                                                 "elsewhere"])


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path):
    def fails(tmp):
        open(tmp, "wb").write(b"half")
        raise RuntimeError("disk trouble")
    with pytest.raises(Exception, match="could not write"):
        atomic_write(tmp_path / "soup.pt", fails)
    assert list(tmp_path.iterdir()) == []
