"""Outputs and inputs on GPIO through gpiozero: relay, LEDs, buzzer, passage and emergency contacts.

Knows nothing of tickets: it is told `admit()` or `deny()` and reports inputs through callbacks.
The relay is created in its idle (locked) state before anything else, so it never pulses on boot
or restart, and is put in its configured safe state on stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from gpiozero import LED, Buzzer, Device, DigitalInputDevice, DigitalOutputDevice
from gpiozero.exc import GPIOZeroError
from gpiozero.pins.mock import MockFactory, MockPin

from gated.config import Config
from gated.errors import DriverError

log = logging.getLogger(__name__)


class LoggingMockPin(MockPin):
    """A mock pin that logs each output change, so a bench run shows what the gate would do."""

    names: dict[int, str] = {}

    def _change_state(self, value: bool) -> bool:
        changed = super()._change_state(value)
        if changed and self._function == "output":
            name = self.names.get(self.info.name and _bcm(self.info.name), self.info.name)
            log.info("output %s (%s) %s", name, self.info.name, "on" if value else "off",
                     extra={"GATED_EVENT": "output"})
        return changed


def _bcm(pin_name: str) -> int | None:
    digits = pin_name.removeprefix("GPIO")
    return int(digits) if digits.isdigit() else None


def make_pin_factory(kind: str) -> object | None:
    """The gpiozero pin factory for `[gpio] pin_factory`; None lets gpiozero choose (auto)."""
    if kind == "mock":
        return MockFactory(pin_class=LoggingMockPin)
    if kind == "auto":
        return None
    try:
        if kind == "lgpio":
            from gpiozero.pins.lgpio import LGPIOFactory
            return LGPIOFactory()
        if kind == "rpigpio":
            from gpiozero.pins.rpigpio import RPiGPIOFactory
            return RPiGPIOFactory()
        from gpiozero.pins.native import NativeFactory
        return NativeFactory()
    except (ImportError, GPIOZeroError, OSError, RuntimeError) as e:
        raise DriverError(f'[gpio] pin_factory = "{kind}": cannot be used here: {e}') from e


class Outputs:
    """The gate's GPIO side. Methods are called from the event loop; gpiozero times the pulses."""

    def __init__(self, config: Config, pin_factory: object | None = None,
                 on_emergency: Callable[[bool], None] | None = None):
        self.config = config
        self.relay_cfg = config.relay
        self._closers: list[Device] = []
        self._hold = asyncio.Lock()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.on_emergency = on_emergency
        self.pin_factory = pin_factory or Device.pin_factory or Device._default_pin_factory()
        names = {config.relay.pin: "relay"}
        names |= {s.pin: f"led.{n}" for n, s in config.leds.items()}
        if config.buzzer:
            names[config.buzzer.pin] = "buzzer"
        LoggingMockPin.names = names
        kw = {"pin_factory": self.pin_factory}
        try:
            # Relay first, idle: initial_value=False means "not released" whatever active_high is.
            self.relay = self._own(DigitalOutputDevice(config.relay.pin, active_high=config.relay.active_high,
                                                       initial_value=False, **kw))
            self.leds = {n: (s, self._own(LED(s.pin, active_high=s.active_high, initial_value=False, **kw)))
                         for n, s in config.leds.items()}
            self.buzzer = None
            if config.buzzer:
                self.buzzer = self._own(Buzzer(config.buzzer.pin, active_high=config.buzzer.active_high,
                                               initial_value=False, **kw))
            self.passage = self._input(config.passage, kw)
            self._passed: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
            if self.passage is not None:
                self.passage.on_change(self._on_passage)
            self.emergency = self._input(config.emergency, kw)
        except (GPIOZeroError, OSError, RuntimeError) as e:
            self.close()
            raise DriverError(_gpio_hint(e)) from e
        self.emergency_active = False
        if self.emergency is not None:
            loop = asyncio.get_running_loop()

            def changed(active: bool) -> None:
                loop.call_soon_threadsafe(self._set_emergency, active)

            self.emergency.on_change(lambda: changed(True), lambda: changed(False))
            if self.emergency.is_active:
                self._set_emergency(True)

    def _own(self, device: Device) -> Device:
        self._closers.append(device)
        return device

    def _input(self, section, kw) -> Contact | None:
        if section is None:
            return None
        contact = Contact(section.pin, section.active_when, section.bounce_seconds, kw)
        self._closers.append(contact.device)
        return contact

    def describe(self) -> str:
        parts = [f"relay GPIO{self.relay_cfg.pin} ({'pulse ' + format(self.relay_cfg.pulse_seconds, 'g') + 's'}"
                 f"{', hold until passage' if self.passage else ''}, safe state {self.relay_cfg.safe_state})"]
        parts += [f"led.{n} GPIO{s.pin} ({s.shows})" for n, (s, _) in self.leds.items()]
        if self.config.buzzer:
            parts.append(f"buzzer GPIO{self.config.buzzer.pin}")
        if self.config.passage:
            parts.append(f"passage input GPIO{self.config.passage.pin}")
        if self.config.emergency:
            parts.append(f"emergency input GPIO{self.config.emergency.pin}")
        return ", ".join(parts)

    # --- inputs ----------------------------------------------------------------------------

    def _set_emergency(self, active: bool) -> None:
        if active == self.emergency_active:
            return
        self.emergency_active = active
        if active:
            log.warning("emergency input active: free passage, relay held open",
                        extra={"GATED_EVENT": "emergency", "GATED_STATE": "active"})
            self.relay.on()
        else:
            log.warning("emergency input cleared: normal operation, relay locked",
                        extra={"GATED_EVENT": "emergency", "GATED_STATE": "cleared"})
            self.relay.off()
        if self.on_emergency:
            self.on_emergency(active)

    # --- outputs ---------------------------------------------------------------------------

    # Pulses are timed on the event loop (call_later), not with gpiozero's blink(): blink starts
    # a thread per pulse and joins the previous one, about 1 ms of the scan path each, while a
    # timer costs microseconds and a new pulse simply replaces the pending switch-off.

    def _pulse(self, name: str, device: Device, seconds: float) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()
        device.on()
        self._timers[name] = asyncio.get_running_loop().call_later(seconds, self._switch_off, name, device)

    def _switch_off(self, name: str, device: Device) -> None:
        self._timers.pop(name, None)
        if name == "relay" and self.emergency_active:
            return  # the emergency holds it open
        device.off()

    def signal(self, admitted: bool) -> None:
        """LEDs and buzzer for a verdict; returns at once, the loop switches them off."""
        for name, (section, led) in self.leds.items():
            if section.shows == ("admit" if admitted else "deny"):
                self._pulse(f"led.{name}", led, section.on_seconds)
            else:
                timer = self._timers.pop(f"led.{name}", None)
                if timer is not None:
                    timer.cancel()
                led.off()
        if self.buzzer is not None:
            seconds = self.config.buzzer.admit_beep_seconds if admitted else self.config.buzzer.deny_beep_seconds
            self._pulse("buzzer", self.buzzer, seconds)

    def release(self) -> Awaitable[bool] | None:
        """Let one person through.

        Without a passage sensor the relay is pulsed now and None returned. With one, the
        returned awaitable holds the relay until the contact reports a pass (True) or the
        timeout (False): one person at a time, so a second admitted visitor waits for the first.
        """
        if self.emergency_active:
            return None  # already held open
        if self.passage is None:
            self._pulse("relay", self.relay, self.relay_cfg.pulse_seconds)
            return None
        return self._hold_for_passage()

    async def _hold_for_passage(self) -> bool:
        async with self._hold:
            loop = asyncio.get_running_loop()
            passed = asyncio.Event()
            # The callback stays installed for the life of the contact (setting None makes gpiozero
            # warn); it signals whichever hold is current.
            self._passed = (loop, passed)
            self.relay.on()
            try:
                await asyncio.wait_for(passed.wait(), self.config.passage.timeout_seconds)
                return True
            except TimeoutError:
                return False
            finally:
                self._passed = None
                if not self.emergency_active:
                    self.relay.off()

    def _on_passage(self) -> None:
        current = self._passed
        if current is not None:
            loop, event = current
            loop.call_soon_threadsafe(event.set)

    async def settle(self) -> None:
        """Wait until the longest configured pulse, light or beep has run its course."""
        times = [self.relay_cfg.pulse_seconds, *(s.on_seconds for s, _ in self.leds.values())]
        if self.config.buzzer:
            times += [self.config.buzzer.admit_beep_seconds, self.config.buzzer.deny_beep_seconds]
        await asyncio.sleep(max(times))

    def safe_state(self) -> None:
        """Outputs to their configured stop state: relay locked (fail-secure) or open (fail-safe)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for _, led in self.leds.values():
            led.off()
        if self.buzzer is not None:
            self.buzzer.off()
        if self.relay_cfg.safe_state == "open":
            self.relay.on()
        else:
            self.relay.off()

    def close(self) -> None:
        for device in reversed(self._closers):
            try:
                device.close()
            except Exception:  # noqa: BLE001 - closing must reach every pin
                log.debug("closing %r failed", device, exc_info=True)
        self._closers.clear()


class Contact:
    """A dry contact wired pin-to-ground with the internal pull-up, so closed reads low.

    `active_when = "closed"` suits a passage switch; `"open"` suits a normally-closed fire loop,
    which then also reports a cut wire as active.
    """

    def __init__(self, pin: int, active_when: str, bounce_seconds: float, kw: dict):
        self.device = DigitalInputDevice(pin, pull_up=True, bounce_time=bounce_seconds or None, **kw)
        self.closed_is_active = active_when == "closed"

    @property
    def is_active(self) -> bool:
        return self.device.is_active == self.closed_is_active

    def on_change(self, active: Callable[[], None] | None, inactive: Callable[[], None] | None = None) -> None:
        if not self.closed_is_active:
            active, inactive = inactive, active
        # Assigning None to a callback that was never set makes gpiozero warn: set only real ones.
        if active is not None or self.device.when_activated is not None:
            self.device.when_activated = active
        if inactive is not None or self.device.when_deactivated is not None:
            self.device.when_deactivated = inactive


def _gpio_hint(error: Exception) -> str:
    text = str(error) or type(error).__name__
    if "Unable to load any default pin factory" in text:
        return ('no GPIO on this machine (gpiozero found no pin factory); on a bench without hardware set '
                '[gpio] pin_factory = "mock"')
    return f"GPIO could not be set up: {text}"
