"""How much of greedy soup's choice is the draw of the held-out images? Greedy soup (greedy_soup.py's recipe) on the
zoo's held-out split, then on --draws random selection sets of the same size drawn from the held-out and
test images together (no ingredient trained on any of them).

    python scripts/greedy_draws.py --zoo zoo/fashion_mnist            # the default zoo (about a minute)
    python scripts/greedy_draws.py --zoo /tmp/z --frozen-blocks 15 --finetune-size 24000

Prints, for the real held-out split and over the draws: how many ingredients greedy soup keeps, its gain
over the best ingredient of that selection set, and the uniform soup minus that best ingredient. A zoo
whose greedy soup keeps 3 or more on only a few draws does not have ingredients whose averages beat the
best one; one whose real split is an outlier among the draws is judged by a lucky (or unlucky) split.
Flags not listed by --help go to finetune.py's data options (--finetune-size, --heldout-per-class,
--test-size, --data-location, --datasets, --arch; the sweep's defaults first). The split they give must be
the one the zoo's ingredients record (model_<i>.json), or the script refuses: otherwise a selection set
could hold images an ingredient was trained on.
Selection sets are drawn with --seed; every soup's predictions are computed once, on the CPU. The frozen
part's outputs come from the recipes' prefix pass (utils/run/prefix.py: checked against the prefix
tensors, and kept between runs in its default folder, $MODEL_SOUPS_CACHE/prefix or ~/.cache/model_soups/prefix).
"""
import argparse
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import finetune  # noqa: E402
import greedy_soup  # noqa: E402
import sweep  # noqa: E402
from utils.archs import get_arch  # noqa: E402
from utils.files.ingredients import available, ingredient_file, ingredient_paths, load_checked  # noqa: E402
from utils.files.paths import Role, check_outputs  # noqa: E402
from utils.run import prefix  # noqa: E402
from utils.runtime.errors import UserError, run_main  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--zoo", default="zoo/fashion_mnist", help="zoo folder (model_0.pt, model_1.pt, ...)")
    p.add_argument("--n", type=int, default=None, help="use model_0 .. model_{n-1} (default: all, in order)")
    p.add_argument("--frozen-blocks", type=int, default=15,
                   help="EfficientNet-Lite0 blocks identical in every ingredient: their outputs are computed "
                        "once (other archs: 0)")
    p.add_argument("--draws", type=int, default=300, help="random selection sets")
    p.add_argument("--seed", type=int, default=0, help="seed of the selection sets")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="also draw selection sets of these sizes (the held-out size as a curve: docs/ZOO.md, "
                        "\"The held-out size\"); each at most the pool of held-out and test images")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here (refused if it exists)")
    return p.parse_known_args(argv)


def zoo_paths(zoo, n):
    """The zoo's ingredients model_0 .. model_{n-1} (n=None: all), through the recipes' listing."""
    if not zoo.is_dir():
        raise UserError(f"--zoo {zoo}: no such folder (build one with scripts/build_zoo.sh)")
    if (len(available(zoo)) if n is None else n) < 2:
        raise UserError(f"--zoo {zoo}: need at least 2 ingredients ({ingredient_file('', 0).name}, "
                        f"{ingredient_file('', 1).name}, ...)")
    return ingredient_paths(zoo, 0, n)


def check_split(paths, split):
    """Refuse unless every ingredient's record (model_<i>.json, when there is one) names this split."""
    for path in paths:
        record = path.with_suffix(".json")
        if not record.is_file():
            continue
        try:
            data = json.loads(record.read_text()).get("data")
        except (OSError, ValueError, AttributeError) as err:
            raise UserError(f"{record}: not a readable ingredient record ({err})") from err
        # the test subset trains nothing: a zoo is measured against all its test images (--test-size 0)
        if data is not None and _without_test(data) != _without_test(split):
            raise UserError(f"{record} was trained with the split {data}, these flags give {split}: pass the "
                            "zoo's own data flags (--finetune-size, --heldout-per-class, --test-size, ...)")


def _without_test(split):
    return {k: v for k, v in split.items() if k != "test_size"} if isinstance(split, dict) else split


class Soups:
    """Correct / wrong of every soup (a set of ingredients, averaged uniformly) on a fixed set of
    images, computed once per soup."""

    def __init__(self, model, tail, states, h, y, project):
        self.model, self.tail, self.states, self.h, self.y, self.project = model, tail, states, h, y, project
        self.done = {}

    @torch.no_grad()
    def correct(self, ids):
        ids = tuple(sorted(ids))
        if ids not in self.done:
            first = self.states[ids[0]]
            soup = {k: (sum(self.states[i][k].double() for i in ids) / len(ids)).to(v.dtype)
                    if v.is_floating_point() else v for k, v in first.items()}
            self.model.load_state_dict(soup)
            self.model.eval()
            logits = torch.cat([self.tail(b) for b in self.h.split(512)])
            pred = (self.project(logits) if self.project else logits).argmax(1)
            self.done[ids] = pred == self.y
        return self.done[ids]


def greedy(soups, n, select):
    """Greedy soup (greedy_soup.py's recipe, its own function) on the images `select`: (kept ingredients,
    soup accuracy - best ingredient's, uniform soup - best ingredient), in percentage points. A soup is
    the tuple of its ingredients' indices, evaluated once (`Soups`)."""
    def acc(ids):
        return 100.0 * soups.correct(ids)[select].double().mean().item()
    single = [acc([i]) for i in range(n)]
    ranking = sorted(((i, i, single[i]) for i in range(n)), key=lambda r: (-r[2], r[0]))
    _, kept, _ = greedy_soup.greedy(ranking, lambda i: (i,), acc, add=lambda ids, i, _: ids + i, quiet=True)
    best = single[ranking[0][0]]
    return kept, acc(kept) - best, acc(range(n)) - best


def draw_sets(soups, n, pool, size, draws, seed):
    """Greedy soup on `draws` random selection sets of `size` of the `pool` images."""
    rng = random.Random(seed)
    kept_counts, gains, gaps = {}, [], []
    for _ in tqdm(range(draws), desc=f"selection sets of {size}", leave=False):
        kept, gain, gap = greedy(soups, n, torch.tensor(rng.sample(range(pool), size)))
        kept_counts[len(kept)] = kept_counts.get(len(kept), 0) + 1
        gains.append(gain)
        gaps.append(gap)
    share = {k: kept_counts[k] / draws for k in sorted(kept_counts)}
    return {"size": size, "draws_kept_share": share,
            "draws_p_kept_3_or_more": sum(v for k, v in share.items() if k >= 3),
            "draws_mean_gain": sum(gains) / len(gains),
            "draws_mean_uniform_minus_best": sum(gaps) / len(gaps)}


def main(argv=None):
    args, data_flags = parse_args(argv)
    if args.draws < 1:
        raise UserError(f"--draws must be >= 1, got {args.draws}")
    if args.out and Path(args.out).exists():
        raise UserError(f"--out {args.out} exists: refusing to overwrite it")
    if args.out:  # never on an ingredient (named as one in --zoo), and writable there, before the work
        check_outputs([Role("--out", "the numbers file (--out)", Path(args.out))], args.zoo)
    zoo = Path(args.zoo)
    paths = zoo_paths(zoo, args.n)
    defaults = sweep.default_flags(data_flags, sweep.is_effnet(data_flags, finetune))
    ft = finetune.parse_args(["--out-dir", str(zoo), *defaults, *data_flags,
                              "--frozen-blocks", str(args.frozen_blocks)])
    spec = get_arch(ft.arch)
    _, bundle = finetune.load_bundle(ft, spec)
    check_split(paths, bundle.split)
    model = spec.build(bundle.num_classes, pretrained=False)
    reference = model.state_dict()
    states = [load_checked(p, reference) for p in paths]
    model.load_state_dict(states[0])
    model.eval()
    split = finetune.frozen_split(model, spec, ft.frozen_blocks)
    tail = model if split is None else split.tail
    # the frozen part runs once per data set, through the recipes' prefix outputs (checked against the
    # prefix tensors, kept on disk as the recipes' --prefix-cache default)
    prefix.configure(prefix.default_folder())
    cpu = torch.device("cpu")
    h_held, y_held = finetune.frozen_activations(model, split, bundle.heldout, cpu, "held-out")
    h_test, y_test = finetune.frozen_activations(model, split, bundle.test.dataset, cpu, "test")
    soups = Soups(model, tail, states, torch.cat([h_held, h_test]), torch.cat([y_held, y_test]),
                  bundle.test.project)
    n, size, pool = len(paths), len(y_held), len(y_held) + len(y_test)
    real = greedy(soups, n, torch.arange(size))
    sizes = args.sizes or [size]
    bad = [s for s in sizes if not 1 <= s <= pool]
    if bad:
        raise UserError(f"--sizes {bad[0]}: need 1 .. {pool} (the held-out and test images)")
    curve = [draw_sets(soups, n, pool, s, args.draws, args.seed) for s in sizes]
    record = {"zoo": str(zoo), "ingredients": n, "selection_size": size, "pool": pool, "draws": args.draws,
              "seed": args.seed,
              "heldout": {"kept": real[0], "gain": real[1], "uniform_minus_best": real[2]},
              **{k: v for k, v in curve[0].items() if k != "size"}}
    if args.sizes:
        record["sizes"] = curve
    print(f"{zoo}: {n} ingredients, held-out split of {size} images")
    print(f"  real held-out: greedy keeps {len(real[0])} {real[0]}, {real[1]:+.2f} over the best ingredient; "
          f"uniform {real[2]:+.2f}")
    for c in curve:
        print(f"  {args.draws} selection sets of {c['size']} drawn from the {pool} held-out and test images: "
              "greedy keeps " + ", ".join(f"{k}: {v:.0%}" for k, v in c["draws_kept_share"].items())
              + f"; 3 or more: {c['draws_p_kept_3_or_more']:.0%}; mean gain {c['draws_mean_gain']:+.2f}, "
              f"mean uniform {c['draws_mean_uniform_minus_best']:+.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return record


if __name__ == "__main__":
    run_main(main)
