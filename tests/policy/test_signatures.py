"""Offline signature checks: real keys, codes made the way TiBillet and pretix make them."""

from __future__ import annotations

import base64
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from gated.model import Reason
from gated.policy.pretix_sig1 import decode_ticket, load_sig1_keys, verify_sig1
from gated.policy.signatures import b64decode_any, load_rsa_public_key, verify_tibillet
from gated.simulators.pretix import encode_ticket, make_sig1_secret, sig1_public_key, sign_secret
from gated.simulators.tibillet import make_code, public_pem

UUID = "12345678-1234-5678-1234-567812345678"


@pytest.fixture(scope="module")
def rsa_keys():
    """Two RSA-2048 event keys, made once: keygen is the slow part of this file."""
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


@pytest.fixture(scope="module")
def ed_keys():
    return [Ed25519PrivateKey.generate() for _ in range(2)]


def sig1_keys(key: Ed25519PrivateKey) -> list:
    """The key as gated reads it from pretix's `valid_keys`."""
    return load_sig1_keys([sig1_public_key(key)])


def _flip(text: str, at: int) -> str:
    """The same text with one base64 character changed (never in the padding bits)."""
    c = text[at]
    return text[:at] + ("B" if c != "B" else "C") + text[at + 1:]


# --- TiBillet ---------------------------------------------------------------------------------


def test_code_made_like_tibillet_verifies_and_names_the_ticket_uuid(rsa_keys):
    code = make_code(rsa_keys[0], UUID)
    check = verify_tibillet(code, [rsa_keys[0].public_key()])
    assert check.reason is Reason.OK and check.uuid == UUID and check.key_index == 0


def test_code_printed_without_base64_padding_still_verifies(rsa_keys):
    code = make_code(rsa_keys[0], UUID, padding=False)
    assert "=" not in code
    assert verify_tibillet(code, [rsa_keys[0].public_key()]).uuid == UUID


def test_the_second_event_key_verifies_its_own_event(rsa_keys):
    check = verify_tibillet(make_code(rsa_keys[1], UUID), [k.public_key() for k in rsa_keys])
    assert check.reason is Reason.OK and check.key_index == 1


@pytest.mark.parametrize("part", ["data", "signature"])
def test_one_changed_character_is_an_invalid_signature(rsa_keys, part):
    data, sig = make_code(rsa_keys[0], UUID).split(":")
    code = f"{_flip(data, 10)}:{sig}" if part == "data" else f"{data}:{_flip(sig, 100)}"
    assert verify_tibillet(code, [rsa_keys[0].public_key()]).reason is Reason.INVALID_SIGNATURE


def test_truncated_signature_is_malformed_and_says_the_code_is_cut_short(rsa_keys):
    code = make_code(rsa_keys[0], UUID)
    check = verify_tibillet(code[:-20], [rsa_keys[0].public_key()])
    assert check.reason is Reason.MALFORMED and "cut short" in check.detail


def test_code_signed_by_a_key_not_configured_is_an_invalid_signature(rsa_keys):
    check = verify_tibillet(make_code(rsa_keys[1], UUID), [rsa_keys[0].public_key()])
    assert check.reason is Reason.INVALID_SIGNATURE and "1 event key" in check.detail


def test_pkcs1_v15_signature_of_an_offline_prototype_is_refused(rsa_keys):
    data = make_code(rsa_keys[0], UUID).split(":")[0]
    sig = rsa_keys[0].sign(data.encode(), padding.PKCS1v15(), hashes.SHA256())
    code = f"{data}:{base64.urlsafe_b64encode(sig).decode()}"
    assert verify_tibillet(code, [rsa_keys[0].public_key()]).reason is Reason.INVALID_SIGNATURE


@pytest.mark.parametrize("text", ["no-colon-here", ":abc", "abc:", "eyJ1dWlkIjoiMSJ9:***not base64***"])
def test_text_that_is_not_a_tibillet_code_is_malformed(rsa_keys, text):
    assert verify_tibillet(text, [rsa_keys[0].public_key()]).reason is Reason.MALFORMED


def test_signed_data_without_a_uuid_is_malformed(rsa_keys):
    data = base64.urlsafe_b64encode(b'{"ticket": 1}').decode()
    sig = rsa_keys[0].sign(data.encode(), padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH),
                           hashes.SHA256())
    check = verify_tibillet(f"{data}:{base64.urlsafe_b64encode(sig).decode()}", [rsa_keys[0].public_key()])
    assert check.reason is Reason.MALFORMED and "uuid" in check.detail


def test_only_rsa_public_keys_load(rsa_keys, ed_keys):
    assert load_rsa_public_key(public_pem(rsa_keys[0])).key_size == 2048
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    ed_pem = ed_keys[0].public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ValueError, match="not an RSA public key"):
        load_rsa_public_key(ed_pem)


def test_base64_in_either_alphabet_with_or_without_padding():
    raw = bytes(range(250, 256)) + b"\xfb\xff"
    for text in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("=")):
        assert b64decode_any(text) == raw
    with pytest.raises(ValueError):
        b64decode_any("a!b?")


# --- pretix_sig1 -----------------------------------------------------------------------------


def test_signed_secret_made_like_pretix_verifies_and_decodes_its_payload(ed_keys):
    secret = make_sig1_secret(ed_keys[0], 42, 7, 3, valid_from=1767225600, valid_until=1767312000, seed="abc")
    check = verify_sig1(secret, load_sig1_keys([sig1_public_key(ed_keys[0])]))
    assert check.reason is Reason.OK
    t = check.ticket
    assert (t.seed, t.item, t.variation, t.subevent, t.valid_from, t.valid_until) == \
        ("abc", 42, 7, 3, 1767225600, 1767312000)


def test_zero_validity_as_real_pretix_writes_it_means_no_limit(ed_keys):
    payload = encode_ticket("abc", 42)
    assert payload.endswith(bytes.fromhex("28003000"))  # both fields written as 0, as pretix 2026.8.0 does
    check = verify_sig1(sign_secret(ed_keys[0], payload), sig1_keys(ed_keys[0]))
    assert check.reason is Reason.OK
    assert (check.ticket.valid_from, check.ticket.valid_until) == (None, None)


def test_secret_without_validity_fields_has_none(ed_keys):
    check = verify_sig1(make_sig1_secret(ed_keys[0], 5), sig1_keys(ed_keys[0]))
    assert check.ticket.valid_from is None and check.ticket.valid_until is None and check.ticket.variation == 0


def test_secret_with_one_changed_character_is_an_invalid_signature(ed_keys):
    secret = make_sig1_secret(ed_keys[0], 42)
    assert verify_sig1(_flip(secret, len(secret) // 2), sig1_keys(ed_keys[0])).reason is Reason.INVALID_SIGNATURE


def test_secret_with_a_truncated_signature_is_malformed(ed_keys):
    payload = encode_ticket("abc", 42)
    raw = b"\x01" + struct.pack(">HH", len(payload), 64) + payload + ed_keys[0].sign(payload)[:40]
    secret = base64.b64encode(raw).decode()[::-1]
    check = verify_sig1(secret, sig1_keys(ed_keys[0]))
    assert check.reason is Reason.MALFORMED and "cut short" in check.detail


def test_secret_signed_by_another_events_key_is_an_invalid_signature(ed_keys):
    check = verify_sig1(make_sig1_secret(ed_keys[1], 42), sig1_keys(ed_keys[0]))
    assert check.reason is Reason.INVALID_SIGNATURE


def test_random_pretix_secret_is_unknown_offline_not_malformed(ed_keys):
    check = verify_sig1("az9u4mymhqktrbupmwkvv6xmgds5dk3x", sig1_keys(ed_keys[0]))
    assert check.reason is Reason.UNKNOWN and "cannot be checked offline" in check.detail


def test_signature_over_a_garbled_payload_is_malformed_not_admitted(ed_keys):
    secret = sign_secret(ed_keys[0], b"\x12\xff")  # field 2, length-delimited, runs past the end
    assert verify_sig1(secret, sig1_keys(ed_keys[0])).reason is Reason.MALFORMED


def test_valid_keys_entries_must_be_ed25519(rsa_keys):
    with pytest.raises(ValueError, match="not Ed25519"):
        load_sig1_keys([base64.b64encode(public_pem(rsa_keys[0])).decode()])


@pytest.mark.parametrize(("text", "why"), [
    ("not base64 at all!", "not base64 of PEM"),
    (base64.b64encode(b"hello").decode(), "not a PEM public key"),
    (base64.b64encode(b"-----BEGIN PUBLIC KEY-----\n%%%%\n-----END PUBLIC KEY-----\n").decode(), "body is not base64"),
    (base64.b64encode(b"-----BEGIN PUBLIC KEY-----\n" + base64.b64encode(bytes(44)) +
                      b"\n-----END PUBLIC KEY-----\n").decode(), "not Ed25519"),
    (5, "not text"),
])
def test_a_valid_keys_entry_that_is_not_an_ed25519_pem_key_is_refused_saying_why(text, why):
    with pytest.raises(ValueError, match=why):
        load_sig1_keys([text])


@given(seed=st.text(max_size=12), item=st.integers(0, 2**63 - 1), variation=st.integers(-(2**63), 2**63 - 1),
       subevent=st.integers(0, 2**40), valid_from=st.none() | st.integers(1, 2**40),
       valid_until=st.none() | st.integers(-(2**31), 2**40).filter(bool))  # 0 is "no limit": tested above
def test_hand_written_protobuf_reader_round_trips_every_ticket(seed, item, variation, subevent, valid_from,
                                                               valid_until):
    t = decode_ticket(encode_ticket(seed, item, variation, subevent, valid_from, valid_until))
    assert (t.seed, t.item, t.variation, t.subevent, t.valid_from, t.valid_until) == \
        (seed, item, variation, subevent, valid_from, valid_until)


def test_unknown_protobuf_fields_are_skipped():
    payload = encode_ticket("s", 9) + b"\x38\x05" + b"\x42\x02hi" + b"\x4d\x00\x00\x00\x00"  # fields 7, 8, 9
    assert decode_ticket(payload).item == 9
