"""The `nfc` reader: nfcpy polls for phones in a worker thread and hands wallet-pass Scans to the event loop.

Layering: this module does the I/O (the NFC frontend, its thread, key files, the store, the
clock); gated.policy.wallet does the protocol and the cryptography, purely, with the keys this
reader loaded at start. The reader makes one judgement itself, because only it sees the payload:
an Apple payload outside the freshness window, or a cryptogram presented twice, is handed over
with `refused = Reason.REPLAY`, and the decider denies it before any backend is asked.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import stat
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nfc
import nfc.clf
import nfc.clf.pn53x
import nfc.tag
import nfc.tag.tt4

from gated.config import WALLET_APPLE, Config
from gated.drivers.base import Reader
from gated.errors import StoreError
from gated.model import Reason, Scan
from gated.policy import wallet
from gated.policy.decider import EARLIEST_TRUSTED
from gated.schema import Key, Section
from gated.secrets import find_credential
from gated.store import Store, unwritable
from gated.tokens import redact

log = logging.getLogger(__name__)

NEEDS_CONFIG = True  # build_reader passes the whole Config: keys live in [wallet.*] and the store

SCHEMA = {
    "device": Key("str", default="usb",
                  help='nfcpy device: "usb", "usb:054c:06c3", "tty:AMA0:pn532", "tty:USB0:pn532"'),
    "exchange_timeout_seconds": Key("float", default=0.5, above=0, maximum=1.0,
                                    help="the longest one command to a phone may take, waiting-time "
                                         "extensions included; a stuck phone frees the reader within it"),
    "reopen_seconds": Key("float", default=5.0, above=0, maximum=60,
                          help="how often a missing NFC reader is looked for"),
    "ecp": Key("bool", default=False,
               help="send Apple's Enhanced Contactless Polling frame (PN532/PN533 only, unverified on "
                    "hardware) so an iPhone offers the pass without the user opening Wallet"),
}

ENTRY_KEYS = "entry:nfc_keys"  # offline_data row the Entry backend fills from the API's nfcKeys
KEY_REFRESH_SECONDS = 30.0  # how often the store is asked whether Entry's keys changed
IDLE_POLL_SECONDS = 0.1  # pause between polls of an empty field
AFTER_TAP_SECONDS = 0.25  # pause after a tap before the field is polled again (same phone or next)
REPEAT_LOG_SECONDS = 10.0  # the same failed outcome on a phone left on the reader is logged this often
EMPTY_POLLS_GONE = 3  # empty polls in a row that mean the phone left (one can miss a poll while present)
ISO_DEP = 0x20  # SEL_RES bit: the target speaks ISO 14443-4 (phones, Type 4A)

_LEVEL = {  # how loud each tap outcome is: faults WARNING, the visitor's doing INFO, stray cards DEBUG
    wallet.Outcome.NOT_A_WALLET: logging.DEBUG,
    wallet.Outcome.NO_PASS: logging.INFO,
    wallet.Outcome.LOCKED: logging.INFO,
    wallet.Outcome.USER_ACTION: logging.INFO,
}


class _CappedLink:
    """Stands between nfcpy's ISO-DEP initiator and the frontend: no frame waits past the command's deadline.

    nfcpy retries a silent phone five times and grants every waiting-time extension a phone
    asks for, again and again; left alone, a stuck phone would hold the reader indefinitely.
    """

    def __init__(self, clf: nfc.ContactlessFrontend):
        self.clf = clf
        self.deadline = math.inf

    def exchange(self, data: bytes | bytearray, timeout: float) -> bytearray:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise nfc.clf.TimeoutError("command took longer than exchange_timeout_seconds")
        return self.clf.exchange(data, min(timeout, left) if timeout else left)

    @property
    def max_send_data_size(self) -> int:
        return self.clf.max_send_data_size

    @property
    def max_recv_data_size(self) -> int:
        return self.clf.max_recv_data_size


class _Keys:
    """Wallet keys: key files read once at start, Entry's `nfcKeys` re-read when the store says they changed."""

    def __init__(self, reader: str, config: Config | None):
        self.reader = reader
        self.apple = config.wallet_apple if config else None
        self.google = config.wallet_google if config else None
        self.store_path = config.store.path if config else None
        self.files: list[tuple[str, bytes]] = []
        self.google_file: tuple[str, bytes] | None = None
        self.stamp: float | None = None  # `updated` of the Entry row the keys were built from
        self.checked = -math.inf
        self.keys = wallet.WalletKeys()
        self.loaded = False

    def open(self) -> None:
        """Read key files (in the worker thread: file I/O stays off the event loop)."""
        for path in (self.apple or {}).get("private_key_files", []):
            material = _read_key_file(path, f"[wallet.apple] private_key_files {path}")
            if material is not None:
                self.files.append((path, material))
        if self.google:
            path = self.google.private_key_file
            material = _read_key_file(path, "[wallet.google] private_key_file")
            if material is not None:
                self.google_file = (path, material)

    def _entry_row(self) -> tuple[Any, float] | None:
        """Entry's keys row, through a Store opened for this read only. One kept open would keep its
        read-write connection, and with it SQLite's one mapping of the WAL index in this process, when
        the daemon reopens the store read-only on storage gone read-only (Daemon._follow_storage);
        a write to that mapping there is SIGBUS. For the same reason nothing is opened on such storage."""
        why = unwritable(self.store_path)
        try:
            if why is not None:
                raise StoreError(why)
            store = Store(self.store_path)
            try:
                return store.get_data(ENTRY_KEYS)
            finally:
                store.close()
        except Exception as e:  # noqa: BLE001 - a locked or damaged store must not stop the reader
            log.warning("reader %s: Entry NFC keys not read: %s", self.reader, e)
            return None

    def current(self, now: float) -> wallet.WalletKeys:
        if self.loaded and now - self.checked < KEY_REFRESH_SECONDS:
            return self.keys
        self.checked = now
        entry, stamp = None, None
        row = self._entry_row() if self.store_path else None
        if row is not None:
            entry, stamp = row
        if self.loaded and stamp == self.stamp:
            return self.keys
        apple, google = self.apple or {}, self.google
        keys, problems = wallet.build_keys(
            apple_files=self.files, pass_type_ids=apple.get("pass_type_ids", []),
            google_file=self.google_file,
            collector_id=google.collector_id if google else 0,
            key_version=google.key_version if google else 1, entry=entry)
        for problem in problems:
            log.error("reader %s: wallet key skipped: %s", self.reader, problem,
                      extra={"GATED_EVENT": "nfc_key_error", "GATED_READER": self.reader})
        self.keys, self.stamp, self.loaded = keys, stamp, True
        log.info("reader %s: wallet keys: %s", self.reader, keys.describe(),
                 extra={"GATED_EVENT": "nfc_keys", "GATED_READER": self.reader})
        return keys


def _read_key_file(path: str, where: str) -> bytes | None:
    """The bytes of a private key file (PEM or DER), or a systemd credential of that name.

    Like gated.secrets.read_secret, but binary-safe for DER, and a problem is logged rather than
    raised: the gate keeps reading barcodes when a wallet key is missing.
    """
    candidate = Path(path)
    credential = find_credential(path)
    if credential is not None and not candidate.exists():
        candidate = credential
    else:
        try:
            mode = candidate.stat().st_mode
        except OSError as e:
            log.error("%s: cannot read: %s", where, e.strerror)
            return None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.error("%s: readable by others (mode %03o); private keys must be owner-only: chmod 600 %s",
                      where, stat.S_IMODE(mode), path)
            return None
    try:
        return candidate.read_bytes()
    except OSError as e:
        log.error("%s: cannot read: %s", where, e.strerror)
        return None


class NfcWalletReader(Reader):
    def __init__(self, name: str, section: Section, config: Config | None = None):
        super().__init__(name, section)
        self.config = config
        self.device = section.get("device", "usb")
        self.exchange_timeout = section.get("exchange_timeout_seconds", 0.5)
        self.reopen = section.get("reopen_seconds", 5.0)
        self.ecp = wallet.ecp_vas_frame() if section.get("ecp", False) else None
        apple = config.wallet_apple if config else None
        self.max_age = (apple or {}).get("max_age_seconds", WALLET_APPLE["max_age_seconds"].default)
        self.seen = wallet.SeenCryptograms()
        self._last_outcome: tuple[str, str] | None = None
        self._last_logged = -math.inf
        self._clock_warned = False
        self._ecp_warned = False

    def describe(self) -> str:
        return f"{self.name} (nfc {self.device}{', ECP' if self.ecp else ''})"

    async def scans(self) -> AsyncIterator[Scan]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Scan] = asyncio.Queue()
        stop = threading.Event()
        _quiet_nfcpy()
        thread = threading.Thread(target=self._run, args=(loop, queue, stop), name=f"nfc-{self.name}",
                                  daemon=True)
        thread.start()
        try:
            while True:
                yield await queue.get()
        finally:
            stop.set()
            # The worker finishes its current poll (a few ms on a PN53x) and releases the device,
            # so a reload can open the same reader at once.
            await asyncio.to_thread(thread.join, 2.0)

    # --- the worker thread -------------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, stop: threading.Event) -> None:
        keys = _Keys(self.name, self.config)
        keys.open()
        clf: nfc.ContactlessFrontend | None = None
        missing_since: float | None = None
        empty = 0
        try:
            while not stop.is_set():
                if clf is None:
                    clf, why = self._open()
                    if clf is None:
                        if missing_since is None:
                            missing_since = time.monotonic()
                            log.warning("reader %s: no NFC reader at %s (%s); looking again every %gs",
                                        self.name, self.device, why, self.reopen,
                                        extra={"GATED_EVENT": "reader_lost", "GATED_READER": self.name})
                        else:
                            log.debug("reader %s: still no NFC reader at %s (%s)", self.name, self.device, why)
                        stop.wait(self.reopen)
                        continue
                    if missing_since is not None:
                        log.info("reader %s: NFC reader %s is back after %.0fs", self.name, clf.device,
                                 time.monotonic() - missing_since,
                                 extra={"GATED_EVENT": "reader_back", "GATED_READER": self.name})
                        missing_since = None
                    else:
                        log.info("reader %s: polling for wallet passes with %s", self.name, clf.device,
                                 extra={"GATED_EVENT": "reader_ready", "GATED_READER": self.name})
                try:
                    target = self._sense(clf)
                    if target is None:
                        empty += 1
                        if empty >= EMPTY_POLLS_GONE:  # the phone has left: its next failure is news
                            self._last_outcome = None
                        stop.wait(IDLE_POLL_SECONDS)
                        continue
                    empty = 0
                    if stop.is_set():
                        break
                    scan = self._tap(clf, target, keys.current(time.monotonic()))
                    if scan is not None:
                        loop.call_soon_threadsafe(queue.put_nowait, scan)
                except OSError as e:  # unplugged, or the serial line died: reopen
                    log.warning("reader %s: NFC reader lost (%s); looking again every %gs", self.name,
                                os.strerror(e.errno) if e.errno else e, self.reopen,
                                extra={"GATED_EVENT": "reader_lost", "GATED_READER": self.name})
                    missing_since = time.monotonic()
                    _close(clf)
                    clf = None
                    stop.wait(self.reopen)
                    continue
                except RuntimeError:
                    if loop.is_closed():  # the daemon stopped under us: nobody takes scans any more
                        break
                    raise
                except Exception:
                    log.exception("reader %s: unexpected NFC failure; reopening the reader", self.name,
                                  extra={"GATED_EVENT": "reader_lost", "GATED_READER": self.name})
                    _close(clf)
                    clf = None
                    stop.wait(self.reopen)
                    continue
                stop.wait(AFTER_TAP_SECONDS)
        finally:
            _close(clf)

    def _open(self) -> tuple[nfc.ContactlessFrontend | None, str]:
        clf = nfc.ContactlessFrontend()
        try:
            if clf.open(self.device):
                return clf, ""
            return None, "not found"
        except (OSError, ValueError) as e:
            return None, (os.strerror(e.errno) if getattr(e, "errno", None) else str(e)) or type(e).__name__
        except ImportError as e:  # nfcpy's USB transport without libusb-1.0
            return None, str(e)

    def _sense(self, clf: nfc.ContactlessFrontend) -> Any:
        """Poll 106 kbps Type A once; the field is switched off first, so every tap starts afresh."""
        if self.ecp is not None:
            if isinstance(getattr(clf.device, "chipset", None), nfc.clf.pn53x.Chipset):
                return sense_with_ecp(clf, self.ecp)
            if not self._ecp_warned:
                self._ecp_warned = True
                log.warning("reader %s: ecp = true needs a PN532 or PN533 reader, %s is not one; "
                            "polling without it", self.name, clf.device)
        return clf.sense(nfc.clf.RemoteTarget("106A"))

    def _tap(self, clf: nfc.ContactlessFrontend, target: Any, keys: wallet.WalletKeys) -> Scan | None:
        """Activate the phone, run the wallet flow, and make a Scan of the pass value (None: no pass)."""
        started = time.monotonic()
        if not (target.sel_res and target.sel_res[0] & ISO_DEP):
            self._outcome(wallet.WalletRead(wallet.Outcome.NOT_A_WALLET, detail="not an ISO-DEP card"), started)
            return None
        link = _CappedLink(clf)

        def transceive(command: bytes) -> bytes:
            link.deadline = time.monotonic() + self.exchange_timeout
            return bytes(tag.transceive(bytearray(command)))

        try:
            link.deadline = time.monotonic() + self.exchange_timeout
            tag = nfc.tag.tt4.Type4ATag(link, target)  # RATS through the capped link too
            read = wallet.read_wallet(transceive, keys)
        except (nfc.clf.CommunicationError, nfc.tag.TagCommandError, IndexError, TypeError) as e:
            # The phone left, stalled past the deadline or broke the block protocol: wait for the next tap.
            self._outcome(wallet.WalletRead(wallet.Outcome.ERROR, detail=f"phone stopped answering ({_why(e)})"),
                          started, link_failed=True)
            return None
        self._outcome(read, started)
        if read.outcome is not wallet.Outcome.OK or read.value is None:
            return None
        refused, detail = self._replay_check(read)
        return Scan(token=read.value, reader=self.name, input=self.input, nfc_type=read.wallet,
                    raw_length=len(read.value), refused=refused, refused_detail=detail)

    def _replay_check(self, read: wallet.WalletRead) -> tuple[Reason | None, str]:
        """Apple only: Smart Tap is live-signed per tap, an Apple cryptogram can be captured and replayed."""
        if read.wallet != "apple" or read.timestamp is None:
            return None, ""
        now = time.time()
        if now < EARLIEST_TRUSTED:
            if not self._clock_warned:
                self._clock_warned = True
                log.warning("reader %s: clock untrusted (before 2024); Apple pass freshness is not checked",
                            self.name, extra={"GATED_EVENT": "clock_untrusted", "GATED_READER": self.name})
            stale = None
        else:
            stale = wallet.is_stale(read.timestamp, now, self.max_age)
        if stale is None and self.seen.check(read.cryptogram, time.monotonic(), self.max_age):
            stale = "the same wallet cryptogram was presented before"
        return (Reason.REPLAY, stale) if stale else (None, "")

    def _outcome(self, read: wallet.WalletRead, started: float, link_failed: bool = False) -> None:
        """One log line per tap outcome; a phone left on the reader does not repeat it every poll."""
        ms = (time.monotonic() - started) * 1000
        outcome = "link_failed" if link_failed else str(read.outcome)
        extra = {"GATED_EVENT": "nfc_tap", "GATED_READER": self.name, "GATED_NFC_OUTCOME": outcome,
                 "GATED_NFC_WALLET": read.wallet or "", "GATED_LATENCY_MS": f"{ms:.1f}"}
        if read.outcome is wallet.Outcome.OK:
            log.debug("reader %s: %s pass read (%s, %s) in %.0f ms", self.name, read.wallet,
                      redact(read.value or ""), read.detail, ms, extra=extra)
            self._last_outcome = None
            return
        key = (outcome, read.detail)
        now = time.monotonic()
        if key == self._last_outcome and now - self._last_logged < REPEAT_LOG_SECONDS:
            return
        self._last_outcome, self._last_logged = key, now
        level = logging.INFO if link_failed else _LEVEL.get(read.outcome, logging.WARNING)
        wallet_name = f"{read.wallet} " if read.wallet else ""
        log.log(level, "reader %s: %stap gave no pass: %s: %s (%.0f ms)", self.name, wallet_name,
                outcome.replace("_", " "), read.detail, ms, extra=extra)


def sense_with_ecp(clf: nfc.ContactlessFrontend, frame: bytes) -> Any:
    """Poll Type A; when nothing answers, send Apple's ECP frame in the same field and poll again.

    PN53x only: the frame goes out through InCommunicateThru with its own CRC_A, because after a
    failed poll the chip sends without CRC and keeps REQA's 7-bit framing, which is reset here
    (the sequence of kormax/apple-enhanced-contactless-polling's nfcpy example). An iPhone does
    not answer ECP; it wakes the pass and answers the next poll. Not verified on hardware here.
    """
    with clf.lock:
        device, chipset = clf.device, clf.device.chipset
        clf.target = None
        device.mute()
        target = device.sense_tta(nfc.clf.RemoteTarget("106A"))
        if target is None:
            try:
                chipset.write_register("CIU_BitFraming", 0x00)
                chipset.in_communicate_thru(bytearray(frame), 0.1)
            except nfc.clf.pn53x.Chipset.Error as e:
                if e.errno != 0x01:  # 0x01 is "no answer", the normal case
                    log.debug("ECP frame not sent: %s", e)
            target = device.sense_tta(nfc.clf.RemoteTarget("106A"))
        if target is None:
            device.mute()
        clf.target = target
        return target


def _why(error: Exception) -> str:
    if isinstance(error, nfc.tag.TagCommandError):
        return {nfc.tag.TIMEOUT_ERROR: "timeout", nfc.tag.PROTOCOL_ERROR: "protocol error",
                nfc.tag.RECEIVE_ERROR: "receive error"}.get(error.errno, str(error))
    return str(error) or type(error).__name__


def _close(clf: nfc.ContactlessFrontend | None) -> None:
    if clf is None:
        return
    try:
        clf.close()
    except (OSError, AttributeError):  # a device already gone cannot be closed cleanly
        pass


def _quiet_nfcpy() -> None:
    """nfcpy logs every retry of a failing tap at WARNING/ERROR; our one line per tap says what happened.

    Left alone when someone configured the `nfc` logger on purpose (nfcpy itself sets INFO).
    """
    nfc_log = logging.getLogger("nfc")
    if nfc_log.level in (logging.NOTSET, logging.INFO):
        debugging = logging.getLogger("gated").isEnabledFor(logging.DEBUG)
        nfc_log.setLevel(logging.WARNING if debugging else logging.CRITICAL)


def create(name: str, section: Section, config: Config | None = None) -> Reader:
    return NfcWalletReader(name, section, config)

