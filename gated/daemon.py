"""`gated run`: build everything from the config, start in dependency order, stop in reverse.

Start: store -> backend -> decider -> outputs (relay idle first) -> MQTT lane link -> uploader/syncer
-> readers, then READY=1. Stop (SIGTERM): readers first, the scans already read are still decided, the
lane link shares its last admissions, relay holds finish, outputs go to their safe state, the store is
closed last. SIGHUP reloads the config between two scans; scans read meanwhile wait in the queue, none
is lost. A signed MQTT mode command is applied the same way, between two scans.

Long because start, stop, reload, status and the decision loop share one set of running parts;
each is a named step, in the order run() takes them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from gpiozero import Device
from gpiozero.exc import GPIOZeroError, PinFactoryFallback

from gated import __version__, mqtt, occupancy
from gated import config as configmod
from gated.config import Config
from gated.drivers import build_reader
from gated.drivers.base import Reader
from gated.drivers.gpio import Outputs, make_pin_factory
from gated.errors import ConfigError, DriverError, GatedError, StoreError, Unreachable
from gated.logs import Lines
from gated.model import Scan
from gated.notify import Notifier
from gated.pipeline import Gate
from gated.policy import build_backend
from gated.policy.base import Backend
from gated.policy.decider import Decider
from gated.schema import Section
from gated.store import Store, StoreCorrupt, StoreThread, keep_wal, unwritable
from gated.upload import Syncer, Uploader

log = logging.getLogger("gated")

_RELOAD = object()  # queue sentinel: reload the config between two scans
HOUSEKEEPING_SECONDS = 5.0  # status refresh and WAL upkeep (gated.store.keep_wal)
READY_SECONDS = 60.0  # the doors-open check (gated.ready) in the retained MQTT status
GIL_SWITCH_SECONDS = 0.001  # see build()


@dataclass(frozen=True)
class _SetMode:
    """Queue item: a lane mode asked for by a signed MQTT command, applied between two scans."""

    mode: str


@dataclass
class Parts:
    """What a running gate is made of; the daemon and `gated scan` build it the same way."""

    store: StoreThread
    backend: Backend
    decider: Decider
    outputs: Outputs
    gate: Gate
    occupancy: occupancy.Occupancy | None = None  # [occupancy]: people inside, the capacity stop

    async def close(self) -> None:
        await self.gate.drain()
        await self.decider.close()
        self.outputs.safe_state()
        self.outputs.close()
        await self.backend.close()
        self.store.close()


def open_store(path: str) -> StoreThread:
    """The scan path's store. A damaged file is moved aside and a fresh store created, so a gate
    never crash-loops on it; the old file keeps its queue and sessions for a technician. A store
    that cannot be written is opened read-only: the gate decides, and [store] on_error says what
    becomes of scans it cannot record."""
    try:
        return StoreThread(path, "store", read_only_ok=True)
    except StoreCorrupt as e:
        if not Store.looks_like_a_store(path):  # e.g. [store] path naming the config file by mistake
            raise StoreError(f"{e}; not moved aside, it does not look like a store: check [store] path") from None
        try:
            moved = Store.quarantine(path)
        except OSError as move_error:
            raise StoreError(f"{e}; and it cannot be moved aside: {move_error.strerror}") from None
        scans = Store.count_scans(moved)
        log.error("store damaged (%s); moved aside to %s and started a fresh one. Scans still queued in it "
                  "are not uploaded, and pairings in it must be made again (gated pair)", e, moved,
                  extra={"GATED_EVENT": "store_error", "GATED_STORE_MOVED": str(moved)})
        store = StoreThread(path, "store")
        # Its admissions were anti-passback's memory: until that is made good, offline decisions
        # follow [offline] fallback (Decider._offline), and the log and gated doctor say why.
        store.call_sync(Store.note_replaced, moved, scans)
        held = "an unknown number of scans" if scans is None else f"at least {scans} scans"
        log.warning("the admissions in the damaged store (%s) are lost: a ticket admitted before may be admitted "
                    "again. Offline decisions follow [offline] fallback until %s", held, REPLACED_UNTIL,
                    extra={"GATED_EVENT": "store_replaced", "GATED_STORE_MOVED": str(moved)})
        return store


REPLACED_UNTIL = ("the first successful sync with the ticket API, or, with the local backend, a technician "
                  "confirms the new store (gated doctor --accept-new-store)")


async def build(config: Config, *, simulate: bool = False) -> Parts:
    """Store -> backend -> decider -> outputs -> gate. Raises StoreError or DriverError."""
    # A scan's store thread, its commit done, waits for the interpreter lock while the event loop
    # runs Python (an upload batch's JSON and gzip, a sync page): at most the switch interval,
    # so 1 ms instead of Python's 5 (figures in benchmarks/README.md).
    sys.setswitchinterval(GIL_SWITCH_SECONDS)
    store = open_store(config.store.path)
    try:
        backend = build_backend(config)
        try:
            await backend.start(store)
        except Unreachable as e:
            log.warning("ticket API not reachable at start (%s); deciding offline until it answers", e,
                        extra={"GATED_EVENT": "backend_down"})
        except StoreError as e:  # a read-only store: sessions cannot be saved; the backend starts late
            log.warning("ticket API session not set up: %s", e, extra={"GATED_EVENT": "store_error"})
        decider = Decider(config, backend, store)
        outputs = _outputs(config, simulate, decider)
        decider.emergency = outputs.emergency_active
    except BaseException:
        store.close()
        raise
    gate = Gate(config, decider, store, outputs)
    backend.quiet = gate.quiet
    try:
        occ = occupancy.attach(config, store, gate, linked=config.mqtt is not None)
    except StoreError:
        outputs.close()
        store.close()
        raise
    return Parts(store, backend, decider, outputs, gate, occ)


def _outputs(config: Config, simulate: bool, decider: Decider) -> Outputs:
    """Outputs wired to the decider: the emergency input switches it to free passage."""
    factory = make_pin_factory("mock" if simulate else config.gpio.pin_factory) or _auto_pin_factory()
    return Outputs(config, pin_factory=factory, on_emergency=lambda active: setattr(decider, "emergency", active))


def _auto_pin_factory() -> object:
    """gpiozero's own choice for `pin_factory = "auto"`; on a machine without GPIO one clear line, not a traceback."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PinFactoryFallback)  # four warnings for one fault, reported below
        try:
            return Device.pin_factory or Device._default_pin_factory()
        except (GPIOZeroError, ImportError, OSError, RuntimeError) as e:
            raise DriverError(f'[gpio] pin_factory = "auto": no GPIO found on this machine ({e}); on a bench '
                              'without hardware set pin_factory = "mock"') from None


async def _keep_running(name: str, run: Callable[[], Awaitable[None]], pause: float = 5.0) -> None:
    """Run a background loop (uploader, syncer, housekeeping) for the life of the daemon.

    A failure there (a store error, a backend's bug on an odd answer) must not end it silently:
    uploads or syncs would stop for good while scans go on. Log it and start it again.
    """
    while True:
        try:
            await run()
            return
        except GatedError as e:
            log.error("%s stopped: %s; restarting it in %g s", name, e, pause, extra={"GATED_EVENT": "task_failed"})
        except Exception:
            log.exception("%s failed unexpectedly; restarting it in %g s", name, pause,
                          extra={"GATED_EVENT": "task_failed"})
        await asyncio.sleep(pause)


class Daemon:
    def __init__(self, config: Config, *, simulate: bool = False):
        self.config = config
        self.simulate = simulate
        self.notifier = Notifier()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.readers: dict[str, tuple[Section, asyncio.Task]] = {}
        self.stopping = asyncio.Event()
        self.link: mqtt.LaneLink | None = None
        self._last_pending = 0
        self._maintenance_failing = False  # housekeeping's store upkeep: one line per edge
        self.exporter = None  # gated.metrics.Exporter with [metrics]


    async def run(self) -> int:
        """Start in dependency order, decide scans until SIGTERM or SIGINT, stop in reverse; the exit code."""
        started = time.monotonic()
        code = await self._build()
        if code is not None:
            return code
        await self._load_local_list()
        code = await self._link_lanes()
        if code is not None:
            return code
        tasks = self._background()
        code = self._start_metrics(tasks)
        if code is not None:  # what started so far stops as at SIGTERM: the link says "offline"
            if self.link is not None:
                await asyncio.to_thread(self.link.stop)
            await self.parts.close()
            self.syncer.store.close()
            return code
        loop = asyncio.get_running_loop()
        background = [loop.create_task(_keep_running(name, run), name=name) for name, run in tasks]
        self._handle_signals()
        self._start_readers(self.config.readers, self.config)
        await self._announce_ready(started)
        await self._decision_loop()
        await self._stop(background)
        return 0

    # --- start and stop, in the order run() takes them ------------------------------------

    async def _build(self) -> int | None:
        """Store, backend, decider, outputs and gate (`build`); an exit code when they cannot start."""
        c = self.config
        log.info("gated %s starting: config %s, lane %s (%s, %s mode)", __version__, c.path, c.lane.name,
                 c.lane.scan_mode, c.lane.mode)
        try:
            self.parts = await build(c, simulate=self.simulate)
        except ConfigError as e:  # a secret file found wrong only when the backend reads it
            log.error("cannot start:\n%s", Lines(configmod.report(e)), extra={"GATED_EVENT": "start_failed"})
            return 2
        except (StoreError, DriverError) as e:
            log.error("cannot start: %s", e, extra={"GATED_EVENT": "start_failed"})
            return 1
        if self.parts.store.read_only:
            log.error("store %s cannot be written (%s): %s", c.store.path, self.parts.store.read_only,
                      self._not_recording(), extra={"GATED_EVENT": "store_read_only"})
        return None

    async def _load_local_list(self) -> None:
        """A backend without an API decides from its local list only: load it before the readers start."""
        p = self.parts
        if not p.backend.online:
            # Reading it takes milliseconds; without it the first codes after a fresh install are denied "unknown".
            try:
                await p.backend.sync(p.store)
            except GatedError as e:
                log.warning("offline data not refreshed: %s", e, extra={"GATED_EVENT": "sync_failed"})

    async def _link_lanes(self) -> int | None:
        """The MQTT lane link, after the outputs and before the readers, so the first admission is shared."""
        loop = asyncio.get_running_loop()
        try:
            self.link = mqtt.attach(self.config, self.parts.store, self.parts.gate,
                                    on_mode=lambda mode: loop.call_soon_threadsafe(self.queue.put_nowait,
                                                                                   _SetMode(mode)),
                                    occupancy=self.parts.occupancy)
        except ConfigError as e:  # a secret file found wrong only when it is read
            log.error("cannot start:\n%s", Lines(configmod.report(e)), extra={"GATED_EVENT": "start_failed"})
            await self.parts.close()
            return 2
        return None

    def _background(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        """The uploader, the syncer, housekeeping (and the readiness share with MQTT status): each run
        as a task restarted if it fails (`_keep_running`)."""
        p, c = self.parts, self.config
        self.uploader = Uploader(p.backend, p.store)
        self.uploader.can_upload = lambda: p.decider.breaker.allows()
        self.syncer = Syncer(p.backend, StoreThread(c.store.path, "sync", read_only_ok=True),
                             c.backend.sync_interval_seconds)
        if p.backend.online:  # fresh offline data from the API ends a replaced store's fallback
            self.syncer.on_synced = self._accept_replaced
        # Offline-first backends upload as they go. A scan queued because the API just failed waits
        # for the breaker's probe (on_reconnect below): waking now would only fail again.
        p.gate.on_queued = lambda: self.uploader.wake() if p.decider.offline_first else None
        p.decider.on_reconnect += [self.uploader.wake, self.syncer.wake]
        tasks = [("uploader", self.uploader.run), ("syncer", self.syncer.run), ("housekeeping", self._housekeeping)]
        if self.link is not None and c.mqtt.status:
            tasks.append(("ready", self._share_ready))
        return tasks

    async def _accept_replaced(self) -> None:
        """After a sync: a store that replaced a damaged one is trusted again, and the log says so once,
        as it said at start what was lost (open_store)."""
        if await self.syncer.store.call(Store.accept_replaced) is not None:
            log.info("offline data synced from the ticket API into the store that replaced the damaged one: "
                     "offline decisions follow the offline rules again", extra={"GATED_EVENT": "store_accepted"})

    def _start_metrics(self, tasks: list[tuple[str, Callable[[], Awaitable[None]]]]) -> int | None:
        """The Prometheus exporter with [metrics], as one more background task; an exit code when its
        address cannot be bound."""
        c, p = self.config, self.parts
        if c.metrics is None:
            return None
        from gated import metrics

        try:
            occ = p.occupancy  # [occupancy] changes only at a restart (reload)
            self.exporter = metrics.attach(c.metrics, p.gate, metrics.Lane(
                self.syncer.store, lambda: self.parts.decider, self._readers_up,
                None if occ is None else lambda: (occ.venue_total(), occ.capacity)))
        except OSError as e:
            log.error("cannot start: [metrics] listen = %s: %s", c.metrics.listen, e.strerror or e,
                      extra={"GATED_EVENT": "start_failed"})
            return 1
        if self.exporter is not None:
            tasks.append(("metrics", self.exporter.run))
            log.info("metrics: %s", self.exporter.describe())
        return None

    def _handle_signals(self) -> None:
        """SIGTERM and SIGINT stop; SIGHUP reloads the config between two scans."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.queue.put_nowait(_RELOAD))

    async def _announce_ready(self, started: float) -> None:
        """The start-up banner, then READY=1 and the first status."""
        p, c = self.parts, self.config
        stats = await p.store.call(Store.queue_stats)
        if stats.pending:  # scans queued before a restart go out now, not after the uploader's idle minute
            self.uploader.wake()
        log.info("readers: %s", ", ".join(r.describe() for r in self._reader_objs.values()))
        log.info("outputs: %s", p.outputs.describe())
        if self.link is not None:
            log.info("lanes: %s", self.link.describe())
        if p.occupancy is not None:
            log.info("occupancy: %s; this lane counts %s; starts again at %s", p.occupancy.describe(),
                     "entries" if c.lane.scan_mode == "entry" else "exits", p.occupancy.reset_at)
        log.info("policy: %s; offline fallback %s; queue: %d", self._policy_text(), c.offline.fallback,
                 stats.pending)
        self.notifier.ready(self._status(stats.pending))
        self._share_status(stats.pending)
        log.info("ready in %.0f ms", (time.monotonic() - started) * 1000, extra={"GATED_EVENT": "ready"})

    async def _stop(self, background: list[asyncio.Task]) -> None:
        """Readers first (the scans already read are still decided), the lane link, background tasks,
        then the parts (outputs to their safe state, the store closed last)."""
        p = self.parts
        log.info("stopping: readers first, then outputs to their safe state (%s)", self.config.relay.safe_state)
        self.notifier.stopping()
        for _, task in self.readers.values():
            task.cancel()
        await asyncio.gather(*(t for _, t in self.readers.values()), return_exceptions=True)
        while not self.queue.empty():  # scans already read are decided, not dropped
            item = self.queue.get_nowait()
            if isinstance(item, tuple):
                await p.gate.handle(*item)
                p.gate.quiet.leave()
        if self.link is not None:  # its last admissions shared, then "offline" announced
            await asyncio.to_thread(self.link.stop)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if self.exporter is not None:
            self.exporter.close()
        await p.close()
        self.syncer.store.close()
        log.info("stopped")

    # --- status and the decision loop -----------------------------------------------------

    def _policy_text(self) -> str:
        p = self.parts
        if not p.backend.online:
            return p.backend.describe()
        mode = "offline-first" if p.decider.offline_first else f"online (deadline {p.decider.timeout:g}s)"
        return f"{p.backend.describe()} {mode} -> offline"

    def _status(self, queued: int) -> str:
        last = f", last {self.parts.gate.last_scan}" if self.parts.gate.last_scan else ""
        store = ", STORE READ-ONLY: scans not recorded" if self.parts.store.read_only else ""
        inside = f", {self.parts.occupancy.describe()}" if self.parts.occupancy is not None else ""
        return f"{self._state()}{store}, {queued} queued{last}{inside}"

    def _not_recording(self) -> str:
        if self.parts.gate.on_error == "admit":
            return ('scans are not recorded; [store] on_error = "admit": they are decided from the offline data '
                    'it still holds and admitted unrecorded (not uploaded; anti-passback does not see them)')
        return 'scans are not recorded; [store] on_error = "deny": nothing is admitted until it can be written'

    async def _follow_storage(self) -> None:
        """Notice the store turning read-only or writable again, and open it to match.

        A read-only store is read through read-only connections only, and SQLite shares one WAL index
        mapping per file in a process: every connection of the daemon is closed before any is opened
        again (a scan meanwhile fails like any store error, by [store] on_error).
        """
        p, path = self.parts, self.config.store.path
        why = unwritable(path)
        if (why is None) == (p.store.read_only is None):
            return
        stores = [p.store, self.syncer.store]
        for s in stores:
            await s.close_store()
        for s in stores:
            await s.open_store()
        if p.store.read_only:
            log.error("store %s cannot be written any more (%s): %s", path, p.store.read_only,
                      self._not_recording(), extra={"GATED_EVENT": "store_read_only"})
        else:
            log.info("store %s can be written again: scans are recorded again", path,
                     extra={"GATED_EVENT": "store_writable"})

    def _state(self) -> str:
        d = self.parts.decider
        if d.emergency:
            state = "EMERGENCY: free passage"
        elif d.offline_first:
            state = "offline-first" if self.parts.backend.online else "local"
        elif d.breaker.is_open:
            state = "OFFLINE since " + time.strftime("%H:%M", time.localtime(time.time() - (
                time.monotonic() - (d.breaker.opened_at or time.monotonic()))))
        else:
            state = "online"
        return state

    def _reader_states(self) -> dict[str, str]:
        readers = {}
        for name, (_, task) in self.readers.items():
            connected = getattr(self._reader_objs.get(name), "connected", None)
            readers[name] = "stopped" if task.done() else {True: "connected", False: "disconnected"}.get(
                connected, "running")
        return readers

    def _readers_up(self) -> dict[str, bool]:
        return {name: state in ("connected", "running") for name, state in self._reader_states().items()}

    async def _share_ready(self) -> None:
        """The doors-open check every minute, into the retained status (Home Assistant's Ready sensor)."""
        from gated import doctor, ready

        system = doctor.System()
        link = self.link

        async def broker() -> str | None:
            return None if link.connected else "not connected (the lane's own link)"

        while True:
            results = await ready.evaluate(self.config, self.parts.backend, self.syncer.store, system, broker)
            link.set_status(**ready.summary(results))
            await asyncio.sleep(READY_SECONDS)

    def _share_status(self, queued: int) -> None:
        """The fleet's view of this lane (retained on the MQTT broker), refreshed with STATUS=."""
        if self.link is None:
            return
        d = self.parts.decider
        readers = self._reader_states()
        self.link.set_status(api=self._state(), queue=queued, last_scan=self.parts.gate.last_scan,
                             mode="emergency" if d.emergency else d.mode, readers=readers)

    async def _decision_loop(self) -> None:
        """Take scans one at a time; the watchdog is fed from here, so a stuck scan path is noticed."""
        ping = (self.notifier.watchdog_seconds or 20.0) / 3
        stop = asyncio.get_running_loop().create_task(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                get = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({get, stop}, timeout=ping, return_when=asyncio.FIRST_COMPLETED)
                self.notifier.watchdog()
                if get not in done:
                    get.cancel()
                    if get.done() and not get.cancelled():  # raced: keep the scan
                        self.queue.put_nowait(get.result())
                    continue
                item = get.result()
                if item is _RELOAD:
                    await self._reload()
                    continue
                if isinstance(item, _SetMode):
                    await self._set_mode(item.mode)
                    continue
                try:
                    await self.parts.gate.handle(*item)
                finally:
                    self.parts.gate.quiet.leave()  # counted since it was read (_pump)
                # A covering index (scans_outbox) keeps this count small whatever the journal holds.
                await self._refresh_status(self.parts.store)
        finally:
            stop.cancel()

    async def _housekeeping(self) -> None:
        """Status refresh, WAL checkpoints and pruning, away from the scan path."""
        ticks = 0
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            ticks += 1
            try:
                await self._follow_storage()
            except StoreError as e:  # still closed: every call says so, and the next round tries again
                log.warning("store not opened again: %s", e, extra={"GATED_EVENT": "store_error"})
            await self._refresh_status(self.syncer.store)
            try:
                # Often enough that the WAL is written over, not grown (Store.checkpoint); with
                # nothing new since the last one it costs a read of the WAL index.
                await keep_wal(self.syncer.store, self.parts.store)
                if ticks % round(3600 / HOUSEKEEPING_SECONDS) == 0:  # hourly
                    await self.syncer.store.call(Store.prune, self.config.store.retention_seconds)
            except StoreError as e:
                # Expected on a full or read-only card, every round while it lasts: said once.
                if not self._maintenance_failing:
                    log.warning("store maintenance failed: %s; the gate goes on deciding", e,
                                extra={"GATED_EVENT": "store_error"})
                self._maintenance_failing = True
            else:
                if self._maintenance_failing:
                    log.info("store maintenance works again", extra={"GATED_EVENT": "store_ok"})
                self._maintenance_failing = False

    # --- readers ---------------------------------------------------------------------------

    def _start_readers(self, sections: dict[str, Section], config: Config) -> None:
        self._reader_objs: dict[str, Reader] = getattr(self, "_reader_objs", {})
        loop = asyncio.get_running_loop()
        for name, section in sections.items():
            if self.simulate and section.type != "stdin":
                section = Section(section.where, {**section, "type": "stdin"})
                if any(s.type == "stdin" for s, _ in self.readers.values()):
                    continue
            reader = build_reader(name, section, config)
            self._reader_objs[name] = reader
            self.readers[name] = (section, loop.create_task(self._pump(reader), name=f"reader-{name}"))

    async def _pump(self, reader: Reader) -> None:
        while True:
            try:
                async for scan in reader.scans():
                    self.parts.gate.quiet.enter()  # from now on uploads wait for it (gated.quiet)
                    self.queue.put_nowait((scan, reader.label))
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reader %s failed unexpectedly; restarting it in 2 s", reader.name,
                              extra={"GATED_EVENT": "reader_lost", "GATED_READER": reader.name})
                await asyncio.sleep(2)

    # --- reload ----------------------------------------------------------------------------

    async def _reload(self) -> None:
        # systemd holds the unit in "reloading" after RELOADING=1 until READY=1 comes, whether the
        # new config was taken or refused: send it on both paths, with the state as it now is.
        self.notifier.reloading()
        try:
            await self._apply_new_config()
        finally:
            pending = await self._pending(self.parts.store)
            self.notifier.ready(self._status(self._last_pending if pending is None else pending))

    async def _apply_new_config(self) -> None:
        try:
            new = configmod.load(self.config.path)
        except ConfigError as e:
            log.error("configuration not reloaded, the running one stays:\n%s", Lines(configmod.report(e)),
                      extra={"GATED_EVENT": "config_rejected"})
            return
        old, p, changed = self.config, self.parts, []
        if new.store.path != old.store.path:
            log.warning("[store] path changed; it takes effect at the next restart")
            new.store = old.store
        if new.mqtt != old.mqtt:
            log.warning("[mqtt] changed; it takes effect at the next restart")
            new.mqtt = old.mqtt
        if new.metrics != old.metrics:  # the exporter keeps the file, address and interval it started with
            log.warning("[metrics] changed; it takes effect at the next restart")
            new.metrics = old.metrics
        occ = p.occupancy
        if new.occupancy != old.occupancy:
            if occ is not None and new.occupancy is not None and new.occupancy.reset_at == occ.reset_at:
                occ.capacity = new.occupancy.capacity  # a safety officer's new limit applies at once
                changed.append("capacity")
            else:
                log.warning("[occupancy] changed; it takes effect at the next restart")
                new.occupancy = old.occupancy
        if new.backend != old.backend or new.backend_options != old.backend_options:
            backend = build_backend(new)
            try:
                await backend.start(p.store)
            except Unreachable as e:
                log.warning("new backend not reachable yet (%s); deciding offline", e)
            await p.backend.close()
            backend.quiet = p.gate.quiet
            p.backend = p.decider.backend = self.uploader.backend = self.syncer.backend = backend
            self.syncer.wake()
            changed.append("backend")
        hardware = ("gpio", "relay", "leds", "buzzer", "passage", "emergency")
        if any(getattr(new, k) != getattr(old, k) for k in hardware):
            await p.gate.drain()
            p.outputs.close()
            try:
                p.outputs = _outputs(new, self.simulate, p.decider)
            except DriverError as e:
                log.error("outputs not rebuilt (%s); keeping the previous wiring", e)
                p.outputs = _outputs(old, self.simulate, p.decider)
                new.gpio, new.relay, new.leds, new.buzzer = old.gpio, old.relay, old.leds, old.buzzer
                new.passage, new.emergency = old.passage, old.emergency
            p.gate.outputs = p.outputs
            p.decider.emergency = p.outputs.emergency_active
            changed.append("outputs")
        wallet = (new.wallet_apple, new.wallet_google) != (old.wallet_apple, old.wallet_google)
        gone = [n for n, (s, _) in self.readers.items()
                if new.readers.get(n) != s or (wallet and s.type == "nfc")]  # nfc readers hold wallet keys
        for name in gone:
            _, task = self.readers.pop(name)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._reader_objs.pop(name, None)
        self._start_readers({n: s for n, s in new.readers.items() if n not in self.readers}, new)
        if gone or len(new.readers) != len(old.readers):
            changed.append("readers")
        p.decider.apply(new)
        p.gate.apply(new)
        if occ is not None:  # which way this lane's passages count, and whether capacity stops it
            occ.scan_mode = new.lane.scan_mode
        self.config = new
        log.info("configuration reloaded from %s (%s)", new.path, ", ".join(changed) or "settings only",
                 extra={"GATED_EVENT": "config_reloaded"})

    async def _set_mode(self, mode: str) -> None:
        """A remote mode command, applied as a reload that changes only [lane] mode (until the next one)."""
        new = replace(self.config, lane=Section(self.config.lane.where, {**self.config.lane, "mode": mode}))
        self.parts.decider.apply(new)
        self.parts.gate.apply(new)
        self.config = new
        log.info("%s mode is now %s (MQTT command); [lane] mode in %s applies again at the next reload",
                 new.lane.name, mode, new.path, extra={"GATED_EVENT": "mode_changed"})
        await self._refresh_status(self.parts.store)

    async def _pending(self, store: StoreThread) -> int | None:
        """Scans waiting for upload; None while the store cannot be read (the scans say why)."""
        try:
            pending = (await store.call(Store.queue_stats)).pending
        except StoreError as e:
            log.debug("queue not counted: %s", e)
            return None
        self._last_pending = pending
        return pending

    async def _refresh_status(self, store: StoreThread) -> None:
        pending = await self._pending(store)
        if pending is not None:
            self.notifier.status(self._status(pending))
            self._share_status(pending)


async def one_scan(config: Config, scan: Scan, label: str) -> tuple[int, str]:
    """`gated scan`: the daemon's own pipeline for one token. Returns (exit code, verdict line)."""
    parts = await build(config)
    try:
        if not parts.backend.online or await parts.store.call(
                lambda s: parts.backend.data_age(s, time.time())) is None:
            try:
                await parts.backend.sync(parts.store)
            except Unreachable as e:
                log.warning("offline data not refreshed: %s", e, extra={"GATED_EVENT": "sync_failed"})
        # The online deadline runs from the read (Decider): here the code was "read" before the gate
        # was built and its data synced, time no reader's scan ever spends, so it starts now.
        scan = replace(scan, received=time.monotonic())
        decision = await parts.gate.handle(scan, label)
        await parts.outputs.settle()  # a relay pulse cut short lets nobody through
    finally:
        await parts.close()
    line = parts.gate.last_line
    return (0 if decision is not None and decision.admitted else 1), line
