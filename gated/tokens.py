"""Pure text handling for tokens: normalise what a reader delivered, redact what is logged."""

from __future__ import annotations

import hashlib
import re

DEFAULT_MAX_LENGTH = 4096

# AIM symbology identifier: "]" + code character + modifier, e.g. "]Q1" (QR), "]C0" (Code 128),
# "]E0" (EAN-13), "]d2" (Data Matrix). Scanners prepend it when told to; tickets never start so.
_AIM = re.compile(r"^\][A-Za-z][0-9A-Za-z]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class Malformed(ValueError):
    """The reader delivered something that cannot be a ticket; the text says why."""


def normalise(
    text: str,
    *,
    prefix: str = "",
    suffix: str = "",
    strip_aim: bool = True,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> str:
    """Return the ticket token inside `text`, or raise Malformed.

    Order matters: AIM identifiers come first on the wire, before any configured prefix.
    Control characters are removed rather than rejected, because scanners add CR, LF, TAB
    and GS separators that are not part of the ticket; a code made only of them is empty.
    """
    if len(text) > max_length:
        raise Malformed(f"{len(text)} characters, more than the {max_length} allowed")
    if strip_aim and _AIM.match(text):
        text = text[3:]
    if prefix and text.startswith(prefix):
        text = text[len(prefix):]
    if suffix and text.endswith(suffix):
        text = text[: -len(suffix)]
    text = _CONTROL.sub("", text).strip()
    if not text:
        raise Malformed("empty after removing control characters")
    if "\ufffd" in text:
        raise Malformed("contains bytes that are not valid text")
    return text


def token_hash(token: str) -> str:
    """Stable fingerprint of a token, for storage after upload and for log correlation."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def redact(token: str) -> str:
    """What a log shows of a token: at most its last 4 characters, never more than half of it."""
    keep = min(4, len(token) // 2)
    return "…" + token[len(token) - keep:] if keep else "…"


def redact_field(token: str) -> str:
    """The GATED_TOKEN journal field: the redacted tail plus a short hash to tell tickets apart."""
    return f"{redact(token)}#{token_hash(token)[:8]}"
