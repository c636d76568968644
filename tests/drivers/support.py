"""Running a reader under test: its scans() consumed in the background, and bounded waits."""

from __future__ import annotations

import asyncio
import time


async def until(condition, timeout: float = 5.0, what: str = "condition") -> None:
    """Wait for `condition()` to hold, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


class Running:
    """A reader's scans() consumed in the background into a queue."""

    def __init__(self, reader):
        self.reader = reader
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self):
        async for scan in self.reader.scans():
            self.queue.put_nowait(scan)

    async def connected(self) -> Running:
        await until(lambda: self.reader.connected, what=f"{self.reader.name} to open its device")
        return self

    async def next(self, timeout: float = 2.0):
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def stop(self):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
