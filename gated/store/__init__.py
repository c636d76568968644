"""Record every scan durably before the gate acts, and keep the queue, offline data and sessions.

One SQLite file (WAL, synchronous=FULL), and beside it a folder of ticket list files, one per
list (see load_tickets). A Store object belongs to one thread: the daemon gives the scan path its
own Store on a single worker thread, and the uploader and syncer open their own, so a long sync
never holds the scan path's connection.

`Store` is the one door: the rest of gated imports from `gated.store` only. Its files, by job:

    connection.py  Store: opening (WAL, synchronous=FULL, migrations), transactions, kv, offline data, close
    journal.py     the scan journal, the admissions anti-passback counts, the upload queue
    lists.py       ticket list files beside the store: loading, deltas, locks, descriptor holds
    wal.py         WAL upkeep off the scan path, and new files written back a slice at a time
    readonly.py    storage that cannot be written: the checks, the read-only open, a close without SIGBUS
    damaged.py     a damaged store moved aside, and the record of the store that replaced it
    migrations.py  the schema's history
    thread.py      StoreThread: a Store on a worker thread of its own

Store is put together from one mixin class per job (ScanJournal, TicketLists, WalUpkeep, ...)
rather than from helper objects it holds: every job works on the same connection, in the same
transactions (`_write`) and the same kv, and callers hand unbound methods to a StoreThread
(`store.call(Store.get, key)`). Helpers would each need a way back to the Store and the
Store a forwarding method for each of theirs; a mixin keeps each job readable in its own file,
with the few Store attributes it uses named in its docstring.
"""

from gated.store.connection import Store, keep_owner
from gated.store.damaged import REPLACED_KEY, StoreCorrupt
from gated.store.journal import NONE, PARKED, PENDING, SENT, QueueStats
from gated.store.lists import lists_dir
from gated.store.readonly import unwritable
from gated.store.thread import StoreThread
from gated.store.wal import keep_wal

__all__ = [
    "NONE", "PARKED", "PENDING", "REPLACED_KEY", "SENT", "QueueStats", "Store", "StoreCorrupt", "StoreThread",
    "keep_owner", "keep_wal", "lists_dir", "unwritable",
]
