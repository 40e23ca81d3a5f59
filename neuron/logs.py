"""Logs: the format on stderr and in the rotating file, compact JSON lines, and cutting text at a word."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from loguru import logger

from neuron.config import LoggingConfig

TEXT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {message}"


def setup(log: LoggingConfig | None = None, command: str = "neuron") -> None:
    """stderr, and a rotating file <logging_dir>/<command>.log when set; compact JSON lines with
    --logging.json (time, level, message, where it was logged, and the exception when there is one)."""
    log = log or LoggingConfig()
    level = "TRACE" if log.trace else "DEBUG" if log.debug else "INFO"
    fmt = _json_line if log.json else TEXT + "\n{exception}"
    logger.remove()
    logger.add(sys.stderr, level=level, format=fmt)
    if log.logging_dir:
        path = Path(log.logging_dir).expanduser() / f"{command}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.add(str(path), level=level, format=fmt, rotation="50 MB", retention=5, enqueue=True)


def _json_line(record) -> str:
    """loguru's own `serialize` writes its whole record (~800 bytes a line); this is what a reader uses."""
    line = {"time": record["time"].isoformat(timespec="milliseconds"), "level": record["level"].name,
            "message": record["message"], "where": f"{record['name']}:{record['function']}:{record['line']}"}
    if (exc := record["exception"]) is not None:
        line["exception"] = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    record["extra"]["_json"] = json.dumps(line, ensure_ascii=False)
    return "{extra[_json]}\n"


def clip(text: str, limit: int) -> str:
    """`text` at most `limit` characters, cut at a word boundary with an ellipsis (for a peer's message,
    whose length is the peer's choice)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "…"
