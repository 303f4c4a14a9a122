"""The paper's tables and figures, from results files and, for one table, the soups on disk.

    python report.py --results-db runs/demo/results.jsonl --out docs/results

What it reads (it evaluates nothing, and writes nothing outside --out):
  - the results files (--results-db): every table and figure comes from their lines;
  - the recipe `<soup>.recipe.json` of every soup of the main table (each seed) whose file is on
    disk; for the coefficients figure, when the latest MEHL-Soup+ line holds no alpha, that soup's
    sidecar `<soup>.alpha.json` (or a Learned-Soup's `<soup>.coefficients.json`);
  - for the distance table only: those soups and the ingredients their recipes name, streamed. Per set
    of ingredients, two passes read them one at a time (their float64 mean, then each one's distance
    from it), so memory holds the mean, one ingredient and one soup whatever their number. Where the
    soups or their ingredients are not on disk, the distance table is left out.

A results file holding lines of several zoos (ingredients in another folder, another dataset or
architecture) is reported one section per zoo, each with its own tables, figures and distances;
--dataset, --arch and --model-location pick one zoo instead. A recipe, coefficients sidecar or results
line that cannot be used is a warning naming its file, and the rows that need it are left out.

Writes into --out: report.md (the main table shaped like the paper's, how the zoo soups, the distance
and the elimination tables), distances.csv (the distance of every block), ingredients.png (test
accuracy of greedy soup and MEHL-Soup+ when souping only the first n ingredients), scatter.png (in- vs
out-of-distribution accuracy of ingredients and soups) and coefficients.png (MEHL-Soup+'s coefficients,
blocks x ingredients); with several zoos, these files are prefixed zoo1-, zoo2-, ... Prints the main
table last.
"""
import argparse
import json
import logging
import os
import re
import tempfile
from pathlib import Path

from tqdm import tqdm

from utils.files import paths, results
from utils.files.soup_io import read_recipe, sidecar
from utils.files.state_dicts import atomic_write, load_state_dict
from utils.runtime.errors import UserError, run_main
from utils.soup import distance

log = logging.getLogger("report")

# Display order and names of the methods (as written by the soup scripts in their results lines).
METHODS = [("uniform", "uniform soup"), ("greedy", "greedy soup"), ("Learned-Soup", "Learned-Soup"),
           ("Learned-Soup+", "Learned-Soup+"), ("MEHL-Soup", "MEHL-Soup"), ("MEHL-Soup+", "MEHL-Soup+")]
MISSING = "missing"
OUTPUTS = ("report.md", "distances.csv", "ingredients.png", "scatter.png", "coefficients.png")
_OUTPUT_NAME = re.compile(r"^(zoo\d+-)?(distances\.csv|ingredients\.png|scatter\.png|coefficients\.png)$")


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the flags' help, and the description's lists kept as written."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Help)
    p.add_argument("--results-db", nargs="+", default=["runs/results.jsonl"],
                   help="one or more JSON-lines results files")
    p.add_argument("--out", default="runs/report", help="folder for report.md, distances.csv and the PNG figures")
    p.add_argument("--dataset", default=None, help="only lines of this dataset (None: every dataset)")
    p.add_argument("--arch", default=None, help="only lines of this architecture (None: every one)")
    p.add_argument("--model-location", default=None,
                   help="only the zoo whose ingredients are in this folder (None: every zoo in the results, "
                        "one section each)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ checking the paths
def check_inputs(paths):
    """Every results file exists, is a regular file and can be opened."""
    for path in paths:
        if not Path(path).exists():
            raise UserError(f"--results-db {path}: no such file")
        results.check_regular(path)
        try:
            open(path, "rb").close()
        except OSError as err:
            raise UserError(f"--results-db {path}: cannot be read ({err.strerror or err})") from err


def check_out(out, inputs):
    """The folder --out, made and tried with a temporary file before any work. A file, a path under a
    file, a folder that cannot be written, or an output name that is one of the results files
    (`inputs`) is a UserError."""
    out = Path(out)
    above = next((p for p in (out, *out.parents) if p.exists() or p.is_symlink()), None)
    if above is not None and not above.is_dir():
        what = "a file" if above.is_file() else "not a folder"
        where = "" if above == out else f" is under {above}, which"
        raise UserError(f"--out {out}{where} is {what}: give a folder for the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create the folder ({err.strerror or err})") from err
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=".report.", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise UserError(f"--out {out}: cannot write into the folder ({err.strerror or err})") from err
    for name in OUTPUTS:
        if (out / name).exists() and not (out / name).is_file():
            raise UserError(f"--out {out}: {out / name} is in the way (not a file): move it, or give "
                            "another folder")
    paths.check_writable([paths.Role("--out", f"the report's {name}", out / name) for name in OUTPUTS])
    written = {Path(os.path.realpath(out / name)) for name in OUTPUTS}  # realpath: a link loop raises nothing
    for path in inputs:
        path = Path(os.path.realpath(path))
        if path in written or (path.parent == Path(os.path.realpath(out)) and _OUTPUT_NAME.match(path.name)):
            raise UserError(f"--out {out}: the report would replace the results file {path}: give "
                            "another folder")
    return out


# ------------------------------------------------------------------------------ selecting lines
def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _list_of(v, kind):
    return isinstance(v, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)


def _optional(test):
    return lambda v: v is None or test(v)


# What the report reads of a results line ("a.b": field b of the dict a), and the type it needs there.
FIELDS = {"method": lambda v: isinstance(v, str),
          **{k: _optional(_number) for k in ("heldout", "test", "shift_mean", "seconds", "peak_memory_bytes")},
          "shifts": _optional(lambda v: isinstance(v, dict) and all(x is None or _number(x) for x in v.values())),
          "missing_shifts": _optional(lambda v: _list_of(v, str)),
          "ingredients": _optional(lambda v: _list_of(v, int)),
          "range_fingerprints": _optional(lambda v: isinstance(v, list)),
          "args": _optional(lambda v: isinstance(v, dict)),
          "args.exclude_top": _optional(lambda v: _list_of([v], int)),
          "args.randomseed": _optional(lambda v: _list_of([v], (int, str))),
          **{k: _optional(lambda v: isinstance(v, str))
             for k in ("dataset", "arch", "model_location", "path", "soup_file")}}


def unusable(r):
    """The first field of a results line that the report reads and that has the wrong type, or None."""
    wrong = next((k for k, ok in FIELDS.items() if not ok(_field(r, k))), None)
    if wrong or r["method"] != "individual":
        return wrong
    index = r["index"] if "index" in r else (r.get("ingredients") or [None])[0]
    checks = (("index", _list_of([index], int)), ("heldout", _number(r.get("heldout"))),
              ("test", _number(r.get("test"))))
    return next((k for k, ok in checks if not ok), None)


def load(paths, dataset=None, arch=None):
    """The usable lines of the results files, of `dataset` and `arch` when given. A line whose fields
    have the wrong type is left out, with one warning per file."""
    lines = []
    for path in paths:
        bad = []
        for r in results.read(path):
            field = unusable(r)
            if field:
                bad.append((r, field))
            else:
                lines.append(r)
        if bad:
            r, field = bad[0]
            log.warning("%s: %d results line(s) left out, a field the report reads has the wrong type "
                        "(the first: a %r line, %s = %.80r)", path, len(bad), r.get("method"), field,
                        _field(r, field))
    return [r for r in lines if (dataset is None or r.get("dataset") == dataset)
            and (arch is None or r.get("arch") == arch)]


def _field(r, name):
    for part in name.split("."):
        r = r.get(part) if isinstance(r, dict) else None
    return r


# ------------------------------------------------------------------------------------- zoos
def zoo_of(r):
    """(dataset, arch, folder of the ingredients) of a line: a soup's line records its --model-location,
    an ingredient's its file (the folder is its parent); the folder is None where neither is recorded."""
    folder = r.get("model_location") or (str(Path(r["path"]).parent) if r.get("path") else None)
    return r.get("dataset"), r.get("arch"), folder


def _holds(folder, path):
    """Whether `folder` holds `path` under its name, through a link (a zoo folder of links)."""
    try:
        return (Path(folder) / Path(path).name).resolve() == Path(path).resolve()
    except OSError:
        return False


def split_zoos(lines):
    """[(zoo, its lines)] in the order they first appear. An ingredient's line whose folder is no soup
    run's joins the soup run's zoo whose folder links to its file; a line that records no folder (an
    older line) joins the one zoo of its dataset and architecture when there is exactly one."""
    keys = [zoo_of(r) for r in lines]
    named = {k for k, r in zip(keys, lines) if r.get("model_location")}

    def linked(key, r):
        if key in named or key[2] is None:
            return key
        found = [z for z in named if z[:2] == key[:2] and _holds(z[2], r["path"])]
        return found[0] if len(found) == 1 else key
    keys = [linked(k, r) for k, r in zip(keys, lines)]
    located = list(dict.fromkeys(k for k in keys if k[2] is not None))

    def settle(key):
        same = [z for z in located if z[:2] == key[:2]] if key[2] is None else [key]
        return same[0] if len(same) == 1 else key
    zoos = {}
    for key, r in zip(keys, lines):
        zoos.setdefault(settle(key), []).append(r)
    return list(zoos.items())


def zoo_label(zoo):
    dataset, arch, folder = zoo
    return (f"{dataset or '(dataset not recorded)'}, {arch or '(architecture not recorded)'}, ingredients "
            f"in {folder or '(folder not recorded)'}")


def pick_zoo(zoos, model_location):
    """The zoos whose folder is `model_location` (every zoo when None)."""
    if model_location is None:
        return zoos
    want = str(Path(model_location).resolve())
    picked = [(z, lines) for z, lines in zoos if z[2] is not None and str(Path(z[2]).resolve()) == want]
    if not picked:
        raise UserError(f"--model-location {model_location}: no results lines of a zoo in that folder; the "
                        "results hold: " + "; ".join(zoo_label(z) for z, _ in zoos))
    return picked


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
    None when no soup has its file, its recipe and its ingredients on disk. The ingredients are
    streamed: soups that share their ingredients share the two passes over them."""
    soups, by_ingredients = [], {}
    for name, r in distance_rows(lines):
        recipe = soup_recipe(r["soup_file"], name)
        if recipe is not None:
            soups.append((name, r["soup_file"], recipe))
            by_ingredients.setdefault(tuple(i["path"] for i in recipe["ingredients"]), []).append(soups[-1])
    ratios = {}
    for paths, group in by_ingredients.items():
        ratios.update(measure(paths, group))
    table = ["| soup | blocks | median | 90th pct | max | coefficients min .. max |", "|---|---|---|---|---|---|"]
    csv = ["soup,block,tensors,first_tensor,ratio,alpha_min,alpha_max"]
    for name, _, recipe in soups:
        blocks, alpha = recipe["coefficients"]["blocks"], recipe["coefficients"]["alpha"]
        summary = distance.summarise(ratios[name], alpha) if name in ratios else None
        if summary is None:
            continue
        table.append(f"| {name} | {summary['blocks']} | {summary['ratio_median']:.2f} | "
                     f"{summary['ratio_p90']:.2f} | {summary['ratio_max']:.2f} | "
                     f"{summary['alpha_min']:.3g} .. {summary['alpha_max']:.3g} |")
        for b, (names, ratio) in enumerate(zip(blocks, ratios[name])):
            csv.append(f"{name},{b},{len(names)},{names[0]},{ratio:.6g},{min(alpha[b])},{max(alpha[b])}")
    if len(table) == 2:
        return None
    write_text(csv_path, "\n".join(csv) + "\n")
    return "\n".join(table)


def soup_recipe(soup_file, name):
    """The recipe of a learned soup whose ingredients are on disk, else None: a soup without a recipe or
    without coefficients (uniform, greedy) silently, a recipe that cannot be used or a missing
    ingredient with a warning."""
    recipe_file = sidecar(soup_file, "recipe")
    if not recipe_file.is_file():
        return None
    try:
        recipe = read_recipe(recipe_file)
    except UserError as err:
        log.warning("%s; the distance row of %s is left out", err, name)
        return None
    if recipe.get("coefficients") is None:
        return None
    gone = [i["path"] for i in recipe["ingredients"] if not Path(i["path"]).is_file()]
    if gone:
        log.warning("%s: %d ingredient(s) of %s are not on disk (the first: %s); its distance row is left "
                    "out", recipe_file, len(gone), name, gone[0])
        return None
    return recipe


def measure(paths, group):
    """{soup name: ratio per block} of the soups `group` [(name, soup file, recipe)], which share the
    ingredients `paths`: each soup checked against its recipe, two passes over the ingredients one at a
    time, then one soup at a time. A file that cannot be used is a warning, and the soups that need it
    are left out."""
    shapes = {}  # tensor name -> (shape, the first file that had it): every other file must match
    usable = []
    for name, soup_file, recipe in group:  # a soup that does not fit its recipe is left out alone
        try:
            pick(load_state_dict(soup_file), block_names(recipe), shapes, soup_file)
            usable.append((name, soup_file, recipe))
        except UserError as err:
            log.warning("%s (its recipe: %s); the distance row of %s is left out", err,
                        sidecar(soup_file, "recipe"), name)
    if not usable:
        return {}
    names = list(dict.fromkeys(n for _, _, recipe in usable for n in block_names(recipe)))
    soups = ", ".join(name for name, _, _ in usable)
    try:
        mean = distance.mean_of(stream(paths, names, shapes, f"distances of {soups}: mean"), names)
        spread = []
        for sd in stream(paths, names, shapes, f"distances of {soups}: each from the mean"):
            spread.append(distance.squared_distances(sd, mean))
            del sd  # else it is still held while the next one is read
    except UserError as err:
        log.warning("%s; the distance rows of %s are left out", err, soups)
        return {}
    out = {}
    for name, soup_file, recipe in usable:
        own = block_names(recipe)
        far = distance.squared_distances(pick(load_state_dict(soup_file), own, shapes, soup_file),
                                         {n: mean[n] for n in own})
        out[name] = distance.block_ratios(far, spread, recipe["coefficients"]["blocks"])
    return out


def block_names(recipe):
    return list(dict.fromkeys(n for block in recipe["coefficients"]["blocks"] for n in block))


def stream(paths, names, shapes, desc):
    """The tensors `names` of each ingredient, read one at a time (nothing is held between two)."""
    for path in tqdm(paths, desc=desc, leave=False):
        yield pick(load_state_dict(path), names, shapes, path)


def pick(sd, names, shapes, path):
    """The tensors `names` of the state dict `sd` read from `path`, each checked to be there and to have
    the shape of the first file checked (`shapes` records it)."""
    for n in names:
        if n not in sd:
            raise UserError(f"{path}: holds no tensor {n}, which the soup's recipe names in a block")
        shape = tuple(sd[n].shape)
        first, where = shapes.setdefault(n, (shape, path))
        if first != shape:
            raise UserError(f"{path}: tensor {n} has shape {shape}, in {where} {first}")
    return {n: sd[n] for n in names}


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), overwrite=True)


def save_figure(fig, path):
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), overwrite=True)


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
    save_figure(fig, path)
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
        if r.get("method") != "individual" and r.get("shift_mean") is not None and r.get("test") is not None:
            ax.scatter([r["test"]], [r["shift_mean"]], s=60, marker="*", label=name)
    ax.set_xlabel("test accuracy (%)")
    ax.set_ylabel("mean accuracy over shifts (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def coefficients_of(r):
    """alpha (blocks x ingredients) of a learned soup's line: inline, or in the sidecar beside its soup
    (MEHL's `.alpha.json` holds the matrix; Learned-Soup's `.coefficients.json` one entry per block
    with alpha by ingredient index). None, with a warning naming the line or the file, when it is not a
    matrix of numbers."""
    if r is None:
        return None
    if r.get("alpha") is not None:
        alpha = as_matrix(r["alpha"])
        if alpha is None:
            log.warning("the %s line of %s holds an alpha that is not a matrix of numbers: its coefficients "
                        "figure is left out", r.get("method"), r.get("soup_file") or "no soup file")
        return alpha
    soup = r.get("soup_file")
    for kind in ("alpha", "coefficients"):
        f = sidecar(soup, kind) if soup else None
        if f and f.is_file():
            try:
                return read_coefficients(f)
            except (OSError, UnicodeDecodeError, ValueError, RecursionError, LookupError, TypeError,
                    AttributeError) as err:
                log.warning("%s: not a usable coefficients file (%s: %s); the coefficients figure of %s is "
                            "left out", f, type(err).__name__, err, soup)
                return None
    return None


def read_coefficients(path):
    """The alpha matrix of a `.alpha.json` or `.coefficients.json` sidecar (None when it has no blocks);
    a ValueError, KeyError or TypeError when the file is not one."""
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"a JSON {type(doc).__name__}, not an object")
    if "alpha" in doc:
        rows = doc["alpha"]
    else:
        rows = [[b["alpha"][str(i)] for i in doc["ingredients"]] for b in doc["blocks"]]
    if not rows:
        return None
    alpha = as_matrix(rows)
    if alpha is None:
        raise ValueError("its alpha is not a matrix of numbers")
    return alpha


def as_matrix(alpha):
    """`alpha` as rows of numbers of one length (a single row given flat: one block), else None."""
    if _list_of(alpha, (int, float)) and alpha:
        alpha = [alpha]
    if not (isinstance(alpha, list) and alpha and all(_list_of(row, (int, float)) and row for row in alpha)
            and len({len(row) for row in alpha}) == 1):
        return None
    return alpha


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
    labels = r.get("ingredients") or []
    ax.set_xticks(range(alpha.shape[1]), labels if len(labels) == alpha.shape[1] else range(alpha.shape[1]),
                  fontsize=6)
    ax.set_title(f"MEHL-Soup+ coefficients ({(alpha < 0).mean() * 100:.0f}% negative; "
                 f"colours clipped at ±{lim:.2g}, range {alpha.min():.3g}..{alpha.max():.3g})", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def report_zoo(lines, out, prefix="", h="##"):
    """The markdown parts of one zoo's report (its distances and figures written into `out`, named
    `prefix` + name; `h` the level of its headings) and its main table."""
    rows = main_table(lines)
    shifts = shift_names([r for _, r in rows])
    table = render_main(rows, shifts)
    parts = ["Main table (accuracies in percent; time and peak memory of each soup run).", "", table, ""]
    missing = sorted({m for _, r in rows for m in (r.get("missing_shifts") or [])})
    if missing:
        parts += [f"Shift sets missing on disk (shown as '{MISSING}'): {', '.join(missing)}.", ""]
    shape = zoo_shape(lines)
    if shape:
        parts += [f"{h} How the zoo soups (held-out)", "", shape, ""]
    far = distances(lines, out / f"{prefix}distances.csv")
    if far:
        parts += [f"{h} How far each soup went from its ingredients", "",
                  "Per block of coefficients: the distance of the soup from the ingredients' mean divided by "
                  "the ingredients' mean distance from it (0 = the uniform soup, about 1 = as far out as a "
                  "typical ingredient); median, 90th percentile and max over blocks, and the range of the "
                  f"coefficients. Every block: {prefix}distances.csv.", "", far, ""]
    elim = elimination(lines)
    if elim:
        parts += [f"{h} Removing the top-k ingredients (test accuracy)", "", elim, ""]
    for name, fn in (("ingredients.png", lambda p: figure_ingredients(lines, p)),
                     ("scatter.png", lambda p: figure_scatter(lines, rows, p)),
                     ("coefficients.png", lambda p: figure_coefficients(lines, p))):
        if fn(out / f"{prefix}{name}"):
            parts += [f"![{prefix}{name}]({prefix}{name})", ""]
    return parts, table


def main(argv=None):
    args = parse_args(argv)
    check_inputs(args.results_db)
    out = check_out(args.out, args.results_db)
    zoos = pick_zoo(split_zoos(load(args.results_db, args.dataset, args.arch)), args.model_location)
    if not zoos:
        raise UserError("no results lines to report on")
    parts = ["# Results", ""]
    if len(zoos) == 1:
        more, printed = report_zoo(zoos[0][1], out)
        parts += more
    else:
        labels = [f"{k}. {zoo_label(z)}" for k, (z, _) in enumerate(zoos, 1)]
        log.warning("the results hold lines of %d zoos, reported one section each (--dataset, --arch or "
                    "--model-location picks one): %s", len(zoos), "; ".join(labels))
        parts += [f"The results hold lines of {len(zoos)} zoos, reported one section each (--dataset, --arch or "
                  "--model-location picks one):", "", *labels, ""]
        tables = []
        for k, (zoo, lines) in enumerate(zoos, 1):
            more, table = report_zoo(lines, out, f"zoo{k}-", "###")
            parts += [f"## Zoo {k}: {zoo_label(zoo)}", "", *more]
            tables.append(f"zoo {k}: {zoo_label(zoo)}\n\n{table}")
        printed = "\n\n".join(tables)
    write_text(out / "report.md", "\n".join(parts))
    print(f"wrote {out / 'report.md'}\n")
    print(printed)
    return printed


if __name__ == "__main__":
    run_main(main)
