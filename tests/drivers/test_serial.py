"""The serial QR reader over real ptys: opening, init bytes, frames, garbage, noise, unplug and return."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import shutil
import subprocess
import time
import tty
from pathlib import Path

import pytest

from gated.daemon import build
from gated.drivers import build_reader
from gated.drivers.serial_qr import SerialReader, list_devices
from gated.model import InputKind, Reason, Verdict
from gated.tokens import Malformed, normalise
from tests.drivers.support import Running, until

LOG = "gated.drivers.serial_qr"


@pytest.fixture
def pty_port():
    """A real pty pair: the reader opens the slave by name, the test is the engine on the master."""
    master, slave = os.openpty()
    tty.setraw(master)
    yield master, os.ttyname(slave)
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


class Socat:
    """A pty pair with stable link names that can be unplugged (killed) and plugged back (restarted)."""

    def __init__(self, folder: Path):
        self.gate, self.engine = folder / "ttyGATE", folder / "ttyQR"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["socat", f"pty,raw,echo=0,link={self.gate}",
                                      f"pty,raw,echo=0,link={self.engine}"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 5
        while not (self.gate.exists() and self.engine.exists()):
            assert time.monotonic() < deadline and self.proc.poll() is None, "socat did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(5)
            self.proc = None

    def open_engine(self) -> int:
        fd = os.open(self.engine, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        return fd


@pytest.fixture
def socat(tmp_path):
    if not shutil.which("socat"):
        pytest.skip("socat not installed")
    pair = Socat(tmp_path)
    yield pair
    pair.stop()


async def read_bytes(fd: int, n: int, timeout: float = 2.0) -> bytes:
    """Read n bytes the reader sent to the engine side, waiting at most `timeout`."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    ready = asyncio.Event()
    loop.add_reader(fd, ready.set)
    try:
        async with asyncio.timeout(timeout):
            while len(got) < n:
                await ready.wait()
                ready.clear()
                got += os.read(fd, n - len(got))
    finally:
        loop.remove_reader(fd)
    return bytes(got)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def test_opens_within_a_second_sends_init_and_reads_frames_split_across_writes(pty_port, reader_section):
    master, name = pty_port
    reader = SerialReader("qr", reader_section("serial", port=name, init="\u0016T\r"))

    async def main():
        started = time.monotonic()
        running = Running(reader)
        try:
            assert await read_bytes(master, 3, timeout=1.0) == b"\x16T\r"
            assert time.monotonic() - started < 1.0
            os.write(master, b"]Q1TICKET-1\r\nTIC")
            os.write(master, b"KET-2\r")
            first, second = await running.next(), await running.next()
        finally:
            await running.stop()
        return first, second

    first, second = asyncio.run(main())
    assert (first.token, first.reader, first.input, first.raw_length) == ("]Q1TICKET-1", "qr", InputKind.QR, 11)
    assert second.token == "TICKET-2"


def test_garbage_bytes_are_denied_malformed_and_logged_without_their_content(pty_port, reader_section, caplog):
    master, name = pty_port
    reader = SerialReader("qr", reader_section("serial", port=name))

    async def main():
        running = await Running(reader).connected()
        try:
            os.write(master, b"SECRET\xff\xfe42\r\n\x1b\x1b\r\nT-7\r\n")
            return await running.next(), await running.next()
        finally:
            await running.stop()

    garbled, good = asyncio.run(main())
    with pytest.raises(Malformed, match="not valid text"):
        normalise(garbled.token)
    assert good.token == "T-7"  # the frame of ESC ESC was dropped, not decided
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["reader qr: a frame of 10 bytes is not valid utf-8; denied as malformed"]
    assert "SECRET" not in caplog.text


def test_a_configured_encoding_decodes_what_utf8_would_refuse(pty_port, reader_section):
    master, name = pty_port
    reader = SerialReader("qr", reader_section("serial", port=name, encoding="cp1252", terminator="\u0003"))

    async def main():
        running = await Running(reader).connected()
        try:
            os.write(master, "Müller-€5".encode("cp1252") + b"\x03")
            return await running.next()
        finally:
            await running.stop()

    assert asyncio.run(main()).token == "Müller-€5"


def test_64_kilobytes_of_noise_stay_bounded_and_the_next_code_still_reads(pty_port, reader_section):
    master, name = pty_port
    reader = SerialReader("qr", reader_section("serial", port=name, max_length=256))
    noise = random.Random(3).randbytes(64 * 1024)

    async def main():
        running = await Running(reader).connected()
        scans = []
        try:
            await asyncio.to_thread(write_all, master, noise + b"\r\nGOOD-1\r\n")
            while not scans or scans[-1].token != "GOOD-1":
                scans.append(await running.next())
                assert reader.framer.buffered <= 1024
        finally:
            await running.stop()
        return scans

    scans = asyncio.run(main())
    assert len(scans) > 1
    for scan in scans[:-1]:  # every noise frame is decided as something, or malformed: never a crash
        try:
            normalise(scan.token, max_length=256)
        except Malformed:
            pass


def test_an_endless_frame_is_cut_once_and_denied_then_reading_goes_on(pty_port, reader_section, caplog):
    master, name = pty_port
    reader = SerialReader("qr", reader_section("serial", port=name, max_length=64))

    async def main():
        running = await Running(reader).connected()
        try:
            await asyncio.to_thread(write_all, master, b"A" * 10_000 + b"\r\nOK-1\r\n")
            return await running.next(), await running.next()
        finally:
            await running.stop()

    cut, ok = asyncio.run(main())
    with pytest.raises(Malformed, match="more than the 64 allowed"):
        normalise(cut.token, max_length=64)
    assert ok.token == "OK-1"
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "reader qr: a frame longer than 256 bytes was cut; denied as malformed"]


def test_a_second_reader_cannot_open_a_port_already_in_use(pty_port, reader_section, caplog):
    master, name = pty_port
    first = SerialReader("qr", reader_section("serial", port=name))
    second = SerialReader("qr2", reader_section("serial", port=name))

    async def main():
        one = await Running(first).connected()
        try:
            os.write(master, b"T-1\r\n")
            assert (await one.next()).token == "T-1"
            two = Running(second)
            await until(lambda: "in use by another program" in caplog.text, what="the lock warning")
            await two.stop()
        finally:
            await one.stop()

    asyncio.run(main())
    assert f"reader qr2: cannot open {name} (in use by another program)" in caplog.text


def test_unplug_is_logged_once_and_the_reader_is_back_within_5_s_of_the_port_returning(socat, reader_section,
                                                                                       caplog):
    caplog.set_level(logging.DEBUG, logger=LOG)
    reader = SerialReader("qr", reader_section("serial", port=str(socat.gate), init="\u0016T\r"))

    def records(level):
        return [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno == level]

    async def main():
        running = Running(reader)
        try:
            # Not plugged in at start: one warning, then quiet retries.
            await until(lambda: len(records(logging.DEBUG)) >= 2, what="retries while absent")
            assert len(records(logging.WARNING)) == 1
            socat.start()
            engine = socat.open_engine()
            assert await read_bytes(engine, 3, timeout=5.0) == b"\x16T\r"
            os.write(engine, b"T-1\r\n")
            assert (await running.next()).token == "T-1"

            # Unplugged while reading: one warning for the loss, none for the retries that follow.
            caplog.clear()
            socat.stop()
            os.close(engine)
            await until(lambda: len(records(logging.DEBUG)) >= 3, what="retries after the loss")
            assert [m.split(" (")[0] for m in records(logging.WARNING)] == [f"reader qr: {socat.gate} lost"]

            socat.start()
            back = time.monotonic()
            engine = socat.open_engine()
            assert await read_bytes(engine, 3, timeout=5.0) == b"\x16T\r"  # init sent again on reopen
            elapsed = time.monotonic() - back
            os.write(engine, b"T-2\r\n")
            assert (await running.next()).token == "T-2"
            os.close(engine)
            return elapsed
        finally:
            await running.stop()

    elapsed = asyncio.run(main())
    assert elapsed < 5.0
    assert len([m for m in records(logging.WARNING)]) == 1
    assert any("open again after" in m for m in records(logging.INFO))


def test_a_serial_reader_from_the_config_file_feeds_the_pipeline(pty_port, load_config, tickets_csv):
    master, name = pty_port
    csv = tickets_csv("""
        token,name,valid_from,valid_until,max_entries
        T-0001,Ada,,,
    """)
    config = load_config(f"""
        [backend]
        type = "local"
        [backend.local]
        tickets = "{csv}"
        [reader.qr]
        type = "serial"
        port = "{name}"
        baudrate = 9600
        parity = "even"
        stopbits = 2
    """)

    async def main():
        parts = await build(config)
        running = await Running(build_reader("qr", config.readers["qr"])).connected()
        try:
            await parts.backend.sync(parts.store)
            os.write(master, b"]Q1T-0001\r\nT-\xff\r\n")
            decisions = [await parts.gate.handle(await running.next(), "serial:qr") for _ in range(2)]
            await parts.gate.drain()
            return decisions
        finally:
            await running.stop()
            await parts.close()

    admitted, garbled = asyncio.run(main())
    assert admitted.verdict is Verdict.ADMIT and admitted.message == "Ada"
    assert garbled.verdict is Verdict.DENY and garbled.reason is Reason.MALFORMED


@pytest.mark.parametrize("line,problem", [
    ("stopbits = 3", "[reader.qr] stopbits = 3: must be 1, 1.5 or 2."),
    ("stopbits = 1.25", "[reader.qr] stopbits = 1.25: must be 1, 1.5 or 2."),
    ('parity = "evn"', '[reader.qr] parity = "evn": must be one of "none", "even", "odd", "mark", "space". '
                       'Did you mean "even"?'),
    ('encoding = "utf-9"', '[reader.qr] encoding = "utf-9": unknown encoding; use e.g. "utf-8", "latin-1", '
                           '"cp1252", "ascii".'),
    ('terminator = "\\u20ac"', '[reader.qr] terminator = "€": only characters U+0000 to U+00FF, one byte each '
                               '(write bytes as \\u00XX).'),
    ('init = "Ā"', '[reader.qr] init = "Ā": only characters U+0000 to U+00FF, one byte each (write bytes as '
                   '\\u00XX).'),
    ("", '[reader.qr] port: missing; the serial device, e.g. "/dev/serial/by-id/usb-QR-Engine-if00" '
         "(gated list-devices shows candidates)."),
])
def test_config_problems_name_the_key_and_what_is_allowed(write_config, line, problem):
    from gated import config as configmod
    from gated.errors import ConfigError

    port = "" if "port" in problem else 'port = "/dev/ttyACM0"'
    with pytest.raises(ConfigError) as e:
        configmod.load(str(write_config(f'[reader.qr]\ntype = "serial"\n{port}\n{line}\n')))
    assert problem in e.value.problems


def test_list_devices_shows_ports_with_their_by_id_names(pty_port, tmp_path):
    _, name = pty_port
    (tmp_path / "by-id").mkdir()
    link = tmp_path / "by-id" / "usb-Acme_QR_Engine_0001-if00"
    link.symlink_to(name)
    (tmp_path / "by-id" / "usb-Gone-if00").symlink_to(tmp_path / "nothing")  # a dangling link is skipped
    found = [c for c in list_devices(str(tmp_path)) if c.path == os.path.realpath(name)]
    assert len(found) == 1 and found[0].links == (str(link),) and found[0].access
    assert list_devices(str(tmp_path))[0].links  # by-id names first
