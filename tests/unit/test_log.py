"""The log writer: a line that cannot be written is counted and lost, never raised into the daemon's loops."""

from __future__ import annotations

import io
import os

from flannelpy.observe.log import _LineWriter, lines_lost


def test_a_full_device_costs_the_line_and_is_counted() -> None:
    with open("/dev/full", "w") as full:  # every write: ENOSPC
        before = lines_lost()
        _LineWriter(full).info("event=one")
        _LineWriter(full).warning("event=two")
        assert lines_lost() == before + 2


def test_a_closed_stream_costs_the_line_and_is_counted() -> None:
    stream = io.StringIO()
    stream.close()
    before = lines_lost()
    _LineWriter(stream).error("event=gone")
    assert lines_lost() == before + 1


def test_a_pipe_without_reader_is_replaced_by_dev_null() -> None:
    r, w = os.pipe()
    os.close(r)
    with os.fdopen(w, "w") as stream:
        writer = _LineWriter(stream)
        before = lines_lost()
        writer.info("event=first")  # EPIPE: this line is lost ...
        writer.info("event=second")  # ... and the next ones go to /dev/null without error
        assert lines_lost() == before + 1
        assert os.path.samestat(os.fstat(stream.fileno()), os.stat(os.devnull))
    # Closing flushed what was left in the buffer without an error (the exit flush does the same).


def test_lines_are_written_as_they_are() -> None:
    stream = io.StringIO()
    _LineWriter(stream).info("event=ok a=1")
    assert stream.getvalue() == "event=ok a=1\n"
