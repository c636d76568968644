"""The `hid` reader: a USB keyboard-wedge scanner, grabbed through evdev -> keymap -> raw Scans.

The device is grabbed exclusively (EVIOCGRAB) before anything is read, so ticket codes never reach
a console or a login prompt; a device that cannot be grabbed is not read at all. A scanner that is
unplugged is logged once and reopened as soon as it is back (polled every `POLL_SECONDS`, so
within the 2 s docs/design.md asks), without restarting the daemon. Devices are found by path
(`device`, best a /dev/input/by-id/ name) or by `match` (a name glob or "vendor:product"), read
from sysfs without opening anything.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gated.device import file_text
from gated.drivers.base import Reader
from gated.drivers.keymap import LAYOUTS, TERMINATORS, Code, KeyDecoder
from gated.model import InputKind, Scan
from gated.schema import Key, Section

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
_ABSENT = (errno.ENOENT, errno.ENODEV, errno.ENXIO)
_VENDOR_PRODUCT = re.compile(r"[0-9A-Fa-f]{4}:[0-9A-Fa-f]{4}")
_CONTROL = "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)])) + " "

SCHEMA = {
    "device": Key("str", default="", help='the input device, e.g. "/dev/input/by-id/usb-Scanner-event-kbd" '
                                          "(gated list-devices shows candidates); or use match"),
    "match": Key("str", default="", help='instead of device: a name glob ("*Honeywell*") or "vendor:product" '
                                         '("0c2e:0b61"), as gated list-devices shows them'),
    "keymap": Key("str", default="us", choices=tuple(LAYOUTS),
                  help="the keyboard layout the scanner is set to type for"),
    "terminator": Key("str", default="enter", choices=TERMINATORS,
                      help='what ends a code: "enter", "tab", or "none" (silence only)'),
    "idle_seconds": Key("float", default=0.2, above=0, maximum=10,
                        help="silence between keys that ends a code (with a terminator: a code that lost it)"),
}


def check(section: Section) -> list[str]:
    """Rules across one [reader.NAME] table of type hid that single keys cannot say."""
    where = section.where
    if "device" not in section or "match" not in section:  # a wrong type, already reported
        return []
    device, match = section.get("device", ""), section.get("match", "")
    if device and match:
        return [f"{where} device and match: give one of them, not both."]
    if not device and not match:
        return [f'{where} device: missing; give device = "/dev/input/by-id/..." or match = "name*" '
                '(gated list-devices shows candidates).']
    if device and not device.startswith("/"):
        return [f'{where} device = "{device}": must be a path under /dev/input, e.g. '
                '"/dev/input/by-id/usb-Scanner-event-kbd".']
    return []


@dataclass(frozen=True)
class InputCandidate:
    """A keyboard-like input device a scanner could be, for `gated list-devices` and `gated doctor`."""

    path: str  # /dev/input/eventN
    name: str
    vendor: str  # 4 hex digits, lower case
    product: str
    phys: str
    links: tuple[str, ...]  # stable names: /dev/input/by-id/..., /dev/input/by-path/...
    access: bool  # this user may open it

    @property
    def vendor_product(self) -> str:
        return f"{self.vendor}:{self.product}"


def _is_keyboard(key_bitmap: str) -> bool:
    """Whether the device has the keys a scanner types: digits and Enter.

    sysfs prints the key bitmap as hex longs, most significant first. KEY_1..KEY_0 (2..11) and
    KEY_ENTER (28) sit in the lowest 32 bits, the last word whatever the kernel's long size.
    """
    words = key_bitmap.split()
    if not words:
        return False
    try:
        low = int(words[-1], 16)
    except ValueError:
        return False
    needed = sum(1 << bit for bit in (*range(2, 12), 28))
    return low & needed == needed


def list_devices(dev_root: str = "/dev/input", sys_root: str = "/sys/class/input") -> list[InputCandidate]:
    """Keyboard-like input devices, from sysfs (nothing is opened), with their by-id/by-path links."""
    links: dict[str, list[str]] = {}
    for folder in ("by-id", "by-path"):
        for link in sorted(Path(dev_root, folder).glob("*")):
            try:
                links.setdefault(str(link.resolve(strict=True)), []).append(str(link))
            except OSError:
                continue
    out = []
    entries = sorted(Path(sys_root).glob("event*"), key=lambda p: int(p.name[5:]) if p.name[5:].isdigit() else -1)
    for entry in entries:
        info = entry / "device"
        if not _is_keyboard(file_text(info / "capabilities" / "key")):
            continue
        path = Path(dev_root, entry.name)
        resolved = str(path.resolve())
        out.append(InputCandidate(
            path=str(path), name=file_text(info / "name"), vendor=file_text(info / "id" / "vendor").lower(),
            product=file_text(info / "id" / "product").lower(), phys=file_text(info / "phys"),
            links=tuple(links.get(resolved, ())), access=os.access(path, os.R_OK | os.W_OK)))
    return out


def matches(candidate: InputCandidate, pattern: str) -> bool:
    """`match` semantics: "vendor:product" in hex, else a case-insensitive glob on the device name."""
    if _VENDOR_PRODUCT.fullmatch(pattern):
        return candidate.vendor_product == pattern.lower()
    return fnmatch.fnmatchcase(candidate.name.lower(), pattern.lower())


def _open_evdev(path: str) -> Any:
    from evdev import InputDevice

    return InputDevice(path)


class _Unavailable(OSError):
    """No device to read: the reason, with an errno saying whether it is merely absent."""

    def __str__(self) -> str:
        return str(self.strerror)


class HidReader(Reader):
    """Reads one keyboard-wedge scanner.

    Args:
        open_device: path -> an evdev.InputDevice (the seam tests use; default evdev.InputDevice).
        dev_root, sys_root: where `match` looks for devices (tests use a built tree).
        poll_seconds: how often a missing device is looked for.
    """

    def __init__(self, name: str, section: Section, *, open_device: Callable[[str], Any] | None = None,
                 dev_root: str = "/dev/input", sys_root: str = "/sys/class/input",
                 poll_seconds: float = POLL_SECONDS):
        super().__init__(name, section)
        self.device: str = section.get("device", "")
        self.match: str = section.get("match", "")
        self.keymap: str = section.get("keymap", "us")
        self.terminator: str = section.get("terminator", "enter")
        self.idle_seconds: float = section.get("idle_seconds", 0.2)
        self.max_length: int = section.get("max_length", 4096)
        self.open_device = open_device or _open_evdev
        self.dev_root, self.sys_root = dev_root, sys_root
        self.poll_seconds = poll_seconds
        self.decoder = KeyDecoder(self.keymap, terminator=self.terminator, idle_seconds=self.idle_seconds,
                                  max_length=self.max_length)
        self.path = ""  # the device path now open
        self.connected = False  # a device is open, grabbed and being read (for status views)
        self._warned_idle = False

    def describe(self) -> str:
        where = self.device or f'match "{self.match}"'
        return f"{self.name} (hid {where}, keymap {self.keymap}, terminator {self.terminator})"

    async def scans(self) -> AsyncIterator[Scan]:
        # State edges only: "" while reading, "absent" while the device is missing, else the last error.
        state, lost_at = "", None
        while True:
            try:
                dev = self._open()
            except OSError as e:
                problem = "absent" if e.errno in _ABSENT else str(e)
                if problem != state:
                    log.warning("reader %s: %s; waiting for it (gated list-devices shows candidates)", self.name, e,
                                extra={"GATED_EVENT": "reader_unavailable", "GATED_READER": self.name})
                else:
                    log.debug("reader %s: still unavailable: %s", self.name, e)
                state = problem
                await asyncio.sleep(self.poll_seconds)
                continue
            name = getattr(dev, "name", "")
            if lost_at is not None:
                log.info('reader %s: %s "%s" back after %.1f s, grabbed', self.name, self.path, name,
                         time.monotonic() - lost_at, extra={"GATED_EVENT": "reader_back", "GATED_READER": self.name})
            else:
                log.info('reader %s: reading %s "%s", grabbed (keymap %s, terminator %s)', self.name, self.path,
                         name, self.keymap, self.terminator,
                         extra={"GATED_EVENT": "reader_open", "GATED_READER": self.name})
            state, self.connected = "", True
            self.decoder.reset()
            try:
                async with aclosing(self._codes(dev)) as codes:
                    async for code in codes:
                        if code.by == "idle" and self.terminator != "none" and not self._warned_idle:
                            self._warned_idle = True
                            log.warning("reader %s: a code ended by silence, without %s; if the scanner sends "
                                        'no suffix, set terminator = "none"', self.name, self.terminator.title(),
                                        extra={"GATED_EVENT": "reader_framing", "GATED_READER": self.name})
                        scan = code_to_scan(code, self.name, self.input, self.keymap)
                        if scan is not None:
                            yield scan
            except OSError as e:
                lost_at, state = time.monotonic(), "absent"
                log.warning("reader %s: %s disconnected (%s); waiting for it to return", self.name, self.path,
                            e.strerror or e, extra={"GATED_EVENT": "reader_lost", "GATED_READER": self.name})
            finally:
                self.connected = False
                _close(dev)

    def _paths(self) -> list[str]:
        if self.device:
            return [self.device]
        found = [c.path for c in list_devices(self.dev_root, self.sys_root) if matches(c, self.match)]
        if not found:
            raise _Unavailable(errno.ENODEV, f'no input device matches "{self.match}"')
        return found

    def _open(self) -> Any:
        """Open and grab the first candidate that allows it; raise OSError saying why none did."""
        first: OSError | None = None
        for path in self._paths():
            try:
                dev = self.open_device(path)
            except OSError as e:
                why = "permission denied (the gated user needs the input group)" if e.errno == errno.EACCES \
                    else (e.strerror or str(e))
                first = first or _Unavailable(e.errno, f"{path}: {why}")
                continue
            try:
                dev.grab()
            except OSError as e:
                _close(dev)
                why = "another program holds it" if e.errno == errno.EBUSY else (e.strerror or str(e))
                # Not read ungrabbed: the codes would also be typed into whatever has the console.
                first = first or _Unavailable(e.errno, f"{path}: cannot grab it exclusively ({why})")
                continue
            self.path = path
            return dev
        assert first is not None
        raise first

    async def _codes(self, dev: Any) -> AsyncIterator[Code]:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = dev.fd
        loop.add_reader(fd, ready.set)
        try:
            while True:
                timeout = self.idle_seconds if self.decoder.pending else None
                try:
                    await asyncio.wait_for(ready.wait(), timeout)
                except TimeoutError:
                    if code := self.decoder.flush():
                        yield code
                    continue
                ready.clear()
                try:
                    events = list(dev.read())
                except BlockingIOError:
                    continue
                if not events:  # readable but empty: the device is gone (end of file)
                    raise OSError(errno.ENODEV, "device disconnected")
                for event in events:
                    for code in self.decoder.feed(event):
                        yield code
        finally:
            loop.remove_reader(fd)


def code_to_scan(code: Code, reader: str, input: InputKind, keymap: str = "us") -> Scan | None:
    """One typed code -> the Scan the pipeline decides, or None (logged) for a code of nothing.

    A cut code stays one character longer than max_length and a code with keys the keymap cannot
    map holds U+FFFD; either way the pipeline denies it `malformed`. The WARNING names no content.
    """
    if code.cut:
        log.warning("reader %s: a code of %d characters is longer than max_length; cut, denied as malformed",
                    reader, code.length, extra={"GATED_EVENT": "reader_oversize", "GATED_READER": reader})
    elif "\ufffd" in code.text:
        log.warning("reader %s: a code had keys the %s keymap does not map; denied as malformed (is keymap "
                    "the scanner's keyboard setting?)", reader, keymap,
                    extra={"GATED_EVENT": "reader_malformed", "GATED_READER": reader})
    elif not code.text.strip(_CONTROL):
        log.debug("reader %s: a code of %d control characters only; dropped", reader, code.length)
        return None
    return Scan(token=code.text, reader=reader, input=input, raw_length=code.length)


def _close(dev: Any) -> None:
    try:
        dev.close()  # closing the fd also releases the grab
    except OSError:
        pass


def create(name: str, section: Section) -> Reader:
    return HidReader(name, section)
