"""Decide a Scan: lane mode first, then the API within its deadline, then the offline rules.

Failure cases, and why each ends where it does:
- The API answers (admit or deny) in time: its verdict is final, even a deny; it knows more.
- The API times out, refuses the connection, or answers 5xx/garbage: decide offline with the
  same nonce, so the later upload and any late server-side effect refer to one scan.
- Repeated failures open the breaker: decide offline at once (no timeout per visitor) until the
  background probe sees the API answer again.
- Offline data missing or older than `max_age_seconds`, or the clock untrusted: the configured
  `[offline] fallback` decides (`policy` keeps the rules but skips time windows when the clock is
  untrusted; `deny` fails secure; `admit` keeps the queue moving). Each is logged on its edge.
- Anti-passback applies to every offline entry: a ticket already admitted as often as it may
  enter is denied `already_used`, whichever lane or source admitted it before.
- The venue at `[occupancy] capacity` (`full()`, an in-memory read): an entry is decided offline
  only, never asked online, because every backend's online validation is already the check-in
  (Entry, CM.com, TiBillet and pretix redeem as they answer) and a `full` deny must not use up the
  ticket. A ticket the offline rules would admit, or cannot judge (no or stale data, untrusted
  clock), is denied `full`; one they refuse keeps its reason (already used, canceled...), which
  tells the visitor more than "come back later". Free and emergency passage are not limited:
  both are the operator's override.

The deadline is per visitor: `[backend] timeout_seconds` counts from the moment the scan was read
(`Scan.received`), so time spent in the queue behind earlier scans comes out of the online budget.
- Scans are decided one at a time, in the order they were read, never in parallel. The relay opens
  the turnstile for whoever stands in it, which is the earlier visitor: a later scan's verdict
  acted on first would let the wrong person through. And two scans of one ticket in flight at once
  (one online, one offline) could both be admitted, since neither is recorded yet when the other is
  decided. In order, a scan queued behind a hanging call waits at most until that call's own
  deadline, which is earlier than its own.
- A scan with less than `min_budget` (3/4 of the deadline) left is decided offline at once, without
  asking the API. A healthy API may take up to that long (an answer is "slow" only beyond it), so
  a shorter call would often be cut off, cost the visitor the rest of the deadline for nothing and
  make a normal-speed API look dead to the breaker. Such a scan is not reported to the breaker.
- Every call is therefore given at least `min_budget`, the breaker's own threshold for "slow": a call
  that runs out of its budget counts as a failure the moment the budget ends, like an answer slower
  than that threshold. With the API hanging, the first scan of a burst fails at its deadline, the
  scans queued behind it are decided offline at once, and the next scan fresh enough to be asked
  fails at its own deadline and opens the breaker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from gated.config import Config
from gated.errors import Unreachable
from gated.model import Decision, Reason, Scan, ScanMode, Source, Verdict, admit, deny
from gated.policy.base import Backend
from gated.policy.breaker import Breaker
from gated.store import Store, StoreThread

log = logging.getLogger(__name__)

EARLIEST_TRUSTED = 1704067200.0  # 2024-01-01T00:00:00Z: a clock before this never synced
# Share of the deadline beyond which an answer counts as slow, and the least budget worth asking with.
SLOW_SHARE = 0.75
# Offline denies that say nothing about the ticket itself: at capacity they read `full` instead.
UNJUDGED = frozenset({Reason.OFFLINE_NO_DATA, Reason.STALE_DATA, Reason.CLOCK_UNTRUSTED, Reason.STORE_REPLACED})


class Decider:
    def __init__(self, config: Config, backend: Backend, store: StoreThread,
                 clock: Callable[[], float] = time.time):
        self.backend = backend
        self.store = store
        self.clock = clock
        self.emergency = False
        self.on_reconnect: list[Callable[[], None]] = []
        # Called with (seconds, answered) after each online call, e.g. gated.metrics' histogram.
        # Runs on the scan path: it must return at once.
        self.on_call: Callable[[float, bool], None] = lambda seconds, answered: None
        # Why an entry must wait ("" when there is room): gated.occupancy sets it with [occupancy].
        self.full: Callable[[], str] = lambda: ""
        self.breaker = Breaker(config.backend.breaker_failures, config.backend.breaker_window)
        self.apply(config)
        self._clock_ok = True
        self._degraded: Reason | None = None
        self._probe_task: asyncio.Task | None = None

    def apply(self, config: Config) -> None:
        """Take the settings that a reload may change without rebuilding anything."""
        self.mode = config.lane.mode
        self.timeout = config.backend.timeout_seconds
        self.min_budget = SLOW_SHARE * self.timeout
        self.breaker.slow_seconds = self.min_budget
        self.offline_first = config.backend.offline_first or not self.backend.online or self.backend.offline_first
        self.fallback = config.offline.fallback
        self.max_age = config.offline.max_age_seconds
        self.antipassback = config.offline.antipassback
        self.probe_interval = config.backend.probe_interval_seconds

    @property
    def online(self) -> bool:
        return not self.offline_first and self.breaker.allows()

    async def decide(self, scan: Scan, scan_mode: ScanMode,
                     commit: Callable[[Store, Decision], None] | None = None) -> Decision:
        """The verdict for one scan. `commit(store, decision)`, when given, runs on the store thread
        right after an offline decision: the scan is recorded in the same hop it was decided in."""
        if self.emergency:
            return admit(Reason.EMERGENCY, Source.MODE, backend=self.backend.name)
        if self.mode == "locked":
            return deny(Reason.LOCKED, Source.MODE, backend=self.backend.name)
        if self.mode == "free":
            return admit(Reason.FREE, Source.MODE, backend=self.backend.name)
        if scan.refused is not None:  # the reader saw a replayed wallet payload: no backend may admit it
            return deny(scan.refused, backend=self.backend.name, detail=scan.refused_detail)
        why = "offline-first" if self.backend.online else ""
        unanswered = False
        full = self.full() if scan_mode is ScanMode.ENTRY else ""
        if full:
            why = "" if self.offline_first else "venue full: not asked online, which would check the ticket in"
        elif not self.offline_first:
            budget = self.timeout - (time.monotonic() - scan.received)
            if not self.breaker.allows():
                why = "API unreachable (breaker open)"
            elif budget < self.min_budget:
                why = (f"read {(self.timeout - budget) * 1000:.0f} ms ago: too little of the "
                       f"{self.timeout:g}s deadline left to ask the API")
            else:
                decision, why, unanswered = await self._online(scan, scan_mode, budget)
                if decision is not None:
                    return decision
        return await self.store.call(self._offline_then, scan, scan_mode, why, unanswered, commit, full)

    def _offline_then(self, store: Store, scan: Scan, scan_mode: ScanMode, why: str, unanswered: bool,
                      commit: Callable[[Store, Decision], None] | None, full: str = "") -> Decision:
        decision = self._offline(store, scan, scan_mode, why)
        if full and (decision.admitted or decision.reason in UNJUDGED):
            decision = deny(Reason.FULL, backend=decision.backend, message=decision.message,
                            event_id=decision.event_id, detail=full)
        if unanswered:
            decision = replace(decision, online_unanswered=True)
        if commit is not None:
            commit(store, decision)
        return decision

    async def _online(self, scan: Scan, scan_mode: ScanMode,
                      budget: float) -> tuple[Decision | None, str, bool]:
        """(the API's decision, or None and why not, and whether the request may have reached it).

        The call is cut off when `budget` runs out, at the scan's own deadline, and the breaker
        hears of it then, not when a hanging connection finally gives up."""
        started = time.monotonic()
        try:
            decision = await asyncio.wait_for(self.backend.validate(scan, scan_mode), budget)
        except (Unreachable, TimeoutError) as e:
            # Said as the budget the call had: a queued scan gets less than timeout_seconds.
            why = str(e) if isinstance(e, Unreachable) else f"no answer within {budget * 1000:.0f} ms"
            self.on_call(time.monotonic() - started, False)
            if self.breaker.record(False, time.monotonic() - started, time.monotonic()):
                log.warning("ticket API unreachable (%s); deciding offline until it answers", why,
                            extra={"GATED_EVENT": "backend_down", "GATED_BACKEND": self.backend.name})
                self._start_probe()
            return None, why, not getattr(e, "unsent", False)
        elapsed = time.monotonic() - started
        self.on_call(elapsed, True)
        if self.breaker.record(True, elapsed, time.monotonic()):
            log.warning("ticket API slow (%.0f ms for a %g s deadline); deciding offline until it is quick",
                        elapsed * 1000, self.timeout,
                        extra={"GATED_EVENT": "backend_down", "GATED_BACKEND": self.backend.name})
            self._start_probe()
        if decision.admitted and decision.ticket_key is None:
            decision = replace(decision, ticket_key=scan.token)
        return decision, "", False

    def _offline(self, store: Store, scan: Scan, scan_mode: ScanMode, why: str) -> Decision:
        """Runs on the store thread: offline data and anti-passback read the same connection."""
        now = self.clock()
        clock_ok = self._check_clock(store, now)
        age = self.backend.data_age(store, now)
        degraded = None
        if not clock_ok:
            degraded = Reason.CLOCK_UNTRUSTED
        elif store.replaced() is not None:  # anti-passback's history was lost with a damaged store
            degraded = Reason.STORE_REPLACED
        elif age is None:
            degraded = Reason.OFFLINE_NO_DATA
        elif age > self.max_age:
            degraded = Reason.STALE_DATA
        self._note_degraded(degraded, age)
        detail = "; ".join(x for x in (why, degraded and str(degraded)) if x)
        name = self.backend.name
        if degraded is not None and self.fallback == "deny":
            return deny(degraded, backend=name, detail=detail)
        if degraded is not None and self.fallback == "admit":
            decision = admit(Reason.FALLBACK_ADMIT, backend=name, ticket_key=scan.token, detail=detail)
        else:
            decision = replace(self.backend.decide_offline(store, scan, scan_mode, now, clock_ok),
                               detail=detail)
        if decision.admitted and decision.ticket_key is None:
            decision = replace(decision, ticket_key=scan.token)
        if decision.admitted and self.antipassback and scan_mode is ScanMode.ENTRY:
            entries, _exits = store.inside(decision.ticket_key)
            if entries >= decision.max_entries:
                return replace(decision, verdict=Verdict.DENY, reason=Reason.ALREADY_USED)
        return decision

    def _check_clock(self, store: Store, now: float) -> bool:
        newest = store.high_water()
        ok = now >= EARLIEST_TRUSTED and (newest is None or now >= newest)
        if ok != self._clock_ok:
            self._clock_ok = ok
            if ok:
                log.info("clock trusted again", extra={"GATED_EVENT": "clock_trusted"})
            else:
                log.warning("clock untrusted: %s is before %s; offline decisions follow [offline] "
                            "fallback = \"%s\" and skip time windows",
                            _stamp(now), _stamp(max(EARLIEST_TRUSTED, newest or 0)), self.fallback,
                            extra={"GATED_EVENT": "clock_untrusted"})
        return ok

    def _note_degraded(self, degraded: Reason | None, age: float | None) -> None:
        if degraded == self._degraded or degraded is Reason.CLOCK_UNTRUSTED:
            return
        self._degraded = degraded
        if degraded is Reason.OFFLINE_NO_DATA:
            log.warning("no offline data from %s yet; offline decisions follow [offline] fallback = \"%s\"",
                        self.backend.name, self.fallback, extra={"GATED_EVENT": "offline_no_data"})
        elif degraded is Reason.STORE_REPLACED:
            log.warning("the store replaced a damaged one, whose admissions are not known here; offline decisions "
                        "follow [offline] fallback = \"%s\"", self.fallback, extra={"GATED_EVENT": "store_replaced"})
        elif degraded is Reason.STALE_DATA:
            log.warning("offline data is %.0f s old (limit %.0f s); offline decisions follow [offline] "
                        "fallback = \"%s\"", age, self.max_age, self.fallback,
                        extra={"GATED_EVENT": "stale_data"})

    # --- the probe that closes the breaker -------------------------------------------------

    def _start_probe(self) -> None:
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe(), name="breaker-probe")

    async def _probe(self) -> None:
        while self.breaker.is_open:
            await asyncio.sleep(self.probe_interval)
            try:
                await asyncio.wait_for(self.backend.probe(), max(self.timeout, 2.0))
            except (Unreachable, TimeoutError):
                continue
            except Exception:  # a backend bug must not leave the breaker open for good
                log.exception("probe of the ticket API failed unexpectedly; trying again",
                              extra={"GATED_EVENT": "probe_failed"})
                continue
            opened = self.breaker.opened_at or time.monotonic()
            self.breaker.close()
            log.info("ticket API reachable again after %s", _duration(time.monotonic() - opened),
                     extra={"GATED_EVENT": "backend_up", "GATED_BACKEND": self.backend.name})
            for callback in self.on_reconnect:
                callback()

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)


def _stamp(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"
