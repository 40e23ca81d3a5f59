"""The weights fingerprint of a checkpoint directory: the same for the same files on every backend."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
_CHUNK = 1 << 22


def checkpoint_fingerprint(directory: str | Path) -> str:
    """SHA-256 over the sorted weight files (*.safetensors, *.bin) of a local checkpoint: each file's
    name, size and bytes. Backends that load weights their own way (vLLM) cannot hash tensors the
    way the HF model does, but every backend can hash the files it loaded."""
    root = Path(directory).expanduser()
    files = sorted({p for pattern in WEIGHT_PATTERNS for p in root.glob(pattern) if p.is_file()},
                   key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weight files in {root}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{path.stat().st_size}\n".encode())
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def checkpoint_dir(name: str) -> Path:
    """The local directory of a checkpoint: `name` itself when it is one, else its Hugging Face cache
    snapshot (never downloads: whoever loaded the model has already fetched it)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, local_files_only=True))
