"""Venue figures: the offline scan path with Prometheus metrics on (counted per scan, exported meanwhile)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from benchmarks.common import Figure, housekeeping, latency_text, pct, workdir
from benchmarks.core import local_config, mixed_tokens
from gated.model import Scan


def figures(quick: bool) -> list[Figure]:
    tickets = 100_000 if quick else 1_000_000
    return offline_with_metrics(tickets, 1000, 300 if quick else 3000)


def offline_with_metrics(tickets: int, masks: int, scans: int) -> list[Figure]:
    """As core.offline_decision, with [metrics] and [occupancy] on: the metrics hook and the people
    count on every scan, the capacity check before every decision, and the textfile rewritten every
    second (the shortest interval allowed) while the scans run."""
    folder = workdir()
    cfg = local_config(folder, tickets, masks, f"""
        [metrics]
        textfile = "{folder / 'gated.prom'}"
        interval_seconds = 1
        [occupancy]
        capacity = 1000000
    """)

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
        hook = parts.gate.on_logged[-1]  # the metrics' own hook, timed as the scan path runs it
        hook_us: list[float] = []

        def timed(decision, ms) -> None:
            started = time.perf_counter()
            hook(decision, ms)
            hook_us.append((time.perf_counter() - started) * 1e6)

        parts.gate.on_logged[-1] = timed
        latencies = []
        export = asyncio.get_running_loop().create_task(exporter.run())
        try:
            async with housekeeping(parts.store):
                for token in mixed_tokens(tickets, masks, scans):
                    await parts.gate.handle(Scan(token=token, reader="front"))
                    latencies.append(parts.gate.last_act_ms)
        finally:
            export.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await export
            await exporter.once()  # a last write, so the file shows every scan whatever the run's length
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
