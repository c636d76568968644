"""The daemon in this process, fed typed codes through a pipe: what it does between and around scans."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gated import daemon as daemonmod
from gated.daemon import Daemon
from gated.store import Store, lists_dir
from tests.drivers.support import until

LOCAL = """
[backend]
type = "local"
[backend.local]
tickets = "{tickets}"
"""


def run_daemon(config, monkeypatch, scenario):
    """Start `gated run` in-process with a pipe as its stdin reader; `scenario(daemon, type_line)`
    runs once the readers are up; then the daemon is stopped as by SIGTERM. Returns (exit code,
    what the scenario returned)."""
    read, write = os.pipe()
    monkeypatch.setattr(sys, "stdin", os.fdopen(read, "r"))

    async def main():
        daemon = Daemon(config)
        run = asyncio.create_task(daemon.run())
        while not hasattr(daemon, "_reader_objs"):  # the readers are started last
            if run.done():
                return await run, None
            await asyncio.sleep(0.01)
        try:
            result = await scenario(daemon, lambda line: os.write(write, line.encode() + b"\n"))
        finally:
            daemon.stopping.set()
        return await asyncio.wait_for(run, 10), result

    try:
        return asyncio.run(main())
    finally:
        os.close(write)


def local_config(load_config, tickets_csv):
    config = load_config(LOCAL.format(tickets=tickets_csv("token\nT-0001\nT-0002\n")))
    config.relay["pulse_seconds"] = 0.01
    return config


def test_each_scan_holds_background_work_back_from_the_reader_until_it_is_acted_on(
        load_config, tickets_csv, monkeypatch):
    seen = []

    async def scenario(daemon, type_line):
        gate = daemon.parts.gate
        gate.on_decided.append(lambda scan, d: seen.append((scan.token, d.admitted, gate.quiet.busy)))
        for line in ("T-0001", "NOPE", "T-0002"):
            type_line(line)
        await until(lambda: len(seen) == 3, what="three scans acted on")
        return gate.quiet.busy

    code, busy_after = run_daemon(local_config(load_config, tickets_csv), monkeypatch, scenario)
    # While it is acted on a scan is counted twice (read by the daemon, handled by the gate), and
    # the scans read behind it once each; once all are acted on nothing holds the uploads back.
    assert [(t, a) for t, a, _ in seen] == [("T-0001", True), ("NOPE", False), ("T-0002", True)]
    assert all(busy >= 2 for _, _, busy in seen)
    assert (code, busy_after) == (0, 0)


def test_the_daemon_checkpoints_its_store_so_scans_write_the_wal_again_from_its_start(
        load_config, tickets_csv, monkeypatch):
    """SQLite's own checkpoints are off (they would run on a scan's commit): without the daemon's
    housekeeping the WAL would grow by every scan for as long as the gate runs."""
    monkeypatch.setattr(daemonmod, "HOUSEKEEPING_SECONDS", 0.05)
    config = local_config(load_config, tickets_csv)
    wal = f"{config.store.path}-wal"

    def restarts() -> int:  # the WAL header's checkpoint sequence: +1 each time the WAL starts again
        with open(wal, "rb") as f:
            return struct.unpack(">I", f.read(16)[12:16])[0]

    async def scenario(daemon, type_line):
        decided = []
        daemon.parts.gate.on_decided.append(lambda scan, d: decided.append(scan.token))
        type_line("NOPE-0")
        await until(lambda: decided, what="the first scan")
        first = restarts()
        for n in range(1, 200):  # a scan every few housekeeping rounds, until the WAL starts over
            type_line(f"NOPE-{n}")
            await until(lambda n=n: len(decided) > n, what=f"scan {n}")
            if restarts() != first:
                break
            await asyncio.sleep(0.1)
        return first, restarts(), len(decided)

    code, (first, later, scans) = run_daemon(config, monkeypatch, scenario)
    assert code == 0 and later > first and scans < 200


def test_a_store_turning_read_only_under_the_daemon_is_read_read_only_and_recorded_again_once_writable(
        load_config, tickets_csv, monkeypatch, caplog, tmp_path):
    """An SD card remounted read-only: SQLite's mapped WAL index must not be touched (SIGBUS), the
    daemon reopens the store read-only and goes on deciding from it, then records again."""
    monkeypatch.setattr(daemonmod, "HOUSEKEEPING_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger="gated")
    config = load_config(LOCAL.format(tickets=tickets_csv("token\nT-0001\nT-0002\nT-0003\n"))
                         + f'[store]\non_error = "admit"\npath = "{tmp_path / "gated.db"}"\n')
    config.relay["pulse_seconds"] = 0.01
    config.lane["debounce_seconds"] = 0.001  # T-0001 is scanned again within seconds, as a second visit
    db = Path(config.store.path)

    def chattr(flag: str) -> bool:
        files = [db, Path(f"{db}-wal"), Path(f"{db}-shm"), *lists_dir(db).glob("*.sqlite*")]
        return subprocess.run(["chattr", flag, *map(str, files)], capture_output=True).returncode == 0

    async def scenario(daemon, type_line):
        log_scan = logging.getLogger("gated.scan")
        handler = _Lines()
        log_scan.addHandler(handler)
        type_line("T-0001")
        await until(lambda: len(handler.lines) == 1, what="the first scan")
        other = Store(db)  # another process's commit moves the WAL on: the next read needs a new read mark
        other.set("moved-on", "1")
        other.close()
        os.sync()
        if not chattr("+i"):
            return None
        try:
            await until(lambda: daemon.parts.store.read_only is not None, what="the store opened read-only")
            status = daemon._status(0)
            for code in ("T-0002", "T-0001", "NOPE"):
                type_line(code)
            await until(lambda: len(handler.lines) == 4, what="three scans on the read-only store")
        finally:
            chattr("-i")
        await until(lambda: daemon.parts.store.read_only is None, what="the store writable again")
        type_line("T-0003")
        await until(lambda: len(handler.lines) == 5, what="a scan once writable")
        log_scan.removeHandler(handler)
        verdicts = [" ".join(line.split()[1:3]) for line in handler.lines]
        return status, verdicts

    code, result = run_daemon(config, monkeypatch, scenario)
    if result is None:
        pytest.skip("chattr +i is not possible here (needs root and a filesystem with the immutable flag)")
    status, verdicts = result
    assert code == 0
    assert "STORE READ-ONLY: scans not recorded" in status
    # Read from the read-only store: the list (unknown refused), and the admission made before (anti-passback).
    assert verdicts == ["ADMIT ok", "ADMIT ok", "DENY already_used", "DENY unknown", "ADMIT ok"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot be written any more" in m and "immutable" in m for m in messages)
    assert any("can be written again: scans are recorded again" in m for m in messages)
    assert [t for (t,) in sqlite3.connect(db).execute("SELECT token FROM scans ORDER BY id")] == ["T-0001", "T-0003"]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "GATED_EVENT", "") == "scan":  # the verdict lines only
            self.lines.append(record.getMessage())


def test_a_reload_takes_a_new_capacity_at_once_and_says_metrics_wait_for_a_restart(
        load_config, tickets_csv, tmp_path, monkeypatch, caplog):
    config = load_config(LOCAL.format(tickets=tickets_csv("token\nT-0001\n")) + textwrap.dedent(f"""
        [occupancy]
        capacity = 10
        [metrics]
        textfile = "{tmp_path / 'a.prom'}"
    """))
    text = Path(config.path).read_text()

    async def scenario(daemon, type_line):
        Path(config.path).write_text(text.replace("capacity = 10", "capacity = 20").replace("a.prom", "b.prom"))
        await daemon._reload()
        return daemon.parts.occupancy.capacity, daemon.config.metrics["textfile"], daemon.exporter.textfile

    with caplog.at_level(logging.WARNING):
        code, (capacity, configured, written) = run_daemon(config, monkeypatch, scenario)
    assert (code, capacity) == (0, 20)
    assert configured == written == str(tmp_path / "a.prom")  # the running config says what runs
    assert "[metrics] changed; it takes effect at the next restart" in caplog.text


def test_a_metrics_address_in_use_is_exit_1_with_everything_started_so_far_closed(
        load_config, tickets_csv, monkeypatch, caplog):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    config = load_config(LOCAL.format(tickets=tickets_csv("token\nT-0001\n"))
                         + f'[metrics]\nlisten = "127.0.0.1:{port}"\n')

    async def main():
        daemon = Daemon(config)
        return await daemon.run(), daemon

    try:
        with caplog.at_level(logging.ERROR, logger="gated"):
            code, daemon = asyncio.run(main())
    finally:
        taken.close()
    assert code == 1 and f"cannot start: [metrics] listen = 127.0.0.1:{port}" in caplog.text
    assert daemon.parts.store.store is None and daemon.syncer.store.store is None  # both closed
