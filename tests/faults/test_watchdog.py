"""The watchdog: a scan path that stops moving stops WATCHDOG=1, so systemd kills and restarts gated.

What can hang here, honestly: gated never blocks its event loop on I/O by design (SQLite runs on
the store's own thread, HTTP is async), so a stuck gate is a decision loop waiting on something
that does not come back. The watchdog is fed from that loop (daemon._decision_loop), not from a
timer, so it notices exactly that. SIGSTOP would not show it: a stopped process sends nothing
for any reason at all, and proves only that systemd notices silence.

The stuck call is made real: the test holds an EXCLUSIVE lock on the store (as an admin's
`sqlite3 gated.db` left in a transaction would) for longer than the store's 5 s busy_timeout. The
scan's commit waits for it; meanwhile no WATCHDOG=1 reaches NOTIFY_SOCKET for far longer than
WATCHDOG_USEC, which is when systemd would kill the service. When the lock outlives busy_timeout
the scan is denied (`error`, logged) and the pings come back at their usual pace.
"""

from __future__ import annotations

import re
import socket
import sqlite3
import time
from pathlib import Path

import pytest

WATCHDOG_USEC = 600_000  # gated pings every WATCHDOG_USEC / 3
BUSY_TIMEOUT = 5.0  # gated.store: PRAGMA busy_timeout = 5000


class NotifySocket:
    """systemd's end of NOTIFY_SOCKET: every datagram, with the monotonic time it arrived."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.got: list[tuple[float, str]] = []

    def wait(self, pattern: str, timeout: float) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.got.append((time.monotonic(), msg))
            if re.search(pattern, msg):
                return self.got[-1]
        raise AssertionError(f"no notify message matching {pattern!r} within {timeout}s")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def test_a_scan_stuck_on_a_locked_store_stops_watchdog_pings_until_it_is_denied(write_config, run_gated, notify):
    config = write_config('[backend]\ntype = "local"\n[backend.local]\nmasks = ["WD-######"]\n')
    gated = run_gated(config, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
                      watchdog_pid_self=True)
    notify.wait(r"^READY=1", 10)
    for _ in range(3):
        notify.wait(r"^WATCHDOG=1$", 1)  # the usual pace while idle

    holder = sqlite3.connect(config.parent / "gated.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        locked_at = time.monotonic()
        gated.feed("WD-000001")
        pings = []
        while time.monotonic() - locked_at < BUSY_TIMEOUT + 1.5:  # hold it past gated's busy_timeout
            try:
                pings.append(notify.wait(r"^WATCHDOG=1$", 0.25)[0])
            except AssertionError:
                pass
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    m = gated.verdict(timeout=5)
    assert (m["word"], m["reason"], m["tail"]) == ("DENY", "error", "0001")
    assert any("scan not recorded, so not admitted:" in line and "locked" in line for line in gated.seen)
    # The silence: from feeding the code until busy_timeout gave up, no ping, while systemd's limit
    # was WATCHDOG_USEC. Allow the one ping that may have left just before the scan was picked up.
    silent_from = max([p for p in pings if p < locked_at + 0.2] or [locked_at])
    resumed = min(p for p in pings if p > locked_at + 1)
    assert resumed - silent_from > BUSY_TIMEOUT - 0.5 > 5 * WATCHDOG_USEC / 1e6, (silent_from, resumed, pings)
    # Once the scan path moves again, so do the pings: the gate is alive, not restarted.
    after = [p for p in pings if p >= resumed]
    assert len(after) >= 2 and max(b - a for a, b in zip(after, after[1:], strict=False)) < WATCHDOG_USEC / 1e6
    gated.feed("WD-000002")
    assert gated.verdict()["word"] == "ADMIT"
    assert gated.stop() == 0
