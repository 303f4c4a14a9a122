"""Check a device can run the paper's model: the clip-vit-b32 wrapper (random weights), forward +
backward at batch 128, 224 px; prints peak memory and images per second.

    python scripts/gpu_check.py                                  # CUDA, batch 128, 10 timed iterations
    python scripts/gpu_check.py --device cpu --batch-size 2 --iters 1 --warmup 1   # CPU smoke test

Matmuls run in exact fp32 unless --tf32. On CPU the memory printed is the process's peak resident set.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.archs import get_arch  # noqa: E402
from utils.runtime.memory import gib, peak_bytes, reset_peak  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="clip-vit-b32", help="architecture name (default: clip-vit-b32)")
    p.add_argument("--device", default="cuda", help="torch device (default: cuda; 'cpu' for a smoke test)")
    p.add_argument("--batch-size", type=int, default=128, help="images per iteration (default: 128)")
    p.add_argument("--image-size", type=int, default=224, help="image side in pixels (default: 224)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the linear head (default: 1000)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default: 3)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (default: 10)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA (default: exact fp32)")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(model, x, y):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: CUDA is not available here (use --device cpu for a smoke test)")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    model = get_arch(args.arch).build(args.num_classes, pretrained=False).to(device).train()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
    for _ in range(args.warmup):
        step(model, x, y)
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        loss = step(model, x, y)
    sync(device)
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"device {name}, arch {args.arch}, batch {args.batch_size}, {args.image_size} px, "
          f"params {total / 1e6:.1f} M ({trained / 1e6:.1f} M trained), loss {loss.item():.3f}")
    print(f"forward+backward: {args.iters * args.batch_size / seconds:.1f} images/s "
          f"({seconds / args.iters * 1000:.1f} ms/iter over {args.iters} iterations)")
    kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak resident set of the process"
    print(f"peak memory: {gib(peak_bytes(device)):.2f} GiB ({kind})")


if __name__ == "__main__":
    main()
