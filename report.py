"""The paper's tables and figures, from results files and, for one table, the soups on disk.

    python report.py --results-db runs/demo/results.jsonl --out docs/results

What it reads (it evaluates nothing, and writes nothing outside --out):
  - the results files (--results-db): every table and figure comes from their lines;
  - the recipe `<soup>.recipe.json` of every soup of the main table (each seed) whose file is on
    disk; for the coefficients figure, when the latest MEHL-Soup+ line holds no alpha, that soup's
    `<soup>.coefficients.json` (or an earlier version's `<soup>.alpha.json`);
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

from utils.files import paths, predictions, results
from utils.files.soup_io import read_recipe, sidecar
from utils.files.state_dicts import atomic_write, load_state_dict
from utils.runtime.errors import UserError, run_main
from utils.soup import distance, stats

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


# The fields of a results line the report keeps (of "args": exclude_top and randomseed). The rest
# (a long "args", a learned soup's inline "alpha") is dropped as the file streams by: memory grows with
# the number of lines, not with what each holds. An inline alpha is read again when a figure needs it.
KEPT = ("method", "heldout", "test", "shift_mean", "shifts", "missing_shifts", "ingredients", "range_fingerprints",
        "dataset", "arch", "model_location", "path", "soup_file", "seconds", "peak_memory_bytes", "index")


def trim(r, path, offset):
    """The fields of line `r` (at `offset` of the results file `path`) that the report reads."""
    out = {k: r[k] for k in KEPT if k in r}
    if isinstance(r.get("args"), dict):
        out["args"] = {k: r["args"][k] for k in ("exclude_top", "randomseed") if k in r["args"]}
    if "predictions" in r:
        try:
            predictions.check_field(r["predictions"])
            out["predictions"] = r["predictions"]
        except predictions.Unusable as why:
            out["predictions_unusable"] = str(why)
    out["source"] = (str(path), offset, r.get("alpha") is not None)
    return out


def load(paths, dataset=None, arch=None):
    """The usable lines of the results files (their `KEPT` fields), of `dataset` and `arch` when given,
    read one line at a time. A line whose fields have the wrong type is left out, with one warning per
    file."""
    lines = []
    for path in paths:
        bad, first = 0, None
        for offset, r in results.stream(path):
            field = unusable(r)
            if field:
                bad += 1
                first = first or (r.get("method"), field, repr(_field(r, field))[:80])
            elif (dataset is None or r.get("dataset") == dataset) and (arch is None or r.get("arch") == arch):
                lines.append(trim(r, path, offset))
        if bad:
            log.warning("%s: %d results line(s) left out, a field the report reads has the wrong type "
                        "(the first: a %r line, %s = %s)", path, bad, *first)
    return lines


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


def seed_order(seed):
    """Sort key of seeds as results lines record them: numbers, then strings, then none recorded
    (another tool's line may write "2" where this project writes 2)."""
    if isinstance(seed, int):
        return 0, seed, ""
    return (1, 0, seed) if isinstance(seed, str) else (2, 0, "")


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
    out["seed_lines"] = rs
    out["shifts"], out["spread"], out["seeds"] = shifts, spread, sorted((seed_of(r) for r in rs), key=seed_order)
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


def render_main(rows, shifts, bold=frozenset()):
    """The main table; the accuracies in `bold` ({(row number, column key)}: `marks`) in bold."""
    head = ["method", "held-out", "test", "shift mean", *shifts, "time (s)", "peak mem (GB)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (name, r) in enumerate(rows):
        s = r.get("shifts") or {}
        mem = r.get("peak_memory_bytes")
        secs = r.get("seconds") if r.get("method") != "individual" else None
        spread = r.get("spread") or {}

        def acc(key, value):
            text = fmt(value) + (f" ± {spread[key]:.2f}" if value is not None and spread.get(key) is not None
                                 else "")
            return f"**{text}**" if (i, key) in bold else text
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


def elimination(lines, notes=None):
    """test accuracy of greedy and MEHL-Soup+ after removing the top-k ingredients, k as run, and
    MEHL-Soup+ against greedy soup at each k (exact McNemar, bootstrap interval)."""
    notes = {} if notes is None else notes
    ks = sorted({excluded(r) for r in lines if method_key(r.get("method")) in
                 (method_key("greedy"), method_key("MEHL-Soup+"))})
    if not ks:
        return None
    head = ["removed"] + ["none" if k == 0 else f"top-{k}" for k in ks]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pair = []
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
        pair.append(runs)
    if len(pair) == 2:
        cells = [fmt_cmp(paired(pair[1][k], pair[0][k], ["test"], notes))
                 if pair[0][k] is not None and pair[1][k] is not None else "-" for k in ks]
        out.append("| " + " | ".join(["MEHL-Soup+ - greedy soup", *cells]) + " |")
    return "\n".join(out)


# ------------------------------------------------------------------------------ paired statistics
ALPHA = 0.05   # significance level of every mark and of the claims table
_PREDICTIONS = {}   # (results file, predictions file, sha256) -> {set: rows} or None (unusable, warned)
NO_PREDICTIONS = "no predictions (a line written before they were kept)"


def predictions_of(r, notes):
    """{set name: (rows, 6) int16} of line `r`, or None. An unusable file is one warning (once per
    file) and one note in `notes` (the report says which comparisons were left out and why)."""
    if "predictions" not in r:
        why = r.get("predictions_unusable") or NO_PREDICTIONS
        notes.setdefault(why, set()).add(line_name(r))
        return None
    field = r["predictions"]
    key = (r["source"][0] if r.get("source") else "", field["file"], field["sha256"])
    if key not in _PREDICTIONS:
        try:
            _PREDICTIONS[key] = predictions.load(key[0], field)
        except predictions.Unusable as why:
            log.warning("predictions of a %s line of %s: %s; its paired comparisons are left out",
                        r.get("method"), key[0], why)
            _PREDICTIONS[key] = str(why)
    got = _PREDICTIONS[key]
    if isinstance(got, str):
        notes.setdefault(got, set()).add(line_name(r))
        return None
    return got


def line_name(r):
    if r.get("method") == "individual":
        return f"ingredient #{r['index'] if 'index' in r else (r.get('ingredients') or ['?'])[0]}"
    seed = seed_of(r)
    extra = f" top-{excluded(r)} removed" if excluded(r) else ""
    return f"{r.get('method')}{'' if seed is None else f' seed {seed}'}{extra}"


def correct(rows):
    return rows[:, 1] == rows[:, 0]


def paired(a, b, sets, notes):
    """(a - b in points, p, (low, high)) of lines a and b on `sets` (one set: exact McNemar and a
    bootstrap interval; several: their mean difference by a paired bootstrap within each set), or
    None when a line lacks predictions of a set or the two files hold other examples (noted)."""
    pa, pb = predictions_of(a, notes), predictions_of(b, notes)
    if pa is None or pb is None:
        return None
    pairs = []
    for name in sets:
        ra, rb = pa.get(name), pb.get(name)
        if ra is None or rb is None or not len(ra):
            return None
        if ra.shape != rb.shape or not (ra[:, 0] == rb[:, 0]).all():
            why = f"the predictions of {name} are of different examples (labels differ)"
            notes.setdefault(why, set()).add(f"{line_name(a)} / {line_name(b)}")
            return None
        pairs.append((correct(ra), correct(rb)))
    diff = sum(100.0 * (x.mean() - y.mean()) for x, y in pairs) / len(pairs)
    low, high, p = stats.bootstrap(pairs)
    if len(pairs) == 1:
        p = stats.mcnemar(*pairs[0])
    return float(diff), p, (low, high)


def shift_sets(r):
    return [f"shift/{k}" for k, v in (r.get("shifts") or {}).items() if v is not None]


def fmt_p(p):
    """'p=0.035', 'p<1e-4' (below the bootstrap's resolution, and McNemar's that small)."""
    return "p<1e-4" if p < 1e-4 else f"p={p:.2g}"


def fmt_cmp(c):
    if c is None:
        return "-"
    diff, p, (low, high) = c
    return f"{diff:+.2f} [{low:+.2f}, {high:+.2f}] {fmt_p(p)}"


def best_individual(lines):
    """(index, line) of the ingredient best on held-out (ties: the lower index), or None."""
    ind = individuals(lines)
    if not ind:
        return None
    return max(ind.items(), key=lambda kv: (kv[1].get("heldout") or -1, -kv[0]))


def representative(lines, method, exclude=0):
    """The line that stands for `method` in a paired test: seed 1 where it was run, else the first seed."""
    rs = per_seed(lines, method, exclude)
    return pick_seed(rs) if rs else None


def pick_seed(rs):
    ones = [r for r in rs if seed_of(r) == 1]
    return ones[0] if ones else sorted(rs, key=lambda r: seed_order(seed_of(r)))[0]


def soup_lines(lines):
    """[(name, line)] of every soup of the main table, each seed on its own."""
    out = []
    for method, name in METHODS:
        rs = per_seed(lines, method)
        for r in sorted(rs, key=lambda r: seed_order(seed_of(r))):
            out.append((name if len(rs) == 1 else f"{name} seed {seed_of(r)}", r))
    return out


def comparisons(lines, notes):
    """The paired tables: every soup against the best ingredient and against greedy soup, on test and
    on the shift mean, and against the best ingredient on each shift."""
    best = best_individual(lines)
    greedy = representative(lines, "greedy")
    soups = soup_lines(lines)
    if best is None or not soups:
        return None
    index, b = best
    shifts = [n for n in shift_sets(b)]
    head = ["soup", "test - best", "shift mean - best", "test - greedy", "shift mean - greedy"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in soups:
        vs_greedy = [None, None] if greedy is None or r is greedy else \
            [paired(r, greedy, ["test"], notes), paired(r, greedy, shifts, notes) if shifts else None]
        cells = [paired(r, b, ["test"], notes), paired(r, b, shifts, notes) if shifts else None, *vs_greedy]
        out.append("| " + " | ".join([name, *(fmt_cmp(c) for c in cells)]) + " |")
    per_shift = []
    if shifts:
        head = ["soup", *(s.split("/", 1)[1] for s in shifts)]
        per_shift = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in soups:
            cells = []
            for s in shifts:
                c = paired(r, b, [s], notes)
                cells.append("-" if c is None else f"{c[0]:+.2f} {fmt_p(c[1])}")
            per_shift.append("| " + " | ".join([name, *cells]) + " |")
    return index, "\n".join(out), "\n".join(per_shift)


def marks(rows, notes):
    """{(row number, column key)} of the accuracies to print bold: in each column (test, shift mean,
    each shift) the best and every one not significantly different from it (p > ALPHA), as
    google-research/modeljoust marks a table. A row of several seeds is tested by its `representative`."""
    reps = [pick_seed(r["seed_lines"]) if "seed_lines" in r else r for _, r in rows]
    bold = set()
    columns = [("test", lambda r: ["test"])] + [("shift_mean", shift_sets)] + \
        [(s, (lambda name: lambda r: [f"shift/{name}"])(s)) for s in shift_names([r for _, r in rows])]
    for key, sets_of in columns:
        def value(r):
            return r.get("shift_mean") if key == "shift_mean" else r.get("test") if key == "test" else \
                (r.get("shifts") or {}).get(key)
        scored = [(i, rep) for i, rep in enumerate(reps) if rep is not None and value(rep) is not None
                  and predictions_of(rep, notes) is not None]
        if not scored:
            continue
        top_i, top = max(scored, key=lambda t: value(t[1]))
        bold.add((top_i, key))
        for i, rep in scored:
            sets = sets_of(top)
            c = None if i == top_i or not sets else paired(rep, top, sets, notes)
            if c is not None and c[1] > ALPHA:
                bold.add((i, key))
    return bold


# The paper's claims, as paired tests: (claim, a, b, sign): the claim is that sign * (a - b) > 0.
CLAIMS = [("uniform soup < best ingredient", "uniform", "best", -1),
          ("greedy soup > best ingredient", "greedy", "best", 1),
          ("Learned-Soup+ > greedy soup", "Learned-Soup+", "greedy", 1),
          ("MEHL-Soup+ > Learned-Soup+", "MEHL-Soup+", "Learned-Soup+", 1),
          ("MEHL-Soup+ > greedy soup", "MEHL-Soup+", "greedy", 1)]
OUTCOMES = ("right", "n.s.", "wrong")


def outcome(c, sign):
    """'right' / 'n.s.' / 'wrong' of a claim that sign * (a - b) > 0, at p < ALPHA; None without a test."""
    if c is None:
        return None
    diff, p, _ = c
    if p >= ALPHA:
        return "n.s."
    return "right" if sign * diff > 0 else "wrong"


def claims(lines, notes):
    """[(claim, test comparison, test outcome, shift-mean comparison, its outcome)] of one zoo."""
    best = best_individual(lines)

    def line(name, exclude=0):
        return (best[1] if best else None) if name == "best" else representative(lines, name, exclude)
    out = []
    for claim, a_name, b_name, sign in CLAIMS:
        a, b = line(a_name), line(b_name)
        if a is None or b is None:
            continue
        t = paired(a, b, ["test"], notes)
        shifts = [s for s in shift_sets(a) if s in shift_sets(b)]
        m = paired(a, b, shifts, notes) if shifts else None
        out.append((claim, t, outcome(t, sign), m, outcome(m, sign)))
    for k in sorted({excluded(r) for r in lines if excluded(r)}):
        a, b = line("MEHL-Soup+", k), line("greedy", k)
        if a is None or b is None:
            continue
        t = paired(a, b, ["test"], notes)
        shifts = [s for s in shift_sets(a) if s in shift_sets(b)]
        m = paired(a, b, shifts, notes) if shifts else None
        out.append((f"MEHL-Soup+ > greedy soup, top-{k} removed", t, outcome(t, 1), m, outcome(m, 1)))
    return out


def render_claims(rows):
    out = ["| claim | test | outcome | shift mean | outcome |", "|---|---|---|---|---|"]
    for claim, t, to, m, mo in rows:
        out.append(f"| {claim} | {fmt_cmp(t)} | {to or '-'} | {fmt_cmp(m)} | {mo or '-'} |")
    return "\n".join(out)


def claims_counts(per_zoo):
    """The claims table over several zoo builds: per claim, on test and on the shift mean, how many
    builds put it significantly right, not significantly different, significantly wrong."""
    order, counts = [], {}
    for rows in per_zoo:
        for claim, _, to, _, mo in rows:
            if claim not in counts:
                order.append(claim)
                counts[claim] = {"test": dict.fromkeys(OUTCOMES, 0), "shift": dict.fromkeys(OUTCOMES, 0)}
            for col, o in (("test", to), ("shift", mo)):
                if o is not None:
                    counts[claim][col][o] += 1
    out = [f"| claim ({len(per_zoo)} zoo builds) | test: right / n.s. / wrong | "
           "shift mean: right / n.s. / wrong |", "|---|---|---|"]
    for claim in order:
        cells = [" / ".join(str(counts[claim][col][o]) for o in OUTCOMES) if any(counts[claim][col].values())
                 else "-" for col in ("test", "shift")]
        out.append(f"| {claim} | {cells[0]} | {cells[1]} |")
    return "\n".join(out)


def render_notes(notes):
    if not notes:
        return []
    out = ["Comparisons left out:", ""]
    for why, names in sorted(notes.items()):
        out.append(f"- {', '.join(sorted(names))}: {why}")
    return out + [""]


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


def test_interval(r, notes):
    """(low, high) bootstrap 95 % interval of a line's test accuracy, None without predictions."""
    preds = predictions_of(r, notes)
    if preds is None or preds.get("test") is None or not len(preds["test"]):
        return None
    return stats.accuracy_interval(correct(preds["test"]))


def errorbar(ax, pts, style, label):
    """Points (n, accuracy, interval or None) with their intervals as error bars."""
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    lo = [p[1] - p[2][0] if p[2] else 0.0 for p in pts]
    hi = [p[2][1] - p[1] if p[2] else 0.0 for p in pts]
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, capsize=3, label=label)


def figure_ingredients(lines, path, notes=None):
    """Test accuracy of greedy soup and MEHL-Soup+ over the first n ingredients, and of the ingredient
    that is best on held-out among the first n (what the table calls the best ingredient; not the best
    on test, which no method can pick), each with its 95 % bootstrap interval."""
    notes = {} if notes is None else notes
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    drawn = False
    for method, style in (("greedy", "o-"), ("MEHL-Soup+", "s-")):
        pts = {}
        for r in lines:
            if method_key(r.get("method")) == method_key(method) and not excluded(r) and r.get("test") is not None:
                pts[range_size(r)] = r
        if pts:
            errorbar(ax, [(n, r["test"], test_interval(r, notes)) for n, r in sorted(pts.items())], style, method)
            drawn = True
    ind = individuals(lines)
    if ind:
        order = sorted(ind)
        pts = []
        for n in range(1, len(order) + 1):
            pick = max(order[:n], key=lambda i: (ind[i].get("heldout") or -1, -i))
            pts.append((n, ind[pick]["test"], test_interval(ind[pick], notes)))
        errorbar(ax, pts, ":", "best ingredient on held-out so far")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("number of ingredients souped (the first n)")
    ax.set_ylabel("test accuracy (%), 95 % interval")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def figure_scatter(lines, rows, path, notes=None):
    notes = {} if notes is None else notes
    plt = _plt()
    ind = [r for r in individuals(lines).values() if r.get("shift_mean") is not None]
    if not ind:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([r["test"] for r in ind], [r["shift_mean"] for r in ind], c="grey", s=18,
               label="ingredients")
    for name, r in rows:
        if r.get("method") != "individual" and r.get("shift_mean") is not None and r.get("test") is not None:
            line = pick_seed(r["seed_lines"]) if "seed_lines" in r else r
            interval = test_interval(line, notes)
            xerr = None if interval is None else [[r["test"] - interval[0]], [interval[1] - r["test"]]]
            ax.errorbar([r["test"]], [r["shift_mean"]], xerr=xerr, fmt="*", markersize=9, capsize=3, label=name)
    ax.set_xlabel("test accuracy (%; soups: 95 % interval)")
    ax.set_ylabel("mean accuracy over shifts (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def coefficients_of(r):
    """alpha (blocks x ingredients) of a learned soup's line: inline, or in the coefficients file beside
    its soup (`soup_io.coefficients_file`), or in a file of an earlier version (MEHL's `.alpha.json`;
    `soup_io.OLD_SIDECARS`). None, with a warning naming the line or the file, when it is not a matrix
    of numbers."""
    if r is None:
        return None
    inline = r.get("alpha")
    if inline is None and r.get("source") and r["source"][2]:  # dropped when the file streamed by
        inline = (results.line_at(*r["source"][:2]) or {}).get("alpha")
    if inline is not None:
        alpha = as_matrix(inline)
        if alpha is None:
            log.warning("the %s line of %s holds an alpha that is not a matrix of numbers: its coefficients "
                        "figure is left out", r.get("method"), r.get("soup_file") or "no soup file")
        return alpha
    soup = r.get("soup_file")
    for kind in ("coefficients", "alpha"):
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
    """The alpha matrix of a coefficients file (None when it has no blocks): `alpha` as rows, in the
    file written now and in an earlier MEHL `.alpha.json`; in an earlier Learned-Soup
    `.coefficients.json`, one entry per block with alpha by ingredient index. A ValueError, KeyError or
    TypeError when the file is not one."""
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
    `prefix` + name; `h` the level of its headings), its main table and its claims rows."""
    notes = {}
    rows = main_table(lines)
    shifts = shift_names([r for _, r in rows])
    table = render_main(rows, shifts, marks(rows, notes))
    parts = ["Main table (accuracies in percent; time and peak memory of each soup run). Bold: in each column, "
             "the best and every accuracy not significantly different from it (exact McNemar p > 0.05; the "
             "shift mean: paired bootstrap over the six sets), as modeljoust marks a table; a row of several "
             "seeds is tested by its seed-1 soup.", "", table, ""]
    missing = sorted({m for _, r in rows for m in (r.get("missing_shifts") or [])})
    if missing:
        parts += [f"Shift sets missing on disk (shown as '{MISSING}'): {', '.join(missing)}.", ""]
    compared = comparisons(lines, notes)
    if compared:
        index, table_pairs, table_shifts = compared
        parts += [f"{h} Paired comparisons", "",
                  f"Each soup minus the best ingredient (#{index}, chosen on held-out) and minus greedy soup, in "
                  "percentage points, with the 95 % paired bootstrap interval (10,000 replicates, seed 0) and "
                  "the p-value: exact McNemar on test, paired bootstrap over the six shift sets (examples "
                  "resampled within each set) on the shift mean.", "", table_pairs, ""]
        if table_shifts:
            parts += [f"On each shift set, minus the best ingredient (exact McNemar):", "", table_shifts, ""]
    found = claims(lines, notes)
    if found:
        parts += [f"{h} The paper's claims, tested", "",
                  "right / wrong: significantly (p < 0.05) in the claimed / the opposite direction; n.s.: not "
                  "significantly different. MEHL-Soup+ is its seed-1 soup.", "", render_claims(found), ""]
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
    elim = elimination(lines, notes)
    if elim:
        parts += [f"{h} Removing the top-k ingredients (test accuracy)", "", elim, ""]
    for name, fn in (("ingredients.png", lambda p: figure_ingredients(lines, p, notes)),
                     ("scatter.png", lambda p: figure_scatter(lines, rows, p, notes)),
                     ("coefficients.png", lambda p: figure_coefficients(lines, p))):
        if fn(out / f"{prefix}{name}"):
            parts += [f"![{prefix}{name}]({prefix}{name})", ""]
    parts += render_notes(notes)
    return parts, table, found


def main(argv=None):
    args = parse_args(argv)
    check_inputs(args.results_db)
    out = check_out(args.out, args.results_db)
    zoos = pick_zoo(split_zoos(load(args.results_db, args.dataset, args.arch)), args.model_location)
    if not zoos:
        raise UserError("no results lines to report on")
    parts = ["# Results", ""]
    if len(zoos) == 1:
        more, printed, _ = report_zoo(zoos[0][1], out)
        parts += more
    else:
        labels = [f"{k}. {zoo_label(z)}" for k, (z, _) in enumerate(zoos, 1)]
        log.warning("the results hold lines of %d zoos, reported one section each (--dataset, --arch or "
                    "--model-location picks one): %s", len(zoos), "; ".join(labels))
        parts += [f"The results hold lines of {len(zoos)} zoos, reported one section each (--dataset, --arch or "
                  "--model-location picks one):", "", *labels, ""]
        tables, per_zoo = [], []
        for k, (zoo, lines) in enumerate(zoos, 1):
            more, table, found = report_zoo(lines, out, f"zoo{k}-", "###")
            parts += [f"## Zoo {k}: {zoo_label(zoo)}", "", *more]
            tables.append(f"zoo {k}: {zoo_label(zoo)}\n\n{table}")
            if found:
                per_zoo.append(found)
        printed = "\n\n".join(tables)
        if len(per_zoo) > 1:
            counts = claims_counts(per_zoo)
            parts += ["## The paper's claims over the zoos", "",
                      "How many zoos put each claim significantly right (p < 0.05), not significantly "
                      "different, or significantly wrong; MEHL-Soup+ is each zoo's seed-1 soup.", "", counts, ""]
            printed += "\n\n" + counts
    write_text(out / "report.md", "\n".join(parts))
    print(f"wrote {out / 'report.md'}\n")
    print(printed)
    return printed


if __name__ == "__main__":
    run_main(main)
