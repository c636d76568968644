"""Hardware edges: readers that yield Scans and outputs that act on a Decision. No policy here."""

from __future__ import annotations

import importlib

from gated.config import AVAILABLE_READERS
from gated.drivers.base import Reader
from gated.schema import Section


def build_reader(name: str, section: Section) -> Reader:
    module = importlib.import_module(AVAILABLE_READERS[section.type])
    return module.create(name, section)
