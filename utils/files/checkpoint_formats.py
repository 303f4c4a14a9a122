"""The state dict inside a checkpoint as people have them, and a note of where it was found.

- a plain state dict (every value a tensor): taken as it is;
- a training checkpoint holding it under one of WRAPPERS, first found wins: "state_dict" (timm's training
  script, PyTorch Lightning), "model_state_dict" (the PyTorch tutorials), "model" (DeiT, MAE, many
  research repos), "state_dict_ema" (timm's EMA weights, used when a checkpoint holds no other);
- keys saved from DistributedDataParallel (every key prefixed "module."): the prefix is removed.

Anything other than the plain form is said once per file (ingredients are read several times), so a
user sees which weights of a training checkpoint were souped."""
import logging

import torch

log = logging.getLogger(__name__)

WRAPPERS = ("state_dict", "model_state_dict", "model", "state_dict_ema")
DDP_PREFIX = "module."
_SAID = set()


def _tensors(d):
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def unwrap(obj, name):
    """The state dict in `obj` (what torch.load returned for file `name`); `obj` itself when nothing
    applies (the caller refuses what is not a state dict of tensors)."""
    if not isinstance(obj, dict):
        return obj
    how = []
    if not _tensors(obj):
        for key in WRAPPERS:
            if isinstance(obj.get(key), dict):
                others = [k for k in WRAPPERS if k != key and isinstance(obj.get(k), dict)]
                how.append(f"the weights under {key!r}" + (f" (also present, not used: "
                                                           f"{', '.join(others)})" if others else ""))
                obj = obj[key]
                break
    keys = list(obj)
    if keys and all(isinstance(k, str) and k.startswith(DDP_PREFIX) for k in keys):
        obj = {k[len(DDP_PREFIX):]: v for k, v in obj.items()}
        how.append(f"the {DDP_PREFIX!r} prefix of its keys removed (saved from DistributedDataParallel)")
    if how and name not in _SAID:
        _SAID.add(name)
        log.info("%s: a training checkpoint: using %s", name, "; ".join(how))
    return obj
