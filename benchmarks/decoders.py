"""Decoder cost per scan: HID key events -> text, serial bytes -> frame -> text."""

from __future__ import annotations

import string
import time

from evdev import InputEvent, ecodes

from benchmarks.common import Figure, pct
from gated.drivers.framing import Framer, decode
from gated.drivers.keymap import KeyDecoder, keystrokes

QR = (string.ascii_letters + string.digits) * 2  # 124 characters, shifted and unshifted
QR = QR[:100]


def figures(quick: bool) -> list[Figure]:
    n = 200 if quick else 2000
    events = keystrokes(QR, "us")
    t_end = events[-1].sec + 0.01
    enter = [InputEvent(int(t_end), 0, ecodes.EV_KEY, ecodes.KEY_ENTER, 1),
             InputEvent(int(t_end), 0, ecodes.EV_KEY, ecodes.KEY_ENTER, 0)]
    hid = []
    for _ in range(n):
        decoder = KeyDecoder("us", terminator="enter")
        t = time.perf_counter()
        codes = []
        for ev in events + enter:
            codes += decoder.feed(ev)
        hid.append((time.perf_counter() - t) * 1e6)
        assert codes and codes[-1].text == QR
    frame = QR.encode() + b"\r\n"
    serial = []
    framer = Framer("line", limit=4096)
    for i in range(n):
        t = time.perf_counter()
        frames = framer.feed(frame, float(i))
        text, _ok = decode(frames[0].data)
        serial.append((time.perf_counter() - t) * 1e6)
        assert text == QR
    wire_us = len(frame) * 10 / 115200 * 1e6  # 8N1: ten bits a byte
    wedge_us = 2 * len(QR) * 1000  # a fast wedge: ~1 ms per key event, two events per character
    return [
        Figure(f"HID decoder, {len(QR)}-character QR ({len(events) + 2} key events)",
               f"p50 {pct(hid, 50):.0f} us = {pct(hid, 50) / wedge_us:.2%} of the typing time",
               "<= 1% of transport", pct(hid, 50) <= 0.01 * wedge_us),
        Figure(f"serial framing + decoding, {len(frame)}-byte frame",
               f"p50 {pct(serial, 50):.1f} us = {pct(serial, 50) / wire_us:.2%} of {wire_us / 1000:.2f} ms at 115200",
               "<= 1% of transport", pct(serial, 50) <= 0.01 * wire_us),
    ]
