"""What a recipe runs on a data set, said by the recipe itself each time it learns or evaluates: the
items, and the module that maps them to the model's logits of the original items, in their order.

- The frozen prefix's outputs, computed once, and the rest of the model (`prefix.Tail`), when the
  prefix may stand for the model and holds no learned tensor (utils/run/prefix.py).
- Else, for learning, the images decoded once as uint8 and the model that makes them float on their
  device (`decoded.FromUint8`, utils/run/decoded.py); evaluations get the same from
  `evaluation.make_loader`.
- Else the data set and the model.
Under --precision amp_bf16 that module runs under bfloat16 autocast (`precision.Autocast`). Each wrapper
holds the model under `model.`: `Inputs.key_prefix` is what the model's tensor names get in front in the
module's (torch.func.functional_call puts a soup's tensors in by those names)."""
from dataclasses import dataclass

from torch import nn

from utils.run import decoded, precision, prefix


@dataclass(frozen=True)
class Inputs:
    dataset: object
    forward: nn.Module   # the model, or a wrapper of it
    workers: int         # data loader processes (0 for items already in memory)
    key_prefix: str = ""

    @property
    def prefixed(self):
        """Whether the items are the frozen prefix's outputs."""
        inner = self.forward.model if isinstance(self.forward, precision.Autocast) else self.forward
        return isinstance(inner, prefix.Tail)


def learning(model, dataset, device, batch_size, workers, learned, precision_name, desc="held-out"):
    """The Inputs of a learning epoch over `dataset` with the tensors `learned` being learned (ask at each
    epoch: the prefix's tensors are checked each time)."""
    found = prefix.precomputed(model, dataset, device, learned=learned, desc=desc)
    if found is not None:
        return in_precision(Inputs(*found, 0, "model."), precision_name, device)
    kept = decoded.images(dataset, None, workers, desc)
    if kept is not None:
        return in_precision(Inputs(kept, decoded.FromUint8(model, kept.to_float), 0, "model."), precision_name,
                            device)
    return in_precision(Inputs(dataset, model, workers), precision_name, device)


def evaluation(model, device, batch_size, workers, precision_name, split=None):
    """A recipe's evaluations of `model`: a function (dataset, desc) -> Inputs, which puts the model in
    eval mode first (for utils/run/evaluation.py's `evaluate_all`). `split`: a Split of the model other
    than the one its architecture declares (finetune.py's depth)."""
    def inputs_of(dataset, desc="eval"):
        model.eval()
        found = prefix.precomputed(model, dataset, device, desc=desc, split=split)
        plain = Inputs(*found, 0, "model.") if found is not None else Inputs(dataset, model, workers)
        return in_precision(plain, precision_name, device)
    return inputs_of


def in_precision(inputs, precision_name, device):
    """`inputs` with its module run in `precision_name`."""
    if precision_name == precision.DEFAULT:
        return inputs
    return Inputs(inputs.dataset, precision.Autocast(inputs.forward, device), inputs.workers,
                  "model." + inputs.key_prefix)
