"""Offline decision latency with a big list, commit stalls, cold start and memory."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.common import (
    Figure,
    housekeeping,
    latency_text,
    notify_socket,
    pct,
    rss_mb,
    start_daemon,
    workdir,
    write_config,
)
from gated import config as configmod
from gated.model import Scan, ScanMode, Source, admit
from gated.store import Store


def figures(quick: bool) -> Iterator[Figure]:
    n_tickets = 100_000 if quick else 1_000_000
    yield from offline_decision(n_tickets, 1000, 300 if quick else 3000)
    # What one figure wrote and left to the kernel (a 1,000,000-line CSV) must not be written back
    # in the middle of the next one's commits.
    os.sync()
    yield commit_only(200 if quick else 2000)
    os.sync()
    yield from cold_start(3 if quick else 10)
    os.sync()
    yield memory(n_tickets)


def _masks(n: int) -> list[str]:
    # Distinct prefixes so none shadows another, like a real venue's mask list.
    return [f"{100 + i:03d}##########" for i in range(n)]


def ticket_csv(folder: Path, tickets: int) -> Path:
    path = folder / "tickets.csv"
    with path.open("w") as f:
        f.write("token,name\n")
        for i in range(tickets):
            f.write(f"TK{i:010d},Bench\n")
    return path


def local_config(folder: Path, tickets: int, masks: int, extra: str = "") -> configmod.Config:
    """A lane with a local backend: a `tickets`-line CSV list and `masks` masks, then `extra` TOML."""
    csv = ticket_csv(folder, tickets)
    mask_list = ", ".join(f'"{m}"' for m in _masks(masks))
    return configmod.load(str(write_config(folder, f"""
        [backend]
        type = "local"
        [backend.local]
        tickets = "{csv}"
        masks = [{mask_list}]
    """ + extra)))


def mixed_tokens(tickets: int, masks: int, scans: int) -> Iterator[str]:
    """`scans` tokens for local_config's lane, the same every run: a third each listed tickets (mostly
    admitted once), mask matches and unknown ones (every mask tried)."""
    rng = random.Random(7)
    for i in range(scans):
        kind = i % 3
        if kind == 0:
            yield f"TK{rng.randrange(tickets):010d}"
        elif kind == 1:
            yield f"{100 + rng.randrange(masks):03d}{rng.randrange(10**10):010d}"
        else:
            yield f"NOPE{rng.randrange(10**9)}"


def offline_decision(tickets: int, masks: int, scans: int) -> list[Figure]:
    cfg = local_config(workdir(), tickets, masks)

    from gated.daemon import build

    async def run() -> tuple[list[float], list[float], float]:
        parts = await build(cfg)
        started = time.perf_counter()
        await parts.backend.sync(parts.store)
        imported = time.perf_counter() - started
        latencies, commits = [], []
        try:
            async with housekeeping(parts.store):
                for token in mixed_tokens(tickets, masks, scans):
                    scan = Scan(token=token, reader="front")
                    await parts.gate.handle(scan)
                    latencies.append(parts.gate.last_act_ms)
                    commits.append(parts.gate.last_commit_ms)
        finally:
            await parts.close()
        return latencies, commits, imported

    import logging

    logging.getLogger("gated").setLevel(logging.WARNING)
    lat, commits, imported = asyncio.run(run())
    stalls = sum(1 for c in commits if c > 50)
    return [
        Figure(f"offline decision, scan -> relay command ({tickets:,} tickets, {masks:,} masks)",
               latency_text(lat), "p99 <= 5 ms", pct(lat, 99) <= 5.0),
        Figure("  of which the durable commit (WAL, synchronous=FULL)",
               latency_text(commits) + f"; stalls > 50 ms: {stalls}/{len(commits)}", "-", None),
        Figure(f"import of a {tickets:,}-ticket CSV list (background, scans keep deciding)",
               f"{imported:.1f} s", "-", None),
    ]


def commit_only(n: int) -> Figure:
    folder = workdir()
    store = Store(folder / "c.db")
    times = []
    for i in range(n):
        scan = Scan(token=f"C{i}", reader="front")
        t = time.perf_counter()
        store.record(scan, admit(source=Source.OFFLINE, backend="local"), lane="b", scan_mode=ScanMode.ENTRY,
                     latency_ms=0.0, queue_upload=False)
        times.append((time.perf_counter() - t) * 1000)
    store.close()
    return Figure("bare SQLite commit of one scan (this disk's fsync)", latency_text(times), "-", None)


def cold_start(runs: int) -> list[Figure]:
    folder = workdir()
    cfg = write_config(folder, '[backend]\ntype = "local"\n')
    times = []
    for i in range(runs):
        sock, path = notify_socket(_sub(folder, i))
        proc, seconds = start_daemon(cfg, path, sock=sock)
        times.append(seconds)
        proc.terminate()
        proc.communicate(timeout=10)
        sock.close()
    return [
        Figure("cold start, process start -> READY=1", f"median {pct(times, 50) * 1000:.0f} ms, "
               f"max {max(times) * 1000:.0f} ms (n={runs})", "<= 500 ms", pct(times, 50) <= 0.5),
        Figure("  slowest top-level imports (python -X importtime)", "; ".join(_slowest_imports()), "-", None),
    ]


def _slowest_imports(n: int = 5) -> list[str]:
    lines = subprocess.run([sys.executable, "-X", "importtime", "-c", "import gated.daemon, gated.cli"],
                           capture_output=True, text=True).stderr.splitlines()
    top = []
    for line in lines:
        parts = line.split("|")
        # "import time: self [us] | cumulative | imported package"; top-level ones are not indented.
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):
            top.append((int(parts[1]), parts[2].strip()))
    return [f"{name} {us / 1000:.0f} ms" for us, name in sorted(top, reverse=True)[:n]]


def _sub(folder: Path, i: int) -> Path:
    sub = folder / f"r{i}"
    sub.mkdir()
    return sub


def memory(tickets: int) -> Figure:
    folder = workdir()
    csv = ticket_csv(folder, tickets)
    cfg = write_config(folder, f'[backend]\ntype = "local"\n[backend.local]\ntickets = "{csv}"\n')
    sock, path = notify_socket(folder)
    proc, _ = start_daemon(cfg, path, sock=sock)
    try:
        _wait_for(proc, "ticket list")  # the import runs in the background after READY
        for i in range(200):
            proc.stdin.write(f"TK{i * 4999:010d}\nNOPE{i}\n")
        proc.stdin.flush()
        _wait_for(proc, " ADMIT ", " DENY ", count=400)
        rss = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    return Figure(f"RSS of the daemon with {tickets:,} tickets imported, after 400 scans", f"{rss:.1f} MB",
                  "<= 50 MB", rss <= 50)


def _wait_for(proc, *words: str, count: int = 1) -> None:
    seen = 0
    while seen < count:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"daemon exited before logging {words}")
        seen += any(w in line for w in words)
