"""People inside the venue: each lane's entries and exits, merged across lanes, and the capacity stop.

Each lane counts the people that went through it since the last `[occupancy] reset_at` (from its
own store at start, then one in-memory step per passage). Its counts only grow within a period, so
lanes can share them as grow-only counters: every lane keeps, per other lane, the greatest counts it
heard (`Counts.join`), and the venue total is derived (sum of entries - sum of exits). Messages may
come late, twice or out of order, or after a broker outage: the join gives the same result, so the
lanes agree again as soon as they hear each other, with nobody counted twice or lost.

The capacity check (`Occupancy.full`) reads memory only: it never waits for the broker or the store.
When this lane cannot be sure it hears every entry lane (its link is down, or an entry lane has been
silent for STALE_SECONDS), it admits no more than its share of the room left when it noticed
(docs/occupancy.md has the bound this gives).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gated.config import Config
    from gated.pipeline import Gate
    from gated.store import StoreThread

MAX_COUNT = 10_000_000  # people through one lane in one day: more is a broken or hostile message
HEARTBEAT_SECONDS = 1.0  # a lane publishes its counts at least this often while connected
# An entry lane not heard live for this long may be admitting unseen: from then on this lane keeps
# to its share of the room. Three heartbeats: one late message does not trigger it.
STALE_SECONDS = 3.0
REMEMBER_KEY = "occupancy:lanes"  # the store's kv entry of the other lanes' last counts (restarts)
_RESET_AT = re.compile(r"([01]\d|2[0-3]):([0-5]\d)")


def parse_reset_at(text: str) -> tuple[int, int]:
    """"HH:MM" (24 h, local time) -> (hour, minute); ValueError otherwise."""
    m = _RESET_AT.fullmatch(text)
    if m is None:
        raise ValueError('must be a local time of day as "HH:MM", e.g. "05:00"')
    return int(m.group(1)), int(m.group(2))


def period_start(now: float, hour: int, minute: int) -> int:
    """Unix time of the latest reset at or before `now` (local time, daylight saving included)."""
    local = datetime.fromtimestamp(now)  # naive local time: .timestamp() maps it back through mktime
    start = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if start > local:
        start -= timedelta(days=1)
    return int(start.timestamp())


def _next_reset(start: int, hour: int, minute: int) -> float:
    nxt = datetime.fromtimestamp(start).replace(hour=hour, minute=minute) + timedelta(days=1)
    return nxt.timestamp()


@dataclass(frozen=True)
class Counts:
    """One lane's people through it since the reset at `period` (unix seconds): grow-only counters."""

    period: int
    entries: int = 0
    exits: int = 0

    def join(self, other: Counts) -> Counts:
        """The merge: a later period replaces an earlier one; within a period each counter keeps its
        maximum. Commutative, associative and idempotent, so any order of delivery converges."""
        if self.period != other.period:
            return self if self.period > other.period else other
        return Counts(self.period, max(self.entries, other.entries), max(self.exits, other.exits))

    @property
    def inside(self) -> int:
        return self.entries - self.exits


def valid_counts(period: Any, entries: Any, exits: Any) -> Counts:
    """Counts from outside (a message, the store's kv), checked for type and range; ValueError if not."""
    for name, value, top in (("period", period, 2**40), ("entries", entries, MAX_COUNT), ("exits", exits, MAX_COUNT)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
            raise ValueError(f"no valid {name}")
    return Counts(period, entries, exits)


@dataclass
class _Heard:
    counts: Counts
    direction: str  # the lane's scan_mode: "entry" or "exit"
    live: float | None  # monotonic time it was last heard live (not a retained copy); None: not yet


class Occupancy:
    """This lane's counts, the latest heard from every other lane, and the venue total derived from them.

    Thread-safe: the event loop counts and checks, paho's thread reports what it heard.

    Args:
        lane: this lane's name; scan_mode: "entry" or "exit" (which way its passages count).
        capacity: 0 for no limit; reset_at: "HH:MM" local time the counts start again from 0.
        linked: True when the counts are shared ([mqtt]): then a silent lane narrows the room.
    """

    def __init__(self, lane: str, scan_mode: str, capacity: int, reset_at: str, *, linked: bool = False,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                 stale_seconds: float = STALE_SECONDS):
        self.lane = lane
        self.scan_mode = scan_mode
        self.capacity = capacity
        self._hour, self._minute = parse_reset_at(reset_at)
        self.reset_at = reset_at
        self._clock, self._monotonic = clock, monotonic
        self.stale_seconds = stale_seconds
        self._lock = threading.Lock()
        self._own = Counts(period_start(clock(), self._hour, self._minute))
        self._next = _next_reset(self._own.period, self._hour, self._minute)
        self._heard: dict[str, _Heard] = {}
        self._linked = linked
        self._link_up = False
        self._split: tuple[int, int] | None = None  # (room, own entries) when this lane stopped hearing all
        self.on_change: list[Callable[[], None]] = []  # e.g. wake the MQTT link to publish

    # --- this lane ---------------------------------------------------------------------------

    @property
    def period(self) -> int:
        """Unix time of the reset the current counts started at."""
        with self._lock:
            self._roll()
            return self._own.period

    def load(self, entries: int, exits: int) -> None:
        """This lane's counts of the current period, as its store holds them (at start)."""
        with self._lock:
            self._own = self._own.join(Counts(self._own.period, entries, exits))
        self._changed()

    def counted(self, direction: str, wall: float) -> None:
        """One person went through this lane (`direction` "entry" or "exit") at `wall` (the scan's time)."""
        with self._lock:
            self._roll()
            if wall < self._own.period:  # scanned before the reset: it belongs to the previous period
                return
            own = self._own
            self._own = Counts(own.period, own.entries + (direction == "entry"), own.exits + (direction == "exit"))
        self._changed()

    def own(self) -> Counts:
        with self._lock:
            self._roll()
            return self._own

    def _roll(self) -> None:
        # Called with the lock held. Past reset_at the counts start again; the store needs no write,
        # since its rows are counted by time (Store.occupancy_counts).
        if self._clock() >= self._next:
            self._own = Counts(period_start(self._clock(), self._hour, self._minute))
            self._next = _next_reset(self._own.period, self._hour, self._minute)
            self._split = None

    def _changed(self) -> None:
        for callback in self.on_change:
            callback()

    # --- the other lanes -------------------------------------------------------------------

    def heard(self, lane: str, counts: Counts, direction: str, live: bool = True) -> None:
        """A lane's counts as it published them; `live` False for a retained copy (it says nothing of
        whether that lane is still there). This lane's own copy can only raise its counts (a store
        replaced since it was sent), never lower them."""
        with self._lock:
            if lane == self.lane:
                if counts.period == self._own.period:
                    self._own = self._own.join(counts)
                return
            known = self._heard.get(lane)
            merged = counts if known is None else known.counts.join(counts)
            when = self._monotonic() if live else (known.live if known else None)
            self._heard[lane] = _Heard(merged, direction, when)

    def link(self, up: bool) -> None:
        """The MQTT link connected (True) or lost the broker (False)."""
        with self._lock:
            self._link_up = up

    # --- reading -----------------------------------------------------------------------------

    def lane_counts(self) -> dict[str, Counts]:
        """Every lane's counts of the current period, this lane's included, by lane name."""
        with self._lock:
            return self._current()

    def _current(self) -> dict[str, Counts]:
        self._roll()
        out = {name: h.counts for name, h in self._heard.items() if h.counts.period == self._own.period}
        out[self.lane] = self._own
        return out

    def venue_total(self) -> int:
        """People inside the venue as this lane knows it: entries - exits over every lane, at least 0."""
        with self._lock:
            return max(0, sum(c.inside for c in self._current().values()))

    def degraded(self) -> bool:
        """True when an entry lane may be admitting unheard: the link is down, or one is silent."""
        with self._lock:
            return self._degraded()

    def _degraded(self) -> bool:
        if not self._linked:
            return False
        if not self._link_up:
            return True
        now = self._monotonic()
        return any(h.direction == "entry" and (h.live is None or now - h.live > self.stale_seconds)
                   for h in self._heard.values() if h.counts.period == self._own.period)

    def full(self) -> str:
        """Why an entry must wait now ("" when there is room). Memory only: safe on the scan path.

        While every entry lane is heard, the venue total decides. Otherwise this lane admits at most
        its share (1/k, k entry lanes known) of the room it saw when it stopped hearing them all, so
        that k lanes that cannot hear each other fill the venue no further than the lanes together.
        """
        if self.capacity <= 0 or self.scan_mode != "entry":
            return ""
        with self._lock:
            current = self._current()
            total = sum(c.inside for c in current.values())
            if total >= self.capacity:
                return f"venue full: {max(0, total)} inside, capacity {self.capacity}"
            if not self._degraded():
                self._split = None
                return ""
            if self._split is None:
                self._split = (self.capacity - total, self._own.entries)
            room, at = self._split
            lanes = 1 + sum(h.direction == "entry" for name, h in self._heard.items()
                            if h.counts.period == self._own.period)
            share = room // lanes
            if self._own.entries - at >= share:
                return (f"this lane's share of the room is used ({share} of {room} left among {lanes} entry lanes "
                        f"when the others went unheard); {max(0, total)} inside as known here")
            return ""

    def describe(self) -> str:
        """For the status line: "412 inside of 500" (or "412 inside" without a capacity)."""
        total = self.venue_total()
        return f"{total} inside" + (f" of {self.capacity}" if self.capacity else "")

    # --- kept across restarts ----------------------------------------------------------------

    def remembered(self) -> str:
        """The other lanes' last counts as JSON, for the store (a restart with the broker away)."""
        with self._lock:
            return json.dumps({name: {"period": h.counts.period, "entries": h.counts.entries, "exits": h.counts.exits,
                                      "direction": h.direction} for name, h in sorted(self._heard.items())},
                              sort_keys=True)

    def recall(self, text: str | None) -> None:
        """Take the counts `remembered()` wrote: known lanes, but not heard live yet. Damaged entries are skipped."""
        try:
            lanes = json.loads(text) if text else {}
        except ValueError:
            return
        for name, value in lanes.items() if isinstance(lanes, dict) else ():
            try:
                counts = valid_counts(value["period"], value["entries"], value["exits"])
                if value["direction"] in ("entry", "exit") and isinstance(name, str):
                    self.heard(name, counts, value["direction"], live=False)
            except (ValueError, TypeError, KeyError):
                continue


def attach(config: Config, store: StoreThread, gate: Gate, *, linked: bool) -> Occupancy | None:
    """Build the lane's Occupancy from [occupancy] and its store, and wire it to the gate; None without it.

    Counting: the Gate's `on_passed` hook fires once per person through (at once for an admit without
    a passage sensor, on the sensor's confirmation with one). The capacity check: `Decider.full`.
    """
    section = config.occupancy
    if section is None:
        return None
    from gated.store import Store

    occ = Occupancy(config.lane.name, config.lane.scan_mode, section.capacity, section.reset_at, linked=linked)
    entries, exits = store.call_sync(Store.occupancy_counts, occ.period)
    occ.load(entries, exits)
    occ.recall(store.call_sync(Store.get, REMEMBER_KEY))
    gate.on_passed.append(lambda scan: occ.counted(str(gate.scan_mode), scan.wall))
    gate.decider.full = occ.full
    return occ
