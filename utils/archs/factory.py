"""`--arch package.module:factory`: the user's own model, from a function of theirs.

The contract (README, "Your own zoo"):

    def factory(num_classes, pretrained=False):
        return model, preprocess

- `package.module` is importable from the working directory or PYTHONPATH;
- `model` is a torch.nn.Module whose forward maps a batch of images (B, 3, H, W) to logits
  (B, num_classes); the toolkit calls `factory` with pretrained=True only for the linear probe of
  finetune.py (the start of a zoo), and with pretrained=False everywhere else (soup scripts load every
  weight from the ingredients). A factory without a `pretrained` argument is called with num_classes
  alone;
- `preprocess` is the eval transform of one image: a PIL RGB image in, a float tensor (3, H, W) out.
  Images that datasets hold as tensors (Fashion-MNIST) are turned into PIL RGB images first.

The factory is imported and called once when the arch is first asked for (num_classes=2,
pretrained=False) to check the contract and take `preprocess`, so a factory that cannot be imported or
returns the wrong thing is one line naming it, before any data is read. Every build runs under a fixed
seed (the caller's RNG is untouched), so two builds give the same weights, as for every arch here."""
import importlib
import inspect
import os
import sys

import torch
from torch import nn

from utils.archs import ArchSpec, pil_rgb_then
from utils.runtime.errors import UserError

PROBE_CLASSES = 2


def _first(err):
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def resolve(arch):
    """The factory function named by `package.module:factory`."""
    module_name, _, attr = arch.partition(":")
    if not (module_name and all(p.isidentifier() for p in module_name.split(".")) and attr.isidentifier()):
        raise UserError(f"--arch {arch}: expected a registered name, timm:<name> or package.module:factory")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:  # `python script.py` puts the script's folder first
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise UserError(f"--arch {arch}: cannot import the factory's module {module_name} ({err}); it must "
                        f"be importable from the working directory ({cwd}) or PYTHONPATH") from err
    except Exception as err:  # noqa: BLE001 - whatever the user's module raises is one line
        raise UserError(f"--arch {arch}: importing {module_name} failed: {_first(err)}") from err
    factory = getattr(module, attr, None)
    if factory is None:
        raise UserError(f"--arch {arch}: module {module_name} ({getattr(module, '__file__', '?')}) has no "
                        f"function {attr}")
    if not callable(factory):
        raise UserError(f"--arch {arch}: {module_name}.{attr} is a {type(factory).__name__}, not a function")
    return factory


def _takes_pretrained(factory):
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "pretrained" or p.kind == p.VAR_KEYWORD for p in params)


def call(arch, factory, num_classes, pretrained):
    """(model, preprocess) from the factory, checked."""
    kwargs = {"pretrained": pretrained} if _takes_pretrained(factory) else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            out = factory(num_classes, **kwargs)
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001
            raise UserError(f"--arch {arch}: the factory raised {_first(err)}") from err
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module) and callable(out[1])):
        got = (f"a tuple of {len(out)} ({', '.join(type(o).__name__ for o in out)})" if isinstance(out, tuple)
               else f"a {type(out).__name__}")
        raise UserError(f"--arch {arch}: the factory must return (model, preprocess), a torch.nn.Module "
                        f"and a callable eval transform; it returned {got}")
    return out


def check_preprocess(arch, preprocess):
    """The transform must turn a PIL RGB image into a float (3, H, W) tensor."""
    from PIL import Image
    try:
        x = preprocess(Image.new("RGB", (32, 32), (128, 64, 32)))
    except Exception as err:  # noqa: BLE001
        raise UserError(f"--arch {arch}: the factory's preprocess fails on a 32x32 PIL RGB image: "
                        f"{_first(err)}") from err
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 3):
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else \
            f"a {type(x).__name__}"
        raise UserError(f"--arch {arch}: the factory's preprocess must return a float tensor (3, H, W) for "
                        f"a PIL image; it returned {got}")


def spec(arch):
    factory = resolve(arch)
    model, preprocess = call(arch, factory, PROBE_CLASSES, False)
    check_preprocess(arch, preprocess)
    is_vit = any(type(m).__name__ == "VisionTransformer" for m in model.modules())
    del model

    def build(num_classes, pretrained=False):
        return call(arch, factory, num_classes, pretrained)[0]

    preprocess = pil_rgb_then(preprocess)
    return ArchSpec(arch, build, preprocess, preprocess, is_vit=is_vit)
