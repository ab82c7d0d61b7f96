"""structlog set-up: key=value lines on a terminal, one JSON object per line with --log-format=json."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

# flanneld's -v is a glog verbosity: 0 is the normal level, higher shows more.
_LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.INFO, 2: logging.DEBUG}


def configure_logging(verbosity: int = 0, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure structlog once for the process. fmt: "text" (key=value) or "json"; verbosity -1: warnings only
    (the operator verbs, whose standard output is their answer)."""
    level = _LEVELS.get(verbosity, logging.DEBUG)
    out = stream or sys.stderr
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"], drop_missing=True),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
