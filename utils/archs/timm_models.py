"""`--arch timm:<name>[@<size>]`: any model of the installed timm, by its timm name.

The model is `timm.create_model(name, pretrained=False, num_classes=<the data's>)` (soup scripts: the
ingredients supply every weight), and its eval preprocessing is timm's own for that model
(`resolve_data_config` on the model's pretrained config, then `create_transform`, eval mode: resize by
the config's crop_pct, centre crop, normalise with its mean and std). `<name>` may carry a pretrained tag
(`resnet50.a1_in1k`), which picks the config. `@<size>` replaces the config's input size (CNNs take any
size; useful for small images, e.g. `timm:resnet18@64`): 1 to MAX_SIZE (4096) pixels.

Loading is strict like every other arch: the soup scripts check each ingredient's keys and shapes
against this model before any work (utils.files.ingredients.preflight), so a checkpoint of another timm model
is refused naming the keys. Checkpoints wrapped the way timm's training script or DDP saves them
(under `state_dict` / `model` / `state_dict_ema`, keys prefixed `module.`) are unwrapped by
utils.files.checkpoint_formats."""
import difflib

import torch

from utils.archs import ArchSpec, pil_rgb_then
from utils.runtime.errors import UserError

PREFIX = "timm:"
# Modules of timm's vision transformers: MEHL clips their gradient norm to 1, as the released code does
# for ViTs.
VIT_MODULES = ("vision_transformer", "deit", "eva", "beit")


def _timm():
    try:
        import timm
    except ImportError as err:
        raise UserError("--arch timm:<name> needs the PyPI package timm (pip install timm)") from err
    return timm


# The largest `@<size>`: one square image of 4096 pixels a side is 192 MiB as float32, four times the
# largest pretrained timm configs (near 1024); a bigger size would only fail later, as a MemoryError in
# a resize.
MAX_SIZE = 4096


def parse(arch):
    """'timm:resnet18@64' -> ('resnet18', 64); no '@': size None. The size is ASCII digits (str.isdigit
    also takes '²' and other scripts' digits, which int() then rejects or reads) in [1, MAX_SIZE]."""
    body = arch[len(PREFIX):]
    name, at, size = body.partition("@")
    if not name:
        raise UserError(f"--arch {arch}: give a timm model name after 'timm:' (e.g. timm:resnet18)")
    if at and not (size.isascii() and size.isdigit() and 1 <= int(size) <= MAX_SIZE):
        raise UserError(f"--arch {arch}: the input size after '@' must be a whole number of pixels from 1 "
                        f"to {MAX_SIZE} (ASCII digits), got {size!r}")
    return name, int(size) if at else None


def check_name(timm, arch, name):
    """Refuse a name this timm does not know, with the closest known names; and an unknown tag."""
    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else "; timm.list_models() lists them"
        raise UserError(f"--arch {arch}: timm {timm.__version__} has no model {base!r}{hint}")
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:  # an invalid pretrained tag
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{base}.*")]
        raise UserError(f"--arch {arch}: timm has no pretrained tag {tag!r} for {base}; known: "
                        f"{', '.join(tags) or 'none'}") from err


def spec(arch):
    """The ArchSpec of `timm:<name>[@<size>]` (checked now: unknown names fail before any work)."""
    name, size = parse(arch)  # first: a bad size is one line also where timm is not installed
    timm = _timm()
    cfg = check_name(timm, arch, name)
    from timm.data import create_transform, resolve_data_config
    overrides = {"input_size": (3, size, size)} if size else {}
    data_config = resolve_data_config(overrides, pretrained_cfg=cfg.to_dict() if cfg else {})
    preprocess = pil_rgb_then(create_transform(**data_config, is_training=False))
    module = timm.models.model_entrypoint(name.partition(".")[0]).__module__.rsplit(".", 1)[-1]

    def build(num_classes, pretrained=False):
        # A fixed random start, so two builds agree (as every arch here); the caller's RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
            except Exception as err:  # noqa: BLE001 - a download or config failure is one line
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                if pretrained:
                    raise UserError(f"--arch {arch}: timm could not load pre-trained weights ({first}); "
                                    "offline? give a checkpoint with finetune.py --pretrained") from err
                raise UserError(f"--arch {arch}: timm.create_model failed: {first}") from err
        if pretrained:  # the new head starts at zero, so the linear probe starts from the same point
            head = model.get_classifier()
            for p in head.parameters() if isinstance(head, torch.nn.Module) else ():
                torch.nn.init.zeros_(p)
        return model

    return ArchSpec(arch, build, preprocess, preprocess, is_vit=module.startswith(VIT_MODULES))
