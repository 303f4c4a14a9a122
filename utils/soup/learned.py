"""Soup math of Learned-Soup / Learned-Soup+ (the recipe: learned_soup.py), free of I/O: raw
coefficients R (B, N), alpha = softmax(R, dim=1), theta_b = sum_i alpha[b, i] theta_{i,b}, and the loss
CE(beta * f(x; theta(alpha)), y) through `torch.func.functional_call`."""
import torch
import torch.nn.functional as F
from torch.func import functional_call


def owners(blocks):
    """name -> index of its block."""
    return {name: b for b, block in enumerate(blocks) for name in block}


def init_raw(num_blocks, num_ingredients, device=None):
    """Equal raw coefficients: the first soup is the uniform soup."""
    return torch.zeros(num_blocks, num_ingredients, dtype=torch.float32, device=device, requires_grad=True)


def mix(stacked, alpha, owner):
    """{name: sum_i alpha[owner[name], i] * stacked[name][i]}; `stacked[name]` is (N, *shape)."""
    return {name: torch.tensordot(alpha[owner[name]].to(t.dtype), t, dims=1) for name, t in stacked.items()}


def soup_loss(model, stacked, raw, beta, owner, x, y, denom, key_prefix=""):
    """Sum of CE(beta * f(x; theta(softmax(raw))), y) over the batch, divided by `denom` (the global
    batch size, so that gradients summed over ranks equal those of the whole batch). `model` holds the
    stacked parameters under `key_prefix` + their names (a wrapper module that holds the model)."""
    params = {key_prefix + k: v for k, v in mix(stacked, torch.softmax(raw, dim=1), owner).items()}
    logits = functional_call(model, params, (x,))
    return F.cross_entropy(beta * logits, y, reduction="sum") / denom
