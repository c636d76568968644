"""One scan, start to finish: normalise -> debounce -> decide -> record -> act -> log."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable

from gated.config import Config
from gated.debounce import Debouncer
from gated.drivers.gpio import Outputs
from gated.errors import GatedError, StoreError
from gated.logs import NOTICE, clean
from gated.model import Decision, Reason, Scan, ScanMode, Source, admit, deny
from gated.policy.decider import Decider
from gated.quiet import Quiet
from gated.store import Store, StoreThread
from gated.tokens import Malformed, normalise, redact, redact_field, trace

log = logging.getLogger("gated.scan")

MESSAGE_LIMIT = 120  # characters of a server's message (a name, a reason) in the scan line
DETAIL_LIMIT = 300


class Gate:
    def __init__(self, config: Config, decider: Decider, store: StoreThread, outputs: Outputs,
                 on_queued: Callable[[], None] = lambda: None):
        self.decider = decider
        self.store = store
        self.outputs = outputs
        self.on_queued = on_queued
        # Called with (scan, decision) once the scan is recorded and acted on, e.g. to share the
        # admission with other lanes (gated.mqtt). Must return at once: it runs on the scan path.
        self.on_decided: list[Callable[[Scan, Decision], None]] = []
        # Called with the scan once the admitted person went through: at once without a passage
        # sensor, on its confirmation with one (gated.occupancy counts people inside).
        self.on_passed: list[Callable[[Scan], None]] = []
        # Called with (decision, seconds from read to relay command) for every scan's line, recorded
        # or not (gated.metrics counts them). Must return at once: it runs on the scan path.
        self.on_logged: list[Callable[[Decision, float], None]] = []
        self.tasks: set[asyncio.Task] = set()
        # Scans read and not yet acted on: uploads wait for a gap (gated.quiet).
        self.quiet = Quiet()
        self.last_scan = ""
        self.last_line = ""
        self.last_act_ms = self.last_commit_ms = 0.0  # scan -> relay command, and the commit in it
        self.apply(config)

    def apply(self, config: Config) -> None:
        self.lane = config.lane.name
        self.scan_mode = ScanMode(config.lane.scan_mode)
        self.readers = config.readers
        self.debouncer = Debouncer(config.lane.debounce_seconds)
        self.on_error = config.store.get("on_error", "deny")

    async def handle(self, scan: Scan, label: str | None = None) -> Decision | None:
        """Decide, record, act on and log one scan; None when it was a debounced repeat.

        This is the scan path's last guard: whatever escapes normalising, the decider, the store or
        the log costs this one scan a recorded deny with reason `error` (a logged one if even the
        record fails), with a deny signal and no relay release, never the daemon. The try costs
        nothing until it catches.
        """
        self.quiet.enter()
        commit = _Commit(self, scan)
        label = label or scan.reader
        try:
            return await self._handle(commit, label)
        except Exception as e:  # noqa: BLE001 - see the docstring
            return await self._guard(commit, label, e)
        finally:
            self.quiet.leave()

    async def _handle(self, committed: _Commit, label: str) -> Decision | None:
        scan = committed.scan
        section = self.readers.get(scan.reader, {})
        try:
            scan = scan.with_token(normalise(
                scan.token, prefix=section.get("prefix", ""), suffix=section.get("suffix", ""),
                strip_aim=section.get("strip_aim", True), max_length=section.get("max_length", 4096)))
        except Malformed as e:
            # Keep a bounded, printable trace of what arrived, never the whole blob.
            scan = committed.scan = scan.with_token(trace(scan.token))
            committed.clean = True
            decision = deny(Reason.MALFORMED, backend=self.decider.backend.name, detail=str(e))
        else:
            if self.debouncer.is_repeat(scan.reader, scan.token, time.monotonic()):
                log.debug("%s repeat of %s on %s within the debounce window; ignored",
                          self.lane, redact(scan.token), label)
                return None
            committed.scan, committed.clean = scan, True
            decision = await self._decide(scan, committed)

        if not committed.done:  # decided online, by the mode, or not at all: record it now
            try:
                await self.store.call(committed, decision)
            except (StoreError, sqlite3.Error) as store_error:  # refused before the commit (read-only)
                committed.error = store_error
        queue, recorded, e = committed.queued, committed.error is None, committed.error
        if e is not None:
            queue = False
            if self.on_error == "admit":
                # The installer chose a moving lane over a complete record: say so on every such scan.
                log.error("scan not recorded (%s); decision kept because [store] on_error = \"admit\": it will "
                          "not be uploaded", e, extra={"GATED_EVENT": "store_error"})
            else:
                # Not recorded means not admitted: an admission nobody can account for is the worse fault.
                log.error("scan not recorded, so not admitted: %s", e, extra={"GATED_EVENT": "store_error"})
                decision = deny(Reason.ERROR, decision.source, backend=decision.backend, detail=f"store: {e}")

        self.last_commit_ms = committed.ms
        committed.decision = decision
        if decision.admitted:  # the relay first: it is what the visitor waits for
            hold = self.outputs.release()
            committed.released = True
            if hold is not None:
                self._spawn(self._after_passage(scan, hold))
            else:  # recorded or not (on_error = "admit"), the person is inside
                self._passed(scan)
        self.outputs.signal(decision.admitted)
        committed.acted = True
        acted_ms = self.last_act_ms = (time.monotonic() - scan.received) * 1000
        self._log(scan, decision, label, acted_ms)
        committed.logged = True
        for callback in self.on_decided if recorded else ():
            try:
                callback(scan, decision)
            except Exception:  # a hook's bug must not stop the gate
                log.exception("after-scan hook failed", extra={"GATED_EVENT": "hook_failed"})
        if queue:
            self.on_queued()
        return decision

    async def _guard(self, committed: _Commit, label: str, error: Exception) -> Decision:
        """The last guard of `handle`: a deny with reason `error`, recorded, signalled and logged."""
        log.error("handling a scan failed unexpectedly; denied", exc_info=error,
                  extra={"GATED_EVENT": "scan_error"})
        if committed.logged:  # only the work after the scan failed: it stands as recorded and logged
            return committed.decision
        if committed.acted or committed.released:  # the relay moved: the recorded verdict stands
            decision = committed.decision
        else:
            decision = deny(Reason.ERROR, backend=self.decider.backend.name,
                            detail=f"{type(error).__name__} in gated")
            if committed.recorded is not None and committed.recorded.admitted:
                # Recorded as admitted, yet the relay never moved: nobody went through, so the ticket
                # stays unused (anti-passback, uploads and the people count skip a scan nobody passed).
                try:
                    await self.store.call(Store.mark_passed, committed.scan.nonce, False)
                except Exception as e:  # noqa: BLE001 - the guard must end with a logged deny
                    committed.error = e
            if not committed.clean:  # it failed before normalising: store only the printable trace
                committed.scan = committed.scan.with_token(trace(str(committed.scan.token)))
            if not committed.done:
                try:
                    await self.store.call(committed, decision)
                except Exception as e:  # noqa: BLE001 - the guard must end with a logged deny
                    committed.error = e
            if committed.error is not None:
                log.error("denied scan not recorded: %s", committed.error, extra={"GATED_EVENT": "store_error"})
            try:
                self.outputs.signal(False)
            except Exception:  # noqa: BLE001 - the deny is logged below even without lights
                log.exception("deny signal failed", extra={"GATED_EVENT": "output_error"})
        scan = committed.scan
        try:
            self._log(scan, decision, label, (time.monotonic() - scan.received) * 1000)
        except Exception as e:  # noqa: BLE001 - the one line this scan gets
            log.log(NOTICE, "%s DENY error (its log line failed: %s)", self.lane, type(e).__name__,
                    extra={"GATED_EVENT": "scan", "GATED_VERDICT": "deny", "GATED_REASON": "error"})
        return decision

    async def _decide(self, scan: Scan, commit: Callable[[Store, Decision], None]) -> Decision:
        """The decider's verdict; a store that cannot be read follows [store] on_error, a bug denies."""
        name = self.decider.backend.name
        try:
            return await self.decider.decide(scan, self.scan_mode, commit)
        except (StoreError, sqlite3.Error) as e:  # offline data and anti-passback live in the store
            if self.on_error == "admit":
                log.error("store unreadable (%s); admitted without a check because [store] on_error = \"admit\"",
                          e, extra={"GATED_EVENT": "store_error"})
                return admit(Reason.FALLBACK_ADMIT, backend=name, ticket_key=scan.token, detail=f"store: {e}")
            log.error("store unreadable, scan not decided: %s", e, extra={"GATED_EVENT": "store_error"})
            return deny(Reason.ERROR, backend=name, detail=f"store: {e}")
        except Exception as e:  # noqa: BLE001 - a bug in one decision must cost one denied scan, not the daemon
            log.exception("deciding a scan failed unexpectedly; denied", extra={"GATED_EVENT": "decide_error"})
            return deny(Reason.ERROR, backend=name, detail=f"{type(e).__name__} in gated")

    async def _after_passage(self, scan: Scan, hold: Awaitable[bool]) -> None:
        passed = await hold
        try:
            await self.store.call(Store.mark_passed, scan.nonce, passed)
        except StoreError as e:
            log.error("passage of %s not recorded: %s", redact(scan.token), e,
                      extra={"GATED_EVENT": "store_error"})
        if passed:
            self._passed(scan)
        if not passed:
            try:
                row = await self.store.call(Store.scan, scan.nonce)
                await self.decider.backend.not_passed(row)
            except GatedError as e:
                log.warning("check-in of %s not annulled: %s", redact(scan.token), e,
                            extra={"GATED_EVENT": "annul_failed"})
            log.info("%s nobody passed for %s within the passage timeout; check-in marked not_passed",
                     self.lane, redact(scan.token), extra={"GATED_EVENT": "not_passed", "GATED_NONCE": scan.nonce})

    def _passed(self, scan: Scan) -> None:
        for callback in self.on_passed:
            try:
                callback(scan)
            except Exception:  # a hook's bug must not stop the gate
                log.exception("after-passage hook failed", extra={"GATED_EVENT": "hook_failed"})

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self) -> None:
        """Wait for relay holds still running (used on stop and by `gated scan`)."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    def _log(self, scan: Scan, d: Decision, label: str, ms: float) -> None:
        # Names and messages come from servers and lists: each is cut to its share of the line, and
        # the whole line cleaned (one line, no escape sequences), since `gated scan` prints it too.
        word = "ADMIT" if d.admitted else "DENY"
        text = (f"{self.lane} {word} {d.reason} {d.source} {clean(d.backend, 40)} {clean(label, 80)} "
                f"{redact(scan.token)} {ms:.0f}ms")
        if d.message:
            text += f' "{clean(d.message, MESSAGE_LIMIT)}"'
        if d.detail:
            text += f" ({clean(d.detail, DETAIL_LIMIT)})"
        text = clean(text)
        self.last_scan = f"{word} {time.strftime('%H:%M:%S')}"
        self.last_line = text
        log.log(logging.INFO if d.admitted else NOTICE, "%s", text, extra={
            "GATED_EVENT": "scan", "GATED_VERDICT": str(d.verdict), "GATED_REASON": str(d.reason),
            "GATED_SOURCE": str(d.source), "GATED_BACKEND": d.backend, "GATED_READER": scan.reader,
            "GATED_INPUT": str(scan.input), "GATED_LANE": self.lane, "GATED_TOKEN": redact_field(scan.token),
            "GATED_LATENCY_MS": f"{ms:.1f}", "GATED_NONCE": scan.nonce, "GATED_SCAN_MODE": str(self.scan_mode),
            "GATED_BACKEND_CODE": d.backend_code,
        })
        for callback in self.on_logged:
            try:
                callback(d, ms / 1000)
            except Exception:  # a hook's bug must not stop the gate
                log.exception("after-scan hook failed", extra={"GATED_EVENT": "hook_failed"})


class _Commit:
    """Record one scan and its decision, on the store thread: called by the Decider in the same hop
    as an offline decision (one thread switch instead of two), else by the Gate after deciding.

    A failed commit is kept, not raised: what it means for the visitor is the Gate's to decide.
    """

    def __init__(self, gate: Gate, scan: Scan):
        self.gate, self.scan = gate, scan
        # How far the scan got, for the last guard: normalised (or traced), recorded, acted, logged.
        self.clean = self.released = self.acted = self.logged = False
        self.decision: Decision | None = None
        self.recorded: Decision | None = None  # the decision as committed to the store
        self.done = False
        self.queued = False
        self.error: Exception | None = None
        self.ms = 0.0

    def __call__(self, store: Store, decision: Decision) -> None:
        gate, scan = self.gate, self.scan
        decided_ms = (time.monotonic() - scan.received) * 1000
        # Only a real token goes to the API: not a malformed one, nor the trace the last guard keeps;
        # nor a `full` deny, which is no check-in and must not become one at the API.
        self.queued = gate.decider.backend.online and decision.source is Source.OFFLINE \
            and decision.reason not in (Reason.MALFORMED, Reason.FULL) and self.clean
        started = time.monotonic()
        try:
            store.record(scan, decision, lane=gate.lane, scan_mode=gate.scan_mode, latency_ms=decided_ms,
                         queue_upload=self.queued)
            self.recorded = decision
        except (StoreError, sqlite3.Error) as e:
            self.error = e
        self.ms = (time.monotonic() - started) * 1000
        self.done = True
