"""Shared fixtures: real SQLite files, gpiozero's MockFactory, configs written to disk."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
from gpiozero import Device

from gated import config as configmod


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run the long runs (soak, kill loops, big fuzz)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "realpretix: needs the real pretix server (tests/realpretix.py); "
                                       "select with -m realpretix, leave out with -m 'not realpretix'")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that uses the real server is marked by that fact, so no test can forget its mark.
    for item in items:
        if "real_pretix" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realpretix)
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long run: pass --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reset_gpio():
    """gpiozero keeps a class-level factory and pin registry: give each test a clean one."""
    yield
    if Device.pin_factory is not None:
        Device.pin_factory.reset()
        Device.pin_factory = None


BASE = """
[lane]
name = "lane-1"
serial = "TEST-0001"

[reader.front]
type = "stdin"

[gpio]
pin_factory = "mock"

[relay]
pin = 17
pulse_seconds = 0.2

[led.green]
pin = 27
on_seconds = 0.3

[led.red]
pin = 22
on_seconds = 0.3
"""


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a config file (BASE plus extra TOML) into tmp_path; return its path."""

    def write(extra: str = "", *, base: str = BASE, name: str = "gated.toml") -> Path:
        text = textwrap.dedent(base) + "\n" + textwrap.dedent(extra)
        if "[store]" not in text:
            text += f'\n[store]\npath = "{tmp_path / "gated.db"}"\n'
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


@pytest.fixture
def load_config(write_config):
    def load(extra: str = "", **kw) -> configmod.Config:
        return configmod.load(str(write_config(extra, **kw)))

    return load


@pytest.fixture
def tickets_csv(tmp_path: Path):
    def write(rows: str) -> Path:
        path = tmp_path / "tickets.csv"
        path.write_text(textwrap.dedent(rows).lstrip())
        return path

    return write


@pytest.fixture
def shipped_config(tmp_path: Path):
    """A copy of config/ as an installer uses it: the example secrets made owner-only, as the docs
    say (git keeps them world-readable, and gated refuses such secret files); returns NAME -> path."""
    copy = tmp_path / "config"
    shutil.copytree(Path(__file__).parent.parent / "config", copy)
    for secret in (copy / "example-secrets").iterdir():
        secret.chmod(0o600)
    return lambda name: copy / name


@pytest.fixture(scope="session")
def real_pretix(tmp_path_factory):
    """One real pretix for the whole run (tests/realpretix.py): the first run on a machine installs and
    migrates it (a few minutes), later runs start it in seconds. Tests add their own orders and lists."""
    from tests.realpretix import running

    with running(tmp_path_factory.mktemp("realpretix")) as server:
        yield server


@pytest.fixture
def real_pretix_lane(real_pretix, load_config, tmp_path: Path):
    """Configs of one lane for the real server: `real_pretix_lane(list_name, name)` is paired as gate north
    and has its own store `name`.db; `paired=False` leaves it to `gated pair`; `dead=True` is the same
    lane and store finding nothing listening (the server is unreachable)."""

    def make(list_name: str = "plain", name: str = "lane", *, paired: bool = True, dead: bool = False,
             extra: str = "", event: str | None = None) -> configmod.Config:
        token = tmp_path / "device.token"
        if paired:
            token.write_text(real_pretix.device_token("north") + "\n")
            token.chmod(0o600)
        url = "http://127.0.0.1:9" if dead else real_pretix.url  # discard port: connection refused
        config = load_config(f"""
            [backend]
            type = "pretix"
            url = "{url}"
            timeout_seconds = 10.0
            [backend.pretix]
            organizer = "{real_pretix.organizer}"
            event = "{event or real_pretix.event}"
            checkin_list = {real_pretix.lists[list_name]}
            token_file = "{token if paired else ''}"
            [offline]
            fallback = "deny"
            [store]
            path = "{tmp_path / (name + '.db')}"
            {extra}
        """, name=f"{name}{'-dead' if dead else ''}.toml")
        config.lane["debounce_seconds"] = 0.0
        return config
    return make
