"""Prometheus metrics of a lane: counted on the scan path, exported off it (`[metrics]`).

The scan path pays a counter increment and a histogram observation in a `Gate.on_logged` hook
(microseconds, no I/O), for every scan, recorded or not. Everything else is a gauge refreshed
every `interval_seconds` by a background task, which then rewrites `[metrics] textfile`
atomically (a temporary file in the same folder, renamed over it: node_exporter's textfile
collector never reads half a file). `[metrics] listen` serves the same registry over HTTP from
prometheus_client's own thread.

Label values come only from fixed vocabularies (verdict, reason, source, backend type, data kind,
mode, reader names from the config): never a ticket, token or visitor name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, write_to_textfile

from gated.config import parse_listen
from gated.schema import Section

if TYPE_CHECKING:
    from gated.model import Decision
    from gated.pipeline import Gate
    from gated.policy.decider import Decider
    from gated.store import StoreThread

log = logging.getLogger(__name__)

# Scan read -> relay command: a few ms offline, up to the online deadline (0.8 s) and a little more.
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0)
ONLINE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 2.0)
MODES = ("normal", "free", "locked", "emergency")


@dataclass
class Lane:
    """What the gauges read, each a callable the daemon passes in (so they follow a reload)."""

    store: StoreThread  # a store thread off the scan path (the syncer's)
    decider: Callable[[], Decider]
    readers: Callable[[], dict[str, bool]]  # configured reader name -> present (connected or running)
    # Occupancy from gated.occupancy: (people inside the venue as this lane knows it, capacity with
    # 0 for none). None: the two gauges are not exported.
    occupancy: Callable[[], tuple[int, int]] | None = None


class Metrics:
    """The lane's registry and its two cheap hooks (`scanned`, `online_call`)."""

    def __init__(self, occupancy: bool = True) -> None:
        r = self.registry = CollectorRegistry()
        self.scans = Counter("gated_scans", "Scans decided, by verdict, reason and source",
                             ("verdict", "reason", "source"), registry=r)
        self.latency = Histogram("gated_scan_to_relay_seconds", "Time from a scan read to the relay command "
                                 "(the record committed in it)", buckets=LATENCY_BUCKETS, registry=r)
        self.online = Histogram("gated_online_call_seconds", "Time of each call to the ticket API that decides a "
                                "scan, answered or not", ("answered",), buckets=ONLINE_BUCKETS, registry=r)
        self.queue = Gauge("gated_upload_queue_scans", "Scans decided offline waiting for upload", registry=r)
        self.queue_age = Gauge("gated_upload_queue_oldest_age_seconds", "Age of the oldest scan waiting for "
                               "upload (0 when none waits)", registry=r)
        self.parked = Gauge("gated_upload_parked_scans", "Scans the API refused for good (gated queue)", registry=r)
        self.data_age = Gauge("gated_offline_data_age_seconds", "Age of the offline data by kind; kind "
                              '"decisions" is the age the decider judges staleness by', ("backend", "kind"), registry=r)
        self.breaker = Gauge("gated_breaker_open", "1 while the circuit breaker keeps the lane offline",
                             ("backend",), registry=r)
        self.mode = Gauge("gated_lane_mode", "1 for the lane's current mode", ("mode",), registry=r)
        self.readers = Gauge("gated_reader_up", "1 when the configured reader is present", ("reader",), registry=r)
        if occupancy:  # without [occupancy] no count at all, rather than 0 inside
            self.occupancy = Gauge("gated_occupancy", "People inside the venue, as this lane knows it", registry=r)
            self.capacity = Gauge("gated_capacity", "The venue's capacity ([occupancy] capacity; 0: no limit)",
                                  registry=r)
        self._children: dict[tuple[str, str, str], Counter] = {}
        self._answered = (self.online.labels(answered="false"), self.online.labels(answered="true"))

    # --- the scan path: microseconds -----------------------------------------------------

    def scanned(self, decision: Decision, act_seconds: float) -> None:
        """Count one decided scan and its scan -> relay time."""
        key = (str(decision.verdict), str(decision.reason), str(decision.source))
        child = self._children.get(key)
        if child is None:  # labels() takes a lock and builds a tuple key: once per combination
            child = self._children[key] = self.scans.labels(*key)
        child.inc()
        self.latency.observe(act_seconds)

    def online_call(self, seconds: float, answered: bool) -> None:
        self._answered[answered].observe(seconds)

    # --- off the scan path ---------------------------------------------------------------

    async def refresh(self, lane: Lane, now: float | None = None) -> None:
        """Set every gauge from the lane as it is now (store reads on the given store thread)."""
        from gated.store import Store

        now = time.time() if now is None else now
        decider = lane.decider()
        stats = await lane.store.call(Store.queue_stats)
        self.queue.set(stats.pending)
        self.parked.set(stats.parked)
        self.queue_age.set(max(0.0, now - stats.oldest_pending) if stats.oldest_pending else 0.0)
        backend = decider.backend
        age = await lane.store.call(backend.data_age, now)
        ages = {"decisions": age} if age is not None else {}
        updated = await lane.store.call(Store.data_updated)
        ages |= {_kind(name): max(0.0, now - stamp) for name, stamp in updated.items()}
        self._relabel(self.data_age, {(backend.name, kind): value for kind, value in ages.items()})
        self._relabel(self.breaker, {(backend.name,): float(decider.breaker.is_open and not decider.offline_first)})
        current = "emergency" if decider.emergency else decider.mode
        for mode in MODES:
            self.mode.labels(mode=mode).set(1 if mode == current else 0)
        self._relabel(self.readers, {(name,): float(up) for name, up in lane.readers().items()})
        if lane.occupancy is not None:
            inside, capacity = lane.occupancy()
            self.occupancy.set(inside)
            self.capacity.set(capacity)

    @staticmethod
    def _relabel(gauge: Gauge, values: dict[tuple[str, ...], float]) -> None:
        """Set these label sets and drop the others (a reader removed by a reload, another backend)."""
        for labels in set(gauge._metrics) - set(values):  # noqa: SLF001 - prometheus_client has no public listing
            gauge.remove(*labels)
        for labels, value in values.items():
            gauge.labels(*labels).set(value)

    def text(self) -> bytes:
        return generate_latest(self.registry)


def _kind(name: str) -> str:
    """An offline data row's kind for a label: its last `:` part (e.g. "pretix:org/event:offline" ->
    "offline"); the scope in the middle names an event, which is configuration, not a label."""
    kind = name.rsplit(":", 1)[-1]
    return "".join(c if c.isalnum() or c == "_" else "_" for c in kind)[:40] or "data"


class Exporter:
    """The background half: refresh the gauges, write the textfile, serve HTTP."""

    def __init__(self, section: Section, metrics: Metrics, lane: Lane) -> None:
        self.textfile = section.get("textfile", "")
        self.listen = section.get("listen", "")
        self.interval = section.get("interval_seconds", 15.0)
        self.metrics = metrics
        self.lane = lane
        self._server = None
        self._failing = False

    def start(self) -> None:
        """Serve /metrics when `listen` is set; raises OSError when the address cannot be bound."""
        if self.listen:
            from prometheus_client import start_http_server

            host, port = parse_listen(self.listen)
            self._server, _ = start_http_server(port, host, registry=self.metrics.registry)

    def describe(self) -> str:
        where = [w for w in (self.textfile, self.listen and f"http://{self.listen}/metrics") if w]
        return f"{', '.join(where)} every {self.interval:g} s"

    async def run(self) -> None:
        while True:
            await self.once()
            await asyncio.sleep(self.interval)

    async def once(self) -> None:
        """One round: gauges, then the file (in a thread: a slow SD card must not hold the event loop)."""
        try:
            await self.metrics.refresh(self.lane)
            if self.textfile:
                await asyncio.to_thread(write_to_textfile, self.textfile, self.metrics.registry)
        except Exception as e:  # noqa: BLE001 - metrics must never stop the gate; said on the edge
            if not self._failing:
                log.warning("metrics not exported: %s; the gate goes on", e, extra={"GATED_EVENT": "metrics_failed"})
            self._failing = True
            return
        if self._failing:
            log.info("metrics exported again", extra={"GATED_EVENT": "metrics_ok"})
        self._failing = False

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def attach(section: Section | None, gate: Gate, lane: Lane) -> Exporter | None:
    """Hook the counters into the gate and decider; None without [metrics] (nothing is counted).

    Raises OSError when `listen` cannot be bound.
    """
    if section is None or not (section.get("textfile") or section.get("listen")):
        return None
    metrics = Metrics(occupancy=lane.occupancy is not None)
    gate.on_logged.append(metrics.scanned)
    gate.decider.on_call = metrics.online_call
    exporter = Exporter(section, metrics, lane)
    exporter.start()
    return exporter
