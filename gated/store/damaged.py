"""A damaged store: recognising one, moving it aside, and the record kept in the fresh store that
replaced it until the history it lost is made good."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from gated.errors import StoreError

# SQLite's result codes for a file that is damaged or is not a database at all.
CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB
# kv key: set in the fresh store that replaced a damaged one (Store.note_replaced).
REPLACED_KEY = "store_replaced"


class StoreCorrupt(StoreError):
    """The store file is damaged or not an SQLite database; `quarantine()` moves it aside."""


class Replacement:
    """Store's damaged-store methods. Uses the Store's `get`, `set` and `_write`."""

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


    def note_replaced(self, moved: str | os.PathLike[str], scans: int | None, now: float | None = None) -> None:
        """Mark this fresh store as the replacement of the damaged one moved to `moved`."""
        self.set(REPLACED_KEY, json.dumps({"moved": str(moved), "scans": scans,
                                           "at": time.time() if now is None else now}))

    def replaced(self) -> dict[str, Any] | None:
        """{"moved", "scans", "at"} while this store replaces a damaged one and the history it lost
        (anti-passback) is not made good: until a sync (online backends) or a technician's word."""
        value = self.get(REPLACED_KEY)
        if not value:
            return None
        # The row is the store's own, but the store may be damaged: a row that is not the JSON
        # note_replaced wrote still means the history was lost (fail safe), with what it says unknown.
        try:
            info = json.loads(value)
        except ValueError:
            info = None
        if not isinstance(info, dict):
            info = {}
        scans, at = info.get("scans"), info.get("at")
        return {"moved": str(info.get("moved") or "an unknown place"),
                "scans": scans if type(scans) is int and scans >= 0 else None,
                "at": float(at) if type(at) in (int, float) and 0 <= at < 1e11 else None}

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

