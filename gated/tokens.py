"""Pure text handling for tokens: normalise what a reader delivered, redact what is logged."""

from __future__ import annotations

import hashlib
import re

from gated.logs import escape_char

DEFAULT_MAX_LENGTH = 4096

# AIM symbology identifier: "]" + code character + modifier, e.g. "]Q1" (QR), "]C0" (Code 128),
# "]E0" (EAN-13), "]d2" (Data Matrix). Scanners prepend it when told to; tickets never start so.
_AIM = re.compile(r"^\][A-Za-z][0-9A-Za-z]")
# What a scanner puts around a code: terminators (CR, LF, CRLF, TAB), the STX/ETX framing of some
# serial engines, padding. Any C0/C1 control or white space at either end is framing, not ticket.
_EDGES = "".join(map(chr, [*range(0x21), *range(0x7F, 0xA1), 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                              0x202F, 0x205F, 0x3000]))
_GS = "\x1d"
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NOT_TEXT = re.compile(r"[\ud800-\udfff\ufffd]")  # lone surrogates (undecodable bytes), U+FFFD
TRACE_LENGTH = 64


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

    The rule: remove what the scanner adds, keep what the symbol holds, refuse what no ticket is.
    - Removed: control characters and white space at either end (CR, LF, TAB terminators, STX/ETX,
      padding), an AIM identifier, then the configured prefix and suffix (AIM comes first on the
      wire, before any prefix), then the ends again.
    - GS (0x1D) inside is removed: it is the GS1 field separator (FNC1) that scanners send inside
      GS1 codes, not a character printed or typed as part of a ticket.
    - Refused: any other control character inside (NUL, ESC, DEL, C1): `DEMO-\\x000001` is not
      DEMO-0001; undecodable bytes (lone surrogates, U+FFFD), which no store or API can hold; empty
      or oversize input.
    """
    if len(text) > max_length:
        raise Malformed(f"{len(text)} characters, more than the {max_length} allowed")
    text = text.strip(_EDGES)
    if strip_aim and _AIM.match(text):
        text = text[3:]
    if prefix and text.startswith(prefix):
        text = text[len(prefix):]
    if suffix and text.endswith(suffix):
        text = text[: -len(suffix)]
    text = text.strip(_EDGES)
    if not text:
        raise Malformed("empty after removing control characters")
    if _NOT_TEXT.search(text):
        raise Malformed("contains bytes that are not valid text")
    if _GS in text:
        text = text.replace(_GS, "")
    if (bad := _CONTROL.search(text)) is not None:
        raise Malformed(f"control character U+{ord(bad.group()):04X} inside the code")
    return text


def trace(text: str) -> str:
    """What is kept of input refused as malformed: its start, as printable ASCII (escapes for the rest).

    It is stored and logged instead of the input, so it must survive any store, terminal or journal.
    """
    # Spaces escaped too: the trace stands as one word in a space-separated log line.
    return text[:TRACE_LENGTH].encode("unicode_escape").decode("ascii").replace(" ", "\\x20")


def token_hash(token: str) -> str:
    """Stable fingerprint of a token, for storage after upload and for log correlation."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def redact(token: str) -> str:
    """What a log shows of a token: at most its last 4 characters, never more than half of it.

    White space (a no-break space too) and unprintable characters in them are written as escapes
    (`\\x20`, `\\xa0`), so the token stays one word of the space-separated scan line.
    """
    keep = min(4, len(token) // 2)
    tail = token[len(token) - keep:]
    return "…" + "".join(c if c.isprintable() and not c.isspace() else escape_char(c) for c in tail) if keep else "…"


def redact_field(token: str) -> str:
    """The GATED_TOKEN journal field: the redacted tail plus a short hash to tell tickets apart."""
    return f"{redact(token)}#{token_hash(token)[:8]}"
