"""Logging: journald with structured GATED_* fields under systemd, plain lines on stderr otherwise.

A scan is one line, lane first, so `journalctl -u gated` reads on a phone and greps cleanly:
    north-3 ADMIT ok online entry hid:front …4411 142ms "Good Ticket"
The words ADMIT and DENY appear only as a scan's verdict. Every line is made safe here (`clean`),
whoever wrote it and whatever a server or list put into it: one line, no control or escape
sequence, bounded, so nobody outside can forge a line or drive the terminal.
"""

from __future__ import annotations

import logging
import os
import re
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


MAX_LINE = 1000  # characters of one value in a log line; a technician reads lines, not documents
MAX_MESSAGE = 8000  # the whole message, a multi-line report of config problems included

# What must never reach a terminal or a journal line raw: C0 and C1 controls (newline, ESC and so
# CSI sequences), DEL, line and paragraph separators, the invisible and bidirectional formatting
# characters that can make a line read differently from what it holds, and lone surrogates.
_UNSAFE = "\x7f-\x9f\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb\ud800-\udfff"
_UNSAFE_TEXT = re.compile("[\x00-\x1f" + _UNSAFE + "]")
_UNSAFE_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f" + _UNSAFE + "]")


def escape_char(c: str) -> str:
    """One character written as an escape: `\\x0a`, `\\u202e`, `\\U0001f600`."""
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _escape(match: re.Match) -> str:
    return escape_char(match.group())


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def clean(text: object, limit: int = MAX_LINE) -> str:
    """`text` made safe for one log line or the terminal: unsafe characters written as escapes
    (`\\x0a`, `\\x1b`, `\\u202e`), cut to `limit` characters with an ellipsis.

    Backslashes are left as they are, so cleaning twice changes nothing.
    """
    text = _cut(text if isinstance(text, str) else str(text), limit)
    if _UNSAFE_TEXT.search(text) is not None:
        text = _cut(_UNSAFE_TEXT.sub(_escape, text), limit)
    return text


class Lines(str):
    """gated's own text of several lines (a report of config problems), as a log argument: its line
    breaks are kept, each further line indented, where those of any other text are escaped."""


def _clean_arg(value: object) -> object:
    # Text and exceptions are where outside words arrive (a server's message, a file's line);
    # numbers keep their type for %d and %.1f.
    if isinstance(value, Lines):
        return value  # `message` still escapes its control characters and indents its lines
    return clean(value) if isinstance(value, str | BaseException) else value


def message(record: logging.LogRecord) -> str:
    """A record's message made safe, as every handler here writes it.

    Each argument is cleaned, so text from outside stays on its line. Line breaks of gated's own
    (in the format string, or an argument marked `Lines`) are kept, every further line indented: no line a record makes
    can start like a line of its own, so none can be forged.
    """
    args = record.args
    if isinstance(args, tuple):
        args = tuple(_clean_arg(a) for a in args)
    elif isinstance(args, dict):
        args = {k: _clean_arg(v) for k, v in args.items()}
    text = str(record.msg)
    if args:
        text = text % args
    text = _cut(text, MAX_MESSAGE)
    if _UNSAFE_BUT_NEWLINE.search(text) is not None:
        text = _UNSAFE_BUT_NEWLINE.sub(_escape, text)
    return text.replace("\n", "\n  ")


class _SafeFormatter(logging.Formatter):
    """The message made safe (`message`), then the traceback (bugs only) indented below it."""

    def format(self, record: logging.LogRecord) -> str:
        text = message(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "".join(f"\n  {clean(line)}" for line in record.exc_text.splitlines())
        return text


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
                # Fields show in `journalctl -o verbose` and exports: the same rule as MESSAGE.
                for key, value in record.__dict__.items():
                    if key.startswith("GATED_") and isinstance(value, str):
                        record.__dict__[key] = clean(value)
                super().emit(record)

            @staticmethod
            def map_priority(levelno: int) -> int:
                if levelno == NOTICE:
                    return journal.LOG_NOTICE
                return journal.JournalHandler.map_priority(levelno)

        handler = GatedJournalHandler(SYSLOG_IDENTIFIER="gated")
        handler.setFormatter(_SafeFormatter())
        return handler


class PlainFormatter(_SafeFormatter):
    """Terminal lines: time and message; faults say their level, tracebacks only for bugs."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%H:%M:%S")
        level = "" if record.levelno <= NOTICE else f"{record.levelname}: "
        return f"{stamp} {level}{super().format(record)}"


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
