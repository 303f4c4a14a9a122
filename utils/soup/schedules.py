"""Learning-rate schedules."""
import math


def cosine_with_warmup(base_lr, total_steps, warmup_frac=0.2):
    """lr(step): linear warm-up over the first `warmup_frac` of steps, then cosine to 0 (released MEHL)."""
    warmup = int(warmup_frac * total_steps)

    def lr(step):
        if step < warmup:
            return base_lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr
    return lr


def constant(base_lr):
    return lambda step: base_lr


def set_lr(optimizer, value):
    for group in optimizer.param_groups:
        group["lr"] = value
