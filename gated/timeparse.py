"""Time values from files and APIs: unix seconds or ISO 8601, always to unix seconds (UTC)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, tzinfo

# The times a datetime can print (years 1 to 9999): a value outside is no real time, and would
# fail later where it is shown (`iso`), far from where it came in.
EARLIEST = datetime(1, 1, 2, tzinfo=UTC).timestamp()
LATEST = datetime(9999, 12, 30, tzinfo=UTC).timestamp()
_LONGEST = 64  # characters: the longest ISO 8601 text is about 40


def parse_time(value: object, naive: tzinfo | None = UTC) -> float | None:
    """Unix seconds (int, float or digits) or ISO 8601 -> unix seconds; None for None or "".

    A time without offset is taken in `naive` (None: the gate's local time). Total: any other
    value (wrong type, nan, 10**400, year 10000, 1 MB of text) raises ValueError and nothing
    else, so callers that catch ValueError hold for whatever a server or a file sends.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        seconds = _number(value)
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > _LONGEST:
            raise ValueError(f"not a time: {len(text)} characters")
        try:
            seconds = float(text)  # "nan", "inf" and "1e999" come out non-finite: refused below
        except ValueError:
            seconds = _iso(text, naive)
    else:
        raise ValueError(f"not a time: a {type(value).__name__}")
    if not math.isfinite(seconds) or not EARLIEST <= seconds <= LATEST:
        raise ValueError(f"not a time: {str(value)[:40]} is out of range")
    return seconds


def _number(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond a float's range
        raise ValueError("not a time: number out of range") from None


def _iso(text: str, naive: tzinfo | None) -> float:
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)  # ValueError for anything else
    try:
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=naive) if naive is not None else moment.astimezone()
        return moment.timestamp()
    except (OverflowError, OSError):  # year 1 or 9999 shifted by an offset past the calendar's ends
        raise ValueError(f"not a time: {text} is out of range") from None


def iso(ts: float) -> str:
    """A unix time as ISO 8601 with its UTC offset, as APIs want it."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
