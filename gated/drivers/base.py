"""The Reader interface: an async iterator of Scans that copes with its own device coming and going."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from gated.model import InputKind
from gated.schema import Section

DEFAULT_INPUT = {"hid": InputKind.BARCODE, "serial": InputKind.QR, "nfc": InputKind.NFC,
                 "stdin": InputKind.BARCODE}


class Reader(ABC):
    """One configured reader (`[reader.NAME]`).

    `scans()` yields raw Scans (the pipeline normalises them) until cancelled. A device that
    vanishes is the reader's own business: log it once, wait, reopen; never end the iterator
    for a fault that may heal. The iterator ends only when its source ends for good (stdin EOF).
    """

    def __init__(self, name: str, section: Section):
        self.name = name
        self.section = section
        self.type: str = section.type
        self.input = InputKind(section.get("input") or DEFAULT_INPUT[self.type])

    @property
    def label(self) -> str:
        """`type:name`, as the log line shows the reader."""
        return f"{self.type}:{self.name}"

    def describe(self) -> str:
        return f"{self.name} ({self.type})"

    @abstractmethod
    def scans(self) -> AsyncIterator:
        """Yield Scan objects as they are read."""
