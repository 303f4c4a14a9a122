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
returns the wrong thing is one line naming it, before any data is read. The model is run once on one
preprocessed image then, and again at the first build for each other class count (the run's, known
once the data set is): logits must be a floating tensor (1, num_classes), or the run stops with one
line saying what came back (a head of another size, a tuple, a float16 model). Every build runs under a fixed
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
    """The transform must turn a PIL RGB image into a float (3, H, W) tensor; returns that tensor."""
    from PIL import Image
    try:
        x = preprocess(Image.new("RGB", (32, 32), (128, 64, 32)))
    except Exception as err:  # noqa: BLE001
        raise UserError(f"--arch {arch}: the factory's preprocess fails on a 32x32 PIL RGB image: "
                        f"{_first(err)}") from err
    if not (isinstance(x, torch.Tensor) and x.is_floating_point() and x.ndim == 3 and x.shape[0] == 3):
        got = _returned(x)
        raise UserError(f"--arch {arch}: the factory's preprocess must return a float tensor (3, H, W) (3 "
                        f"channels: RGB) for a PIL image; it returned {got}")
    return x


def _dtype(t):
    return str(t.dtype).replace("torch.", "")


def _a(word):
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _returned(out):
    """What a forward returned, in a few words."""
    if isinstance(out, torch.Tensor):
        return f"{_a(_dtype(out))} tensor of shape {tuple(out.shape)}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)} ({', '.join(type(o).__name__ for o in out[:4])})"
    if isinstance(out, dict):
        return f"a dict (keys: {', '.join(map(str, list(out)[:4]))})"
    return _a(type(out).__name__)


def check_model(arch, model, x, num_classes):
    """Run `model` once on `x`, one preprocessed image as a batch (1, 3, H, W): the contract is logits,
    a floating tensor (1, num_classes). Otherwise one line saying what it returned; a model that
    ignores num_classes would be scored on another argmax, silently. Each module's train/eval mode,
    the weights and the caller's RNG are left as they were."""
    params = list(model.parameters())
    dtypes = sorted({_dtype(p) for p in params if p.is_floating_point()} - {_dtype(x)})
    if dtypes:
        raise UserError(f"--arch {arch}: the model's parameters are {'/'.join(dtypes)}, the preprocessed "
                        f"images {_dtype(x)}: build the model in {_dtype(x)} (the ingredients are cast to it)")
    if params:
        x = x.to(params[0].device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            out = model(x)
    except Exception as err:  # noqa: BLE001 - whatever the user's forward raises is one line
        raise UserError(f"--arch {arch}: the model fails on one preprocessed image (a {_dtype(x)} batch of "
                        f"shape {tuple(x.shape)}): {_first(err)}") from err
    finally:
        for m, training in modes:
            m.training = training
    if not (isinstance(out, torch.Tensor) and out.is_floating_point()
            and tuple(out.shape) == (1, num_classes)):
        raise UserError(f"--arch {arch}: the model must map one preprocessed image (a batch of shape "
                        f"{tuple(x.shape)}) to logits, a float tensor of shape (1, {num_classes}) for "
                        f"num_classes={num_classes}; it returned {_returned(out)}")


def spec(arch):
    factory = resolve(arch)
    model, preprocess = call(arch, factory, PROBE_CLASSES, False)
    x = check_preprocess(arch, preprocess).unsqueeze(0)
    check_model(arch, model, x, PROBE_CLASSES)
    is_vit = any(type(m).__name__ == "VisionTransformer" for m in model.modules())
    del model
    checked = {PROBE_CLASSES}

    def build(num_classes, pretrained=False):
        model = call(arch, factory, num_classes, pretrained)[0]
        if num_classes not in checked:  # the run's class count, once: a head fixed at another size
            check_model(arch, model, x, num_classes)
            checked.add(num_classes)
        return model

    preprocess = pil_rgb_then(preprocess)
    return ArchSpec(arch, build, preprocess, preprocess, is_vit=is_vit)
