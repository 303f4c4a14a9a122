#!/usr/bin/env bash
# Prepares, here (where PyPI is reachable), the wheels that the GPU scripts install offline on a machine
# that has PyTorch but perhaps nothing else: the whole dependency closure of open_clip_torch and of what
# the stages import (Pillow, tqdm, safetensors), for x86-64 Linux and each Python version of PY_VERSIONS,
# into .whl/ (ignored by git; carry it to the GPU machine: about 30 MiB for two versions). matplotlib,
# which only report.py's figures need (35 MiB more), is left out unless ROOTS names it. Left out:
# torch, torchvision, triton and the nvidia-* libraries (the GPU machine's own, which the bundle must not
# shadow) and numpy (torchvision requires it, so it is wherever torchvision is): the regular expression
# EXCLUDE. Works on a fresh clone with any python3 that has pip; no .venv is needed.
#   bash scripts/gpu_wheels.sh
# The closure is resolved here, level by level: each requirement is downloaded with `pip download
# --no-deps` and its wheel's Requires-Dist (markers evaluated for that Python on Linux x86-64, no extras)
# gives the next level. .whl/MANIFEST lists the wheels. scripts/gpu_check.sh installs from .whl/ with
# `pip install --no-index --find-links .whl` only the distributions its Python lacks, into /tmp/site.
# Environment: PYTHON (default python3), PY_VERSIONS (default "3.12" and this Python's version),
# ROOTS (default below), EXCLUDE (default below).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
  echo "error: $PYTHON has no pip (set PYTHON to a python3 that has one)" >&2
  exit 2
fi
HERE_VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PY_VERSIONS=${PY_VERSIONS:-$(printf '%s\n' 3.12 "$HERE_VERSION" | sort -u | tr '\n' ' ')}
ROOTS=${ROOTS:-"open_clip_torch==3.3.0 pillow tqdm safetensors"}
EXCLUDE=${EXCLUDE:-'^(torch|torchvision|triton|nvidia-.*|numpy)$'}
mkdir -p .whl
PY_VERSIONS=$PY_VERSIONS ROOTS=$ROOTS EXCLUDE=$EXCLUDE "$PYTHON" - <<'EOF'
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from pip._vendor.packaging.markers import Marker
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

OUT = Path(".whl")
EXCLUDE = re.compile(os.environ["EXCLUDE"])
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "linux_x86_64", "any"]


def environment(version):
    return {"python_version": version, "python_full_version": version + ".0", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def download(reqs, version):
    """{canonical name: wheel path in .whl} for `reqs`, each resolved alone for Python `version`."""
    with tempfile.TemporaryDirectory() as tmp:
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", version, "--implementation", "cp", *platforms, "-d", tmp,
                        *map(str, reqs)], check=True)
        got = {}
        for wheel in Path(tmp).glob("*.whl"):
            name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
            shutil.copy(wheel, OUT / wheel.name)
            got[name] = OUT / wheel.name
        return got


def requires(wheel, version):
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        fields = Parser().parsestr(z.read(meta).decode("utf-8"))
    reqs = [Requirement(r) for r in fields.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(environment(version))]


kept = set()
for version in os.environ["PY_VERSIONS"].split():
    specs, chosen = {}, {}
    level = [Requirement(r) for r in os.environ["ROOTS"].split()]
    while level:
        todo = {}
        for req in level:
            name = canonicalize_name(req.name)
            if EXCLUDE.match(name):
                continue
            spec = specs[name] = specs.get(name, req.specifier) & req.specifier
            version_chosen = chosen.get(name)
            if version_chosen is None or not spec.contains(version_chosen, prereleases=True):
                todo[name] = Requirement(f"{name}{spec}")
        level = []
        for name, wheel in download(list(todo.values()), version).items():
            chosen[name] = parse_wheel_filename(wheel.name)[1]
            kept.add(wheel.name)
            level += requires(wheel, version)
    print(f"Python {version}: {len(chosen)} distributions: "
          + ", ".join(f"{n} {v}" for n, v in sorted(chosen.items())))
for stale in OUT.glob("*.whl"):
    if stale.name not in kept:
        stale.unlink()
(OUT / "MANIFEST").write_text("".join(name + "\n" for name in sorted(kept)))
size = sum((OUT / n).stat().st_size for n in kept)
print(f"{len(kept)} wheels, {size / 2**20:.1f} MiB in {OUT}/ (listed in {OUT}/MANIFEST)")
EOF
