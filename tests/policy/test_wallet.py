"""Wallet pass protocol and cryptography (pure): Apple VAS vectors, Smart Tap round trip, freshness, keys."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import zlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

from gated.daemon import build
from gated.drivers.tlv import ndef_message, tlv, tlv_find
from gated.model import InputKind, Reason, Scan, Verdict
from gated.policy import wallet
from gated.policy.wallet import Outcome, WalletError

# Public demo data, as collected in shared/nfc-wallet-vectors/vectors.json:
# the PassKit demo VAS reader key (proxmark3 client/resources/vas.passkit.der), cryptogram 1 from the
# help text of proxmark3's `hf vas decrypt`, cryptogram 2 with its SELECT / GET VAS DATA trace from
# kormax/apple-vas (README and examples/traces/VASONLY.READ.log), and Google's Smart Tap sample
# collector key (google-wallet/smart-tap-sample-app, Apache-2.0; collector 20180608, version 1).
PASS_TYPE = "pass.com.passkit.pksamples.nfcdemo"
APPLE_KEY_DER = bytes.fromhex(
    "307702010104203d1547f23cd78ad052a58860f1219e8fb791ec4dfe33769f5b9bfa627a656ca1a00a06082a8648ce3d"
    "030107a14403420004c0a301bf6f41c9a48b88617415cb6ec81f87b36a19d640c86214d59653dec4d1ae740966f0858e"
    "1f47be13173deffcc175ac2eed897e5f2b5038db331b300aef")
CRYPTOGRAM_1 = bytes.fromhex(
    "c0b77375eae416b79449347f9fe838c05cdb57dc7470b97b93b806cb348771d9bfbe29d58538c7c7d7c3d015fa205b68"
    "bfccd726058a62f7f44085ac98dbf877120fd9059f1507b956e0a6d56d0a")
CRYPTOGRAM_2 = bytes.fromhex(
    "c0b77375d3f37956d84a538f28ac2a04b38ddc1a67d3647a4dd30abd736ea1cea8038388692e89db99e4746d872de782"
    "395640c536e79a75c47a9343da0af3937f06eeca7a865c4ad05a2c543ad2")
SELECT_RESPONSE_2 = bytes.fromhex("6f1d50084170706c655061799f210201009f2404e9caede39f23040000003e9000")
GET_VAS_RESPONSE_2 = bytes.fromhex("70549f2a009f274e") + CRYPTOGRAM_2 + b"\x90\x00"
GOOGLE_KEY_PEM = (
    "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIIJtF+UHZ7FlsOTZ4zL40dHiAiQoT7Ta8eUKAyRucHl9oAoGCCqGSM49\n"
    "AwEHoUQDQgAEchyXj869zfmKhRi9xP7f2AK07kEo4lE7ZlWTN14jh4YBTny+hRGR\nXcUzevV9zSSPJlPHpqqu5pEwlv1xyFvE1w==\n"
    "-----END EC PRIVATE KEY-----\n")


def apple_keys(pass_types=(PASS_TYPE,)) -> wallet.WalletKeys:
    keys, problems = wallet.build_keys(apple_files=[("vas.der", APPLE_KEY_DER)], pass_type_ids=pass_types)
    assert problems == []
    return keys


# --- Apple VAS decryption ------------------------------------------------------------------------


@pytest.mark.parametrize("cryptogram,message,unix", [
    (CRYPTOGRAM_1, "499g3sYcKCp7WVI9qVogyT", 1688913590),  # 2023-07-09T14:39:50Z
    (CRYPTOGRAM_2, "6d1UlFpnOc50iVKRaboDOK", 1688920558),  # 2023-07-09T16:35:58Z
])
def test_public_apple_cryptograms_decrypt_to_their_known_messages_and_times(cryptogram, message, unix):
    payload = wallet.decrypt_vas(cryptogram, PASS_TYPE, apple_keys().apple)
    assert (payload.message, payload.timestamp, payload.key_id.hex()) == (message, unix, "c0b77375")


def test_cryptogram_for_a_reader_key_we_do_not_hold_fails_as_unknown_key():
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    keys, _ = wallet.build_keys(apple_files=[("other.der", other)], pass_type_ids=[PASS_TYPE])
    with pytest.raises(WalletError) as e:
        wallet.decrypt_vas(CRYPTOGRAM_1, PASS_TYPE, keys.apple)
    assert e.value.outcome is Outcome.UNKNOWN_KEY and "c0b77375" in e.value.detail


def test_cryptogram_asked_for_under_another_pass_type_fails_as_wrong_pass_type():
    keys = apple_keys(("pass.com.example.event",))  # the same key, configured for another pass type only
    with pytest.raises(WalletError) as e:
        wallet.decrypt_vas(CRYPTOGRAM_1, PASS_TYPE, keys.apple)
    assert e.value.outcome is Outcome.WRONG_PASS_TYPE


@pytest.mark.parametrize("offset", [40, 50, len(CRYPTOGRAM_1) - 17, len(CRYPTOGRAM_1) - 1])
def test_any_flipped_ciphertext_or_tag_byte_fails_as_tampered(offset):
    bad = bytearray(CRYPTOGRAM_1)
    bad[offset] ^= 0x01
    with pytest.raises(WalletError) as e:
        wallet.decrypt_vas(bytes(bad), PASS_TYPE, apple_keys().apple)
    assert e.value.outcome is Outcome.TAMPERED


def test_the_four_failures_each_have_their_own_outcome():
    outcomes = set()
    for cryptogram, keys in [(b"\xc0\xb7\x73\x75" + bytes(10), apple_keys().apple),
                             (b"\x00" + CRYPTOGRAM_1[1:], apple_keys().apple),
                             (CRYPTOGRAM_1[:-1] + bytes([CRYPTOGRAM_1[-1] ^ 1]), apple_keys().apple)]:
        with pytest.raises(WalletError) as e:
            wallet.decrypt_vas(cryptogram, PASS_TYPE, keys)
        outcomes.add(e.value.outcome)
    with pytest.raises(WalletError) as e:
        wallet.decrypt_vas(CRYPTOGRAM_1, "pass.com.not.this", apple_keys().apple)
    outcomes.add(e.value.outcome)
    assert outcomes == {Outcome.MALFORMED, Outcome.UNKNOWN_KEY, Outcome.TAMPERED, Outcome.WRONG_PASS_TYPE}


def test_older_phones_kdf_variant_with_the_pass_hash_as_aad_also_decrypts():
    reader = wallet.load_private_key(APPLE_KEY_DER)
    phone = ec.generate_private_key(ec.SECP256R1())
    key = X963KDF(algorithm=hashes.SHA256(), length=32, sharedinfo=b"ApplePay encrypted VAS data").derive(
        phone.exchange(ec.ECDH(), reader.public_key()))
    plain = (1700000000 - wallet.APPLE_EPOCH).to_bytes(4, "big") + b"LEGACY-42"
    body = AESGCM(key).encrypt(bytes(16), plain, hashlib.sha256(PASS_TYPE.encode()).digest())
    cryptogram = wallet.apple_key_id(reader) + phone.public_key().public_numbers().x.to_bytes(32, "big") + body
    payload = wallet.decrypt_vas(cryptogram, PASS_TYPE, apple_keys().apple)
    assert (payload.message, payload.timestamp) == ("LEGACY-42", 1700000000)


# --- Apple VAS flow ------------------------------------------------------------------------------


class RecordedIPhone:
    """Answers with the recorded trace of cryptogram 2; pass types it does not hold get 6A83."""

    def __init__(self, status: int = 0x9000):
        self.status = status
        self.commands: list[bytes] = []

    def __call__(self, command: bytes) -> bytes:
        self.commands.append(command)
        if command == wallet.SELECT_OSE:
            return SELECT_RESPONSE_2
        if tlv_find(command[5:-1], 0x9F25) != hashlib.sha256(PASS_TYPE.encode()).digest():
            return b"\x6a\x83"
        return GET_VAS_RESPONSE_2 if self.status == 0x9000 else self.status.to_bytes(2, "big")


def test_recorded_iphone_trace_reads_the_pass_asking_each_configured_pass_type_in_turn():
    phone = RecordedIPhone()
    read = wallet.read_wallet(phone, apple_keys(("pass.com.example.first", PASS_TYPE)))
    assert (read.outcome, read.wallet, read.value, read.timestamp) == (Outcome.OK, "apple", "6d1UlFpnOc50iVKRaboDOK",
                                                                       1688920558)
    first, second = phone.commands[1], phone.commands[2]
    assert first[:4] == second[:4] == bytes.fromhex("80ca0101")
    assert tlv_find(first[5:-1], 0x9F26) == bytes.fromhex("00800082")  # more passes follow
    assert tlv_find(second[5:-1], 0x9F26) == bytes.fromhex("00800002")  # last request: VAS only
    assert tlv_find(second[5:-1], 0x9F25).hex() == "03b57cdb3eca0984ba9abdc2fb45d86626d87b39d33c5c6dbbc313a6347a3146"


@pytest.mark.parametrize("status,outcome", [(0x6287, Outcome.LOCKED), (0x6984, Outcome.USER_ACTION),
                                            (0x6A80, Outcome.ERROR)])
def test_iphone_status_words_become_their_outcomes(status, outcome):
    assert wallet.read_wallet(RecordedIPhone(status), apple_keys()).outcome is outcome


def test_iphone_without_any_of_our_passes_is_no_pass():
    read = wallet.read_wallet(RecordedIPhone(), apple_keys(("pass.com.example.a", "pass.com.example.b")))
    assert read.outcome is Outcome.NO_PASS and "6A83" in read.detail


def test_card_without_a_wallet_applet_is_not_a_wallet_after_trying_both_aids():
    commands = []

    def bank_card(command: bytes) -> bytes:
        commands.append(command)
        return b"\x6a\x82"

    assert wallet.read_wallet(bank_card, apple_keys()).outcome is Outcome.NOT_A_WALLET
    assert commands == [wallet.SELECT_OSE, wallet.SELECT_SMART_TAP]


def test_garbled_answers_are_malformed_not_crashes():
    answers = iter([SELECT_RESPONSE_2, bytes.fromhex("709f2705") + b"\x90\x00"])
    assert wallet.read_wallet(lambda c: next(answers), apple_keys()).outcome is Outcome.MALFORMED
    assert wallet.read_wallet(lambda c: b"\x90", apple_keys()).outcome is Outcome.MALFORMED


# --- freshness and duplicates --------------------------------------------------------------------


def test_apple_payload_freshness_window_works_both_ways():
    assert wallet.is_stale(1000.0, 1030.0, 60) is None
    assert "90s old" in wallet.is_stale(1000.0, 1090.0, 60)
    assert "ahead" in wallet.is_stale(1200.0, 1000.0, 60)  # a phone clock set ahead to pre-record a tap


def test_the_same_cryptogram_twice_within_the_window_is_a_replay_and_is_forgotten_after_it():
    seen = wallet.SeenCryptograms()
    assert not seen.check(CRYPTOGRAM_1, 10.0, 60)
    assert not seen.check(CRYPTOGRAM_2, 11.0, 60)
    assert seen.check(CRYPTOGRAM_1, 30.0, 60)
    assert not seen.check(CRYPTOGRAM_2, 80.0, 60)


def test_replayed_wallet_scan_is_denied_before_the_backend_but_emergency_still_opens(load_config, tickets_csv):
    csv = tickets_csv("token,name\nTICKET-1,Ada\n")
    config = load_config(f'[backend]\ntype = "local"\n[backend.local]\ntickets = "{csv}"\n'
                         '[input.emergency]\npin = 25\n')

    async def scenario():
        parts = await build(config)
        try:
            await parts.backend.sync(parts.store)
            replay = dict(token="TICKET-1", reader="front", input=InputKind.NFC, nfc_type="apple",
                          refused=Reason.REPLAY, refused_detail="wallet payload 700s old")
            denied = await parts.gate.handle(Scan(**replay))
            parts.decider.emergency = True
            opened = await parts.gate.handle(Scan(**replay), "again")
            return denied, opened
        finally:
            await parts.close()

    config.lane["debounce_seconds"] = 0.0
    denied, opened = asyncio.run(scenario())
    assert denied.verdict is Verdict.DENY and denied.reason is Reason.REPLAY and "700s old" in denied.detail
    assert opened.reason is Reason.EMERGENCY


# --- keys ----------------------------------------------------------------------------------------


def test_wallet_config_problems_name_the_table_and_key(write_config, tmp_path):
    from gated import config as configmod
    from gated.errors import ConfigError

    path = write_config("""
        [wallet.aple]
        pass_type_ids = ["pass.com.example.event"]
        [wallet.google]
        key_version = 1
        private_key_file = "missing.pem"
    """)
    with pytest.raises(ConfigError) as e:
        configmod.load(str(path))
    assert e.value.problems == [
        '[wallet.aple]: unknown wallet. Did you mean "apple"? Wallets: apple, google.',
        f'[wallet.google] private_key_file = "missing.pem": file not found: {tmp_path / "missing.pem"} '
        "(nor a systemd credential of that name).",
        "[wallet.google] collector_id: missing; the Smart Tap collector id, e.g. 20180608.",
    ]



def test_reader_key_id_is_computed_from_the_key_not_taken_from_the_api_id():
    keys, problems = wallet.build_keys(entry={"apple": [
        {"ID": "42", "private_key": base64.b64encode(APPLE_KEY_DER).decode(), "passTypeId": PASS_TYPE}]})
    assert problems == [] and [k.hex() for k in keys.apple] == ["c0b77375"]
    assert keys.pass_type_ids == (PASS_TYPE,)
    assert wallet.decrypt_vas(CRYPTOGRAM_1, PASS_TYPE, keys.apple).message == "499g3sYcKCp7WVI9qVogyT"


def _encodings() -> dict[str, bytes | str]:
    key = wallet.load_private_key(APPLE_KEY_DER)
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    return {
        "sec1 pem": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption()),
        "pkcs8 pem": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()).decode(),
        "der": APPLE_KEY_DER,
        "base64 der": base64.b64encode(APPLE_KEY_DER).decode(),
        "hex scalar": scalar.hex(),
        "base64 scalar": base64.b64encode(scalar).decode(),
    }


@pytest.mark.parametrize("form", sorted(_encodings()))
def test_private_keys_load_in_every_encoding_entry_might_use(form):
    assert wallet.apple_key_id(wallet.load_private_key(_encodings()[form])).hex() == "c0b77375"


@pytest.mark.parametrize("material,why", [
    (ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), "P-256"),
    (b"not a key at all", "not a P-256 private key"),
])
def test_keys_that_are_not_p256_are_refused_with_a_reason(material, why):
    with pytest.raises(ValueError, match=why):
        wallet.load_private_key(material)


def test_a_bad_key_is_reported_and_the_good_ones_still_load():
    keys, problems = wallet.build_keys(
        apple_files=[("good.der", APPLE_KEY_DER), ("bad.pem", b"-----BEGIN EC PRIVATE KEY-----\nxx\n")],
        pass_type_ids=[PASS_TYPE],
        entry={"nfcKeys": {"google": [{"ID": "g", "private_key": GOOGLE_KEY_PEM, "collectorId": "20180608",
                                        "version": "1"}, {"ID": "h", "collectorId": "x"}]}})
    assert len(keys.apple) == 1 and [(g.collector_id, g.key_version) for g in keys.google] == [(20180608, 1)]
    assert len(problems) == 2 and problems[0].startswith("bad.pem:") and "google[1]" in problems[1]
    assert all("PRIVATE" not in p for p in problems)  # never the key material


# --- Google Smart Tap cryptography ---------------------------------------------------------------


def _phone_session(reader_pub: bytes, signed: bytes, signature: bytes):
    """The phone's half: its ephemeral key and the same HKDF, computed independently of gated."""
    phone = ec.generate_private_key(ec.SECP256R1())
    own = wallet.compressed_point(phone)
    point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), reader_pub)
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=own, info=signed + signature).derive(
        phone.exchange(ec.ECDH(), point))
    return own, okm[:16], okm[16:]


def _bundle(aes: bytes, mac: bytes, plain: bytes, flag: int = 0x01) -> bytes:
    iv = os.urandom(12)
    encryptor = Cipher(algorithms.AES(aes), modes.CTR(iv + bytes(4))).encryptor()
    body = iv + encryptor.update(plain) + encryptor.finalize()
    return bytes([flag]) + body + hmac.new(mac, body, hashlib.sha256).digest()


def _ticket(value: str) -> bytes:
    return ndef_message(("asv", ndef_message(("et", ndef_message(("oid", b"\x04" + bytes(8)),
                                                                  ("n", b"\x00" + value.encode()))))))


@pytest.fixture
def smart_tap():
    """A negotiated Smart Tap session: (reader's keys, phone's keys), derived on both sides."""
    collector = wallet.load_private_key(GOOGLE_KEY_PEM)
    reader_ephemeral = ec.generate_private_key(ec.SECP256R1())
    reader_pub = wallet.compressed_point(reader_ephemeral)
    signed = wallet.smart_tap_signed_data(os.urandom(32), os.urandom(32), 20180608, reader_pub)
    signature = collector.sign(signed, ec.ECDSA(hashes.SHA256()))
    collector.public_key().verify(signature, signed, ec.ECDSA(hashes.SHA256()))  # what the phone checks
    device_pub, aes, mac = _phone_session(reader_pub, signed, signature)
    return wallet.smart_tap_session_keys(reader_ephemeral, device_pub, signed, signature), (aes, mac)


def test_smart_tap_session_keys_match_the_phones_and_the_pass_value_round_trips(smart_tap):
    (aes, mac), phone_keys = smart_tap
    assert (aes, mac) == phone_keys
    plain = wallet.smart_tap_decrypt(_bundle(aes, mac, _ticket("2018")), aes, mac)
    assert wallet.smart_tap_value(plain) == ("et", "2018")


def test_smart_tap_compressed_bundle_is_inflated(smart_tap):
    (aes, mac), _ = smart_tap
    bundle = _bundle(aes, mac, zlib.compress(_ticket("EVENT-77")), flag=0x03)
    assert wallet.smart_tap_value(wallet.smart_tap_decrypt(bundle, aes, mac)) == ("et", "EVENT-77")


@pytest.mark.parametrize("damage,outcome", [
    (lambda b: b[:20] + bytes([b[20] ^ 1]) + b[21:], Outcome.TAMPERED),  # ciphertext byte
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), Outcome.TAMPERED),  # HMAC byte
    (lambda b: b"\x00" + b[1:], Outcome.MALFORMED),  # claims to be unencrypted
    (lambda b: b[:30], Outcome.MALFORMED),  # truncated
])
def test_damaged_smart_tap_bundles_are_refused(smart_tap, damage, outcome):
    (aes, mac), _ = smart_tap
    with pytest.raises(WalletError) as e:
        wallet.smart_tap_decrypt(damage(_bundle(aes, mac, _ticket("2018"))), aes, mac)
    assert e.value.outcome is outcome


def test_zlib_bomb_is_refused(smart_tap):
    (aes, mac), _ = smart_tap
    bundle = _bundle(aes, mac, zlib.compress(bytes(wallet.MAX_INFLATED * 4)), flag=0x03)
    with pytest.raises(WalletError, match="inflates past"):
        wallet.smart_tap_decrypt(bundle, aes, mac)


def test_bundle_with_only_a_customer_record_has_no_pass_value():
    assert wallet.smart_tap_value(ndef_message(("asv", ndef_message(("cus", tlv(0x01, b"x")))))) is None


def test_ecp_vas_frame_is_the_documented_bytes():
    assert wallet.ecp_vas_frame().hex() == "6a01000002e4d2"  # proxmark3's VAS-only ECP frame
