"""Fine-tune ONE ingredient of a zoo from the pre-trained weights (LP-FT, as the published zoo).

Ingredient 0 is the linear probe: only the new head is trained, on features of the frozen pre-trained
network. Every other ingredient starts from ingredient 0 (`--init`, default `<out-dir>/model_0.pt`)
and is fine-tuned end to end with its own hyper-parameters, except the frozen first blocks. BatchNorm
runs in eval mode with the pre-trained statistics throughout (its affine weights still train), so all
ingredients share the same BatchNorm buffers; see docs/ZOO.md for why (`--batchnorm`: the default for
the registered archs).

    # ingredient 0 (linear probe), then one fine-tuned ingredient, on CPU in about a minute:
    python finetune.py --linear-probe --index 0 --lr 3e-3 --epochs 20 --out-dir zoo/fashion_mnist
    python finetune.py --index 1 --lr 1e-4 --epochs 3 --out-dir zoo/fashion_mnist
    # -> model_1.pt and model_1.json: held-out ~79 %, test ~78 % (the probe: 76 / 76 %), ~40 s on CPU

A whole zoo from a seeded sweep: `python sweep.py` (scripts/build_zoo.sh).
Single process only: ingredients are independent, run several at once on different devices instead.

Any arch and any folder of images (README, "Your own zoo"): `--arch timm:<name>` or
`--arch package.module:factory`, `--datasets ImageFolder --data-location ROOT`, and the pre-trained
weights for the linear probe with `--pretrained CHECKPOINT` when timm cannot download them. Their
BatchNorm layers train with batch statistics by default (`--batchnorm auto`), so the ingredients'
statistics differ and the learned soups re-estimate them (README, "Rules that decide what a soup is").
"""
import argparse
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.transforms import v2
from tqdm import tqdm

import datasets
from utils.archs import get_arch, split_of
from utils.files.ingredients import ingredient_file
from utils.files.paths import Role, check_distinct, check_writable, data_inputs
from utils.files.state_dicts import atomic_write, check_dtypes, check_state_dict, load_state_dict, save_state_dict
from utils.run import inputs, precision, prefix
from utils.run.batchnorm import set_mode
from utils.run.cli import SKIP_BAD_IMAGES_HELP, check_number, check_seed
from utils.run.evaluation import evaluate_all
from utils.runtime import distributed
from utils.runtime.errors import UserError, run_main
from utils.soup.schedules import cosine_with_warmup, set_lr

log = logging.getLogger("finetune")
# The data (and the fine-tune images preprocessed once) shared by in-process calls (the sweep): loaded
# once. The frozen blocks' activations are the frozen prefix's outputs (utils/run/prefix.py), kept once
# per data set under a hash of every frozen tensor.
_CACHE = {}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="efficientnet-lite0",
                   help="architecture: a name of the utils/archs/__init__.py registry, timm:<name>[@<size>] or "
                        "package.module:factory (README, 'Your own zoo')")
    p.add_argument("--datasets", default="FashionMNIST", help="dataset to fine-tune on (datasets registry)")
    p.add_argument("--data-location", default=None,
                   help="data root; default: the dataset's standard places (see datasets/)")
    p.add_argument("--skip-bad-images", action="store_true", help=SKIP_BAD_IMAGES_HELP)
    p.add_argument("--out-dir", default="zoo/fashion_mnist", help="folder of the zoo")
    p.add_argument("--index", type=int, default=0, help="i of the written model_{i}.pt / model_{i}.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model_{i}.pt")
    p.add_argument("--linear-probe", action="store_true",
                   help="train only the new head on frozen pre-trained features (ingredient 0)")
    p.add_argument("--init", default=None,
                   help="state dict to start from; default: the pre-trained weights for --linear-probe, "
                        "<out-dir>/model_0.pt (the linear probe) otherwise")
    p.add_argument("--pretrained", default=None,
                   help="pre-trained weights for --linear-probe: a checkpoint of --arch whose head may "
                        "differ or be absent (the probe's head starts at zero); default: the arch's own "
                        "(efficientnet-lite0: its package; timm: downloaded by timm). Ignored without "
                        "--linear-probe, so a sweep may pass it to every ingredient")
    p.add_argument("--batchnorm", default="auto", choices=["auto", "frozen", "train"],
                   help="BatchNorm statistics while fine-tuning end to end: frozen (eval mode, every "
                        "ingredient keeps the pre-trained ones) or train (batch statistics, updated); auto: "
                        "frozen for the registered archs (docs/ZOO.md), train for timm: and factory archs")
    p.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate (cosine, 10%% warm-up)")
    p.add_argument("--wd", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--epochs", type=int, default=3, help="epochs over the fine-tune split")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (Beta(alpha, alpha)); 0 = off")
    p.add_argument("--randaug-n", type=int, default=0, help="RandAugment number of ops; 0 = off")
    p.add_argument("--randaug-m", type=int, default=0, help="RandAugment magnitude (0-30)")
    p.add_argument("--views", type=int, default=0,
                   help="augmented views per fine-tune image (flipped left-right at random and shifted by up "
                        "to 3 pixels), computed once with the frozen blocks' activations; every epoch each "
                        "image is one of the clean image and its views, drawn with --seed (0 = off). Costs "
                        "one frozen forward of the fine-tune split per view, once per zoo")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of shuffling, augmentation, mixup, --subset and the --views drawn")
    p.add_argument("--frozen-blocks", type=int, default=None,
                   help="first blocks kept frozen with the stem, for an arch that declares where a frozen "
                        "prefix may end (utils/archs: register_split); default: the arch's (10 for "
                        "efficientnet-lite0; 0, nothing frozen, for archs that declare none)")
    p.add_argument("--finetune-size", type=int, default=4000,
                   help="fine-tune on a class-balanced subsample of this many images (0 = all)")
    p.add_argument("--subset", type=int, default=0,
                   help="train on a random subset of this many images of the fine-tune split, drawn with "
                        "--seed, so that ingredients of a sweep see different images (0 = the whole split)")
    p.add_argument("--heldout-per-class", type=int, default=None,
                   help="held-out images per class (default: the dataset's, as the soup scripts use)")
    p.add_argument("--heldout-index", default=None,
                   help="0/1 numpy .npy file (numpy.save) over the sorted train set selecting the held-out "
                        "split, 1 = held-out (docs/DATA.md; give the soup scripts the same one)")
    p.add_argument("--test-size", type=int, default=2000, help="test images evaluated (0 = all)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the held-out split and subsamples")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = no limit; tests)")
    p.add_argument("--workers", type=int, default=0, help="data loader processes for RandAugment")
    p.add_argument("--device", default=None, type=distributed.parse_device,
                   help="auto, cpu, cuda or cuda:N; default cuda when available")
    args = p.parse_args(argv)
    for name in ("lr", "wd", "mixup", "label_smoothing"):  # NaN and infinities pass the checks below
        check_number(f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("finetune_size", "test_size", "max_steps", "workers"):
        check_number(f"--{name.replace('_', '-')}", getattr(args, name), 0)
    if args.frozen_blocks is not None:
        check_number("--frozen-blocks", args.frozen_blocks, 0)
    check_seed("--seed", args.seed)
    check_seed("--data-seed", args.data_seed)
    for name in ("lr", "epochs", "batch_size"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.heldout_per_class is not None and args.heldout_per_class < 1:
        raise UserError(f"--heldout-per-class must be >= 1, got {args.heldout_per_class}")
    for name in ("wd", "mixup", "label_smoothing", "randaug_n", "randaug_m", "index", "subset", "views"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.views and (args.mixup or args.randaug_n):
        raise UserError("--views augments the cached activations of clean images; it does not combine with "
                        "--mixup or --randaug-n, which augment the images of every batch")
    if args.label_smoothing >= 1:
        raise UserError(f"--label-smoothing must be < 1, got {args.label_smoothing}")
    if args.randaug_m > 30:
        raise UserError(f"--randaug-m must be in [0, 30], got {args.randaug_m}")
    return args


# ------------------------------------------------------------------------------------------- data
class Mapped(Dataset):
    """`dataset` (raw uint8 images) with a per-sample transform."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return self.transform(x), y


def _raw(x):
    return x


def load_bundle(args, spec):
    """The DataBundle; its fine-tune split yields raw images (augmentation is per ingredient)."""
    key = ("bundle", args.datasets, args.data_location, args.heldout_per_class, args.heldout_index,
           args.finetune_size, args.test_size, args.data_seed, args.skip_bad_images, spec.name)
    if key not in _CACHE:
        _CACHE[key] = datasets.build_dataset(
            args.datasets, args.data_location, spec.preprocess, heldout_per_class=args.heldout_per_class,
            heldout_index=args.heldout_index, finetune_size=args.finetune_size or None,
            test_size=args.test_size or None,
            seed=args.data_seed, train_preprocess=_raw, sets=datasets.FINETUNE_SETS,
            skip_bad_images=args.skip_bad_images)
    return key, _CACHE[key]


@torch.no_grad()
def run_batched(fn, dataset, device, batch_size, desc):
    """fn over a dataset of (x, y) in order; returns (outputs on cpu, labels)."""
    outs, labels = [], []
    # its own generator: iterating a DataLoader draws a seed, which must not move the global RNG that
    # dropout uses, or a cached and an uncached run of the same seed would differ
    loader = DataLoader(dataset, batch_size=batch_size, generator=torch.Generator())
    for x, y in tqdm(loader, desc=desc, leave=False):
        outs.append(fn(x.to(device)).cpu())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def cached(key, compute):
    if key not in _CACHE:
        _CACHE[key] = compute()
    return _CACHE[key]


# ------------------------------------------------------------------------------------------ model
def head_of(model):
    """The classification head: the model's last nn.Linear."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError("the architecture has no linear head to probe")
    return linears[-1]


def frozen_split(model, spec, frozen_blocks):
    """The model's Split after the stem and its first --frozen-blocks blocks (utils/archs: the
    architecture declares where a prefix may end), or None when nothing is frozen."""
    blocks = spec.frozen_blocks if frozen_blocks is None else frozen_blocks
    split = split_of(model, blocks)
    if split is None and blocks:
        raise UserError(f"--frozen-blocks {blocks}: --arch {spec.name} declares no frozen prefix "
                        "(utils/archs: register_split); only 0 is accepted")
    return split


def batchnorm_frozen(args, spec):
    """Whether BatchNorm keeps its statistics while fine-tuning (--batchnorm; auto: frozen for the
    registered archs, as docs/ZOO.md measured for the default, updated for timm: and factory archs, as
    their own training scripts do)."""
    if args.batchnorm == "auto":
        return not (spec.name.startswith("timm:") or ":" in spec.name)
    return args.batchnorm == "frozen"


def set_train_mode(model, split, frozen_stats=True):
    """The mode utils.run.batchnorm.set_mode gives (BatchNorm in train mode only when its statistics are
    updated, every other layer in eval mode: dropout and drop-connect are off), and the frozen modules
    in eval mode, so that they run exactly as when their activations were cached."""
    set_mode(model, frozen_stats=frozen_stats)
    for module in split.modules if split is not None else ():
        module.eval()


def mixup(x, y, alpha, num_classes, gen):
    """Mix the batch with a shuffled copy of itself; soft targets."""
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    target = F.one_hot(y, num_classes).float()
    return lam * x + (1 - lam) * x[perm], lam * target + (1 - lam) * target[perm]


# --------------------------------------------------------------------------------------- training
def train_linear_probe(model, split, args, spec, bundle, key, device):
    """Train the head alone on the frozen network's features (computed once, eval mode)."""
    head = head_of(model)
    feats = {}
    hook = head.register_forward_pre_hook(lambda m, inp: feats.__setitem__("x", inp[0]))

    def features(x):
        (model if split is None else split.tail)(x)
        return feats["x"]

    model.eval()
    if split is not None:  # from the frozen activations that the fine-tuned ingredients reuse: one pass, not two
        data = TensorDataset(*frozen_activations(model, split, clean_images(spec, bundle, key), device))
    else:
        data = Mapped(bundle.finetune, spec.preprocess)
    x, y = run_batched(features, data, device, 256, "probe features")
    hook.remove()
    opt = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.wd)
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = -(-len(y) // args.batch_size)
    schedule = cosine_with_warmup(args.lr, args.epochs * steps_per_epoch, warmup_frac=0.1)
    step = 0
    for _ in tqdm(range(args.epochs), desc="linear probe epochs", leave=False):
        for idx in torch.randperm(len(y), generator=gen).split(args.batch_size):
            set_lr(opt, schedule(step))
            loss = F.cross_entropy(head(x[idx].to(device)), y[idx].to(device),
                                   label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return step


def clean_images(spec, bundle, key):
    """The preprocessed fine-tune images and their labels (a TensorDataset), made once per data set."""
    return cached(key + ("clean", spec.name), lambda: TensorDataset(*run_batched(
        lambda x: x, Mapped(bundle.finetune, spec.train_preprocess), torch.device("cpu"), 256,
        "preprocessing")))


class View(Dataset):
    """View k >= 1 of the preprocessed images of `images` (a TensorDataset of (N, C, H, W) images and
    labels): each image flipped left-right with probability 1/2 and shifted by up to `pad` pixels (zero
    padding), drawn from a generator seeded with k, so every ingredient that uses view k sees the same
    images."""

    def __init__(self, images, k, pad=3):
        gen = torch.Generator().manual_seed(k)
        n = len(images)
        self.images, self.pad = images, pad
        self.flip = torch.rand(n, generator=gen) < 0.5
        self.dy, self.dx = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).tolist()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x, y = self.images[i]
        h, w = x.shape[-2:]
        padded = F.pad(x.flip(-1) if self.flip[i] else x, (self.pad,) * 4)
        return padded[:, self.dy[i]:self.dy[i] + h, self.dx[i]:self.dx[i] + w], y


def frozen_activations(model, split, images, device, desc="frozen activations"):
    """(activations after the frozen blocks, labels) of `images`: the frozen prefix's outputs, computed
    once per data set and frozen tensors (utils/run/prefix.py; a fine-tune split is held whole, without
    the soups' bound); the images themselves when nothing is frozen."""
    if split is None:
        return run_batched(lambda x: x, images, device, 256, desc)
    _, h, y = prefix.outputs(model, images, device, 256, desc, split, bounded=False)
    return h, y


def view_activations(args, spec, bundle, key, model, split, device):
    """(views + 1, N, ...) frozen activations of the fine-tune images: the clean images, then --views
    flipped and shifted views (`View`), each computed once per data set and frozen tensors."""
    images = clean_images(spec, bundle, key)
    views = [images] + [cached(key + ("view", k, spec.name), lambda: View(images, k))
                        for k in range(1, args.views + 1)]
    outs = [frozen_activations(model, split, v, device, f"frozen activations, view {k}" if k else
                               "frozen activations") for k, v in enumerate(views)]
    return torch.stack([h for h, _ in outs]), outs[0][1]


def training_images(args, bundle):
    """Indices of the fine-tune split this ingredient trains on: all, or a --subset drawn with --seed."""
    n = len(bundle.finetune)
    if not args.subset:
        return torch.arange(n)
    if args.subset > n:
        raise UserError(f"--subset {args.subset} is larger than the fine-tune split ({n} images)")
    return torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[:args.subset].sort().values


def epoch_batches(args, spec, bundle, key, model, split, device, gen, keep):
    """Yield (frozen activations, labels) for one epoch over the images `keep`. The clean images are
    preprocessed once, and without augmentation their frozen activations too. Mixup mixes images (not
    activations), so mixed batches go through the frozen blocks batch by batch; RandAugment redraws every
    image every epoch."""
    if args.randaug_n:
        transform = v2.Compose([v2.RandAugment(num_ops=args.randaug_n, magnitude=args.randaug_m),
                                spec.train_preprocess])
        loader = DataLoader(Subset(Mapped(bundle.finetune, transform), keep.tolist()),
                            batch_size=args.batch_size, shuffle=True, generator=gen, num_workers=args.workers)
        batches = ((x.to(device), y.to(device)) for x, y in loader)
    else:
        if not args.mixup:
            h, y = view_activations(args, spec, bundle, key, model, split, device)
            for idx in keep[torch.randperm(len(keep), generator=gen)].split(args.batch_size):
                view = torch.randint(0, len(h), (len(idx),), generator=gen) if len(h) > 1 else 0
                yield h[view, idx].to(device), y[idx].to(device)
            return
        x_all, y_all = clean_images(spec, bundle, key).tensors
        batches = ((x_all[idx].to(device), y_all[idx].to(device))
                   for idx in keep[torch.randperm(len(keep), generator=gen)].split(args.batch_size))
    for x, y in batches:
        if args.mixup:
            x, y = mixup(x, y, args.mixup, bundle.num_classes, gen)
        with torch.no_grad():
            h = x if split is None else split.head(x)
        yield h, y


def train_end_to_end(model, split, args, spec, bundle, key, device):
    frozen_stats = batchnorm_frozen(args, spec)
    frozen = set(split.keys) if split is not None else set()
    params = [p for n, p in model.named_parameters() if n not in frozen]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    tail = model if split is None else split.tail
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.wd)
    gen = torch.Generator().manual_seed(args.seed)
    keep = training_images(args, bundle)
    steps_per_epoch = -(-len(keep) // args.batch_size)
    total = args.epochs * steps_per_epoch
    if args.max_steps:
        total = min(total, args.max_steps)
    schedule = cosine_with_warmup(args.lr, total, warmup_frac=0.1)
    step = 0
    bar = tqdm(total=total, desc=f"fine-tuning model_{args.index}", leave=False)
    for _ in range(args.epochs):
        set_train_mode(model, split, frozen_stats)
        for h, y in epoch_batches(args, spec, bundle, key, model, split, device, gen, keep):
            if step >= total:
                break
            if len(y) == 1 and not frozen_stats:
                continue  # a last batch of one image: BatchNorm has no batch statistics of it to take
            set_lr(opt, schedule(step))
            loss = F.cross_entropy(tail(h), y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    for p in model.parameters():
        p.requires_grad_(True)
    return step


def heldout_and_test(model, split, bundle, device):
    """Held-out and test accuracy, from the frozen prefix's outputs of both sets, which the whole zoo
    shares: computed once (utils/run/prefix.py)."""
    evaluated = inputs.evaluation(model, device, 256, 0, precision.DEFAULT, split)
    scores = evaluate_all(evaluated, bundle, device, 256, shifts=False)
    return scores["heldout"], scores["test"]


# ------------------------------------------------------------------------------------------- main
def initial_state(args, spec, num_classes):
    """The model to start from: pre-trained weights (linear probe) or the linear-probe ingredient."""
    if args.linear_probe and args.init is None:
        if args.pretrained is None:
            return spec.build(num_classes, pretrained=True)
        return load_pretrained(spec.build(num_classes, pretrained=False), Path(args.pretrained), args.arch)
    init = Path(args.init) if args.init else ingredient_file(args.out_dir, 0)
    if not init.is_file():
        raise UserError(f"{init}: no start model; build the linear probe first "
                        f"(finetune.py --linear-probe --index 0 --out-dir {args.out_dir}) or pass --init")
    model = spec.build(num_classes, pretrained=False)
    reference = model.state_dict()
    sd = load_state_dict(init)
    check_state_dict(sd, reference, f"{init} (--arch {args.arch})")  # names the keys that differ
    model.load_state_dict(check_dtypes(sd, reference, str(init)), strict=True)
    return model


def load_pretrained(model, path, arch):
    """Load pre-trained weights strictly except the head: the probe trains a new one, from zero. The
    checkpoint's own head (another label set) may have another shape or be absent."""
    head = head_of(model)
    head_name = next(n for n, m in model.named_modules() if m is head)
    head_keys = {f"{head_name}.{k}" for k in head.state_dict()}
    reference = model.state_dict()
    sd = {k: v for k, v in load_state_dict(path).items() if k not in head_keys}
    check_state_dict(sd, {k: v for k, v in reference.items() if k not in head_keys},
                     f"--pretrained {path} (--arch {arch}, head {head_name} excepted)")
    model.load_state_dict({**check_dtypes(sd, reference, str(path)),
                           **{k: torch.zeros_like(reference[k]) for k in head_keys}}, strict=True)
    return model


def check_paths(args, pt, js, standard=None):
    """The ingredient written is none of the files read (--overwrite never covers an input): the
    start model (--init, by default model_0.pt of --out-dir), --pretrained, the data (`standard`: the
    folder it was read from when no --data-location named it, known once it is read), the index."""
    start = Path(args.init) if args.init else None if args.linear_probe else ingredient_file(args.out_dir, 0)
    inputs = [Role("--init", f"the start model (--init{'' if args.init else ', by default'} {start})", start)
              ] if start else []
    if args.pretrained:
        inputs.append(Role("--pretrained", "the pre-trained weights (--pretrained)", Path(args.pretrained)))
    outputs = [Role("--out-dir", "the new ingredient", pt), Role("--out-dir", "its record", js)]
    check_distinct(outputs, inputs + data_inputs(args.data_location, args.heldout_index, standard))
    if standard is None:  # once, before any work: each can be written there (names, folder, type)
        check_writable(outputs)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out_dir)
    pt, js = ingredient_file(out, args.index), ingredient_file(out, args.index, ".json")
    check_paths(args, pt, js)
    if not args.overwrite and (pt.exists() or js.exists()):
        raise UserError(f"{pt} exists: refusing to overwrite it (pass --overwrite, or choose another --index)")
    device = distributed.pick_device(args.device or "auto")
    torch.manual_seed(args.seed)
    spec = get_arch(args.arch)
    start = time.time()
    key, bundle = load_bundle(args, spec)
    if args.data_location is None and bundle.split.get("folder"):  # the standard place, now known
        check_paths(args, pt, js, standard=bundle.split["folder"])
    model = initial_state(args, spec, bundle.num_classes).to(device)
    split = frozen_split(model, spec, args.frozen_blocks)
    if args.linear_probe:
        steps = train_linear_probe(model, split, args, spec, bundle, key, device)
    else:
        steps = train_end_to_end(model, split, args, spec, bundle, key, device)
    heldout, test = heldout_and_test(model, split, bundle, device)
    seconds = time.time() - start
    save_state_dict(model.state_dict(), pt, overwrite=args.overwrite)
    record = {"index": args.index, "arch": spec.name, "datasets": args.datasets,
              "linear_probe": args.linear_probe, "init": args.init, "steps": steps,
              "hparams": {k: getattr(args, k) for k in ("lr", "wd", "epochs", "batch_size", "label_smoothing",
                                                        "mixup", "randaug_n", "randaug_m", "seed",
                                                        "frozen_blocks", "subset", "views", "batchnorm",
                                                        "pretrained")},
              "data": bundle.split, "heldout": heldout, "test": test, "seconds": round(seconds, 2)}
    record["hparams"]["batchnorm"] = "frozen" if batchnorm_frozen(args, spec) else "train"
    atomic_write(js, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"),
                 overwrite=args.overwrite)
    log.info("model_%d: held-out %.2f %%, test %.2f %% (%.0f s) -> %s", args.index, heldout, test, seconds, pt)
    return record


if __name__ == "__main__":
    run_main(main)
