"""Prompt sources for the validator: text spans, salted per miner, from a corpus on disk."""

from __future__ import annotations

import json
import random
import re
from importlib import resources
from pathlib import Path
from typing import Protocol, Sequence

_WORD = re.compile(r"[a-z]{3,12}")


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer that prompts need."""

    all_special_ids: list[int]

    def encode(self, text: str) -> list[int]: ...

    def __len__(self) -> int: ...


class PromptSource:
    """Paragraphs of plain text to cut prompts from."""

    def __init__(self, paragraphs: Sequence[str]) -> None:
        self.paragraphs = tuple(p for p in (p.strip() for p in paragraphs) if p)
        if not self.paragraphs:
            raise ValueError("a prompt source needs at least one non-empty paragraph")
        # Sorted, so that a seeded rng picks the same words in every process whatever the hash seed.
        self.words = tuple(sorted({w for p in self.paragraphs for w in _WORD.findall(p.lower())}))

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

    def salted_prompt_text(self, text: str, rng: random.Random) -> str:
        """text behind a short random line (2-4 corpus words and a number), unique per miner.

        The words come from the corpus, so the prompt stays natural text for the model.
        """
        words = [rng.choice(self.words) for _ in range(rng.randint(2, 4))]
        return f"{' '.join(words).capitalize()} {rng.randrange(10, 100_000)}.\n\n{text}"


def salted_prompt_ids(
    tokenizer: Tokenizer, text: str, rng: random.Random, n_salt_tokens: int, seq_len: int, vocab_size: int
) -> list[int]:
    """Token ids: the tokenizer's leading special tokens (OPT's BOS), random salt, then text.

    Salt ids are drawn from ids both the tokenizer and the model know (OPT's model vocabulary is
    padded past the tokenizer's with untrained rows), never a special id, so a miner cannot tell
    salt from text. The result is cut to seq_len.
    """
    if n_salt_tokens < 0 or seq_len < 1 or vocab_size < 1:
        sizes = f"n_salt_tokens={n_salt_tokens} seq_len={seq_len} vocab_size={vocab_size}"
        raise ValueError(f"bad sizes: {sizes}")
    ids = list(tokenizer.encode(text))
    special = set(tokenizer.all_special_ids)
    n_prefix = next((i for i, t in enumerate(ids) if t not in special), len(ids))
    if n_prefix + n_salt_tokens >= seq_len:
        raise ValueError(f"seq_len {seq_len} leaves no room for text after {n_salt_tokens} salt tokens")
    upper = min(vocab_size, len(tokenizer))
    if len(special.intersection(range(upper))) >= upper:
        raise ValueError("the vocabulary has no ordinary token to salt with")
    salt: list[int] = []
    while len(salt) < n_salt_tokens:
        t = rng.randrange(upper)
        if t not in special:
            salt.append(t)
    return (ids[:n_prefix] + salt + ids[n_prefix:])[:seq_len]


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
