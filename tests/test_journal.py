"""journald: `gated run` logs each scan as one structured entry that a technician can filter.

A real /lib/systemd/systemd-journald is started for this module (volatile storage). It owns
/run/systemd/journal, so these tests run only as root where no journald owns it already: CI runs
pytest in private mount and PID namespaces with a tmpfs on /run (.ci/run), which gives exactly that.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from gated.logs import MESSAGE_IDS
from gated.tokens import token_hash

JOURNALD = "/lib/systemd/systemd-journald"
SOCKET = "/run/systemd/journal/socket"
DROPIN = "/run/systemd/journald.conf.d/zz-gated-test.conf"
WATCHED = ("/run/systemd/journal", "/run/log", "/run/systemd/journald.conf.d")
CATALOG = Path(__file__).resolve().parent.parent / "systemd" / "gated.catalog"

GOOD = "SECRET-TOKEN-7f3a9c1e5b"   # in the ticket list
UNKNOWN = "NOPE-SECRET-ABCDEFGH12"  # not in it


def _walk(top: str) -> list[str]:
    if not os.path.lexists(top):
        return []
    out = [top]
    for root, dirs, files in os.walk(top):
        out += [os.path.join(root, n) for n in dirs + files]
    return out


@pytest.fixture(scope="module")
def journald():
    """A real systemd-journald for this file only (other files see none); removes every file it made."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run systemd-journald (CI runs the tests as root)")
    if not os.access(JOURNALD, os.X_OK) or not shutil.which("journalctl"):
        pytest.skip("systemd-journald/journalctl not installed")
    if os.path.exists(SOCKET):
        pytest.skip("a journald already owns /run/systemd/journal (run the tests through .ci/run)")
    from systemd import journal  # a dependency of gated (systemd-python): missing is a failure, not a skip
    before = {p for w in WATCHED for p in _walk(w)}
    os.makedirs(os.path.dirname(DROPIN), exist_ok=True)
    with open(DROPIN, "w") as f:  # volatile: never write into the host's /var/log/journal
        f.write("[Journal]\nStorage=volatile\nReadKMsg=no\nForwardToSyslog=no\nForwardToWall=no\n"
                "RuntimeMaxUse=16M\n")
    # No arguments: journald takes its first argument as a journal namespace name.
    proc = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(SOCKET):
            assert proc.poll() is None and time.monotonic() < deadline, "systemd-journald did not start"
            time.sleep(0.02)
        yield journal
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        # Its sockets stay behind after SIGTERM, and a stale one makes every later send fail.
        for path in sorted({p for w in WATCHED for p in _walk(w)} - before, reverse=True):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)


def wait_entries(journal, count: int, timeout: float = 10.0, **match: str) -> list[dict]:
    """Wait (on the journal's own change notification) until `count` entries match."""
    reader = journal.Reader()
    reader.add_match(**match)
    reader.seek_head()
    found: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            found += list(reader)
            if len(found) >= count:
                return found
            left = deadline - time.monotonic()
            assert left > 0, f"{len(found)} of {count} journal entries matching {match} arrived"
            reader.wait(left)
    finally:
        reader.close()


def journalctl_json(*matches: str) -> list[dict]:
    subprocess.run(["journalctl", "--sync"], check=True, timeout=30)
    out = subprocess.run(["journalctl", "--no-pager", "-o", "json", *matches], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def lane_config(write_config, tickets_csv):
    """A config logging to journald, with a lane name of its own so entries of other tests never match."""
    tickets_csv(f"token,name\n{GOOD},Alice\n")
    lane = f"jt-{uuid.uuid4().hex[:8]}"
    path = write_config('[backend]\ntype = "local"\n[backend.local]\ntickets = "tickets.csv"\n'
                        '[log]\njournal = "yes"\n')
    text = path.read_text().replace('name = "lane-1"', f'name = "{lane}"')
    path.write_text(text.replace('type = "stdin"', 'type = "stdin"\ninput = "qr"'))
    return lane, path


def start(config: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "GATED_CONFIG")}
    return subprocess.Popen([sys.executable, "-m", "gated", "run", "--config", str(config)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace", env=env)


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return err


def test_each_scan_is_one_journal_entry_with_the_gated_fields(journald, lane_config, tmp_path):
    lane, config = lane_config
    proc = start(config)
    try:
        proc.stdin.write(f"{GOOD}\n{UNKNOWN}\n")
        proc.stdin.flush()
        wait_entries(journald, 2, GATED_LANE=lane, GATED_EVENT="scan")
    finally:
        err = stop(proc)
    assert "ADMIT" not in err and "DENY" not in err  # journald only: no scan line printed twice

    admit, deny = journalctl_json(f"GATED_LANE={lane}")
    assert admit["MESSAGE"].startswith(f"{lane} ADMIT ok offline local stdin:front …1e5b ")
    assert deny["MESSAGE"].startswith(f"{lane} DENY unknown offline local stdin:front …GH12 ")
    for entry, verdict, reason, token, priority in ((admit, "admit", "ok", GOOD, "6"),
                                                   (deny, "deny", "unknown", UNKNOWN, "5")):
        assert {k: entry.get(k) for k in ("GATED_EVENT", "GATED_VERDICT", "GATED_REASON", "GATED_SOURCE",
                                          "GATED_BACKEND", "GATED_READER", "GATED_INPUT", "GATED_LANE",
                                          "GATED_TOKEN", "SYSLOG_IDENTIFIER", "PRIORITY", "MESSAGE_ID")} == {
            "GATED_EVENT": "scan", "GATED_VERDICT": verdict, "GATED_REASON": reason, "GATED_SOURCE": "offline",
            "GATED_BACKEND": "local", "GATED_READER": "front", "GATED_INPUT": "qr", "GATED_LANE": lane,
            "GATED_TOKEN": f"…{token[-4:]}#{token_hash(token)[:8]}", "SYSLOG_IDENTIFIER": "gated",
            "PRIORITY": priority, "MESSAGE_ID": MESSAGE_IDS["scan"]}
        assert 0 <= float(entry["GATED_LATENCY_MS"]) < 10_000
        assert entry["_PID"] == str(proc.pid) and entry["_TRANSPORT"] == "journal"

    # GATED_NONCE is the scan's id in the store (and in the upload to the ticketing API)
    db = sqlite3.connect(tmp_path / "gated.db")
    stored = dict(db.execute("SELECT token, nonce FROM scans"))
    db.close()
    assert (admit["GATED_NONCE"], deny["GATED_NONCE"]) == (stored[GOOD], stored[UNKNOWN])
    assert uuid.UUID(admit["GATED_NONCE"])


def test_no_journal_entry_of_the_daemon_contains_a_full_ticket_token(journald, lane_config):
    lane, config = lane_config
    oversize = UNKNOWN + "Z" * 5000  # denied malformed; the trace kept of it is bounded and redacted
    proc = start(config)
    try:
        proc.stdin.write(f"{GOOD}\n{UNKNOWN}\n{GOOD}\n{oversize}\n")
        proc.stdin.flush()
        # GOOD twice within the debounce window is one scan
        scans = wait_entries(journald, 3, GATED_LANE=lane, GATED_EVENT="scan")
    finally:
        stop(proc)
    assert [e["GATED_REASON"] for e in scans] == ["ok", "unknown", "malformed"]
    entries = journalctl_json(f"_PID={proc.pid}")
    assert len(entries) > 5  # the banner, the scans, the output changes, the stop lines
    for entry in entries:
        text = json.dumps(entry, ensure_ascii=False)
        assert GOOD not in text and UNKNOWN not in text, entry
        assert GOOD[2:-2] not in text and UNKNOWN[2:-2] not in text, entry


def test_a_rejected_reload_is_an_error_entry_that_journalctl_x_explains(journald, lane_config, tmp_path):
    lane, config = lane_config
    proc = start(config)
    try:
        proc.stdin.write(f"{GOOD}\n")
        proc.stdin.flush()
        wait_entries(journald, 1, GATED_LANE=lane, GATED_EVENT="scan")
        config.write_text(config.read_text().replace("[lane]\n", '[lane]\nmode = "shut"\n'))
        proc.send_signal(signal.SIGHUP)
        wait_entries(journald, 1, _PID=str(proc.pid), GATED_EVENT="config_rejected")
    finally:
        stop(proc)
    (rejected,) = journalctl_json(f"_PID={proc.pid}", "GATED_EVENT=config_rejected")
    assert rejected["PRIORITY"] == "3" and rejected["MESSAGE_ID"] == MESSAGE_IDS["config_rejected"]
    assert '[lane] mode = "shut"' in rejected["MESSAGE"]

    # `journalctl -x` with the shipped catalog compiled in a scratch root. journalctl -x reads only
    # /var/lib/systemd/catalog, so that is bind-mounted over in a mount namespace of its own.
    if not shutil.which("unshare") or not os.path.isdir("/var/lib/systemd/catalog"):
        pytest.skip("unshare (util-linux) or /var/lib/systemd/catalog missing")
    root = tmp_path / "root"
    (root / "usr/lib/systemd/catalog").mkdir(parents=True)
    shutil.copy(CATALOG, root / "usr/lib/systemd/catalog")
    subprocess.run(["journalctl", f"--root={root}", "--update-catalog"], check=True, timeout=30)
    show = (f"mount --bind {root}/var/lib/systemd/catalog /var/lib/systemd/catalog && "
            f"exec journalctl --no-pager -x _PID={proc.pid}")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", show],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert "Subject: New configuration rejected; the running one stays" in out
    assert f"Subject: Ticket scanned at lane {lane}: admit (ok)" in out


def test_a_name_from_the_ticket_list_cannot_add_a_line_or_an_escape_to_the_journal(journald, lane_config,
                                                                                    tickets_csv):
    lane, config = lane_config
    forged = f"Mallory\n19:10:00 {lane} ADMIT ok online pretix …0001 3ms\x1b[2J"
    tickets_csv(f'token,name\n{GOOD},"{forged}"\n')  # a quoted newline inside a CSV field
    proc = start(config)
    try:
        proc.stdin.write(f"{GOOD}\n")
        proc.stdin.flush()
        wait_entries(journald, 1, GATED_LANE=lane, GATED_EVENT="scan")
    finally:
        stop(proc)
    entries = journalctl_json(f"_PID={proc.pid}")
    # journalctl's JSON gives a field holding control characters as a list of bytes, not a string
    assert all(isinstance(e["MESSAGE"], str) and "\n" not in e["MESSAGE"] for e in entries), entries
    (scan,) = [e for e in entries if e.get("GATED_EVENT") == "scan"]
    assert scan["MESSAGE"].startswith(f"{lane} ADMIT ok offline local stdin:front …1e5b ")
    assert scan["MESSAGE"].endswith(f'"Mallory\\x0a19:10:00 {lane} ADMIT ok online pretix …0001 3ms\\x1b[2J"')
