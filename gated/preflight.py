"""What `gated run` would refuse at start, found by `gated check` without starting or writing anything.

systemd runs `gated check` as ExecStartPre: whatever it passes must start, or the unit loops on
restarts. So it asks the functions start-up asks (the backend's constructor, secrets.secret_file,
mqtt.read_venue_key and read_secret for [mqtt], the ticket list reader), and predicts the store's
open from the path alone.
It reads files as the user it runs as (the service user under systemd, or root), never writes.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from gated.config import Config
from gated.errors import ConfigError, GatedError

SQLITE_HEADER = b"SQLite format 3\x00"


def problems(config: Config, *, ticket_list: bool = True) -> list[str]:
    """Every problem start-up would meet, one line each, in the words of `gated check`.

    `ticket_list=False` skips reading the local ticket list (gated doctor reads it on its own line).
    """
    found: list[str] = []
    lists = _ticket_list(config) if ticket_list else []
    for problem in _secrets(config) + _backend(config) + _store(config.store.path) + lists:
        if problem not in found:  # a secret refused by the backend's constructor and by the check of its key
            found.append(problem)
    return found


def _secrets(config: Config) -> list[str]:
    """Every secret file named in the config, as read_secret would judge it (mode 600, not empty)."""
    from gated.config import schemas
    from gated.secrets import secret_file

    out: list[str] = []
    known = schemas()  # imports every backend and reader module's schema: once, not once a section
    for section in config.sections():
        schema = _schema_of(section, known)
        for name, value in section.items():
            key = schema.get(name)
            if key is None or key.kind != "secret" or not value:
                continue
            try:
                secret_file(value, f"{section.where} {name}")
            except ConfigError as e:
                out += e.problems
    mqtt = config.mqtt
    if mqtt is not None:
        from gated.mqtt import read_venue_key
        from gated.secrets import read_secret

        # The lane link reads these at start, contents too: a venue key too short to sign with, a
        # password file of blanks or not UTF-8 would pass the look above and stop `gated run`.
        reads = []
        if mqtt.get("hmac_key_file"):
            reads.append(lambda: read_venue_key(mqtt.hmac_key_file))
        if mqtt.get("password_file"):
            reads.append(lambda: read_secret(mqtt.password_file, "[mqtt] password_file"))
        for read in reads:
            try:
                read()
            except ConfigError as e:
                out += e.problems
    return out


def _schema_of(section, known: dict) -> dict:
    where = section.where
    if where.startswith("[reader."):
        return known.get(f"[reader.NAME] {section.get('type')}", {})
    if where.startswith("[led."):
        return known["[led.NAME]"]
    return known.get(where, {})


def _backend(config: Config) -> list[str]:
    """The backend built as `gated run` builds it: its constructor reads what it refuses to start without."""
    from gated.policy import build_backend

    try:
        backend = build_backend(config)
    except ConfigError as e:
        return list(e.problems)
    except GatedError as e:
        return [f"[backend] type = \"{config.backend.type}\": {e}"]
    asyncio.run(backend.close())
    return []


def _store(path: str) -> list[str]:
    """Why the store could not be opened or created at `path`: what Store() would meet, asked read-only."""
    from gated.store import Store

    where = f'[store] path = "{path}"'
    target = Path(path)
    if target.is_dir():
        return [f"{where}: is a folder; name a file in it, e.g. \"{target / 'gated.db'}\"."]
    if target.exists():
        if not target.is_file():
            return [f"{where}: not a regular file."]
        try:
            with open(target, "rb") as f:
                header = f.read(len(SQLITE_HEADER))
        except OSError as e:
            return [f"{where}: cannot read: {e.strerror}."]
        # A damaged store is moved aside at start (daemon.open_store), but only what looks like one.
        if header and header != SQLITE_HEADER and not Store.looks_like_a_store(target):
            return [f"{where}: this file is not a gated store (not SQLite); name another file."]
        if not os.access(target, os.R_OK | os.W_OK):
            return [f"{where}: this user may not read and write it."]
    folder = target.parent
    while not folder.exists() and folder != folder.parent:  # Store() makes the missing folders
        folder = folder.parent
    if not folder.is_dir():
        return [f"{where}: {folder} is a file, so the folder for the store cannot be made."]
    try:
        blocks = os.statvfs(folder).f_blocks
    except OSError as e:
        return [f"{where}: {folder}: {e.strerror}."]
    if blocks == 0:  # /proc, /sys: the kernel's own views, no room for files
        return [f"{where}: {folder} is on a virtual filesystem that cannot hold files; "
                "use a folder on the SD card, e.g. \"/var/lib/gated/gated.db\"."]
    # A missing folder is not judged by who may write its parent: under systemd, StateDirectory=
    # makes /var/lib/gated for the service user before ExecStartPre runs.
    if folder == target.parent and not os.access(folder, os.W_OK | os.X_OK):
        return [f"{where}: this user may not create the store and its journal in {folder}."]
    return []


def _ticket_list(config: Config) -> list[str]:
    """The local backend's ticket list, read through as the daemon imports it."""
    path = config.backend_options.get("tickets") if config.backend.type == "local" else None
    if not path:
        return []
    from gated.policy.local import TicketListError, read_ticket_csv

    try:
        for _ in read_ticket_csv(path):
            pass
    except TicketListError as e:
        return [f"[backend.local] tickets: {e}; the daemon would not load it."]
    return []
