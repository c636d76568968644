"""Read secrets from files an installer controls: systemd credentials or root-only files.

A secret file that others can read is refused with a message naming the key and the fix,
because a leaked API key opens every gate of the venue.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gated.errors import ConfigError


def read_secret(path: str, where: str) -> str:
    """Return the stripped content of a secret file; `where` names the key, e.g. `[backend.entry] api_key_file`.

    When the file does not exist but $CREDENTIALS_DIRECTORY holds a credential of the same name,
    that is used: a unit with `LoadCredential=entry.key:/root/entry.key` and a config saying
    `api_key_file = "entry.key"` keeps the key out of the service's reach otherwise.
    """
    candidate = secret_file(path, where)
    try:
        value = candidate.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(where, [f"{where} = \"{path}\": cannot read: {e.strerror}."]) from None
    except UnicodeDecodeError:
        raise ConfigError(where, [f"{where} = \"{path}\": not UTF-8 text."]) from None
    if not value:
        raise ConfigError(where, [f"{where} = \"{path}\": the file is empty."])
    return value


def secret_file(path: str, where: str) -> Path:
    """The file a secret is read from: `path`, or the systemd credential of that name.

    Raises ConfigError when it is missing, not a file, empty, or readable by others. It asks only
    the file's metadata, so `gated check` asks it too without reading anyone's keys.
    """
    candidate = Path(path)
    credential = find_credential(path)
    if credential is not None and not candidate.exists():
        return credential  # systemd made it, root-only, for this service alone
    try:
        st = candidate.stat()
    except OSError as e:
        raise ConfigError(where, [f"{where} = \"{path}\": cannot read: {e.strerror}."]) from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(where, [f"{where} = \"{path}\": not a file."])
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(where, [
            f"{where} = \"{path}\": readable by others (mode {stat.S_IMODE(st.st_mode):03o}); "
            f"secrets must be owner-only: chmod 600 {path}"])
    if st.st_size == 0:
        raise ConfigError(where, [f"{where} = \"{path}\": the file is empty."])
    return candidate


def find_credential(path: str) -> Path | None:
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not creds:
        return None
    candidate = Path(creds) / Path(path).name
    return candidate if candidate.is_file() else None
