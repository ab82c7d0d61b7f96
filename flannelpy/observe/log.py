"""structlog set-up: key=value lines on a terminal, one JSON object per line with --log-format=json."""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Any, TextIO

import structlog

# flanneld's -v is a glog verbosity: 0 is the normal level, higher shows more.
_LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.INFO, 2: logging.DEBUG}

_lost = [0]


def lines_lost() -> int:
    """Log lines that could not be written since start (flannel_log_lines_lost_total)."""
    return _lost[0]


class _LineWriter:
    """Writes each line with one write(2) on the stream's descriptor (print() where it has none, as in tests).
    A failed write is counted, never raised: a log call sits in every loop of the daemon (watch, renewal, the
    data path's), and a broken stderr (journald restarted, a full disk, the reader of a pipe gone) must cost
    log lines, not the network. flanneld's Go logger ignores write errors too. No buffer: a line that failed
    is not left behind to fail again at the next line or at exit."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (OSError, ValueError, AttributeError):  # io.StringIO, pytest's capture
            self._fd = None

    def msg(self, message: str) -> None:
        try:
            if self._fd is None:
                print(message, file=self._stream, flush=True)
                return
            data = (message + "\n").encode("utf-8", "backslashreplace")
            while data:
                data = data[os.write(self._fd, data):]
        except (OSError, ValueError) as e:  # ValueError: the stream was closed
            _lost[0] += 1
            if isinstance(e, OSError) and e.errno == errno.EPIPE and self._fd is not None:
                self._silence(self._fd)

    @staticmethod
    def _silence(fd: int) -> None:
        # The reader is gone for good: /dev/null in its place, so later lines cost one cheap write and
        # whatever else writes to that descriptor (a traceback at exit) does not fail either.
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        except OSError:
            pass

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


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
        logger_factory=lambda *args: _LineWriter(out),
        cache_logger_on_first_use=False,
    )
