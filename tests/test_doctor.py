"""`gated doctor` against a scratch machine: a /dev, /run and /sys tree of real files, a real unix
socket as journald's, a pty as the serial engine, the local backend with a CSV, and the Entry V1
simulator on 127.0.0.1 for reachability. Healthy first, then each check failing for its reason."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from gated import cli
from gated import config as configmod
from gated.doctor import FAIL, OK, WARN, System, run_checks
from gated.model import InputKind, Reason, Scan, ScanMode, admit
from gated.policy import build_backend
from gated.simulators.entry import EntrySimulator
from gated.store import Store, StoreThread

ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to set owners and groups")
NOBODY = "nobody"  # an existing unprivileged account stands in for the service user


@pytest.fixture
def machine():
    """A scratch /dev, /run, /sys: short paths, since a unix socket path must fit in 108 bytes."""
    base = Path(tempfile.mkdtemp(prefix="gd-"))
    dev, run, sysfs = base / "dev", base / "run", base / "sys"
    for d in (dev / "input/by-id", dev / "gated", run / "systemd/journal", run / "systemd/timesync", sysfs):
        d.mkdir(parents=True)
    (dev / "gpiochip0").touch(mode=0o660)
    (run / "systemd/timesync/synchronized").touch()
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(run / "systemd/journal/socket"))
    yield System(dev=dev, run=run, sys=sysfs, timedatectl=None, user="gated-doctor-test-absent")
    journal.close()
    shutil.rmtree(base)


@pytest.fixture
def pty_port():
    master, slave = os.openpty()
    yield os.ttyname(slave)
    os.close(master)
    os.close(slave)


def add_keyboard(system: System, n: int, name: str, port: str = "1-1.2") -> Path:
    """A keyboard-wedge scanner as sysfs and udev show it: the event node, its sysfs entry and the
    /dev/gated/ name 99-gated.rules gives it."""
    node = system.dev / "input" / f"event{n}"
    node.touch(mode=0o660)
    info = system.sys / "class/input" / f"event{n}" / "device"
    (info / "capabilities").mkdir(parents=True)
    (info / "id").mkdir()
    (info / "name").write_text(name + "\n")
    (info / "capabilities/key").write_text("1f 0 0 0 10000ffe\n")  # digits and Enter
    (info / "phys").write_text(f"usb-0000:01:00.0-{port[2:]}/input0\n")
    (info / "id/vendor").write_text("0c2e\n")
    (info / "id/product").write_text("0b61\n")
    (system.dev / "gated" / f"hid-usb-{port}").symlink_to(node)
    return node


def add_usb_nfc(system: System, port: str = "1-1.4", vid: str = "072f", pid: str = "2200") -> Path:
    dev = system.sys / "bus/usb/devices" / port
    dev.mkdir(parents=True)
    for key, value in (("idVendor", vid), ("idProduct", pid), ("busnum", "1"), ("devnum", "5")):
        (dev / key).write_text(value + "\n")
    node = system.dev / "bus/usb/001/005"
    node.parent.mkdir(parents=True)
    node.touch(mode=0o660)
    return node


GATE = """
[reader.front]
type = "hid"
device = "{hid}"

[reader.qr]
type = "serial"
port = "{serial}"

[gpio]
pin_factory = "auto"

[relay]
pin = 17

[backend]
type = "local"

[backend.local]
tickets = "{tickets}"
"""


@pytest.fixture
def gate(write_config, tickets_csv, machine, pty_port):
    """Write a gate config whose readers exist on the scratch machine; returns its path."""
    by_id = machine.dev / "input/by-id/usb-Honeywell-event-kbd"
    by_id.symlink_to(add_keyboard(machine, 3, "Honeywell Imaging Scanner"))

    def make(**changes: str) -> str:
        values = {"hid": str(by_id), "serial": pty_port,
                  "tickets": str(tickets_csv("token,name\nT-1,Ada\nT-2,Bob\n"))} | changes
        return str(write_config(GATE.format(**values), base=BASE))

    return make


BASE = '[lane]\nname = "lane-1"\nserial = "TEST-0001"\n'


def statuses(checks) -> dict[str, str]:
    return {c.name: c.status for c in checks}


def line(checks, name: str):
    found = [c for c in checks if c.name == name]
    assert found, f"no {name!r} line in {[c.name for c in checks]}"
    return found[0]


# --- healthy --------------------------------------------------------------------------------


def test_healthy_gate_is_all_ok(gate, machine):
    checks, config = run_checks(gate(), machine)
    assert config is not None
    assert statuses(checks) == {
        "config": OK, "reader front": OK, "reader qr": OK, "plugged in": OK, "gpio": OK, "clock sync": OK,
        "clock": OK, "disk": OK, "backend": OK, "queue": OK, "journal": OK}, checks
    assert "2 tickets" in line(checks, "backend").detail
    assert "/dev/gated/hid-usb-1-1.2 (Honeywell Imaging Scanner)" in line(checks, "plugged in").detail


def test_cli_doctor_exits_1_and_names_the_bad_key_when_the_config_is_invalid(write_config, capsys):
    path = write_config('[offline]\nfallbak = "deny"\n')
    assert cli.main(["doctor", "--config", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  config" in out and '[offline] fallbak: unknown key. Did you mean "fallback"?' in out
    assert "gated check --config" in out


# --- config and readers ---------------------------------------------------------------------


@ROOT_ONLY
def test_a_secret_file_others_can_read_fails_the_config_line_as_run_would(write_config, machine, tmp_path):
    key = tmp_path / "venue.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o644)
    path = write_config(f'[mqtt]\nurl = "mqtt://127.0.0.1:1"\nhmac_key_file = "{key}"\n')
    c = line(run_checks(str(path), machine)[0], "config")
    assert c.status == FAIL and f'would refuse to start: [mqtt] hmac_key_file = "{key}": readable by others' \
        in c.detail
    assert c.fix.startswith(f"gated check --config {path}")


def test_config_the_service_user_cannot_read_is_a_warning_with_the_chmod(gate, machine):
    path = gate()
    os.chmod(path, 0o600)
    machine.user = NOBODY
    checks, _ = run_checks(path, machine)
    c = line(checks, "config")
    assert c.status == WARN and "user nobody may not read it" in c.detail and "chmod 640" in c.fix


def test_missing_scanner_fails_and_lists_what_is_plugged_in(gate, machine):
    checks, _ = run_checks(gate(hid=str(machine.dev / "input/by-id/usb-Gone-event-kbd")), machine)
    c = line(checks, "reader front")
    assert c.status == FAIL and "not found" in c.detail
    assert "/dev/gated/hid-usb-1-1.2" in c.fix


def test_hid_scanner_named_by_match_is_found_or_fails(gate, machine, write_config):
    text = Path(gate()).read_text().replace(
        f'device = "{machine.dev}/input/by-id/usb-Honeywell-event-kbd"', 'match = "*honeywell*"')
    ok, _ = run_checks(str(write_config(text, base="")), machine)
    assert line(ok, "reader front").status == OK
    bad, _ = run_checks(str(write_config(text.replace("*honeywell*", "*zebra*"), base="")), machine)
    c = line(bad, "reader front")
    assert c.status == FAIL and "'*zebra*'" in c.detail


@ROOT_ONLY
def test_serial_port_the_service_user_may_not_open_fails_until_group_dialout_has_it(gate, machine, tmp_path):
    port = tmp_path / "ttyACM0"
    port.touch(mode=0o600)
    machine.user = NOBODY
    checks, _ = run_checks(gate(serial=str(port)), machine)
    c = line(checks, "reader qr")
    assert c.status == FAIL and "may not read and write it" in c.detail and "udev rules" in c.fix
    shutil.chown(port, group="dialout")
    port.chmod(0o660)
    checks, _ = run_checks(gate(serial=str(port)), machine)
    assert line(checks, "reader qr").status == OK


def test_usb_nfc_reader_is_found_by_the_ids_nfcpy_drives(write_config, machine):
    path = write_config('[reader.wallet]\ntype = "nfc"\n', base=BASE + "\n[gpio]\npin_factory = \"mock\"\n")
    missing, _ = run_checks(str(path), machine)
    assert line(missing, "reader wallet").status == FAIL
    add_usb_nfc(machine)
    found, _ = run_checks(str(path), machine)
    c = line(found, "reader wallet")
    assert c.status == OK and "acr122 at usb 1-1.4" in c.detail
    assert "acr122 at usb 1-1.4" in line(found, "plugged in").detail


def test_stdin_reader_is_a_warning_at_a_gate(load_config, machine):
    checks, _ = run_checks(load_config().path, machine)
    assert line(checks, "reader front").status == WARN


# --- gpio, clock, disk, journal -------------------------------------------------------------


def test_gpio_mock_factory_warns_and_no_gpio_chip_fails(gate, machine, write_config):
    text = Path(gate()).read_text()
    mock, _ = run_checks(str(write_config(text.replace('"auto"', '"mock"'), base="")), machine)
    assert line(mock, "gpio").status == WARN
    (machine.dev / "gpiochip0").unlink()
    none, _ = run_checks(str(write_config(text, base="")), machine)
    c = line(none, "gpio")
    assert c.status == FAIL and "gpiochip" in c.detail and 'pin_factory = "mock"' in c.fix


@ROOT_ONLY
def test_gpio_chip_only_root_may_use_fails_for_the_service_user(gate, machine):
    (machine.dev / "gpiochip0").chmod(0o600)
    machine.user = NOBODY
    checks, _ = run_checks(gate(), machine)
    assert line(checks, "gpio").status == FAIL


def test_clock_sync_unknown_or_not_synchronised_warns(gate, machine):
    path = gate()
    (machine.run / "systemd/timesync/synchronized").unlink()
    checks, _ = run_checks(path, machine)
    assert line(checks, "clock sync").status == WARN and "not synchronised" in line(checks, "clock sync").detail
    (machine.run / "systemd/timesync").rmdir()
    checks, _ = run_checks(path, machine)
    assert line(checks, "clock sync").status == WARN and "unknown" in line(checks, "clock sync").detail


def test_clock_before_2024_fails(gate, machine):
    machine.clock = lambda: 1_600_000_000.0  # September 2020: a Pi that booted without network
    checks, _ = run_checks(gate(), machine)
    c = line(checks, "clock")
    assert c.status == FAIL and "before 2024" in c.detail


def record(store_path: str, wall: float, *, queued: bool) -> str:
    store = Store(store_path)
    try:
        scan = Scan(token="T-1", reader="front", input=InputKind.BARCODE, wall=wall)
        store.record(scan, admit(Reason.OK, backend="local", ticket_key="T-1"), lane="lane-1",
                     scan_mode=ScanMode.ENTRY, latency_ms=2.0, queue_upload=queued)
    finally:
        store.close()
    return scan.nonce


def test_clock_behind_the_newest_recorded_scan_fails(gate, machine):
    path = gate()
    record(configmod.load(path).store.path, time.time() + 3600, queued=False)
    checks, _ = run_checks(path, machine)
    c = line(checks, "clock")
    assert c.status == FAIL and "earlier than the newest scan" in c.detail


def test_low_disk_space_warns_then_fails(gate, machine):
    path = gate()
    machine.min_free_warn = 1 << 60
    assert line(run_checks(path, machine)[0], "disk").status == WARN
    machine.min_free_fail = 1 << 60
    c = line(run_checks(path, machine)[0], "disk")
    assert c.status == FAIL and "MiB free" in c.detail


def test_journal_socket_missing_or_without_a_listener_fails(gate, machine):
    path = gate()
    sock = machine.run / "systemd/journal/socket"
    sock.unlink()  # the listener's socket stays open but nobody can reach it by name any more
    c = line(run_checks(path, machine)[0], "journal")
    assert c.status == FAIL and "no journald socket" in c.detail
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(sock))
    dead.close()  # the file remains, as after journald died
    c = line(run_checks(path, machine)[0], "journal")
    assert c.status == FAIL and "refused" in c.detail.lower()


# --- backend, offline data, queue ---------------------------------------------------------


def test_unloadable_ticket_list_fails_and_a_local_backend_with_nothing_warns(gate, machine, tmp_path,
                                                                            write_config):
    bad = tmp_path / "bad.csv"
    bad.write_text("code,name\nT-1,Ada\n")
    c = line(run_checks(gate(tickets=str(bad)), machine)[0], "backend")
    assert c.status == FAIL and "token" in c.detail
    empty = write_config('[reader.front]\ntype = "stdin"\n[backend]\ntype = "local"\n', base=BASE)
    c = line(run_checks(str(empty), machine)[0], "backend")
    assert c.status == WARN and "every scan is denied" in c.detail


@pytest.mark.parametrize("content,said", [
    (b"token,name\nT-1,Ada\nT-2,Ren\xe9e\n", "line 3: not UTF-8 text"),
    (b'token,name\nT-1,"' + b"x" * (140 * 1024) + b'"\n', "line 2: a field longer than 128 KiB"),
    (b"token,max_entries\nT-1,99999999999999999999\n", "line 2: max_entries = '99999999999999999999'"),
    (b"token,valid_until\nT-1,nan\n", "line 2: valid_until = 'nan'"),
], ids=["latin-1", "field over 128 KiB", "max_entries 2**66", "valid_until nan"])
def test_a_ticket_list_that_would_not_load_fails_naming_its_line_with_a_next_step(gate, machine, tmp_path,
                                                                                  content, said):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    c = line(run_checks(gate(tickets=str(bad)), machine)[0], "backend")
    assert c.status == FAIL and f"local ticket list not loadable: {bad}, {said}" in c.detail
    assert c.fix.startswith("fix that line")


def test_queue_backlog_and_parked_scans_warn_with_the_queue_commands(gate, machine):
    path = gate()
    store_path = configmod.load(path).store.path
    record(store_path, time.time() - 7200, queued=True)
    c = line(run_checks(path, machine)[0], "queue")
    assert c.status == WARN and "1 waiting for upload, oldest 2.0 h old" in c.detail
    store = Store(store_path)
    store.mark_parked(store.pending()[0]["nonce"], "HTTP 400: barcode unknown")
    store.close()
    c = line(run_checks(path, machine)[0], "queue")
    assert c.status == WARN and "1 parked" in c.detail and "gated queue retry" in c.fix


ENTRY = """
[reader.front]
type = "stdin"
[gpio]
pin_factory = "mock"
[backend]
type = "entry"
url = "{url}"
[backend.entry]
api_key_file = "{key}"
venue_code = "TS"
data_account_id = "390"
make = "Raspberry Pi"
model = "Pi 4 Model B"
[offline]
max_age_seconds = {max_age}
"""


@pytest.fixture
def entry(write_config, tmp_path):
    sim = EntrySimulator().start()

    def make(key: str = "EXAMPLE-NOT-A-REAL-KEY-0000", url: str | None = None, max_age: float = 3600) -> str:
        key_file = tmp_path / "entry-api.key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        return str(write_config(ENTRY.format(url=url or sim.url, key=key_file, max_age=max_age), base=BASE))

    yield sim, make
    sim.stop()


def test_reachable_entry_api_with_accepted_key_is_ok_and_no_offline_data_yet_warns(entry, machine):
    sim, make = entry
    checks, _ = run_checks(make(), machine)
    assert line(checks, "backend").status == OK and "credentials accepted" in line(checks, "backend").detail
    c = line(checks, "offline data")
    assert c.status == WARN and "none yet" in c.detail
    assert sim.requests_to("/ping")  # reachability was asked of the API itself


def sync(path: str) -> None:
    config = configmod.load(path)

    async def main():
        backend = build_backend(config)
        store = StoreThread(config.store.path)
        try:
            await backend.start(store)
            await backend.sync(store)
        finally:
            await backend.close()
            store.close()

    asyncio.run(main())


def test_offline_data_is_ok_after_a_sync_and_stale_past_max_age(entry, machine):
    _, make = entry
    path = make(max_age=600)
    sync(path)
    c = line(run_checks(path, machine)[0], "offline data")
    assert c.status == OK and "old (limit 10 min)" in c.detail
    assert_stale_an_hour_later(path, machine, "offline data")


def assert_stale_an_hour_later(path, machine, check):
    """An hour on, past the 10 min of [offline] max_age_seconds, the check warns that the data is stale."""
    later = time.time() + 3600
    machine.clock = lambda: later
    c = line(run_checks(path, machine)[0], check)
    assert c.status == WARN and "older than [offline] max_age_seconds" in c.detail


def test_refused_api_key_fails_as_credentials_refused_naming_the_key_file(entry, machine):
    _, make = entry
    c = line(run_checks(make(key="WRONG-KEY"), machine)[0], "backend")
    assert c.status == FAIL and "credentials refused" in c.detail and "api_key_file" in c.detail


def test_dead_api_fails_as_not_reachable(entry, machine):
    _, make = entry
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    c = line(run_checks(make(url=url), machine)[0], "backend")
    assert c.status == FAIL and "not reachable" in c.detail and "127.0.0.1" not in c.detail


def test_stalled_api_fails_within_the_deadline(entry, machine):
    sim, make = entry
    sim.stall.set()
    machine.backend_timeout = 0.5
    started = time.monotonic()
    try:
        c = line(run_checks(make(), machine)[0], "backend")
    finally:
        sim.stall.clear()
    assert c.status == FAIL and "no answer within 0.5 s" in c.detail
    assert time.monotonic() - started < 5


@ROOT_ONLY
def test_doctor_run_as_root_leaves_a_store_it_creates_to_the_service_user(entry, machine):
    _, make = entry
    path = make()
    state = Path(configmod.load(path).store.path).parent
    shutil.chown(state, user=NOBODY)  # as scripts/install leaves /var/lib/gated: owned by the service user
    run_checks(path, machine)  # the Entry backend keeps its session in the store: doctor creates it
    owners = {p.name: p.owner() for p in state.glob("gated.db*")}
    assert "gated.db" in owners and set(owners.values()) == {NOBODY}, owners


# --- a store that cannot record, or that replaced a damaged one --------------------------------


def test_a_store_that_cannot_be_written_fails_and_says_what_becomes_of_scans(gate, machine):
    path = gate()
    store_path = Path(configmod.load(path).store.path)
    Store(store_path).close()
    if subprocess.run(["chattr", "+i", str(store_path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here (needs root and a filesystem with the immutable flag)")
    try:
        c = line(run_checks(path, machine)[0], "store")
    finally:
        subprocess.run(["chattr", "-i", str(store_path)], check=True)
    assert c.status == FAIL
    assert f"{store_path} cannot be written ({store_path} is immutable (chattr +i)): scans are not recorded; " \
           '[store] on_error = "deny": every scan is denied' in c.detail
    assert "remount it read-write" in c.fix


def test_a_replaced_store_warns_what_was_lost_until_the_technician_accepts_it(gate, machine, capsys):
    path = gate()
    store_path = configmod.load(path).store.path
    store = Store(store_path)
    store.note_replaced("/var/lib/gated/gated.db.corrupt-20261123T150000", 1234)
    store.close()
    c = line(run_checks(path, machine)[0], "store")
    assert c.status == WARN
    assert "moved aside to /var/lib/gated/gated.db.corrupt-20261123T150000 (at least 1234 scans): its admissions " \
           "are lost" in c.detail and 'follow [offline] fallback = "policy" until you confirm it' in c.detail
    assert c.fix.endswith("then: gated doctor --accept-new-store")
    assert cli.main(["doctor", "--config", path, "--accept-new-store"]) == 0
    assert "is the lane's store from now on" in capsys.readouterr().out
    assert "store" not in statuses(run_checks(path, machine)[0])


def test_accepting_a_new_store_where_there_is_none_creates_none(gate, capsys):
    path = gate()
    store_path = Path(configmod.load(path).store.path)
    assert not store_path.exists()
    assert cli.main(["doctor", "--config", path, "--accept-new-store"]) == 0
    assert "nothing to confirm" in capsys.readouterr().out
    assert not store_path.exists()


# --- TiBillet ---------------------------------------------------------------------------------

TIBILLET = """
[reader.front]
type = "stdin"
[gpio]
pin_factory = "mock"
[backend]
type = "tibillet"
url = "{url}"
[backend.tibillet]
public_keys = ["{pem}"]
event_uuid = "{event}"
api_key_file = "{key}"
[offline]
max_age_seconds = 600
"""


@pytest.fixture
def tibillet(write_config, tmp_path):
    from cryptography.hazmat.primitives.asymmetric import rsa

    from gated.simulators.tibillet import TibilletSim, public_pem

    sim = TibilletSim().start()
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    event = sim.add_event("Concert", private)
    sim.issue(event)
    pem = tmp_path / "concert.pem"
    pem.write_bytes(public_pem(private))

    def make(key: str | None = None, event_uuid: str = event) -> str:
        if key is None:
            key = "GoodKey1.abcdefghijklmnopqrstuvwxyz012345"
            sim.keys[key] = "device-1"
        key_file = tmp_path / "tibillet.key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        return str(write_config(TIBILLET.format(url=sim.url, pem=pem, event=event_uuid, key=key_file), base=BASE))

    yield sim, make
    sim.stop()


def test_tibillet_unknown_key_fails_as_credentials_refused_not_unreachable(tibillet, machine):
    _, make = tibillet
    c = line(run_checks(make(key="AAAAAAAA.wrongwrongwrongwrongwrongwrongwr"), machine)[0], "backend")
    assert c.status == FAIL and "credentials refused" in c.detail and "HTTP 500" in c.detail
    assert "gated pair" in c.detail


def test_tibillet_ticket_statuses_show_their_age_once_downloaded(tibillet, machine):
    _, make = tibillet
    path = make()
    checks = run_checks(path, machine)[0]
    assert line(checks, "backend").status == OK
    c = line(checks, "ticket statuses")
    assert c.status == WARN and "none downloaded yet" in c.detail and "canceled" in c.detail
    sync(path)
    c = line(run_checks(path, machine)[0], "ticket statuses")
    assert c.status == OK and "1 ticket(s) from list_tickets" in c.detail
    assert_stale_an_hour_later(path, machine, "ticket statuses")


def test_tibillet_without_event_uuid_warns_that_entries_are_refused(tibillet, machine):
    _, make = tibillet
    c = line(run_checks(make(event_uuid=""), machine)[0], "ticket statuses")
    assert c.status == WARN and "event_uuid" in c.fix


def test_the_screen_escapes_what_a_server_put_into_a_detail():
    from gated.doctor import Check, render

    forged = "credentials refused (HTTP 401: \x1b[2J\nOK    backend  all fine\u202e)"
    screen = render([Check("backend", FAIL, forged, "ask \x9b31m the venue")], None, "gated.toml")
    assert "\x1b" not in screen and "\x9b" not in screen and "\u202e" not in screen
    assert "\\x1b[2J\\x0aOK" in screen and screen.count("\n") == 3  # title, check, its fix, summary
