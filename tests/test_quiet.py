"""Background work waits for a gap between scans: the count of scans read and not yet acted on."""

from __future__ import annotations

import asyncio
import os
import sys

from gated.daemon import Daemon
from gated.quiet import Quiet

LOCAL = """
[backend]
type = "local"
[backend.local]
tickets = "{tickets}"
"""


def test_gap_waits_until_the_last_scan_is_acted_on():
    async def main():
        quiet = Quiet()
        quiet.enter()
        quiet.enter()
        gap = asyncio.create_task(quiet.gap())
        quiet.leave()
        await asyncio.sleep(0)  # let the task start waiting
        one_left = gap.done()
        quiet.leave()
        await asyncio.wait_for(gap, 1)
        return one_left, quiet.busy
    assert asyncio.run(main()) == (False, 0)


def test_a_lane_that_never_pauses_still_gets_its_background_work_done():
    async def main():
        quiet = Quiet(max_wait=0.05)
        quiet.enter()  # and never left: a stuck count must not stop uploads for good
        await asyncio.wait_for(quiet.gap(), 2)
        return quiet.busy
    assert asyncio.run(main()) == 1


def test_the_daemon_counts_each_scan_from_the_reader_until_it_is_acted_on(load_config, tickets_csv, monkeypatch):
    """A scan is counted as soon as a reader hands it over and released once it is acted on."""
    config = load_config(LOCAL.format(tickets=tickets_csv("token\nT-0001\nT-0002\n")))
    config.relay["pulse_seconds"] = 0.01
    read, write = os.pipe()
    monkeypatch.setattr(sys, "stdin", os.fdopen(read, "r"))
    seen = []

    async def main():
        daemon = Daemon(config)
        run = asyncio.create_task(daemon.run())
        while not hasattr(daemon, "_reader_objs"):  # started: the readers are up
            await asyncio.sleep(0.01)
        gate = daemon.parts.gate
        gate.on_decided.append(lambda scan, d: seen.append((scan.token, d.admitted, gate.quiet.busy)))
        os.write(write, b"T-0001\nNOPE\nT-0002\n")
        for _ in range(500):
            if len(seen) == 3:
                break
            await asyncio.sleep(0.01)
        busy_after = gate.quiet.busy
        daemon.stopping.set()
        return await asyncio.wait_for(run, 10), busy_after

    try:
        code, busy_after = asyncio.run(main())
    finally:
        os.close(write)
    # While each is acted on it is counted twice (read by the daemon, handled by the gate), and
    # the scans read behind it once each; once all are acted on nothing holds the uploads back.
    assert [(t, a) for t, a, _ in seen] == [("T-0001", True), ("NOPE", False), ("T-0002", True)]
    assert all(busy >= 2 for _, _, busy in seen)
    assert (code, busy_after) == (0, 0)
