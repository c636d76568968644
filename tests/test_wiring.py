"""`gated outputs test` driven without a person: gpiozero's MockFactory pins record every change,
answers to the prompts come from a list, and inputs are driven the way a contact would."""

from __future__ import annotations

import threading
import time

import pytest
from gpiozero import DigitalOutputDevice
from gpiozero.pins.mock import MockFactory, MockPin

from gated import cli
from gated.wiring import run

WIRING = """
[relay]
pin = 17
pulse_seconds = 0.05
{relay_extra}

[led.green]
pin = 27
on_seconds = 0.05

[led.red]
pin = 22
on_seconds = 0.05

[buzzer]
pin = 23
deny_beep_seconds = 0.05
{inputs}
"""
INPUTS = """
[input.passage]
pin = 24

[input.emergency]
pin = 25
active_when = "open"
"""


LANE = '[lane]\nname = "lane-1"\n[reader.front]\ntype = "stdin"\n[gpio]\npin_factory = "mock"\n'


class ClockedPin(MockPin):
    """MockPin keeps each pin's history apart; this adds one shared, ordered log across pins."""

    log: list[tuple[float, int, bool]] = []

    def _change_state(self, value: bool) -> bool:
        changed = super()._change_state(value)
        if changed:
            ClockedPin.log.append((time.monotonic(), int(self.info.name.removeprefix("GPIO")), bool(value)))
        return changed


@pytest.fixture
def factory():
    ClockedPin.log = []
    f = MockFactory(pin_class=ClockedPin)
    yield f
    f.reset()


def config_for(load_config, relay_extra: str = "", inputs: str = ""):
    """A config wired as this file says (conftest's BASE wires outputs of its own)."""
    return load_config(WIRING.format(relay_extra=relay_extra, inputs=inputs), base=LANE)


def history(factory, pin: int) -> list[bool]:
    return [bool(s.state) for s in factory.pin(pin).states]


def test_yes_pulses_relay_then_each_led_then_the_buzzer_one_at_a_time(load_config, factory):
    lines: list[str] = []
    assert run(config_for(load_config), yes=True, say=lines.append, pin_factory=factory) == 0
    for pin in (17, 27, 22, 23):
        assert history(factory, pin) == [False, True, False], pin
        held = factory.pin(pin).states[2].timestamp  # seconds since it switched on
        assert 0.04 <= held < 0.5, (pin, held)
    ons = [pin for _, pin, value in ClockedPin.log if value]
    assert ons == [17, 27, 22, 23]
    # Never two outputs on at once: each one is off before the next switches on.
    level = 0
    for _, _, value in ClockedPin.log:
        level += 1 if value else -1
        assert level in (0, 1)
    assert "[1/4] pulse the relay on GPIO17 for 0.05 s" in lines
    assert "[4/4] sound the buzzer on GPIO23 for 0.05 s" in lines
    assert lines[-1] == "Done: every output is off (relay locked)."


def test_active_low_relay_idles_high_and_pulses_low(load_config, factory):
    config = config_for(load_config, relay_extra="active_high = false")
    assert run(config, yes=True, say=lambda _: None, pin_factory=factory, seconds=0.02) == 0
    # The mock pin starts low before gpiozero claims it; from then on: idle high, released low, idle.
    assert history(factory, 17)[1:] == [True, False, True]


def test_prompts_name_the_pin_and_enter_skip_quit_do_what_they_say(load_config, factory):
    prompts: list[str] = []
    answers = iter(["", "s", "q"])

    def ask(prompt: str) -> str:
        prompts.append(prompt)
        return next(answers)

    lines: list[str] = []
    assert run(config_for(load_config), ask=ask, say=lines.append, pin_factory=factory) == 0
    assert prompts == ["[1/4] Press Enter to pulse the relay on GPIO17 for 0.05 s (s: skip, q: quit) ",
                       "[2/4] Press Enter to light the green LED (led.green) on GPIO27 for 0.05 s (s: skip, q: quit) ",
                       "[3/4] Press Enter to light the red LED (led.red) on GPIO22 for 0.05 s (s: skip, q: quit) "]
    assert history(factory, 17) == [False, True, False]
    assert history(factory, 27) == [False] and history(factory, 22) == [False] and history(factory, 23) == [False]
    assert "  led.green skipped" in lines and "  stopped: the remaining outputs were not tested" in lines


def test_closed_stdin_stops_the_test_with_every_output_off(load_config, factory):
    def ask(prompt: str) -> str:
        raise EOFError

    assert run(config_for(load_config), ask=ask, say=lambda _: None, pin_factory=factory) == 0
    assert all(history(factory, pin) == [False] for pin in (17, 27, 22, 23))


def test_inputs_print_a_line_whenever_they_change(load_config, factory):
    config = config_for(load_config, inputs=INPUTS)
    lines: list[str] = []
    changed = threading.Condition()

    def say(text: str) -> None:
        with changed:
            lines.append(text)
            changed.notify_all()

    def wait_for(text: str) -> None:
        with changed:
            assert changed.wait_for(lambda: text in lines, timeout=2), lines

    def ask(prompt: str) -> str:
        if prompt.startswith("[1/4]"):
            factory.pin(25).drive_low()  # the installer closes the fire loop
            wait_for("  input emergency GPIO25: inactive (contact closed)")
            factory.pin(24).drive_low()  # someone pushes the turnstile: the passage contact closes
            wait_for("  input passage GPIO24: ACTIVE (contact closed)")
        elif prompt.startswith("Operate"):
            factory.pin(25).drive_high()  # the fire loop opens
            wait_for("  input emergency GPIO25: ACTIVE (contact open)")
        return ""

    assert run(config, ask=ask, say=say, pin_factory=factory) == 0
    # At start: nothing wired to the pins yet, so the pull-ups read both contacts open; an open
    # fire loop is an active emergency, which is exactly what the installer must see.
    assert lines[1:3] == ["  input passage GPIO24: inactive (contact open)",
                          "  input emergency GPIO25: ACTIVE (contact open)"]
    assert lines.index("  input passage GPIO24: ACTIVE (contact closed)") < lines.index("  relay GPIO17 on")
    assert lines[-3:-1] == ["  input passage GPIO24: ACTIVE (contact closed)",
                            "  input emergency GPIO25: ACTIVE (contact open)"]


def test_pin_held_by_another_program_gives_one_line_and_exit_2(load_config, factory):
    holder = DigitalOutputDevice(17, pin_factory=factory)
    lines: list[str] = []
    try:
        assert run(config_for(load_config), yes=True, say=lines.append, pin_factory=factory) == 2
    finally:
        holder.close()
    assert len(lines) == 1 and "GPIO could not be set up" in lines[0] and "another program" in lines[0]


def test_cli_outputs_test_yes_runs_the_whole_cycle_on_the_configs_mock_pins(write_config, capsys):
    path = write_config("[buzzer]\npin = 23\n")
    assert cli.main(["outputs", "test", "--yes", "--seconds", "0.01", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[1/4] pulse the relay on GPIO17 for 0.01 s" in out and "[4/4] sound the buzzer on GPIO23" in out


def test_a_complete_test_is_recorded_for_gated_ready_and_one_with_an_output_skipped_is_not(load_config, factory):
    import json

    from gated import ready
    from gated.store import Store

    config = config_for(load_config)
    answers = iter(["", "s", "", ""])
    assert run(config, ask=lambda _: next(answers), say=lambda _: None, pin_factory=factory) == 0
    store = Store(config.store.path)
    try:
        assert store.get(ready.OUTPUTS_TESTED) is None  # led.green was skipped: not every wire is known right
        assert run(config, yes=True, say=lambda _: None, pin_factory=factory) == 0
        tested = json.loads(store.get(ready.OUTPUTS_TESTED))
    finally:
        store.close()
    assert tested["boot_id"] == ready.boot_id() and tested["at"] > time.time() - 60
