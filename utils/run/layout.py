"""What a learned soup learns: which parameters differ across the ingredients (the coefficient problem)
and which are identical in all (kept as they are), the blocks over the learned ones (`utils.soup.blocks`),
and the float buffers (BatchNorm statistics) that differ. Found in one streamed pass over the ingredients;
used by learned soups (all N resident) and MEHL soups (K at a time) alike.

Buffers are those of the model's state dict: a non-persistent buffer (open_clip's `attn_mask`) is
rebuilt by the model itself and is in no checkpoint, so it is not an ingredient tensor."""
from dataclasses import dataclass

import torch

from utils.files.ingredients import load_checked, stream
from utils.files.state_dicts import param_names
from utils.run.batchnorm import batchnorm_statistics
from utils.runtime.errors import UserError
from utils.soup.blocks import block_bounds, make_blocks


def state_buffers(model, floating=True):
    """Names of the buffers that the model's state dict holds (running statistics; with `floating`,
    only the floating-point ones, without BatchNorm's `num_batches_tracked`)."""
    persistent = set(model.state_dict())
    return [n for n, b in model.named_buffers() if (b.is_floating_point() or not floating) and n in persistent]


class Differences:
    """Fed the ingredients one at a time (`add`), finds the parameters and float buffers that differ
    from the first ingredient in any of them, and sums the float buffers (for their mean)."""

    def __init__(self, first, params, buffers):
        self.first, self.params, self.buffers = first, list(params), list(buffers)
        self.differ = set()
        self.sums = {k: first[k].to(torch.float64).clone() for k in self.buffers}
        self.count = 1

    def add(self, sd):
        """Compare one more ingredient; returns the names found to differ for the first time."""
        new = [k for k in self.params + self.buffers
               if k not in self.differ and not torch.equal(sd[k], self.first[k])]
        self.differ.update(new)
        for k in self.buffers:
            self.sums[k] += sd[k].to(torch.float64)
        self.count += 1
        return new

    def identical_params(self):
        return [k for k in self.params if k not in self.differ]

    def differing_buffers(self):
        return [k for k in self.buffers if k in self.differ]

    def buffer_means(self):
        """The mean of every differing float buffer, in its own dtype."""
        return {k: (self.sums[k] / self.count).to(self.first[k].dtype) for k in self.differing_buffers()}


@dataclass
class Layout:
    """The coefficient problem: learned parameter names (named_parameters() order), their sizes and
    blocks, the parameters identical in every ingredient (kept as they are), and the float buffers that
    differ across ingredients (`statistics`: those that are BatchNorm running statistics, which decide
    the BatchNorm rule)."""
    names: list            # learned parameters
    sizes: list            # their numbers of elements
    identical: list        # parameters identical in every ingredient: kept as they are, not learned
    blocks: list           # lists of learned names
    bounds: list           # (start, stop) of each block in the flat learned vector
    differing_buffers: list
    statistics: list       # the differing buffers that are BatchNorm statistics

    @property
    def num_blocks(self):
        return len(self.blocks)

    @property
    def numel(self):
        return self.bounds[-1][1]

    @property
    def frozen_stats(self):
        """BatchNorm statistics identical in every ingredient: eval mode while learning, kept."""
        return not self.statistics


def make_layout(paths, model, reference, layer_size, visit=None):
    """One streamed pass over the ingredients; `layer_size` as `make_blocks` takes it (None: one block).
    Returns (layout, base): `base` is the state dict every soup starts from (the first ingredient, with
    the differing float buffers averaged). `visit(i, state dict, names found to differ for the first
    time)` sees every ingredient in turn (Learned-Soup stacks the differing ones as it goes)."""
    first = load_checked(paths[0], reference)
    diff = Differences(first, param_names(model), state_buffers(model))
    if visit is not None:
        visit(0, first, [])
    for i, _, sd in stream(paths[1:], reference, desc="comparing ingredients"):
        new = diff.add(sd)
        if visit is not None:
            visit(i + 1, sd, new)
    base = {**first, **diff.buffer_means()}
    identical = diff.identical_params()
    learned = [n for n in diff.params if n not in identical]
    if not learned:
        raise UserError(f"every parameter is identical in the {len(paths)} ingredient(s): there is "
                        "nothing to learn (the soup would be the ingredient itself)")
    sizes = [reference[n].numel() for n in learned]
    index_blocks = make_blocks(sizes, layer_size)
    differing = diff.differing_buffers()
    layout = Layout(names=learned, sizes=sizes, identical=identical,
                    blocks=[[learned[t] for t in b] for b in index_blocks],
                    bounds=block_bounds(sizes, index_blocks), differing_buffers=differing,
                    statistics=batchnorm_statistics(model, differing))
    return layout, base
