"""Load the installer's TOML file, check every key, and report every problem at once.

The section and key names are a contract (docs/design.md): installers' files, docs and outside checks
rely on them. Defaults live in the schemas below, next to the rule each value must follow.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gated import device
from gated.errors import ConfigError
from gated.schema import Key, Section, check_table, did_you_mean, fmt

DEFAULT_PATH = "/etc/gated/gated.toml"

BACKEND_TYPES = ("entry", "cm", "tibillet", "pretix", "pretixdroid", "local")
READER_TYPES = ("hid", "serial", "nfc", "stdin")
# Backends and readers whose code ships in this version; the others are named in the contract
# but refused with a clear message rather than half-working.
AVAILABLE_BACKENDS = {
    "local": "gated.policy.local",
    "entry": "gated.policy.entry",
    "cm": "gated.policy.cm",
    "tibillet": "gated.policy.tibillet",
    "pretix": "gated.policy.pretix",
    "pretixdroid": "gated.policy.pretixdroid",
}
AVAILABLE_READERS = {"stdin": "gated.drivers.stdin", "nfc": "gated.drivers.nfc_wallet", "hid": "gated.drivers.hid",
                     "serial": "gated.drivers.serial_qr"}


LANE = {
    "name": Key("str", default=socket.gethostname(), help="the lane's name, first in every log line"),
    "serial": Key("str", default="", help="device serial sent to APIs (default: the Pi's serial)"),
    "scan_mode": Key("str", default="entry", choices=("entry", "exit")),
    "mode": Key("str", default="normal", choices=("normal", "free", "locked")),
    "debounce_seconds": Key("float", default=2.0, minimum=0, maximum=3600,
                            help="the same code on the same reader within this time is one scan"),
}

BACKEND = {
    "type": Key("str", default="local", choices=BACKEND_TYPES),
    "url": Key("url", default="", help="the ticketing API's base URL"),
    "timeout_seconds": Key("float", default=0.8, above=0, maximum=30,
                           help="online deadline; after it the offline rules decide"),
    "sync_interval_seconds": Key("float", default=300.0, above=0, maximum=86400),
    "offline_first": Key("bool", default=False, help="decide offline and only upload"),
    "ca_file": Key("path", default="", help="extra CA bundle (PEM) to trust for the API"),
    "breaker_failures": Key("int", default=2, minimum=1, maximum=100,
                            help="failures within the last breaker_window calls that open the breaker"),
    "breaker_window": Key("int", default=5, minimum=1, maximum=100),
    "probe_interval_seconds": Key("float", default=5.0, above=0, maximum=3600,
                                  help="how often an open breaker asks the API whether it is back"),
}

READER_COMMON = {
    "type": Key("str", choices=READER_TYPES, help='one of "hid", "serial", "nfc", "stdin"'),
    "prefix": Key("str", default="", help="text the scanner adds before each code, removed"),
    "suffix": Key("str", default="", help="text the scanner adds after each code, removed"),
    "strip_aim": Key("bool", default=True, help='remove AIM symbology identifiers such as "]Q1"'),
    "max_length": Key("int", default=4096, minimum=1, maximum=65536),
    "input": Key("str", default="", choices=("", "barcode", "qr", "nfc"),
                 help="what the reader reads; default by type: hid barcode, serial qr, nfc nfc"),
}

GPIO = {
    "pin_factory": Key("str", default="auto", choices=("auto", "mock", "lgpio", "rpigpio", "native")),
}
RELAY = {
    "pin": Key("pin", default=17),
    "active_high": Key("bool", default=True),
    "pulse_seconds": Key("float", default=0.2, above=0, maximum=60),
    "safe_state": Key("str", default="locked", choices=("locked", "open"),
                      help="relay state on stop: locked (fail-secure) or open (fail-safe)"),
}
LED = {
    "pin": Key("pin", help="the BCM GPIO number"),
    "active_high": Key("bool", default=True),
    "shows": Key("str", default="", choices=("", "admit", "deny"),
                 help='what lights it; default by name: green "admit", red "deny"'),
    "on_seconds": Key("float", default=1.5, above=0, maximum=60),
}
BUZZER = {
    "pin": Key("pin", help="the BCM GPIO number"),
    "active_high": Key("bool", default=True),
    "admit_beep_seconds": Key("float", default=0.1, above=0, maximum=10),
    "deny_beep_seconds": Key("float", default=0.6, above=0, maximum=10),
}
INPUT = {
    "pin": Key("pin", help="the BCM GPIO number"),
    "active_when": Key("str", default="closed", choices=("closed", "open"),
                       help="closed: active when the contact connects the pin to ground"),
    "bounce_seconds": Key("float", default=0.02, minimum=0, maximum=1),
}
PASSAGE = INPUT | {"timeout_seconds": Key("float", default=5.0, above=0, maximum=60)}
OFFLINE = {
    "fallback": Key("str", default="policy", choices=("policy", "deny", "admit")),
    "max_age_seconds": Key("float", default=86400.0, above=0, maximum=366 * 86400),
    "antipassback": Key("bool", default=True),
}
STORE = {
    "path": Key("path", default="/var/lib/gated/gated.db", must_exist=False),
    "retention_seconds": Key("float", default=30 * 86400.0, above=0, maximum=10 * 366 * 86400,
                             help="how long uploaded scans are kept for audit"),
    "on_error": Key("str", default="deny", choices=("deny", "admit"),
                    help="a scan that cannot be recorded: deny it (fail-secure) or let the decision stand"),
}
LOG = {
    "journal": Key("str", default="auto", choices=("auto", "yes", "no"),
                   help="auto: journald when started by systemd, plain stderr otherwise"),
    "debug": Key("bool", default=False),
}
# --- [metrics]: Prometheus (gated/metrics.py) ---
METRICS = {
    "textfile": Key("path", default="", must_exist=False,
                    help="file for node_exporter's textfile collector (a .prom name), rewritten atomically every "
                    "interval"),
    "listen": Key("str", default="", help='also serve /metrics over HTTP, e.g. "127.0.0.1:9464"'),
    "interval_seconds": Key("float", default=15.0, minimum=1, maximum=3600,
                            help="how often the gauges are refreshed and the textfile rewritten"),
}


def parse_listen(text: str) -> tuple[str, int]:
    """[metrics] listen `host:port` -> (host, port); ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError('must be "host:port", e.g. "127.0.0.1:9464"')
    return host.strip("[]"), int(port)


def _check_metrics(section: Section) -> list[str]:
    problems = []
    try:
        if section.get("listen"):
            parse_listen(section["listen"])
    except ValueError as e:
        problems.append(f"[metrics] listen = {fmt(section['listen'])}: {e}.")
    if section.get("textfile") and not section["textfile"].endswith(".prom"):
        problems.append(f"[metrics] textfile = {fmt(section['textfile'])}: node_exporter reads only files named "
                        "*.prom.")
    return problems


# [occupancy]: people inside across the venue's lanes and a capacity stop (gated.occupancy).
OCCUPANCY = {
    "capacity": Key("int", default=0, minimum=0, maximum=10_000_000,
                    help="people the venue may hold; at it, entry scans are denied `full`; 0: no limit"),
    "reset_at": Key("str", default="05:00", help='local time of day ("HH:MM") when the counts start again from 0'),
}


def _check_occupancy(section: Section) -> list[str]:
    from gated.occupancy import parse_reset_at

    try:
        parse_reset_at(section.get("reset_at", "05:00"))
    except ValueError as e:
        return [f"[occupancy] reset_at = {fmt(section.get('reset_at'))}: {e}."]
    return []


# [mqtt]: lane-to-lane sharing and fleet status (gated.mqtt imports parse_mqtt_url from here).
MQTT = {
    "url": Key("str", help='the broker, e.g. "mqtt://broker.local:1883" or "mqtts://broker.example.com:8883"'),
    "username": Key("str", default="", help="the lane's broker account (one per lane, for the broker's ACL)"),
    "password_file": Key("secret", default="", help="file holding the broker password (chmod 600)"),
    "ca_file": Key("path", default="", help="CA bundle (PEM) for an mqtts:// broker; default: the system's"),
    "topic_prefix": Key("str", default="", help='default "gated/<backend type>"; one prefix per venue'),
    "hmac_key_file": Key("secret", help="the venue's shared key file (the same on every lane, chmod 600)"),
    "share_admissions": Key("bool", default=True, help="publish admissions and record the other lanes'"),
    "status": Key("bool", default=True, help="publish retained lane status and an offline last will"),
    "commands": Key("bool", default=False, help="obey signed mode commands (free, locked, normal)"),
    "homeassistant_discovery": Key("bool", default=False, help="announce the lane's sensors to Home Assistant"),
    "homeassistant_prefix": Key("str", default="homeassistant", help="Home Assistant's discovery prefix"),
    "session_expiry_seconds": Key("float", default=7 * 86400.0, above=0, maximum=0xFFFFFFFF,
                                  help="how long the broker keeps queuing for a lane that is away"),
    "keepalive_seconds": Key("int", default=30, minimum=5, maximum=3600,
                             help="a lane silent for 1.5 times this is announced offline"),
    "queue_size": Key("int", default=10000, minimum=1, maximum=1_000_000,
                      help="admissions kept in memory while the broker is away; the oldest are dropped"),
}


def parse_mqtt_url(url: str) -> tuple[bool, str, int]:
    """`mqtt://host:port` or `mqtts://host:port` -> (tls, host, port); ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError('must start with "mqtt://" or "mqtts://", e.g. "mqtt://broker.local:1883"')
    if parts.username or parts.password:
        raise ValueError("must not hold credentials; use username and password_file")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError('must be only the scheme, host and port, e.g. "mqtt://broker.local:1883"')
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError("names no host")
    tls = parts.scheme == "mqtts"
    return tls, parts.hostname, port or (8883 if tls else 1883)


def _check_mqtt(section: Section) -> list[str]:
    """Rules across the [mqtt] keys, in the config's words."""
    problems = []
    url = section.get("url")
    if url is not None:
        try:
            tls, _, _ = parse_mqtt_url(url)
        except ValueError as e:
            problems.append(f"[mqtt] url = {fmt(url)}: {e}.")
        else:
            if section.get("ca_file") and not tls:
                problems.append(f'[mqtt] ca_file: only used with "mqtts://"; url is {fmt(url)}.')
    prefix = section.get("topic_prefix", "")
    if prefix and (re.search(r"[+#\x00]", prefix) or prefix.startswith("/") or prefix.endswith("/")
                   or "//" in prefix):
        problems.append(f"[mqtt] topic_prefix = {fmt(prefix)}: must be topic levels separated by \"/\", "
                        'without "+", "#" or a leading or trailing "/", e.g. "gated/stadium-north".')
    if section.get("password_file") and not section.get("username"):
        problems.append("[mqtt] password_file: set username too; the broker checks the pair.")
    return problems


WALLET_APPLE = {
    "pass_type_ids": Key("strlist", default=[], help="Apple pass type identifiers asked for, in this order"),
    "private_key_files": Key("pathlist", default=[], help="VAS reader private keys (P-256, PEM or DER)"),
    "max_age_seconds": Key("float", default=60.0, above=0, maximum=3600,
                           help="tap payloads older (or dated further ahead) than this are denied as replay"),
}
WALLET_GOOGLE = {
    "collector_id": Key("int", minimum=0, maximum=0xFFFFFFFF, help="the Smart Tap collector id, e.g. 20180608"),
    "key_version": Key("int", default=1, minimum=0, maximum=0xFFFFFFFF),
    "private_key_file": Key("secret", help="the collector's P-256 private key (PEM or DER)"),
}
WALLET = {"apple": WALLET_APPLE, "google": WALLET_GOOGLE}

# The sections that appear once, each a field of Config of the same name, checked in this order.
# Their schemas, rules and parsers live in this file, and the module that uses a section imports
# what it needs from here (gated.mqtt: parse_mqtt_url), never the other way: config imports no
# module that reads the config.
FIXED = {
    "lane": LANE,
    "buzzer": BUZZER,
    "mqtt": MQTT,
    "metrics": METRICS,
    "occupancy": OCCUPANCY,
    "gpio": GPIO,
    "relay": RELAY,
    "offline": OFFLINE,
    "store": STORE,
    "log": LOG,
}
# Fixed sections a file may leave out; their Config field is then None.
OPTIONAL = ("buzzer", "mqtt", "metrics", "occupancy")


def _check_lane(section: Section) -> list[str]:
    """The name is the first word of every log line and part of MQTT topics: one short printable word.
    The serial goes to the ticket APIs in HTTP headers (Entry's upload Filename), which carry ASCII only."""
    problems = []
    name = section.get("name")
    if isinstance(name, str) and not (0 < len(name) <= 64 and name.isprintable() and name.split() == [name]):
        problems.append(f"[lane] name = {fmt(name)}: 1 to 64 printable characters without spaces, e.g. \"north-3\" "
                        "(it is the first word of every log line).")
    serial = section.get("serial")
    if isinstance(serial, str) and serial and not (len(serial) <= 64 and serial.isascii() and serial.isprintable()):
        problems.append(f"[lane] serial = {fmt(serial)}: at most 64 printable ASCII characters, e.g. \"PI-0001\" "
                        "(it is sent to the ticket API in HTTP headers).")
    return problems


# Rules across the keys of one fixed section, like a reader module's `check`: section -> problems.
CHECKS: dict[str, Callable[[Section], list[str]]] = {
    "lane": _check_lane,
    "mqtt": _check_mqtt,
    "metrics": _check_metrics,
    "occupancy": _check_occupancy,
}
SECTIONS = sorted([*FIXED, "backend", "reader", "led", "input", "wallet"])


@dataclass
class Config:
    path: str
    lane: Section
    backend: Section
    backend_options: Section  # the [backend.TYPE] table
    readers: dict[str, Section]
    gpio: Section
    relay: Section
    leds: dict[str, Section]
    buzzer: Section | None
    passage: Section | None
    emergency: Section | None
    offline: Section
    store: Section
    log: Section
    wallet_apple: Section | None = None  # [wallet.apple]: NFC wallet keys, read by the nfc reader
    wallet_google: Section | None = None
    mqtt: Section | None = None  # [mqtt]: lane-to-lane sharing and fleet status (gated.mqtt)
    metrics: Section | None = None  # [metrics]: Prometheus textfile and/or HTTP (gated.metrics)
    occupancy: Section | None = None  # [occupancy]: people inside, capacity (gated.occupancy)
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def sections(self) -> list[Section]:
        out = [self.lane, self.backend, self.backend_options, *self.readers.values(), self.gpio,
               self.relay, *self.leds.values()]
        out += [s for s in (self.buzzer, self.passage, self.emergency) if s is not None]
        out += [s for s in (self.wallet_apple, self.wallet_google, self.mqtt, self.metrics, self.occupancy)
                if s is not None]
        return out + [self.offline, self.store, self.log]


def config_path(explicit: str | None = None) -> str:
    return explicit or os.environ.get("GATED_CONFIG") or DEFAULT_PATH


def module_schema(module: str) -> dict[str, Key]:
    return getattr(importlib.import_module(module), "SCHEMA", {})


def schemas() -> dict[str, dict[str, Key]]:
    """Every table's schema by its heading ("[reader.NAME] hid"), for checks that must cover every key."""
    out = {f"[{name}]": schema for name, schema in FIXED.items()}
    out["[backend]"] = BACKEND
    for btype, module in AVAILABLE_BACKENDS.items():
        out[f"[backend.{btype}]"] = module_schema(module)
    for rtype, module in AVAILABLE_READERS.items():
        out[f"[reader.NAME] {rtype}"] = READER_COMMON | module_schema(module)
    out["[led.NAME]"] = LED
    out["[input.passage]"] = PASSAGE
    out["[input.emergency]"] = INPUT
    out |= {f"[wallet.{name}]": schema for name, schema in WALLET.items()}
    return out


def load(path: str | None = None) -> Config:
    """Read and check a config file; raise ConfigError listing every problem."""
    path = config_path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, [f"{path}: file not found. Copy config/gated.example.toml there, "
                                 "or pass --config PATH."]) from None
    except PermissionError:
        raise ConfigError(path, [f"{path}: permission denied; run as root or a member of the "
                                 "gated group."]) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(path, [f"{path}: not valid TOML: {e}"]) from None
    return from_dict(raw, path)


def from_dict(raw: dict[str, Any], path: str) -> Config:
    """Check a parsed file section by section, then across sections; raise ConfigError listing every problem."""
    base = Path(path).resolve().parent
    problems = _unknown_sections(raw)
    lane = _lane(raw, base, problems)
    backend, options = _backend(raw, base, problems)
    readers = _readers(raw, base, problems)
    leds = _leds(raw, base, problems)
    passage, emergency = _inputs(raw, base, problems)
    wallets = _wallets(raw, base, problems)
    fixed = _fixed(raw, base, problems)
    config = Config(
        path=str(path), lane=lane, backend=backend, backend_options=options, readers=readers, leds=leds,
        passage=passage, emergency=emergency, wallet_apple=wallets.get("apple"),
        wallet_google=wallets.get("google"), raw=raw, **fixed,
    )
    _cross_check(config, problems)
    if problems:
        raise ConfigError(str(path), problems)
    return config


def _unknown_sections(raw: dict[str, Any]) -> list[str]:
    return [f"[{name}]: unknown section.{did_you_mean(name, SECTIONS)} Sections: {', '.join(SECTIONS)}."
            for name in raw if name not in SECTIONS]


def _lane(raw: dict[str, Any], base: Path, problems: list[str]) -> Section:
    lane = _section("lane", raw, base, problems)
    if not lane.get("serial"):  # absent also when the value given was refused (a problem is listed)
        lane["serial"] = device.machine_serial()
    return lane


def _fixed(raw: dict[str, Any], base: Path, problems: list[str]) -> dict[str, Section | None]:
    """The FIXED sections after [lane], by name; an OPTIONAL one the file leaves out is None."""
    return {name: _section(name, raw, base, problems) if name in raw or name not in OPTIONAL else None
            for name in FIXED if name != "lane"}


def _section(name: str, raw: dict[str, Any], base: Path, problems: list[str]) -> Section:
    """One FIXED section: its keys, then its CHECKS rules across keys."""
    section = check_table(f"[{name}]", raw.get(name, {}), FIXED[name], base, problems)
    if name in CHECKS:
        problems += CHECKS[name](section)
    return section


def _backend(raw: dict[str, Any], base: Path, problems: list[str]) -> tuple[Section, Section]:
    """[backend] and the [backend.TYPE] table of its type; a table for another type is a problem."""
    backend_raw = raw.get("backend", {})
    backend_raw = backend_raw if isinstance(backend_raw, dict) else {}
    sub = {k for k, v in backend_raw.items() if isinstance(v, dict)}
    backend = check_table("[backend]", backend_raw, BACKEND, base, problems, ignore=tuple(sub))
    btype = backend.get("type", "local")
    options = Section(f"[backend.{btype}]", {})
    for name in sub:
        if name not in BACKEND_TYPES:
            problems.append(f"[backend.{name}]: unknown backend table.{did_you_mean(name, list(BACKEND_TYPES))}")
        elif name != btype:
            problems.append(f"[backend.{name}]: [backend] type is {fmt(btype)}, so this table is unused; "
                            f"remove it or set type = {fmt(name)}.")
    if btype in AVAILABLE_BACKENDS:
        options = check_table(f"[backend.{btype}]", backend_raw.get(btype, {}),
                              module_schema(AVAILABLE_BACKENDS[btype]), base, problems)
        if btype != "local" and not backend.get("url"):
            problems.append(f'[backend] url: missing; type {fmt(btype)} needs the API\'s base URL, '
                            'e.g. "https://tickets.example.com".')
    elif btype in BACKEND_TYPES:
        problems.append(f"[backend] type = {fmt(btype)}: this version of gated has no {btype} backend yet; "
                        f"available: {', '.join(sorted(AVAILABLE_BACKENDS))}.")
    return backend, options


def _readers(raw: dict[str, Any], base: Path, problems: list[str]) -> dict[str, Section]:
    """Each [reader.NAME] against the common keys and its type's own (the type module's SCHEMA and check)."""
    readers: dict[str, Section] = {}
    for name, table in _named(raw, "reader", problems).items():
        where = f"[reader.{name}]"
        rtype = table.get("type") if isinstance(table, dict) else None
        rtype = rtype if isinstance(rtype, str) else None  # anything else is reported by check_table below
        schema = dict(READER_COMMON)
        if rtype in AVAILABLE_READERS:
            schema |= module_schema(AVAILABLE_READERS[rtype])
        elif rtype in READER_TYPES:
            problems.append(f"{where} type = {fmt(rtype)}: this version of gated has no {rtype} reader yet; "
                            f"available: {', '.join(sorted(AVAILABLE_READERS))}.")
            continue
        readers[name] = check_table(where, table, schema, base, problems)
        module = importlib.import_module(AVAILABLE_READERS[rtype]) if rtype in AVAILABLE_READERS else None
        if hasattr(module, "check"):  # the type's rules across keys, e.g. hid: device or match
            problems += module.check(readers[name])
    if not readers:
        problems.append('[reader.NAME]: no reader configured; add one, e.g. [reader.front] with type = "hid".')
    return readers


def _leds(raw: dict[str, Any], base: Path, problems: list[str]) -> dict[str, Section]:
    leds: dict[str, Section] = {}
    for name, table in _named(raw, "led", problems).items():
        led = check_table(f"[led.{name}]", table, LED, base, problems)
        if not led.get("shows"):
            default = {"green": "admit", "red": "deny"}.get(name)
            if default is None:
                problems.append(f'[led.{name}] shows: missing; say "admit" or "deny" (only [led.green] '
                                'and [led.red] have a default).')
            led["shows"] = default or "admit"
        leds[name] = led
    return leds


def _inputs(raw: dict[str, Any], base: Path, problems: list[str]) -> tuple[Section | None, Section | None]:
    """[input.passage] and [input.emergency], each None when absent."""
    inputs = _named(raw, "input", problems)
    passage = emergency = None
    for name in inputs:
        if name not in ("passage", "emergency"):
            problems.append(f"[input.{name}]: unknown input.{did_you_mean(name, ['passage', 'emergency'])} "
                            "Inputs: passage, emergency.")
    if "passage" in inputs:
        passage = check_table("[input.passage]", inputs["passage"], PASSAGE, base, problems)
    if "emergency" in inputs:
        emergency = check_table("[input.emergency]", inputs["emergency"], INPUT, base, problems)
    return passage, emergency


def _wallets(raw: dict[str, Any], base: Path, problems: list[str]) -> dict[str, Section]:
    wallets = {}
    for name, table in _named(raw, "wallet", problems).items():
        if name in WALLET:
            wallets[name] = check_table(f"[wallet.{name}]", table, WALLET[name], base, problems)
        else:
            problems.append(f"[wallet.{name}]: unknown wallet.{did_you_mean(name, list(WALLET))} "
                            "Wallets: apple, google.")
    return wallets


def _named(raw: dict[str, Any], section: str, problems: list[str]) -> dict[str, Any]:
    tables = raw.get(section, {})
    if not isinstance(tables, dict):
        problems.append(f"[{section}] must hold named tables such as [{section}.front].")
        return {}
    out = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            problems.append(f"[{section}] {name} = {fmt(table)}: expected a table [{section}.{name}] "
                            f"with its own keys, e.g. [{section}.front].")
        else:
            out[name] = table
    return out


def _cross_check(config: Config, problems: list[str]) -> None:
    used: dict[int, str] = {}
    outputs = [(config.relay.where, config.relay.get("pin"))]
    outputs += [(s.where, s.get("pin")) for s in config.leds.values()]
    outputs += [(s.where, s.get("pin")) for s in (config.buzzer, config.passage, config.emergency) if s]
    for where, pin in outputs:
        if pin is None:
            continue
        if pin in used:
            problems.append(f"{where} pin = {pin}: GPIO{pin} is already used by {used[pin]}.")
        else:
            used[pin] = where
    failures, window = config.backend.get("breaker_failures", 0), config.backend.get("breaker_window", 5)
    if failures > window:
        problems.append(f"[backend] breaker_failures = {failures}: must be at most breaker_window ({window}).")
    stdin = [n for n, r in config.readers.items() if r.get("type") == "stdin"]
    if len(stdin) > 1:
        problems.append(f"[reader.{stdin[1]}] type = \"stdin\": only one reader can read the terminal "
                        f"(already [reader.{stdin[0]}]).")


def report(error: ConfigError) -> str:
    """The text `gated check` prints and `gated run` logs for an invalid config."""
    n = len(error.problems)
    head = f"gated: {error.path} has {n} problem{'s' if n != 1 else ''}; nothing was started."
    return "\n".join([head, *(f"  {p}" for p in error.problems), "Fix the file, then run: gated check"])


def dump(config: Config) -> str:
    """The resolved config as TOML, secrets masked, for `gated check`."""
    lines = [f"# resolved from {config.path}"]
    for section in config.sections():
        lines.append("")
        lines.append(section.where)
        for key, value in section.items():
            masked = "\"***\"" if _is_secret(key) and value else fmt(value)
            lines.append(f"{key} = {masked}")
    return "\n".join(lines) + "\n"


def _is_secret(key: str) -> bool:
    return key in ("password", "token", "api_key", "secret", "key")
