"""Declarative config keys: type, default, rule and help, checked with every problem collected.

Each section's schema is a dict of key name -> Key. Drivers and backends declare the keys of their
own tables (`[reader.NAME]` by type, `[backend.TYPE]`) in a `SCHEMA` dict beside their code.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED = object()


@dataclass(frozen=True)
class Key:
    kind: str  # str | int | float | bool | strlist | path | pathlist | pin | url | secret
    default: Any = REQUIRED
    help: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None  # inclusive
    above: float | None = None  # exclusive
    maximum: float | None = None
    must_exist: bool = True  # path kinds: the file must exist
    secret: bool = False  # masked when the resolved config is printed


class Section(dict):
    """A checked table: dict access plus attribute access, and the `[where]` it came from."""

    def __init__(self, where: str, values: dict[str, Any]):
        super().__init__(values)
        self.where = where

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{self.where} has no key {name!r}") from None

    def __reduce__(self) -> tuple:
        # Pickled whole for the child process that reloads a ticket list (gated.reload);
        # without this, unpickling asks __getattr__ for `where` before it exists.
        return (Section, (self.where, dict(self)))


def fmt(value: Any) -> str:
    """A value as the installer would have typed it in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {fmt(v)}" for k, v in value.items()) + " }"
    return str(value)


def did_you_mean(word: str, candidates: list[str]) -> str:
    best = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f' Did you mean "{best[0]}"?' if best else ""


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _number_rule(key: Key) -> str:
    parts = []
    if key.minimum is not None:
        parts.append(f"at least {_number(key.minimum)}")
    if key.above is not None:
        parts.append(f"above {_number(key.above)}")
    if key.maximum is not None:
        parts.append(f"at most {_number(key.maximum)}")
    return " and ".join(parts) or "a finite number"


def check_value(key: Key, value: Any, base_dir: Path) -> tuple[Any, str | None]:
    """Return (converted value, None) or (None, "what is allowed")."""
    kind = key.kind
    if kind in ("str", "url", "path", "secret"):
        if not isinstance(value, str):
            return None, "must be a text in quotes"
        if key.choices and value not in key.choices:
            allowed = ", ".join(f'"{c}"' for c in key.choices)
            return None, f"must be one of {allowed}.{did_you_mean(value, list(key.choices))}"
        if kind == "url" and value and not value.startswith(("https://", "http://")):
            return None, 'must start with "https://" (or "http://" for a local test server)'
        if kind == "secret" and value:
            from gated.secrets import find_credential

            path = _resolve(value, base_dir)
            if not path.exists() and find_credential(value) is None:
                return None, f"file not found: {path} (nor a systemd credential of that name)"
            return str(path), None
        if kind == "path" and value:
            path = _resolve(value, base_dir)
            if key.must_exist and not path.exists():
                return None, f"file not found: {path}"
            return str(path), None
        return value, None
    if kind == "bool":
        if not isinstance(value, bool):
            return None, "must be true or false (no quotes)"
        return value, None
    if kind in ("int", "float", "pin"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None, "must be a number" + (_unit_hint(value) if isinstance(value, str) else "")
        if kind in ("int", "pin") and not isinstance(value, int):
            return None, "must be a whole number"
        if kind == "pin" and not 0 <= value <= 27:
            return None, "must be a BCM GPIO number from 0 to 27"
        # TOML has nan and inf. Every comparison with nan is false, so it would pass the range
        # test below and then hold a relay or a deadline for an arbitrary time.
        bad = (
            (isinstance(value, float) and not math.isfinite(value))
            or (key.minimum is not None and value < key.minimum)
            or (key.above is not None and value <= key.above)
            or (key.maximum is not None and value > key.maximum)
        )
        if bad:
            return None, f"must be {_number_rule(key)}"
        return (float(value) if kind == "float" else value), None
    if kind in ("strlist", "pathlist"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None, 'must be a list of texts, e.g. ["a", "b"]'
        if kind == "pathlist":
            out = []
            for v in value:
                path = _resolve(v, base_dir)
                if key.must_exist and not path.exists():
                    return None, f"file not found: {path}"
                out.append(str(path))
            return out, None
        return list(value), None
    raise AssertionError(f"unknown key kind {kind}")


def _unit_hint(text: str) -> str:
    """ESPHome-style help for a duration typed with a unit: "2s" -> 2.0, "500ms" -> 0.5."""
    t = text.strip().lower()
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("sec", 1.0), ("seconds", 1.0)):
        number = t.removesuffix(unit).strip()
        if number != t:
            try:
                return f" (no quotes); durations are seconds: did you mean {float(number) * factor:g}?"
            except ValueError:
                break
    return " (no quotes)"


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?")) else text + "."


def _resolve(value: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base_dir / path)


def check_table(
    where: str,
    table: Any,
    schema: dict[str, Key],
    base_dir: Path,
    problems: list[str],
    ignore: tuple[str, ...] = (),
) -> Section:
    """Check one TOML table against its schema; append every problem; return what is usable."""
    values: dict[str, Any] = {}
    if not isinstance(table, dict):
        problems.append(f"{where} must be a table (a [section] heading), not {fmt(table)}")
        table = {}
    for name, value in table.items():
        if name in ignore:
            continue
        key = schema.get(name)
        if key is None:
            allowed = ", ".join(sorted(schema)) or "none"
            problems.append(
                f"{where} {name}: unknown key.{did_you_mean(name, list(schema))} Allowed: {allowed}."
            )
            continue
        converted, rule = check_value(key, value, base_dir)
        if rule:
            problems.append(f"{where} {name} = {fmt(value)}: {_sentence(rule)}")
        else:
            values[name] = converted
    for name, key in schema.items():
        if name in values or name in table:
            continue
        if key.default is REQUIRED:
            problems.append(f"{where} {name}: missing; {key.help or 'this key is required'}.")
        else:
            values[name] = key.default
    return Section(where, values)
