"""Entry V1 payloads, pure (no I/O): reason codes, error messages, events and scan windows, lookup text."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

from gated.model import Reason
from gated.policy.answer import ID_LIMIT, cut
from gated.policy.masks import MaskSet
from gated.timeparse import parse_time

# The spec documents only "OK"; the rest are the codes seen from the simulator and common spellings.
# Masks from Entry are matched on the scan path, compiled once per sync on the first offline scan
# (about 0.4 s at these limits, 2 s for 200 masks of 1,000 characters): a barcode mask is a few
# dozen characters, and an event has at most a few hundred.
MASK_LIMIT = 64
MASKS_PER_EVENT = 2000

REASONS = {
    "OK": Reason.OK, "NOT_FOUND": Reason.UNKNOWN, "INVALID": Reason.UNKNOWN, "INVALID_TICKET": Reason.UNKNOWN,
    "UNKNOWN": Reason.UNKNOWN, "ALREADY_SCANNED": Reason.ALREADY_USED, "ALREADY_USED": Reason.ALREADY_USED,
    "DUPLICATE": Reason.ALREADY_USED, "VOIDED": Reason.CANCELED, "VOID": Reason.CANCELED,
    "CANCELED": Reason.CANCELED, "CANCELLED": Reason.CANCELED, "REFUNDED": Reason.CANCELED,
    "WRONG_EVENT": Reason.WRONG_EVENT, "TOO_EARLY": Reason.NOT_YET_VALID, "TOO_LATE": Reason.EXPIRED,
    "EXPIRED": Reason.EXPIRED, "NOT_CHECKED_IN": Reason.NOT_CHECKED_IN, "NOT_PAID": Reason.NOT_PAID,
    "UNPAID": Reason.NOT_PAID, "BLOCKED": Reason.BLOCKED, "REVOKED": Reason.REVOKED,
}
_KEYWORDS = (("ALREADY", Reason.ALREADY_USED), ("DUPLICATE", Reason.ALREADY_USED), ("VOID", Reason.CANCELED),
             ("CANCEL", Reason.CANCELED), ("REFUND", Reason.CANCELED), ("EARLY", Reason.NOT_YET_VALID),
             ("NOT_STARTED", Reason.NOT_YET_VALID), ("LATE", Reason.EXPIRED), ("EXPIRED", Reason.EXPIRED),
             ("ENDED", Reason.EXPIRED), ("CHECKED_IN", Reason.NOT_CHECKED_IN), ("EVENT", Reason.WRONG_EVENT),
             ("NOT_FOUND", Reason.UNKNOWN), ("UNKNOWN", Reason.UNKNOWN), ("INVALID", Reason.UNKNOWN),
             ("PAID", Reason.NOT_PAID), ("BLOCK", Reason.BLOCKED), ("REVOK", Reason.REVOKED))


def map_reason(status: str, code: str) -> Reason:
    """Entry's status and reasonCode in gated's vocabulary; the caller keeps the code itself."""
    if status == "Admit":
        return Reason.OK
    key = re.sub(r"[^A-Z0-9]+", "_", code.upper()).strip("_")
    reason = REASONS.get(key)
    if reason is not None and reason is not Reason.OK:
        return reason
    return next((r for word, r in _KEYWORDS if word in key), Reason.REJECTED)


@dataclass(frozen=True)
class EntryEvent:
    """One of today's events as offline data: its scan window (unix seconds) and masks."""

    event_id: str
    name: str
    start_text: str | None  # as the API sent them: echoed back in uploads
    end_text: str | None
    scan_start: float | None
    scan_end: float | None
    masks: MaskSet

    def open_at(self, now: float) -> bool:
        return (self.scan_start is None or now >= self.scan_start) and (self.scan_end is None or now <= self.scan_end)

    def distance(self, t: float) -> float:
        """Seconds from t to the scan window (0 inside it)."""
        if self.scan_start is not None and t < self.scan_start:
            return self.scan_start - t
        if self.scan_end is not None and t > self.scan_end:
            return t - self.scan_end
        return 0.0


def venue_time(value: Any, tz: tzinfo | None) -> float | None:
    """An event time from the API: ISO 8601 (without offset: the venue's time zone, else the gate's
    own) or unix seconds. ValueError for anything else, whatever it is (see parse_time)."""
    return parse_time(value, naive=tz)


def parse_events(raw: list[Any], tz: tzinfo | None) -> tuple[list[dict[str, Any]], dict[str, list[str]], list[str]]:
    """Get Events' list -> (events to store, masks by event id, problems to log).

    Each value is checked here, where it enters: an event without a usable id is skipped, a time
    that is not one leaves that side of the window open (as the API's "no limit"), text is cut.
    """
    events, masks, problems = [], {}, []
    for item in raw:
        eid = item.get("eventId") if isinstance(item, dict) else None
        if not isinstance(eid, str) or not eid or len(eid) > ID_LIMIT:
            problems.append(f"an event without a usable eventId was skipped: {cut(str(item), 80)}")
            continue
        window = []
        for field in ("scanStartDateTime", "scanEndDateTime"):
            try:
                window.append(venue_time(item.get(field), tz))
            except ValueError:
                problems.append(f"event {eid}: {field} {cut(repr(item.get(field)), 80)} is not a time; "
                                "no limit on that side")
                window.append(None)
        found = item.get("barcodeMasks") or []
        found = found if isinstance(found, list) else []
        usable = [m for m in found if isinstance(m, str) and 0 < len(m) <= MASK_LIMIT]
        if len(usable) < len(found):
            problems.append(f"event {eid}: {len(found) - len(usable)} barcode mask(s) skipped: not text of 1 to "
                            f"{MASK_LIMIT} characters")
        if len(usable) > MASKS_PER_EVENT:
            problems.append(f"event {eid}: {len(usable)} barcode masks, only the first {MASKS_PER_EVENT} are used")
        masks[eid] = usable[:MASKS_PER_EVENT]
        # Echoed back in uploads as Entry sent them: only text of a sane length is worth echoing.
        start, end = (v if isinstance(v, str) and len(v) <= ID_LIMIT else None
                      for v in (item.get("startDateTime"), item.get("endDateTime")))
        name = item.get("eventName")
        events.append({"eventId": eid, "eventName": cut(name) if isinstance(name, str) else "",
                       "startDateTime": start, "endDateTime": end, "scanStart": window[0], "scanEnd": window[1]})
    return events, masks, problems


def local_iso(ts: float) -> str:
    """A unix time as the gate's local time with its UTC offset, to the second, as the spec's samples."""
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def filename_stamp(ts: float) -> str:
    """The timestamp part of an upload's Filename: UTC to the microsecond, e.g. 20251002T233245123456Z."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y%m%dT%H%M%S%fZ")


def entry_error(body: Any) -> str | None:
    """The message of Entry's error shape ({"error": {"message": [...], "statusCode": n}}), else None."""
    inner = body.get("error") if isinstance(body, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    if isinstance(message, str):
        message = [message]
    if not isinstance(message, list) or not all(isinstance(m, str) for m in message):
        return None
    return cut("; ".join(message))


def lookup_lines(data: Any) -> list[str]:
    if not isinstance(data, dict):
        return ["Ticket Lookup answered with something that is not a ticket"]
    name = " ".join(str(data.get(k) or "") for k in ("firstName", "lastName")).strip()
    venue = data.get("venue") if isinstance(data.get("venue"), dict) else {}
    seat = data.get("seatInfo") if isinstance(data.get("seatInfo"), dict) else {}
    lines = [f"event: {data.get('eventName', '')} ({data.get('eventId', '')}), "
             f"{data.get('eventStartDateTime', '')} to {data.get('eventEndDateTime', '')} {data.get('timeZone', '')}",
             f"venue: {venue.get('name', '')} ({venue.get('code', '')})",
             f"ticket: {data.get('ticket', '')}" + (f", patron {data.get('patronId')}" if data.get("patronId") else "")
             + (f", {name}" if name else "")]
    place = ", ".join(f"{k} {seat[k]}" for k in ("level", "section", "row", "seat") if seat.get(k))
    if place or seat.get("altSeatLocationText"):
        alt = seat.get("altSeatLocationText")
        lines.append(f"seat: {place}" + (f" ({alt})" if alt else ""))
    history = [h for h in data.get("scanHistory") or [] if isinstance(h, dict)]
    lines.append(f"scan history at Entry: {len(history)}")
    for h in history:
        kind = h.get("nfcType") or h.get("barcodeType") or ""
        lines.append(f"  {h.get('scanTimestamp', '')} {h.get('scanMode', '')} {h.get('status', '')} "
                     f"{h.get('reasonCode', '')} \"{h.get('reasonMessage', '')}\" {h.get('inputType', '')} {kind} "
                     f"at {h.get('checkpointName', '')}, device {h.get('serialNumber', '')} "
                     f"({h.get('deviceStatus', '')}{', test' if h.get('testMode') else ''})")
    return lines
