"""Incremental text and stop strings for one generation, at the edge: the same for every engine backend."""

from __future__ import annotations


class Detokenizer:
    """Turns a generation's tokens into text deltas, one token at a time.

    A delta is held back while a multi-byte character is incomplete, or while the text ends with the
    start of a stop string, so the deltas of a generation add up to its decoded tokens cut before the
    first stop string. Only a short window of tokens is decoded per token (the last emitted window,
    then the new ones), so the cost per token does not grow with the length.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text = ""  # emitted so far (cut before a stop string)
        self.decoded = ""  # text of tokens[:read], some of it maybe held back from `text`
        self.prefix = 0  # tokens[prefix:read] is the window decoded last time
        self.read = 0
        self.stopped = False  # a stop string appeared: the generation must end here

    def add(self, token: int, last: bool) -> str:
        """The text `token` adds; `last` flushes what was held back (the generation ends with it)."""
        self.tokens.append(token)
        decode = self.tokenizer.decode
        before = decode(self.tokens[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.tokens[self.prefix:], skip_special_tokens=True)
        new = after[len(before):]
        full = self.decoded + new
        # Only a match reaching into the new text is new: earlier text was searched already.
        cuts = [c for c in (full.find(s, max(0, len(self.decoded) - len(s) + 1)) for s in self.stop) if c != -1]
        if cuts:
            self.stopped = True
            shown = full[:min(cuts)]
        elif last:
            shown = full
        elif new.endswith("\ufffd"):
            return ""
        else:
            self.decoded, self.prefix, self.read = full, self.read, len(self.tokens)
            held = max((k for s in self.stop for k in range(1, len(s)) if full.endswith(s[:k])), default=0)
            shown = full[:len(full) - held]
        delta = shown[len(self.text):]
        self.text += delta
        return delta
