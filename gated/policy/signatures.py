"""Offline decision step: check the signature of a TiBillet QR code (pretix's: `pretix_sig1.py`).

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
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gated.model import Reason

# TiBillet signs with RSA-PSS, MGF1-SHA256, the largest salt the key allows, over SHA-256 of DATA.
TIBILLET_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)


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
