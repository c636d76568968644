"""Helpers for the reader tests: key events typed like a scanner does, and checked reader sections."""

from __future__ import annotations

from pathlib import Path

import pytest
from evdev import InputEvent, ecodes

from gated import config as configmod
from gated.schema import Section, check_table

T0 = 1_700_000_000.0


class Typist:
    """Builds the evdev events of a scanner typing, with kernel-style timestamps `gap` apart."""

    T0 = T0

    def __init__(self, start: float = T0, gap: float = 0.004):
        self.t = start
        self.gap = gap
        self.events: list[InputEvent] = []

    def event(self, code: int | str, value: int, etype: int = ecodes.EV_KEY) -> Typist:
        code = ecodes.ecodes[code] if isinstance(code, str) else code
        sec, usec = int(self.t), int(round(self.t % 1 * 1e6)) % 1_000_000
        self.events.append(InputEvent(sec, usec, etype, code, value))
        if etype == ecodes.EV_KEY:
            self.events.append(InputEvent(sec, usec, ecodes.EV_SYN, ecodes.SYN_REPORT, 0))
        self.t += self.gap
        return self

    def tap(self, *names: str) -> Typist:
        """Press a chord: the modifiers in order, the last key down and up, modifiers released."""
        *mods, key = names
        for m in mods:
            self.event(f"KEY_{m}", 1)
        self.event(f"KEY_{key}", 1).event(f"KEY_{key}", 0)
        for m in reversed(mods):
            self.event(f"KEY_{m}", 0)
        return self

    def keys(self, *names: str) -> Typist:
        for n in names:
            self.tap(n)
        return self

    def pause(self, seconds: float) -> Typist:
        self.t += seconds
        return self


@pytest.fixture
def typist() -> Typist:
    return Typist()


@pytest.fixture
def keys() -> type[Typist]:
    """The Typist class, for tests that type more than one sequence."""
    return Typist


def _reader_section(rtype: str, **keys) -> Section:
    """A [reader.NAME] table checked by the real config code, as the daemon would get it."""
    problems: list[str] = []
    schema = dict(configmod.READER_COMMON) | configmod.module_schema(configmod.AVAILABLE_READERS[rtype])
    section = check_table("[reader.test]", {"type": rtype, **keys}, schema, Path("/"), problems)
    assert problems == [], problems
    return section


@pytest.fixture
def reader_section():
    return _reader_section
