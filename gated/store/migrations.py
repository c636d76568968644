"""The store's schema, as the history of changes made to it: each migration runs once per store file.

A migration is history: once released it is never edited, so a store of any age upgrades the same way.
The `tickets` table of m001 is the old in-store ticket list, dropped by m003; the ticket list files
have their own schema, `gated.store.lists.LIST_SCHEMA`.
"""

from __future__ import annotations

import time
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from gated.store.lists import build_list, file_safe, lists_dir

migrations = Migrations("gated")


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
        name = f"{file_safe(key[len('tickets:'):])}.{time.time_ns()}.sqlite"
        cur = db.execute("SELECT token, ticket_key, name, valid_from, valid_until, status, max_entries, "
                         "event_id, data FROM tickets WHERE backend = ?", (generation,))
        # Keyed by the columns read here, history like m001's table, not by the list files' own
        # (lists.TICKET_COLUMNS, which may change): build_list leaves a column it is not given empty.
        columns = [c[0] for c in cur.description]
        build_list(lists_dir(path), name, (dict(zip(columns, r, strict=True)) for r in cur), 5000, None)
        db.execute("UPDATE kv SET value = ? WHERE key = ?", (name, key))
    db.execute("DELETE FROM kv WHERE key LIKE 'loading:%'")
    db.execute("DROP TABLE tickets")


@migrations()
def m004_online_unanswered(db: Database) -> None:
    # Decision.online_unanswered: the API may hold this scan from a request whose answer was lost.
    db.execute("ALTER TABLE scans ADD COLUMN online_unanswered INTEGER NOT NULL DEFAULT 0")

