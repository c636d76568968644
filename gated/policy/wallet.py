"""Read a wallet pass off a phone: the Apple VAS and Google Smart Tap flows and their cryptography.

Pure: no I/O, no clock, no nfcpy. The NFC driver hands in `transceive` (one APDU out, response
data plus status word back) and the keys it loaded at start; this module builds every command,
parses every answer and decrypts the pass value. Protocol facts and their sources are in
shared/notes/nfc-wallet.md; the Apple key-id/KDF rules were checked against two public cryptograms.

Long because both wallet flows share the key loading and APDU plumbing, and each byte-level step is
a short pure function that reads best beside the steps before and after it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

from gated.drivers.tlv import CodecError, ndef_find, ndef_message, ndef_parse, tlv, tlv_find

Transceive = Callable[[bytes], bytes]  # command APDU -> response data + SW1 SW2

OSE_AID = b"OSE.VAS.01"
SMART_TAP_AID = bytes.fromhex("A000000476D0000111")
APPLE_EPOCH = 978307200  # 2001-01-01T00:00:00Z in unix seconds: Apple's reference date


class Outcome(StrEnum):
    """What one tap came to. Only OK carries a pass value; the rest are logged by the reader."""

    OK = "ok"
    NOT_A_WALLET = "not_a_wallet"  # no OSE.VAS.01 / Smart Tap applet: a bank card, a transit card
    NO_PASS = "no_pass"  # Apple 6A83, Google 9001: the phone has no pass for us
    LOCKED = "locked"  # Apple 6287: phone locked, Face ID / Touch ID needed; tap again unlocked
    USER_ACTION = "user_action"  # Apple 6984, Google 93xx: choose a pass on the phone, tap again
    AUTH_FAILED = "auth_failed"  # Google 95xx: the phone refused our collector key or key version
    NO_KEYS = "no_keys"  # we hold no key for this wallet
    UNKNOWN_KEY = "unknown_key"  # Apple cryptogram made for a reader key we do not hold
    WRONG_PASS_TYPE = "wrong_pass_type"  # Apple key we hold, but not one of the pass type asked for
    TAMPERED = "tampered"  # authentication tag or HMAC mismatch: altered on the way
    MALFORMED = "malformed"  # answers that do not parse
    ERROR = "error"  # any other status word


class WalletError(Exception):
    """A tap that cannot give a pass value; `outcome` says which kind, the text says why."""

    def __init__(self, outcome: Outcome, detail: str):
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


@dataclass(frozen=True)
class WalletRead:
    outcome: Outcome
    wallet: str | None = None  # "apple" | "google"
    value: str | None = None  # the pass value (Apple nfc.message, Google smartTapRedemptionValue)
    timestamp: float | None = None  # unix seconds the phone put in an Apple payload
    cryptogram: bytes = b""  # Apple: the raw cryptogram, for the reader's duplicate check
    detail: str = ""  # for the log: pass type, key id, status word; never the value


# --- keys ----------------------------------------------------------------------------------------


def load_private_key(data: bytes | str) -> ec.EllipticCurvePrivateKey:
    """A P-256 private key from PEM (SEC1 or PKCS#8), DER, base64 DER, or a raw 32-byte scalar (hex/base64).

    Entry's `nfcKeys` do not say which encoding they use, so every common one is accepted.
    Raises ValueError naming what was wrong (never the key material).
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    candidates: list[Callable[[], Any]] = []
    text = raw.strip()
    if b"-----BEGIN" in text:
        candidates.append(lambda: serialization.load_pem_private_key(text, password=None))
    else:
        candidates.append(lambda: serialization.load_der_private_key(raw, password=None))
        try:
            ascii_text = text.decode("ascii")
        except UnicodeDecodeError:
            ascii_text = ""
        if ascii_text:
            decoded: list[bytes] = []
            if len(ascii_text) == 64:
                try:
                    decoded.append(bytes.fromhex(ascii_text))
                except ValueError:
                    pass
            try:
                decoded.append(base64.b64decode(ascii_text, validate=True))
            except binascii.Error:
                pass
            for blob in decoded:
                if len(blob) == 32:
                    candidates.append(lambda b=blob: ec.derive_private_key(int.from_bytes(b, "big"), ec.SECP256R1()))
                else:
                    candidates.append(lambda b=blob: serialization.load_der_private_key(b, password=None))
    for make in candidates:
        try:
            key = make()
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("not an EC private key")
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"curve {key.curve.name}, wallets need P-256 (secp256r1)")
        return key
    raise ValueError("not a P-256 private key in PEM, DER, base64 or hex form")


def apple_key_id(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """The 4 bytes an Apple cryptogram starts with: SHA-256 of the reader public key's X coordinate.

    Computed from the key, never taken from an API's `ID` field (that names a database row).
    """
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return hashlib.sha256(public.public_numbers().x.to_bytes(32, "big")).digest()[:4]


@dataclass(frozen=True)
class AppleKey:
    key_id: bytes
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    pass_type_ids: frozenset[str]
    source: str  # a file path or "entry:nfc_keys", for log lines


@dataclass(frozen=True)
class GoogleKey:
    collector_id: int
    key_version: int
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    source: str


@dataclass(frozen=True)
class WalletKeys:
    apple: Mapping[bytes, AppleKey] = field(default_factory=dict)  # by computed key id
    pass_type_ids: tuple[str, ...] = ()  # asked for in this order
    google: tuple[GoogleKey, ...] = ()  # one NEGOTIATE per collector, in this order

    def describe(self) -> str:
        ids = ", ".join(k.hex() for k in self.apple) or "none"
        collectors = ", ".join(f"{g.collector_id} v{g.key_version}" for g in self.google) or "none"
        return (f"Apple: {len(self.pass_type_ids)} pass type(s), key id(s) {ids}; "
                f"Google collector(s): {collectors}")


def build_keys(
    *,
    apple_files: Iterable[tuple[str, bytes]] = (),
    pass_type_ids: Iterable[str] = (),
    google_file: tuple[str, bytes] | None = None,
    collector_id: int = 0,
    key_version: int = 1,
    entry: Any = None,
) -> tuple[WalletKeys, list[str]]:
    """Combine configured key files with Entry's `nfcKeys`; return the keys and one line per problem.

    Config-file Apple keys serve the configured pass type ids; each Entry key serves its own
    `passTypeId`. A key that does not load is reported and skipped; the others still work.
    """
    problems: list[str] = []
    apple: dict[bytes, AppleKey] = {}
    wanted = list(dict.fromkeys(pass_type_ids))
    google: list[GoogleKey] = []

    def add_apple(source: str, material: bytes | str, ptids: Iterable[str]) -> None:
        try:
            key = load_private_key(material)
        except ValueError as e:
            problems.append(f"{source}: {e}")
            return
        kid = apple_key_id(key)
        known = apple.get(kid)
        merged = frozenset(ptids) | (known.pass_type_ids if known else frozenset())
        apple[kid] = AppleKey(kid, key, merged, known.source if known else source)

    def add_google(source: str, material: bytes | str, collector: int, version: int) -> None:
        try:
            key = load_private_key(material)
        except ValueError as e:
            problems.append(f"{source}: {e}")
            return
        if not (0 <= collector <= 0xFFFFFFFF and 0 <= version <= 0xFFFFFFFF):
            problems.append(f"{source}: collector id and key version must fit in 4 bytes")
            return
        if all((g.collector_id, g.key_version) != (collector, version) for g in google):
            google.append(GoogleKey(collector, version, key, source))

    config_ids = frozenset(wanted)
    for source, material in apple_files:
        add_apple(source, material, config_ids)
    if google_file is not None:
        add_google(google_file[0], google_file[1], collector_id, key_version)

    nfc = entry.get("nfcKeys", entry) if isinstance(entry, dict) else None
    if isinstance(nfc, dict):
        for n, item in enumerate(nfc.get("apple") or []):
            where = f"entry:nfc_keys apple[{n}]"
            if not isinstance(item, dict) or not item.get("private_key") or not item.get("passTypeId"):
                problems.append(f"{where}: needs private_key and passTypeId")
                continue
            ptid = str(item["passTypeId"])
            if ptid not in wanted:
                wanted.append(ptid)
            add_apple(where, str(item["private_key"]), [ptid])
        for n, item in enumerate(nfc.get("google") or []):
            where = f"entry:nfc_keys google[{n}]"
            try:
                collector, version = int(item["collectorId"]), int(item.get("version") or 1)
                material = str(item["private_key"])
            except (KeyError, TypeError, ValueError):
                problems.append(f"{where}: needs private_key, a numeric collectorId and version")
                continue
            add_google(where, material, collector, version)
    return WalletKeys(apple, tuple(wanted), tuple(google)), problems


# --- shared APDU plumbing ------------------------------------------------------------------------


def apdu(cla: int, ins: int, p1: int, p2: int, data: bytes = b"", le: bool = True) -> bytes:
    """A short command APDU; Le = 00 (up to 256 bytes back) unless `le` is False."""
    if len(data) > 255:
        raise ValueError(f"command data of {len(data)} bytes needs an extended APDU")
    body = bytes([len(data)]) + data if data else b""
    return bytes([cla, ins, p1, p2]) + body + (b"\x00" if le else b"")


def _exchange(transceive: Transceive, command: bytes) -> tuple[bytes, int]:
    response = bytes(transceive(command))
    if len(response) < 2:
        raise WalletError(Outcome.MALFORMED, f"answer to {command[:2].hex().upper()} has no status word")
    return response[:-2], int.from_bytes(response[-2:], "big")


SELECT_OSE = apdu(0x00, 0xA4, 0x04, 0x00, OSE_AID)
SELECT_SMART_TAP = apdu(0x00, 0xA4, 0x04, 0x00, SMART_TAP_AID)


def read_wallet(transceive: Transceive, keys: WalletKeys) -> WalletRead:
    """Run one tap: SELECT OSE.VAS.01, then the flow of whichever wallet answered.

    Link failures (the phone left, timeouts) are the transceive callable's exceptions and pass
    through untouched: the driver knows what they mean. Everything else ends in a WalletRead.
    """
    try:
        data, sw = _exchange(transceive, SELECT_OSE)
        label = tlv_find(data, 0x6F, 0x50) if sw == 0x9000 else None
        if label == b"ApplePay":
            return read_apple(transceive, keys)
        if label == b"AndroidPay":
            return read_google(transceive, data, keys)
        if sw != 0x9000:
            # Older Google Wallet builds answer only their own AID.
            st_data, st_sw = _exchange(transceive, SELECT_SMART_TAP)
            if st_sw == 0x9000:
                return read_google(transceive, b"", keys, smart_tap_select=st_data)
            return WalletRead(Outcome.NOT_A_WALLET, detail=f"no wallet applet (SELECT answered {sw:04X})")
        shown = (label or b"").decode("ascii", "replace")[:16]
        return WalletRead(Outcome.NOT_A_WALLET, detail=f"wallet label {shown!r} is neither ApplePay nor AndroidPay")
    except WalletError as e:
        return WalletRead(e.outcome, detail=e.detail)
    except CodecError as e:
        return WalletRead(Outcome.MALFORMED, detail=str(e))


# --- Apple VAS -----------------------------------------------------------------------------------

_VAS_LABEL = b"ApplePay encrypted VAS data"
_VAS_SHARED_PREFIX = b"\x0did-aes256-GCM" + _VAS_LABEL


def get_vas_data_apdu(pass_type_id: str, more: bool = False) -> bytes:
    """GET VAS DATA for one pass type, full mode, VAS-only; `more` when another id follows this tap."""
    caps = bytes([0x00, 0x80, 0x00, 0x82 if more else 0x02])
    body = (tlv(0x9F22, b"\x01\x00") + tlv(0x9F25, hashlib.sha256(pass_type_id.encode()).digest())
            + tlv(0x9F26, caps) + tlv(0x9F2B, bytes.fromhex("0100000000")))
    return apdu(0x80, 0xCA, 0x01, 0x01, body)


@dataclass(frozen=True)
class VasPayload:
    timestamp: float  # unix seconds
    message: str
    key_id: bytes


def decrypt_vas(cryptogram: bytes, pass_type_id: str, keys: Mapping[bytes, AppleKey]) -> VasPayload:
    """Decrypt the 9F27 value: key id (4) | phone ephemeral X (32) | AES-256-GCM ciphertext + tag.

    ECDH with the reader key whose computed id matches, ANSI X9.63 KDF (SHA-256) with SharedInfo
    0x0D "id-aes256-GCM" "ApplePay encrypted VAS data" SHA-256(pass type id), zero IV. Some
    phones use the older form (SharedInfo = the label alone, the pass id hash as AAD): both are tried.
    Raises WalletError: UNKNOWN_KEY, WRONG_PASS_TYPE, TAMPERED or MALFORMED.
    """
    if len(cryptogram) < 4 + 32 + 4 + 16:
        raise WalletError(Outcome.MALFORMED, f"cryptogram of {len(cryptogram)} bytes is too short")
    key_id = bytes(cryptogram[:4])
    entry = keys.get(key_id)
    if entry is None:
        raise WalletError(Outcome.UNKNOWN_KEY, f"cryptogram for reader key {key_id.hex()}, which gated does not hold")
    if pass_type_id not in entry.pass_type_ids:
        raise WalletError(Outcome.WRONG_PASS_TYPE,
                          f"key {key_id.hex()} is not a key of pass type {pass_type_id}")
    phone_point = None
    for prefix in (b"\x02", b"\x03"):  # X alone: either Y gives the same shared X coordinate
        try:
            phone_point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(),
                                                                       prefix + bytes(cryptogram[4:36]))
            break
        except ValueError:
            continue
    if phone_point is None:
        raise WalletError(Outcome.TAMPERED, "phone key is not a point on P-256")
    shared = entry.private_key.exchange(ec.ECDH(), phone_point)
    pid_hash = hashlib.sha256(pass_type_id.encode()).digest()
    body = bytes(cryptogram[36:])
    for shared_info, aad in ((_VAS_SHARED_PREFIX + pid_hash, None), (_VAS_LABEL, pid_hash)):
        key = X963KDF(algorithm=hashes.SHA256(), length=32, sharedinfo=shared_info).derive(shared)
        try:
            plain = AESGCM(key).decrypt(bytes(16), body, aad)
        except InvalidTag:
            continue
        if len(plain) < 4:
            raise WalletError(Outcome.MALFORMED, "payload shorter than its timestamp")
        stamp = int.from_bytes(plain[:4], "big") + APPLE_EPOCH
        return VasPayload(float(stamp), plain[4:].decode("utf-8", "replace"), key_id)
    raise WalletError(Outcome.TAMPERED, f"authentication tag mismatch (key {key_id.hex()}, {pass_type_id})")


def read_apple(transceive: Transceive, keys: WalletKeys) -> WalletRead:
    """Ask an iPhone for each configured pass type in turn; stop at the first answer that is not 6A83."""
    if not keys.pass_type_ids or not keys.apple:
        return WalletRead(Outcome.NO_KEYS, "apple", detail="no Apple pass type id or reader key configured")
    ids = keys.pass_type_ids
    try:
        for n, ptid in enumerate(ids):
            data, sw = _exchange(transceive, get_vas_data_apdu(ptid, more=n < len(ids) - 1))
            if sw == 0x6A83:
                continue
            if sw == 0x6287:
                return WalletRead(Outcome.LOCKED, "apple", detail=f"{ptid}: phone locked, unlock needed (6287)")
            if sw == 0x6984:
                return WalletRead(Outcome.USER_ACTION, "apple", detail=f"{ptid}: user action needed on phone (6984)")
            if sw >> 8 not in (0x90, 0x91):
                return WalletRead(Outcome.ERROR, "apple", detail=f"{ptid}: GET VAS DATA answered {sw:04X}")
            cryptogram = tlv_find(data, 0x70, 0x9F27)
            if not cryptogram:
                return WalletRead(Outcome.MALFORMED, "apple", detail=f"{ptid}: answer has no cryptogram")
            payload = decrypt_vas(cryptogram, ptid, keys.apple)
            return WalletRead(Outcome.OK, "apple", payload.message, payload.timestamp, bytes(cryptogram),
                              detail=f"{ptid} key {payload.key_id.hex()}")
    except WalletError as e:
        return WalletRead(e.outcome, "apple", detail=e.detail)
    except CodecError as e:
        return WalletRead(Outcome.MALFORMED, "apple", detail=str(e))
    return WalletRead(Outcome.NO_PASS, "apple", detail=f"no pass of {', '.join(ids)} on the phone (6A83)")


def is_stale(timestamp: float, now: float, max_age: float) -> str | None:
    """Why an Apple payload is outside the freshness window, or None when it is inside.

    Both directions count: a payload dated in the future is what a phone with its clock set
    ahead produces for a later replay.
    """
    age = now - timestamp
    if age > max_age:
        return f"wallet payload {age:.0f}s old, freshness window {max_age:g}s"
    if age < -max_age:
        return f"wallet payload dated {-age:.0f}s ahead, freshness window {max_age:g}s"
    return None


class SeenCryptograms:
    """Cryptograms presented within the freshness window; a phone never sends the same one twice.

    Pure (times are passed in) and bounded: entries older than the window are dropped.
    """

    def __init__(self) -> None:
        self._seen: dict[bytes, float] = {}

    def check(self, cryptogram: bytes, now: float, window: float) -> bool:
        """Record `cryptogram`; True if it was already presented less than `window` seconds ago."""
        digest = hashlib.sha256(cryptogram).digest()
        self._seen = {d: t for d, t in self._seen.items() if now - t < window}
        repeat = digest in self._seen
        self._seen[digest] = now
        return repeat


# --- Google Smart Tap 2.1 ------------------------------------------------------------------------

NEGOTIATE_INS, GET_DATA_INS, GET_MORE_DATA_INS = 0x53, 0x50, 0xC0
SERVICE_TYPES = b"\x00"  # all services: event tickets, generic passes and loyalty cards alike
# POS capabilities: zlib supported + unattended + standalone; no UI, checkout or CVM; pass only.
POS_CAPABILITIES = bytes([0x40 | 0x04 | 0x01, 0x00, 0x00, 0x00, 0x01])
OBJECT_TYPES = ("et", "gr", "ly", "of", "gc", "fl", "tr", "pl")  # asv objects that carry an `n` value
MAX_INFLATED = 64 * 1024  # a pass is a few hundred bytes; refuse a zlib bomb


def compressed_point(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def smart_tap_signed_data(reader_nonce: bytes, device_nonce: bytes, collector_id: int, reader_pub: bytes) -> bytes:
    """What the collector key signs in NEGOTIATE: reader nonce | device nonce | collector id | reader key."""
    return reader_nonce + device_nonce + collector_id.to_bytes(4, "big") + reader_pub


def smart_tap_session_keys(reader_ephemeral: ec.EllipticCurvePrivateKey, device_public: bytes,
                           signed_data: bytes, signature: bytes) -> tuple[bytes, bytes]:
    """(AES-128 key, HMAC-SHA256 key) from ECDH of the two ephemeral keys and HKDF-SHA256.

    salt = the phone's ephemeral key (33 bytes compressed), info = signed data | DER signature.
    """
    try:
        point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), device_public)
    except ValueError:
        raise WalletError(Outcome.MALFORMED, "phone ephemeral key is not a point on P-256") from None
    shared = reader_ephemeral.exchange(ec.ECDH(), point)
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=device_public,
               info=signed_data + signature).derive(shared)
    return okm[:16], okm[16:]


def smart_tap_decrypt(bundle: bytes, aes_key: bytes, hmac_key: bytes) -> bytes:
    """Open a `reb` record: flag | IV (12) | AES-128-CTR ciphertext | HMAC-SHA256 (32) over IV | ciphertext."""
    if len(bundle) < 1 + 12 + 32:
        raise WalletError(Outcome.MALFORMED, f"record bundle of {len(bundle)} bytes is too short")
    flag, iv, body, mac = bundle[0], bundle[1:13], bundle[13:-32], bundle[-32:]
    if not flag & 0x01:
        raise WalletError(Outcome.MALFORMED, "record bundle is not encrypted; a live-authenticated tap must be")
    expected = hmac.new(hmac_key, iv + body, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, mac):
        raise WalletError(Outcome.TAMPERED, "record bundle HMAC mismatch")
    decryptor = Cipher(algorithms.AES(aes_key), modes.CTR(iv + bytes(4))).decryptor()
    plain = decryptor.update(body) + decryptor.finalize()
    if flag & 0x02:
        inflater = zlib.decompressobj()
        try:
            plain = inflater.decompress(plain, MAX_INFLATED)
        except zlib.error as e:
            raise WalletError(Outcome.MALFORMED, f"record bundle does not inflate: {e}") from None
        if inflater.unconsumed_tail:
            raise WalletError(Outcome.MALFORMED, f"record bundle inflates past {MAX_INFLATED} bytes")
    return plain


def smart_tap_value(plain: bytes) -> tuple[str, str] | None:
    """(object type, redemption value) of the first pass object in a decrypted bundle, or None.

    The bundle is NDEF of `asv` records, each holding NDEF of one object (`et`, `ly`, ...) whose
    `n` record is the value: a format byte, then the text.
    """
    for service in ndef_parse(plain):
        if service.name != "asv":
            continue
        for obj in ndef_parse(service.payload):
            if obj.name not in OBJECT_TYPES:
                continue
            number = ndef_find(obj.payload, "n")
            if number is not None and len(number) > 1:
                return obj.name, number[1:].decode("utf-8", "replace")
    return None


def _device_nonce(fci: bytes, smart_tap_select: bytes | None) -> bytes | None:
    if fci:
        nonce = tlv_find(fci, 0x6F, 0xC2)
        if nonce:
            return nonce
    if smart_tap_select and len(smart_tap_select) > 4:
        mdn = ndef_find(smart_tap_select[4:], "mdn")  # min version (2) | max version (2) | NDEF
        if mdn and len(mdn) == 33:
            return mdn[1:]
    return None


def _google_status(sw: int, step: str) -> WalletRead | None:
    if sw >> 8 == 0x95:
        return WalletRead(Outcome.AUTH_FAILED, "google", detail=f"{step}: phone refused our collector key ({sw:04X})")
    if sw == 0x9001:
        return WalletRead(Outcome.NO_PASS, "google", detail=f"{step}: no pass for this collector (9001)")
    if sw >> 8 == 0x93:
        return WalletRead(Outcome.USER_ACTION, "google", detail=f"{step}: user action needed on the phone ({sw:04X})")
    return None


def read_google(transceive: Transceive, fci: bytes, keys: WalletKeys, *,
                smart_tap_select: bytes | None = None) -> WalletRead:
    """Smart Tap 2.1 with each configured collector in turn: NEGOTIATE, then GET DATA (+ GET MORE DATA)."""
    if not keys.google:
        return WalletRead(Outcome.NO_KEYS, "google", detail="no Google collector key configured")
    result = WalletRead(Outcome.NO_PASS, "google")
    try:
        for n, collector in enumerate(keys.google):
            if n > 0:  # a fresh device nonce for the next collector
                fci, sw = _exchange(transceive, SELECT_OSE)
                if sw != 0x9000:
                    return result
                smart_tap_select = None
            nonce = _device_nonce(fci, smart_tap_select)
            if nonce is None:
                smart_tap_select, sw = _exchange(transceive, SELECT_SMART_TAP)
                nonce = _device_nonce(b"", smart_tap_select) if sw == 0x9000 else None
            if nonce is None:
                return WalletRead(Outcome.MALFORMED, "google", detail="phone sent no device nonce")
            result = _smart_tap_session(transceive, nonce, collector)
            if result.outcome not in (Outcome.NO_PASS, Outcome.AUTH_FAILED):
                return result
    except WalletError as e:
        return WalletRead(e.outcome, "google", detail=e.detail)
    except CodecError as e:
        return WalletRead(Outcome.MALFORMED, "google", detail=str(e))
    return result


def _smart_tap_session(transceive: Transceive, device_nonce: bytes, collector: GoogleKey) -> WalletRead:
    cid = collector.collector_id.to_bytes(4, "big")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    reader_pub = compressed_point(ephemeral)
    reader_nonce = os.urandom(32)
    signed = smart_tap_signed_data(reader_nonce, device_nonce, collector.collector_id, reader_pub)
    signature = collector.private_key.sign(signed, ec.ECDSA(hashes.SHA256()))
    session_id = os.urandom(8)
    crypto_params = (reader_nonce + b"\x01" + reader_pub + collector.key_version.to_bytes(4, "big")
                     + ndef_message(("sig", b"\x04" + signature), ("cld", b"\x04" + cid)))
    negotiate = b"\x00\x01" + ndef_message(("ses", session_id + b"\x01\x01"), ("cpr", crypto_params))
    data, sw = _exchange(transceive, apdu(0x90, NEGOTIATE_INS, 0, 0, ndef_message(("ngr", negotiate))))
    where = f"collector {collector.collector_id} v{collector.key_version}"
    if (refused := _google_status(sw, f"{where} NEGOTIATE")) is not None:
        return refused
    if sw not in (0x9000, 0x9002):
        return WalletRead(Outcome.ERROR, "google", detail=f"{where} NEGOTIATE answered {sw:04X}")
    response = ndef_find(data, "nrs")
    ses = ndef_find(response, "ses") if response else None
    device_public = ndef_find(response, "dpk") if response else None
    if not ses or len(ses) != 10 or not device_public:
        return WalletRead(Outcome.MALFORMED, "google", detail=f"{where} NEGOTIATE answer lacks ses/dpk")
    if ses[9] != 0x01:
        return WalletRead(Outcome.ERROR, "google", detail=f"{where} NEGOTIATE session status {ses[9]:02X}")
    aes_key, hmac_key = smart_tap_session_keys(ephemeral, device_public, signed, signature)

    request = b"\x00\x01" + ndef_message(
        ("ses", session_id + bytes([ses[8], 0x01])),  # the phone's sequence number comes back to it
        ("mer", ndef_message(("cld", b"\x04" + cid))),
        ("slr", ndef_message(("str", SERVICE_TYPES))),
        ("pcr", POS_CAPABILITIES),
    )
    data, sw = _exchange(transceive, apdu(0x90, GET_DATA_INS, 0, 0, ndef_message(("srq", request))))
    chunks = [data]
    for _ in range(64):  # GET MORE DATA while the phone says 9100; bounded against a looping phone
        if sw != 0x9100:
            break
        data, sw = _exchange(transceive, apdu(0x90, GET_MORE_DATA_INS, 0, 0))
        chunks.append(data)
    if (refused := _google_status(sw, f"{where} GET DATA")) is not None:
        return refused
    if sw != 0x9000:
        return WalletRead(Outcome.ERROR, "google", detail=f"{where} GET DATA answered {sw:04X}")
    service = ndef_find(b"".join(chunks), "srs")
    bundle = ndef_find(service, "reb") if service else None
    if not bundle:
        return WalletRead(Outcome.MALFORMED, "google", detail=f"{where} GET DATA answer lacks a record bundle")
    found = smart_tap_value(smart_tap_decrypt(bundle, aes_key, hmac_key))
    if found is None:
        return WalletRead(Outcome.NO_PASS, "google", detail=f"{where}: bundle holds no pass value")
    kind, value = found
    return WalletRead(Outcome.OK, "google", value, detail=f"{where} object {kind}")


# --- Apple Enhanced Contactless Polling ----------------------------------------------------------


def crc_a(data: bytes) -> bytes:
    """ISO/IEC 14443-3 CRC_A (initial 0x6363, reflected polynomial 0x8408), low byte first."""
    crc = 0x6363
    for byte in data:
        byte ^= crc & 0xFF
        byte = (byte ^ (byte << 4)) & 0xFF
        crc = (crc >> 8) ^ (byte << 8) ^ (byte << 3) ^ (byte >> 4)
    return (crc & 0xFFFF).to_bytes(2, "little")


def ecp_vas_frame(mode: int = 0x02) -> bytes:
    """Apple's ECP v1 VAS frame with its CRC: 6A 01 00 00 <mode>; mode 02 is VAS only."""
    frame = bytes([0x6A, 0x01, 0x00, 0x00, mode])
    return frame + crc_a(frame)
