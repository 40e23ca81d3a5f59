"""The weights fingerprint of a checkpoint, and the quantization it declares: the same for the same files on
every backend."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
_CHUNK = 1 << 22


def quantization_of(config: dict) -> str:
    """The quantization a checkpoint's config.json declares, as Info and docs/models.md name it: "" for none,
    "bnb-4bit-nf4" / "bnb-4bit-fp4" (with "-dq" for double quantization), "bnb-8bit"; another method by its
    own name and bits ("gptq-4bit", "awq-4bit", "fp8")."""
    q = config.get("quantization_config") or {}
    if not q:
        return ""
    method = q.get("quant_method", "unknown")
    method = str(getattr(method, "value", method)).lower()  # an enum in a loaded config, a string in config.json
    if method == "bitsandbytes":
        if q.get("load_in_4bit") or q.get("_load_in_4bit"):
            return f"bnb-4bit-{q.get('bnb_4bit_quant_type', 'fp4')}" + ("-dq" if q.get("bnb_4bit_use_double_quant") else "")
        return "bnb-8bit"
    bits = q.get("bits") or q.get("w_bit")
    return f"{method}-{bits}bit" if bits else method


def checkpoint_quantization(path: str | Path) -> str:
    """quantization_of a local checkpoint's config.json ("" where it has none)."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return ""
    return quantization_of(json.loads(config.read_text()))


def checkpoint_fingerprint(directory: str | Path) -> str:
    """SHA-256 over the sorted weight files (*.safetensors, *.bin) of a local checkpoint: each file's name, size
    and bytes; then, for a quantized checkpoint, its declared quantization (the same files read with another
    quantization config are another model). Backends that load weights their own way (vLLM) cannot hash tensors
    the way the HF model does, but every backend can hash the files it loaded."""
    root = Path(directory).expanduser()
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in root.glob(pattern) if p.is_file()}, key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {root}")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{f.stat().st_size}\n".encode())
        with f.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    if quantization := checkpoint_quantization(root):  # unquantized checkpoints keep the fingerprint they had
        digest.update(f"quantization:{quantization}\n".encode())
    return digest.hexdigest()


def checkpoint_dir(name: str) -> Path:
    """The local directory of a checkpoint: `name` itself when it is one, else its Hugging Face cache
    snapshot (never downloads: whoever loaded the model has already fetched it)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, local_files_only=True))
