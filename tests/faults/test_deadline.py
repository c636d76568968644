"""The online deadline is per visitor: counted from the moment the scan was read, queueing included.

A lane decides its scans one at a time, so a visitor who arrives while the scan before is still
waiting for the API also waits for it. The scans here go in the way the daemon's readers hand them
over: each is read (`Scan.received`) when it arrives, put on the daemon's queue and taken off it by
the daemon's own decision loop. What is measured is each scan's time from read to verdict, as the
store records it (`latency_ms`, taken before the commit: a commit that stalls in fsync, a known hazard
of this disk, is not the deadline's doing); the scans' commits before it are included, since it waits
for them in the queue.

- With the API hanging (connections accepted, no answer: a stalled proxy or an overloaded server)
  a burst of six visitors 150 ms apart, all inside one deadline, gets every verdict within the
  deadline of each one's own arrival, for every backend.
- With the API slow but healthy (answering in a bit over half the deadline), the visitors queued
  behind its calls keep their deadline too, and the breaker stays closed: a scan left with too
  little time is decided offline without asking, instead of making the API look dead.
- `gated scan` reads its code before it logs in and syncs, which no reader's scan waits for: its
  deadline starts when the gate is ready, so an installer's test scan still asks the API.
"""

from __future__ import annotations

import asyncio
import time

import gated_faults_backends as backends  # tests/faults/backends.py, registered by conftest.py
import pytest

from gated.config import Config
from gated.daemon import Daemon, Parts, build, one_scan
from gated.model import Decision, Scan, Source, Verdict

BACKENDS = backends.available_backends()
DEADLINE = 0.8  # the shipped [backend] timeout_seconds: a burst 150 ms apart fits inside one deadline
BURST, SPACING = 6, 0.15
MARGIN_MS = 50.0  # what a verdict may come after the deadline on a loaded 2-core machine


async def _burst(parts: Parts, config: Config, tokens: list[str]) -> list[tuple[float, float, Decision]]:
    """Scan `tokens` SPACING apart through the daemon's queue and decision loop; per scan, in order,
    its time from read to verdict (as recorded) and to the relay command (as logged), in ms, and its
    decision."""
    daemon = Daemon(config)
    daemon.parts = parts
    acted: list[tuple[float, Decision]] = []
    all_acted = asyncio.Event()

    def on_decided(scan: Scan, decision: Decision) -> None:
        acted.append((parts.gate.last_act_ms, decision))
        if len(acted) == len(tokens):
            all_acted.set()

    parts.gate.on_decided.append(on_decided)
    loop = asyncio.get_running_loop().create_task(daemon._decision_loop())
    start = time.monotonic()
    try:
        for i, token in enumerate(tokens):
            await asyncio.sleep(max(0.0, start + i * SPACING - time.monotonic()))  # the arrivals: the input
            parts.gate.quiet.enter()  # as Daemon._pump does when a reader hands a scan over
            daemon.queue.put_nowait((Scan(token=token, reader="front"), "front"))
        await asyncio.wait_for(all_acted.wait(), 10 * DEADLINE * BURST)
    finally:
        daemon.stopping.set()
        await loop
    rows = await parts.store.call(lambda s: list(s.db.query("SELECT latency_ms FROM scans ORDER BY id")))
    return [(row["latency_ms"], ms, d) for row, (ms, d) in zip(rows, acted, strict=True)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_the_api_hanging_every_visitor_of_a_burst_has_a_verdict_within_the_deadline_of_arriving(
        backend, make_kit, make_proxy, load_config, figures):
    kit = make_kit(backend, n_tokens=BURST)
    proxy = make_proxy(kit.port)
    cfg = backends.quick(load_config(kit.toml(proxy.url, deadline=DEADLINE)))

    async def run():
        parts = await build(cfg)
        try:
            await kit.prepare(parts)
            await asyncio.to_thread(proxy.set, "stall")
            try:
                return await _burst(parts, cfg, kit.tokens)
            finally:
                await asyncio.to_thread(proxy.set, "pass")
        finally:
            await parts.close()

    scans = asyncio.run(run())
    assert proxy.faulted(), "the API never hung for a scan: this test would prove nothing"
    assert [(d.verdict, d.source) for _, _, d in scans] == [(Verdict.ADMIT, Source.OFFLINE)] * BURST, \
        [(d.verdict, d.reason, d.source, d.detail) for _, _, d in scans]
    waited = [ms for ms, _, _ in scans]
    figures["hanging_api_burst_verdict_over_deadline_ms"].extend(ms - DEADLINE * 1000 for ms in waited)
    figures["hanging_api_burst_relay_over_deadline_ms"].extend(ms - DEADLINE * 1000 for _, ms, _ in scans)
    assert max(waited) <= DEADLINE * 1000 + MARGIN_MS, [f"{ms:.0f} ms" for ms in waited]


def test_scans_queued_behind_a_slow_but_healthy_api_keep_their_deadline_and_the_breaker_stays_closed(
        make_kit, make_proxy, load_config):
    kit = make_kit("entry", n_tokens=BURST)
    # Each answer takes 0.45 s: a working API (the breaker calls an answer slow past 0.6 s), but
    # slower than visitors arrive, so a queue builds behind it.
    proxy = make_proxy(kit.port, delay=0.45)
    cfg = backends.quick(load_config(kit.toml(proxy.url, deadline=DEADLINE)))

    async def run():
        parts = await build(cfg)
        try:
            await kit.prepare(parts)
            await asyncio.to_thread(proxy.set, "delay")
            try:
                return await _burst(parts, cfg, kit.tokens), parts.decider.breaker.is_open
            finally:
                await asyncio.to_thread(proxy.set, "pass")
        finally:
            await parts.close()

    scans, breaker_open = asyncio.run(run())
    decisions = [d for _, _, d in scans]
    assert decisions[0].source is Source.ONLINE and all(d.admitted for d in decisions), \
        [(d.verdict, d.reason, d.source, d.detail) for d in decisions]
    assert not breaker_open
    # The API was asked only when it had time to answer: every call it got, it answered.
    asked = [r for r in proxy.faulted() if "validate" in r.path]
    assert len(asked) == sum(1 for d in decisions if d.source is Source.ONLINE)
    assert all("deadline left to ask" in d.detail for d in decisions if d.source is Source.OFFLINE)
    waited = [ms for ms, _, _ in scans]
    assert max(waited) <= DEADLINE * 1000 + MARGIN_MS, [f"{ms:.0f} ms" for ms in waited]


def test_gated_scan_asks_the_api_however_long_its_start_took(make_kit, load_config):
    kit = make_kit("entry", n_tokens=1)
    cfg = backends.quick(load_config(kit.toml(kit.sim.url, deadline=DEADLINE)))
    # Read two deadlines ago, as when `gated scan` spent that long logging in and syncing.
    scan = Scan(token=kit.tokens[0], reader="front", received=time.monotonic() - 2 * DEADLINE)

    code, line = asyncio.run(one_scan(cfg, scan, "front"))
    assert code == 0 and " ADMIT ok online " in line, line
