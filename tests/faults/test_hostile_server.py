"""Every backend's every call against a hostile server (hostile.py): no admit, no escape, no hang, data kept.

The gate pairs and downloads its data through the hostile server while it passes traffic; then the
server answers one call (validate, sync, upload, probe or pair) with one bad shape. For each backend,
call and shape:

- the call ends within its deadline (httpx's timeouts count per read; a trickle must not hang it);
- nothing escapes the backend but its documented errors (Unreachable, BackendRejected);
- a scan is decided and recorded, never with reason `error`, and never admitted online from an
  answer outside the API's documented shape (only the surrogate shape is a documented answer: a
  deny, its text made storable);
- a sync keeps the offline data: the gate's tickets are still admitted offline after it;
- an upload marks nothing sent on a bad confirmation.

One gate per backend and call runs through every shape, so the default run stays short; each
shape's outcome is checked and reported on its own.
"""

from __future__ import annotations

import asyncio
import time

import gated_faults_backends as backends  # tests/faults/backends.py, registered by conftest.py
import gated_faults_hostile as hostile  # tests/faults/hostile.py
import httpx
import pytest

from gated.daemon import build
from gated.errors import BackendRejected, Unreachable
from gated.model import Reason, Scan, ScanMode, Source, Verdict
from gated.policy import cm, pretix, pretixdroid
from gated.store import Store

SLOW = 1.0  # the slow calls' timeouts (sync, upload, pairing) in these tests, instead of 10-30 s
SLACK = 1.0  # seconds over a call's own deadline that a loaded 2-core machine may add

# Per backend and call: the requests to spoil ("METHOD /path" regex), or absent when the call makes none.
CALLS: dict[str, dict[str, str]] = {
    "entry": {"validate": r"^POST /scan/validate$", "sync": r"^POST /events$", "upload": r"^POST /offline/",
              "probe": r"^POST /ping$", "pair": r"^POST /(venues|session)$"},
    "pretix": {"validate": r"/checkinrpc/redeem/$", "sync": r"^GET /api/v1/organizers/demo/events/democon/.+",
               "upload": r"/checkinrpc/redeem/$", "probe": r"^GET /api/v1/organizers/demo/events/democon/$",
               "pair": r"/device/initialize$"},
    "pretixdroid": {"validate": r"/redeem/$", "upload": r"/redeem/$", "probe": r"/status/$"},
    "tibillet": {"validate": r"/(check_)?ticket/$", "sync": r"/list_tickets/$", "upload": r"/(check_)?ticket/$",
                 "probe": r"/check_api_scan/$", "pair": r"/pair/?$"},
    "cm": {"validate": r"/barcodes/checkin$", "sync": r"/services/[^/]+/barcodes$", "upload": r"/barcodes/upload$",
           "probe": r"/users/[^/]+/services$"},
}
DOCUMENTED = {"surrogate"}  # the only shape in the API's own form: a verdict is allowed, admit is not
CASES = [pytest.param(b, c, id=f"{b}-{c}") for b in backends.available_backends() for c in CALLS[b]]


def _quick_slow_calls(monkeypatch, backend) -> None:
    """The slow calls' per-read timeouts made short, so a trickle costs a second, not half a minute."""
    monkeypatch.setattr(cm, "SLOW", httpx.Timeout(SLOW, connect=SLOW / 2))
    monkeypatch.setattr(pretix, "SLOW_CALL_SECONDS", SLOW)
    monkeypatch.setattr(pretixdroid, "SLOW_CALL_SECONDS", SLOW)
    if hasattr(backend, "slow_timeout"):
        backend.slow_timeout = SLOW
    if hasattr(backend, "slow_seconds"):
        backend.slow_seconds = SLOW


def _storable(value) -> bool:
    """What SQLite and a log line can take: int64, text that encodes, no absurd length."""
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**63
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return len(value) <= 4096
    return value is None or isinstance(value, (bool, float))


async def _offline_admits(parts, token: str) -> bool:
    def decide(store: Store):
        return parts.backend.decide_offline(store, Scan(token=token), ScanMode.ENTRY, time.time(), True)

    return (await parts.store.call(decide)).verdict is Verdict.ADMIT


async def _one(parts, kit, call: str, shape: str, n: int) -> str | None:
    """Run `call` once under the current shape; None when every property holds, else what failed."""
    backend = parts.backend
    token = kit.tokens[n % len(kit.tokens)]
    started = time.monotonic()
    try:
        if call == "validate":
            limit = backends.DEADLINE + SLACK
            decision = await parts.gate.handle(Scan(token=token, reader="front"))
            if decision.reason is Reason.ERROR:
                return f"decided with reason error: {decision.detail}"
            if decision.source is Source.ONLINE and decision.verdict is Verdict.ADMIT:
                return f"admitted online from a hostile answer ({decision.message!r})"
            if shape not in DOCUMENTED and decision.source is not Source.OFFLINE:
                return f"taken as the API's verdict: {decision.verdict} {decision.reason} {decision.message!r}"
            fields = (decision.message, decision.backend_code, decision.event_id, decision.ticket_key,
                      decision.max_entries)
            if not all(_storable(f) for f in fields):
                return f"decision holds a value the store cannot: {fields!r}"
            rows = await parts.store.call(lambda s: s.db.execute("SELECT count(*) FROM scans").fetchone()[0])
            if rows != n + 1:
                return f"{rows} scans recorded after {n + 1}"
        elif call == "sync":
            limit = SLOW * 2 * 4 + SLACK  # a sync makes several calls, each within its own deadline
            try:
                await asyncio.wait_for(backend.sync(parts.store), 30)
            except (Unreachable, BackendRejected):
                pass
            if not await _offline_admits(parts, kit.tokens[0]):
                return "offline data lost: a ticket admitted before the sync is not any more"
        elif call == "upload":
            limit = SLOW * 2 * 3 + SLACK
            rows = await parts.store.call(lambda s: [dict(r) for r in s.db.query(
                "SELECT * FROM scans WHERE upload = 'pending' ORDER BY id")])
            try:
                result = await asyncio.wait_for(backend.upload(rows), 30)
            except (Unreachable, BackendRejected):
                result = None
            if result is not None and result.sent and shape not in DOCUMENTED:
                return f"{len(result.sent)} scans taken as uploaded from a hostile confirmation"
        elif call == "probe":
            limit = backends.DEADLINE * 2 + SLACK
            try:
                await asyncio.wait_for(backend.probe(), 30)
            except Unreachable:
                pass
        else:
            limit = SLOW * 2 * 3 + SLACK
            code = {"entry": "TS", "pretix": kit.sim.new_device("Hostile") if kit.name == "pretix" else "",
                    "tibillet": kit.sim.new_device("Hostile") if kit.name == "tibillet" else ""}[kit.name]
            try:
                await asyncio.wait_for(backend.pair(parts.store, code), 30)
            except (Unreachable, BackendRejected):
                pass
    except TimeoutError:
        return "hung: still running after 30 s"
    except Exception as e:  # noqa: BLE001 (the property: nothing else escapes)
        return f"{type(e).__name__} escaped: {str(e)[:120]}"
    took = time.monotonic() - started
    if took > limit:
        return f"took {took:.1f}s, over its deadline of {limit:.1f}s"
    return None


@pytest.mark.parametrize(("backend", "call"), CASES)
def test_a_hostile_answer_is_a_failed_call_never_an_admit_a_crash_or_a_hang(backend, call, make_kit, load_config,
                                                                              monkeypatch):
    kit = make_kit(backend)
    server = hostile.HostileServer(kit.port, backend)
    cfg = backends.quick(load_config(kit.toml(server.url)))
    if call == "upload":
        cfg.backend["offline_first"] = True  # every scan decided offline and queued for upload
    cfg.backend["probe_interval_seconds"] = 3600  # the breaker's own probes would meet the shape too

    async def run() -> dict[str, str]:
        parts = await build(cfg)
        try:
            _quick_slow_calls(monkeypatch, parts.backend)
            await kit.prepare(parts)
            if call == "upload":
                for token in kit.tokens:
                    await parts.gate.handle(Scan(token=token, reader="front"))
            failures = {}
            for n, shape in enumerate(hostile.SHAPES):
                parts.decider.breaker.close()  # each shape meets the call itself, not an open breaker
                server.aim(CALLS[backend][call], shape)
                hits = server.hits
                failure = await _one(parts, kit, call, shape, n)
                server.aim(None)
                if failure is None and server.hits == hits:
                    failure = "the shape never met a request: this case proves nothing"
                if failure:
                    failures[shape] = failure
            return failures
        finally:
            server.aim(None)
            await parts.close()

    try:
        failures = asyncio.run(run())
    finally:
        server.close()
    assert not failures, "\n".join(f"{shape}: {why}" for shape, why in failures.items())
