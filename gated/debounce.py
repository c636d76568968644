"""Debounce: the same code on the same reader within a window is one scan (pure, monotonic time)."""

from __future__ import annotations


class Debouncer:
    def __init__(self, window_seconds: float):
        self.window = window_seconds
        self._seen: dict[tuple[str, str], float] = {}

    def is_repeat(self, reader: str, token: str, now: float) -> bool:
        """True if this code was read on this reader less than `window` seconds ago."""
        key = (reader, token)
        last = self._seen.get(key)
        self._seen[key] = now
        if len(self._seen) > 1000:  # keep memory flat: forget codes older than the window
            self._seen = {k: t for k, t in self._seen.items() if now - t < self.window}
        return last is not None and now - last < self.window
