"""Values taken from an API's answer: checked for type and range, and cut to size, where they enter.

Each backend reads the fields it uses through these, so a value of the wrong type (TiBillet's uuid
as a number), out of SQLite's range (an event id of 2**64) or of absurd length never reaches the
store or a log line. A wrong type means the answer is not in the API's documented shape: the call
failed (`Unreachable`, decide offline), it is not a verdict.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from gated.errors import Unreachable
from gated.timeparse import EARLIEST, LATEST

TEXT_LIMIT = 300  # names and messages from servers: enough for any real one, short enough for a log line
ID_LIMIT = 200  # ids and codes (uuids, event ids, reason codes)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what an SQLite INTEGER holds

LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def cut(value: str, limit: int = TEXT_LIMIT) -> str:
    """`value` without lone surrogates (they cannot be encoded) and at most `limit` characters."""
    value = LONE_SURROGATE.sub("\ufffd", value)
    return value if len(value) <= limit else value[:limit - 1] + "…"


def text(value: Any, what: str, *, limit: int = TEXT_LIMIT) -> str:
    """A text field: a string (cut to `limit`), or "" when absent or null; anything else fails the call."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Unreachable(f"{what} is a {type(value).__name__}, not text")
    return cut(value, limit)


def integer(value: Any, what: str, *, low: int = INT64_MIN, high: int = INT64_MAX) -> int | None:
    """An integer field within [low, high], or None when absent or null; anything else fails the call."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise Unreachable(f"{what} is a {type(value).__name__}, not an integer")
    if not low <= value <= high:
        raise Unreachable(f"{what} is out of range")
    return value


def ident(value: Any, what: str) -> str | None:
    """An identifier sent as text or as an integer (APIs do both), as text; None when absent or empty."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(integer(value, what))
    found = text(value, what, limit=ID_LIMIT)
    return found or None


def mapping(value: Any, what: str) -> dict[str, Any]:
    """An object field: a dict, or {} when absent or null; anything else fails the call."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Unreachable(f"{what} is a {type(value).__name__}, not an object")
    return value


_JWT_TIMES = ("exp", "iat", "nbf")


def jwt_claims(token: Any) -> dict[str, Any] | None:
    """The claims of a JWT, unverified (each API checks its own tokens; gated only reads them);
    None when `token` is not a JWT whose payload is a JSON object. Callers say what that means.

    A time claim (exp, iat, nbf) that is not a finite number of unix seconds from year 1 to 9999 is
    left out, as if absent: callers add and print them (10**400, NaN, true are no times)."""
    if not isinstance(token, str):
        return None
    try:
        part = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    except (IndexError, ValueError, RecursionError):  # bad base64 and bad UTF-8 are ValueErrors too
        return None
    if not isinstance(claims, dict):
        return None
    for key in _JWT_TIMES:
        value = claims.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not EARLIEST <= value <= LATEST):  # also NaN: no comparison holds
            del claims[key]
    return claims
