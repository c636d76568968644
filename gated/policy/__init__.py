"""The decision side: one Backend per ticketing API, composed online -> offline by the Decider."""

from __future__ import annotations

import importlib

from gated.config import AVAILABLE_BACKENDS, Config
from gated.policy.base import Backend


def build_backend(config: Config) -> Backend:
    """The configured backend (config validation has already refused unknown types)."""
    module = importlib.import_module(AVAILABLE_BACKENDS[config.backend.type])
    return module.create(config)
