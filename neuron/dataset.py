"""Prompt sources for the validator: plain text spans from a corpus on disk."""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path
from typing import Sequence


class PromptSource:
    """Paragraphs of plain text to cut prompts from."""

    def __init__(self, paragraphs: Sequence[str]) -> None:
        self.paragraphs = tuple(p for p in (p.strip() for p in paragraphs) if p)
        if not self.paragraphs:
            raise ValueError("a prompt source needs at least one non-empty paragraph")

    def __len__(self) -> int:
        return len(self.paragraphs)

    @classmethod
    def default(cls) -> PromptSource:
        """The original prose corpus shipped inside the package."""
        text = resources.files("neuron").joinpath("assets/corpus.txt").read_text(encoding="utf-8")
        return cls(_split_paragraphs(text))

    @classmethod
    def from_file(cls, path: str | Path) -> PromptSource:
        """Paragraphs from a .txt file (separated by blank lines) or a .jsonl file ({"text": ...})."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".txt":
            paragraphs = _split_paragraphs(text)
        elif path.suffix == ".jsonl":
            paragraphs = _jsonl_texts(text, path)
        else:
            raise ValueError(f"{path}: expected a .txt or .jsonl file")
        if not any(p.strip() for p in paragraphs):
            raise ValueError(f"{path}: no text in the file")
        return cls(paragraphs)

    def sample_span(self, rng: random.Random, min_chars: int, max_chars: int) -> str:
        """A span of one random paragraph, starting and ending at word boundaries.

        Paragraphs of at least min_chars are preferred; where there are none, a shorter one is
        returned whole. A span is at most max_chars, unless its first word alone is longer.
        """
        if not 0 < min_chars <= max_chars:
            raise ValueError(f"need 0 < min_chars <= max_chars, got {min_chars}, {max_chars}")
        long_enough = [p for p in self.paragraphs if len(p) >= min_chars]
        para = rng.choice(long_enough or self.paragraphs)
        starts = [0] + [m.end() for m in re.finditer(r"\s+", para)]
        starts = [s for s in starts if len(para) - s >= min_chars] or [0]
        start = rng.choice(starts)
        end = start + rng.randint(min_chars, max_chars)
        if end < len(para):
            cut = max(para.rfind(c, start, end + 1) for c in " \n\t")
            end = cut if cut > start else end
        return para[start:end].strip()


def _split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _jsonl_texts(text: str, path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n}: bad JSON: {exc.msg}") from exc
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f'{path}:{n}: expected an object with a string "text" field')
        texts.append(obj["text"])
    return texts
