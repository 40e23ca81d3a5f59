"""Logs an operator can read: compact JSON lines, text cut at a word, quiet broken pipes."""

from __future__ import annotations

import json
import subprocess
import sys

from loguru import logger

from neuron import logs
from neuron.config import LoggingConfig


def test_json_lines_are_compact_and_carry_the_traceback(tmp_path):
    logs.setup(LoggingConfig(json=True, logging_dir=str(tmp_path)), "unit")
    logger.warning("a miner said 'no' twice")
    try:
        raise ValueError("bad shape")
    except ValueError:
        logger.exception("judging failed")
    logger.complete()  # the file sink writes from its own thread
    logs.setup()
    lines = (tmp_path / "unit.log").read_text().splitlines()
    assert len(lines) == 2  # one line per record, the traceback inside it
    first, second = map(json.loads, lines)
    assert set(first) == {"time", "level", "message", "where"}
    assert first["level"] == "WARNING" and first["message"] == "a miner said 'no' twice"
    assert first["where"].startswith("test_logs:test_json_lines_are_compact_and_carry_the_traceback:")
    assert len(lines[0]) < 250  # loguru's own serialize writes ~800 bytes for the same record
    assert second["exception"].startswith("Traceback") and "ValueError: bad shape" in second["exception"]


def test_clip_cuts_at_a_word():
    text = "generate: the answer names a token outside the allowed set at position 12"
    assert logs.clip(text, 200) == text
    clipped = logs.clip(text, 40)
    assert len(clipped) <= 40 and clipped.endswith("…")
    assert text.startswith(clipped[:-1]) and text[len(clipped) - 1] == " "  # cut before a space, not mid-word
    assert logs.clip("x" * 100, 10) == "x" * 9 + "…"  # one long word: cut anyway, bounded
    assert logs.clip("a\nb\tc", 10) == "a b c"  # a peer's control characters do not split log lines


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `true` has left long before Python starts writing, so the first write meets a closed pipe.
    cmd = f"{sys.executable} -m neuron.cli validator --help | true"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert out.stderr == ""
    assert out.returncode == 141
