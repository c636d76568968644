"""sd_notify and signals: `gated run` as systemd starts it, talking to a real NOTIFY_SOCKET.

systemd's side is played by an AF_UNIX datagram socket bound here; WATCHDOG_PID is set to the
daemon's own pid the way systemd does (through `exec` from sh), so the watchdog code path is real.
"""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.faults.gatedrun import GatedRun

TICKETS = """
    token,name
    TICKET-0001,Alice
    TICKET-0002,Bob
    TICKET-0003,Carol
"""
BACKEND = """
[backend]
type = "local"

[backend.local]
tickets = "tickets.csv"
"""


class NotifySocket:
    """systemd's end of NOTIFY_SOCKET: every datagram the daemon sends, in order."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.got: list[str] = []

    def wait(self, pattern: str, timeout: float = 5.0) -> str:
        """The first message from now on matching `pattern` (a regex); fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no notify message matching {pattern!r} in {timeout}s; got {self.got}")
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.got.append(msg)
            if re.search(pattern, msg):
                return msg

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


@pytest.fixture
def start(tmp_path: Path, notify: NotifySocket, tickets_csv):
    """Start `gated run` on a config file with NOTIFY_SOCKET and WATCHDOG_USEC set as systemd would."""
    tickets_csv(TICKETS)
    started: list[GatedRun] = []

    def run(config: Path, watchdog_usec: int = 600_000, **env_extra: str) -> GatedRun:
        env = {"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": str(watchdog_usec), **env_extra}
        # WATCHDOG_PID is the main pid, as systemd sets it, unless a test names another process.
        gated = GatedRun(config, env=env, watchdog_pid_self="WATCHDOG_PID" not in env_extra)
        started.append(gated)
        return gated

    yield run
    for gated in started:
        gated.kill()


def edit(config: Path, old: str, new: str) -> None:
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))


def test_ready_comes_once_with_a_status_and_the_gate_then_decides_typed_codes(write_config, start, notify):
    gated = start(write_config(BACKEND))
    ready = notify.wait(r"READY=1")
    assert ready == "READY=1\nSTATUS=local, 0 queued"
    assert notify.got == [ready]  # nothing before READY: systemd would count it as started too early
    gated.feed("TICKET-0001")
    gated.wait_line(r"^\S+ lane-1 ADMIT ok offline local stdin:front …0001 \d+ms \"Alice\"$")


def test_watchdog_is_pinged_well_within_watchdog_usec_while_the_gate_is_idle(write_config, start, notify):
    start(write_config(BACKEND), watchdog_usec=600_000)
    notify.wait(r"READY=1")
    stamps = []
    for _ in range(4):
        notify.wait(r"^WATCHDOG=1$")
        stamps.append(time.monotonic())
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) < 0.6, gaps  # a gap of WATCHDOG_USEC would get the service killed


def test_watchdog_is_silent_when_watchdog_pid_names_another_process(write_config, start, notify):
    # systemd only expects pings from the main pid; a process that merely inherited the variables
    # (a helper, a child) must not ping on the daemon's behalf.
    gated = start(write_config(BACKEND), watchdog_usec=100_000, WATCHDOG_PID="1")
    notify.wait(r"READY=1")
    gated.feed("TICKET-0001")  # the decision loop passes its watchdog call before deciding
    notify.wait(r"STATUS=.*last ADMIT")
    assert "WATCHDOG=1" not in notify.got


def test_status_names_the_last_scan_and_its_verdict_after_each_scan(write_config, start, notify):
    gated = start(write_config(BACKEND))
    notify.wait(r"READY=1")
    gated.feed("TICKET-0002")
    assert re.fullmatch(r"STATUS=local, 0 queued, last ADMIT \d\d:\d\d:\d\d",
                        notify.wait(r"^STATUS=.*last ADMIT"))
    gated.feed("NO-SUCH-TICKET")
    assert re.fullmatch(r"STATUS=local, 0 queued, last DENY \d\d:\d\d:\d\d",
                        notify.wait(r"^STATUS=.*last DENY"))


def test_status_counts_scans_queued_while_the_ticket_api_is_down(write_config, start, notify, tmp_path):
    key = tmp_path / "entry.key"
    key.write_text("not-used-the-api-is-down\n")
    key.chmod(0o600)
    gated = start(write_config(f"""
        [backend]
        type = "entry"
        url = "http://127.0.0.1:9"
        [backend.entry]
        api_key_file = "{key}"
        venue_code = "TS"
        data_account_id = "390"
        make = "Raspberry Pi"
        model = "Pi 4"
        masks = ["VIP-####"]
    """))
    notify.wait(r"READY=1")
    gated.feed("VIP-0001", "VIP-0002")  # port 9 refuses: both decided offline (no events synced yet) and queued
    assert re.fullmatch(r"STATUS=OFFLINE since \d\d:\d\d, 2 queued, last (ADMIT|DENY) \d\d:\d\d:\d\d",
                        notify.wait(r"^STATUS=.*2 queued"))


def test_sighup_applies_a_changed_config_and_decides_a_scan_read_during_the_reload(write_config, start,
                                                                                   notify):
    # A relay held for a passage that never comes keeps the reload waiting (outputs are rebuilt
    # only between relay holds): a code typed meanwhile must wait and be decided by the new config.
    config = write_config(BACKEND + "\n[input.passage]\npin = 24\ntimeout_seconds = 1.5\n")
    gated = start(config)
    notify.wait(r"READY=1")
    gated.feed("TICKET-0001")
    gated.wait_line(r"lane-1 ADMIT ok .*…0001")
    gated.wait_line(r"output relay \(GPIO17\) on")

    edit(config, "[lane]\n", '[lane]\nmode = "locked"\n')
    edit(config, "pulse_seconds = 0.2", "pulse_seconds = 0.3")  # a wiring change: outputs rebuilt
    gated.signal(signal.SIGHUP)
    assert notify.wait(r"RELOADING=1").startswith("RELOADING=1\nMONOTONIC_USEC=")
    gated.feed("TICKET-0002")

    gated.wait_line(r"nobody passed for …0001")
    gated.wait_line(r"configuration reloaded from .* \(outputs\)")
    gated.wait_line(r"lane-1 DENY locked mode local stdin:front …0002")
    # systemd keeps the unit "reloading" until READY=1 follows RELOADING=1
    assert notify.wait(r"READY=1").startswith("READY=1\nSTATUS=local, 0 queued, last ADMIT")
    gated.feed("TICKET-0003")
    gated.wait_line(r"lane-1 DENY locked mode .*…0003")


def test_sighup_with_a_broken_config_logs_every_problem_and_keeps_the_running_config(write_config, start,
                                                                                      notify):
    config = write_config(BACKEND)
    gated = start(config)
    notify.wait(r"READY=1")
    edit(config, "[lane]\n", '[lane]\nmode = "locked"\nnmae = "x"\n')
    edit(config, "pulse_seconds = 0.2", "pulse_seconds = -1")
    gated.signal(signal.SIGHUP)
    notify.wait(r"RELOADING=1")
    gated.wait_line(r"ERROR: configuration not reloaded, the running one stays")
    gated.wait_line(r"\[lane\] nmae.*Did you mean \"name\"")
    gated.wait_line(r"\[relay\] pulse_seconds")
    assert notify.wait(r"READY=1") == "READY=1\nSTATUS=local, 0 queued"
    gated.feed("TICKET-0001")  # still normal mode: the locked line of the broken file was not taken
    gated.wait_line(r"lane-1 ADMIT ok offline local stdin:front …0001")


@pytest.mark.parametrize(("safe_state", "admit_first", "relay_line"), [
    ("locked", True, "output relay (GPIO17) off"),   # fail-secure: a pulse under way is cut short
    ("open", False, "output relay (GPIO17) on"),     # fail-safe: the turnstile is left free
])
def test_sigterm_sends_stopping_puts_the_relay_in_its_safe_state_and_exits_0(write_config, start, notify,
                                                                            safe_state, admit_first,
                                                                            relay_line):
    config = write_config(BACKEND)
    edit(config, "pulse_seconds = 0.2", f'pulse_seconds = 30\nsafe_state = "{safe_state}"')
    gated = start(config)
    notify.wait(r"READY=1")
    if admit_first:
        gated.feed("TICKET-0001")
        gated.wait_line(r"output relay \(GPIO17\) on")
    gated.signal(signal.SIGTERM)
    assert notify.wait(r"STOPPING=1") == "STOPPING=1"
    gated.wait_line(rf"stopping: readers first, then outputs to their safe state \({safe_state}\)")
    gated.wait_line(re.escape(relay_line))
    gated.wait_line(r"stopped$")
    assert gated.wait_exit() == 0  # well before the 30 s pulse would have ended


def test_a_manager_that_stops_reading_never_blocks_the_gate(tmp_path, monkeypatch):
    """The kernel queues a few hundred datagrams; after that sends must be dropped, not wait."""
    import socket as socketmod

    from gated.notify import Notifier

    path = str(tmp_path / "deaf.sock")
    deaf = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_DGRAM)
    deaf.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    notifier = Notifier()
    for i in range(5000):  # far past the queue length: a blocking send would hang here
        notifier.status(f"online, {i} queued")
    first = deaf.recv(4096)
    deaf.close()
    assert first == b"STATUS=online, 0 queued"
