"""The `local` backend: a ticket list file and barcode masks, for events with no ticketing API.

The list is a CSV file with a header row: `token` (required), and optionally `valid_from` and
`valid_until` (ISO 8601 or unix seconds), `name`, `max_entries`. It is imported into the store
when its size or modification time changes, so a million tickets cost no memory in the daemon.
A file with one bad row is not loaded at all; the previous list stays (see read_ticket_csv).
"""

from __future__ import annotations

import codecs
import csv
import logging
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

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


# One bad row refuses the whole file, and the previous list stays in use. The list is the gate's
# only authority: a list loaded without its bad rows denies those tickets as "unknown", which at
# the gate looks like a forged ticket, and the most common bad rows (a file saved in another
# encoding, a quote never closed, which swallows every row after it) mean the rest of the file is
# wrong too. The error names the file and line, and `gated check` and `gated doctor` show it
# before the daemon ever reads the file.
MAX_LINE_BYTES = 1024 * 1024
MAX_FIELD_CHARS = 128 * 1024  # csv's own default limit
MAX_ENTRIES = 1_000_000
MAX_NAME_CHARS = 256  # shown in log lines and on the terminal; a longer one is cut


def _shown(text: str) -> str:
    """A value from the file as it can be quoted in a log line: escaped and short."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _lines(f: BinaryIO, path: str) -> Iterator[str]:
    """The file's lines, each decoded on its own so that an encoding error names its line."""
    number = 0
    while True:
        try:
            raw = f.readline(MAX_LINE_BYTES + 1)
        except OSError as e:
            raise TicketListError(f"{path}, line {number + 1}: {e.strerror or e}") from None
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES:
            raise TicketListError(f"{path}, line {number}: longer than {MAX_LINE_BYTES // 1024} KiB")
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # as Excel saves "CSV UTF-8"
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TicketListError(f"{path}, line {number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                  f"byte {e.start + 1} of the line); save the list as UTF-8 "
                                  "(in Excel: CSV UTF-8)") from None


def _time(row: dict[str, Any], column: str) -> float | None:
    text = row.get(column)
    if not text:
        return None
    try:
        value = parse_time(text)  # ValueError for anything that is no time, nan and year 10000 too
        if value is not None and value < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"{column} = {_shown(text)}: not a time from 1970 to 9999; write ISO 8601 "
                         "(2025-06-01T18:00:00+02:00) or unix seconds") from None
    return value


def _entries(row: dict[str, Any]) -> int:
    text = row.get("max_entries")
    if not text or text == "1":
        return 1
    text = text.strip()
    if not text:
        return 1
    if not (text.isascii() and text.isdigit()) or not 0 <= (value := int(text)) <= MAX_ENTRIES:
        raise ValueError(f"max_entries = {_shown(text)}: must be a whole number from 0 to {MAX_ENTRIES}")
    return value


def read_ticket_csv(path: str) -> Iterator[dict[str, Any]]:
    """Yield ticket rows from a CSV file, raising TicketListError naming the line at fault."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise TicketListError(f"{path}: {e.strerror}") from None
    with f:
        reader = csv.DictReader(_lines(f, path))
        first = 2  # the line the row being read starts on; a quoted field may span lines
        try:
            if not reader.fieldnames or "token" not in reader.fieldnames:
                raise TicketListError(f"{path}: the first line must be a header naming a `token` column "
                                      f"(found {reader.fieldnames or 'nothing'})")
            for row in reader:
                token = (row.get("token") or "").strip()
                if token:
                    try:
                        name = (row.get("name") or "")[:MAX_NAME_CHARS] or None
                        ticket = {"token": token, "ticket_key": token, "name": name,
                                  "valid_from": _time(row, "valid_from"), "valid_until": _time(row, "valid_until"),
                                  "max_entries": _entries(row)}
                    except ValueError as e:
                        raise TicketListError(f"{path}, line {first}: {e}") from None
                    yield ticket
                first = reader.line_num + 1
        except csv.Error as e:
            if "field larger than field limit" in str(e):
                raise TicketListError(f"{path}, line {first}: a field longer than {MAX_FIELD_CHARS // 1024} KiB "
                                      "(is a quote opened there and never closed?)") from None
            raise TicketListError(f"{path}, line {reader.line_num}: {e}") from None


class LocalBackend(Backend):
    name = "local"
    online = False

    def __init__(self, config: Config):
        super().__init__(config)
        self.masks = MaskSet(self.options.get("masks", []))
        self.tickets_path: str = self.options.get("tickets", "")
        self._refused = ""  # the stamp of a file that did not load: not read again until it changes

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
        if stamp == self._refused or (await store.call(Store.get, "local:tickets_stamp") == stamp and
                                      await store.call(Store.list_usable, self.name)):
            return
        try:
            n = await store.call(_import, self.tickets_path)
        except TicketListError as e:
            self._refused = stamp
            log.error("ticket list not loaded: %s; keeping the previous list (%s tickets) until the file is "
                      "fixed", e, await store.call(Store.ticket_count, self.name),
                      extra={"GATED_EVENT": "list_refused"})
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
