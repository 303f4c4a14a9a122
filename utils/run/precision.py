"""--precision: the arithmetic of the model's forward (and so of its backward) in learning and in every
evaluation.

- fp32 (the default, as released): everything in float32.
- amp_bf16: the model's forward runs under torch.autocast(device type, bfloat16): matrix products and
  convolutions in bfloat16 (accumulated in float32 by the kernels), the rest as autocast decides; the
  logits come back as float32, so the loss, the argmax and everything after are float32. MEHL's
  projection and combine, Learned-Soup's mixing of the ingredients, the soup itself and the optimizer
  stay float32. It changes the numbers, so it defines a run (it is not in utils/run/cli.py
  NOT_DEFINING). A frozen prefix's outputs (utils/run/prefix.py) are computed once in float32.

A recipe applies it where it says what it runs (utils/run/inputs.py): the module it runs on a data set,
wrapped in `Autocast`."""
import contextlib
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "amp_bf16")
DEFAULT = "fp32"


def use_tf32(on):
    """--tf32: matmuls (cuBLAS) and convolutions (cuDNN) of float32 tensors on CUDA may use TF32 tensor
    cores (a 10-bit mantissa in the products, float32 accumulation). Off, torch's defaults are left as
    they are, which is what the released code ran: exact float32 matmuls (cuDNN convolutions are TF32 by
    torch's own default; a ViT's only one is its patch embedding). No effect on a CPU. It changes the
    numbers, so it defines a run (utils/run/cli.py ADDED_DEFAULTS: off matches runs made before the flag)."""
    if on:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def warn_if_slow(precision, device):
    """amp_bf16 on a CPU without bfloat16 instructions runs emulated kernels: say so once, at the start
    (measured on an AVX2 EPYC: CLIP ViT-B/32 forward/backward 32x, MEHL-Soup+ on the default zoo 51x
    slower than fp32)."""
    if precision != DEFAULT and torch.device(device).type == "cpu" and not _cpu_has_bf16():
        log.warning("--precision %s on a CPU without bfloat16 instructions (%s): expect it to be many times "
                    "slower than fp32; it is meant for GPUs", precision, torch.backends.cpu.get_cpu_capability())


def _cpu_has_bf16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True  # cannot tell: no warning


def autocast(precision, device):
    """The context a forward runs in: nothing for fp32, bfloat16 autocast on `device`'s type for amp_bf16."""
    if precision == DEFAULT:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


class Autocast(nn.Module):
    """`model` under amp_bf16 as a module (for torch.func.functional_call): its tensors are the model's,
    under `model.`; the logits come back as float32."""

    def __init__(self, model, device):
        super().__init__()
        self.model, self.device = model, device

    def forward(self, x):
        with autocast("amp_bf16", self.device):
            out = self.model(x)
        return out.float()
