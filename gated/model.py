"""The types that cross module boundaries: Scan in, Decision out, one Reason vocabulary."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from enum import StrEnum


class Verdict(StrEnum):
    ADMIT = "admit"
    DENY = "deny"


class Source(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    MODE = "mode"  # decided by the lane's mode (free, locked, emergency), no ticket check


class InputKind(StrEnum):
    BARCODE = "barcode"
    QR = "qr"
    NFC = "nfc"


class ScanMode(StrEnum):
    ENTRY = "entry"
    EXIT = "exit"


class Reason(StrEnum):
    """One vocabulary across backends; each Decision keeps the backend's own code beside it."""

    OK = "ok"
    FREE = "free"  # lane in free mode
    EMERGENCY = "emergency"  # emergency input active: free passage
    FALLBACK_ADMIT = "fallback_admit"  # [offline] fallback = "admit" decided
    ALREADY_USED = "already_used"
    UNKNOWN = "unknown"
    NOT_PAID = "not_paid"
    CANCELED = "canceled"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_EVENT = "wrong_event"
    PRODUCT_NOT_ALLOWED = "product_not_allowed"
    MALFORMED = "malformed"
    INVALID_SIGNATURE = "invalid_signature"
    REVOKED = "revoked"
    BLOCKED = "blocked"
    INVALID_TIME = "invalid_time"  # outside the ticket's validity, and the backend did not say which side
    RULES = "rules"  # a check-in rule configured in the backend refused it (pretix `rules`)
    NOT_APPROVED = "not_approved"  # the order still awaits the organiser's approval (pretix `unapproved`)
    NOT_CHECKED_IN = "not_checked_in"
    LOCKED = "locked"
    FULL = "full"  # the venue is at [occupancy] capacity: an entry waits for someone to leave
    OFFLINE_NO_DATA = "offline_no_data"
    STALE_DATA = "stale_data"
    CLOCK_UNTRUSTED = "clock_untrusted"
    STORE_REPLACED = "store_replaced"  # the store was damaged and replaced: admissions before it are unknown
    REPLAY = "replay"
    AMBIGUOUS = "ambiguous"  # several tickets match the code (pretix: a ticket and its add-ons on the list)
    REJECTED = "rejected"  # the backend said no with a code we have no better word for
    ERROR = "error"  # gated itself failed (store full, bug): deny, logged as a fault


@dataclass(frozen=True)
class Scan:
    """One read of one ticket, as a reader handed it over.

    `received` is monotonic (for latency), `wall` is the wall clock (for records and APIs).
    The nonce is made here so that the online attempt, the offline fallback and the later
    upload all carry the same value and a server can drop duplicates.
    """

    token: str
    reader: str = "cli"
    input: InputKind = InputKind.BARCODE
    nfc_type: str | None = None  # "apple" | "google" for NFC wallet passes
    raw_length: int = 0  # length of what the reader got before normalising
    # A reader that already knows this read must be denied (an Apple wallet payload outside its
    # freshness window, a cryptogram presented twice) says so here. The decider denies it after
    # the lane-mode checks and before any backend is asked, so a replay never burns a ticket.
    refused: Reason | None = None
    refused_detail: str = ""
    received: float = field(default_factory=time.monotonic)
    wall: float = field(default_factory=time.time)
    nonce: str = field(default_factory=lambda: str(uuid.uuid4()))

    def with_token(self, token: str) -> Scan:
        return replace(self, token=token)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: Reason
    source: Source
    backend: str = ""
    message: str = ""  # for the log and the display: the ticket holder's name, the server's text
    backend_code: str = ""  # the backend's own status or reason code, kept verbatim
    ticket_key: str | None = None  # the ticket's identity for anti-passback (one ticket, many codes)
    event_id: str | None = None
    max_entries: int = 1  # how many times this ticket may enter (offline anti-passback)
    detail: str = ""  # why an offline fallback happened, for the log
    # Decided offline after an online request whose answer was lost: the API may hold the scan
    # already, and a backend without an idempotency key checks before uploading it (Entry).
    online_unanswered: bool = False

    @property
    def admitted(self) -> bool:
        return self.verdict is Verdict.ADMIT


def admit(reason: Reason = Reason.OK, source: Source = Source.OFFLINE, **kw) -> Decision:
    return Decision(Verdict.ADMIT, reason, source, **kw)


def deny(reason: Reason, source: Source = Source.OFFLINE, **kw) -> Decision:
    return Decision(Verdict.DENY, reason, source, **kw)
