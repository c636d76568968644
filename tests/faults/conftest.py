"""Fixtures for the reliability tests: the fault proxy, TLS material, backend kits, and the figures they report.

Each test that measures something a skeptic would ask about (kills survived, scans lost, duplicates,
fuzz cases, the worst offline verdict time over its deadline) adds it to `figures`; the totals are
printed at the end of the run, and docs/reliability.md quotes them.
"""

from __future__ import annotations

import importlib.util
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import pytest

HERE = Path(__file__).parent


def _load(name: str) -> ModuleType:
    """The helper modules beside this file (tests/ is not a package; pytest runs in importlib mode)."""
    qualified = f"gated_faults_{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    spec.loader.exec_module(module)
    return module


faultproxy = _load("faultproxy")
backends = _load("backends")
gatedrun = _load("gatedrun")
hostile = _load("hostile")

FIGURES: dict[str, list[float]] = defaultdict(list)


@pytest.fixture(scope="session")
def figures() -> dict[str, list[float]]:
    """name -> measured values; summarised after the run."""
    return FIGURES


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001 (pytest hook)
    if not FIGURES:
        return
    terminalreporter.section("gated reliability figures")
    for name, values in sorted(FIGURES.items()):
        if name.endswith("_ms"):
            terminalreporter.write_line(f"{name}: worst {max(values):.1f} ms over {len(values)} measurements")
        else:
            terminalreporter.write_line(f"{name}: {sum(values):g}")


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory):
    return faultproxy.make_tls_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def make_proxy():
    """make_proxy(upstream_port, tls=None) -> a started FaultProxy, closed after the test."""
    made = []

    def make(port: int, tls=None, **kw):
        proxy = faultproxy.FaultProxy(port, tls=tls, **kw)
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()


@pytest.fixture
def make_kit(tmp_path):
    """make_kit(name) -> a backend kit with its simulator started, stopped after the test."""
    made = []

    def make(name: str, n_tokens: int = 3):
        kit = backends.make_kit(name, tmp_path, n_tokens)
        made.append(kit)
        return kit

    yield make
    for kit in made:
        kit.stop()


@pytest.fixture
def run_gated():
    """run_gated(config, env=None, wrap=None) -> a started `gated run` subprocess, killed after the test."""
    started = []

    def run(config, **kw):
        gated = gatedrun.GatedRun(config, **kw)
        started.append(gated)
        return gated

    yield run
    for gated in started:
        gated.kill()
