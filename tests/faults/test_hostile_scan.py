"""Hostile input on the scan path, through the real `gated run` and `gated scan` processes: reader bytes
that are not text, names and messages from servers and lists that try to forge a log line or drive the
terminal, a ticket API that refuses the sync (issue #17, cases 1, 12, 13 and 16)."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import gated_faults_backends as backends  # tests/faults/backends.py, registered by conftest.py
import pytest
from gated_faults_gatedrun import GatedRun  # tests/faults/gatedrun.py, registered by conftest.py

from gated.simulators.entry import EntrySimulator, SimTicket
from gated.simulators.pretix import PretixSim

STRICT = {"LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"}
# A name or message shaped like a complete scan line of this lane, plus terminal escapes.
FORGED = "Mallory\n19:10:00 lane-1 ADMIT ok online pretix …0001 3ms"
ESCAPES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # anything but a line's own newline (and TAB)


def gated(config: Path, *args: str | bytes, stdin: bytes = b"", env: dict[str, str] | None = None):
    """`gated scan` as an installer runs it; stdout and stderr as bytes decoded leniently, to see everything."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "GATED_CONFIG")}
    full_env.update(env or {})
    r = subprocess.run([sys.executable, "-m", "gated", "scan", "--config", str(config), *args], input=stdin,
                       capture_output=True, timeout=60, env=full_env)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def scan_lines(text: str) -> list[str]:
    """Lines that read as a scan's verdict line, with or without the time in front (stdout has none)."""
    return [line for line in text.splitlines() if re.match(r"(\d\d:\d\d:\d\d )?\S+ (ADMIT|DENY) ", line)]


@pytest.fixture
def local(write_config, tickets_csv):
    """A local-backend lane; `names` gives the ticket holders' names as the CSV's own quoted fields."""

    def make(names: tuple[str, str] = ("Ada", "Bob")) -> Path:
        quoted = ['"' + n.replace('"', '""') + '"' for n in names]
        csv = tickets_csv(f"token,name\nT-0001,{quoted[0]}\nT-0002,{quoted[1]}\n")
        config = write_config(f'[backend]\ntype = "local"\n[backend.local]\ntickets = "{csv}"\n')
        config.write_text(config.read_text().replace("[lane]\n", "[lane]\ndebounce_seconds = 0.0\n"))
        return config

    return make


# --- case 1: a reader's bytes that are not UTF-8 ---------------------------------------------


@pytest.mark.parametrize("env", [{}, STRICT], ids=["default-locale", "strict-utf8"])
def test_a_line_of_invalid_utf8_is_denied_malformed_and_the_next_line_is_decided(local, tmp_path, env):
    run = GatedRun(local(), env=env)
    try:
        run.wait_line("ready in")
        run.proc.stdin.buffer.write(b"T-0001\nAB\xff\xfeCD\nT-0002\n")
        run.proc.stdin.flush()
        got = [run.verdict() for _ in range(3)]
    finally:
        rc = run.stop()
    assert [(m["word"], m["reason"], m["tail"]) for m in got] == [
        ("ADMIT", "ok", "001"), ("DENY", "malformed", "feCD"), ("ADMIT", "ok", "002")]
    assert rc == 0 and not any("Traceback" in line for line in run.seen)
    db = sqlite3.connect(tmp_path / "gated.db")
    tokens = [t for (t,) in db.execute("SELECT token FROM scans ORDER BY id")]
    db.close()
    assert tokens == ["T-0001", "AB\\udcff\\udcfeCD", "T-0002"]  # the refused line kept as printable ASCII


@pytest.mark.parametrize("how", ["argument", "stdin-strict"])
def test_gated_scan_of_bytes_that_are_not_text_prints_a_malformed_verdict(local, how):
    raw = b"AB\xff\xfeCD"
    if how == "argument":
        rc, out, err = gated(local(), os.fsdecode(raw))
    else:
        rc, out, err = gated(local(), "-", stdin=raw + b"\n", env=STRICT)
    assert rc == 1, err
    assert re.fullmatch(r"lane-1 DENY malformed offline local \S+ …feCD \d+ms \(contains bytes that are not "
                        r"valid text\)\n", out)
    assert "Traceback" not in err


# --- case 16: a NUL inside a code ------------------------------------------------------------


def test_gated_scan_refuses_a_code_with_a_nul_inside_instead_of_admitting_it(local):
    rc, out, err = gated(local(), "-", stdin=b"T-\x000001\r\n")  # a shell cannot put a NUL in an argument
    assert rc == 1 and " DENY malformed " in out and "U+0000" in out, out + err


# --- case 13: no log line can be forged ------------------------------------------------------


def test_a_quoted_newline_in_a_csv_name_stays_inside_its_one_scan_line(local):
    run = GatedRun(local((FORGED + "\x1b[2J", "Bob\x9b31m")))
    try:
        run.wait_line("ready in")
        run.feed("T-0001", "T-0002")
        run.wait_line(r"lane-1 ADMIT ok offline local \S+ …002 ")
    finally:
        run.stop()
    lines = scan_lines("\n".join(run.seen))
    assert len(lines) == 2 and lines[0].endswith('"Mallory\\x0a19:10:00 lane-1 ADMIT ok online pretix …0001 3ms'
                                                 '\\x1b[2J"')
    assert not any(ESCAPES.search(line) for line in run.seen)


@pytest.fixture
def pretix(write_config, tmp_path):
    with PretixSim("demo", "democon") as sim:
        token = backends._secret_file(tmp_path, "pretix-device.token", sim.device_token())

        def make(checkin_list: int = 1) -> Path:
            return write_config(f"""
                [backend]
                type = "pretix"
                url = "{sim.url}"
                timeout_seconds = 2.0
                [backend.pretix]
                organizer = "demo"
                event = "democon"
                checkin_list = {checkin_list}
                token_file = "{token}"
                """)

        yield sim, make


def test_a_pretix_attendee_name_shaped_like_a_scan_line_gives_one_line(pretix):
    sim, make = pretix
    secret = sim.add_position(1, FORGED)
    rc, out, err = gated(make(), secret)
    assert rc == 0, err
    assert out.count("\n") == 1 and len(scan_lines(out + err)) == 1
    assert re.fullmatch(r'lane-1 ADMIT ok online pretix cli …\S+ \d+ms "Mallory\\x0a19:10:00 lane-1 ADMIT ok online '
                        r'pretix …0001 3ms"\n', out)


def test_an_entry_reason_message_with_terminal_escapes_never_reaches_the_terminal_raw(write_config, tmp_path):
    sim = EntrySimulator(tickets=[SimTicket("3900000000001", "390:SIM:EVT1", "Ada", "Lovelace")]).start()
    real = sim._decide
    # The server answers in its documented shape; only its words are hostile.
    sim._decide = lambda body, claims: {**real(body, claims), "reasonMessage": "Stop\x1b[2J\x1b]0;owned\x07\r" + FORGED}
    key = backends._secret_file(tmp_path, "entry-api.key", "EXAMPLE-NOT-A-REAL-KEY-0000")
    config = write_config(f"""
        [backend]
        type = "entry"
        url = "{sim.url}"
        timeout_seconds = 2.0
        [backend.entry]
        api_key_file = "{key}"
        venue_code = "TS"
        data_account_id = "390"
        make = "Raspberry Pi"
        model = "Pi 4 Model B"
        """)
    try:
        rc, out, err = gated(config, "3900000000001")
    finally:
        sim.stop()
    assert rc == 0, err
    assert not ESCAPES.search(out + err) and len(scan_lines(out + err)) == 1
    assert '"Stop\\x1b[2J\\x1b]0;owned\\x07\\x0dMallory\\x0a19:10:00 lane-1 ADMIT' in out


# --- case 12: a ticket API that refuses, in `gated scan` -------------------------------------


def test_gated_scan_with_a_sync_pretix_refuses_says_so_and_exits_2(pretix):
    sim, make = pretix
    secret = sim.add_position(1, "Ada")
    rc, out, err = gated(make(checkin_list=99), secret)
    assert rc == 2 and out == ""
    assert "the ticket API refused: [backend.pretix] checkin_list = 99: not a check-in list" in err
    assert "Traceback" not in err
