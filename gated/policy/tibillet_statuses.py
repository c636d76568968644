"""TiBillet's ticket statuses: the texts its server sends, in gated's words, and the list-file row of
one `list_tickets` item (for offline decisions, gated/policy/tibillet.py)."""

from __future__ import annotations

from typing import Any

from gated.errors import Unreachable
from gated.model import Reason
from gated.policy.answer import ID_LIMIT, cut, ident, text

# TiBillet sends `get_status_display()`, translated by the server's LANGUAGE_CODE (Lespass ships
# English and French, French by default). Only "valid and not scanned" may enter.
STATUSES = {
    "valid and not scanned": "valid", "valide et non scanné": "valid",
    "valid and scanned": "scanned", "valide et scanné": "scanned",
    "canceled": "canceled", "annulé": "canceled",
    "created": "unpaid", "créé": "unpaid",
    "inactive": "inactive",
}
STATUS_REASONS = {"scanned": Reason.ALREADY_USED, "canceled": Reason.CANCELED, "unpaid": Reason.NOT_PAID,
                  "inactive": Reason.REJECTED}



def status_of(display: str) -> str:
    """The status word gated uses for a TiBillet status text; "unknown:<text>" for one it does not know."""
    return STATUSES.get(display.strip().lower(), f"unknown:{display}")


def status_row(item: Any, event_uuid: str | None) -> dict[str, Any] | None:
    """The list-file row of one `list_tickets` item, or None for an item that names no ticket.

    A field in the wrong shape costs that field, never the download: a name becomes empty, a status
    that cannot be read is `unknown:…`, which denies offline (a canceled ticket must not pass by its
    signature because its status came in a shape gated did not expect).
    """
    if not isinstance(item, dict):
        return None
    try:
        uuid = ident(item.get("uuid"), "ticket uuid")
    except Unreachable:
        return None
    if uuid is None:
        return None

    def field(key: str) -> str:
        try:
            return text(item.get(key), key, limit=100)
        except Unreachable:
            return ""

    status = field("status")
    name = " ".join(field(k) for k in ("first_name", "last_name")).strip()
    return {"token": uuid, "ticket_key": uuid, "name": name, "event_id": event_uuid,
            "status": cut(status_of(status) if status else "unknown:(unreadable)", ID_LIMIT)}
