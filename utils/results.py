"""Results: one JSON line per evaluated model or soup, appended, never truncated (SPEC 10).

Lines are written with a single `write` on a file opened in append mode and flushed + fsynced, so a
kill leaves whole lines only; a torn last line (power loss) is skipped with a warning when reading."""
import json
import logging
import os
import time
from pathlib import Path

from utils import distributed

log = logging.getLogger(__name__)


def read(path):
    """All records of a results file (a missing file has none)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping a line that is not whole JSON", path, lineno)
    return records


def append(path, record):
    """Append one record (primary rank only). Adds a timestamp. Returns the record."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    if distributed.is_primary():
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record, default=_jsonable) + "\n"
        try:
            with open(path, "a") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            from utils.errors import UserError
            raise UserError(f"could not append to the results file {path}: {err.strerror or err}") from err
    return record


def find(path, **match):
    """The last record whose fields equal `match` (None when there is none)."""
    hits = [r for r in read(path) if all(r.get(k) == v for k, v in match.items())]
    return hits[-1] if hits else None


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


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
