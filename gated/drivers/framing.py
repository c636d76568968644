"""Pure: a serial engine's byte stream -> frames (by terminator or idle gap) -> text, bounded in memory.

Reads arrive in arbitrary pieces: half a frame, three frames, a CR in one read and its LF in the
next. The Framer holds at most `limit` bytes of an unfinished frame; a longer one is cut, reported
once as a `cut` frame, and the rest of it is skipped up to its end, so a babbling or misconfigured
device can never make gated buffer without bound. Times are passed in (monotonic seconds), so the
same code serves the reader and the tests.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

# Names an installer may give; any other text is the terminator's own bytes (TOML escapes such as
# "\u0003" give control bytes; each character is one byte, so only U+0000..U+00FF).
NAMED = {"line": None, "cr": b"\r", "lf": b"\n", "crlf": b"\r\n", "none": b""}
_LINE = re.compile(rb"[\r\n]+")


def terminator_bytes(value: str) -> bytes | None:
    """Config value -> bytes to split on; None for "line" (CR, LF or CRLF); b"" for "none".

    Raises ValueError for text that cannot be bytes.
    """
    if value in NAMED:
        return NAMED[value]
    if not value:
        raise ValueError('empty; use "none" to frame by idle gap only')
    return to_bytes(value)


def to_bytes(text: str) -> bytes:
    """Config text (TOML escapes allowed) -> bytes, one byte per character; ValueError above U+00FF."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("only characters U+0000 to U+00FF, one byte each (write bytes as \\u00XX)") from None


@dataclass(frozen=True)
class Frame:
    data: bytes  # at most `limit` bytes
    by: str  # "terminator" | "idle" | "limit"
    cut: bool = False  # the frame was longer than `limit`; data holds its start


class Framer:
    """Splits a byte stream into frames.

    Args:
        terminator: "line" (CR, LF or CRLF), "cr", "lf", "crlf", "none" (idle gap only), or bytes.
        limit: most bytes a frame may have; longer frames are cut.
        idle_seconds: silence that ends a frame; with a terminator, a frame still missing its
            terminator after this long is ended too (its terminator was lost).
    """

    def __init__(self, terminator: str | bytes = "line", *, limit: int = 16384, idle_seconds: float = 0.1):
        term = terminator_bytes(terminator) if isinstance(terminator, str) else terminator
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self.idle_seconds = idle_seconds
        # Empty frames (two terminators in a row, the LF after a CR) are no frames.
        self._split = _LINE if term is None else (re.compile(re.escape(term)) if term else None)
        # Bytes kept while skipping the rest of a cut frame, so a terminator split across reads is seen.
        self._keep = 0 if term is None else max(len(term) - 1, 0)
        self._buf = b""
        self._skipping = False
        self._last = 0.0

    @property
    def buffered(self) -> int:
        """Bytes held for the unfinished frame (never more than limit + terminator length)."""
        return len(self._buf)

    @property
    def pending(self) -> bool:
        return bool(self._buf) or self._skipping

    def reset(self) -> None:
        """Drop an unfinished frame (the device was reopened: its start is gone)."""
        self._buf, self._skipping = b"", False

    def deadline(self) -> float | None:
        """When the unfinished frame ends by silence, or None if nothing is pending."""
        return self._last + self.idle_seconds if self.pending else None

    def feed(self, data: bytes, now: float) -> list[Frame]:
        """Take the bytes of one read, made at `now`; return the frames they finished."""
        out = self.expire(now)
        if not data:
            return out
        self._last = now
        if self._split is None:
            self._append(data, out)
            return out
        parts = self._split.split(self._buf + data)
        self._buf = b""
        for part in parts[:-1]:
            if self._skipping:  # the end of a cut frame: already reported
                self._skipping = False
            elif len(part) > self.limit:
                out.append(Frame(part[: self.limit], "terminator", cut=True))
            elif part:
                out.append(Frame(part, "terminator"))
        self._append(parts[-1], out)
        return out

    def expire(self, now: float) -> list[Frame]:
        """End the unfinished frame if the line has been silent for idle_seconds."""
        if not self.pending or now - self._last < self.idle_seconds:
            return []
        buf, skipped = self._buf, self._skipping
        self._buf, self._skipping = b"", False
        return [] if skipped or not buf else [Frame(buf, "idle")]

    def _append(self, data: bytes, out: list[Frame]) -> None:
        if self._skipping:
            self._buf = (self._buf + data)[-self._keep:] if self._keep else b""
            return
        buf = self._buf + data
        if len(buf) <= self.limit:
            self._buf = buf
            return
        out.append(Frame(buf[: self.limit], "limit", cut=True))
        self._skipping = True
        self._buf = buf[-self._keep:] if self._keep else b""


def check_encoding(name: str) -> str | None:
    """None if `name` is a text encoding Python knows, else what is wrong."""
    try:
        info = codecs.lookup(name)
    except LookupError:
        return 'unknown encoding; use e.g. "utf-8", "latin-1", "cp1252", "ascii"'
    if not getattr(info, "_is_text_encoding", True):
        return "not a text encoding"
    return None


def decode(data: bytes, encoding: str = "utf-8") -> tuple[str, bool]:
    """Frame bytes -> (text, clean).

    Bytes that are not valid in `encoding` become U+FFFD and `clean` is False; the pipeline denies
    any token holding U+FFFD as `malformed`, so a garbled read is never decided as a ticket.
    """
    text = data.decode(encoding, errors="replace")
    # U+FFFD is also what a scanner that itself gave up sends: count it as not clean either way.
    return text, "\ufffd" not in text
