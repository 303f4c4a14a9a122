"""The seeded hyper-parameter sweep that builds a zoo of ingredients, shaped like the published one.

Ingredient 0 is the linear probe; ingredients 1..n-1 are fine-tuned from it (--start probe, the published
zoo's LP-FT) or from one fine-tune of it with fixed hyper-parameters (--start anchor, the default for
EfficientNet-Lite0, each ingredient on its own --subset of the fine-tune images: docs/ZOO.md says why),
with hyper-parameters drawn from `draw(n, seed)`: learning rate and weight decay log-uniform, epochs
uniform in a range, label smoothing 0 for about half else up to 0.25; mixup (alpha up to 0.9) for a share
--mixup-frac and RandAugment (N in 1-2, M in 1-20) for about two thirds of a share --randaug-frac, both 0
by default (on a CPU, augmented images need the frozen blocks' forward every batch: see docs/ZOO.md).

    python sweep.py --n 12 --out zoo/fashion_mnist            # the default zoo (CPU, see docs/ZOO.md)
    python sweep.py --n 72 --out zoo/fmnist72 --start probe --finetune-size 0 --subset 0 \\
        --lr-min 1e-5 --lr-max 2e-4 --epochs-min 4 --epochs-max 10 --test-size 0 \\
        --mixup-frac 0.5 --randaug-frac 0.5 --frozen-blocks 10       # the published shape, full data (GPU)

Any flag not listed by --help is passed to finetune.py (e.g. --data-location, --device, --batch-size).
Ingredients already in --out are skipped, so an interrupted sweep resumes where it stopped. Every
ingredient runs in this process (finetune.main), so the data and the frozen activations load once.
"""
import argparse
import json
import logging
import math
import random
from pathlib import Path

from tqdm import tqdm

from utils.runtime.errors import UserError, run_main

log = logging.getLogger("sweep")

# The linear probe (ingredient 0): head only, on cached features, so many cheap epochs.
LINEAR_PROBE = {"linear_probe": True, "lr": 3e-3, "wd": 0.0, "epochs": 20, "label_smoothing": 0.0,
                "mixup": 0.0, "randaug_n": 0, "randaug_m": 0, "views": 0, "seed": 0}
# The start of ingredients 1..n-1 with --start anchor: one fine-tune of the linear probe with these
# fixed hyper-parameters (on its own --subset, drawn with this seed), saved as <out>/anchor/model_0.pt.
ANCHOR = {"linear_probe": False, "lr": 3e-4, "wd": 1e-3, "epochs": 10, "label_smoothing": 0.0, "mixup": 0.0,
          "randaug_n": 0, "randaug_m": 0, "views": 0, "seed": 1000}
# The default zoo's ranges, chosen on held-out (docs/ZOO.md, where every variant tried is measured): from
# the anchor, small steps.
LR = (3e-5, 1.5e-4)
EPOCHS = (4, 8)
VIEWS = 3
# finetune.py flags the sweep passes unless given. EfficientNet-Lite0 (the cheap default of docs/ZOO.md):
# everything before the last block is frozen (its activations are computed once), a pool of 48000
# fine-tune images of which each ingredient trains on its own 8000, batch 256.
FINETUNE_DEFAULTS = {"--finetune-size": "8000", "--batch-size": "256"}
EFFNET_DEFAULTS = {"--frozen-blocks": "15", "--finetune-size": "48000", "--subset": "8000"}


def draw(n, seed=0, lr=LR, wd=(1e-4, 0.2), epochs=EPOCHS, mixup_frac=0.0, randaug_frac=0.0, views_frac=0.0,
         views=VIEWS):
    """The n configurations of a zoo: [linear probe] + n-1 seeded draws (deterministic for a seed).
    mixup_frac / randaug_frac / views_frac: the share of ingredients drawn with mixup / RandAugment /
    `views` flipped and shifted views (finetune.py --views; only without mixup and RandAugment)."""
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if not (0 <= mixup_frac <= 1 and 0 <= randaug_frac <= 1 and 0 <= views_frac <= 1):
        raise UserError(f"--mixup-frac, --randaug-frac and --views-frac must be in [0, 1], got {mixup_frac}, "
                        f"{randaug_frac}, {views_frac}")
    if views < 0:
        raise UserError(f"--views must be >= 0, got {views}")
    if not (0 < lr[0] <= lr[1] and 0 < wd[0] <= wd[1] and 1 <= epochs[0] <= epochs[1]):
        raise UserError(f"bad sweep ranges: lr {lr}, wd {wd}, epochs {epochs} (need 0 < min <= max, "
                        "epochs >= 1)")
    rng = random.Random(seed)

    def log_uniform(lo, hi):
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))

    views_rng = random.Random(f"views-{seed}")
    configs = [dict(LINEAR_PROBE)]
    for i in range(1, n):
        # N = 0 is RandAugment off, so about a third of the "on" draws are off
        randaug_n = rng.randint(0, 2) if rng.random() < randaug_frac else 0
        configs.append({
            "linear_probe": False,
            "lr": log_uniform(*lr),
            "wd": log_uniform(*wd),
            "epochs": rng.randint(*epochs),
            "label_smoothing": 0.0 if rng.random() < 0.5 else rng.uniform(0.0, 0.25),
            "mixup": 0.0 if rng.random() < 1 - mixup_frac else rng.uniform(0.0, 0.9),
            "randaug_n": randaug_n,
            "randaug_m": rng.randint(1, 20) if randaug_n else 0,
            "seed": i,
        })
        augmented = configs[-1]["mixup"] or configs[-1]["randaug_n"]
        # its own generator: turning views on changes no other hyper-parameter of the zoo
        configs[-1]["views"] = views if views_rng.random() < views_frac and not augmented else 0
    return configs


def to_argv(config):
    """finetune.py flags for one configuration."""
    argv = ["--linear-probe"] if config["linear_probe"] else []
    for key in ("lr", "wd", "epochs", "label_smoothing", "mixup", "randaug_n", "randaug_m", "views", "seed"):
        argv += [f"--{key.replace('_', '-')}", str(config[key])]
    return argv


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=12, help="ingredients in the zoo (model_0 .. model_{n-1})")
    p.add_argument("--out", default="zoo/fashion_mnist", help="zoo folder")
    p.add_argument("--sweep-seed", type=int, default=0, help="seed of the hyper-parameter draws")
    p.add_argument("--lr-min", type=float, default=LR[0], help="smallest learning rate (log-uniform)")
    p.add_argument("--lr-max", type=float, default=LR[1], help="largest learning rate (log-uniform)")
    p.add_argument("--wd-min", type=float, default=1e-4, help="smallest weight decay (log-uniform)")
    p.add_argument("--wd-max", type=float, default=0.2, help="largest weight decay (log-uniform)")
    p.add_argument("--epochs-min", type=int, default=EPOCHS[0], help="fewest epochs per ingredient")
    p.add_argument("--epochs-max", type=int, default=EPOCHS[1], help="most epochs per ingredient")
    p.add_argument("--mixup-frac", type=float, default=0.0,
                   help="share of ingredients with mixup (0 on CPU: mixed images need the frozen blocks' "
                        "forward every batch; the published zoo: 0.5)")
    p.add_argument("--randaug-frac", type=float, default=0.0,
                   help="share of ingredients drawn with RandAugment (0 on CPU, as --mixup-frac; 0.5 "
                        "gives about a third)")
    p.add_argument("--views-frac", type=float, default=0.0,
                   help="share of ingredients (of those without mixup and RandAugment) fine-tuned with "
                        "flipped and shifted views of the images (finetune.py --views)")
    p.add_argument("--views", type=int, default=VIEWS, help="views per image for those ingredients")
    p.add_argument("--start", choices=["anchor", "probe"], default=None,
                   help="what ingredients 1..n-1 are fine-tuned from: 'probe', the linear probe model_0 (the "
                        "published zoo's LP-FT), or 'anchor', one fine-tune of the probe with fixed "
                        "hyper-parameters (sweep.ANCHOR, saved as <out>/anchor/model_0.pt, not an ingredient); "
                        "default: anchor for efficientnet-lite0 (docs/ZOO.md), probe for other archs")
    return p.parse_known_args(argv)


def main(argv=None):
    import finetune  # the top-level script; imported here so `--help` stays fast
    from utils.files.ingredients import ingredient_file
    args, passthrough = parse_args(argv)
    for flag in ("--out-dir", "--index", "--overwrite", "--init", "--linear-probe", "--lr", "--wd", "--epochs",
                 "--label-smoothing", "--mixup", "--randaug-n", "--randaug-m", "--seed"):
        if any(a == flag or a.startswith(flag + "=") for a in passthrough):
            raise UserError(f"{flag} is set by the sweep itself; the sweep's own flags are in --help")
    configs = draw(args.n, args.sweep_seed, (args.lr_min, args.lr_max), (args.wd_min, args.wd_max),
                   (args.epochs_min, args.epochs_max), args.mixup_frac, args.randaug_frac,
                   args.views_frac, args.views)
    effnet = is_effnet(passthrough, finetune)
    start = args.start or ("anchor" if effnet else "probe")
    passthrough = default_flags(passthrough, effnet) + passthrough   # later flags win
    out = Path(args.out)
    records, init = [], []
    bar = tqdm(list(enumerate(configs)), desc=f"zoo {out}")
    for i, config in bar:
        if i and start == "anchor" and not init and not built(out, i):  # only when an ingredient needs it
            anchor = build(finetune, ANCHOR, passthrough + ["--init", str(ingredient_file(out, 0))], out / "anchor", 0)
            log.info("anchor (%s): held-out %.2f, test %.2f", ingredient_file(out / "anchor", 0), anchor["heldout"],
                     anchor["test"])
            init = ["--init", str(ingredient_file(out / "anchor", 0))]
        records.append(build(finetune, config, passthrough + (init if i else []), out, i))
        bar.set_postfix(last=f"{records[-1]['heldout']:.1f}/{records[-1]['test']:.1f}")
    summarise(records)
    return records


def built(out, i):
    from utils.files.ingredients import ingredient_file  # here, so `--help` stays fast (no torch)
    return ingredient_file(out, i).exists() and ingredient_file(out, i, ".json").exists()


def build(finetune, config, flags, out, i):
    """finetune.py for one configuration as <out>/model_<i>; an existing one (.pt and .json) is read."""
    from utils.files.ingredients import ingredient_file
    pt, js = ingredient_file(out, i), ingredient_file(out, i, ".json")
    if built(out, i):
        return json.loads(js.read_text())
    return finetune.main(to_argv(config) + flags + ["--out-dir", str(out), "--index", str(i),
                                                    *(["--overwrite"] if pt.exists() or js.exists() else [])])


def is_effnet(passthrough, finetune):
    from utils.archs import effnet
    from utils.archs import get_arch
    arch = finetune.parse_args(passthrough + ["--out-dir", "."]).arch
    return get_arch(arch).name == effnet.MODEL_NAME


def default_flags(passthrough, effnet):
    """FINETUNE_DEFAULTS (updated by EFFNET_DEFAULTS for efficientnet-lite0) not already in `passthrough`."""
    flags = {**FINETUNE_DEFAULTS, **(EFFNET_DEFAULTS if effnet else {})}
    given = {a.split("=")[0] for a in passthrough}
    return [f for flag, value in flags.items() if flag not in given for f in (flag, value)]


def summarise(records):
    """Log held-out / test accuracy of the linear probe and min / median / max of the rest."""
    def stats(key, rs):
        vals = sorted(r[key] for r in rs)
        return f"min {vals[0]:.2f} median {vals[len(vals) // 2]:.2f} max {vals[-1]:.2f}" if vals else "-"
    lp = [r for r in records if r.get("linear_probe")]
    ft = [r for r in records if not r.get("linear_probe")]
    for key in ("heldout", "test"):
        log.info("%s: linear probe %s; %d fine-tuned: %s", key,
                 ", ".join(f"{r[key]:.2f}" for r in lp) or "-", len(ft), stats(key, ft))
    log.info("seconds in total: %.0f", sum(r["seconds"] for r in records))


if __name__ == "__main__":
    run_main(main)
