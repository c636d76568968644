"""Progress of long work (a big ticket-list sync, a bulk upload) for a person at a terminal.

One self-rewriting line on stderr, only when stderr is an interactive terminal and gated is not
running under systemd: the journal must get one line per event, not a counter redrawn ten times a
second, and a pipe or a log file gets nothing at all.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from gated.logs import under_systemd


def interactive(stream: TextIO | None = None) -> bool:
    """True when `stream` (default stderr) is a terminal a person is looking at."""
    stream = stream or sys.stderr
    try:
        return stream.isatty() and not under_systemd()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


class Progress:
    """`with Progress("sync tickets", total=n) as p: ... p.update(done)`; silent when not interactive.

    Redraws at most every `interval` seconds so a tight loop pays almost nothing for it; the
    final state is always drawn on exit, then the line is ended.
    """

    def __init__(self, label: str, total: int | None = None, *, stream: TextIO | None = None,
                 interval: float = 0.2, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = interactive(self.stream) if enabled is None else enabled
        self.label = label
        self.total = total
        self.done = 0
        self.note = ""
        self.interval = interval
        self._started = time.monotonic()
        self._drawn = 0.0
        self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def update(self, done: int | None = None, *, total: int | None = None, note: str = "",
                advance: int = 0) -> None:
        """Set (or advance) the count; `note` names the current item, e.g. the check being run."""
        if total is not None:
            self.total = total
        self.done = done if done is not None else self.done + advance
        self.note = note or self.note
        now = time.monotonic()
        if self.enabled and now - self._drawn >= self.interval:
            self._draw(now)

    def finish(self, text: str = "") -> None:
        """Draw the final state (or `text`) and end the line; nothing when not interactive."""
        if not self.enabled:
            return
        if text:
            self._write(f"{self.label}: {text}")
        else:
            self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()
        self.enabled = False  # a second finish() must not print another line

    def clear(self) -> None:
        """Erase the line (for output that replaces it, e.g. a report printed on stdout)."""
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def _draw(self, now: float) -> None:
        self._drawn = now
        if self.total:
            count = f"{self.done}/{self.total} ({100 * self.done // max(self.total, 1)}%)"
        else:
            count = str(self.done)
        elapsed = now - self._started
        rate = f", {self.done / elapsed:,.0f}/s" if elapsed >= 1 and self.done else ""
        note = f" {self.note}" if self.note else ""
        self._write(f"{self.label}: {count}{rate}{note}")

    def _write(self, text: str) -> None:
        pad = max(0, self._width - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._width = len(text)
