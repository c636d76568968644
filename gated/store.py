"""Record every scan durably before the gate acts, and keep the queue, offline data and sessions.

One SQLite file (WAL, synchronous=FULL), and beside it a folder of ticket list files, one per
list (see load_tickets). A Store object belongs to one thread: the daemon gives the scan path its
own Store on a single worker thread, and the uploader and syncer open their own, so a long sync
never holds the scan path's connection.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import sqlite3
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from gated.errors import GatedError, StoreError
from gated.model import Decision, Scan, ScanMode
from gated.tokens import token_hash

migrations = Migrations("gated")

# Upload states of a scan row.
NONE, PENDING, SENT, PARKED = "none", "pending", "sent", "parked"

# SQLite's result codes for a file that is damaged or is not a database at all.
_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
# The WAL is kept at up to this size and written over (Store.checkpoint): minutes of a busy lane's
# scans, and what it holds back on a nearly full card. Beyond it, it is cut back in steps.
WAL_KEEP_BYTES = 16 * 1024 * 1024
WAL_SHRINK_STEP = 4 * 1024 * 1024
_WAL_FRAME_BYTES = 4096 + 24  # a page of SQLite's default size and its frame header
# kv key: set in the fresh store that replaced a damaged one (Store.note_replaced).
REPLACED_KEY = "store_replaced"


class StoreCorrupt(StoreError):
    """The store file is damaged or not an SQLite database; `quarantine()` moves it aside."""


@migrations()
def m001_initial(db: Database) -> None:
    db.execute("""
        CREATE TABLE scans (
            id INTEGER PRIMARY KEY,
            nonce TEXT NOT NULL UNIQUE,
            wall REAL NOT NULL,
            lane TEXT NOT NULL,
            reader TEXT NOT NULL,
            input TEXT NOT NULL,
            nfc_type TEXT,
            scan_mode TEXT NOT NULL,
            token TEXT,
            token_hash TEXT NOT NULL,
            verdict TEXT NOT NULL,
            reason TEXT NOT NULL,
            source TEXT NOT NULL,
            backend TEXT NOT NULL,
            backend_code TEXT NOT NULL DEFAULT '',
            message TEXT NOT NULL DEFAULT '',
            ticket_key TEXT,
            event_id TEXT,
            latency_ms REAL,
            passed INTEGER,
            upload TEXT NOT NULL DEFAULT 'none',
            attempts INTEGER NOT NULL DEFAULT 0,
            upload_error TEXT,
            uploaded_at REAL
        )""")
    db.execute("CREATE INDEX scans_pending ON scans(id) WHERE upload = 'pending'")
    db.execute("CREATE INDEX scans_wall ON scans(wall)")
    db.execute("""
        CREATE TABLE admissions (
            nonce TEXT PRIMARY KEY,
            key_hash TEXT NOT NULL,
            direction TEXT NOT NULL,
            wall REAL NOT NULL,
            lane TEXT NOT NULL
        )""")
    db.execute("CREATE INDEX admissions_key ON admissions(key_hash)")
    db.execute("""
        CREATE TABLE tickets (
            backend TEXT NOT NULL,
            token TEXT NOT NULL,
            ticket_key TEXT,
            name TEXT,
            valid_from REAL,
            valid_until REAL,
            status TEXT,
            max_entries INTEGER NOT NULL DEFAULT 1,
            event_id TEXT,
            data TEXT,
            PRIMARY KEY (backend, token)
        ) WITHOUT ROWID""")
    db.execute("CREATE TABLE offline_data (name TEXT PRIMARY KEY, value TEXT, updated REAL NOT NULL)")
    db.execute("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


@migrations()
def m002_outbox_index(db: Database) -> None:
    # queue_stats() counts pending and parked rows; without this it reads the whole journal.
    db.execute("CREATE INDEX scans_outbox ON scans(upload, wall) WHERE upload IN ('pending', 'parked')")


@migrations()
def m003_ticket_lists_in_files(db: Database) -> None:
    # Ticket lists moved out of the store into files of their own (see Store.load_tickets): the
    # lists a gate holds move with it, so an upgrade offline still admits what it did before.
    path = Path(db.execute("PRAGMA database_list").fetchone()[2])
    current = db.execute("SELECT key, value FROM kv WHERE key LIKE 'tickets:%'").fetchall()
    for key, generation in current:
        name = f"{_file_safe(key[len('tickets:'):])}.{time.time_ns()}.sqlite"
        cur = db.execute("SELECT token, ticket_key, name, valid_from, valid_until, status, max_entries, "
                         "event_id, data FROM tickets WHERE backend = ?", (generation,))
        _build_list(lists_dir(path), name, (dict(zip(_TICKET_COLUMNS, r, strict=True)) for r in cur), 5000, None)
        db.execute("UPDATE kv SET value = ? WHERE key = ?", (name, key))
    db.execute("DELETE FROM kv WHERE key LIKE 'loading:%'")
    db.execute("DROP TABLE tickets")


@migrations()
def m004_online_unanswered(db: Database) -> None:
    # Decision.online_unanswered: the API may hold this scan from a request whose answer was lost.
    db.execute("ALTER TABLE scans ADD COLUMN online_unanswered INTEGER NOT NULL DEFAULT 0")


@dataclass(frozen=True)
class QueueStats:
    pending: int
    parked: int
    oldest_pending: float | None  # wall time of the oldest scan waiting for upload


class Store:
    """The SQLite store. Not thread-safe: use one Store per thread.

    With `read_only_ok`, a store whose storage cannot be written (a filesystem remounted read-only,
    an immutable file) is opened read-only instead of refused: offline data and admissions can
    still be read, and every write raises StoreError. `read_only` then says why.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only_ok: bool = False):
        self.path = Path(path)
        self.read_only = unwritable(self.path) if read_only_ok and self.path.exists() else None
        self._lists: dict[str, _ListFile] = {}  # list -> its current file, open
        if self.read_only is not None:
            self._open_read_only()
            self._shared_hash: Callable[[str], str] | None = None
            self._shm_fd: int | None = None
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if not self.path.exists():
                # The store holds API sessions and credentials: owner-only from the first byte.
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self.db = Database(str(self.path), execute_plugins=False)
            conn = self.db.conn
            conn.execute("PRAGMA busy_timeout = 5000")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous = FULL")
            # Checkpoints fsync the whole WAL: run them off the scan path (see checkpoint()).
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            conn.execute("PRAGMA foreign_keys = ON")
            sync = conn.execute("PRAGMA synchronous").fetchone()[0]
            if mode.lower() != "wal" or sync != 2:
                raise StoreError(f"{self.path}: SQLite refused WAL/synchronous=FULL "
                                 f"(journal_mode={mode}, synchronous={sync})")
            migrations.apply(self.db)
            self._high_water = self._max_wall()
            self._wal_frames = 0  # the WAL's frames at this connection's last checkpoint
        except sqlite3.DatabaseError as e:
            if getattr(self, "db", None) is not None:
                self.db.close()
            if getattr(e, "sqlite_errorcode", None) in _CORRUPT_CODES:
                raise StoreCorrupt(f"{self.path}: {e}") from e
            raise StoreError(f"{self.path}: {e}") from e
        except OSError as e:
            raise StoreError(f"{self.path}: {e.strerror or e}") from e
        # With [mqtt] sharing on: the venue-keyed hash of a ticket identity (gated.mqtt), the form
        # in which other lanes' admissions arrive. None: only this lane's admissions count.
        self._shared_hash: Callable[[str], str] | None = None
        self._shm_fd: int | None = None  # the WAL index, for check_writable()

    def _open_read_only(self) -> None:
        """Open with SQLite's `mode=ro`: it reads the WAL too, through a WAL index it never writes.

        Safe only while no read-write connection to the file is open in this process: SQLite shares
        one mapping of the WAL index per file and process, and that one would be written (SIGBUS).
        """
        try:
            conn = _connect_read_only(self.path)
            conn.execute("PRAGMA busy_timeout = 5000")
            self.db = Database(conn, execute_plugins=False)
            if migrations.pending(self.db):
                self.db.close()
                raise StoreError(f"{self.path}: cannot be written ({self.read_only}), and this version of "
                                 "gated must first upgrade it")
            self._high_water = self._max_wall()
        except sqlite3.DatabaseError as e:
            if getattr(self, "db", None) is not None:
                self.db.close()
            if getattr(e, "sqlite_errorcode", None) in _CORRUPT_CODES:
                raise StoreCorrupt(f"{self.path}: {e}") from e
            raise StoreError(f"{self.path}: cannot be written ({self.read_only}) and not read: {e}") from e
        self._wal_frames = 0

    def check_writable(self) -> None:
        """StoreError, before SQLite touches the files, when their filesystem cannot be written.

        Every transaction, a read too, writes to the WAL index (`gated.db-shm`), which SQLite maps
        into memory. On a filesystem gone read-only (an SD card's errors=remount-ro) or an immutable
        file, that write is not an error SQLite can return but SIGBUS, which kills the daemon. Two
        syscalls per store call turn it into a StoreError, which [store] on_error handles per scan.
        A store opened read-only writes nothing there, so it may go on reading.
        """
        if self.read_only is not None:
            return
        try:
            readonly = os.statvfs(self.path.parent).f_flag & os.ST_RDONLY
            if self._shm_fd is None and os.path.exists(f"{self.path}-shm"):
                # Kept open: SQLite removes the file only when the last connection, ours too, closes.
                self._shm_fd = os.open(f"{self.path}-shm", os.O_RDONLY | os.O_NOFOLLOW)
            immutable = self._shm_fd is not None and _immutable(self._shm_fd)
        except OSError as e:
            raise StoreError(f"{self.path}: {e.strerror or e}") from e
        if readonly:
            raise StoreError(f"{self.path}: the filesystem is read-only")
        if immutable:
            raise StoreError(f"{self.path}-shm: the file is immutable (chattr +i)")

    def close(self) -> None:
        # The last connection to close checkpoints the WAL, writing the mapped WAL index: on a
        # store that cannot be written any more that is SIGBUS at stop. Closed without it then.
        # If that cannot be switched off, the connection is left open (kept referenced) instead.
        skip_checkpoint = self.read_only is None and unwritable(self.path) is not None
        for listed in self._lists.values():
            if skip_checkpoint and not _no_checkpoint_on_close(listed.conn):
                _NOT_CLOSED.append(listed.conn)
                continue
            listed.close()
        self._lists.clear()
        if self._shm_fd is not None:
            os.close(self._shm_fd)
            self._shm_fd = None
        if skip_checkpoint and not _no_checkpoint_on_close(self.db.conn):
            _NOT_CLOSED.append(self.db.conn)
            return
        self.db.close()

    @staticmethod
    def looks_like_a_store(path: str | os.PathLike[str]) -> bool:
        """An SQLite file (its header), or named like one: only such a file may be moved aside as damaged."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                header = f.read(16)
        except OSError:
            return False
        return header == b"SQLite format 3\x00" or path.suffix in (".db", ".sqlite", ".sqlite3")

    @staticmethod
    def quarantine(path: str | os.PathLike[str], now: float | None = None) -> Path:
        """Move a damaged store (with its -wal and -shm) aside as PATH.corrupt-<time>; return the new name.

        Nothing is deleted: the queue and sessions in it can still be read out by hand.
        """
        path = Path(path)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(time.time() if now is None else now))
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                side.rename(target.with_name(target.name + suffix))
        path.rename(target)
        return target

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.read_only is not None:
            raise StoreError(f"{self.path}: cannot be written: {self.read_only}")
        try:
            with self.db.atomic():
                yield self.db.conn
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: {e}") from e

    def _one(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = self.db.conn.execute(sql, tuple(params)).fetchone()
        return row[0] if row else None

    # --- the scan journal -------------------------------------------------------------------

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

    # --- anti-passback ---------------------------------------------------------------------

    def online_requests(self, token: str, scan_mode: str, wall: float, window: float) -> tuple[int, int]:
        """(answered, unanswered): this lane's scans of `token` that went to the API within `window` of `wall`."""
        row = self.db.conn.execute(
            "SELECT coalesce(sum(source = 'online'), 0), coalesce(sum(online_unanswered), 0) FROM scans "
            "WHERE token_hash = ? AND scan_mode = ? AND wall BETWEEN ? AND ?",
            (token_hash(token), scan_mode, wall - window, wall + window)).fetchone()
        return row[0], row[1]

    def admissions_near(self, ticket_key: str, direction: str, wall: float, window: float, but: str) -> int:
        """Admissions of a ticket within `window` of `wall`, this lane's and shared ones, other than scan `but`."""
        local = token_hash(ticket_key)
        shared = self._shared_hash(ticket_key) if self._shared_hash is not None else local
        return self._one("SELECT count(*) FROM admissions WHERE key_hash IN (?, ?) AND direction = ? "
                         "AND wall BETWEEN ? AND ? AND nonce != ?",
                         (local, shared, direction, wall - window, wall + window, but))

    def inside(self, ticket_key: str) -> tuple[int, int]:
        """(entries, exits) recorded for a ticket identity, from every lane that shared it.

        This lane's admissions are keyed by SHA-256 of the identity, other lanes' by the venue-keyed
        HMAC they were shared as (one key cannot be turned into the other): both are counted.
        """
        local = token_hash(ticket_key)
        shared = self._shared_hash(ticket_key) if self._shared_hash is not None else local
        rows = self.db.conn.execute(
            "SELECT direction, count(*) FROM admissions WHERE key_hash IN (?, ?) GROUP BY direction",
            (local, shared)).fetchall()
        counts = dict(rows)
        return counts.get("entry", 0), counts.get("exit", 0)

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

    # --- the upload queue ------------------------------------------------------------------

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

    def checkpoint(self) -> int:
        """Fold the WAL back into the database; call it from a background task, not the scan path.
        When every frame was copied (the next commit then starts the WAL again from its start),
        returns how many frames were written since this connection's last checkpoint; else -1.

        PASSIVE: it never makes a scan's commit wait. The next commit then writes the WAL again from
        its start, over blocks the file already has, so its fdatasync has no new size or blocks for
        the filesystem's journal: one device write and a flush instead of a journal commit through
        the kernel's workers, which a busy CPU keeps waiting (commit p50 0.62 -> 0.41 ms on the CI
        VM, 3.9 -> 2.2 device writes a commit). Truncating the WAL here would make every commit
        grow the file again; a WAL grown past WAL_KEEP_BYTES by a burst is cut back by cut_wal().
        """
        if self.read_only is not None:
            return -1
        busy, frames, copied = self.db.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        # Fewer frames than last time: the WAL was started again in between, all of them are new.
        new = frames - self._wal_frames if frames >= self._wal_frames else frames
        self._wal_frames = max(frames, 0)
        return new if not busy and frames > 0 and copied == frames else -1

    def cut_wal(self) -> bool:
        """After a complete checkpoint, cut a WAL larger than WAL_KEEP_BYTES by WAL_SHRINK_STEP; True
        when more is left to cut (after the next checkpoint).

        Run it on the scan path's own connection, a step at a time between scans: the cut is made
        by a small commit of ours, holding the write lock while the filesystem frees the blocks.
        Cut in one go (SQLite's journal_size_limit on every connection), 70 MB on a filesystem
        mounted with `discard` held the scan that made the commit 42 ms on the CI VM; and a scan
        waiting for another connection's lock sleeps in SQLite's busy handler (1, 2, 5, 10 ms...).
        """
        if self.read_only is not None:
            return False
        conn = self.db.conn
        try:
            size = os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            return False
        if size <= WAL_KEEP_BYTES:
            return False
        target = max(WAL_KEEP_BYTES, size - WAL_SHRINK_STEP)
        # A PRAGMA takes no parameters; the value is an int computed here.
        conn.execute(f"PRAGMA journal_size_limit = {target}")
        try:
            self.set("wal_cut", repr(time.time()))  # starts the WAL again, and cuts it to the limit
        finally:
            conn.execute("PRAGMA journal_size_limit = -1")  # scans' commits never cut it
        # Not cut: another connection still reads the old frames; the next round tries again.
        return target > WAL_KEEP_BYTES and os.stat(f"{self.path}-wal").st_size < size

    # --- offline data ----------------------------------------------------------------------

    def put_data(self, name: str, value: Any, updated: float | None = None) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO offline_data (name, value, updated) VALUES (?, ?, ?)",
                         (name, json.dumps(value), time.time() if updated is None else updated))

    def get_data(self, name: str) -> tuple[Any, float] | None:
        row = self.db.conn.execute("SELECT value, updated FROM offline_data WHERE name = ?",
                                   (name,)).fetchone()
        return (json.loads(row[0]), row[1]) if row else None

    # Ticket lists live beside the store, one SQLite file per list and generation, in
    # `<store>-tickets/`; the store's kv names the current file of each list (`tickets:<list>`).
    # A new generation is built in its own file, with no journal and no fsync until it is
    # complete, then switched to in one short commit of the store. Written into the store itself,
    # a list arriving in random order rewrote the same B-tree pages commit after commit: 750 MB
    # written for 100,000 CM.com barcodes (34 MB of data), an SD card's whole write budget for
    # minutes, and every scan's fsync queued behind it. The old file is unlinked by the loader;
    # a process still reading it lets it go off its scan path (_ListFile.retire).

    @property
    def lists_dir(self) -> Path:
        return lists_dir(self.path)

    def ticket(self, backend: str, token: str) -> dict[str, Any] | None:
        conn = self._list(backend)
        if conn is None:
            return None
        try:
            cur = conn.execute("SELECT * FROM tickets WHERE token = ?", (token,))
            row = cur.fetchone()
        except sqlite3.DatabaseError as e:
            raise self._damaged(backend, f"ticket list {self._lists[backend].name}: {e}") from e
        return dict(zip([c[0] for c in cur.description], row, strict=True)) if row else None

    def _damaged(self, backend: str, why: str) -> StoreError:
        """Note that a list file cannot be read, so the next sync downloads it whole (list_usable)."""
        try:
            self.set(f"damaged:{backend}", why)
        except StoreError:
            pass  # the store itself fails too: the scan's own error says so
        return StoreError(why)

    def list_usable(self, backend: str) -> bool:
        """False when a read of the list failed since it was loaded, or its file cannot be opened.

        Backends with deltas (CM.com, pretix) download the whole list again then, and the local
        backend imports its file again, instead of failing every offline scan until the next change.
        """
        if self.get(f"damaged:{backend}") is not None:
            return False
        try:
            self._list(backend)
        except StoreError:
            return False
        return True

    def _list(self, backend: str) -> sqlite3.Connection | None:
        """The connection to a list's current file, opened again when another process switched it."""
        for _ in range(2):
            name = self.get(f"tickets:{backend}")
            cached = self._lists.get(backend)
            if cached is not None and cached.name == name:
                return cached.conn
            if name is None:
                if cached is not None:
                    self._lists.pop(backend).retire()
                return None
            try:
                listed = _ListFile.open(self.lists_dir, name, read_only=self.read_only is not None)
            except StoreError as e:
                if self.get(f"tickets:{backend}") != name:
                    continue  # switched (and the old file removed) between the two reads: open the new one
                raise self._damaged(backend, str(e)) from e
            if cached is not None:  # only now: see _ListFile.retire
                self._lists.pop(backend).retire()
            self._lists[backend] = listed
            return listed.conn
        return None

    def load_tickets(self, backend: str, rows: Iterable[dict[str, Any]], chunk: int = 2000,
                     on_chunk: Callable[[int], None] | None = None) -> int:
        """Replace a backend's whole ticket list; scans see the old list until the new one is complete.

        `on_chunk(rows_so_far)` is called after each chunk of rows (progress on a terminal).
        One load of a list at a time, across processes (the daemon's reload, `gated scan`).
        """
        folder = self.lists_dir
        with _list_lock(folder, backend):
            return self._load_locked(folder, backend, rows, chunk, on_chunk)

    def _load_locked(self, folder: Path, backend: str, rows: Iterable[dict[str, Any]], chunk: int,
                     on_chunk: Callable[[int], None] | None) -> int:
        loading = f"loading:{backend}"
        stale = self.get(loading)
        if stale:  # holding the lock, a load still named is one that was killed
            _remove_list(folder / stale)
        self._sweep_lists()
        name = f"{_file_safe(backend)}.{time.time_ns()}.sqlite"
        self.set(loading, name)  # before the file exists: a sweep never takes a file nobody names
        old = self.get(f"tickets:{backend}")  # not inside the write below: a read there would make it
        # a deferred transaction that fails at once with "database is locked" if a scan commits first
        try:
            n = _build_list(folder, name, rows, chunk, on_chunk)
            with self._write() as conn:
                conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (f"tickets:{backend}", name))
                conn.execute("DELETE FROM kv WHERE key IN (?, ?)", (loading, f"damaged:{backend}"))
        except BaseException:
            _remove_list(folder / name)  # a half-read list never becomes current
            with self._write() as conn:
                conn.execute("DELETE FROM kv WHERE key = ?", (loading,))
            raise
        if old:
            if backend in self._lists:
                self._lists.pop(backend).close()
            _remove_list(folder / old)
        return n

    def _sweep_lists(self) -> None:
        """Remove list files no kv entry names: left by a load that was killed, or by a store moved aside."""
        folder = self.lists_dir
        try:
            files = [p for p in folder.iterdir() if p.name.endswith(".sqlite")]  # listed before kv is read
        except FileNotFoundError:
            return
        except OSError as e:
            raise StoreError(f"{folder}: {e.strerror or e}") from e
        named = {r[0] for r in self.db.conn.execute(
            "SELECT value FROM kv WHERE key LIKE 'tickets:%' OR key LIKE 'loading:%'")}
        for path in files:
            if path.name not in named:
                _remove_list(path)

    def upsert_tickets(self, backend: str, rows: Iterable[dict[str, Any]]) -> int:
        """Add or change tickets in the current generation (deltas); the first ones make a new list."""
        conn = self._list(backend)
        if conn is None:
            return self.load_tickets(backend, rows)
        batch = [_ticket_tuple(r) for r in rows]
        try:
            with conn:
                _insert_tickets(conn, batch)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"ticket list {self._lists[backend].name}: {e}") from e
        return len(batch)

    def ticket_count(self, backend: str) -> int:
        conn = self._list(backend)
        try:
            return conn.execute("SELECT count(*) FROM tickets").fetchone()[0] if conn is not None else 0
        except sqlite3.DatabaseError as e:
            raise StoreError(f"ticket list {self._lists[backend].name}: {e}") from e

    # --- sessions and small state ----------------------------------------------------------

    def get(self, key: str) -> str | None:
        return self._one("SELECT value FROM kv WHERE key = ?", (key,))

    def set(self, key: str, value: str) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    # --- a store that replaced a damaged one -----------------------------------------------

    def note_replaced(self, moved: str | os.PathLike[str], scans: int | None, now: float | None = None) -> None:
        """Mark this fresh store as the replacement of the damaged one moved to `moved`."""
        self.set(REPLACED_KEY, json.dumps({"moved": str(moved), "scans": scans,
                                           "at": time.time() if now is None else now}))

    def replaced(self) -> dict[str, Any] | None:
        """{"moved", "scans", "at"} while this store replaces a damaged one and the history it lost
        (anti-passback) is not made good: until a sync (online backends) or a technician's word."""
        value = self.get(REPLACED_KEY)
        return json.loads(value) if value else None

    def accept_replaced(self) -> dict[str, Any] | None:
        """End the replaced state (see replaced()); returns what it was, None when there was none."""
        info = self.replaced()
        if info is not None:
            with self._write() as conn:
                conn.execute("DELETE FROM kv WHERE key = ?", (REPLACED_KEY,))
        return info

    @staticmethod
    def count_scans(path: str | os.PathLike[str]) -> int | None:
        """How many scans a (damaged) store file holds, None when it cannot be read. Read as immutable,
        so nothing is written beside it; the WAL is not read, so scans of its last seconds may be missed."""
        try:
            conn = sqlite3.connect(f"file:{quote(str(path))}?immutable=1", uri=True)
        except sqlite3.Error:
            return None
        try:
            return conn.execute("SELECT count(*) FROM scans").fetchone()[0]
        except sqlite3.Error:
            return None
        finally:
            conn.close()

    # --- occupancy ---
    def occupancy_counts(self, since: float) -> tuple[int, int]:
        """(entries, exits): people through this lane since `since` (gated.occupancy). An admit counts
        unless its passage sensor said nobody passed (passed = 0); scans_wall keeps it one range scan."""
        row = self.db.conn.execute(
            "SELECT coalesce(sum(scan_mode = 'entry'), 0), coalesce(sum(scan_mode = 'exit'), 0) FROM scans "
            "WHERE wall >= ? AND verdict = 'admit' AND coalesce(passed, 1) = 1", (since,)).fetchone()
        return row[0], row[1]


_TICKET_COLUMNS = ("token", "ticket_key", "name", "valid_from", "valid_until", "status", "max_entries",
                   "event_id", "data")


def keep_owner(store_path: str | os.PathLike[str]) -> None:
    """Give files a root-run command created in the state folder back to the folder's owner.

    `gated doctor`, `scan`, `queue`, `lookup` and `pair` may be run as root, the daemon runs as
    `gated`: a root-owned gated.db-wal or ticket list file left behind would stop the daemon
    writing its own store.
    """
    path = Path(store_path)
    if os.geteuid() != 0 or not path.parent.exists():
        return
    st = path.parent.stat()
    if st.st_uid == 0:
        return
    lists = lists_dir(path)
    owned = [Path(f"{path}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")]
    if lists.is_dir():
        owned += [lists, *lists.iterdir()]
    for p in owned:
        try:
            if p.exists() and p.stat().st_uid == 0:
                os.chown(p, st.st_uid, st.st_gid)
        except OSError:
            pass


def unwritable(store_path: str | os.PathLike[str]) -> str | None:
    """Why the store's files cannot be written (a read-only filesystem, an immutable file), or None.

    Only what a failing SD card or a technician's `chattr +i` does: not file permissions, which
    are a set-up fault and reported as such when the store is opened.
    """
    path = Path(store_path)
    try:
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
            return "the filesystem is read-only"
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if _file_immutable(p):
                return f"{p} is immutable (chattr +i)"
    except OSError as e:
        return e.strerror or str(e)
    return None


def _file_immutable(path: Path) -> bool:
    """The immutable flag of a store file (False when it is not there), read through a descriptor
    kept open: closing any descriptor of a file drops every POSIX lock the process holds on it,
    SQLite's too, and those tell other processes the store is in use."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    with _FLAG_FDS_LOCK:
        held = _FLAG_FDS.get(str(path))
        if held is None or held[1:] != (st.st_dev, st.st_ino):
            # A file made anew (the WAL index after every connection closed): the old descriptor stays
            # open for the reason above; one per such change.
            held = (os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), st.st_dev, st.st_ino)
            _FLAG_FDS[str(path)] = held
        return _immutable(held[0])


_FLAG_FDS: dict[str, tuple[int, int, int]] = {}  # path -> (descriptor, device, inode), see _file_immutable
_FLAG_FDS_LOCK = threading.Lock()


def _connect_read_only(path: Path, check_same_thread: bool = True) -> sqlite3.Connection:
    """A read-only connection to a WAL file on storage that cannot be written.

    `mode=ro` reads the WAL too, but needs its WAL index (-shm) to exist already. A store closed
    cleanly before the card turned read-only has neither: then the file alone is all there is,
    and `immutable=1` (no locks, no WAL index) reads it; nobody can change it meanwhile.
    """
    uri = f"file:{quote(str(path))}"
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=check_same_thread)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        if os.path.exists(f"{path}-wal"):
            raise
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=check_same_thread)


def _no_checkpoint_on_close(conn: sqlite3.Connection) -> bool:
    """SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE on `conn`, so closing it writes neither the WAL index nor
    the file; False when this Python offers no safe way to set it."""
    if hasattr(conn, "setconfig"):  # Python 3.12+
        conn.setconfig(sqlite3.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, True)
        return True
    import _sqlite3
    import ctypes

    # Python 3.11 has no binding: the sqlite3* handle is the first field after the object header
    # (Modules/_sqlite/connection.h). Used only when SQLite confirms it is this connection's handle.
    lib = ctypes.CDLL(getattr(_sqlite3, "__file__", None))
    lib.sqlite3_db_filename.restype = ctypes.c_char_p
    lib.sqlite3_db_filename.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
    handle = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
    named = conn.execute("PRAGMA database_list").fetchone()[2]
    if not handle or lib.sqlite3_db_filename(handle, b"main") != os.fsencode(named):
        return False
    lib.sqlite3_db_config(ctypes.c_void_p(handle), ctypes.c_int(_SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE),
                          ctypes.c_int(1), ctypes.c_void_p(None))
    return True


_SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE = 1006  # sqlite3.h
_NOT_CLOSED: list[sqlite3.Connection] = []  # see Store.close


LIST_LOCK_WAIT = 600.0  # seconds a list load waits for another process's load of the same list


def lists_dir(store_path: str | os.PathLike[str]) -> Path:
    """The folder of a store's ticket list files: `gated.db` -> `gated.db-tickets/`."""
    path = Path(store_path)
    return path.with_name(path.name + "-tickets")


@contextmanager
def _list_lock(folder: Path, backend: str) -> Iterator[None]:
    """An exclusive lock per list (flock: the kernel lets go when its holder dies).

    Opened read-only and created 0644 (it holds nothing): a lock file a root-run command left
    behind still locks for the service user.
    """
    import fcntl

    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(folder / f".{_file_safe(backend)}.lock", os.O_CREAT | os.O_RDONLY, 0o644)
    except OSError as e:
        raise StoreError(f"{folder}: {e.strerror or e}") from e
    try:
        wait = LIST_LOCK_WAIT
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreError(f"{folder}: another process has been loading the {backend} list for "
                                     f"{wait:g} s (a stopped `gated scan`?)") from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def _immutable(fd: int) -> bool:
    """The file's immutable flag (FS_IOC_GETFLAGS); False on a filesystem without inode flags."""
    import fcntl

    try:
        flags = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(struct.calcsize("l")))
    except OSError:  # tmpfs on older kernels, some FUSE filesystems: no flags, so never immutable
        return False
    return bool(int.from_bytes(flags[:4], sys.byteorder) & _FS_IMMUTABLE_FL)


# linux/fs.h: _IOR('f', 1, long), so its size field is sizeof(long): 0x80086601 on 64-bit, 0x80046601 on 32.
_FS_IOC_GETFLAGS = 0x80006601 | struct.calcsize("l") << 16
_FS_IMMUTABLE_FL = 0x00000010


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


class _ListFile:
    """A list file open for reading (and deltas), and this process's hold on the file (_Holds)."""

    def __init__(self, name: str, conn: sqlite3.Connection, held: tuple[int, int]):
        self.name, self.conn, self.held = name, conn, held

    @classmethod
    def open(cls, folder: Path, name: str, read_only: bool = False) -> _ListFile:
        """Open a complete list file; never create one (mode=rw, or mode=ro on storage that cannot be written)."""
        path = folder / name
        held = _HOLDS.take(path)
        conn = None
        try:
            if read_only:
                conn = _connect_read_only(path, check_same_thread=False)
            else:
                conn = sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.execute("PRAGMA synchronous = FULL")  # deltas: the sync state in the store says they are in
            conn.execute("SELECT 1 FROM tickets LIMIT 1").fetchall()
        except BaseException as e:
            if conn is not None:
                conn.close()
            _HOLDS.let_go(held)
            if isinstance(e, sqlite3.DatabaseError):
                raise StoreError(f"ticket list {path}: {e}") from e
            raise
        return cls(name, conn, held)

    def close(self) -> None:
        self.conn.close()
        _HOLDS.let_go(self.held)

    def retire(self) -> None:
        """Close a file another process replaced and unlinked (see _Holds); its successor is open."""
        self.conn.close()
        _HOLDS.let_go(self.held, later=True)


class _Holds:
    """One descriptor of our own on each list file this process has open, outside SQLite.

    A reload in another process switches to a new file and unlinks the old one, so whatever closes
    this process's last reference to the old file frees all of it (30 MB for 100,000 CM.com
    barcodes; on a `discard` mount, trims it): 10-15 ms on the CI VM. Were that SQLite's close, it
    would run holding SQLite's process-wide lock, which the scan thread needs too (strace: close
    12.6 ms, the scan thread waiting on SQLite's mutex): the scan that noticed the switch took
    12-16 ms. With a descriptor of our own the connections close at once, and the last one to let
    go of a replaced file closes the descriptor on a thread of its own.

    One per file, counted, never a second: closing any descriptor of a file drops every POSIX lock
    the process holds on it, SQLite's included, and those tell other processes the file is in use.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[tuple[int, int], list[int]] = {}  # (device, inode) -> [descriptor, users]

    def take(self, path: Path) -> tuple[int, int]:
        try:
            st = os.stat(path)
            key = (st.st_dev, st.st_ino)
            with self._lock:
                if key in self._held:
                    self._held[key][1] += 1
                else:
                    self._held[key] = [os.open(path, os.O_RDONLY | os.O_CLOEXEC), 1]
        except OSError as e:
            raise StoreError(f"ticket list {path}: {e.strerror or e}") from e
        return key

    def let_go(self, key: tuple[int, int], later: bool = False) -> None:
        """One user fewer; the last one closes the descriptor, `later` on a thread of its own."""
        with self._lock:
            entry = self._held[key]
            entry[1] -= 1
            if entry[1]:
                return
            if not later:
                self._close_unused(key)
                return
        try:
            threading.Thread(target=self._close_later, args=(key,), name="gated-list-retire", daemon=True).start()
        except RuntimeError:  # no thread to be had: closed here, late but not leaked
            self._close_later(key)

    def _close_later(self, key: tuple[int, int]) -> None:
        with self._lock:
            self._close_unused(key)

    def _close_unused(self, key: tuple[int, int]) -> None:
        # Called holding the lock, and closed holding it: until the descriptor is closed its entry
        # stays, so a take() meanwhile uses it instead of opening a second one (whose close would
        # then drop the locks of the connection that took it).
        entry = self._held.get(key)
        if entry is not None and entry[1] == 0:
            del self._held[key]
            os.close(entry[0])


_HOLDS = _Holds()


def _build_list(folder: Path, name: str, rows: Iterable[dict[str, Any]], chunk: int,
                on_chunk: Callable[[int], None] | None) -> int:
    """Write a complete list file: no journal, no fsync until the end, then WAL for later deltas.

    A power cut half way leaves a file no kv entry names yet; the next load sweeps it away.
    """
    path = folder / name
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        # Names and ticket data of visitors: owner-only from the first byte, like the store.
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        conn = sqlite3.connect(path, check_same_thread=False)
    except OSError as e:
        raise StoreError(f"{path}: {e.strerror or e}") from e
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: {e}") from e
    n = 0
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -8192")  # 8 MB: random-order codes rewrite pages in memory, not on disk
        conn.execute("""
            CREATE TABLE tickets (
                token TEXT PRIMARY KEY,
                ticket_key TEXT,
                name TEXT,
                valid_from REAL,
                valid_until REAL,
                status TEXT,
                max_entries INTEGER NOT NULL DEFAULT 1,
                event_id TEXT,
                data TEXT
            ) WITHOUT ROWID""")
        batch: list[tuple] = []
        for row in rows:
            batch.append(_ticket_tuple(row))
            if len(batch) >= chunk:
                with conn:
                    n += _insert_tickets(conn, batch)
                batch = []
                if on_chunk is not None:
                    on_chunk(n)
        with conn:
            n += _insert_tickets(conn, batch)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.close()
        _write_back(path)
        _fsync(folder)  # the file's name too, before the store names it as current
    except GatedError:  # from the rows (a download that failed): not the disk's doing, say it as it is
        conn.close()
        raise
    except sqlite3.DatabaseError as e:
        conn.close()
        raise StoreError(f"{path}: {e}") from e
    except OSError as e:
        conn.close()
        raise StoreError(f"{path}: {e.strerror or e}") from e
    except BaseException:
        conn.close()
        raise
    return n


WRITEBACK_SLICE = 256 * 1024  # bytes of a new list file put in the device's queue at a time


def _write_back(path: Path) -> None:
    """fsync a new list file, its data a slice at a time.

    One fsync of a 30 MB file puts all of it in the device's queue at once, and a scan's commit (a
    40 kB WAL write and a flush) waits behind the lot: 16-18 ms on the CI VM's disk, seconds on an
    SD card. Written back WRITEBACK_SLICE at a time and waited for, a commit queues behind one
    slice at most. Where sync_file_range is missing or refused, one fsync as before.
    """
    sync_range = _libc_sync_file_range()
    fd = os.open(path, os.O_RDONLY)
    try:
        if sync_range is not None:
            try:
                for offset in range(0, os.fstat(fd).st_size, WRITEBACK_SLICE):
                    sync_range(fd, offset, WRITEBACK_SLICE)
            except OSError as e:
                # Refused (a system call filter) or not supported here: the fsync below writes it
                # all. A write error is not one of these, and is reported once only: raise it.
                if e.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _libc_sync_file_range() -> Callable[[int, int, int], None] | None:
    """sync_file_range(2) from the C library (the os module has no binding): write one range and wait."""
    import ctypes

    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # no such symbol in this C library
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    wait_write_wait = 1 | 2 | 4  # SYNC_FILE_RANGE_WAIT_BEFORE | _WRITE | _WAIT_AFTER

    def sync_range(fd: int, offset: int, length: int) -> None:
        if fn(fd, offset, length, wait_write_wait) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    return sync_range


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_list(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"{path}{suffix}: {e.strerror or e}") from e


def _ticket_tuple(row: dict[str, Any]) -> tuple:
    values = [row.get(c) for c in _TICKET_COLUMNS]
    values[6] = values[6] if values[6] is not None else 1
    if values[8] is not None and not isinstance(values[8], str):
        values[8] = json.dumps(values[8])
    return tuple(values)


def _insert_tickets(conn: sqlite3.Connection, batch: list[tuple]) -> int:
    if batch:
        conn.executemany(
            "INSERT OR REPLACE INTO tickets (token, ticket_key, name, valid_from, valid_until, "
            "status, max_entries, event_id, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
    return len(batch)


async def keep_wal(checkpointer: StoreThread, scans: StoreThread) -> None:
    """One round of WAL upkeep, from a background task: a checkpoint on `checkpointer`'s connection
    (not the scan path's), then, once a burst is over, the WAL cut back a step at a time on `scans'`.

    While the burst goes on (more written since the last round than the WAL keeps), its commits
    write over the WAL already there; cut now, they would only grow it again.
    """
    while True:
        written = await checkpointer.call(Store.checkpoint)
        if written < 0 or written * _WAL_FRAME_BYTES > WAL_KEEP_BYTES or not await scans.call(Store.cut_wal):
            return


class StoreThread:
    """A Store living on its own worker thread; `await call(fn, ...)` runs fn(store, ...) there.

    SQLite connections belong to one thread, and a synchronous=FULL commit can stall in fsync:
    doing the work on a thread keeps the event loop (readers, watchdog pings) running meanwhile.
    """

    def __init__(self, path: str | os.PathLike[str], name: str = "store", *, read_only_ok: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.path = Path(path)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"gated-{name}")
        try:
            self.store: Store | None = self._executor.submit(Store, path, read_only_ok=read_only_ok).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    @property
    def read_only(self) -> str | None:
        """Why the store is open read-only (see Store), or None."""
        return self.store.read_only if self.store is not None else None

    async def close_store(self) -> None:
        """Close the Store, keeping the thread: every call fails with StoreError until open_store()."""
        import asyncio

        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_store)

    async def open_store(self, read_only_ok: bool = True) -> None:
        """Open the Store again (after close_store()); read-only if its storage cannot be written."""
        import asyncio
        from functools import partial

        store = await asyncio.get_running_loop().run_in_executor(
            self._executor, partial(Store, self.path, read_only_ok=read_only_ok))
        self.store = store

    def _close_store(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            store.close()

    async def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import asyncio
        from functools import partial

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(self._run, fn, *args, **kwargs))

    def call_sync(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self._executor.submit(self._run, fn, *args, **kwargs).result()

    def _run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        store = self.store
        if store is None:
            raise StoreError(f"{self.path}: the store is being opened again")
        store.check_writable()
        try:
            return fn(store, *args, **kwargs)
        except sqlite3.Error as e:
            # A read or PRAGMA outside Store._write (a checkpoint on a full disk): the same StoreError
            # callers expect, not an unexpected failure.
            raise StoreError(f"{self.path}: {e}") from e

    def close(self) -> None:
        try:
            self._executor.submit(self._close_store).result()
        finally:
            self._executor.shutdown(wait=True)
