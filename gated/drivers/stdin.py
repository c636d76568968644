"""The `stdin` reader: codes typed on the terminal (or piped in), one per line. For the demo and tests."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from typing import BinaryIO, TextIO

from gated.drivers.base import Reader
from gated.model import Scan
from gated.schema import Section

log = logging.getLogger(__name__)

SCHEMA: dict = {}

# A line longer than this is passed on cut (and denied as oversize), the rest of it skipped:
# a pipe without newlines must not grow memory without bound. Not below the largest max_length.
MAX_LINE_BYTES = 65536


def read_lines(stream: BinaryIO, encoding: str = "utf-8", limit: int = MAX_LINE_BYTES) -> Iterator[str]:
    """Lines of a byte stream as text, each at most `limit` bytes, until end of input.

    Decoded here, not by a text layer: with a strict locale one invalid byte would end the reader
    for good. surrogateescape keeps such bytes as lone surrogates, which normalising refuses, so
    that line alone is denied `malformed` and the next one is read.
    """
    while line := stream.readline(limit + 1):  # a line of `limit` bytes and its newline is whole
        if not line.endswith(b"\n") and len(line) > limit:
            while (rest := stream.readline(limit)) and not rest.endswith(b"\n"):
                pass  # the remainder of an overlong line
            # Multi-byte text is fewer characters than bytes: padded past `limit`, a cut start is
            # longer than any max_length, never decided as a shorter code (as serial_qr does).
            text = line.decode(encoding, "surrogateescape")
            yield text + "\ufffd" * (limit + 1 - len(text))
            continue
        yield line.decode(encoding, "surrogateescape")


class StdinReader(Reader):
    def __init__(self, name: str, section: Section, stream: TextIO | None = None):
        super().__init__(name, section)
        self.stream = stream or sys.stdin

    async def scans(self) -> AsyncIterator[Scan]:
        loop = asyncio.get_running_loop()
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        # A daemon thread, not the loop's executor: a read blocked on a terminal must not keep
        # the process from exiting on SIGTERM (asyncio waits for executor threads, not daemons).
        threading.Thread(target=self._pump, args=(loop, lines), name=f"stdin-{self.name}",
                         daemon=True).start()
        if self.stream.isatty():
            log.info("reader %s: type a ticket code and press Enter", self.name)
        while (line := await lines.get()) is not None:
            text = line.rstrip("\r\n")
            if text:
                yield Scan(token=text, reader=self.name, input=self.input, raw_length=len(text))
        log.info("reader %s: end of input; it stops, the gate keeps running", self.name)

    def _pump(self, loop: asyncio.AbstractEventLoop, lines: asyncio.Queue) -> None:
        binary = getattr(self.stream, "buffer", None)
        try:
            if binary is not None:
                source = read_lines(binary, getattr(self.stream, "encoding", None) or "utf-8")
            else:  # a text stream without bytes below it (tests): already text
                source = iter(self.stream.readline, "")
            for line in source:
                loop.call_soon_threadsafe(lines.put_nowait, line)
        except (OSError, ValueError) as e:  # closed or unreadable stdin
            log.warning("reader %s: stdin unreadable (%s)", self.name, e)
        finally:
            try:
                loop.call_soon_threadsafe(lines.put_nowait, None)
            except RuntimeError:  # the loop is already closed: nobody is listening
                pass


def create(name: str, section: Section) -> Reader:
    return StdinReader(name, section)
