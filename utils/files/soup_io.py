"""A soup's files: the names of every file beside it (`sidecar`), the soup with its recipe
(`save_soup`: the state dict, and beside it `<name>.recipe.json` holding the soup file's sha256, the
ingredient paths with their sha256, the coefficients (when learned) and the arguments), and `rebuild`,
which makes the soup again from its recipe without learning. The end of a run, which calls these in order, is
`utils.run.outputs.write_outputs`."""
import json
import re
from pathlib import Path

import torch

from utils.files.identity import describe, sha256
from utils.files.state_dicts import Staged, atomic_write, describe_missing, load_state_dict, save_state_dict
from utils.runtime import distributed
from utils.runtime.errors import UserError


# The files a run writes beside its soup `<name>.pt`: `<name>` + suffix.
SIDECARS = {"recipe": ".recipe.json",             # ingredients, coefficients, arguments (every soup)
            "coefficients": ".coefficients.json",  # a learned soup's coefficients (`coefficients_file`)
            "state": ".state.pt"}                 # MEHL's --resume state
# Files that earlier versions wrote and the report still reads: MEHL's `<name>.alpha.json`
# ({ingredients: paths, blocks, alpha, summary}); Learned-Soup's `<name>.coefficients.json` then held
# {ingredients: indices, temperature, blocks: [{tensors, alpha: {index: value}}]}.
OLD_SIDECARS = {"alpha": ".alpha.json"}


JSON_LIMIT = 64 * 2**20   # bytes of a recipe or sidecar read at most (one holds a few MB of numbers)
JSON_DEPTH = 64           # nesting of a recipe (its deepest, "coefficients" -> "alpha" -> row, is 4)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def read_json(path, limit=JSON_LIMIT, depth=JSON_DEPTH):
    """A JSON file read as untrusted, with memory bounded before it is parsed: at most `limit` bytes,
    nested at most `depth` deep (checked on the text: a deeply nested file would otherwise end in
    RecursionError). OSError, UnicodeDecodeError or ValueError (a JSONDecodeError, or too large or too
    deep, in words) otherwise."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"larger than {limit // 2**20} MiB, more than a recipe holds")
    text = raw.decode("utf-8")
    level = deepest = 0
    for bracket in _BRACKETS.findall(_STRING.sub('""', text)):
        level += 1 if bracket in "[{" else -1
        deepest = max(deepest, level)
        if deepest > depth:
            raise ValueError(f"nested more than {depth} levels deep, deeper than a recipe is")
    try:
        return json.loads(text)
    except RecursionError as err:  # not reached after the check above; kept as one line all the same
        raise ValueError(f"nested too deep ({err})") from err


def sidecar(path, kind):
    """The file of `kind` beside the output `path`: one of SIDECARS, or "lock": `.<file name>.lock`
    (the lock of any output, the soup or MEHL's state file)."""
    path = Path(path)
    if kind == "lock":
        return path.with_name(f".{path.name}.lock")
    return path.with_name(path.stem + {**SIDECARS, **OLD_SIDECARS}[kind])


def coefficients_file(blocks, alpha, **extra):
    """The `<soup>.coefficients.json` of a learned soup (Learned-Soup(+) and MEHL-Soup(+) alike), less
    its ingredients: `save_soup` names them by path and sha256, in the order of alpha's columns (an
    ingredient's index is derived from its file name, `utils.files.ingredients.index_of`). `blocks`:
    the tensor names of each block; `alpha`: blocks x ingredients; `extra`: what the method adds (the
    temperature, the alpha summary)."""
    return {"blocks": blocks, "alpha": alpha, **extra}


def write_json(path, doc, staged=None):
    """`doc` as indented JSON, written atomically (a sidecar or a recipe); with `staged` (a
    state_dicts.Staged), only to its temporary file, which the caller renames."""
    text = json.dumps(doc, indent=1, default=str)
    write = lambda tmp: Path(tmp).write_text(text)  # noqa: E731
    if staged is not None:
        return staged.write(path, write, overwrite=True, size=len(text.encode()))
    return atomic_write(path, write, overwrite=True, size=len(text.encode()))


def save_soup(sd, path, method, paths, args, coefficients=None, extra=None, overwrite=False, sidecars=None):
    """Write the soup, its recipe and its `sidecars` ({kind: JSON object}, named by `sidecar`; the
    coefficients file gets the ingredients' paths and sha256 from the recipe's) as one set (primary rank
    only): all are written to temporary files first, so a write that fails (a full
    disk) leaves the old set whole, and only then renamed. The recipe and each sidecar record the soup
    file's sha256 (`recipe_describes`). `coefficients`: for learned soups, a dict with "names" (the
    parameter names), "blocks" (lists of names) and "alpha" (B x N nested lists) – the parameters not
    in any block are taken as they are in the soup."""
    if path is None or not distributed.is_primary():
        return None
    path = Path(path)
    for k, v in sd.items():  # never write a soup that holds a non-finite number
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"refusing to write {path}: tensor {k} of the soup holds NaN or Inf")
    with Staged() as staged:
        digest = sha256(save_state_dict(sd, path, overwrite=overwrite, staged=staged))  # its temporary file
        recipe = {
            "method": method,
            "soup": path.name,
            "soup_sha256": digest,
            "ingredients": [describe(p) for p in paths],
            "coefficients": coefficients,
            "args": args,
            **(extra or {}),
        }
        named = [{"path": d["path"], "sha256": d["sha256"]} for d in recipe["ingredients"]]
        docs = {sidecar(path, kind): {**({"ingredients": named} if kind == "coefficients" else {}), **doc,
                                      "soup_sha256": digest} for kind, doc in (sidecars or {}).items()}
        docs[sidecar(path, "recipe")] = recipe
        for file, doc in docs.items():
            write_json(file, doc, staged)
        # The soup is renamed last. A soup under its final name then always has beside it the recipe
        # written with it (a first soup never appears without one), and a kill between two renames
        # leaves new files beside the old soup: each records the sha256 of the soup it was written
        # with, which tells them apart, so a rerun does not take that soup for its own leftover
        # (utils.run.cli.soup_output).
        staged.replace(*docs, path)
    return path


def recipe_beside(soup):
    """The recipe beside the soup file `soup` as a dict, or None (none there, unreadable, not an object);
    `read_recipe` checks a recipe for a reader who relies on its fields."""
    try:
        recipe = read_json(sidecar(soup, "recipe"))
    except (OSError, ValueError):
        return None
    return recipe if isinstance(recipe, dict) else None


def recipe_describes(recipe, soup):
    """Whether `recipe` was written with this very soup file: its soup_sha256 is the file's. Not so for
    a recipe of an older version (no hash) or a new recipe beside an old soup (a run killed between
    the renames of `save_soup`)."""
    if not Path(soup).is_file():
        return False
    try:
        return recipe.get("soup_sha256") == sha256(soup)
    except OSError:
        return False


def coefficients(layout, alpha, soup, reestimated):
    """The "coefficients" of a learned soup's recipe, which `rebuild` reads and `read_recipe` checks:
    the learned tensors ("names"), their blocks (lists of names) and alpha (B x N nested lists) from the
    soup's `layout` (utils/run/layout.py), the parameters identical in every ingredient (kept as they
    are), and how its float buffers are restored: those that differ across the ingredients are their
    mean, except the BatchNorm statistics `reestimated` on data, whose values (from `soup`) are
    recorded."""
    return {"names": layout.names, "blocks": layout.blocks, "alpha": alpha,
            "identical_parameters": layout.identical,
            "averaged_buffers": [k for k in layout.differing_buffers if k not in reestimated],
            "reestimated_buffers": {k: soup[k].tolist() for k in reestimated}}


def rebuild(recipe_file, check_hashes=True):
    """Rebuild a soup from its recipe: uniform / greedy means, or sum_i alpha[b, i] theta_i per block.
    Parameters outside the blocks and integer tensors come from the soup's first ingredient; float
    buffers are averaged or set to their recorded re-estimated values, as the recipe says."""
    try:
        recipe = read_json(recipe_file)
        items = recipe["ingredients"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{recipe_file}: not a readable soup recipe ({type(err).__name__}: {err})") from err
    sds = []
    for item in items:
        if not Path(item["path"]).is_file():
            raise UserError(f"{recipe_file}: ingredient {item['path']} is missing "
                            f"({describe_missing(item['path'])}); the soup cannot be rebuilt without it")
        if check_hashes and sha256(item["path"]) != item["sha256"]:
            raise UserError(f"{recipe_file}: ingredient {item['path']} changed since the soup was made "
                            "(sha256 differs)")
        sds.append(load_state_dict(item["path"]))
    coeff = recipe.get("coefficients")
    first = sds[0]
    out = {}
    if coeff is None:
        for k, v in first.items():
            out[k] = (torch.stack([sd[k].to(torch.float64) for sd in sds]).mean(0).to(v.dtype)
                      if v.is_floating_point() else v.clone())
        return out
    out = {k: v.clone() for k, v in first.items()}
    alpha = torch.tensor(coeff["alpha"], dtype=torch.float64)
    for b, names in enumerate(coeff["blocks"]):
        for name in names:
            mix = sum(alpha[b, i] * sd[name].to(torch.float64) for i, sd in enumerate(sds))
            out[name] = mix.to(first[name].dtype)
    for name in coeff.get("averaged_buffers", []):
        out[name] = torch.stack([sd[name].to(torch.float64) for sd in sds]).mean(0).to(first[name].dtype)
    reestimated = coeff.get("reestimated_buffers", {})
    if not isinstance(reestimated, dict):
        raise UserError(f"{recipe_file}: the re-estimated BatchNorm statistics of this soup were not "
                         "recorded (an older recipe): its buffers cannot be rebuilt; take them from the soup")
    for name, values in reestimated.items():
        out[name] = torch.tensor(values, dtype=first[name].dtype).reshape(first[name].shape)
    return out


def read_recipe(recipe_file):
    """A soup's recipe as `save_soup` writes it, checked for what a reader of it relies on: a JSON object
    whose "ingredients" is a non-empty list of objects with a "path", and whose "coefficients" is null
    or holds "blocks" (non-empty lists of tensor names) and "alpha" (one row per block, one number per
    ingredient). Anything else is a UserError naming the file and what is wrong."""
    def bad(what):
        return UserError(f"{recipe_file}: not a usable soup recipe: {what}")
    try:
        recipe = read_json(recipe_file)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise bad(f"{type(err).__name__}: {err}") from err
    if not isinstance(recipe, dict):
        raise bad(f"a JSON {type(recipe).__name__}, not an object")
    items = recipe.get("ingredients")
    if not (isinstance(items, list) and items
            and all(isinstance(i, dict) and isinstance(i.get("path"), str) for i in items)):
        raise bad('"ingredients" is not a list of objects with a "path"')
    coeff = recipe.get("coefficients")
    if coeff is None:
        return recipe
    blocks = coeff.get("blocks") if isinstance(coeff, dict) else None
    if not (isinstance(blocks, list) and blocks and all(
            isinstance(b, list) and b and all(isinstance(n, str) for n in b) for b in blocks)):
        raise bad('"coefficients" has no "blocks" (lists of tensor names)')
    alpha = coeff.get("alpha")
    if not (isinstance(alpha, list) and len(alpha) == len(blocks) and all(
            isinstance(row, list) and len(row) == len(items) and all(_is_number(v) for v in row)
            for row in alpha)):
        raise bad(f'"coefficients" has no "alpha" of {len(blocks)} block(s) x {len(items)} ingredient(s)')
    return recipe


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def method_of(family, plus):
    """The method a learned soup's results line names: `family` (one row of coefficients, model-wise),
    with "+" when `plus` (a row per block)."""
    return family + "+" if plus else family
