"""The end of every soup run, in the order docs/GUARANTEES.md states: the sidecar files, the recipe and
the soup, replaced as one set (utils/files/soup_io.py `save_soup`; primary rank; nothing when the soup
path is None), and last the results line, which marks the run as finished: a kill before it leaves no
line, and a rerun makes the soup again. `result_record` is the line's fields. Also the optional
Weights & Biases log of a run (`Wandb`)."""
import os
import time

from utils.files import identity, predictions, results, soup_io
from utils.files.ingredients import index_of
from utils.runtime import distributed, memory


def write_outputs(setup, output, method, paths, scores, soup, *, sidecars=None, coefficients=None, recipe=None,
                  **fields):
    """Write the soup of `method` over the ingredients `paths` (to `output`, a cli.Output) with its
    sidecars ({kind: JSON document}, named by `soup_io.sidecar`) and recipe (`coefficients` and the
    `recipe` fields go into it), then its results line (with `fields`). Returns the line."""
    soup_io.save_soup(soup, output.path, method, paths, setup.arguments, coefficients=coefficients,
                      extra=recipe, overwrite=output.replace, sidecars=sidecars)
    scores = dict(scores)
    kept = scores.pop("predictions", None)
    if kept is not None and distributed.is_primary():  # before the line, which marks the run as finished
        scores["predictions"] = predictions.save(setup.results_db, kept)
    return results.append(setup.results_db, result_record(setup, output, method, paths, scores, **fields))


def result_record(setup, output, method, paths, scores, **fields):
    """A soup's results line: method, dataset, architecture, the souped ingredients (`paths`), held-out
    / test / shift accuracies (`scores`, with the "predictions" field naming their file), the split, seconds, peak memory, the soup file, the range's
    file stamps (which make a rerun of this command find the line), the recipe's own `fields`, and the
    arguments. Learned and MEHL soups share the field names `blocks`, `identical_parameters`,
    `identical_numbers` and `batchnorm`."""
    return {
        "method": method,
        "dataset": setup.dataset,
        "arch": setup.arch,
        "ingredients": [index_of(p) for p in paths],
        "model_location": setup.model_location,
        **scores,
        "split": setup.bundle.split,
        "seconds": round(time.time() - setup.started, 2),
        "peak_memory_bytes": memory.peak_bytes(setup.device),
        "device": str(setup.device),
        "world_size": distributed.world_size(),
        "soup_file": None if output.path is None else str(output.path),
        "range_fingerprints": [identity.stamp(p) for p in setup.paths],  # a rewritten ingredient: another run
        **fields,
        "args": setup.arguments,
    }


class Wandb:
    """Optional Weights & Biases logging (`--wandb`): offline unless the user configured wandb
    (WANDB_API_KEY or WANDB_MODE set). A no-op on non-primary ranks and when disabled."""

    def __init__(self, enabled, project, config, run_dir):
        self.run = None
        if not (enabled and distributed.is_primary()):
            return
        import wandb
        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            os.environ["WANDB_MODE"] = "offline"
        self.run = wandb.init(project=project, config=config, dir=str(run_dir))

    def log(self, data, step=None):
        if self.run is not None:
            self.run.log(data, step=step)

    def finish(self):
        if self.run is not None:
            self.run.finish()
