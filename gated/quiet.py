"""Background work (uploads) goes in the gaps between scans.

The event loop runs one thing at a time, and the store thread takes its calls in order: an upload
batch built (JSON, gzip) or marked sent while a scan is being decided delays that scan by as much.
A person passes every two seconds and a scan takes two milliseconds, so the gaps are almost all of
the time; waiting for one costs an upload little and keeps the visitor's scan first (the figures
are in benchmarks/README.md, "Why the code is as it is").
"""

from __future__ import annotations

import asyncio
import contextlib

MAX_WAIT = 1.0  # a lane scanning without a break still uploads, one step a second


class Quiet:
    """Counts scans read but not yet acted on; `gap()` waits until there are none."""

    def __init__(self, max_wait: float = MAX_WAIT):
        self.max_wait = max_wait
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def busy(self) -> int:
        return self._busy

    def enter(self) -> None:
        """A scan was read (or its handling began): background work holds back."""
        self._busy += 1
        self._idle.clear()

    def leave(self) -> None:
        """That scan was acted on."""
        self._busy = max(0, self._busy - 1)
        if not self._busy:
            self._idle.set()

    async def gap(self) -> None:
        """Return when no scan is waiting or being decided, or after `max_wait` seconds."""
        if self._idle.is_set():
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.max_wait):
                await self._idle.wait()
