"""Time values from files and APIs: unix seconds or ISO 8601, always to unix seconds (UTC)."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_time(value: object) -> float | None:
    """Unix seconds (int, float or digits) or ISO 8601; a time without offset is taken as UTC.

    Raises ValueError for anything else, so a bad ticket list is reported, not half-read.
    """
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        pass
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def iso(ts: float) -> str:
    """A unix time as ISO 8601 with its UTC offset, as APIs want it."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
