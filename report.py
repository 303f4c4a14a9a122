"""The paper's tables and figures, generated from results files only (nothing is recomputed).

    python report.py --results-db runs/demo/results.jsonl --out docs/results

Writes into --out: report.md (the main table shaped like the paper's, the elimination table),
ingredients.png (test accuracy of greedy soup and MEHL-Soup+ when souping only the first n
ingredients), scatter.png (in- vs out-of-distribution accuracy of ingredients and soups) and
coefficients.png (MEHL-Soup+'s coefficients, blocks x ingredients). Prints the main table last.
"""
import argparse
import json
import logging
from pathlib import Path

from utils.files import results
from utils.files.soup_io import sidecar
from utils.runtime.errors import UserError, run_main

log = logging.getLogger("report")

# Display order and names of the methods (as written by the soup scripts in their results lines).
METHODS = [("uniform", "uniform soup"), ("greedy", "greedy soup"), ("Learned-Soup", "Learned-Soup"),
           ("Learned-Soup+", "Learned-Soup+"), ("MEHL-Soup", "MEHL-Soup"), ("MEHL-Soup+", "MEHL-Soup+")]
MISSING = "missing"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--results-db", nargs="+", default=["runs/results.jsonl"],
                   help="one or more JSON-lines results files")
    p.add_argument("--out", default="runs/report", help="folder for report.md and the PNG figures")
    p.add_argument("--dataset", default=None, help="only lines of this dataset (default: all)")
    p.add_argument("--arch", default=None, help="only lines of this architecture (default: all)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ selecting lines
def load(paths, dataset=None, arch=None):
    lines = []
    for path in paths:
        if not Path(path).exists():
            raise UserError(f"--results-db {path}: no such file")
        lines += results.read(path)
    return [r for r in lines if (dataset is None or r.get("dataset") == dataset)
            and (arch is None or r.get("arch") == arch)]


def excluded(r):
    return (r.get("args") or {}).get("exclude_top", 0) or 0


def individuals(lines):
    """The latest line of each ingredient evaluated alone, by ingredient index."""
    out = {}
    for r in lines:
        if r.get("method") == "individual":
            out[r["index"] if "index" in r else r["ingredients"][0]] = r
    return out


def method_key(name):
    """Method names compare without case and without a trailing " soup" ("uniform" = "Uniform soup")."""
    key = (name or "").lower().strip()
    return key[:-5] if key.endswith(" soup") else key


def range_size(r):
    """How many ingredients the run was given (its range, before --exclude-top); greedy's
    "ingredients" are only the kept ones."""
    return len(r.get("range_fingerprints") or r.get("ingredients") or [])


def latest(lines, method, n=None, exclude=0):
    """The latest line of `method` with `exclude` top ingredients removed, over a range of exactly n
    ingredients when n is given, else over the largest range run."""
    want = method_key(method)
    hits = [r for r in lines if method_key(r.get("method")) == want and excluded(r) == exclude]
    if not hits:
        return None
    n = max(range_size(r) for r in hits) if n is None else n
    hits = [r for r in hits if range_size(r) == n]
    return hits[-1] if hits else None


# ------------------------------------------------------------------------------------- tables
def fmt(v, digits=2):
    return MISSING if v is None else f"{v:.{digits}f}"


def seed_of(r):
    return (r.get("args") or {}).get("randomseed")


def per_seed(lines, method, exclude=0):
    """The latest line of each --randomseed of `method`, over the range `latest` picks (lines that
    differ only in their seed: run other settings into another results file)."""
    r = latest(lines, method, exclude=exclude)
    if r is None:
        return []
    want, n = method_key(method), range_size(r)
    by_seed = {}
    for x in lines:
        if method_key(x.get("method")) == want and excluded(x) == exclude and range_size(x) == n:
            by_seed[seed_of(x)] = x
    return list(by_seed.values())


def mean_sd(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
    return mean, sd


def aggregate(rs):
    """One row for several seeds: the mean of every accuracy, time and memory, with "spread" holding
    the sample standard deviation of the accuracies and "seeds" the seeds."""
    out = dict(rs[-1])
    spread = {}
    for key in ("heldout", "test", "shift_mean", "seconds", "peak_memory_bytes"):
        out[key], spread[key] = mean_sd([r.get(key) for r in rs])
    shifts = {}
    for name in (rs[-1].get("shifts") or {}):
        shifts[name], spread[name] = mean_sd([(r.get("shifts") or {}).get(name) for r in rs])
    out["shifts"], out["spread"], out["seeds"] = shifts, spread, sorted(seed_of(r) for r in rs)
    return out


def main_table(lines):
    """Rows (name, line) in the paper's order: best individual (by held-out) first. A method run with
    several --randomseed values is one row: mean and spread over its seeds."""
    rows = []
    ind = individuals(lines)
    if ind:
        index, best = max(ind.items(), key=lambda kv: (kv[1].get("heldout") or -1, -kv[0]))
        rows.append((f"best individual (#{index})", best))
    for method, name in METHODS:
        rs = per_seed(lines, method)
        if len(rs) > 1:
            rows.append((f"{name} (mean ± sd of {len(rs)} seeds)", aggregate(rs)))
        elif rs:
            rows.append((name, rs[0]))
    return rows


def shift_names(lines):
    names = []
    for r in lines:
        for s in (r.get("shifts") or {}):
            if s not in names:
                names.append(s)
    return names


def render_main(rows, shifts):
    head = ["method", "held-out", "test", "shift mean", *shifts, "time (s)", "peak mem (GB)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows:
        s = r.get("shifts") or {}
        mem = r.get("peak_memory_bytes")
        secs = r.get("seconds") if r.get("method") != "individual" else None
        spread = r.get("spread") or {}

        def acc(key, value):
            return fmt(value) + (f" ± {spread[key]:.2f}" if value is not None and spread.get(key) is not None
                                 else "")
        cells = [name, acc("heldout", r.get("heldout")), acc("test", r.get("test")),
                 acc("shift_mean", r.get("shift_mean")), *[acc(k, s.get(k)) for k in shifts],
                 "-" if secs is None else f"{secs:.0f}",
                 "-" if mem is None or r.get("method") == "individual" else f"{mem / 1e9:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def zoo_shape(lines):
    """How the zoo soups, on held-out (what greedy soup and the learned soups see): the ingredients'
    min / median / max, the uniform soup against the best ingredient, and what greedy soup kept.
    Empty when the individual, uniform or greedy lines are missing."""
    ind = individuals(lines)
    uniform, greedy = latest(lines, "uniform"), latest(lines, "greedy")
    if not ind or uniform is None or greedy is None or uniform.get("heldout") is None:
        return ""
    acc = sorted(r["heldout"] for r in ind.values() if r.get("heldout") is not None)
    best = acc[-1]
    kept = greedy.get("ingredients") or []
    return (f"{len(acc)} ingredients, held-out min / median / max {acc[0]:.2f} / {acc[len(acc) // 2]:.2f}"
            f" / {best:.2f}. Uniform soup {uniform['heldout']:.2f}, {best - uniform['heldout']:.2f} below the"
            f" best ingredient. Greedy soup keeps {len(kept)} ({', '.join(f'#{i}' for i in kept)}): "
            f"{greedy['heldout']:.2f}, {greedy['heldout'] - best:+.2f} over the best ingredient.")


def elimination(lines):
    """test accuracy of greedy and MEHL-Soup+ after removing the top-k ingredients, k as run."""
    ks = sorted({excluded(r) for r in lines if method_key(r.get("method")) in
                 (method_key("greedy"), method_key("MEHL-Soup+"))})
    if not ks:
        return None
    head = ["removed"] + ["none" if k == 0 else f"top-{k}" for k in ks]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, name in (("greedy", "greedy soup"), ("MEHL-Soup+", "MEHL-Soup+")):
        runs = {k: latest(lines, method, exclude=k) for k in ks}
        # several seeds of the whole range: the one the runs with ingredients removed used, so that the
        # row compares one seed (the latest line otherwise)
        seeds = {seed_of(r) for k, r in runs.items() if k and r is not None}
        if 0 in runs and len(seeds) == 1:
            same = [r for r in per_seed(lines, method) if seed_of(r) in seeds]
            runs[0] = same[0] if same else runs[0]
            if same and seed_of(same[0]) is not None:
                name = f"{name} (seed {seed_of(same[0])})"
        cells = [fmt((runs[k] or {}).get("test")) for k in ks]
        out.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(out)


def distance_rows(lines):
    """(name, line) of every soup in the main table, one per seed, whose file is on disk."""
    out = []
    for method, name in METHODS:
        for r in per_seed(lines, method):
            if r.get("soup_file") and Path(r["soup_file"]).is_file():
                seed = seed_of(r) if method_key(method).startswith("mehl") else None
                out.append((name if seed is None else f"{name} seed {seed}", r))
    return out


def distances(lines, csv_path):
    """How far each soup went (utils.soup.distance): a markdown table, and every block in `csv_path`.
    None when no soup file is on disk."""
    from utils.soup.distance import from_recipe, summarise
    from utils.files.state_dicts import load_state_dict
    loaded = {}

    def load(path):  # the ingredients are shared by every soup: read once
        if path not in loaded:
            loaded[path] = load_state_dict(path)
        return loaded[path]

    table = ["| soup | blocks | median | 90th pct | max | coefficients min .. max |", "|---|---|---|---|---|---|"]
    csv = ["soup,block,tensors,first_tensor,ratio,alpha_min,alpha_max"]
    for name, r in distance_rows(lines):
        got = from_recipe(r["soup_file"], load)
        if got is None:
            continue
        blocks, ratios, alpha = got
        summary = summarise(ratios, alpha)
        if summary is None:
            continue
        coef = (f"{summary['alpha_min']:.3g} .. {summary['alpha_max']:.3g}" if "alpha_min" in summary
                else "-")
        table.append(f"| {name} | {summary['blocks']} | {summary['ratio_median']:.2f} | "
                     f"{summary['ratio_p90']:.2f} | {summary['ratio_max']:.2f} | {coef} |")
        for b, (names, ratio) in enumerate(zip(blocks, ratios)):
            row = alpha[b] if alpha is not None and isinstance(alpha[0], list) else alpha
            lo, hi = (min(row), max(row)) if isinstance(row, list) else ("", "")
            csv.append(f"{name},{b},{len(names)},{names[0]},{ratio:.6g},{lo},{hi}")
    if len(table) == 2:
        return None
    Path(csv_path).write_text("\n".join(csv) + "\n")
    return "\n".join(table)


# ------------------------------------------------------------------------------------ figures
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure_ingredients(lines, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    drawn = False
    for method, style in (("greedy", "o-"), ("MEHL-Soup+", "s-")):
        pts = {}
        for r in lines:
            if method_key(r.get("method")) == method_key(method) and not excluded(r):
                pts[range_size(r)] = r.get("test")
        pts = sorted((n, v) for n, v in pts.items() if v is not None)
        if pts:
            ax.plot(*zip(*pts), style, label=method)
            drawn = True
    ind = individuals(lines)
    if ind:
        order = sorted(ind)
        best = [max(ind[i]["test"] for i in order[:n]) for n in range(1, len(order) + 1)]
        ax.plot(range(1, len(order) + 1), best, ":", color="grey", label="best individual so far")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("number of ingredients souped (the first n)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figure_scatter(lines, rows, path):
    plt = _plt()
    ind = [r for r in individuals(lines).values() if r.get("shift_mean") is not None]
    if not ind:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([r["test"] for r in ind], [r["shift_mean"] for r in ind], c="grey", s=18,
               label="ingredients")
    for name, r in rows:
        if r.get("method") != "individual" and r.get("shift_mean") is not None:
            ax.scatter([r["test"]], [r["shift_mean"]], s=60, marker="*", label=name)
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel("mean accuracy over shifts (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def coefficients_of(r):
    """alpha (blocks x ingredients) of a learned soup's line: inline, or in the sidecar beside its soup
    (MEHL's `.alpha.json` holds the matrix; Learned-Soup's `.coefficients.json` one entry per block
    with alpha by ingredient index)."""
    if r is None:
        return None
    if r.get("alpha") is not None:
        return r["alpha"]
    soup = r.get("soup_file")
    for kind in ("alpha", "coefficients"):
        f = sidecar(soup, kind) if soup else None
        if f and f.is_file():
            doc = json.loads(f.read_text())
            if "alpha" in doc:
                return doc["alpha"]
            return [[b["alpha"][str(i)] for i in doc["ingredients"]] for b in doc.get("blocks", [])] or None
    return None


def figure_coefficients(lines, path):
    import numpy as np
    r = latest(lines, "MEHL-Soup+")
    alpha = coefficients_of(r)
    if alpha is None:
        return None
    alpha = np.asarray(alpha, dtype=float)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    # A few blocks where the ingredients hardly differ get very large coefficients (unit directions
    # over tiny differences): the colour scale stops at the 95th percentile so the rest stays visible.
    lim = float(np.percentile(np.abs(alpha), 95)) or 1.0
    im = ax.imshow(alpha, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xlabel("ingredient")
    ax.set_ylabel("block (parameter tensor)")
    ax.set_xticks(range(alpha.shape[1]), r.get("ingredients", list(range(alpha.shape[1]))), fontsize=6)
    ax.set_title(f"MEHL-Soup+ coefficients ({(alpha < 0).mean() * 100:.0f}% negative; "
                 f"colours clipped at ±{lim:.2g}, range {alpha.min():.3g}..{alpha.max():.3g})", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    lines = load(args.results_db, args.dataset, args.arch)
    if not lines:
        raise UserError("no results lines to report on")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = main_table(lines)
    shifts = shift_names([r for _, r in rows])
    table = render_main(rows, shifts)
    parts = ["# Results", "", "Main table (accuracies in percent; time and peak memory of each soup run).", "",
             table, ""]
    missing = sorted({m for _, r in rows for m in (r.get("missing_shifts") or [])})
    if missing:
        parts += [f"Shift sets missing on disk (shown as '{MISSING}'): {', '.join(missing)}.", ""]
    shape = zoo_shape(lines)
    if shape:
        parts += ["## How the zoo soups (held-out)", "", shape, ""]
    far = distances(lines, out / "distances.csv")
    if far:
        parts += ["## How far each soup went from its ingredients", "",
                  "Per block of coefficients: the distance of the soup from the ingredients' mean divided by "
                  "the ingredients' mean distance from it (0 = the uniform soup, about 1 = as far out as a "
                  "typical ingredient); median, 90th percentile and max over blocks, and the range of the "
                  "coefficients. Every block: distances.csv.", "", far, ""]
    elim = elimination(lines)
    if elim:
        parts += ["## Removing the top-k ingredients (test accuracy)", "", elim, ""]
    for name, fn in (("ingredients.png", lambda p: figure_ingredients(lines, p)),
                     ("scatter.png", lambda p: figure_scatter(lines, rows, p)),
                     ("coefficients.png", lambda p: figure_coefficients(lines, p))):
        if fn(out / name):
            parts += [f"![{name}]({name})", ""]
    (out / "report.md").write_text("\n".join(parts))
    print(f"wrote {out / 'report.md'}\n")
    print(table)
    return table


if __name__ == "__main__":
    run_main(main)
