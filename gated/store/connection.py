"""The Store: one SQLite connection (WAL, synchronous=FULL) and what every job shares on it, which is
opening, migrating, transactions, small state in kv, offline data and closing.

The jobs themselves come from the mixins listed in the class line (see gated/store/__init__.py).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from gated.errors import StoreError
from gated.store.damaged import CORRUPT_CODES, Replacement, StoreCorrupt
from gated.store.journal import Admissions, ScanJournal, UploadQueue
from gated.store.lists import ListFile, TicketLists, lists_dir
from gated.store.migrations import migrations
from gated.store.readonly import (
    WritableCheck,
    connect_read_only,
    must_stay_open,
    store_closed,
    store_opened,
    unwritable,
)
from gated.store.wal import WalUpkeep


class Store(ScanJournal, Admissions, UploadQueue, TicketLists, WalUpkeep, WritableCheck, Replacement):
    """The SQLite store. Not thread-safe: use one Store per thread.

    With `read_only_ok`, a store whose storage cannot be written (a filesystem remounted read-only,
    an immutable file) is opened read-only instead of refused: offline data and admissions can
    still be read, and every write raises StoreError. `read_only` then says why.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only_ok: bool = False):
        self.path = Path(path)
        self.read_only = unwritable(self.path) if read_only_ok and self.path.exists() else None
        self._lists: dict[str, ListFile] = {}  # list -> its current file, open
        if self.read_only is not None:
            self._open_read_only()
            self._shared_hash: Callable[[str], str] | None = None
            self._shm_fd: int | None = None
            store_opened(self.path)
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
            raise self._not_opened(e, f"{self.path}: {e}") from e
        except OSError as e:
            raise StoreError(f"{self.path}: {e.strerror or e}") from e
        # With [mqtt] sharing on: the venue-keyed hash of a ticket identity (gated.mqtt), the form
        # in which other lanes' admissions arrive. None: only this lane's admissions count.
        self._shared_hash: Callable[[str], str] | None = None
        self._shm_fd: int | None = None  # the WAL index, for check_writable(): the process's (flag_fd)
        store_opened(self.path)

    def _open_read_only(self) -> None:
        """Open with SQLite's `mode=ro`: it reads the WAL too, through a WAL index it never writes.

        Safe only while no read-write connection to the file is open in this process: SQLite shares
        one mapping of the WAL index per file and process, and that one would be written (SIGBUS).
        """
        try:
            conn = connect_read_only(self.path)
            conn.execute("PRAGMA busy_timeout = 5000")
            self.db = Database(conn, execute_plugins=False)
            if migrations.pending(self.db):
                self.db.close()
                raise StoreError(f"{self.path}: cannot be written ({self.read_only}), and this version of "
                                 "gated must first upgrade it")
            self._high_water = self._max_wall()
        except sqlite3.DatabaseError as e:
            raise self._not_opened(e, f"{self.path}: cannot be written ({self.read_only}) and not read: {e}") from e
        self._wal_frames = 0

    def _not_opened(self, e: sqlite3.DatabaseError, message: str) -> StoreError:
        """Close what was opened; StoreCorrupt when the file is damaged, else StoreError(message)."""
        if getattr(self, "db", None) is not None:
            self.db.close()
        if getattr(e, "sqlite_errorcode", None) in CORRUPT_CODES:
            return StoreCorrupt(f"{self.path}: {e}")
        return StoreError(message)

    def close(self) -> None:
        # The last connection to close checkpoints the WAL, writing the mapped WAL index: on a
        # store that cannot be written any more that is SIGBUS at stop. Closed without it then.
        # If that cannot be switched off, the connection is left open (kept referenced) instead.
        skip_checkpoint = self.read_only is None and unwritable(self.path) is not None
        for listed in self._lists.values():
            if skip_checkpoint and must_stay_open(listed.conn):
                continue
            listed.close()
        self._lists.clear()
        self._shm_fd = None  # not closed here: store_closed closes it with the process's last Store
        if skip_checkpoint and must_stay_open(self.db.conn):
            return
        self.db.close()
        store_closed(self.path)

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

    # --- sessions and small state ----------------------------------------------------------

    def get(self, key: str) -> str | None:
        return self._one("SELECT value FROM kv WHERE key = ?", (key,))

    def set(self, key: str, value: str) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

    # --- offline data ----------------------------------------------------------------------

    def put_data(self, name: str, value: Any, updated: float | None = None) -> None:
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO offline_data (name, value, updated) VALUES (?, ?, ?)",
                         (name, json.dumps(value), time.time() if updated is None else updated))

    def get_data(self, name: str) -> tuple[Any, float] | None:
        row = self.db.conn.execute("SELECT value, updated FROM offline_data WHERE name = ?",
                                   (name,)).fetchone()
        return (json.loads(row[0]), row[1]) if row else None

    def data_updated(self) -> dict[str, float]:
        """When each offline data row was last refreshed: name -> wall time (gated ready, metrics)."""
        try:
            return dict(self.db.conn.execute("SELECT name, updated FROM offline_data").fetchall())
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: {e}") from e


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
