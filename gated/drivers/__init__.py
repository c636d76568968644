"""Hardware edges: readers that yield Scans and outputs that act on a Decision. No policy here."""

from __future__ import annotations

import importlib

from gated.config import AVAILABLE_READERS, Config
from gated.drivers.base import Reader
from gated.schema import Section


def build_reader(name: str, section: Section, config: Config | None = None) -> Reader:
    module = importlib.import_module(AVAILABLE_READERS[section.type])
    if getattr(module, "NEEDS_CONFIG", False):  # the nfc reader also reads [wallet.*] and the store
        return module.create(name, section, config)
    return module.create(name, section)
