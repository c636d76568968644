"""Logging: journald with structured GATED_* fields under systemd, plain lines on stderr otherwise.

A scan is one line, lane first, so `journalctl -u gated` reads on a phone and greps cleanly:
    north-3 ADMIT ok online entry hid:front …4411 142ms "Good Ticket"
The words ADMIT and DENY appear only as a scan's verdict.
"""

from __future__ import annotations

import logging
import os
import sys

NOTICE = 25  # syslog's NOTICE sits between INFO and WARNING: denies are notable, not faults
logging.addLevelName(NOTICE, "NOTICE")

# Catalog ids (MESSAGE_ID) for `journalctl -x`; the texts live in systemd/gated.catalog.
MESSAGE_IDS = {
    "scan": "4a0c5e1f9d2b4c7e8a3f6b1d2e9c0a51",
    "backend_down": "7d3b2a1c5e4f4b6a9c8d0e1f2a3b4c52",
    "backend_up": "8e4c3b2d6f5a4c7b0d9e1f2a3b4c5d53",
    "reader_lost": "9f5d4c3e7a6b4d8c1e0f2a3b4c5d6e54",
    "upload_parked": "a06e5d4f8b7c4e9d2f1a3b4c5d6e7f55",
    "config_reloaded": "b17f6e5a9c8d4fae3a2b4c5d6e7f8a56",
    "emergency": "c28a7f6b0d9e4abf4b3c5d6e7f8a9b57",
    "clock_untrusted": "d39b8a7c1e0f4bca5c4d6e7f8a9b0c58",
    "store_error": "e4ac9b8d2f1a4cdb6d5e7f8a9b0c1d59",
    "config_rejected": "627bac82de4e4b859407409f7f8b4b43",
    "start_failed": "4cad3d6442774b119621546f1e09ea2a",
    "offline_no_data": "acd197c0c14345b89dc6bd706a0bfcf0",
    "stale_data": "869a8c2b9e454a7290f2a22768ece256",
}


def under_systemd() -> bool:
    """True when stderr is the journal stream systemd gave us (the documented JOURNAL_STREAM check)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


class _Journal:
    """Build the journald handler lazily: systemd-python is only needed when it is used."""

    @staticmethod
    def handler() -> logging.Handler:
        from systemd import journal

        class GatedJournalHandler(journal.JournalHandler):
            def emit(self, record: logging.LogRecord) -> None:
                event = getattr(record, "GATED_EVENT", None)
                if event in MESSAGE_IDS and not hasattr(record, "MESSAGE_ID"):
                    record.MESSAGE_ID = MESSAGE_IDS[event]
                super().emit(record)

            @staticmethod
            def map_priority(levelno: int) -> int:
                if levelno == NOTICE:
                    return journal.LOG_NOTICE
                return journal.JournalHandler.map_priority(levelno)

        return GatedJournalHandler(SYSLOG_IDENTIFIER="gated")


class PlainFormatter(logging.Formatter):
    """Terminal lines: time and message; faults say their level, tracebacks only for bugs."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%H:%M:%S")
        level = "" if record.levelno <= NOTICE else f"{record.levelname}: "
        text = f"{stamp} {level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(journal: str = "auto", debug: bool = False) -> bool:
    """Configure the root logger once; returns True when logging to journald."""
    use_journal = journal == "yes" or (journal == "auto" and under_systemd())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    if use_journal:
        handler = _Journal.handler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PlainFormatter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    # --debug raises only gated's own loggers; httpx stays quiet (it would log every request).
    logging.getLogger("gated").setLevel(logging.DEBUG if debug else logging.INFO)
    return use_journal
