"""Entry backend figures against the local simulator: online overhead, dead-server fallback, upload speed."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx

from benchmarks.common import Figure, latency_text, paced, pct, secret_file, show, workdir, write_config
from gated import config as configmod
from gated.model import Scan, ScanMode, Source, deny
from gated.simulators.entry import DEFAULT_API_KEY, EntrySimulator
from gated.store import Store
from gated.upload import Uploader

DEADLINE = 0.8  # the default online deadline of docs/design.md


def _config(folder: Path, url: str, extra: str = "") -> configmod.Config:
    key = secret_file(folder, "entry-api.key", DEFAULT_API_KEY)
    return configmod.load(str(write_config(folder, f"""
        [backend]
        type = "entry"
        url = "{url}"
        timeout_seconds = {DEADLINE}
        probe_interval_seconds = 3600
        {extra}
        [backend.entry]
        api_key_file = "{key}"
        venue_code = "TS"
        data_account_id = "390"
        make = "Raspberry Pi"
        model = "bench"
    """)))


def online(n: int) -> list[Figure]:
    """gated's scan -> verdict (the Decider, online) vs a bare httpx POST of the same body to the same server."""
    from gated.daemon import build

    sim = EntrySimulator().start()
    cfg = _config(workdir(), sim.url)

    async def run() -> tuple[list[float], list[float], list[float]]:
        parts = await build(cfg)
        backend = parts.backend
        bare_client = httpx.AsyncClient(base_url=sim.url, timeout=DEADLINE)
        gated_ms, bare_ms, handle_ms = [], [], []
        try:
            for i in range(50):  # warm both connections and code paths
                await parts.decider.decide(Scan(token=f"WARM-{i}"), ScanMode.ENTRY)
                await _bare(bare_client, backend, f"WARM-{i}")
            for i in range(n):  # interleaved, so drift on the shared machine hits both alike
                t = time.perf_counter()
                d = await parts.decider.decide(Scan(token=f"BENCH-{i}"), ScanMode.ENTRY)
                gated_ms.append((time.perf_counter() - t) * 1000)
                assert d.source is Source.ONLINE
                t = time.perf_counter()
                await _bare(bare_client, backend, f"BENCH-{i}")
                bare_ms.append((time.perf_counter() - t) * 1000)
            for i in range(min(n, 300)):
                await parts.gate.handle(Scan(token=f"FULL-{i}", reader="front"))
                handle_ms.append(parts.gate.last_act_ms)
        finally:
            await bare_client.aclose()
            await parts.close()
        return gated_ms, bare_ms, handle_ms

    try:
        gated_ms, bare_ms, handle_ms = asyncio.run(run())
    finally:
        sim.stop()
    ratio = pct(gated_ms, 50) / pct(bare_ms, 50)
    ratio99 = pct(gated_ms, 99) / pct(bare_ms, 99)
    return [
        Figure("entry online scan->verdict", latency_text(gated_ms), "-", None),
        Figure("entry bare httpx request", latency_text(bare_ms), "-", None),
        Figure("entry online overhead (p50 ratio)", f"{ratio:.2f}x (p99 {ratio99:.2f}x)", "<= 1.2x", ratio <= 1.2),
        Figure("entry online scan->relay incl. commit", latency_text(handle_ms), "-", None),
    ]


async def _bare(client: httpx.AsyncClient, backend, token: str) -> None:
    body = {"token": token, "inputType": "Barcode", "scanMode": "Entry", "barcodeType": "Barcode",
            "testMode": False, **backend.context()}
    headers = {"PAC-Request-Id": str(uuid.uuid4()), "Authorization": f"Bearer {backend._token}"}
    r = await client.post("/scan/validate", json=body, headers=headers)
    r.raise_for_status()
    r.json()


def dead_server(n: int) -> list[Figure]:
    """Scan -> offline verdict when the server stalls or refuses connections (breaker closed each time, so
    every scan tries the API first), and scan -> relay once the breaker is open."""
    from gated.daemon import build

    sim = EntrySimulator().start()
    cfg = _config(workdir(), sim.url)

    async def run() -> tuple[list[float], list[float], list[float], list[float]]:
        parts = await build(cfg)
        refused, stalled, open_ms, commit_ms = [], [], [], []
        try:
            await parts.backend.sync(parts.store)
            sim.stall.set()
            for i in range(n):
                parts.decider.breaker.close()
                t = time.perf_counter()
                d = await parts.decider.decide(Scan(token=f"39011{i:08d}"), ScanMode.ENTRY)
                stalled.append((time.perf_counter() - t) * 1000)
                assert d.source is Source.OFFLINE
            sim.stall.clear()
            sim.stop()
            for i in range(n):
                parts.decider.breaker.close()
                t = time.perf_counter()
                d = await parts.decider.decide(Scan(token=f"39012{i:08d}"), ScanMode.ENTRY)
                refused.append((time.perf_counter() - t) * 1000)
                assert d.source is Source.OFFLINE
            for _ in range(3):  # open the breaker
                await parts.gate.handle(Scan(token="3901300000000", reader="front"))
            # A refused connection costs little, so scans that still asked would pass this figure too.
            assert parts.decider.breaker.is_open, "the breaker did not open"
            for i in range(max(n * 20, 200)):
                await parts.gate.handle(Scan(token=f"39014{i:08d}", reader="front"))
                open_ms.append(parts.gate.last_act_ms)
                commit_ms.append(parts.gate.last_commit_ms)
            assert parts.decider.breaker.is_open, "the breaker closed while the server was down"
        finally:
            await parts.close()
        return refused, stalled, open_ms, commit_ms

    refused, stalled, open_ms, commit_ms = asyncio.run(run())
    limit = DEADLINE * 1000 + 10
    return [
        Figure("entry dead server (stalled) -> offline verdict", latency_text(stalled), f"<= {limit:.0f} ms",
               max(stalled) <= limit),
        Figure("entry dead server (refused) -> offline verdict", latency_text(refused), f"<= {limit:.0f} ms",
               max(refused) <= limit),
        Figure("entry breaker open: scan->relay incl. commit", latency_text(open_ms), "p99 <= 5 ms",
               pct(open_ms, 99) <= 5.0),
        Figure("entry breaker open: the commit alone", latency_text(commit_ms), "-", None),
    ]


def hanging_burst(bursts: int) -> list[Figure]:
    """Bursts of 6 scans 150 ms apart, all inside one deadline, with the server stalled: each scan is read
    when it arrives, queued and taken by the daemon's own decision loop, as a reader's scans are."""
    from gated.daemon import Daemon, build

    sim = EntrySimulator().start()
    cfg = _config(workdir(), sim.url)
    size, spacing = 6, 0.15

    async def burst(daemon: Daemon, first: int) -> tuple[list[float], list[float]]:
        parts = daemon.parts
        acted: list[float] = []
        done = asyncio.Event()

        def on_decided(scan: Scan, decision) -> None:
            acted.append(parts.gate.last_act_ms)
            if len(acted) == size:
                done.set()

        parts.gate.on_decided[:] = [on_decided]
        daemon.stopping.clear()
        loop = asyncio.get_running_loop().create_task(daemon._decision_loop())
        start = time.monotonic()
        try:
            for i in range(size):
                await asyncio.sleep(max(0.0, start + i * spacing - time.monotonic()))  # the arrivals
                parts.gate.quiet.enter()  # as Daemon._pump hands a reader's scan over
                daemon.queue.put_nowait((Scan(token=f"39015{first + i:08d}", reader="front"), "front"))
            await asyncio.wait_for(done.wait(), 30)
        finally:
            daemon.stopping.set()
            await loop
        rows = await parts.store.call(lambda s: list(s.db.query(
            "SELECT latency_ms FROM scans ORDER BY id DESC LIMIT ?", [size])))
        return [r["latency_ms"] for r in reversed(rows)], acted

    async def run() -> tuple[list[float], list[float]]:
        daemon = Daemon(cfg)
        daemon.parts = parts = await build(cfg)
        verdict_ms, acted_ms = [], []
        try:
            await parts.backend.sync(parts.store)
            for b in range(bursts):
                parts.decider.breaker.close()  # each burst meets the API hanging with the breaker closed
                sim.stall.set()
                decided, acted = await burst(daemon, b * size)
                # Proof the burst met a hanging API: answered scans would pass this figure unmeasured.
                assert parts.decider.breaker.is_open, "the breaker did not open: the API was not hanging"
                sim.stall.clear()  # the held requests end; their clients have long gone
                verdict_ms += decided
                acted_ms += acted
                await asyncio.sleep(0.2)
        finally:
            await parts.close()
        return verdict_ms, acted_ms

    quiet = logging.getLogger("gated.policy.decider")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the breaker opens in every burst: one warning each, on purpose
    try:
        verdict_ms, acted_ms = asyncio.run(run())
    finally:
        quiet.setLevel(level)
        sim.stop()
    limit = DEADLINE * 1000 + 10
    return [
        Figure("entry API hanging, burst of 6: worst wait (read -> verdict)",
               f"worst {max(verdict_ms):.2f} ms (p50 {pct(verdict_ms, 50):.2f} ms, n={len(verdict_ms)})",
               f"<= {limit:.0f} ms", max(verdict_ms) <= limit),
        Figure("  the same, read -> relay command incl. commit", latency_text(acted_ms), "-", None),
    ]


def upload(n: int) -> list[Figure]:
    """Uploader.drain() of n scans queued offline: gzip batches of 100 to the simulator."""
    from gated.policy import build_backend
    from gated.store import StoreThread

    sim = EntrySimulator().start()
    folder = workdir()
    cfg = _config(folder, sim.url)
    event = sim.events[0]["eventId"]

    async def run() -> tuple[float, int]:
        store = StoreThread(cfg.store.path)
        backend = build_backend(cfg)
        try:
            await backend.start(store)
            await backend.sync(store)
            await store.call(_fill, n, event)
            t = time.perf_counter()
            sent = await Uploader(backend, store).drain()
            return time.perf_counter() - t, sent
        finally:
            await backend.close()
            store.close()

    try:
        seconds, sent = asyncio.run(run())
    finally:
        sim.stop()
    target = n / 100_000 * 30  # docs/design.md: 100,000 queued scans within 30 s
    ok = sent == n and sim.upload_requests == -(-n // 100) and len(sim.arrivals) == n
    return [Figure(f"entry upload of {n:,} offline scans", f"{seconds:.2f} s ({sim.upload_requests} requests, "
                   f"{n / seconds:,.0f} scans/s)", f"<= {target:.0f} s", ok and seconds <= target)]


def upload_during_scans(n: int) -> list[Figure]:
    """A scan every 20 ms, decided offline (offline_first), while Uploader.drain() sends n queued scans.

    The simulator runs in its own process at SCHED_IDLE: a gate's API is on another machine, and in
    this process it would hold the interpreter lock while it reads each gzip batch.
    """
    import random
    import subprocess
    import sys

    from benchmarks.common import housekeeping, set_idle
    from gated.daemon import build

    folder = workdir()
    log = folder / "simulator.log"
    with log.open("w") as out:
        sim = subprocess.Popen([sys.executable, "-m", "gated.simulators.entry", "--port", "0"], stdout=out,
                               stderr=subprocess.STDOUT)
    try:
        url = _wait_for_url(log, sim)
        set_idle(sim.pid, True)
        cfg = _config(folder, url, "offline_first = true")
        event = "390:SIM:EVT1"

        async def run() -> tuple[list[float], float, int, int]:
            parts = await build(cfg)
            try:
                await parts.backend.sync(parts.store)
                await parts.store.call(_fill, n, event)
                rng = random.Random(7)
                async with housekeeping(parts.store):
                    started = time.perf_counter()
                    drain = asyncio.get_running_loop().create_task(Uploader(parts.backend, parts.store).drain())
                    acted, _ = await paced(parts.gate, lambda: f"390{rng.randrange(10**10):010d}", drain)
                    sent = await drain
                    seconds = time.perf_counter() - started
                pending = (await parts.store.call(Store.queue_stats)).pending
                return acted, seconds, sent, pending
            finally:
                await parts.close()

        acted, seconds, sent, pending = asyncio.run(run())
    finally:
        sim.terminate()
        sim.wait(10)
    target = n / 100_000 * 30  # docs/design.md: 100,000 queued scans within 30 s
    # Scans made during the drain are queued too; those after its last pass wait for the next.
    ok = sent + pending == n + len(acted)
    return [
        Figure(f"entry upload of {n:,} offline scans, simulator in its own process, scans meanwhile",
               f"{seconds:.2f} s ({sent:,} sent, {pending} left for the next pass)", f"<= {target:.0f} s",
               ok and seconds <= target),
        Figure("  a scan every 20 ms during that upload (offline_first), scan -> relay incl. commit",
               latency_text(acted), "p99 <= 5 ms", pct(acted, 99) <= 5.0),
    ]


def _wait_for_url(log: Path, sim) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(r"simulator at (http://[\d.]+:\d+)", log.read_text())
        if found:
            return found.group(1)
        if sim.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"Entry simulator did not start: {log.read_text()[-500:]}")


def _fill(store: Store, n: int, event: str) -> None:
    """n scans queued for upload, decided offline an second apart, in one commit (not what is measured)."""
    now = time.time() - n
    with store.db.atomic():
        for i in range(n):
            store.record(Scan(token=f"3909{i:09d}", wall=now + i), deny(_reason(), event_id=event, backend="entry"),
                         lane="bench-1", scan_mode=ScanMode.ENTRY, latency_ms=1.0, queue_upload=True)


def _reason():
    from gated.model import Reason

    return Reason.UNKNOWN


def figures(quick: bool) -> Iterator[Figure]:
    # A generator: the rows measured before a figure that raises are kept and printed.
    yield from online(300 if quick else 2000)
    yield from dead_server(3 if quick else 10)
    yield from hanging_burst(3 if quick else 10)
    yield from upload(2000 if quick else 10_000)
    yield from upload_during_scans(10_000 if quick else 100_000)


if __name__ == "__main__":
    import sys

    sys.exit(show(figures("--quick" in sys.argv)))
