"""Keep a scan's commit fast on slow storage: WAL upkeep off the scan path, and new files written back
a slice at a time (sync_file_range through ctypes), so a commit's fsync never queues behind them.

The figures behind these choices are in benchmarks/README.md.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gated.store.thread import StoreThread

# The WAL is kept at up to this size and written over (Store.checkpoint): minutes of a busy lane's
# scans, and what it holds back on a nearly full card. Beyond it, it is cut back in steps.
WAL_KEEP_BYTES = 16 * 1024 * 1024
WAL_SHRINK_STEP = 4 * 1024 * 1024
_WAL_FRAME_BYTES = 4096 + 24  # a page of SQLite's default size and its frame header


class WalUpkeep:
    """Store's WAL upkeep. Uses the Store's `path`, `read_only`, `db`, `set` and `_wal_frames`."""

    def checkpoint(self) -> int:
        """Fold the WAL back into the database; call it from a background task, not the scan path.
        When every frame was copied (the next commit then starts the WAL again from its start),
        returns how many frames were written since this connection's last checkpoint; else -1.

        PASSIVE: it never makes a scan's commit wait. The next commit then writes the WAL again from
        its start, over blocks the file already has, so its fdatasync has no new size or blocks for
        the filesystem's journal: one device write and a flush instead of a journal commit through
        the kernel's workers, which a busy CPU keeps waiting. Truncating the WAL here would make
        every commit grow the file again; a WAL grown past WAL_KEEP_BYTES by a burst is cut back by cut_wal().
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
        Cut in one go (SQLite's journal_size_limit on every connection), a large WAL on a filesystem
        mounted with `discard` held the scan that made the commit for tens of milliseconds; and a scan
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


async def keep_wal(checkpointer: StoreThread, scans: StoreThread) -> None:
    """One round of WAL upkeep, from a background task: a checkpoint on `checkpointer`'s connection
    (not the scan path's), then, once a burst is over, the WAL cut back a step at a time on `scans'`.

    While the burst goes on (more written since the last round than the WAL keeps), its commits
    write over the WAL already there; cut now, they would only grow it again.
    """
    while True:
        written = await checkpointer.call(WalUpkeep.checkpoint)
        if written < 0 or written * _WAL_FRAME_BYTES > WAL_KEEP_BYTES or not await scans.call(WalUpkeep.cut_wal):
            return


WRITEBACK_SLICE = 256 * 1024  # bytes of a new list file put in the device's queue at a time


def write_back(path: Path) -> None:
    """fsync a new list file, its data a slice at a time.

    One fsync of a list file (tens of MB) puts all of it in the device's queue at once, and a scan's
    commit (a small WAL write and a flush) waits behind the lot. Written back WRITEBACK_SLICE at a
    time and waited for, a commit queues behind one slice at most. Where sync_file_range is missing
    or refused, one fsync as before.
    """
    sync_range = libc_sync_file_range()
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
def libc_sync_file_range() -> Callable[[int, int, int], None] | None:
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


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
