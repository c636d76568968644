"""`gated outputs test`: pulse the relay, LEDs and buzzer one at a time and show the inputs live.

For wiring a new gate: the installer presses Enter, watches (or hears) one output switch, and
knows that wire is right before the next. Passage and emergency inputs print a line whenever they
change, all through the test. Nothing is decided or recorded; the outputs end in their idle state.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from gpiozero import LED, Buzzer, DigitalOutputDevice

from gated.config import Config
from gated.drivers.gpio import Contact, make_pin_factory
from gated.errors import DriverError

Ask = Callable[[str], str]
Say = Callable[[str], None]


@dataclass
class Step:
    """One output to switch: what the prompt calls it, its pin, and for how long."""

    name: str
    action: str  # "pulse the relay", "light the green LED (led.green)" ...
    pin: int
    seconds: float
    device: DigitalOutputDevice


def _service_running() -> bool:
    """The daemon holds the same pins: switching them behind its back would confuse both."""
    if not shutil.which("systemctl"):
        return False
    try:
        return subprocess.run(["systemctl", "is-active", "--quiet", "gated"], timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _steps(config: Config, factory: object, seconds: float | None) -> tuple[list[Step], list]:
    kw = {"pin_factory": factory}
    devices: list = []

    def own(device):
        devices.append(device)
        return device

    r = config.relay
    # Relay first and idle, as the daemon does: it must not release while the others are set up.
    steps = [Step("relay", "pulse the relay", r.pin, seconds or r.pulse_seconds,
                  own(DigitalOutputDevice(r.pin, active_high=r.active_high, initial_value=False, **kw)))]
    for name, led in config.leds.items():
        colour = f"the {name} LED (led.{name})" if name in ("green", "red") else f"led.{name}"
        steps.append(Step(f"led.{name}", f"light {colour}", led.pin, seconds or led.on_seconds,
                          own(LED(led.pin, active_high=led.active_high, initial_value=False, **kw))))
    if config.buzzer:
        b = config.buzzer
        steps.append(Step("buzzer", "sound the buzzer", b.pin, seconds or b.deny_beep_seconds,
                          own(Buzzer(b.pin, active_high=b.active_high, initial_value=False, **kw))))
    return steps, devices


def _state(contact: Contact, active_when: str) -> str:
    closed = contact.is_active == (active_when == "closed")
    return f"{'ACTIVE' if contact.is_active else 'inactive'} (contact {'closed' if closed else 'open'})"


def run(config: Config, *, yes: bool = False, ask: Ask = input, say: Say = print,
        pin_factory: object | None = None, seconds: float | None = None) -> int:
    """Cycle the outputs; returns the exit status (0 done, 2 could not start)."""
    kind = "mock" if pin_factory is not None else config.gpio.pin_factory
    if kind != "mock" and _service_running():
        say("gated.service is running and holds these pins: stop it first (systemctl stop gated), "
            "then start it again after the test.")
        return 2
    try:
        factory = pin_factory or make_pin_factory(kind)
    except DriverError as e:
        say(f"gated: {e}")
        return 2
    devices: list = []
    try:
        try:
            steps, devices = _steps(config, factory, seconds)
            inputs = []
            for name, section in (("passage", config.passage), ("emergency", config.emergency)):
                if section is not None:
                    contact = Contact(section.pin, section.active_when, section.bounce_seconds,
                                      {"pin_factory": factory})
                    devices.append(contact.device)
                    inputs.append((name, section, contact))
        except Exception as e:  # noqa: BLE001 - any pin library error: one line and a next step
            say(f"gated: GPIO could not be set up: {e or type(e).__name__}. Is another program using the "
                'pins? On a bench without GPIO set [gpio] pin_factory = "mock".')
            return 2
        say(f"Outputs test for lane {config.lane.name} ({kind} pin factory). Outputs switch one at a time; "
            "inputs print a line whenever they change.")
        for name, section, contact in inputs:
            say(f"  input {name} GPIO{section.pin}: {_state(contact, section.active_when)}")

            def changed(name=name, section=section, contact=contact) -> None:
                say(f"  input {name} GPIO{section.pin}: {_state(contact, section.active_when)}")

            contact.on_change(changed, changed)
        if not inputs:
            say("  no passage or emergency input configured")
        complete = _cycle(steps, yes, ask, say)
        if inputs and not yes:
            _ask(ask, "Operate the passage sensor and the emergency input now and watch their lines; "
                 "press Enter to finish ")
        for name, section, contact in inputs:
            say(f"  input {name} GPIO{section.pin}: {_state(contact, section.active_when)}")
        say("Done: every output is off (relay locked).")
        if complete:
            _record_tested(config, say)
        return 0
    finally:
        for device in reversed(devices):
            try:
                if hasattr(device, "off"):
                    device.off()
                device.close()
            except Exception:  # noqa: BLE001, S110 - closing must reach every pin
                pass


def _ask(ask: Ask, prompt: str) -> str:
    try:
        return ask(prompt).strip().lower()
    except EOFError:  # stdin closed: nobody is there to press Enter
        return "q"


def _record_tested(config: Config, say: Say) -> None:
    """Note the test with this boot's id in the store: `gated ready` wants the outputs tested since boot."""
    from gated import ready
    from gated.errors import StoreError
    from gated.store import Store, keep_owner

    try:
        store = Store(config.store.path)
        try:
            store.set(ready.OUTPUTS_TESTED, ready.outputs_tested(ready.boot_id(), time.time()))
        finally:
            store.close()
            keep_owner(config.store.path)
    except StoreError as e:
        say(f"  not recorded for gated ready: {e}")


def _cycle(steps: list[Step], yes: bool, ask: Ask, say: Say) -> bool:
    """Switch each output in turn; True when every one was switched (none skipped, not stopped)."""
    complete = True
    for i, step in enumerate(steps, 1):
        number, what = f"[{i}/{len(steps)}]", f"{step.action} on GPIO{step.pin} for {step.seconds:g} s"
        if yes:
            say(f"{number} {what}")
        else:
            answer = _ask(ask, f"{number} Press Enter to {what} (s: skip, q: quit) ")
            if answer.startswith("q"):
                say("  stopped: the remaining outputs were not tested")
                return False
            if answer.startswith("s"):
                say(f"  {step.name} skipped")
                complete = False
                continue
        step.device.on()
        say(f"  {step.name} GPIO{step.pin} on")
        time.sleep(step.seconds)  # the installer must see or hear it; this is the whole point
        step.device.off()
        say(f"  {step.name} GPIO{step.pin} off")
    return complete
