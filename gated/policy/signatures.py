"""Offline decision step: check the signature of a TiBillet QR code or a pretix `pretix_sig1` secret.

Pure functions (no I/O, no clock): the backends load the keys and apply lists and time windows.
Each result names a Reason, so that a code altered in transit (`invalid_signature`), a cut-off
code (`malformed`) and a code that is not a signed ticket at all (`unknown`) read differently in
the log. A code signed by a key gated does not hold cannot be told apart from a forged one: both
are `invalid_signature`, and the message says how many keys were tried.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gated.model import Reason

# TiBillet signs with RSA-PSS, MGF1-SHA256, the largest salt the key allows, over SHA-256 of DATA.
TIBILLET_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
ED25519_SIGNATURE_BYTES = 64


def b64decode_any(text: str) -> bytes:
    """Decode standard or URL-safe base64 whose `=` padding may have been dropped; ValueError if not base64."""
    t = text.strip().replace("-", "+").replace("_", "/")
    t += "=" * (-len(t) % 4)
    try:
        return base64.b64decode(t, validate=True)
    except binascii.Error as e:
        raise ValueError(str(e)) from None


# --- TiBillet ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TibilletCheck:
    reason: Reason  # Reason.OK when a configured key verified the code
    detail: str = ""
    uuid: str | None = None  # the ticket's identity, one per ticket whatever code text carries it
    key_index: int | None = None  # which configured key verified it


def load_rsa_public_key(pem: bytes) -> RSAPublicKey:
    """An RSA public key from PEM text; ValueError naming what was found otherwise."""
    key = load_pem_public_key(pem)
    if not isinstance(key, RSAPublicKey):
        raise ValueError(f"not an RSA public key ({type(key).__name__})")
    return key


def verify_tibillet(code: str, keys: Sequence[RSAPublicKey]) -> TibilletCheck:
    """Check a TiBillet `DATA:SIGNATURE` QR text against the events' public keys.

    The signature covers the ASCII bytes of DATA exactly as printed, so DATA is decoded only
    after the check. The split is at the last colon: DATA itself is base64 and has none.
    """
    data, sep, sig_text = code.rpartition(":")
    if not sep or not data or not sig_text:
        return TibilletCheck(Reason.MALFORMED, "not a TiBillet code (DATA:SIGNATURE expected)")
    if not keys:
        return TibilletCheck(Reason.UNKNOWN, "no event public key configured")
    try:
        signature = b64decode_any(sig_text)
        message = data.encode("ascii")
    except (ValueError, UnicodeEncodeError):
        return TibilletCheck(Reason.MALFORMED, "signature or data is not base64 text")
    sizes = sorted({k.key_size // 8 for k in keys})
    if len(signature) not in sizes:
        return TibilletCheck(Reason.MALFORMED, f"signature is {len(signature)} bytes, the event keys make "
                                               f"{'/'.join(map(str, sizes))}: the code is cut short or damaged")
    for index, key in enumerate(keys):
        if key.key_size // 8 != len(signature):
            continue
        try:
            key.verify(signature, message, TIBILLET_PSS, hashes.SHA256())
        except InvalidSignature:
            continue
        try:
            payload = json.loads(b64decode_any(data))
        except (ValueError, UnicodeDecodeError):
            return TibilletCheck(Reason.MALFORMED, "signed, but DATA is not base64 JSON", key_index=index)
        uuid = payload.get("uuid") if isinstance(payload, dict) else None
        if not isinstance(uuid, str) or not uuid:
            return TibilletCheck(Reason.MALFORMED, "signed, but DATA names no ticket uuid", key_index=index)
        return TibilletCheck(Reason.OK, uuid=uuid, key_index=index)
    return TibilletCheck(Reason.INVALID_SIGNATURE,
                         f"signature matches none of the {len(keys)} event key(s): altered, forged or another event")


# --- pretix pretix_sig1 ------------------------------------------------------------------


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


def load_sig1_keys(valid_keys: Sequence[str]) -> list[Ed25519PublicKey]:
    """The event's `valid_keys["pretix_sig1"]`: each is base64 of a PEM SubjectPublicKeyInfo."""
    keys = []
    for text in valid_keys:
        key = load_pem_public_key(base64.b64decode(text))
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"pretix_sig1 key is not Ed25519 ({type(key).__name__})")
        keys.append(key)
    return keys


def verify_sig1(secret: str, keys: Sequence[Ed25519PublicKey]) -> Sig1Check:
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
            key.verify(signature, payload)
        except InvalidSignature:
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
