"""pretix figures: the offline download of 100,000 tickets (time, peak RSS), offline decisions with
them loaded, scans during that download, and the online scan -> relay against a real pretix.

The simulator runs as its own process (`python -m gated.simulators.pretix --positions N`) at
SCHED_IDLE, as a ticket API on another machine would, and the measuring runs in another
(`python -m benchmarks.pretix_figures --child …`), so the peak RSS is that of gated's side alone.
The online figure needs the real pretix of tests/realpretix.py already installed in its cache; when
it is not, its row says why and has no verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time

from benchmarks.common import (
    Figure,
    decide_mix,
    latency_text,
    paced,
    pct,
    rss_mb,
    run_child,
    secret_file,
    set_idle,
    show,
    with_sync_store,
    workdir,
    write_config,
)
from gated.reload import peak_rss_mb

TICKETS = 100_000


def start_simulator(positions: int) -> tuple[subprocess.Popen, str, str]:
    """The pretix simulator with `positions` random-secret tickets; returns (process, url, device token)."""
    proc = subprocess.Popen([sys.executable, "-m", "gated.simulators.pretix", "--port", "0",
                             "--positions", str(positions)], stdout=subprocess.PIPE, text=True)
    url = token = ""
    for text in proc.stdout:
        if text.startswith("pretix simulator on "):
            url = text.split()[3]
        elif text.startswith("device token: "):
            token = text.split()[-1]
        elif text.startswith("ready"):
            break
    if not url or not token:
        proc.kill()
        raise RuntimeError("pretix simulator did not start")
    set_idle(proc.pid, True)  # its CPU time is another machine's, not the gate's
    return proc, url, token


def figures(quick: bool) -> list[Figure]:
    return sync_figures(quick) + online_figures(quick)


def sync_figures(quick: bool) -> list[Figure]:
    scans, syncs = (300 if quick else 3000), (1 if quick else 3)
    sim, url, token = start_simulator(TICKETS)
    try:
        r = run_child("benchmarks.pretix_figures", url, token, TICKETS, scans, syncs, timeout=900)
    finally:
        sim.terminate()
        sim.wait(10)
    return [
        Figure(f"pretix sync of {TICKETS:,} tickets (orders/, pages of 50, into the list file)",
               f"{r['sync_s']:.1f} s ({r['loaded']:,} loaded)", "<= 10 s",
               r["sync_s"] <= 10 and r["loaded"] >= TICKETS),
        Figure("  peak RSS of gated during that sync",
               f"{r['peak_rss_mb']:.1f} MB (before it {r['rss_before_mb']:.1f} MB)", "<= 50 MB",
               r["peak_rss_mb"] <= 50),
        Figure("  the download process (gated.reload): peak RSS, written to disk",
               f"{r['child']['peak_rss_mb']:.1f} MB, {r['child']['written_mb']:.1f} MB written"),
        Figure(f"pretix offline decision, scan -> relay command ({TICKETS:,} random secrets loaded)",
               latency_text(r["decide_ms"]), "p99 <= 5 ms", pct(r["decide_ms"], 99) <= 5.0),
        Figure("  the same, a scan every 20 ms, nothing else running", latency_text(r["paced_ms"]), "p99 <= 5 ms",
               pct(r["paced_ms"], 99) <= 5.0),
        Figure(f"  the same, a scan every 20 ms during {syncs} full sync{'s' * (syncs > 1)} of the {TICKETS:,} "
               f"({r['resync_s']:.1f} s each)", latency_text(r["during_ms"]), "p99 <= 5 ms",
               pct(r["during_ms"], 99) <= 5.0),
        Figure("    of which the durable commit", latency_text(r["commits"])),
    ]


# --- the measuring process ---------------------------------------------------------------------

def child(url: str, token: str, tickets: int, scans: int, syncs: int) -> dict:
    import logging

    from gated import config as configmod
    from gated.daemon import Parts
    from gated.store import Store, StoreThread

    logging.getLogger("gated").setLevel(logging.WARNING)
    folder = workdir()
    token_file = secret_file(folder, "pretix.token", token)
    cfg = configmod.load(str(write_config(folder, f"""
        [backend]
        type = "pretix"
        url = "{url}"
        offline_first = true
        sync_interval_seconds = 3600
        [backend.pretix]
        organizer = "demo"
        event = "democon"
        checkin_list = 1
        token_file = "{token_file}"
    """)))

    def forget_since(store: Store) -> None:
        # The next sync downloads every ticket again, as after a change of the list's date.
        with store._write() as conn:
            conn.execute("DELETE FROM kv WHERE key LIKE 'pretix:%:orders_since:%'")

    async def measured(parts: Parts, sync_store: StoreThread) -> dict:
        before = rss_mb(os.getpid())
        started = time.perf_counter()
        await parts.backend.sync(sync_store)
        sync_s = time.perf_counter() - started
        peak = peak_rss_mb()  # VmHWM: this process's own
        first_download = dict(parts.backend.last_reload)
        from gated.simulators.pretix import generated_secret  # after the peak: the bench's, not gated's
        loaded = await sync_store.call(Store.ticket_count, parts.backend.positions_name)

        rng = random.Random(7)

        def valid() -> str:
            return generated_secret(rng.randrange(tickets))

        decide = await decide_mix(parts.gate, scans, valid, lambda: f"nope{rng.randrange(10**12):032d}", rng)

        paced_ms, _ = await paced(parts.gate, valid, n=scans // 2)
        during, commits = [], []
        started = time.perf_counter()
        for _ in range(syncs):
            await sync_store.call(forget_since)
            parts.backend.last_reload = {}
            sync = asyncio.get_running_loop().create_task(parts.backend.sync(sync_store))
            acted, committed = await paced(parts.gate, valid, sync)
            await sync
            # A sync of the changes alone is over in a moment: scans beside it would pass unmeasured.
            assert parts.backend.last_reload.get("tickets", 0) >= tickets, "the sync was not a full download"
            during += acted
            commits += committed
        resync_s = (time.perf_counter() - started) / syncs
        await parts.gate.drain()
        return {"sync_s": sync_s, "rss_before_mb": before, "peak_rss_mb": peak, "loaded": loaded,
                "decide_ms": decide, "paced_ms": paced_ms, "during_ms": during, "commits": commits,
                "resync_s": resync_s, "child": first_download}

    return asyncio.run(with_sync_store(cfg, measured))


# --- online, against the real pretix ---------------------------------------------------------

def real_pretix_missing() -> str | None:
    """Why the real pretix cannot run here, or None. Only a cached install is used: installing and
    migrating it takes minutes, which the real-pretix tests do once (tests/realpretix.py)."""
    try:
        from tests.realpretix import cache_dir
    except ImportError as e:
        return f"tests/realpretix.py not importable ({e})"
    root = cache_dir()
    if not (root / "venv" / ".gated-ready").exists() or not (root / "template" / "seed.json").exists():
        return f"real pretix not cached in {root}: run `pytest -m realpretix` once to install it"
    return None


def online_figures(quick: bool) -> list[Figure]:
    why = real_pretix_missing()
    if why:
        return [Figure("pretix online scan -> relay vs a bare redeem (real pretix)", f"not measured: {why}")]
    n = 100 if quick else 300
    from tests.realpretix import running

    with running(workdir()) as server:
        r = asyncio.run(_online(server, n))
    ratio = pct(r["gated"], 50) / pct(r["bare"], 50)
    return [
        Figure(f"pretix online scan -> relay incl. commit (real pretix {r['version']}, gunicorn, 1 worker)",
               latency_text(r["gated"])),
        Figure("  bare httpx redeem of the same body", latency_text(r["bare"])),
        Figure("  scan -> relay over the bare redeem (p50 ratio)",
               f"{ratio:.3f}x ({pct(r['gated'], 50) - pct(r['bare'], 50):+.2f} ms; "
               f"p99 {pct(r['gated'], 99) / pct(r['bare'], 99):.2f}x)", "<= 1.05x", ratio <= 1.05),
        Figure("    of which the durable commit", latency_text(r["commit"])),
        Figure("  the decision alone (Decider.decide: request, strict read, parse; no commit, no relay)",
               latency_text(r["decide"])),
    ]


async def _online(server, n: int) -> dict:
    import httpx

    from gated import config as configmod
    from gated.daemon import build
    from gated.model import Scan, ScanMode, Source
    from tests.realpretix import PRETIX_VERSION

    folder = workdir()
    token = server.device_token("north")
    token_file = secret_file(folder, "pretix.token", token)
    # allow_multiple_entries: every redeem is an "ok" with a new check-in, for gated and the bare
    # client alike, from a few tickets.
    cfg = configmod.load(str(write_config(folder, f"""
        [backend]
        type = "pretix"
        url = "{server.url}"
        timeout_seconds = 5.0
        sync_interval_seconds = 3600
        [backend.pretix]
        organizer = "{server.organizer}"
        event = "{server.event}"
        checkin_list = {server.lists["multiple"]}
        token_file = "{token_file}"
    """)))
    tickets = [server.order("p").secret for _ in range(10)]
    parts = await build(cfg)
    backend = parts.backend
    bare = httpx.AsyncClient(base_url=server.url, timeout=5.0, headers={"Authorization": f"Device {token}"})
    path = f"/api/v1/organizers/{server.organizer}/checkinrpc/redeem/"
    out: dict[str, list[float]] = {"gated": [], "bare": [], "commit": [], "decide": []}
    try:
        for i in range(n + 20):  # the first 20 of each warm connections and code paths
            secret = tickets[i % len(tickets)]
            d = await parts.gate.handle(Scan(token=secret, reader="front"))
            if d is None or d.source is not Source.ONLINE or not d.admitted:
                raise RuntimeError(f"gated did not admit online: {d}")
            gated_ms, commit_ms = parts.gate.last_act_ms, parts.gate.last_commit_ms
            t = time.perf_counter()
            answer = await bare.post(path, json=backend._redeem_body(secret, "entry", os.urandom(12).hex()))
            answer.json()
            bare_ms = (time.perf_counter() - t) * 1000
            if answer.status_code != 201:
                raise RuntimeError(f"bare redeem: HTTP {answer.status_code}")
            t = time.perf_counter()  # the decision alone: request, strict read, parse; no commit, no relay
            await parts.decider.decide(Scan(token=secret), ScanMode.ENTRY)
            decide_ms = (time.perf_counter() - t) * 1000
            if i >= 20:
                out["gated"].append(gated_ms)
                out["commit"].append(commit_ms)
                out["bare"].append(bare_ms)
                out["decide"].append(decide_ms)
    finally:
        await parts.gate.drain()
        await bare.aclose()
        await parts.close()
    return out | {"version": PRETIX_VERSION}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pretix_figures", description=__doc__)
    parser.add_argument("--child", nargs=5, metavar=("URL", "TOKEN", "TICKETS", "SCANS", "SYNCS"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("sync", "online"))
    args = parser.parse_args()
    if args.child:
        url, token, tickets, scans, syncs = args.child
        print(json.dumps(child(url, token, int(tickets), int(scans), int(syncs))))
        return 0
    chosen = {"sync": sync_figures, "online": online_figures}
    return show(fig for fn in ([chosen[args.only]] if args.only else chosen.values()) for fig in fn(args.quick))


if __name__ == "__main__":
    sys.exit(main())
