"""Pure codecs for what wallet phones send: BER-TLV (Apple VAS, FCI) and nested NDEF (Google Smart Tap).

No I/O. BER-TLV is written here (multi-byte tags, long lengths, constructed tags); NDEF framing
(short/long records, ids, chunking) is ndeflib's, which nfcpy already depends on.
"""

from __future__ import annotations

from dataclasses import dataclass

import ndef


class CodecError(ValueError):
    """Bytes that are not valid BER-TLV or NDEF; the text says where it broke."""


# --- BER-TLV -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tlv:
    tag: int  # the tag bytes as one big-endian integer, e.g. 0x9F27
    value: bytes

    @property
    def constructed(self) -> bool:
        """Bit 6 of the first tag byte: the value is itself a TLV list (6F, 70, A5, BF0C ...)."""
        first = self.tag
        while first > 0xFF:
            first >>= 8
        return bool(first & 0x20)


def tlv_parse(data: bytes) -> list[Tlv]:
    """Split `data` into top-level TLVs. Padding bytes 00 and FF between objects are skipped."""
    out, i, n = [], 0, len(data)
    while i < n:
        if data[i] in (0x00, 0xFF):  # ISO 7816-4 allows them before, between and after objects
            i += 1
            continue
        start = i
        tag = data[i]
        i += 1
        if tag & 0x1F == 0x1F:  # multi-byte tag: continue while bit 8 is set
            while True:
                if i >= n:
                    raise CodecError(f"tag at offset {start} runs past the end")
                tag = tag << 8 | data[i]
                i += 1
                if not data[i - 1] & 0x80:
                    break
        if i >= n:
            raise CodecError(f"tag {tag:X} at offset {start} has no length")
        length = data[i]
        i += 1
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 3 or i + count > n:
                raise CodecError(f"tag {tag:X} at offset {start} has a bad length field")
            length = int.from_bytes(data[i:i + count], "big")
            i += count
        if i + length > n:
            raise CodecError(f"tag {tag:X} at offset {start} says {length} bytes, {n - i} left")
        out.append(Tlv(tag, bytes(data[i:i + length])))
        i += length
    return out


def tlv_find(data: bytes, *path: int) -> bytes | None:
    """The value at `path` (e.g. 0x6F, 0x50), descending into constructed tags; None if absent."""
    items = tlv_parse(data)
    for depth, tag in enumerate(path):
        found = next((t for t in items if t.tag == tag), None)
        if found is None:
            return None
        if depth == len(path) - 1:
            return found.value
        items = tlv_parse(found.value)
    return None


def tlv(tag: int, value: bytes) -> bytes:
    """Encode one TLV (definite length, short or long form)."""
    tag_bytes = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    else:
        body = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(body)]) + body
    return tag_bytes + length + bytes(value)


# --- NDEF (Smart Tap flavour) --------------------------------------------------------------------

_EXT = "urn:nfc:ext:"


@dataclass(frozen=True)
class NdefRecord:
    name: str  # the Smart Tap record name: the type for external records, the id for well-known ones
    payload: bytes


def ndef_parse(data: bytes) -> list[NdefRecord]:
    """Decode an NDEF message; each record is named the way Smart Tap names it.

    Smart Tap puts its short names ("ses", "n", "cpl") in the record type for TNF 4 (external)
    and in the record id for TNF 1 (well-known text/URI), so both places are looked at.
    """
    try:
        records = list(ndef.message_decoder(bytes(data), known_types={}))
    except (ndef.DecodeError, ValueError, TypeError) as e:
        raise CodecError(f"not an NDEF message: {e}") from None
    out = []
    for r in records:
        name = r.type[len(_EXT):] if r.type.startswith(_EXT) else (r.name or r.type)
        out.append(NdefRecord(name, bytes(r.data)))
    return out


def ndef_find(data: bytes, name: str) -> bytes | None:
    """The payload of the first record called `name` in an NDEF message, or None."""
    return next((r.payload for r in ndef_parse(data) if r.name == name), None)


def ndef_message(*records: tuple[str, bytes]) -> bytes:
    """Encode (name, payload) pairs as external-type (TNF 4) records, the form Smart Tap readers send."""
    try:
        return b"".join(ndef.message_encoder(ndef.Record(_EXT + name, "", bytes(payload))
                                             for name, payload in records))
    except (ndef.EncodeError, ValueError) as e:
        raise CodecError(f"cannot encode NDEF: {e}") from None
