"""Offline decision step: check a pretix `pretix_sig1` signed secret and read its ticket.

Pure functions (no I/O, no clock): the pretix backend loads the event's keys and applies lists and
time windows. A code altered in transit is `invalid_signature`, a cut-off one `malformed`, pretix's
random secrets `unknown` (they are found in the downloaded list instead).

Ed25519 through PyNaCl (libsodium), not cryptography: on a pretix lane it is the only cryptography
gated needs, and importing cryptography's bindings costs 6-7 MB of RSS against 1 MB (the daemon's
budget is 50 MB; benchmarks/README.md, "Where a pretix lane's memory goes").
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from gated.model import Reason

ED25519_SIGNATURE_BYTES = 64
# RFC 8410: the DER of an Ed25519 SubjectPublicKeyInfo is this fixed prefix and the 32-byte key.
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
PEM_HEADER, PEM_FOOTER = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"


@dataclass(frozen=True)
class Sig1Ticket:
    """The signed payload (protobuf `Ticket` of pretix_sig1.proto); 0 means "none" as in proto3.

    pretix writes both validity fields on every ticket, 0 when there is no window: 0 is "no limit",
    never 1970-01-01 (read as a date, it would deny every signed ticket offline as expired).
    """

    seed: str
    item: int
    variation: int = 0
    subevent: int = 0
    valid_from: int | None = None  # unix seconds
    valid_until: int | None = None


@dataclass(frozen=True)
class Sig1Check:
    reason: Reason
    detail: str = ""
    ticket: Sig1Ticket | None = None
    key_index: int | None = None


def load_sig1_keys(valid_keys: Sequence[str]) -> list[VerifyKey]:
    """The event's `valid_keys["pretix_sig1"]`: each is base64 of a PEM SubjectPublicKeyInfo.

    ValueError naming what is wrong with a key that is not an Ed25519 public key in that form.
    """
    return [_sig1_key(text) for text in valid_keys]


def _sig1_key(text: str) -> VerifyKey:
    if not isinstance(text, str):
        raise ValueError(f"pretix_sig1 key is not text ({type(text).__name__})")
    try:
        pem = base64.b64decode(text, validate=True).decode("ascii")
    except (binascii.Error, ValueError):
        raise ValueError("pretix_sig1 key is not base64 of PEM text") from None
    lines = [line.strip() for line in pem.strip().splitlines()]
    if len(lines) < 3 or lines[0] != PEM_HEADER or lines[-1] != PEM_FOOTER:
        raise ValueError("pretix_sig1 key is not a PEM public key")
    try:
        der = base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("pretix_sig1 key's PEM body is not base64") from None
    if len(der) != len(ED25519_SPKI_PREFIX) + 32 or not der.startswith(ED25519_SPKI_PREFIX):
        raise ValueError(f"pretix_sig1 key is not Ed25519 ({len(der)}-byte public key of another kind)")
    return VerifyKey(der[len(ED25519_SPKI_PREFIX):])


def verify_sig1(secret: str, keys: Sequence[VerifyKey]) -> Sig1Check:
    """Check a pretix signed secret: reversed base64 of 0x01, len(payload), len(sig), payload, Ed25519 sig."""
    try:
        raw = base64.b64decode(secret.strip()[::-1], validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not raw or raw[0] != 0x01:
        return Sig1Check(Reason.UNKNOWN, "not a pretix_sig1 signed secret, so it cannot be checked offline")
    if len(raw) < 5:
        return Sig1Check(Reason.MALFORMED, "signed secret cut short before its length fields")
    payload_len, sig_len = struct.unpack(">HH", raw[1:5])
    if len(raw) != 5 + payload_len + sig_len:
        return Sig1Check(Reason.MALFORMED, f"signed secret is {len(raw)} bytes but says {5 + payload_len + sig_len}: "
                                           "cut short or damaged")
    if sig_len != ED25519_SIGNATURE_BYTES:
        return Sig1Check(Reason.MALFORMED, f"signature is {sig_len} bytes, Ed25519 makes 64")
    if not keys:
        return Sig1Check(Reason.UNKNOWN, "no pretix_sig1 key downloaded for this event")
    payload, signature = raw[5:5 + payload_len], raw[5 + payload_len:]
    for index, key in enumerate(keys):
        try:
            key.verify(payload, signature)
        except BadSignatureError:
            continue
        try:
            return Sig1Check(Reason.OK, ticket=decode_ticket(payload), key_index=index)
        except ValueError as e:
            return Sig1Check(Reason.MALFORMED, f"signed, but the payload is not a Ticket: {e}", key_index=index)
    return Sig1Check(Reason.INVALID_SIGNATURE,
                     f"signature matches none of the {len(keys)} event key(s): altered, forged or another event")


def decode_ticket(payload: bytes) -> Sig1Ticket:
    """Parse the protobuf `Ticket` message by hand (six scalar fields; unknown fields skipped)."""
    fields: dict[int, int | bytes] = {}
    pos = 0
    while pos < len(payload):
        key, pos = _varint(payload, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(payload, pos)
            fields[number] = value
        elif wire == 2:
            length, pos = _varint(payload, pos)
            if pos + length > len(payload):
                raise ValueError("field runs past the end")
            fields[number] = payload[pos:pos + length]
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > len(payload):
                raise ValueError("field runs past the end")
        else:
            raise ValueError(f"unsupported wire type {wire}")
    seed = fields.get(1, b"")
    if not isinstance(seed, bytes):
        raise ValueError("seed is not a string")
    ints = {}
    for number in (2, 3, 4, 5, 6):
        value = fields.get(number)
        if isinstance(value, bytes):
            raise ValueError(f"field {number} is not an integer")
        ints[number] = None if value is None else (value - (1 << 64) if value >= 1 << 63 else value)
    return Sig1Ticket(seed=seed.decode("utf-8"), item=ints[2] or 0, variation=ints[3] or 0,
                      subevent=ints[4] or 0, valid_from=ints[5] or None, valid_until=ints[6] or None)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
