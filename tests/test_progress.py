"""The progress line: drawn on a real terminal (a pty), silent into a pipe and under systemd."""

from __future__ import annotations

import io
import os
import select
import sys

import pytest

from gated.progress import Progress

MARK = "<end of screen>"


@pytest.fixture
def terminal():
    """A text stream on a pty slave, and a function reading what reached the terminal."""
    master, slave = os.openpty()
    stream = open(slave, "w", buffering=1, closefd=False)  # noqa: SIM115 - closed below

    def screen() -> str:
        """Everything written so far: a marker written after it proves the pty has passed it all on."""
        stream.write(MARK)
        stream.flush()
        out = b""
        while not out.endswith(MARK.encode()):
            ready, _, _ = select.select([master], [], [], 5)
            assert ready, f"the terminal went quiet before the marker: {out!r}"
            out += os.read(master, 65536)
        return out.decode()[: -len(MARK)]

    yield stream, screen
    stream.close()
    os.close(master)
    os.close(slave)


def test_draws_one_line_that_rewrites_itself_and_ends_it_on_finish(terminal):
    stream, screen = terminal
    with Progress("sync tickets", total=200, stream=stream, interval=0) as p:
        p.update(50, note="page 1")
        p.update(200, note="page 4")
    out = screen()
    assert out.startswith("\rsync tickets: 50/200 (25%) page 1")
    assert "\rsync tickets: 200/200 (100%) page 4" in out
    assert out.endswith("\r\n") and out.count("\n") == 1  # the pty turns "\n" into "\r\n"


def test_redraws_at_most_every_interval_however_often_it_is_updated(terminal):
    stream, screen = terminal
    p = Progress("upload", total=100_000, stream=stream, interval=60)
    for done in range(0, 100_001, 100):
        p.update(done)
    p.finish()
    draws = screen().count("upload: ")
    assert draws == 2  # the first update and the final state


def test_silent_into_a_pipe():
    stream = io.StringIO()
    with Progress("sync tickets", total=10, stream=stream, interval=0) as p:
        p.update(5)
    assert stream.getvalue() == ""


def test_silent_under_systemd_even_on_a_terminal(terminal, monkeypatch):
    stream, screen = terminal
    st = os.fstat(stream.fileno())
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")  # what systemd sets for a service
    with Progress("sync tickets", total=10, interval=0) as p:
        p.update(5)
    assert screen() == ""
