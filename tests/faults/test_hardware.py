"""Hardware faults: GPIO that cannot be opened at start, and an emergency input that flaps.

Readers vanishing and returning are tested where the readers are: tests/drivers/test_serial.py
(pty unplugged and back) and tests/drivers/test_hid.py (device gone, back within 2 s); decoder
fuzzing is in tests/drivers/test_keymap.py and tests/drivers/test_framing.py.

There is no GPIO on the CI machine (no GPIOLIB in its kernel), so the start-up faults are the real
ones a misconfigured or bench machine gives: lgpio, RPi.GPIO and the native factory cannot load.
The flapping input is driven through gpiozero's MockFactory pins, from another thread as a real
GPIO edge arrives, into the daemon's own outputs and decider.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from gpiozero.pins.mock import MockFactory

from gated.daemon import build
from gated.drivers.gpio import Outputs
from gated.model import Reason, Scan, Source

LOCAL = '[backend]\ntype = "local"\n[backend.local]\nmasks = ["HW-####"]\n'


@pytest.mark.parametrize(("factory", "why"), [
    ("lgpio", "No module named 'lgpio'"),
    ("rpigpio", "No module named 'RPi'"),
    ("native", "unable to locate Pi revision"),
    ("auto", "no GPIO found on this machine"),
])
def test_gpio_that_cannot_be_opened_is_one_error_line_naming_the_key_and_exit_1(write_config, run_gated, factory,
                                                                                 why):
    config = write_config(LOCAL)
    config.write_text(config.read_text().replace('pin_factory = "mock"', f'pin_factory = "{factory}"'))
    gated = run_gated(config)
    assert gated.wait_exit() == 1
    assert not any("Traceback" in line or "Warning" in line for line in gated.seen), gated.seen
    (error,) = [line for line in gated.seen if "ERROR" in line]
    assert f'ERROR: cannot start: [gpio] pin_factory = "{factory}": ' in error and why in error
    assert not any("output relay" in line for line in gated.seen)  # nothing driven


@pytest.fixture
def emergency_config(load_config):
    def make(active_when: str = "closed"):
        cfg = load_config(LOCAL + f'[input.emergency]\npin = 25\nactive_when = "{active_when}"\n')
        cfg.lane["debounce_seconds"] = 0.0
        return cfg
    return make


def _flap(pin, times: int, end_active: bool, closed_is_active: bool = True) -> None:
    """Toggle the contact `times` times as fast as Python can, ending in the given state."""
    active, inactive = (pin.drive_low, pin.drive_high) if closed_is_active else (pin.drive_high, pin.drive_low)
    for _ in range(times):
        active()
        inactive()
    if end_active:
        active()


@pytest.mark.parametrize(("active_when", "end_active"), [("closed", True), ("closed", False), ("open", True)])
def test_emergency_input_flapping_fast_ends_in_its_final_state_with_every_change_logged(
        emergency_config, caplog, active_when, end_active):
    caplog.set_level(logging.INFO, logger="gated")
    cfg = emergency_config(active_when)
    errors = []

    async def run():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        parts = await build(cfg)
        try:
            factory = parts.outputs.pin_factory
            assert isinstance(factory, MockFactory)
            pin = factory.pin(25)
            # Edges arrive on gpiozero's thread, not the event loop's: flap from another thread.
            flapper = threading.Thread(target=_flap, args=(pin, 50, end_active, active_when == "closed"))
            flapper.start()
            # The join's result comes back through the loop's queue after every change the callbacks
            # handed over (call_soon_threadsafe is first in, first out): all are applied by now.
            await asyncio.to_thread(flapper.join, 10)
            decision = await parts.gate.handle(Scan(token="NOT-A-TICKET", reader="front"))
            return parts.outputs.emergency_active, parts.decider.emergency, parts.outputs.relay.value, decision
        finally:
            await parts.close()

    outputs_active, decider_active, relay, decision = asyncio.run(run())
    assert errors == []
    assert outputs_active is end_active and decider_active is end_active
    assert relay == (1 if end_active else 0)
    if end_active:
        assert decision.admitted and decision.reason is Reason.EMERGENCY and decision.source is Source.MODE
    else:
        assert not decision.admitted and decision.reason is Reason.UNKNOWN
    lines = [r.getMessage() for r in caplog.records if getattr(r, "GATED_EVENT", "") == "emergency"]
    assert len(lines) == 100 + (1 if end_active else 0)  # every change, none lost, none doubled
    assert all(a != b for a, b in zip(lines, lines[1:], strict=False))  # active, cleared, active, ...
    assert lines[-1].startswith("emergency input active" if end_active else "emergency input cleared")


def test_outputs_close_after_flapping_leave_the_relay_in_its_safe_state(emergency_config):
    cfg = emergency_config()

    async def run():
        factory = MockFactory()
        outputs = Outputs(cfg, pin_factory=factory)
        _flap(factory.pin(25), 50, end_active=True)
        await asyncio.sleep(0)  # one loop turn runs the 101 changes queued by the callbacks
        held = outputs.relay.value
        outputs.safe_state()
        safe = factory.pin(17).state
        outputs.close()
        return held, safe

    held, safe = asyncio.run(run())
    assert held == 1 and safe == 0  # held open for the emergency, locked on stop (safe_state = "locked")
