"""Storage that cannot be written: a filesystem remounted read-only (an SD card's errors=remount-ro),
an immutable file (`chattr +i`).

SQLite maps its WAL index into memory and writes it on every transaction and at close; on such
storage that write is SIGBUS, which kills the daemon. What is here turns it into a StoreError
before SQLite touches the files, opens a store read-only, and closes one without that write.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import sys
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from gated.errors import StoreError


class WritableCheck:
    """Store's check before each call. Uses the Store's `path`, `read_only` and `_shm_fd`."""

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
            if self._shm_fd is None:
                # The process's descriptor (flag_fd), not one of this Store's own: closed with the
                # Store, that would drop the other Stores' SQLite locks on the file. The same file as
                # long as this Store is open: its connection keeps SQLite from removing it.
                self._shm_fd = flag_fd(Path(f"{self.path}-shm"))
            immutable = self._shm_fd is not None and _immutable(self._shm_fd)
        except OSError as e:
            raise StoreError(f"{self.path}: {e.strerror or e}") from e
        if readonly:
            raise StoreError(f"{self.path}: the filesystem is read-only")
        if immutable:
            raise StoreError(f"{self.path}-shm: the file is immutable (chattr +i)")


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
    """The immutable flag of a store file (False when it is not there)."""
    fd = flag_fd(path)
    return fd is not None and _immutable(fd)


def flag_fd(path: Path) -> int | None:
    """The process's one descriptor of a store file, kept open (None when the file is not there).

    Closing any descriptor of a file drops every POSIX lock the process holds on it, SQLite's too,
    and those tell other processes the store is in use: the descriptor is closed only once no
    Store of the process is open on it (store_closed), or its file is gone.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    with _FLAG_FDS_LOCK:
        held = _FLAG_FDS.get(str(path))
        if held is None or held[1:] != (st.st_dev, st.st_ino):
            # A file made anew (the WAL index after every connection closed). The old descriptor may be
            # closed only once its file is gone: then no connection can hold a lock on it.
            if held is not None and os.fstat(held[0]).st_nlink == 0:
                os.close(held[0])
            held = (os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), st.st_dev, st.st_ino)
            _FLAG_FDS[str(path)] = held
        return held[0]


def store_opened(store_path: str | os.PathLike[str]) -> None:
    """Count a Store of this process on `store_path` (see store_closed)."""
    with _FLAG_FDS_LOCK:
        _OPEN_STORES[str(Path(store_path))] += 1


def store_closed(store_path: str | os.PathLike[str]) -> None:
    """The connection of a Store on `store_path` is closed: when it was this process's last one, its
    flag descriptors go too, since no lock of ours is left on those files to drop."""
    key = str(Path(store_path))
    with _FLAG_FDS_LOCK:
        _OPEN_STORES[key] -= 1
        if _OPEN_STORES[key] > 0:
            return
        del _OPEN_STORES[key]
        for name in (key, f"{key}-wal", f"{key}-shm"):
            held = _FLAG_FDS.pop(name, None)
            if held is not None:
                os.close(held[0])


_FLAG_FDS: dict[str, tuple[int, int, int]] = {}  # path -> (descriptor, device, inode), see _file_immutable
_OPEN_STORES: Counter[str] = Counter()  # store path -> Stores of this process with an open connection
_FLAG_FDS_LOCK = threading.Lock()


def connect_read_only(path: Path, check_same_thread: bool = True) -> sqlite3.Connection:
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
_NOT_CLOSED: list[sqlite3.Connection] = []  # see must_stay_open


def must_stay_open(conn: sqlite3.Connection) -> bool:
    """Before `conn` is closed on storage that cannot be written: switch off its checkpoint on close
    (SIGBUS); where that cannot be done, keep it referenced and open instead, and return True."""
    if _no_checkpoint_on_close(conn):
        return False
    _NOT_CLOSED.append(conn)
    return True


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
