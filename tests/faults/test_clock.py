"""Clock faults under a running `gated run`: the wall clock jumps an hour either way, or the Pi boots in 1970.

The daemon runs under libfaketime (Debian's `faketime` package) with the monotonic clock left
alone (FAKETIME_DONT_FAKE_MONOTONIC=1) and the wall clock read from a file on every call, so the
test moves the wall clock under the running process the way an NTP step or a dead RTC does.

What must hold (docs/design.md, the decision, step 5): timeouts and debounce run on monotonic time and
do not notice; a clock before 2024 or before the newest recorded scan is untrusted, and then time
windows are refused (`[offline] fallback = "deny"`) or skipped (`"policy"`), logged once per change.
The decider's rules themselves are unit-tested with an injected clock in tests/policy/test_decider.py.
"""

from __future__ import annotations

import glob
import os
import time

import pytest

LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)
pytestmark = pytest.mark.skipif(LIBFAKETIME is None, reason="libfaketime not installed (apt-get install faketime); "
                                "the same rules are tested with an injected clock in tests/policy/test_decider.py")
UNTRUSTED = r"WARNING: clock untrusted: "


class WallClock:
    """The faked wall clock of one daemon: an offset such as "-1h", or "@1970-01-01 00:00:00"."""

    def __init__(self, folder):
        self.file = folder / "faketime.rc"
        self.set("+0")

    def set(self, spec: str) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(spec + "\n")
        os.replace(tmp, self.file)  # never a half-written file for the daemon to read

    @property
    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(self.file), "FAKETIME_NO_CACHE": "1",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


@pytest.fixture
def clock(tmp_path):
    return WallClock(tmp_path)


@pytest.fixture
def local_gate(write_config, tickets_csv, run_gated, clock):
    """A local-list gate under the faked clock; WINDOW-1 may enter only within half an hour of now."""
    now = int(time.time())
    tickets_csv(f"""
        token,valid_from,valid_until,name
        WINDOW-1,{now - 1800},{now + 1800},Window
    """)

    def start(fallback: str = "policy", debounce: float = 0.0):
        config = write_config(f'[backend]\ntype = "local"\n[backend.local]\ntickets = "tickets.csv"\n'
                              f'masks = ["ANY-####"]\n[offline]\nfallback = "{fallback}"\n')
        text = config.read_text()
        config.write_text(text.replace('serial = "TEST-0001"', f'serial = "TEST-0001"\ndebounce_seconds = {debounce}'))
        gated = run_gated(config, env=clock.env)
        gated.wait_line(r"ready in \d+ ms")
        return gated

    return start


def _scan(gated, code: str):
    gated.feed(code)
    return gated.verdict()


def test_wall_clock_set_back_an_hour_is_untrusted_skips_time_windows_and_is_said_once(local_gate, clock):
    gated = local_gate("policy")
    assert _scan(gated, "ANY-0001")["word"] == "ADMIT"  # recorded now: the newest time the store has seen
    clock.set("-1h")
    window = _scan(gated, "WINDOW-1")  # an hour before its window opens, by the clock
    assert (window["word"], window["reason"]) == ("ADMIT", "ok") and "(clock_untrusted)" in gated.seen[-1]
    assert _scan(gated, "ANY-0002")["word"] == "ADMIT"
    clock.set("+0")
    assert _scan(gated, "ANY-0003")["word"] == "ADMIT"
    assert gated.stop() == 0
    untrusted = [line for line in gated.seen if UNTRUSTED in line]
    assert len(untrusted) == 1 and 'fallback = "policy" and skip time windows' in untrusted[0]
    assert sum("clock trusted again" in line for line in gated.seen) == 1


def test_wall_clock_set_back_under_fallback_deny_denies_until_it_is_right_again(local_gate, clock):
    gated = local_gate("deny")
    assert _scan(gated, "ANY-0001")["word"] == "ADMIT"
    clock.set("-1h")
    for code in ("ANY-0002", "ANY-0003", "WINDOW-1"):
        m = _scan(gated, code)
        assert (m["word"], m["reason"]) == ("DENY", "clock_untrusted")
    clock.set("+0")
    assert _scan(gated, "ANY-0004")["word"] == "ADMIT"
    assert gated.stop() == 0
    assert sum(UNTRUSTED in line for line in gated.seen) == 1


def test_wall_clock_jumping_forward_judges_windows_by_it_then_distrusts_the_corrected_clock(local_gate, clock):
    # A jump forward cannot be told from the truth: the window is judged by it. Once corrected, the
    # clock is behind the newest scan recorded and stays untrusted until real time passes that scan.
    gated = local_gate("deny")
    clock.set("+1h")
    m = _scan(gated, "WINDOW-1")
    assert (m["word"], m["reason"]) == ("DENY", "expired")
    clock.set("+0")
    m = _scan(gated, "ANY-0001")
    assert (m["word"], m["reason"]) == ("DENY", "clock_untrusted")
    assert gated.stop() == 0
    assert sum(UNTRUSTED in line for line in gated.seen) == 1


@pytest.mark.parametrize(("fallback", "word", "reason"), [("policy", "ADMIT", "ok"),
                                                         ("deny", "DENY", "clock_untrusted")])
def test_a_pi_booting_in_1970_decides_by_its_fallback_and_says_so_once(local_gate, clock, fallback, word, reason):
    clock.set("@1970-01-01 00:00:00")
    gated = local_gate(fallback)
    for code in ("WINDOW-1", "ANY-0001"):
        m = _scan(gated, code)
        assert (m["word"], m["reason"]) == (word, reason)
    assert gated.stop() == 0
    untrusted = [line for line in gated.seen if UNTRUSTED in line]
    # libfaketime's "@" start can put the first reading a hair before the epoch: 23:59:59 the day before.
    assert len(untrusted) == 1 and ("1970-01-01" in untrusted[0] or "1969-12-31 23:59:59" in untrusted[0])


def test_debounce_runs_on_monotonic_time_so_a_clock_step_does_not_make_a_repeat_a_new_scan(local_gate, clock):
    gated = local_gate("policy", debounce=30.0)
    assert _scan(gated, "ANY-0001")["word"] == "ADMIT"
    clock.set("+2h")  # by the wall clock the repeat comes two hours later
    gated.feed("ANY-0001", "ANY-0002")
    m = gated.verdict()
    assert m["tail"] == "0002"  # the repeat was one scan with the first: not decided again
    assert gated.stop() == 0


def test_online_deadline_runs_on_monotonic_time_while_the_wall_clock_steps_back(make_kit, make_proxy,
                                                                                write_config, run_gated, clock):
    kit = make_kit("entry")
    proxy = make_proxy(kit.port)
    config = write_config(kit.toml(proxy.url, deadline=0.5))
    gated = run_gated(config, env=clock.env)
    gated.wait_line(r"Entry offline data: 1 events today", timeout=20)
    proxy.set("stall")
    gated.feed(kit.tokens[0])
    clock.set("-1h")  # during the stalled request: a deadline on the wall clock would wait an hour
    m = gated.verdict(timeout=10)
    assert (m["word"], m["source"]) == ("ADMIT", "offline")
    ms = _latency(gated.seen[-1])
    assert 500 <= ms <= 500 + 100, ms  # scan to relay, commit included; the +10 ms bound is test_server_faults'
    assert gated.stop() == 0


def _latency(line: str) -> int:
    return int(next(word[:-2] for word in line.split() if word.endswith("ms") and word[:-2].isdigit()))
