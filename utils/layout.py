"""What a learned soup learns: which parameters differ across the ingredients (the coefficient problem)
and which are identical in all (kept as they are), the blocks over the learned ones, and the float
buffers (BatchNorm statistics) that differ. Found in one streamed pass over the ingredients.

Buffers are those of the model's state dict: a non-persistent buffer (open_clip's `attn_mask`) is
rebuilt by the model itself and is in no checkpoint, so it is not an ingredient tensor."""
from dataclasses import dataclass

import torch

from utils.errors import UserError
from utils.ingredients import load_checked, stream
from utils.state_dicts import make_blocks, param_names


def block_bounds(sizes, blocks):
    """(start, stop) offsets of each block in the flat vector of the tensors `sizes` (blocks are
    consecutive runs of tensor indices, as `make_blocks` gives them)."""
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    return [(offsets[b[0]], offsets[b[-1] + 1]) for b in blocks]


def state_buffers(model):
    """Names of the floating-point buffers that the model's state dict holds (running statistics)."""
    persistent = set(model.state_dict())
    return [n for n, b in model.named_buffers() if b.is_floating_point() and n in persistent]


@dataclass
class Layout:
    """The coefficient problem: learned parameter names (named_parameters() order), their sizes and
    blocks, the parameters kept as they are, and the float buffers that differ across ingredients."""
    names: list            # learned parameters
    sizes: list            # their numbers of elements
    frozen: list           # parameters identical in every ingredient: kept, not learned
    blocks: list           # lists of learned names
    bounds: list           # (start, stop) of each block in the flat learned vector
    differing_buffers: list

    @property
    def num_blocks(self):
        return len(self.blocks)

    @property
    def numel(self):
        return self.bounds[-1][1]

    @property
    def frozen_stats(self):
        """Every float buffer identical: BatchNorm runs in eval mode while learning."""
        return not self.differing_buffers


def make_layout(paths, model, reference, layer_size):
    """One streamed pass over the ingredients. Returns (layout, base): `base` is the state dict every
    soup starts from (the first ingredient, with the differing float buffers averaged)."""
    names, buffers = param_names(model), state_buffers(model)
    first = load_checked(paths[0], reference)
    same = set(names + buffers)
    sums = {k: first[k].to(torch.float64).clone() for k in buffers}
    for _, _, sd in stream(paths[1:], reference, desc="comparing ingredients"):
        same = {k for k in same if torch.equal(first[k], sd[k])}
        for k in buffers:
            sums[k] += sd[k].to(torch.float64)
    differing = [k for k in buffers if k not in same]
    base = dict(first)
    for k in differing:
        base[k] = (sums[k] / len(paths)).to(first[k].dtype)
    learned = [n for n in names if n not in same]
    if not learned:
        raise UserError(f"every parameter is identical in the {len(paths)} ingredient(s): there is "
                        "nothing to learn (the soup would be the ingredient itself)")
    sizes = [reference[n].numel() for n in learned]
    index_blocks = make_blocks(sizes, layer_size)
    layout = Layout(names=learned, sizes=sizes, frozen=[n for n in names if n in same],
                    blocks=[[learned[t] for t in b] for b in index_blocks],
                    bounds=block_bounds(sizes, index_blocks), differing_buffers=differing)
    return layout, base
