"""The HID keyboard-wedge reader: grab, decode, hot-plug, several scanners at once, finding devices.

There is no /dev/uinput here, so devices are evdev's own InputDevice reading a pipe: the real C read
path decodes the `struct input_event` bytes the test writes. Only EVIOCGRAB cannot work on a pipe;
the double records the grab instead (and a plain InputDevice shows what happens when a grab fails).
`test_rig_uinput_*` runs against a real kernel device where /dev/uinput exists.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import time
from pathlib import Path

import evdev
import pytest

from gated.daemon import build
from gated.drivers.hid import POLL_SECONDS, HidReader, list_devices
from gated.drivers.keymap import keystrokes
from gated.model import InputKind, Reason, Verdict
from tests.drivers.support import Running, until

LOG = "gated.drivers.hid"
EVENT = "llHHi"  # struct input_event on 64-bit Linux
KEYBOARD_KEYS = "1000000000007 ff9f207ac14057ff febeffdfffefffff fffffffffffffffe"  # from a real USB keyboard
MOUSE_KEYS = "1f0000 0 0 0 0"


class PipeDevice(evdev.InputDevice):
    """evdev.InputDevice over a pipe; __init__ skipped because it ioctl()s the fd, grab recorded."""

    def __init__(self, path: str, name: str, bench: Bench):
        r, self.writer = os.pipe()
        os.set_blocking(r, False)
        self.fd, self.path, self.name, self.bench = r, path, name, bench

    def grab(self) -> None:
        real = os.path.realpath(self.path)
        if self.bench.grabbed.get(real, self) is not self:
            raise OSError(errno.EBUSY, "Device or resource busy")
        self.bench.grabbed[real] = self.bench.opened[real] = self

    def close(self) -> None:
        if self.bench.grabbed.get(os.path.realpath(self.path)) is self:
            del self.bench.grabbed[os.path.realpath(self.path)]
        super().close()


class Bench:
    """The test's USB bus: which scanners are plugged in, what each reader opened, typing into them."""

    def __init__(self):
        self.plugged: dict[str, str] = {}  # real path -> device name
        self.opened: dict[str, PipeDevice] = {}  # real path -> the device last opened and grabbed there
        self.made: list[PipeDevice] = []
        self.grabbed: dict[str, PipeDevice] = {}
        self.attempts = 0
        self.opened_at: list[float] = []

    def plug(self, path: str, name: str = "Acme Scanner") -> None:
        self.plugged[os.path.realpath(path)] = name

    def unplug(self, path: str) -> None:
        real = os.path.realpath(path)
        del self.plugged[real]
        os.close(self.opened[real].writer)  # the reader sees end of file, as with a vanished device

    def open(self, path: str) -> PipeDevice:
        self.attempts += 1
        real = os.path.realpath(path)
        if real not in self.plugged:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        dev = PipeDevice(path, self.plugged[real], self)
        self.made.append(dev)
        self.opened_at.append(time.monotonic())
        return dev

    def type(self, path: str, events) -> None:
        dev = self.opened[os.path.realpath(path)]
        for e in events:
            os.write(dev.writer, struct.pack(EVENT, e.sec, e.usec, e.type, e.code, e.value))

    def close(self) -> None:
        for dev in self.made:
            try:
                os.close(dev.writer)
            except OSError:
                pass


@pytest.fixture
def bench():
    b = Bench()
    yield b
    b.close()


DEVICE = "/dev/input/by-id/usb-Acme_Scanner-event-kbd"


def test_a_grabbed_scanner_types_codes_that_come_out_as_raw_scans(bench, keys, reader_section):
    bench.plug(DEVICE)
    reader = HidReader("front", reader_section("hid", device=DEVICE), open_device=bench.open)

    async def main():
        running = await Running(reader).connected()
        try:
            assert DEVICE in bench.grabbed  # held exclusively while it is read
            bench.type(DEVICE, keys().keys("RIGHTBRACE").tap("LEFTSHIFT", "Q").keys("1", "T", "MINUS", "4", "2",
                                                                                      "ENTER").events)
            return await running.next()
        finally:
            await running.stop()

    scan = asyncio.run(main())
    assert (scan.token, scan.reader, scan.input, scan.raw_length) == ("]Q1t-42", "front", InputKind.BARCODE, 7)
    assert DEVICE not in bench.grabbed  # closed, grab released, on stop


def test_a_device_that_cannot_be_grabbed_is_not_read_at_all(tmp_path, reader_section, caplog):
    opened: list[evdev.InputDevice] = []

    def open_plain(path: str) -> evdev.InputDevice:
        r, w = os.pipe()  # the real grab ioctl on a pipe fails, as on a device another program holds
        dev = object.__new__(evdev.InputDevice)
        dev.fd, dev.path, dev.name = r, path, "Plain"
        os.write(w, b"".join(struct.pack(EVENT, 1, 0, e.type, e.code, e.value) for e in keystrokes("7\n")))
        os.close(w)
        opened.append(dev)
        return dev

    reader = HidReader("front", reader_section("hid", device=DEVICE), open_device=open_plain, poll_seconds=0.01)

    async def main():
        task = asyncio.get_running_loop().create_task(anext(reader.scans()))
        await until(lambda: len(opened) >= 3, what="retries")
        assert not task.done()  # the code waiting in the device was never read
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert all(dev.fd == -1 for dev in opened)  # each attempt closed its device
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"reader front: {DEVICE}: cannot grab it exclusively (Inappropriate ioctl for device); "
                        "waiting for it (gated list-devices shows candidates)"]


def test_a_device_the_user_may_not_open_says_which_group_is_missing(reader_section, caplog):
    def denied(path: str):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    reader = HidReader("front", reader_section("hid", device=DEVICE), open_device=denied, poll_seconds=0.01)

    async def main():
        task = asyncio.get_running_loop().create_task(anext(reader.scans()))
        await until(lambda: "permission denied" in caplog.text, what="the warning")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert f"reader front: {DEVICE}: permission denied (the gated user needs the input group)" in caplog.text


def test_a_code_without_its_enter_is_ended_by_silence_with_one_warning(bench, keys, reader_section, caplog):
    bench.plug(DEVICE)
    reader = HidReader("front", reader_section("hid", device=DEVICE, idle_seconds=0.05), open_device=bench.open)

    async def main():
        running = await Running(reader).connected()
        try:
            bench.type(DEVICE, keys().keys("1", "2", "3").events)
            first = await running.next()
            bench.type(DEVICE, keys(start=keys.T0 + 5).keys("4", "5").events)
            return first, await running.next()
        finally:
            await running.stop()

    first, second = asyncio.run(main())
    assert (first.token, second.token) == ("123", "45")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        'reader front: a code ended by silence, without Enter; if the scanner sends no suffix, set terminator = "none"']


def test_terminator_none_ends_codes_by_silence_quietly(bench, keys, reader_section, caplog):
    bench.plug(DEVICE)
    reader = HidReader("front", reader_section("hid", device=DEVICE, terminator="none", idle_seconds=0.05),
                       open_device=bench.open)

    async def main():
        running = await Running(reader).connected()
        try:
            bench.type(DEVICE, keys().keys("A", "B").events)
            return await running.next()
        finally:
            await running.stop()

    assert asyncio.run(main()).token == "ab"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_unplugged_scanner_is_logged_once_and_read_again_within_2_s_of_returning(bench, keys, reader_section,
                                                                                   caplog):
    caplog.set_level(logging.DEBUG, logger=LOG)
    bench.plug(DEVICE)
    reader = HidReader("front", reader_section("hid", device=DEVICE), open_device=bench.open)

    async def main():
        running = await Running(reader).connected()
        try:
            bench.type(DEVICE, keys().keys("1", "ENTER").events)
            assert (await running.next()).token == "1"
            bench.unplug(DEVICE)
            tried = bench.attempts
            await until(lambda: bench.attempts >= tried + 3, what="reopen attempts")
            bench.plug(DEVICE)
            back = time.monotonic()
            await running.connected()
            reopened = bench.opened_at[-1] - back
            bench.type(DEVICE, keys(start=keys.T0 + 10).keys("2", "ENTER").events)
            assert (await running.next()).token == "2"
            return reopened
        finally:
            await running.stop()

    reopened = asyncio.run(main())
    assert reopened <= 2.0 and POLL_SECONDS <= 2.0
    warnings = [r.getMessage() for r in caplog.records if r.name == LOG and r.levelno == logging.WARNING]
    assert warnings == [f"reader front: {DEVICE} disconnected (device disconnected); waiting for it to return"]
    assert any("back after" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_several_scanners_are_read_at_once_each_under_its_own_name(bench, keys, reader_section):
    other = "/dev/input/by-id/usb-Other_Scanner-event-kbd"
    bench.plug(DEVICE)
    bench.plug(other, "Other")
    front = HidReader("front", reader_section("hid", device=DEVICE), open_device=bench.open)
    back = HidReader("back", reader_section("hid", device=other, keymap="de"), open_device=bench.open)

    async def main():
        a, b = await Running(front).connected(), await Running(back).connected()
        try:
            # Interleaved key by key: each device's events go to its own decoder and layout.
            ka, kb = keys().keys("Y", "1", "ENTER").events, keys().keys("Y", "2", "ENTER").events
            for i in range(0, max(len(ka), len(kb)), 2):
                bench.type(DEVICE, ka[i:i + 2])
                bench.type(other, kb[i:i + 2])
            return await a.next(), await b.next()
        finally:
            await a.stop()
            await b.stop()

    one, two = asyncio.run(main())
    assert (one.reader, one.token) == ("front", "y1")
    assert (two.reader, two.token) == ("back", "z2")  # QWERTZ


def build_tree(root: Path) -> tuple[str, str]:
    """A sysfs and /dev/input as the kernel and udev lay them out: two identical scanners, a keyboard, a mouse."""
    sys_root, dev_root = root / "sys", root / "dev"
    (dev_root / "by-id").mkdir(parents=True)
    (dev_root / "by-path").mkdir()
    devices = [
        (2, "Logitech USB Keyboard", "046d", "c31c", KEYBOARD_KEYS, "usb-Logitech_USB_Keyboard-event-kbd"),
        (3, "Honeywell Imaging & Mobility 1900", "0C2E", "0B61", KEYBOARD_KEYS, "usb-Honeywell_1900_A-event-kbd"),
        (4, "Logitech USB Optical Mouse", "046d", "c077", MOUSE_KEYS, "usb-Logitech_Mouse-event-mouse"),
        (5, "Honeywell Imaging & Mobility 1900", "0c2e", "0b61", KEYBOARD_KEYS, "usb-Honeywell_1900_B-event-kbd"),
    ]
    for n, name, vendor, product, keys, by_id in devices:
        info = sys_root / f"event{n}" / "device"
        (info / "id").mkdir(parents=True)
        (info / "capabilities").mkdir()
        (info / "name").write_text(name + "\n")
        (info / "phys").write_text(f"usb-0000:01:00.0-1.{n}/input0\n")
        (info / "id" / "vendor").write_text(vendor + "\n")
        (info / "id" / "product").write_text(product + "\n")
        (info / "capabilities" / "key").write_text(keys + "\n")
        (dev_root / f"event{n}").touch()
        (dev_root / "by-id" / by_id).symlink_to(f"../event{n}")
        (dev_root / "by-path" / f"platform-usb-1.{n}-event").symlink_to(f"../event{n}")
    return str(dev_root), str(sys_root)


def test_list_devices_shows_keyboard_like_devices_with_by_id_names_and_ids(tmp_path):
    dev_root, sys_root = build_tree(tmp_path)
    found = list_devices(dev_root, sys_root)
    assert [(Path(c.path).name, c.vendor_product) for c in found] == [
        ("event2", "046d:c31c"), ("event3", "0c2e:0b61"), ("event5", "0c2e:0b61")]  # no mouse
    scanner = found[1]
    assert scanner.name == "Honeywell Imaging & Mobility 1900" and scanner.access
    assert scanner.links == (f"{dev_root}/by-id/usb-Honeywell_1900_A-event-kbd",
                             f"{dev_root}/by-path/platform-usb-1.3-event")
    assert list_devices(str(tmp_path / "none"), str(tmp_path / "none")) == []


def test_list_devices_command_lists_both_kinds_and_exits_0(capsys):
    from gated import cli

    assert cli.main(["list-devices"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('Keyboard-wedge scanners, for [reader.NAME] type = "hid"')
    assert any(line.startswith('Serial ports, for [reader.NAME] type = "serial"') for line in out)


@pytest.mark.parametrize("match", ["0c2e:0b61", "0C2E:0B61", "*honeywell*"])
def test_two_identical_scanners_matched_alike_go_one_to_each_reader(tmp_path, bench, keys, reader_section, match):
    dev_root, sys_root = build_tree(tmp_path)
    for n in (2, 3, 5):
        bench.plug(f"{dev_root}/event{n}")
    made = [HidReader(name, reader_section("hid", match=match), open_device=bench.open, dev_root=dev_root,
                      sys_root=sys_root) for name in ("left", "right")]

    async def main():
        left = await Running(made[0]).connected()
        right = await Running(made[1]).connected()
        try:
            bench.type(f"{dev_root}/event3", keys().keys("3", "ENTER").events)
            bench.type(f"{dev_root}/event5", keys().keys("5", "ENTER").events)
            return (await left.next()).token, (await right.next()).token
        finally:
            await left.stop()
            await right.stop()

    assert asyncio.run(main()) == ("3", "5")
    assert [Path(r.path).name for r in made] == ["event3", "event5"]


def test_a_match_that_finds_nothing_is_reported_once_while_waiting(tmp_path, bench, reader_section, caplog):
    dev_root, sys_root = build_tree(tmp_path)
    reader = HidReader("front", reader_section("hid", match="*Zebra*"), open_device=bench.open, dev_root=dev_root,
                       sys_root=sys_root, poll_seconds=0.01)
    caplog.set_level(logging.DEBUG, logger=LOG)

    async def main():
        task = asyncio.get_running_loop().create_task(anext(reader.scans()))
        await until(lambda: sum("still unavailable" in r.getMessage() for r in caplog.records) >= 3, what="polls")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        'reader front: no input device matches "*Zebra*"; waiting for it (gated list-devices shows candidates)']


def test_a_hid_scanner_from_the_config_file_feeds_the_pipeline(bench, keys, load_config, tickets_csv):
    csv = tickets_csv("""
        token,name,valid_from,valid_until,max_entries
        T-0001,Ada,,,
    """)
    config = load_config(f"""
        [backend]
        type = "local"
        [backend.local]
        tickets = "{csv}"
        [reader.scanner]
        type = "hid"
        device = "{DEVICE}"
        keymap = "fr"
        prefix = "TIX:"
    """)
    bench.plug(DEVICE)

    async def main():
        parts = await build(config)
        running = await Running(HidReader("scanner", config.readers["scanner"], open_device=bench.open)).connected()
        try:
            await parts.backend.sync(parts.store)
            bench.type(DEVICE, keystrokes("TIX:T-0001\n", "fr") + keystrokes("T-\u00e9\n", "fr"))
            decisions = [await parts.gate.handle(await running.next(), "hid:scanner") for _ in range(2)]
            await parts.gate.drain()
            return decisions
        finally:
            await running.stop()
            await parts.close()

    admitted, unknown = asyncio.run(main())
    assert admitted.verdict is Verdict.ADMIT and admitted.message == "Ada"
    assert unknown.verdict is Verdict.DENY and unknown.reason is Reason.UNKNOWN


@pytest.mark.parametrize("table,problem", [
    ("", '[reader.s] device: missing; give device = "/dev/input/by-id/..." or match = "name*" '
         "(gated list-devices shows candidates)."),
    ('device = "/dev/input/event3"\nmatch = "*"', "[reader.s] device and match: give one of them, not both."),
    ('device = "event3"', '[reader.s] device = "event3": must be a path under /dev/input, e.g. '
                          '"/dev/input/by-id/usb-Scanner-event-kbd".'),
    ('match = "*"\nkeymap = "ger"', '[reader.s] keymap = "ger": must be one of "us", "uk", "de", "fr".'),
    ('match = "*"\nkeymap = "frr"', '[reader.s] keymap = "frr": must be one of "us", "uk", "de", "fr". '
                                    'Did you mean "fr"?'),
    ('match = "*"\nterminator = "cr"', '[reader.s] terminator = "cr": must be one of "enter", "tab", "none".'),
])
def test_config_problems_name_the_key_and_what_is_allowed(write_config, table, problem):
    from gated import config as configmod
    from gated.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        configmod.load(str(write_config(f'[reader.s]\ntype = "hid"\n{table}\n')))
    assert problem in e.value.problems, e.value.problems


# --- opt-in rig: a real kernel input device -----------------------------------------------------------
# Needs the uinput module (`modprobe uinput`) and write access to /dev/uinput (root or the input group).
# It runs the reader against evdev.InputDevice itself: open, EVIOCGRAB, read, and unplug (UInput.close).

def _uinput_or_skip():
    if not os.path.exists("/dev/uinput"):
        pytest.skip("no /dev/uinput (kernel without CONFIG_INPUT_UINPUT, or the module is not loaded)")
    try:
        from evdev import UInput, ecodes

        return UInput({ecodes.EV_KEY: list(range(1, 120))}, name="gated-rig-scanner")
    except (OSError, evdev.UInputError) as e:
        pytest.skip(f"cannot create a uinput device: {e}")


def test_rig_uinput_device_is_grabbed_read_and_reopened(reader_section, caplog):
    ui = _uinput_or_skip()
    path = ui.device.path
    reader = HidReader("rig", reader_section("hid", device=path))

    async def main():
        running = await Running(reader).connected()
        try:
            for e in keystrokes("RIG-42\n", "us"):
                ui.write(e.type, e.code, e.value)
            assert (await running.next(timeout=5)).token == "RIG-42"
            ui.close()
            await until(lambda: not reader.connected, what="the loss")
        finally:
            await running.stop()

    asyncio.run(main())
    assert "disconnected" in caplog.text
