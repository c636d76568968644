"""Venue figures: the offline scan path with Prometheus metrics on (counted per scan, exported meanwhile)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from benchmarks.common import Figure, housekeeping, latency_text, pct, workdir, write_config
from benchmarks.core import _masks, ticket_csv
from gated import config as configmod
from gated.model import Scan


def figures(quick: bool) -> list[Figure]:
    tickets = 100_000 if quick else 1_000_000
    return offline_with_metrics(tickets, 1000, 300 if quick else 3000)


def offline_with_metrics(tickets: int, masks: int, scans: int) -> list[Figure]:
    """As core.offline_decision, with [metrics] and [occupancy] on: the metrics hook and the people
    count on every scan, the capacity check before every decision, and the textfile rewritten every
    second (the shortest interval allowed) while the scans run."""
    folder = workdir()
    csv = ticket_csv(folder, tickets)
    mask_list = ", ".join(f'"{m}"' for m in _masks(masks))
    cfg = configmod.load(str(write_config(folder, f"""
        [backend]
        type = "local"
        [backend.local]
        tickets = "{csv}"
        masks = [{mask_list}]
        [metrics]
        textfile = "{folder / 'gated.prom'}"
        interval_seconds = 1
        [occupancy]
        capacity = 1000000
    """)))

    from gated import metrics
    from gated.daemon import build
    from gated.store import StoreThread

    async def run() -> tuple[list[float], list[float], int]:
        parts = await build(cfg)
        await parts.backend.sync(parts.store)
        side = StoreThread(cfg.store.path, "sync")  # the daemon reads gauges on the syncer's thread
        exporter = metrics.attach(cfg.metrics, parts.gate, metrics.Lane(side, lambda: parts.decider,
                                                                        lambda: {"front": True},
                                                                        lambda: (parts.occupancy.venue_total(),
                                                                                 parts.occupancy.capacity)))
        hook = parts.gate.on_decided[-1]
        hook_us: list[float] = []

        def timed(scan, decision) -> None:
            started = time.perf_counter()
            hook(scan, decision)
            hook_us.append((time.perf_counter() - started) * 1e6)

        parts.gate.on_decided[-1] = timed
        latencies = []
        rng = random.Random(7)
        export = asyncio.get_running_loop().create_task(exporter.run())
        try:
            async with housekeeping(parts.store):
                for i in range(scans):
                    kind = i % 3
                    if kind == 0:
                        token = f"TK{rng.randrange(tickets):010d}"
                    elif kind == 1:
                        token = f"{100 + rng.randrange(masks):03d}{rng.randrange(10**10):010d}"
                    else:
                        token = f"NOPE{rng.randrange(10**9)}"
                    await parts.gate.handle(Scan(token=token, reader="front"))
                    latencies.append(parts.gate.last_act_ms)
        finally:
            export.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await export
            exporter.close()
            side.close()
            await parts.close()
        written = (folder / "gated.prom").read_text().count("gated_scans_total{")
        return latencies, hook_us, written

    logging.getLogger("gated").setLevel(logging.WARNING)
    lat, hook_us, series = asyncio.run(run())
    return [
        Figure(f"offline decision, metrics and occupancy on ({tickets:,} tickets, {masks:,} masks, "
               "textfile every 1 s)",
               latency_text(lat), "p99 <= 5 ms", pct(lat, 99) <= 5.0),
        Figure("  metrics hook per scan (counter + histogram)",
               f"p50 {pct(hook_us, 50):.1f} us, p99 {pct(hook_us, 99):.1f} us; {series} scan series written",
               "-", None),
    ]
