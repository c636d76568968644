"""The nfc reader end to end over nfcpy's `udp` driver on 127.0.0.1: an emulated phone taps, the pipeline decides.

The phone is real nfcpy in listen mode (anticollision and SELECT by the udp driver) plus the
ISO 14443-4 card half written here (ATS, I-blocks with chaining, R(ACK)/R(NAK), S(WTX),
S(DESELECT)), with an Apple Wallet or Google Wallet app behind it. The reader under test is the
production path: nfcpy sense -> Type 4A activation -> gated.policy.wallet -> Scan -> Gate.handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import select
import socket
import threading
import time
import types
import zlib
from pathlib import Path

import ndef
import nfc
import nfc.clf
import nfc.clf.pn532
import nfc.clf.transport
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

from gated.daemon import build
from gated.drivers import build_reader
from gated.drivers.tlv import CodecError, ndef_find, ndef_message, ndef_parse, tlv, tlv_find, tlv_parse
from gated.model import InputKind, Reason, Verdict
from gated.policy import wallet
from gated.store import Store

# The public demo keys (PassKit's VAS reader key from proxmark3, Google's sample collector key),
# copied so the tests stand alone.
APPLE_KEY_DER = bytes.fromhex(
    "307702010104203d1547f23cd78ad052a58860f1219e8fb791ec4dfe33769f5b9bfa627a656ca1a00a06082a8648ce3d"
    "030107a14403420004c0a301bf6f41c9a48b88617415cb6ec81f87b36a19d640c86214d59653dec4d1ae740966f0858e"
    "1f47be13173deffcc175ac2eed897e5f2b5038db331b300aef")
GOOGLE_KEY_PEM = (
    "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIIJtF+UHZ7FlsOTZ4zL40dHiAiQoT7Ta8eUKAyRucHl9oAoGCCqGSM49\n"
    "AwEHoUQDQgAEchyXj869zfmKhRi9xP7f2AK07kEo4lE7ZlWTN14jh4YBTny+hRGR\nXcUzevV9zSSPJlPHpqqu5pEwlv1xyFvE1w==\n"
    "-----END EC PRIVATE KEY-----\n")
PASS_TYPE = "pass.com.passkit.pksamples.nfcdemo"
COLLECTOR = 20180608
ATS = bytes.fromhex("0578807002")  # FSCI 8 (256-byte frames), FWI 7 (FWT 38.7 ms): an iPhone's
LOG_NAME = "gated.drivers.nfc_wallet"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sw(data: bytes, status: int) -> bytes:
    return data + status.to_bytes(2, "big")


# --- the wallet apps -----------------------------------------------------------------------------


class AppleWallet:
    """An iPhone's VAS applet holding one pass; `locked` answers 6287 as a locked iPhone does."""

    def __init__(self, pass_type: str, message: str, reader_public: ec.EllipticCurvePublicKey, *,
                 locked: bool = False, clock_offset: float = 0.0):
        self.pass_type, self.message, self.reader_public = pass_type, message, reader_public
        self.locked, self.clock_offset = locked, clock_offset
        self.requests: list[bytes] = []

    def __call__(self, command: bytes) -> bytes:
        if command == wallet.SELECT_OSE:
            return sw(tlv(0x6F, tlv(0x50, b"ApplePay") + tlv(0x9F21, b"\x01\x00") + tlv(0x9F24, os.urandom(4))
                          + tlv(0x9F23, b"\x00\x00\x00\x3e")), 0x9000)
        if command[:2] != b"\x80\xca":
            return sw(b"", 0x6D00)
        self.requests.append(command)
        asked = tlv_find(command[5:-1], 0x9F25)
        if asked != hashlib.sha256(self.pass_type.encode()).digest():
            return sw(b"", 0x6A83)
        if self.locked:
            return sw(b"", 0x6287)
        when = time.time() + self.clock_offset
        return sw(tlv(0x70, tlv(0x9F2A, b"") + tlv(0x9F27, apple_cryptogram(
            self.reader_public, self.pass_type, self.message, when))), 0x9000)


def apple_cryptogram(reader_public: ec.EllipticCurvePublicKey, pass_type: str, message: str, when: float) -> bytes:
    """What an iPhone sends: ECIES to the reader key with the X9.63 KDF and AES-256-GCM, zero IV."""
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    shared = ephemeral.exchange(ec.ECDH(), reader_public)
    info = b"\x0did-aes256-GCMApplePay encrypted VAS data" + hashlib.sha256(pass_type.encode()).digest()
    key = X963KDF(algorithm=hashes.SHA256(), length=32, sharedinfo=info).derive(shared)
    plain = int(when - wallet.APPLE_EPOCH).to_bytes(4, "big") + message.encode()
    x = ephemeral.public_key().public_numbers().x.to_bytes(32, "big")
    return wallet.apple_key_id(reader_public) + x + AESGCM(key).encrypt(bytes(16), plain, None)


class GoogleWallet:
    """An Android phone's Smart Tap 2.1 applet holding one event ticket for one collector.

    It checks the reader's signature with the collector's public key (9500 if wrong), answers
    with its ephemeral key, and returns the encrypted bundle, split over GET MORE DATA (9100)
    when `split` is set. The pass value sits in a well-known text record named by its id,
    as real phones send it, and random filler makes the bundle larger than one ISO-DEP frame.
    """

    def __init__(self, collector_public: ec.EllipticCurvePublicKey, collector_id: int, value: str, *,
                 split: int | None = None, filler: int = 0):
        self.collector_public, self.collector_id, self.value = collector_public, collector_id, value
        self.split, self.filler = split, filler
        self.pending = b""
        self.statuses: list[int] = []

    def __call__(self, command: bytes) -> bytes:
        response = self._answer(command)
        self.statuses.append(int.from_bytes(response[-2:], "big"))
        return response

    def _answer(self, command: bytes) -> bytes:
        if command == wallet.SELECT_OSE:
            self.nonce, self.ephemeral = os.urandom(32), ec.generate_private_key(ec.SECP256R1())
            return sw(tlv(0x6F, tlv(0x50, b"AndroidPay") + tlv(0xC0, b"\x00\x01") + tlv(0xC2, self.nonce)
                          + tlv(0xC3, wallet.compressed_point(self.ephemeral))), 0x9000)
        ins, data = command[1], command[5:-1]
        if ins == wallet.NEGOTIATE_INS:
            body = ndef_find(data, "ngr")[2:]
            ses, cpr = ndef_find(body, "ses"), ndef_find(body, "cpr")
            reader_nonce, reader_pub, version = cpr[:32], cpr[33:66], int.from_bytes(cpr[66:70], "big")
            signature, cld = ndef_find(cpr[70:], "sig")[1:], ndef_find(cpr[70:], "cld")[1:]
            signed = reader_nonce + self.nonce + cld + reader_pub
            try:
                self.collector_public.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
            except Exception:
                return sw(b"", 0x9500)
            if int.from_bytes(cld, "big") != self.collector_id or version != 1:
                return sw(b"", 0x9500)
            point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), reader_pub)
            own = wallet.compressed_point(self.ephemeral)
            okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=own, info=signed + signature).derive(
                self.ephemeral.exchange(ec.ECDH(), point))
            self.aes, self.mac, self.session = okm[:16], okm[16:], ses[:8]
            reply = ndef_message(("ses", self.session + bytes([ses[8] + 1, 1])), ("dpk", own))
            return sw(ndef_message(("nrs", reply)), 0x9000)
        if ins == wallet.GET_DATA_INS:
            request = ndef_find(data, "srq")[2:]
            seq, zlib_ok = ndef_find(request, "ses")[8], bool(ndef_find(request, "pcr")[0] & 0x40)
            records = [ndef.Record("urn:nfc:ext:oid", "", b"\x04" + os.urandom(8)),
                       ndef.Record("urn:nfc:wkt:T", "n", b"\x00" + self.value.encode())]
            if self.filler:
                records.append(ndef.Record("urn:nfc:ext:tr1", "", os.urandom(self.filler)))
            ticket = b"".join(ndef.message_encoder(records))
            plain = ndef_message(("asv", ndef_message(("et", ticket))))
            flag = 0x01
            if zlib_ok and not self.filler:
                plain, flag = zlib.compress(plain), 0x03
            iv = os.urandom(12)
            encryptor = Cipher(algorithms.AES(self.aes), modes.CTR(iv + bytes(4))).encryptor()
            body = iv + encryptor.update(plain) + encryptor.finalize()
            bundle = bytes([flag]) + body + hmac.new(self.mac, body, hashlib.sha256).digest()
            out = ndef_message(("srs", ndef_message(("ses", self.session + bytes([seq + 1, 1])), ("reb", bundle))))
            if self.split and len(out) > self.split:
                self.pending = out[self.split:]
                return sw(out[:self.split], 0x9100)
            return sw(out, 0x9000)
        if ins == wallet.GET_MORE_DATA_INS:
            out, self.pending = self.pending, b""
            return sw(out, 0x9000)
        return sw(b"", 0x6D00)


# --- the phone: nfcpy udp listen side + our ISO-DEP card half ------------------------------------


class Phone:
    """A phone held on the reader until the test ends; every activation is one tap.

    `late` answers the first GET VAS DATA that many seconds late without asking for more time;
    `stall` answers it with S(WTX) requests forever.
    """

    def __init__(self, port: int, app, *, late: float = 0.0, stall: bool = False):
        self.port, self.app, self.late, self.stall = port, app, late, stall
        self.stop, self.bound = threading.Event(), threading.Event()
        self.taps = 0
        self.wtx_sent = 0
        self.stalled_for: float | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="phone")

    def __enter__(self) -> Phone:
        self.thread.start()
        assert self.bound.wait(5), "phone did not bind its port"
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        deadline = time.monotonic() + 5
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            while self.thread.is_alive() and time.monotonic() < deadline:
                s.sendto(b"x", ("127.0.0.1", self.port))  # a datagram ends a listen past its timeout
                self.thread.join(0.02)

    def _run(self) -> None:
        clf = nfc.ContactlessFrontend(f"udp:127.0.0.1:{self.port}")
        phone = self

        def bind_loopback(device, time_to_return):  # nfcpy binds 0.0.0.0: keep the test on loopback
            if device.socket.getsockname()[1] != device.addr[1]:
                device.socket.bind(("127.0.0.1", device.addr[1]))
            phone.bound.set()
            return True

        clf.device._bind_socket = types.MethodType(bind_loopback, clf.device)
        target = nfc.clf.LocalTarget("106A", sens_res=bytearray.fromhex("0400"),
                                     sdd_res=bytearray.fromhex("08") + bytearray(os.urandom(3)),
                                     sel_res=bytearray.fromhex("20"))
        try:
            while not self.stop.is_set():
                # The driver's listen, not clf.listen: that one closes the socket first, dropping the
                # poll the reader sends right after switching its field off and on again. It answers
                # each anticollision frame as it comes, so a short timeout loses nothing.
                with clf.lock:
                    activated = clf.target = clf.device.listen_tta(target, 0.1)
                if activated is None or not activated.tt4_cmd or self.stop.is_set():
                    continue
                self.taps += 1
                try:
                    self._serve(clf, bytes(activated.tt4_cmd))
                except nfc.clf.CommunicationError:
                    pass  # RFOFF: the reader polls again
        finally:
            clf.close()

    def _serve(self, clf: nfc.ContactlessFrontend, rats: bytes) -> None:
        fsd = (16, 24, 32, 40, 48, 64, 96, 128, 256)[min(rats[1] >> 4, 8)]
        last = ATS
        command = clf.exchange(bytearray(last), 1.0)
        chained, pending = b"", []
        while command:
            pcb = command[0]
            if pcb & 0xE2 == 0x02:  # I-block
                bn = pcb & 1
                chained += bytes(command[1:])
                if pcb & 0x10:  # the reader chains a long command: acknowledge, wait for the rest
                    reply = bytes([0xA2 | bn])
                else:
                    apdu, chained = chained, b""
                    answer = self._delayed(clf, apdu)
                    if answer is None:
                        return
                    chunks = [answer[i:i + fsd - 3] for i in range(0, len(answer), fsd - 3)]
                    reply, pending = bytes([(0x12 if chunks[1:] else 0x02) | bn]) + chunks[0], chunks[1:]
            elif pcb & 0xF6 == 0xA2 and pending:  # R(ACK): next part of our chained answer
                chunk = pending.pop(0)
                reply = bytes([(0x12 if pending else 0x02) | (pcb & 1)]) + chunk
            elif pcb & 0xF6 == 0xB2:  # R(NAK): the reader missed our last block
                reply = last
            elif pcb == 0xC2:  # S(DESELECT)
                clf.exchange(bytearray(b"\xc2"), 0)
                return
            else:
                return
            last = reply
            command = clf.exchange(bytearray(reply), 1.0)

    def _delayed(self, clf: nfc.ContactlessFrontend, apdu: bytes) -> bytes | None:
        slow = apdu[:2] == b"\x80\xca" and not self.wtx_sent and self.taps == 1
        if slow and self.late:
            time.sleep(self.late)  # no S(WTX): the reader's frame waiting time runs out
        if slow and self.stall:
            started = time.monotonic()
            try:
                while True:  # ask for the longest extension (WTXM 59), again and again
                    self.wtx_sent += 1
                    echo = clf.exchange(bytearray(b"\xf2\x3b"), 5.0)
                    if not echo or echo[0] != 0xF2:
                        return None
            except nfc.clf.CommunicationError:
                self.stalled_for = time.monotonic() - started
                return None
        return self.app(apdu)


# --- the reader under test -----------------------------------------------------------------------


class Taps(logging.Handler):
    """Collects the reader's tap-outcome log records, so a test can wait for one with a bound."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.cond:
            self.records.append(record)
            self.cond.notify_all()

    def wait(self, outcome: str, timeout: float = 5.0) -> logging.LogRecord:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for r in self.records:
                    if getattr(r, "GATED_NFC_OUTCOME", None) == outcome:
                        return r
                left = deadline - time.monotonic()
                assert left > 0, f"no {outcome} tap within {timeout}s: {[r.getMessage() for r in self.records]}"
                self.cond.wait(left)


@pytest.fixture
def taps():
    handler = Taps()
    logger = logging.getLogger(LOG_NAME)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture
def key_files(tmp_path: Path):
    apple, google = tmp_path / "vas-reader.der", tmp_path / "smarttap.pem"
    apple.write_bytes(APPLE_KEY_DER)
    google.write_text(GOOGLE_KEY_PEM)
    for f in (apple, google):
        f.chmod(0o600)
    return apple, google


@pytest.fixture
def wallet_config(load_config, tickets_csv, key_files):
    def make(port: int, extra: str = "", apple: bool = True) -> object:
        csv = tickets_csv("""
            token,name
            TICKET-0001-abcdef,Ada
            2018,Grace
        """)
        text = f"""
            [backend]
            type = "local"
            [backend.local]
            tickets = "{csv}"
            [reader.wallet]
            type = "nfc"
            device = "udp:127.0.0.1:{port}"
            reopen_seconds = 0.05
        """
        if apple:
            text += f"""
            [wallet.apple]
            pass_type_ids = ["pass.com.example.other", "{PASS_TYPE}"]
            private_key_files = ["{key_files[0]}"]
            max_age_seconds = 60
            """
        return load_config(text + extra)
    return make


class Lane:
    """A running gate with the nfc reader under test; `next_scan` is the first Scan the reader hands over."""

    def __init__(self, parts, reader, scans):
        self.parts, self.reader, self.scans = parts, reader, scans
        self.next_scan = asyncio.ensure_future(scans.__anext__())

    async def scan(self, timeout: float = 5.0):
        return await asyncio.wait_for(asyncio.shield(self.next_scan), timeout)

    async def admit_or_deny(self, timeout: float = 5.0):
        scan = await self.scan(timeout)
        return scan, await self.parts.gate.handle(scan, self.reader.label)

    def relay(self) -> list[bool]:
        return [st.state for st in self.parts.outputs.pin_factory.pin(17).states]


@contextlib.asynccontextmanager
async def lane_with_phone(config, phone: Phone, entry_keys: dict | None = None):
    """The phone lies on the reader from the start; the reader is stopped before the phone is taken away
    (a reader polling an empty udp field waits a whole second for an answer)."""
    with phone:
        parts = await build(config)
        await parts.backend.sync(parts.store)
        if entry_keys is not None:  # as the Entry backend leaves them, before the reader starts
            await parts.store.call(Store.put_data, "entry:nfc_keys", entry_keys)
        reader = build_reader("wallet", config.readers["wallet"], config)
        scans = reader.scans()
        lane = Lane(parts, reader, scans)
        try:
            yield lane
        finally:
            lane.next_scan.cancel()
            await asyncio.gather(lane.next_scan, return_exceptions=True)
            await scans.aclose()
            await parts.gate.drain()
            await parts.outputs.settle()
            await parts.close()


def apple_public():
    return wallet.load_private_key(APPLE_KEY_DER).public_key()


def google_public():
    return wallet.load_private_key(GOOGLE_KEY_PEM).public_key()


# --- end to end ----------------------------------------------------------------------------------


def test_iphone_pass_is_decrypted_and_admitted_through_the_pipeline(wallet_config):
    port = free_port()
    app = AppleWallet(PASS_TYPE, "TICKET-0001-abcdef", apple_public())

    async def scenario():
        async with lane_with_phone(wallet_config(port), Phone(port, app)) as lane:
            scan, decision = await lane.admit_or_deny()
            rows = await lane.parts.store.call(lambda s: list(s.db.query("SELECT * FROM scans")))
            return scan, decision, rows, lane.relay()

    scan, decision, rows, relay = asyncio.run(scenario())
    assert scan.token == "TICKET-0001-abcdef" and scan.input is InputKind.NFC and scan.nfc_type == "apple"
    assert decision.verdict is Verdict.ADMIT and decision.message == "Ada"
    assert rows[0]["nfc_type"] == "apple" and rows[0]["input"] == "nfc" and rows[0]["verdict"] == "admit"
    assert relay[:2] == [False, True]
    # the first configured pass type was asked for with the "more passes follow" bit, then ours
    assert len(app.requests) >= 2 and tlv_find(app.requests[0][5:-1], 0x9F26) == bytes.fromhex("00800082")


def test_android_pass_from_entry_keys_is_admitted_with_chained_frames_and_get_more_data(wallet_config):
    port = free_port()
    app = GoogleWallet(google_public(), COLLECTOR, "2018", split=120, filler=300)
    entry = {"apple": [], "google": [
        {"ID": "row-7", "private_key": GOOGLE_KEY_PEM, "collectorId": str(COLLECTOR), "version": "1"}]}

    async def scenario():
        # no [wallet.*] table: the keys come only from the store
        async with lane_with_phone(wallet_config(port, apple=False), Phone(port, app), entry) as lane:
            return await lane.admit_or_deny()

    scan, decision = asyncio.run(scenario())
    assert (scan.token, scan.nfc_type) == ("2018", "google")
    assert decision.verdict is Verdict.ADMIT and decision.message == "Grace"
    assert 0x9100 in app.statuses  # the bundle came in two GET DATA parts


def test_android_phone_refuses_a_reader_signing_with_the_wrong_collector_key(wallet_config, taps, tmp_path):
    port = free_port()
    wrong = tmp_path / "other.pem"
    wrong.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    wrong.chmod(0o600)
    config = wallet_config(port, f"""
        [wallet.google]
        collector_id = {COLLECTOR}
        private_key_file = "{wrong}"
    """, apple=False)
    app = GoogleWallet(google_public(), COLLECTOR, "2018")

    async def scenario():
        async with lane_with_phone(config, Phone(port, app)) as lane:
            record = await asyncio.to_thread(taps.wait, "auth_failed")
            return record, lane.next_scan.done()

    record, got_scan = asyncio.run(scenario())
    assert not got_scan and record.levelno == logging.WARNING and "9500" in record.getMessage()


@pytest.mark.parametrize("case,outcome,level", [
    ("no_pass", "no_pass", logging.INFO),   # the phone holds no pass of ours: 6A83 for each id
    ("locked", "locked", logging.INFO),     # a locked iPhone: 6287, the user unlocks and taps again
])
def test_iphone_without_a_usable_pass_yields_no_scan_and_one_log_line(wallet_config, taps, case, outcome, level):
    port = free_port()
    app = AppleWallet("pass.com.someone.else" if case == "no_pass" else PASS_TYPE, "TICKET-0001-abcdef",
                      apple_public(), locked=case == "locked")
    phone = Phone(port, app)

    async def scenario():
        async with lane_with_phone(wallet_config(port), phone) as lane:
            record = await asyncio.to_thread(taps.wait, outcome)
            while phone.taps < 2:  # the phone stays on the reader: polled again, not logged again
                await asyncio.sleep(0.02)
            rows = await lane.parts.store.call(lambda s: s.count())
            return record, lane.next_scan.done(), rows

    record, got_scan, rows = asyncio.run(scenario())
    assert not got_scan and rows == 0
    assert record.levelno == level and record.GATED_NFC_WALLET == "apple"
    assert len([r for r in taps.records if getattr(r, "GATED_NFC_OUTCOME", None) == outcome]) == 1


def test_late_answer_without_wtx_fails_the_tap_and_the_next_tap_reads_the_pass(wallet_config, taps):
    port = free_port()
    app = AppleWallet(PASS_TYPE, "TICKET-0001-abcdef", apple_public())
    phone = Phone(port, app, late=0.4)  # nfcpy gives up after ~0.25 s of R(NAK) retries at FWT 38.7 ms

    async def scenario():
        async with lane_with_phone(wallet_config(port), phone) as lane:
            failed = await asyncio.to_thread(taps.wait, "link_failed")
            return failed, *(await lane.admit_or_deny(8))

    failed, scan, decision = asyncio.run(scenario())
    assert "phone stopped answering" in failed.getMessage() and failed.levelno == logging.INFO
    assert scan.token == "TICKET-0001-abcdef" and decision.verdict is Verdict.ADMIT and phone.taps >= 2


def test_phone_asking_for_more_time_forever_frees_the_reader_within_a_second(wallet_config, taps):
    port = free_port()
    app = AppleWallet(PASS_TYPE, "TICKET-0001-abcdef", apple_public())
    phone = Phone(port, app, stall=True)

    async def scenario():
        async with lane_with_phone(wallet_config(port), phone) as lane:
            scan = await lane.scan(8)  # read on the tap after the stuck one
            return taps.wait("link_failed", 0), scan

    failed, scan = asyncio.run(scenario())
    assert phone.wtx_sent > 1  # it really asked again and again
    assert float(failed.GATED_LATENCY_MS) < 1000  # exchange_timeout_seconds 0.5 caps the whole command
    assert scan.token == "TICKET-0001-abcdef"


def test_iphone_payload_older_than_the_window_is_denied_as_replay(wallet_config):
    port = free_port()
    app = AppleWallet(PASS_TYPE, "TICKET-0001-abcdef", apple_public(), clock_offset=-600)

    async def scenario():
        async with lane_with_phone(wallet_config(port), Phone(port, app)) as lane:
            return *(await lane.admit_or_deny()), lane.relay()

    scan, decision, relay = asyncio.run(scenario())
    assert scan.refused is Reason.REPLAY
    assert decision.verdict is Verdict.DENY and decision.reason is Reason.REPLAY
    assert "s old, freshness window 60s" in decision.detail and relay == [False]


def test_missing_reader_is_reported_once_and_looked_for_again(load_config, taps):
    config = load_config("""
        [reader.wallet]
        type = "nfc"
        device = "tty:USB97:pn532"
        reopen_seconds = 0.02
    """)

    async def scenario():
        reader = build_reader("wallet", config.readers["wallet"], config)
        scans = reader.scans()
        pending = asyncio.ensure_future(scans.__anext__())
        deadline = time.monotonic() + 5
        while sum("still no NFC reader" in r.getMessage() for r in taps.records) < 3:
            assert time.monotonic() < deadline and not pending.done()
            await asyncio.sleep(0.02)
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
        await scans.aclose()

    asyncio.run(scenario())
    warnings = [r for r in taps.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no NFC reader at tty:USB97:pn532" in warnings[0].getMessage()


# --- codecs --------------------------------------------------------------------------------------


def test_ber_tlv_long_lengths_and_two_byte_tags_round_trip():
    value = bytes(range(256)) * 2
    encoded = tlv(0x70, tlv(0x9F27, value) + tlv(0x9F2A, b""))
    assert encoded[:4] == bytes.fromhex("70820208") and tlv_find(encoded, 0x70, 0x9F27) == value
    assert tlv_find(encoded, 0x70, 0x9F2A) == b"" and tlv_find(encoded, 0x70, 0x5A) is None


@pytest.mark.parametrize("data", ["9f", "9f27", "9f2705aabb", "70830000"])
def test_truncated_ber_tlv_is_a_codec_error(data):
    with pytest.raises(CodecError):
        tlv_parse(bytes.fromhex(data))


def test_smart_tap_wire_example_parses_with_names_from_type_or_id():
    # NEGOTIATE request from kormax/google-smart-tap README (collector 01020304).
    wire = bytes.fromhex(
        "d403b86e6772000194030a7365736b159a80fc8283fd00015403a0637072a8aa2bae1ba891783d8c5be8a95bf2f9e5bb90"
        "fd9d197f8b2b1a84d9cc80427501027b2e12f1a1a542084b4d01b8799380fa4cb77e530ba2305b0bf2b3e4b474fe7d0000"
        "000194034973696704304602210086e43dc483b22e51aa177ae8112ed83d399a58b41d6d8cbe900cde03c4524da50221"
        "00e94b6a919c9e097568f4efa9a7123b86b97ee44342593f8a77fc9e12e3f95ae4540305636c640401020304")
    body = ndef_find(wire, "ngr")
    assert body[:2] == b"\x00\x01"
    assert [r.name for r in ndef_parse(body[2:])] == ["ses", "cpr"]
    cpr = ndef_find(body[2:], "cpr")
    assert ndef_find(cpr[70:], "cld") == bytes.fromhex("0401020304")
    text = b"".join(ndef.message_encoder([ndef.Record("urn:nfc:wkt:T", "ccd", b"USD")]))
    assert ndef_parse(text)[0].name == "ccd"
    with pytest.raises(CodecError):
        ndef_parse(b"\xd4\x03\x30ses")


# --- Enhanced Contactless Polling on a PN532 -----------------------------------------------------


class FakePN532:
    """The chip end of a PN532 on a UART, over a real pty: enough of its host protocol for nfcpy's driver.

    On it lies an iPhone whose pass needs ECP: it ignores polls until it has heard the ECP frame.
    Every command is recorded as (command code, data).
    """

    ACK = bytes.fromhex("0000ff00ff00")

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()  # the slave end stays open so the master never reads EIO
        self.path = os.ttyname(self.slave)
        self.commands: list[tuple[int, bytes]] = []
        self.registers = {0x6339: 0x26}  # CIU_FIFOData still holds REQA: nothing answered the poll
        self.woken = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="pn532")
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        os.close(self.master)
        os.close(self.slave)

    def _run(self) -> None:
        buffer = b""
        while not self.stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            buffer += os.read(self.master, 4096)
            while (i := buffer.find(b"\x00\x00\xff")) >= 0 and len(buffer) >= i + 6:
                head = buffer[i + 3:]
                if head[:3] == b"\x00\xff\x00":  # the host's ACK
                    buffer = head[3:]
                    continue
                extended = head[:2] == b"\xff\xff"  # frames over 254 bytes: 16-bit length
                length, skip = (int.from_bytes(head[2:4], "big"), 5) if extended else (head[0], 2)
                if len(head) < skip + length + 2:
                    break
                body, buffer = head[skip:skip + length], head[skip + length + 2:]
                self.commands.append((body[1], body[2:]))
                reply = bytes([0xD5, body[1] + 1]) + self._answer(body[1], body[2:])
                os.write(self.master, self.ACK + self._frame(reply))

    @staticmethod
    def _frame(reply: bytes) -> bytes:
        n = len(reply)
        head = bytes([n, (256 - n) & 0xFF]) if n < 255 else \
            b"\xff\xff" + n.to_bytes(2, "big") + bytes([(256 - (n >> 8) - (n & 0xFF)) & 0xFF])
        return b"\x00\x00\xff" + head + reply + bytes([(256 - sum(reply)) & 0xFF, 0])

    def _answer(self, code: int, data: bytes) -> bytes:
        if code == 0x02:  # GetFirmwareVersion: PN532 v1.6
            return bytes.fromhex("32010607")
        if code == 0x00:  # Diagnose line test: echo
            return data
        if code == 0x06:  # ReadRegister
            return bytes(self.registers.get(int.from_bytes(data[i:i + 2], "big"), 0) for i in range(0, len(data), 2))
        if code == 0x08:  # WriteRegister
            for i in range(0, len(data), 3):
                self.registers[int.from_bytes(data[i:i + 2], "big")] = data[i + 2]
            return b""
        if code == 0x4A:  # InListPassiveTarget: the phone answers only once woken by ECP
            if data[1] == 0 and self.woken:
                return bytes.fromhex("0101" "0004" "20" "04" "08a1b2c3")
            return b"\x00"
        if code == 0x42:  # InCommunicateThru: nobody answers a broadcast frame (status 01, timeout)
            self.woken = self.woken or data == wallet.ecp_vas_frame()
            return b"\x01"
        if code == 0x16:  # PowerDown
            return b"\x00"
        return b""  # SAMConfiguration, SetSerialBaudrate, SetParameters, RFConfiguration


def test_ecp_frame_goes_out_between_two_polls_and_wakes_the_iphone_on_a_pn532():
    from gated.drivers.nfc_wallet import sense_with_ecp

    chip = FakePN532()
    try:
        clf = nfc.ContactlessFrontend()
        clf.device = nfc.clf.pn532.init(nfc.clf.transport.TTY(chip.path))
        try:
            target = sense_with_ecp(clf, wallet.ecp_vas_frame())
        finally:
            clf.close()
    finally:
        chip.close()
    assert target is not None and target.sel_res == bytearray(b"\x20") and clf.target is target  # ready for RATS
    polls = [n for n, (code, data) in enumerate(chip.commands) if code == 0x4A and data[1] == 0]
    ecp = [n for n, (code, data) in enumerate(chip.commands) if code == 0x42]
    assert len(polls) == 2 and len(ecp) == 1 and polls[0] < ecp[0] < polls[1]
    assert chip.commands[ecp[0]][1].hex() == "6a01000002e4d2"
    framing = [n for n, (code, data) in enumerate(chip.commands) if code == 0x08 and data[:2] == b"\x63\x3d"]
    assert framing and polls[0] < framing[-1] < ecp[0]  # 8-bit framing restored before the frame


def _wal_index_in_use(db: Path) -> bool:
    """Whether a connection of this process keeps the store's WAL index (-shm) open: SQLite holds its
    DMS byte (offset 128) locked for as long as one does. Asked from another process, as locks are."""
    import subprocess
    import sys

    if not Path(f"{db}-shm").exists():  # the last connection to close removes it
        return False
    probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)\nexcept OSError:\n    sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", probe, f"{db}-shm"]).returncode == 3


def test_the_reader_reads_entrys_keys_without_keeping_the_store_open_between_refreshes(tmp_path):
    """The daemon reopens its store read-only when the card turns read-only (Daemon._follow_storage),
    and first closes every connection of its own: SQLite shares one read-write mapping of the WAL index
    per process, whose write on such storage is SIGBUS. A reader's own connection kept open would
    keep that mapping."""
    from gated.drivers.nfc_wallet import ENTRY_KEYS, _Keys

    db = tmp_path / "gated.db"
    writer = Store(db)
    writer.put_data(ENTRY_KEYS, {"nfcKeys": []})
    writer.close()
    config = types.SimpleNamespace(wallet_apple=None, wallet_google=None, store=types.SimpleNamespace(path=str(db)))
    keys = _Keys("nfc", config)
    keys.open()
    keys.current(time.time())
    assert keys.stamp is not None  # the row was read
    assert not _wal_index_in_use(db)
