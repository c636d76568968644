"""Offline policy around the backend: breaker, clock trust, fallback modes (local backend, real SQLite)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gated.daemon import build
from gated.model import Reason, Scan
from gated.policy.breaker import Breaker

CSV = """
token,name,valid_from,valid_until
T-1,Ada,,
T-FUTURE,Bob,2099-01-01T00:00:00Z,
T-PAST,Cy,2020-01-01T00:00:00Z,2020-12-31T00:00:00Z
"""


def test_breaker_opens_after_two_failures_in_five_calls():
    b = Breaker(failures=2, window=5)
    assert not b.record(False, 0.1, 0.0) and b.allows()
    assert not b.record(True, 0.1, 1.0) and b.allows()
    assert b.record(False, 0.1, 2.0) and not b.allows() and b.opened_at == 2.0


def test_breaker_forgets_failures_that_left_the_window():
    b = Breaker(failures=2, window=3)
    b.record(False, 0.1, 0)
    for t in range(3):
        b.record(True, 0.1, t)
    assert not b.record(False, 0.1, 5) and b.allows()


def test_slow_answers_count_as_failures_and_close_resets():
    b = Breaker(failures=2, window=5, slow_seconds=0.6)
    b.record(True, 0.7, 0)
    assert b.record(True, 0.9, 1) and b.is_open
    b.close()
    assert b.allows() and not b.record(False, 0.1, 2)


async def _decide(config, token, clock=None, seed_wall=None):
    parts = await build(config)
    try:
        await parts.backend.sync(parts.store)
        if seed_wall is not None:  # a scan recorded earlier, at a later time than the clock now says
            await parts.gate.handle(Scan(token="SEED", reader="front", wall=seed_wall))
        if clock is not None:
            parts.decider.clock = clock
        return await parts.gate.handle(Scan(token=token, reader="front"))
    finally:
        await parts.close()


@pytest.fixture
def cfg(load_config, tickets_csv):
    def make(fallback: str = "policy"):
        path = tickets_csv(CSV)
        return load_config(f'[backend.local]\ntickets = "{path}"\n[offline]\nfallback = "{fallback}"\n')
    return make


def test_clock_in_1970_skips_time_windows_under_policy_and_says_so_once(cfg, caplog):
    caplog.set_level(logging.INFO)
    d = asyncio.run(_decide(cfg(), "T-PAST", clock=lambda: 1000.0))
    assert d.reason is Reason.OK and "clock_untrusted" in d.detail
    warnings = [r for r in caplog.records if "clock untrusted" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_clock_in_1970_denies_under_fallback_deny(cfg):
    d = asyncio.run(_decide(cfg("deny"), "T-1", clock=lambda: 1000.0))
    assert d.reason is Reason.CLOCK_UNTRUSTED and not d.admitted


def test_clock_in_1970_admits_under_fallback_admit_but_still_once(cfg):
    d = asyncio.run(_decide(cfg("admit"), "UNKNOWN-CODE", clock=lambda: 1000.0))
    assert d.reason is Reason.FALLBACK_ADMIT and d.admitted


def test_clock_earlier_than_the_newest_recorded_scan_is_untrusted(cfg):
    now = time.time()
    d = asyncio.run(_decide(cfg("deny"), "T-1", clock=lambda: now - 3600, seed_wall=now))
    assert d.reason is Reason.CLOCK_UNTRUSTED


def test_trusted_clock_applies_time_windows(cfg):
    assert asyncio.run(_decide(cfg(), "T-FUTURE")).reason is Reason.NOT_YET_VALID
    assert asyncio.run(_decide(cfg(), "T-PAST")).reason is Reason.EXPIRED


def test_a_reloaded_deadline_moves_what_the_breaker_calls_slow(load_config, tickets_csv):
    """After a reload to a 2 s deadline, answers in 1 s are in time and must not open the breaker."""
    csv = tickets_csv(CSV)
    config = load_config(f'[backend]\ntimeout_seconds = 0.8\n[backend.local]\ntickets = "{csv}"\n')
    longer = load_config(f'[backend]\ntimeout_seconds = 2.0\n[backend.local]\ntickets = "{csv}"\n')

    async def run():
        parts = await build(config)
        try:
            parts.decider.apply(longer)  # what a SIGHUP reload does
            return [parts.decider.breaker.record(True, 1.0, t) for t in range(3)]
        finally:
            await parts.close()

    assert asyncio.run(run()) == [False] * 3
