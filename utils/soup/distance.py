"""How far a soup went from its ingredients, per block of its coefficients (read-only, for the report).

For a block b (a list of parameter tensors) with ingredients theta_1..theta_N and their mean m:

    ratio_b = ||soup_b - m_b|| / mean_i ||theta_i,b - m_b||

0 is the uniform soup; about 1 is as far out as a typical ingredient; far above 1 means the soup left
the ingredients' neighbourhood (large or negative coefficients extrapolating along their differences).
"""
import json
import math
from pathlib import Path

import torch


def block_ratios(soup, ingredients, blocks):
    """ratio_b for every block (list of lists of tensor names), in float64. A block where the
    ingredients do not differ gives nan (0/0) unless the soup is also at their mean (0)."""
    out = []
    for names in blocks:
        stacked = [torch.cat([sd[n].double().flatten() for n in names]) for sd in ingredients]
        mean = torch.stack(stacked).mean(0)
        spread = sum(float((s - mean).norm()) for s in stacked) / len(stacked)
        far = float((torch.cat([soup[n].double().flatten() for n in names]) - mean).norm())
        out.append(far / spread if spread > 0 else (0.0 if far == 0 else math.nan))
    return out


def summarise(ratios, alpha=None):
    """Median / 90th percentile / max of the ratios, and the coefficients' range when alpha is given."""
    vals = sorted(r for r in ratios if not math.isnan(r))
    if not vals:
        return None

    def q(f):
        return vals[min(len(vals) - 1, int(round(f * (len(vals) - 1))))]

    out = {"blocks": len(ratios), "ratio_median": q(0.5), "ratio_p90": q(0.9), "ratio_max": vals[-1]}
    if alpha is not None:
        flat = [v for row in alpha for v in (row if isinstance(row, list) else [row])]
        out.update(alpha_min=min(flat), alpha_max=max(flat))
    return out


def from_recipe(soup_file, load):
    """(names of blocks, ratios, alpha) of a saved soup from its recipe `<soup>.recipe.json`; `load` reads
    a state dict. None for a soup without coefficients in its recipe (uniform, greedy) or a missing file."""
    soup_file = Path(soup_file)
    recipe_file = soup_file.with_name(soup_file.stem + ".recipe.json")
    if not (soup_file.is_file() and recipe_file.is_file()):
        return None
    recipe = json.loads(recipe_file.read_text())
    paths = [item["path"] for item in recipe["ingredients"]]
    if not all(Path(p).is_file() for p in paths):
        return None
    coefficients = recipe.get("coefficients") or {}
    if not coefficients.get("blocks"):
        return None
    ingredients = [load(p) for p in paths]
    soup = load(soup_file)
    return coefficients["blocks"], block_ratios(soup, ingredients, coefficients["blocks"]), coefficients.get("alpha")
