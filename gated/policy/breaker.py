"""Circuit breaker: stop asking a failing API so one dead link does not cost every visitor a timeout.

Pure state, no I/O: the caller reports each call's outcome and asks whether to call at all.
Following pretixSCAN, the breaker opens after `failures` bad calls within the last `window`;
a call that answered but took longer than `slow_seconds` counts as bad, because the next one
will probably be slow too. While open, only a background probe may close it.

A call cut off by its deadline counts as bad when it is cut off, not when the connection gives
up. The decider gives every call at least `slow_seconds` (gated.policy.decider), so "no answer
within the budget" and "slower than `slow_seconds`" mean the same thing: a visitor who waited in
a queue never makes a healthy API look dead by being asked with too little time left.
"""

from __future__ import annotations

from collections import deque


class Breaker:
    def __init__(self, failures: int = 2, window: int = 5, slow_seconds: float = float("inf")):
        self.failures = failures
        self.slow_seconds = slow_seconds
        self._outcomes: deque[bool] = deque(maxlen=window)
        self.is_open = False
        self.opened_at: float | None = None

    def allows(self) -> bool:
        return not self.is_open

    def record(self, ok: bool, elapsed: float, now: float) -> bool:
        """Report one call; return True if this call opened the breaker."""
        self._outcomes.append(ok and elapsed <= self.slow_seconds)
        bad = sum(1 for good in self._outcomes if not good)
        if not self.is_open and bad >= self.failures:
            self.is_open, self.opened_at = True, now
            return True
        return False

    def close(self) -> None:
        """The probe got through: close and forget past failures."""
        self.is_open, self.opened_at = False, None
        self._outcomes.clear()
