"""`gated ready`: each doors-open condition fails with its own message, and a lane meeting them all passes.

Real parts: a real store, the local backend's ticket list, the CM.com simulator over HTTP for the
ticket count, a real Mosquitto for the broker, a pty for the serial reader, `gated outputs test`
on gpiozero's MockFactory for the outputs.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import textwrap
import threading
import time

import pytest
from gpiozero.pins.mock import MockFactory

from gated import config as configmod
from gated import ready, wiring
from gated.daemon import build
from gated.simulators.cm import CMSimulator
from gated.simulators.pretix import PretixSim
from gated.store import Store
from tests.test_doctor import machine, pty_port, record  # noqa: F401 - fixtures
from tests.test_mqtt import Broker, free_port, need_broker

LANE = """
[lane]
name = "north-3"
serial = "TEST-0003"

[reader.qr]
type = "serial"
port = "{port}"

[gpio]
pin_factory = "mock"

[relay]
pin = 17

[led.green]
pin = 27
"""


@pytest.fixture
def system(machine):  # noqa: F811
    machine.chronyc = None
    return machine


@pytest.fixture
def lane(write_config, tickets_csv, pty_port):  # noqa: F811
    """A local lane whose list is loaded and whose outputs were tested this boot; returns a maker of its path."""

    def make(extra: str = "", *, load: bool = True, test_outputs: bool = True, port: str | None = None) -> str:
        csv = tickets_csv("token,name\nT-1,Ada\nT-2,Bob\n")
        path = str(write_config(LANE.format(port=port or pty_port) + textwrap.dedent(f"""
            [backend]
            type = "local"
            [backend.local]
            tickets = "{csv}"
        """) + textwrap.dedent(extra), base=""))
        config = configmod.load(path)
        if load:
            asyncio.run(_load(config))
        if test_outputs:
            assert wiring.run(config, yes=True, pin_factory=MockFactory(), seconds=0.001, say=lambda _: None) == 0
        return path

    return make


async def _load(config) -> None:
    parts = await build(config)
    try:
        await parts.backend.sync(parts.store)
    finally:
        await parts.close()


def run(path: str, system, capsys) -> tuple[int, dict[str, dict]]:
    code = ready.main(path, as_json=True, system=system)
    out = json.loads(capsys.readouterr().out)
    assert all(set(r) == {"check", "ok", "detail"} for r in out)
    return code, {r["check"]: r for r in out}


def failed(checks: dict[str, dict]) -> list[str]:
    return [name for name, r in checks.items() if not r["ok"]]


def test_a_lane_that_meets_every_condition_is_ready(lane, system, capsys):
    path = lane()
    assert ready.main(path, system=system) == 0
    out = capsys.readouterr().out
    assert out.startswith("gated ready: lane north-3 is READY"), out
    code, checks = run(path, system, capsys)
    assert code == 0 and failed(checks) == []
    assert {"offline data", "ticket count", "last sync", "clock", "clock sync", "uploads", "reader qr", "outputs",
            "store"} <= set(checks)
    assert "2 tickets" in checks["offline data"]["detail"]
    assert checks["ticket count"]["detail"].startswith("not checked")


def test_no_offline_data_fails_with_the_next_step(lane, system, capsys):
    code, checks = run(lane(load=False), system, capsys)
    assert code == 1 and failed(checks) == ["offline data"]
    assert "no tickets loaded" in checks["offline data"]["detail"] and "start gated" in checks["offline data"]["detail"]


def test_clock_not_synchronised_or_never_set_fails(lane, system, capsys):
    path = lane()
    (system.run / "systemd/timesync/synchronized").unlink()
    code, checks = run(path, system, capsys)
    assert code == 1 and failed(checks) == ["clock sync"]
    assert "not synchronised" in checks["clock sync"]["detail"]
    system.clock = lambda: 1_600_000_000.0  # 2020
    code, checks = run(path, system, capsys)
    assert "clock" in failed(checks) and "before 2024" in checks["clock"]["detail"]


def test_chrony_answers_when_timedatectl_does_not(lane, system, capsys, tmp_path):
    path = lane()
    (system.run / "systemd/timesync/synchronized").unlink()
    (system.run / "systemd/timesync").rmdir()
    chronyc = tmp_path / "chronyc"
    chronyc.write_text("#!/bin/sh\necho 'Reference ID    : 7F7F0101 ()'\necho 'Leap status     : Not synchronised'\n")
    chronyc.chmod(0o755)
    system.chronyc = str(chronyc)
    code, checks = run(path, system, capsys)
    assert failed(checks) == ["clock sync"] and "not synchronised" in checks["clock sync"]["detail"]
    chronyc.write_text("#!/bin/sh\necho 'Leap status     : Normal'\n")
    code, checks = run(path, system, capsys)
    assert code == 0, checks


def test_an_upload_waiting_more_than_ten_minutes_fails(lane, system, capsys):
    path = lane()
    store_path = configmod.load(path).store.path
    record(store_path, time.time() - 300, queued=True)
    code, checks = run(path, system, capsys)
    assert code == 0 and "1 waiting" in checks["uploads"]["detail"]
    record(store_path, time.time() - 660, queued=True)
    code, checks = run(path, system, capsys)
    assert code == 1 and failed(checks) == ["uploads"]
    assert "2 waiting, the oldest 11 min old" in checks["uploads"]["detail"]
    assert "gated queue" in checks["uploads"]["detail"]


def test_a_missing_reader_fails_naming_it(lane, system, capsys, tmp_path):
    code, checks = run(lane(port=str(tmp_path / "ttyNOPE")), system, capsys)
    assert code == 1 and failed(checks) == ["reader qr"]
    assert "not found" in checks["reader qr"]["detail"] and "plug it in" in checks["reader qr"]["detail"]


def test_outputs_not_tested_or_tested_before_this_boot_fail(lane, system, capsys):
    path = lane(test_outputs=False)
    code, checks = run(path, system, capsys)
    assert code == 1 and failed(checks) == ["outputs"]
    assert "never tested" in checks["outputs"]["detail"] and "gated outputs test" in checks["outputs"]["detail"]
    store = Store(configmod.load(path).store.path)
    store.set(ready.OUTPUTS_TESTED, ready.outputs_tested("an-earlier-boot", time.time() - 86400))
    store.close()
    code, checks = run(path, system, capsys)
    assert failed(checks) == ["outputs"] and "before this boot" in checks["outputs"]["detail"]


@pytest.mark.parametrize("row", ['{"boot_id": "x", "at": "noon"}', '{"boot_id": "x", "at": 1e300}',
                                 '{"boot_id": "x", "at": NaN}', '{"boot_id": "x", "at": [1]}'])
def test_a_damaged_outputs_row_fails_the_check_not_the_command(lane, system, capsys, row):
    path = lane(test_outputs=False)
    store = Store(configmod.load(path).store.path)
    store.set(ready.OUTPUTS_TESTED, row)
    store.close()
    code, checks = run(path, system, capsys)
    assert code == 1 and failed(checks) == ["outputs"]
    assert "at an unknown time" in checks["outputs"]["detail"]


def test_an_outputs_test_stopped_half_way_is_not_recorded(lane, system, capsys):
    path = lane(test_outputs=False)
    answers = iter(["", "q"])
    wiring.run(configmod.load(path), ask=lambda _: next(answers), say=lambda _: None, pin_factory=MockFactory(),
               seconds=0.001)
    code, checks = run(path, system, capsys)
    assert failed(checks) == ["outputs"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to stand in for the service user")
def test_a_store_the_service_user_cannot_write_fails(lane, system, capsys):
    path = lane()
    system.user = "nobody"
    os.chmod(configmod.load(path).store.path, 0o644)
    code, checks = run(path, system, capsys)
    assert "store" in failed(checks) and "user nobody may not read and write it" in checks["store"]["detail"]


def test_an_immutable_store_fails(lane, system, capsys):
    path = lane()
    store_path = configmod.load(path).store.path
    if subprocess.run(["chattr", "+i", store_path], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not possible here")
    try:
        code, checks = run(path, system, capsys)
    finally:
        subprocess.run(["chattr", "-i", store_path], check=True)
    assert code == 1 and "store" in failed(checks) and "immutable" in checks["store"]["detail"]


def test_a_lane_that_never_ran_is_not_ready(lane, system, capsys):
    code, checks = run(lane(load=False, test_outputs=False), system, capsys)
    assert code == 1 and failed(checks) == ["store"] and "never run" in checks["store"]["detail"]


def test_a_bad_config_exits_2(write_config, system, capsys):
    path = write_config('[lane]\nname = "x"\n[metrics]\nlisten = "9464"\n', base="")
    assert ready.main(str(path), system=system) == 2
    assert '[metrics] listen = "9464": must be "host:port"' in capsys.readouterr().err


# --- the broker --------------------------------------------------------------------------------


MQTT = """
[mqtt]
url = "mqtt://127.0.0.1:{port}"
hmac_key_file = "{key}"
"""


def test_the_mqtt_broker_must_be_reachable(lane, system, capsys, tmp_path):
    need_broker()
    key = tmp_path / "venue.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o600)
    (tmp_path / "broker-dir").mkdir()
    broker = Broker(tmp_path / "broker-dir", free_port()).start()
    try:
        path = lane(MQTT.format(port=broker.port, key=key))
        code, checks = run(path, system, capsys)
        assert code == 0 and checks["mqtt broker"]["detail"] == "reachable"
    finally:
        broker.stop()
    code, checks = run(path, system, capsys)
    assert code == 1 and failed(checks) == ["mqtt broker"]
    assert f"127.0.0.1:{broker.port} not reachable" in checks["mqtt broker"]["detail"]


def test_a_ca_file_that_is_not_a_certificate_fails_the_broker_check_not_the_command(lane, system, capsys, tmp_path):
    key = tmp_path / "venue.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o600)
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    path = lane(f'[mqtt]\nurl = "mqtts://127.0.0.1:{free_port()}"\nhmac_key_file = "{key}"\nca_file = "{ca}"\n')
    code, checks = run(path, system, capsys)
    assert code == 1 and failed(checks) == ["mqtt broker"]
    assert f"[mqtt] ca_file {ca} cannot be used" in checks["mqtt broker"]["detail"]


# --- a ticket count from the API (CM.com) ------------------------------------------------------


def _synced_and_wired(path: str) -> None:
    """What an installer does before the doors open: one sync, then `gated outputs test`."""
    config = configmod.load(path)

    async def sync() -> None:
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
        finally:
            await parts.close()

    asyncio.run(sync())
    wiring.run(config, yes=True, pin_factory=MockFactory(), seconds=0.001, say=lambda _: None)


@pytest.fixture
def cm_lane(lane, write_config, tmp_path, pty_port):  # noqa: F811
    sim = CMSimulator(username="scanner", password="letmein").start()
    sim.service = sim.add_service("Main Entrance")
    for i in range(5):
        sim.add_barcode(sim.service, f"CM-{i}")
    password = tmp_path / "cm-password"
    password.write_text("letmein\n")
    password.chmod(0o600)
    path = str(write_config(LANE.format(port=pty_port) + textwrap.dedent(f"""
        [backend]
        type = "cm"
        url = "{sim.api_url}"
        sync_interval_seconds = 300
        [backend.cm]
        username = "scanner"
        password_file = "{password}"
        service_name = "Main Entrance"
    """), base=""))
    _synced_and_wired(path)
    yield sim, path
    sim.stop()


@pytest.fixture
def pretix_lane(lane, write_config, tmp_path, pty_port):  # noqa: F811
    sim = PretixSim("demo", "democon").start()
    sim.lists[1].update(all_products=False, limit_products=[1])
    for _ in range(4):
        sim.add_position(1)
    sim.add_position(2)  # a product the list does not admit: pretix does not count it
    canceled = sim.add_position(1)
    sim.change(canceled, canceled=True)
    token = tmp_path / "pretix.token"
    token.write_text(sim.device_token() + "\n")
    token.chmod(0o600)
    path = str(write_config(LANE.format(port=pty_port) + textwrap.dedent(f"""
        [backend]
        type = "pretix"
        url = "{sim.url}"
        sync_interval_seconds = 300
        [backend.pretix]
        organizer = "demo"
        event = "democon"
        checkin_list = 1
        token_file = "{token}"
    """), base=""))
    _synced_and_wired(path)
    yield sim, path
    sim.stop()


# pretix_lane holds 4 tickets its list admits, and one of another product and one canceled, which
# pretix does not count: the downloaded tickets are counted as pretix counts its list.
@pytest.mark.parametrize(("lane_fixture", "counted", "sell"), [
    ("cm_lane", 5, lambda sim: sim.add_barcode(sim.service, "CM-NEW")),
    ("pretix_lane", 4, lambda sim: sim.add_position(1)),
], ids=["cm", "pretix"])
def test_the_offline_count_must_match_the_apis_count(request, lane_fixture, counted, sell, system, capsys):
    sim, path = request.getfixturevalue(lane_fixture)
    code, checks = run(path, system, capsys)
    assert code == 0, checks
    assert checks["ticket count"]["detail"] == f"{counted} tickets, as the API says"
    sell(sim)  # sold after the last sync
    code, checks = run(path, system, capsys)
    assert code == 1 and failed(checks) == ["ticket count"]
    assert (f"{counted} tickets here, the API says {counted + 1}: the offline data is incomplete"
            in checks["ticket count"]["detail"])


def test_a_sync_older_than_twice_the_interval_fails(cm_lane, system, capsys):
    _, path = cm_lane
    later = time.time() + 601
    system.clock = lambda: later
    code, checks = run(path, system, capsys)
    assert code == 1 and failed(checks) == ["last sync"]
    assert "more than twice [backend] sync_interval_seconds (300 s)" in checks["last sync"]["detail"]


def test_a_dead_api_leaves_the_count_unconfirmed(cm_lane, system, capsys):
    sim, path = cm_lane
    sim.stop()
    code, checks = run(path, system, capsys)
    assert code == 1 and failed(checks) == ["ticket count"]
    assert "not compared" in checks["ticket count"]["detail"]


def test_the_reader_and_store_checks_run_off_the_event_loop(lane, system, capsys, monkeypatch):
    # The daemon evaluates every minute on the loop that decides scans: finding readers opens every
    # input device, so it must not block that loop.
    from gated import doctor

    threads = {}
    real_readers, real_store = doctor.check_readers, ready._store

    def readers(*a):
        threads["readers"] = threading.get_ident()
        return real_readers(*a)

    def store_check(*a):
        threads["store"] = threading.get_ident()
        return real_store(*a)

    monkeypatch.setattr(doctor, "check_readers", readers)
    monkeypatch.setattr(ready, "_store", store_check)
    run(lane(), system, capsys)
    assert threads and threading.get_ident() not in threads.values()


def test_the_screen_escapes_what_a_server_put_into_a_detail(lane):
    config = configmod.load(lane(load=False))
    forged = ready.Result("ticket count", False, "not compared: the API said \x1b[2J\nok    ticket count  fine",
                          "ask \x9b31m the venue")
    screen = ready.render([forged], config)
    assert "\x1b" not in screen and "\x9b" not in screen
    assert "\\x1b[2J\\x0aok" in screen and screen.count("\n") == 2  # head, check, its fix
