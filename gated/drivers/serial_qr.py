"""The `serial` reader: a QR engine on a serial port (USB CDC or UART) -> frames -> raw Scans.

The port is opened with pyserial (termios settings, an exclusive lock so no second program reads
the same engine) and then read from the event loop as a plain non-blocking fd. An engine that is
unplugged or stops answering is the reader's own business: it logs the loss once, retries with
backoff (at most `RETRY_MAX_SECONDS` apart, so it is back within a few seconds of the device
returning) and logs the return once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from dataclasses import dataclass
from pathlib import Path

import serial

from gated.drivers.base import Reader
from gated.drivers.framing import Frame, Framer, check_encoding, decode, terminator_bytes, to_bytes
from gated.model import InputKind, Scan
from gated.schema import Key, Section, fmt

log = logging.getLogger(__name__)

PARITY = {"none": serial.PARITY_NONE, "even": serial.PARITY_EVEN, "odd": serial.PARITY_ODD,
          "mark": serial.PARITY_MARK, "space": serial.PARITY_SPACE}
STOPBITS = {1.0: serial.STOPBITS_ONE, 1.5: serial.STOPBITS_ONE_POINT_FIVE, 2.0: serial.STOPBITS_TWO}
RETRY_FIRST_SECONDS = 0.1
RETRY_MAX_SECONDS = 2.0  # docs/design.md: back within 5 s of the device reappearing
_ABSENT = (errno.ENOENT, errno.ENODEV, errno.ENXIO)
_BYTES_PER_CHAR = 4  # a UTF-8 character is at most 4 bytes: no frame within max_length is cut early

SCHEMA = {
    "port": Key("str", help='the serial device, e.g. "/dev/serial/by-id/usb-QR-Engine-if00" '
                            "(gated list-devices shows candidates)"),
    "baudrate": Key("int", default=115200, minimum=50, maximum=4_000_000),
    "bytesize": Key("int", default=8, minimum=5, maximum=8, help="data bits"),
    "parity": Key("str", default="none", choices=tuple(PARITY)),
    "stopbits": Key("float", default=1.0, help="1, 1.5 or 2"),
    "terminator": Key("str", default="line",
                      help='what ends a frame: "line" (CR, LF or CRLF), "cr", "lf", "crlf", "none" '
                           '(silence only) or the bytes themselves, e.g. "\\u0003"'),
    "idle_seconds": Key("float", default=0.1, above=0, maximum=10,
                        help="silence that ends a frame (with a terminator: a frame that lost it)"),
    "init": Key("str", default="", help='bytes sent to the engine on every open, e.g. "\\u0016T\\r"'),
    "encoding": Key("str", default="utf-8", help="how the engine encodes text; bytes that do not fit are "
                                                 "denied malformed"),
}


def check(section: Section) -> list[str]:
    """Rules across one [reader.NAME] table of type serial that single keys cannot say."""
    where, problems = section.where, []
    if "stopbits" in section and section["stopbits"] not in STOPBITS:
        problems.append(f"{where} stopbits = {section['stopbits']:g}: must be 1, 1.5 or 2.")
    for key, convert in (("terminator", terminator_bytes), ("init", to_bytes)):
        if isinstance(section.get(key), str):
            try:
                convert(section[key])
            except ValueError as e:
                problems.append(f"{where} {key} = {fmt(section[key])}: {e}.")
    if isinstance(section.get("encoding"), str) and (why := check_encoding(section["encoding"])):
        problems.append(f"{where} encoding = {fmt(section['encoding'])}: {why}.")
    return problems


class SerialReader(Reader):
    """Reads frames from one serial port; reconnects by itself."""

    def __init__(self, name: str, section: Section, *, retry_max_seconds: float = RETRY_MAX_SECONDS):
        super().__init__(name, section)
        self.port: str = section["port"]
        self.init = to_bytes(section.get("init", ""))
        self.encoding: str = section.get("encoding", "utf-8")
        self.max_length: int = section.get("max_length", 4096)
        self.retry_max_seconds = retry_max_seconds
        self.framer = Framer(section.get("terminator", "line"), limit=self.max_length * _BYTES_PER_CHAR,
                             idle_seconds=section.get("idle_seconds", 0.1))
        self.terminated = section.get("terminator", "line") != "none"
        self.connected = False  # the port is open and being read (for status views)
        self._warned_idle = False

    def describe(self) -> str:
        return f"{self.name} (serial {self.port} {self.section.get('baudrate', 115200)} baud)"

    async def scans(self) -> AsyncIterator[Scan]:
        # State edges only: "" while open, "absent" while the device is missing, else the last error.
        delay, state, lost_at = 0.0, "", None
        while True:
            if delay:
                await asyncio.sleep(delay)
            try:
                port = self._open()
            except (OSError, ValueError) as e:  # SerialException is an OSError
                problem = "absent" if getattr(e, "errno", None) in _ABSENT else _reason(e)
                if problem != state:
                    log.warning("reader %s: cannot open %s (%s); retrying (gated list-devices shows ports)",
                                self.name, self.port, _reason(e),
                                extra={"GATED_EVENT": "reader_unavailable", "GATED_READER": self.name})
                else:
                    log.debug("reader %s: %s still unavailable (%s)", self.name, self.port, _reason(e))
                state = problem
                delay = min(max(delay * 2, RETRY_FIRST_SECONDS), self.retry_max_seconds)
                continue
            if lost_at is not None:
                log.info("reader %s: %s open again after %.1f s", self.name, self.port, time.monotonic() - lost_at,
                         extra={"GATED_EVENT": "reader_back", "GATED_READER": self.name})
            else:
                log.info("reader %s: reading %s at %d baud", self.name, self.port, self.section.get("baudrate", 115200),
                         extra={"GATED_EVENT": "reader_open", "GATED_READER": self.name})
            delay, state, self.connected = 0.0, "", True
            try:
                async with aclosing(self._frames(port)) as frames:
                    async for frame in frames:
                        if frame.by == "idle" and self.terminated and not self._warned_idle:
                            self._warned_idle = True
                            log.warning("reader %s: a frame ended by silence, without its terminator; check "
                                        "the engine's suffix setting or set terminator = \"none\"", self.name,
                                        extra={"GATED_EVENT": "reader_framing", "GATED_READER": self.name})
                        scan = frame_to_scan(frame, self.name, self.input, self.encoding, self.max_length)
                        if scan is not None:
                            yield scan
            except OSError as e:
                lost_at, state, delay = time.monotonic(), "absent", RETRY_FIRST_SECONDS
                log.warning("reader %s: %s lost (%s); reconnecting", self.name, self.port, _reason(e),
                            extra={"GATED_EVENT": "reader_lost", "GATED_READER": self.name})
            finally:
                self.connected = False
                with suppress(OSError):
                    port.close()

    def _open(self) -> serial.Serial:
        s = self.section
        port = serial.Serial(port=None, baudrate=s.get("baudrate", 115200), bytesize=s.get("bytesize", 8),
                             parity=PARITY[s.get("parity", "none")], stopbits=STOPBITS[s.get("stopbits", 1.0)],
                             timeout=0, write_timeout=1.0, exclusive=True)
        port.port = self.port
        port.open()
        if self.init:
            try:
                port.write(self.init)
            except (OSError, serial.SerialTimeoutException) as e:
                # Keep reading: the engine may already be in the wanted mode; the installer sees why.
                log.warning("reader %s: init bytes not sent to %s (%s)", self.name, self.port, _reason(e),
                            extra={"GATED_EVENT": "reader_init_failed", "GATED_READER": self.name})
        return port

    async def _frames(self, port: serial.Serial) -> AsyncIterator[Frame]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = port.fileno()
        loop.add_reader(fd, ready.set)
        self.framer.reset()  # a frame half-read before a reconnect is gone
        try:
            while True:
                deadline = self.framer.deadline()
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    await asyncio.wait_for(ready.wait(), timeout)
                except TimeoutError:
                    for frame in self.framer.expire(time.monotonic()):
                        yield frame
                    continue
                ready.clear()
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    # pyserial sets VMIN=0, so an empty read also follows a stale wake-up; only a
                    # hang-up (USB unplug, pty closed) means the device is gone.
                    if _hung_up(fd):
                        raise OSError(errno.ENODEV, "device disconnected")
                    continue
                for frame in self.framer.feed(data, time.monotonic()):
                    yield frame
        finally:
            loop.remove_reader(fd)


def _hung_up(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _, ev in poller.poll(0))


def frame_to_scan(frame: Frame, reader: str, input: InputKind, encoding: str = "utf-8",
                  max_length: int = 4096) -> Scan | None:
    """One frame -> the Scan the pipeline decides, or None (logged) for a frame of nothing.

    A cut frame or one that does not decode still becomes a Scan: its token is built so the pipeline
    denies it `malformed` (too long, or holding U+FFFD), and a WARNING without its content says why.
    """
    text, clean = decode(frame.data, encoding)
    if frame.cut:
        log.warning("reader %s: a frame longer than %d bytes was cut; denied as malformed", reader, len(frame.data),
                    extra={"GATED_EVENT": "reader_oversize", "GATED_READER": reader})
        if len(text) <= max_length:  # multi-byte text can fit in characters: keep it too long anyway
            text += "\ufffd" * (max_length + 1 - len(text))
        return Scan(token=text, reader=reader, input=input, raw_length=len(frame.data))
    if not clean:
        log.warning("reader %s: a frame of %d bytes is not valid %s; denied as malformed", reader,
                    len(frame.data), encoding, extra={"GATED_EVENT": "reader_malformed", "GATED_READER": reader})
    elif not text.strip(_CONTROL):
        log.debug("reader %s: a frame of %d control characters only; dropped", reader, len(frame.data))
        return None
    return Scan(token=text, reader=reader, input=input, raw_length=len(frame.data))


_CONTROL = "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)])) + " "


def _reason(e: BaseException) -> str:
    """The OS's words for an error, without the traceback or pyserial's repetition of the port."""
    if getattr(e, "errno", None) in (errno.EAGAIN, errno.EBUSY):  # pyserial's exclusive lock is taken
        return "in use by another program"
    if getattr(e, "errno", None) == errno.EACCES:
        return "permission denied (the gated user needs the dialout group)"
    strerror = getattr(e, "strerror", None)
    if strerror and getattr(e, "errno", None) is not None:
        # pyserial puts "could not open port X: [Errno 2] No such file..." in strerror; keep the tail.
        return strerror.rsplit("] ", 1)[-1].split(": '", 1)[0]
    return str(e) or type(e).__name__


@dataclass(frozen=True)
class SerialCandidate:
    """A serial port an engine could be on, for `gated list-devices` and `gated doctor`."""

    path: str  # /dev/ttyACM0
    links: tuple[str, ...]  # stable names: /dev/serial/by-id/..., /dev/serial/by-path/...
    description: str
    hwid: str  # "USB VID:PID=0C2E:0B61 SER=..."
    access: bool  # this user may open it


def list_devices(serial_root: str = "/dev/serial") -> list[SerialCandidate]:
    """USB and on-board serial ports with their by-id / by-path names, by-id first."""
    from serial.tools import list_ports

    links: dict[str, list[str]] = {}
    for folder in ("by-id", "by-path"):
        for link in sorted(Path(serial_root, folder).glob("*")):
            try:
                links.setdefault(str(link.resolve(strict=True)), []).append(str(link))
            except OSError:  # a dangling link: its device is gone
                continue
    info = {p.device: p for p in list_ports.comports()}
    out = []
    for path in sorted(set(info) | set(links)):
        port = info.get(path)
        description = port.description if port and port.description != "n/a" else ""
        out.append(SerialCandidate(path, tuple(links.get(path, ())), description,
                                   port.hwid if port and port.hwid != "n/a" else "",
                                   os.access(path, os.R_OK | os.W_OK)))
    out.sort(key=lambda c: (not c.links, c.path))
    return out


def create(name: str, section: Section) -> Reader:
    return SerialReader(name, section)
