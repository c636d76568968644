"""StoreThread: a Store on a worker thread of its own, so the event loop never waits for SQLite."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gated.errors import StoreError
from gated.store.connection import Store


class StoreThread:
    """A Store living on its own worker thread; `await call(fn, ...)` runs fn(store, ...) there.

    SQLite connections belong to one thread, and a synchronous=FULL commit can stall in fsync:
    doing the work on a thread keeps the event loop (readers, watchdog pings) running meanwhile.
    """

    def __init__(self, path: str | os.PathLike[str], name: str = "store", *, read_only_ok: bool = False):
        from concurrent.futures import ThreadPoolExecutor

        self.path = Path(path)
        self._shared_hash: Callable[[str], str] | None = None  # kept while the Store is closed and reopened
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
        # Other lanes' admissions keep counting for anti-passback across the reopen.
        store.share_identities(self._shared_hash)
        self.store = store

    def _close_store(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            self._shared_hash = store._shared_hash
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
