"""Image files (the ImageNet and ImageFolder families): the dataset that reads them, and the check that
every file a run will read is one before any work.

The check reads headers only, so it is cheap enough for ImageNet's held-out, val and shift sets (about
220k files): each file must be a regular file (a FIFO would block, a link to /dev/zero never end; both
are refused without being opened), readable, and its header must decode with at most MAX_PIXELS
pixels. A bad file is refused naming it, or, with --skip-bad-images, dropped with a warning naming it
and recorded in the split record. A file whose header is sound but whose data is not (a truncated
JPEG) fails when it is first read: one line naming it.
"""
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

from datasets.base import not_regular
from datasets.heldout import subsample
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)

# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS, about 9459 x 9459): an RGB image that
# large decodes to 268 MB. ImageNet's largest images hold under 20M pixels.
MAX_PIXELS = 89_478_485
CHECK_THREADS = 16      # headers are small reads: threads hide the file system's latency (NFS, Lustre)
SHOWN = 20              # bad files named in warnings and in the split record; the rest are counted
# The sets each kind of run reads: the soup scripts never touch the fine-tune split; finetune.py reads
# it and evaluates on held-out and test only.
SOUP_SETS = ("heldout", "test", "shifts")
FINETUNE_SETS = ("finetune", "heldout", "test")


class ImageReadError(UserError):
    """An image file that failed when it was read. Raised in a DataLoader worker, it comes back to the
    main process rebuilt from the worker's formatted traceback (torch's ExceptionWrapper.reraise calls
    the class with that text): keep the original one-line message, the traceback's last line."""

    def __init__(self, message):
        if "Original Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class ImageFiles(Dataset):
    """Image files with integer labels; `border` pixels are cropped off each side before `transform`."""

    def __init__(self, paths, labels, transform=None, border=0):
        self.paths, self.labels, self.transform, self.border = paths, labels, transform, border

    def __len__(self):
        return len(self.paths)

    def image(self, i):
        """Image i as a PIL RGB image, its border cropped, before `transform`."""
        img = read_rgb(self.paths[i])
        if self.border:
            b = self.border
            img = img.crop((b, b, img.width - b, img.height - b))
        return img

    def __getitem__(self, i):
        img = self.image(i)
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def read_rgb(path):
    """The image at `path` as RGB; any failure to decode it is one ImageReadError naming the file."""
    try:
        with Image.open(path) as f:
            return f.convert("RGB")
    except Exception as err:  # noqa: BLE001 - whatever PIL raises for this file, the file is bad
        raise ImageReadError(f"image file {path} cannot be decoded ({type(err).__name__}: {one_line(err)}); "
                             "its header passed the check before the run: remove or replace the file") from err


def one_line(err):
    return " ".join(str(err).split()) or type(err).__name__


def problem(path):
    """Why the image file at `path` cannot be read (a phrase), or None when its header is sound."""
    why = not_regular(path)
    if why:
        return why
    try:
        with open(path, "rb") as f:
            if not f.read(1):
                return "is empty (0 bytes)"
            return header_problem(f)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"


def header_problem(f):
    """Why the image file open as `f` has no sound header, or None."""
    f.seek(0)
    try:
        with Image.open(f) as img:
            width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"declares too many pixels (PIL: {one_line(err)})"
    except UnidentifiedImageError:
        return "is not an image file PIL can identify (a truncated header, or another kind of file)"
    except Exception as err:  # noqa: BLE001 - whatever a PIL plug-in raises on this header, it is bad
        return f"has a header that does not decode ({type(err).__name__}: {one_line(err)})"
    if width * height > MAX_PIXELS:
        return f"declares {width} x {height} pixels, more than {MAX_PIXELS}"
    return None


def find_bad(paths, threads=CHECK_THREADS):
    """{path: why} of the bad files among `paths` (each checked once)."""
    paths = sorted(set(paths))
    with warnings.catch_warnings():
        # PIL warns (rather than raises) between MAX_IMAGE_PIXELS and twice that: a bad file here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            found = list(tqdm(pool.map(problem, paths), total=len(paths), desc="checking image files",
                              unit="file", leave=False, mininterval=1.0))
    return {p: why for p, why in zip(paths, found) if why}


def named_sets(bundle, sets):
    """[(name, ImageFiles)] of the bundle's sets named in `sets` ("finetune", "heldout", "test",
    "shifts") that are image files (Fashion-MNIST and CIFAR hold arrays: none)."""
    found = [(name, getattr(bundle, name)) for name in ("finetune", "heldout") if name in sets]
    if "test" in sets:
        found.append(("test", bundle.test.dataset))
    if "shifts" in sets:
        found += [(s.name, s.dataset) for s in bundle.shifts]
    return [(name, ds) for name, ds in found if isinstance(ds, ImageFiles)]


def check_images(bundle, sets=SOUP_SETS, skip=False):
    """Check every image file of the bundle's `sets` before any work. A bad one is a UserError naming
    it; with `skip`, bad files are dropped from every set, each named in a warning, and recorded in
    bundle.split["dropped_images"] (count, the first SHOWN files and why), with the sizes recorded
    there updated to what is left. The held-out mask was applied before: an index file indexes the
    whole sorted train listing, which dropping files first would shift."""
    named = named_sets(bundle, sets)
    bad = find_bad([p for _, ds in named for p in ds.paths])
    if not bad:
        return bundle
    if not skip:
        raise UserError(refusal(bad, sum(len(ds) for _, ds in named)))
    for k, (path, why) in enumerate(bad.items()):
        if k < SHOWN:
            log.warning("image file %s %s: dropped (--skip-bad-images)", path, why)
    if len(bad) > SHOWN:
        log.warning("%d more bad image files dropped (--skip-bad-images)", len(bad) - SHOWN)
    for name, ds in named:
        keep = [i for i, p in enumerate(ds.paths) if p not in bad]
        if not keep:
            raise UserError(f"every image file of the {name} set is bad (the first: {ds.paths[0]} "
                            f"{bad[ds.paths[0]]})")
        ds.paths, ds.labels = [ds.paths[i] for i in keep], ds.labels[keep]
    record_drops(bundle, bad)
    return bundle


def refusal(bad, checked):
    """The one line refusing a run over the bad files `bad` ({path: why}) among `checked` files."""
    first, why = next(iter(bad.items()))
    more = f" ({len(bad) - 1} more bad files among the {checked} checked)" if len(bad) > 1 else ""
    return (f"image file {first} {why}{more}: remove or replace it, or pass --skip-bad-images to drop bad "
            "files with a warning")


def record_drops(bundle, bad):
    split = bundle.split
    split["dropped_images"] = {"count": len(bad), "files": {p: why for p, why in list(bad.items())[:SHOWN]}}
    sizes = {"heldout_size": bundle.heldout, "finetune_size": bundle.finetune, "test_size": bundle.test.dataset}
    for key, ds in sizes.items():
        if key in split and ds is not None:
            split[key] = len(ds)


def subset(paths, labels, keep):
    """The paths and labels (a numpy array) at the indices `keep`."""
    return [paths[i] for i in keep], labels[keep]


def shrink(evalset, size, seed):
    """`evalset` (of ImageFiles) cut to a seeded subsample of `size` images, in place (a missing set as it is)."""
    ds = evalset.dataset
    if ds is None:
        return evalset
    ds.paths, ds.labels = subset(ds.paths, ds.labels, subsample(len(ds), size, seed))
    return evalset
