"""The fast path's Triton kernels (utils/soup/segmented.py) compiled offline, without a GPU, down to the
machine code of sm_80 (A100), sm_86 (consumer Ampere) and sm_90 (H100, H200) with Triton's bundled ptxas:
for rows in float32 and bfloat16, every launch the fast path makes loads the rows 128 bits at a time
(ld.global.v4 in the PTX, LDG.E.128 in the SASS) when the rows are padded as a run pads them, spills no
register, and before sm_90 leaves room for two programs on an SM (see segmented.TILES_BEFORE_SM90).

The launches are the fast path's own: `segmented.project` and `combine` run on CPU tensors with the
launch recorded instead of run, and each recorded argument is specialised as Triton's JIT specialises
it at a launch (an integer divisible by 16, a 16-byte aligned pointer, the value 1)."""
import inspect
import re
import subprocess
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from utils.soup import segmented, segmented_kernels  # noqa: E402

pytestmark = pytest.mark.slow
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
D = 1000                  # D mod 16 = 8, as ViT-B/32's 88,362,216 learned numbers
REGISTERS = 65536         # per SM on sm_80, sm_86 and sm_90


def launches(monkeypatch, P, capability):
    """(kernel name, arguments, meta) of every launch of one projection and one combine over rows P on
    a GPU of `capability`, recorded (nothing runs)."""
    calls = []

    def record(name, grid, *args, **meta):
        calls.append((name, args, meta))
        return True

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that supports() takes CPU tensors
    monkeypatch.setattr(segmented, "_launch", record)
    monkeypatch.setattr(segmented, "tiles", lambda device: segmented.tiles_for(capability))
    bounds = [(0, 300), (300, 301), (301, D)]
    g, X = torch.randn(D), torch.randn(P.shape[0], len(bounds))
    assert segmented.supports(P, g, bounds)
    segmented.project(P, g, bounds)
    segmented.combine(X, P, bounds, torch.zeros(D), accumulate=True)
    monkeypatch.delenv("TRITON_INTERPRET")  # triton.jit compiles from here on
    return calls


def compiled(name, args, meta, capability):
    """The kernel compiled for sm_<capability> as Triton's JIT would for these arguments: (ptx, ptxas's
    report, sass)."""
    fn = getattr(segmented_kernels, name)
    names = list(inspect.signature(fn).parameters)
    signature, constants, attrs = {}, {}, {}
    for i, (arg_name, value) in enumerate(zip(names, args)):
        kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            signature[arg_name], constants[arg_name] = "constexpr", key
        else:
            signature[arg_name], attrs[(i,)] = kind, BaseBackend.parse_attr(key or "")
    warps = meta.pop("num_warps")
    for k, v in meta.items():
        signature[k], constants[k] = "constexpr", v
    kernel = triton.compile(ASTSource(triton.jit(fn), signature, constexprs=constants, attrs=attrs),
                            target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
    return kernel.asm["ptx"], kernel.asm["cubin"], warps


def ptxas_and_sass(ptx, capability, tmp_path):
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    (tmp_path / "k.ptx").write_text(ptx)
    done = subprocess.run([str(BIN / "ptxas"), "-v", f"--gpu-name={arch}", str(tmp_path / "k.ptx"),
                           "-o", str(tmp_path / "k.cubin")], capture_output=True, text=True, check=True)
    sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True, check=True).stdout
    return done.stdout + done.stderr, sass


@pytest.mark.parametrize("capability", [80, 86, 90])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_rows_are_loaded_128_bits_at_a_time_without_spills(monkeypatch, tmp_path, capability, dtype):
    P = segmented.empty_rows(18, D, dtype, "cpu")
    P.normal_()
    assert P.stride(0) == segmented.padded(D) == 1008
    calls = launches(monkeypatch, P, (capability // 10, capability % 10))
    assert [name for name, _, _ in calls] == ["project_partials", "project_blocks", "combine"]
    for name, args, meta in calls:
        ptx, _, warps = compiled(name, args, dict(meta), capability)
        report, sass = ptxas_and_sass(ptx, capability, tmp_path)
        registers = int(re.search(r"Used (\d+) registers", report).group(1))
        assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", report), (name, report)
        assert not re.search(r"[1-9]\d* bytes spill", report), (name, report)
        if name != "project_blocks":  # it reads the partial sums, not the rows
            assert "ld.global.v4" in ptx and "LDG.E.128" in sass, name
        if capability < 90 and name != "project_blocks":
            # two programs of `warps` warps fit an SM's registers (ptxas allocates in steps of 8)
            assert 2 * (-(-registers // 8) * 8) * warps * 32 <= REGISTERS, (name, registers)


def test_unpadded_rows_are_loaded_in_scalars(monkeypatch):
    """What the padding is for (and that the check above can tell): rows D apart load 32 bits at a time."""
    P = torch.randn(18, D)
    for name, args, meta in launches(monkeypatch, P, (9, 0)):
        if name != "project_blocks":
            ptx, _, _ = compiled(name, args, dict(meta), 90)
            assert "ld.global.v4" not in ptx and "ld.global.b32" in ptx, name
