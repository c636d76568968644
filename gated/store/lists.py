"""Ticket lists: one SQLite file per list and generation, beside the store, in `<store>-tickets/`.

The store's kv names the current file of each list (`tickets:<list>`). A new generation is built
in its own file, with no journal and no fsync until it is complete, then switched to in one short
commit of the store. Written into the store itself, a list arriving in random order rewrote the
same B-tree pages commit after commit, far more than its size, and every scan's fsync queued
behind it (figures in benchmarks/README.md). The old file is unlinked by the loader; a process
still reading it lets it go off its scan path (ListFile.retire, _Holds).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gated.errors import GatedError, StoreError
from gated.store.readonly import connect_read_only
from gated.store.wal import fsync, write_back

LIST_LOCK_WAIT = 600.0  # seconds a list load waits for another process's load of the same list

TICKET_COLUMNS = ("token", "ticket_key", "name", "valid_from", "valid_until", "status", "max_entries",
                  "event_id", "data")
# The one schema of a list file (the old in-store `tickets` table of migration m001 is history).
LIST_SCHEMA = """
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
            ) WITHOUT ROWID"""


def lists_dir(store_path: str | os.PathLike[str]) -> Path:
    """The folder of a store's ticket list files: `gated.db` -> `gated.db-tickets/`."""
    path = Path(store_path)
    return path.with_name(path.name + "-tickets")


class TicketLists:
    """Store's ticket-list methods. Uses the Store's `path`, `read_only`, `db`, `_write`, `get`, `set`
    and `_lists` (list -> its current file, open)."""

    _lists: dict[str, ListFile]

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
                listed = ListFile.open(self.lists_dir, name, read_only=self.read_only is not None)
            except StoreError as e:
                if self.get(f"tickets:{backend}") != name:
                    continue  # switched (and the old file removed) between the two reads: open the new one
                raise self._damaged(backend, str(e)) from e
            if cached is not None:  # only now: see ListFile.retire
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
        name = f"{file_safe(backend)}.{time.time_ns()}.sqlite"
        self.set(loading, name)  # before the file exists: a sweep never takes a file nobody names
        old = self.get(f"tickets:{backend}")  # not inside the write below: a read there would make it
        # a deferred transaction that fails at once with "database is locked" if a scan commits first
        try:
            n = build_list(folder, name, rows, chunk, on_chunk)
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

    def ticket_rows(self, backend: str) -> Iterator[tuple[str | None, str | None]]:
        """(status, data) of every row of a list, for counts a backend compares with its API's."""
        conn = self._list(backend)
        try:
            yield from conn.execute("SELECT status, data FROM tickets") if conn is not None else ()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"ticket list {self._lists[backend].name}: {e}") from e

    def ticket_count(self, backend: str) -> int:
        conn = self._list(backend)
        try:
            return conn.execute("SELECT count(*) FROM tickets").fetchone()[0] if conn is not None else 0
        except sqlite3.DatabaseError as e:
            raise StoreError(f"ticket list {self._lists[backend].name}: {e}") from e


@contextmanager
def _list_lock(folder: Path, backend: str) -> Iterator[None]:
    """An exclusive lock per list (flock: the kernel lets go when its holder dies).

    Opened read-only and created 0644 (it holds nothing): a lock file a root-run command left
    behind still locks for the service user.
    """
    import fcntl

    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(folder / f".{file_safe(backend)}.lock", os.O_CREAT | os.O_RDONLY, 0o644)
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


def file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


class ListFile:
    """A list file open for reading (and deltas), and this process's hold on the file (_Holds)."""

    def __init__(self, name: str, conn: sqlite3.Connection, held: tuple[int, int]):
        self.name, self.conn, self.held = name, conn, held

    @classmethod
    def open(cls, folder: Path, name: str, read_only: bool = False) -> ListFile:
        """Open a complete list file; never create one (mode=rw, or mode=ro on storage that cannot be written)."""
        path = folder / name
        held = _HOLDS.take(path)
        conn = None
        try:
            if read_only:
                conn = connect_read_only(path, check_same_thread=False)
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
    this process's last reference to the old file frees all of it (on a `discard` mount, trims it),
    which takes milliseconds. Were that SQLite's close, it would run holding SQLite's process-wide
    lock, which the scan thread needs too, and the scan that noticed the switch would wait for it
    (benchmarks/README.md). With a descriptor of our own the connections close at once, and the last
    one to let go of a replaced file closes the descriptor on a thread of its own.

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


def build_list(folder: Path, name: str, rows: Iterable[dict[str, Any]], chunk: int,
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
        conn.execute(LIST_SCHEMA)
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
        write_back(path)
        fsync(folder)  # the file's name too, before the store names it as current
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


def _remove_list(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(f"{path}{suffix}")
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"{path}{suffix}: {e.strerror or e}") from e


# Rows are tuples in TICKET_COLUMNS' order: the statement that inserts them is made from it too.
_INSERT_TICKETS = "INSERT OR REPLACE INTO tickets ({}) VALUES ({})".format(  # noqa: S608 (our own column names)
    ", ".join(TICKET_COLUMNS), ", ".join("?" * len(TICKET_COLUMNS)))
_MAX_ENTRIES, _DATA = TICKET_COLUMNS.index("max_entries"), TICKET_COLUMNS.index("data")


def _ticket_tuple(row: dict[str, Any]) -> tuple:
    values = [row.get(c) for c in TICKET_COLUMNS]
    values[_MAX_ENTRIES] = values[_MAX_ENTRIES] if values[_MAX_ENTRIES] is not None else 1
    if values[_DATA] is not None and not isinstance(values[_DATA], str):
        values[_DATA] = json.dumps(values[_DATA])
    return tuple(values)


def _insert_tickets(conn: sqlite3.Connection, batch: list[tuple]) -> int:
    if batch:
        conn.executemany(_INSERT_TICKETS, batch)
    return len(batch)

