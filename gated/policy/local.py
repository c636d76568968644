"""The `local` backend: a ticket list file and barcode masks, for events with no ticketing API.

The list is a CSV file with a header row: `token` (required), and optionally `valid_from` and
`valid_until` (ISO 8601 or unix seconds), `name`, `max_entries`. It is imported into the store
when its size or modification time changes, so a million tickets cost no memory in the daemon.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator
from typing import Any

from gated.config import Config
from gated.errors import GatedError
from gated.model import Decision, Reason, Scan, ScanMode, admit, deny
from gated.policy.base import Backend
from gated.policy.masks import MaskSet
from gated.progress import Progress
from gated.schema import Key
from gated.store import Store, StoreThread
from gated.timeparse import parse_time

log = logging.getLogger(__name__)

SCHEMA = {
    "tickets": Key("path", default="", help="CSV ticket list with a header row; `token` column required"),
    "masks": Key("strlist", default=[], help='barcode masks: "#" a digit, "?" any character, "*" any run'),
}


class TicketListError(GatedError, ValueError):
    """The ticket list file cannot be read; the message names the file and line."""


def read_ticket_csv(path: str) -> Iterator[dict[str, Any]]:
    """Yield ticket rows from a CSV file, raising TicketListError naming the line at fault."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise TicketListError(f"{path}: {e.strerror}") from None
    with f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "token" not in reader.fieldnames:
            raise TicketListError(f"{path}: the first line must be a header naming a `token` column "
                                  f"(found {reader.fieldnames or 'nothing'})")
        for row in reader:
            line = reader.line_num
            token = (row.get("token") or "").strip()
            if not token:
                continue
            try:
                valid_from = parse_time(row.get("valid_from"))
                valid_until = parse_time(row.get("valid_until"))
                max_entries = int(row.get("max_entries") or 1)
            except ValueError as e:
                raise TicketListError(f"{path}, line {line}: {e}") from None
            yield {"token": token, "ticket_key": token, "name": row.get("name") or None,
                   "valid_from": valid_from, "valid_until": valid_until, "max_entries": max_entries}


class LocalBackend(Backend):
    name = "local"
    online = False

    def __init__(self, config: Config):
        super().__init__(config)
        self.masks = MaskSet(self.options.get("masks", []))
        self.tickets_path: str = self.options.get("tickets", "")

    def describe(self) -> str:
        parts = []
        if self.tickets_path:
            parts.append(f"tickets {self.tickets_path}")
        if len(self.masks):
            parts.append(f"masks: {len(self.masks)}")
        return "local (" + (", ".join(parts) or "no tickets, no masks: every scan is denied") + ")"

    async def validate(self, scan: Scan, scan_mode: ScanMode) -> Decision:
        raise AssertionError("the local backend has no online API")

    async def sync(self, store: StoreThread) -> None:
        """Import the ticket list when the file changed since the last import."""
        if not self.tickets_path:
            return
        try:
            st = os.stat(self.tickets_path)
        except OSError as e:
            log.warning("ticket list %s unreadable (%s); keeping the %s tickets already loaded",
                        self.tickets_path, e.strerror, await store.call(Store.ticket_count, self.name))
            return
        stamp = f"{self.tickets_path}:{st.st_size}:{st.st_mtime_ns}"
        if await store.call(Store.get, "local:tickets_stamp") == stamp and \
                await store.call(Store.list_usable, self.name):
            return
        try:
            n = await store.call(_import, self.tickets_path)
        except TicketListError as e:
            log.error("ticket list not loaded: %s; keeping the previous list", e)
            return
        await store.call(Store.set, "local:tickets_stamp", stamp)
        log.info("ticket list %s loaded: %d tickets", self.tickets_path, n)

    def data_age(self, store: Store, now: float) -> float | None:
        # The list is the authority itself, not a copy of a server's data: it cannot go stale.
        return 0.0

    def decide_offline(self, store: Store, scan: Scan, scan_mode: ScanMode, now: float,
                       clock_trusted: bool) -> Decision:
        ticket = store.ticket(self.name, scan.token) if self.tickets_path else None
        if ticket is not None:
            name = ticket["name"] or ""
            key = dict(backend=self.name, message=name, ticket_key=ticket["ticket_key"],
                       max_entries=ticket["max_entries"])
            if clock_trusted:
                if ticket["valid_from"] is not None and now < ticket["valid_from"]:
                    return deny(Reason.NOT_YET_VALID, **key)
                if ticket["valid_until"] is not None and now > ticket["valid_until"]:
                    return deny(Reason.EXPIRED, **key)
            return admit(Reason.OK, **key)
        mask = self.masks.match(scan.token)
        if mask is not None:
            return admit(Reason.OK, backend=self.name, message=f"mask {mask}", ticket_key=scan.token)
        return deny(Reason.UNKNOWN, backend=self.name)


def _import(store: Store, path: str) -> int:
    # A big list takes seconds: show it on a terminal (Progress is silent under systemd and in pipes).
    with Progress(f"importing {os.path.basename(path)}") as progress:
        return store.load_tickets(LocalBackend.name, read_ticket_csv(path),
                                  on_chunk=lambda n: progress.update(n, note="tickets"))


def create(config: Config) -> Backend:
    return LocalBackend(config)
