"""Background work waits for a gap between scans: the count of scans read and not yet acted on."""

from __future__ import annotations

import asyncio

from gated.quiet import Quiet


def test_gap_waits_until_the_last_scan_is_acted_on():
    async def main():
        quiet = Quiet(max_wait=30)  # the gap must end by the last leave(), not by its time limit
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
