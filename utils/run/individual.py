"""Accuracies of the individual ingredients: held-out, test and every shift, one results line each
(method "individual"), with the file of its per-example predictions (utils/files/predictions.py). An
ingredient whose line is already in the results file, for the same file, dataset, architecture,
held-out split and test size, with a usable predictions file, is not evaluated again.

Used by greedy soup (held-out ranking), by --exclude-top in every soup script, and by the report."""
import json
import logging
from pathlib import Path

from utils.files import identity, predictions, results
from utils.files.ingredients import index_of, load_checked
from utils.run import inputs, precision
from utils.run.evaluation import evaluate_all
from utils.runtime import distributed
from utils.runtime.errors import UserError

log = logging.getLogger(__name__)
METHOD = "individual"


def cache_key(setup, path):
    """The fields a cached line must match to stand for `path` in this run."""
    key = {
        "method": METHOD,
        "index": index_of(path),
        "path": str(Path(path).resolve()),
        "fingerprint": identity.stamp(path),  # a rewritten file is evaluated again
        "dataset": setup.dataset,
        "arch": setup.spec.name,
        "split": setup.bundle.split,
        "test_size": setup.test_size,
        "precision": setup.precision,
        "tf32": bool(setup.arguments.get("tf32", False)),
    }
    return json.loads(json.dumps(key, default=str))  # compared with lines read back from JSON


def evaluate_individuals(setup, paths=None):
    """Records (dicts with "heldout", "test", "shifts", ...) of every ingredient in `paths` (default:
    the whole range), in the order of `paths`; missing ones are evaluated and appended to the results.

    The primary rank reads the results file and tells the others what is cached, so every rank
    evaluates the same ingredients (each over its share of the data)."""
    paths = setup.paths if paths is None else paths
    keys = [cache_key(setup, p) for p in paths]
    cached = None
    if distributed.is_primary():
        existing = results.read(setup.results_db)
        # lines written before --precision and --tf32 existed were evaluated in exact fp32
        cached = [results.latest(existing, k, absent={"precision": precision.DEFAULT, "tf32": False})
                  for k in keys]
        cached = [with_predictions(setup.results_db, c) for c in cached]
    cached = distributed.broadcast_object(cached)
    todo = [i for i, c in enumerate(cached) if c is None]
    if len(todo) < len(paths):
        log.info("individual accuracies: %d of %d ingredients taken from %s",
                 len(paths) - len(todo), len(paths), setup.results_db)
    out = list(cached)
    # the ingredients' shared frozen prefix runs once per data set (utils/run/prefix.py)
    evaluated = inputs.evaluation(setup.model, setup.device, setup.batch_size, setup.workers, setup.precision)
    for i in todo:
        sd = load_checked(paths[i], setup.reference)
        setup.model.load_state_dict(sd)
        del sd
        scores = evaluate_all(evaluated, setup.bundle, setup.device, setup.batch_size, keep=True)
        kept = scores.pop("predictions")
        if distributed.is_primary():
            scores["predictions"] = predictions.save(setup.results_db, kept)
        record = {**keys[i], **scores, "device": str(setup.device),
                  "world_size": distributed.world_size()}
        out[i] = results.append(setup.results_db, record)
        log.info("ingredient %d (%s): held-out %.2f, test %.2f", keys[i]["index"], paths[i].name,
                 scores["heldout"], scores["test"])
    return out


def with_predictions(results_db, line):
    """`line` when the predictions file it names is usable, else None: a cached accuracy comes with
    its predictions, so a line without them (an older file, a damaged file) is evaluated again."""
    if line is None:
        return None
    try:
        predictions.load(results_db, line.get("predictions"))
    except predictions.Unusable as why:
        log.info("ingredient %s: its cached line has no usable predictions (%s); evaluated again",
                 line.get("index"), why)
        return None
    return line


def heldout_ranking(setup, paths=None):
    """[(index, path, held-out accuracy)] sorted by held-out accuracy, best first; ties: lower
    ingredient index first (the order greedy soup tries them in)."""
    paths = setup.paths if paths is None else paths
    records = evaluate_individuals(setup, paths)
    ranking = [(index_of(p), p, r["heldout"]) for p, r in zip(paths, records)]
    return sorted(ranking, key=lambda t: (-t[2], t[0]))


def exclude_top(paths, ranking, k):
    """`paths` without the `k` ingredients ranked best (order of `paths` kept)."""
    if k == 0:
        return list(paths)
    if k >= len(paths):
        raise UserError(f"--exclude-top {k} leaves no ingredient: the range holds {len(paths)}")
    dropped = {index_of(p) for _, p, _ in ranking[:k]}
    return [p for p in paths if index_of(p) not in dropped]


def check_exclude_top(setup, k):
    """Fail early (before any evaluation) when --exclude-top k would leave nothing to soup."""
    if k >= len(setup.paths):
        raise UserError(f"--exclude-top {k} leaves no ingredient: the range holds {len(setup.paths)}")


def souped_paths(setup, k):
    """The ingredients a soup is made of: the range less the k best by held-out (--exclude-top)."""
    if not k:
        return list(setup.paths)
    return exclude_top(setup.paths, heldout_ranking(setup), k)
