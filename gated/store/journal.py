"""The scan journal (every scan and its decision, committed before the gate acts), the admissions
anti-passback counts, and the upload queue drained by gated/upload.py."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gated.model import Decision, Scan, ScanMode
from gated.tokens import token_hash

# Upload states of a scan row.
NONE, PENDING, SENT, PARKED = "none", "pending", "sent", "parked"


@dataclass(frozen=True)
class QueueStats:
    pending: int
    parked: int
    oldest_pending: float | None  # wall time of the oldest scan waiting for upload


class ScanJournal:
    """Store's scan journal. Uses the Store's `db`, `_write`, `_one` and `_high_water`."""

    def record(
        self,
        scan: Scan,
        decision: Decision,
        *,
        lane: str,
        scan_mode: ScanMode,
        latency_ms: float,
        queue_upload: bool,
    ) -> None:
        """Commit the scan, its decision and (when admitted) the admission, in one transaction."""
        with self._write() as conn:
            conn.execute(
                """INSERT INTO scans (nonce, wall, lane, reader, input, nfc_type, scan_mode, token,
                   token_hash, verdict, reason, source, backend, backend_code, message, ticket_key,
                   event_id, latency_ms, upload, online_unanswered)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (scan.nonce, scan.wall, lane, scan.reader, str(scan.input), scan.nfc_type,
                 str(scan_mode), scan.token, token_hash(scan.token), str(decision.verdict),
                 str(decision.reason), str(decision.source), decision.backend, decision.backend_code,
                 decision.message, decision.ticket_key, decision.event_id, latency_ms,
                 PENDING if queue_upload else NONE, int(decision.online_unanswered)),
            )
            if decision.admitted and decision.ticket_key is not None:
                conn.execute(
                    "INSERT INTO admissions (nonce, key_hash, direction, wall, lane) VALUES (?, ?, ?, ?, ?)",
                    (scan.nonce, token_hash(decision.ticket_key), str(scan_mode), scan.wall, lane),
                )
        self._high_water = max(self._high_water or 0.0, scan.wall)

    def mark_passed(self, nonce: str, passed: bool) -> None:
        with self._write() as conn:
            conn.execute("UPDATE scans SET passed = ? WHERE nonce = ?", (int(passed), nonce))
            if not passed:
                # Nobody went through: the ticket was not used, so it may enter again.
                conn.execute("DELETE FROM admissions WHERE nonce = ?", (nonce,))

    def scan(self, nonce: str) -> dict[str, Any] | None:
        cur = self.db.conn.execute("SELECT * FROM scans WHERE nonce = ?", (nonce,))
        row = cur.fetchone()
        return dict(zip([c[0] for c in cur.description], row, strict=True)) if row else None

    def history(self, token: str, limit: int = 20) -> list[dict[str, Any]]:
        return list(self.db.query(
            "SELECT wall, lane, reader, scan_mode, verdict, reason, source, message FROM scans "
            "WHERE token_hash = ? ORDER BY id DESC LIMIT ?", (token_hash(token), limit)))

    def count(self, where: str = "1", params: Iterable[Any] = ()) -> int:
        return self._one(f"SELECT count(*) FROM scans WHERE {where}", params)  # noqa: S608 (callers pass literals)

    def high_water(self) -> float | None:
        """The newest wall time ever recorded: a clock earlier than this is not trusted."""
        return self._high_water

    def _max_wall(self) -> float | None:
        return self._one("SELECT max(wall) FROM scans")


class Admissions:
    """Store's anti-passback counts, this lane's and other lanes' (MQTT). Uses the Store's `db`,
    `_write`, `_one` and `_shared_hash`."""

    def online_requests(self, token: str, scan_mode: str, wall: float, window: float) -> tuple[int, int]:
        """(answered, unanswered): this lane's scans of `token` that went to the API within `window` of `wall`."""
        row = self.db.conn.execute(
            "SELECT coalesce(sum(source = 'online'), 0), coalesce(sum(online_unanswered), 0) FROM scans "
            "WHERE token_hash = ? AND scan_mode = ? AND wall BETWEEN ? AND ?",
            (token_hash(token), scan_mode, wall - window, wall + window)).fetchone()
        return row[0], row[1]

    def admissions_near(self, ticket_key: str, direction: str, wall: float, window: float, but: str) -> int:
        """Admissions of a ticket within `window` of `wall`, this lane's and shared ones, other than scan `but`."""
        return self._one("SELECT count(*) FROM admissions WHERE key_hash IN (?, ?) AND direction = ? "
                         "AND wall BETWEEN ? AND ? AND nonce != ?",
                         (*self._identity_keys(ticket_key), direction, wall - window, wall + window, but))

    def inside(self, ticket_key: str) -> tuple[int, int]:
        """(entries, exits) recorded for a ticket identity, from every lane that shared it.

        This lane's admissions are keyed by SHA-256 of the identity, other lanes' by the venue-keyed
        HMAC they were shared as (one key cannot be turned into the other): both are counted.
        """
        rows = self.db.conn.execute(
            "SELECT direction, count(*) FROM admissions WHERE key_hash IN (?, ?) GROUP BY direction",
            self._identity_keys(ticket_key)).fetchall()
        counts = dict(rows)
        return counts.get("entry", 0), counts.get("exit", 0)

    def admission_times(self, ticket_key: str) -> list[tuple[float, str]]:
        """(time, entry|exit) of every admission of a ticket at this venue's lanes, oldest first (keyed as in
        inside()): what a backend's own offline rules count, e.g. pretix's entries_today."""
        return sorted(self.db.conn.execute("SELECT wall, direction FROM admissions WHERE key_hash IN (?, ?)",
                                           self._identity_keys(ticket_key)).fetchall())

    def _identity_keys(self, ticket_key: str) -> tuple[str, str]:
        local = token_hash(ticket_key)
        return local, self._shared_hash(ticket_key) if self._shared_hash is not None else local

    def share_identities(self, shared_hash: Callable[[str], str] | None) -> None:
        """Count admissions shared by other lanes, keyed by `shared_hash(ticket identity)`, in inside()."""
        self._shared_hash = shared_hash

    def record_shared(self, rows: Iterable[tuple[str, str, str, float, str]]) -> int:
        """Record other lanes' admissions, (nonce, key_hash, direction, wall, lane) each; returns how many
        were new. A message delivered twice (MQTT QoS 1 is at-least-once) is recorded once, by its nonce."""
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO admissions (nonce, key_hash, direction, wall, lane) "
                             "VALUES (?, ?, ?, ?, ?)", rows)
            return conn.total_changes - before

    def occupancy_counts(self, since: float) -> tuple[int, int]:
        """(entries, exits): people through this lane since `since` (gated.occupancy). An admit counts
        unless its passage sensor said nobody passed (passed = 0); scans_wall keeps it one range scan."""
        row = self.db.conn.execute(
            "SELECT coalesce(sum(scan_mode = 'entry'), 0), coalesce(sum(scan_mode = 'exit'), 0) FROM scans "
            "WHERE wall >= ? AND verdict = 'admit' AND coalesce(passed, 1) = 1", (since,)).fetchone()
        return row[0], row[1]


class UploadQueue:
    """Store's upload queue: scan rows by upload state. Uses the Store's `db` and `_write`."""

    def pending(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self.db.query(
            "SELECT * FROM scans WHERE upload = 'pending' ORDER BY id LIMIT ?", (limit,)))

    def mark_sent(self, nonces: Iterable[str], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.executemany("UPDATE scans SET upload = 'sent', uploaded_at = ?, upload_error = NULL "
                             "WHERE nonce = ? AND upload = 'pending'", [(now, n) for n in nonces])

    def mark_parked(self, nonce: str, error: str) -> None:
        with self._write() as conn:
            conn.execute("UPDATE scans SET upload = 'parked', upload_error = ?, attempts = attempts + 1 "
                         "WHERE nonce = ?", (error, nonce))

    def mark_failed(self, nonces: Iterable[str], error: str) -> None:
        with self._write() as conn:
            conn.executemany("UPDATE scans SET attempts = attempts + 1, upload_error = ? WHERE nonce = ?",
                             [(error, n) for n in nonces])

    def retry_parked(self) -> int:
        with self._write() as conn:
            return conn.execute("UPDATE scans SET upload = 'pending' WHERE upload = 'parked'").rowcount

    def queue_stats(self) -> QueueStats:
        row = self.db.conn.execute(
            "SELECT sum(upload = 'pending'), sum(upload = 'parked'), "
            "min(CASE WHEN upload = 'pending' THEN wall END) FROM scans "
            "WHERE upload IN ('pending', 'parked')").fetchone()
        return QueueStats(row[0] or 0, row[1] or 0, row[2])

    def parked(self) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT * FROM scans WHERE upload = 'parked' ORDER BY id"))

    def prune(self, retention_seconds: float, now: float | None = None) -> int:
        """Forget the tokens of uploaded scans and delete rows older than the retention time."""
        now = time.time() if now is None else now
        with self._write() as conn:
            conn.execute("UPDATE scans SET token = NULL WHERE token IS NOT NULL "
                         "AND upload IN ('sent', 'none') AND wall < ?", (now - 3600,))
            gone = conn.execute("DELETE FROM scans WHERE upload IN ('sent', 'none') AND wall < ?",
                                (now - retention_seconds,)).rowcount
            conn.execute("DELETE FROM admissions WHERE wall < ?", (now - retention_seconds,))
        return gone
