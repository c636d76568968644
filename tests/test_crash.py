"""Store durability: `gated run` killed with SIGKILL in the middle of a stream of scans loses nothing it showed.

Each round starts the daemon on the same SQLite file (so every start after the first recovers what
the previous kill left: a hot WAL, a stale -shm), feeds it a stream of codes on stdin and kills it
after a chosen number of verdict lines. The store must then pass integrity_check and hold every scan
whose verdict line was printed, with that verdict, and nothing that was not fed.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

STREAM = 300  # codes fed per round; a kill comes long before the end
VERDICT = re.compile(r"^\S+ lane-1 (ADMIT|DENY) (\S+) \S+ \S+ \S+ …(\S+) ")


def code(n: int) -> str:
    """Four in five admitted by the mask, one in five unknown; the last four digits tell them apart."""
    return f"GONE-{n:06d}" if n % 5 == 4 else f"CRASH-{n:06d}"


@pytest.fixture
def crash_config(write_config):
    return write_config('[backend]\ntype = "local"\n[backend.local]\nmasks = ["CRASH-######"]\n')


def start(config: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "GATED_CONFIG")}
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.Popen([sys.executable, "-m", "gated", "run", "--config", str(config)],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, encoding="utf-8", errors="replace", env=env)


def kill_mid_stream(config: Path, codes: list[str], kill_after: int) -> list[re.Match]:
    """Feed `codes`, SIGKILL the daemon once `kill_after` verdict lines are out; return every verdict line."""
    proc = start(config)
    watchdog = threading.Timer(30, proc.kill)  # a hung daemon ends the read loop below, then fails
    watchdog.start()
    try:
        proc.stdin.write("".join(f"{c}\n" for c in codes))  # fits the pipe buffer: no writer thread
        proc.stdin.flush()
        verdicts: list[re.Match] = []
        for line in proc.stderr:
            m = VERDICT.match(line)
            if m:
                verdicts.append(m)
                if len(verdicts) == kill_after:
                    proc.send_signal(signal.SIGKILL)  # lines already in the pipe are still read below
        assert proc.wait(10) == -signal.SIGKILL, "gated ended before it was killed"
        return verdicts
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def check_store(db: Path, codes: list[str], verdicts: list[re.Match]) -> int:
    """integrity ok; every printed verdict stored as printed; stored scans are the fed codes, in order."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT token, verdict FROM scans WHERE token LIKE 'CRASH-%' OR token LIKE 'GONE-%' "
                            "ORDER BY id").fetchall()
    finally:
        conn.close()
    fed = set(codes)
    stored = [(t, v) for t, v in rows if t in fed]
    assert [t for t, _ in stored] == codes[:len(stored)], "stored scans are not the fed codes in order"
    assert len(stored) >= len(verdicts), f"{len(verdicts)} verdicts printed, {len(stored)} scans stored"
    for (token, verdict), m in zip(stored, verdicts, strict=False):
        assert m.group(3) == token[-4:]
        assert m.group(1).lower() == verdict == ("deny" if token.startswith("GONE") else "admit")
    return len(stored)


def kill_rounds(config: Path, rounds: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    db = config.parent / "gated.db"
    figures = []
    for r in range(rounds):
        codes = [code(n) for n in range(r * STREAM, (r + 1) * STREAM)]
        kill_after = rng.randint(1, 120)
        verdicts = kill_mid_stream(config, codes, kill_after)
        assert len(verdicts) >= kill_after
        figures.append((len(verdicts), check_store(db, codes, verdicts)))
    return figures


def test_sigkill_mid_stream_loses_no_scan_whose_verdict_was_shown(crash_config):
    figures = kill_rounds(crash_config, rounds=5, seed=2)
    assert all(stored >= printed for printed, stored in figures)

    # Restarted on what the kills left, the gate still decides, and remembers who went in.
    proc = start(crash_config)
    stop = threading.Timer(10, proc.send_signal, (signal.SIGTERM,))  # bounds the read if it never answers
    stop.start()
    try:
        proc.stdin.write(f"{code(0)}\n{code(STREAM * 5)}\n")
        proc.stdin.flush()
        seen = []
        for line in proc.stderr:
            m = VERDICT.match(line)
            if m:
                seen.append((m.group(1), m.group(2)))
                if len(seen) == 2:
                    break
    finally:
        stop.cancel()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert seen == [("DENY", "already_used"), ("ADMIT", "ok")]


@pytest.mark.slow
def test_two_hundred_sigkills_mid_stream_lose_no_scan_whose_verdict_was_shown(crash_config):
    figures = kill_rounds(crash_config, rounds=200, seed=7)
    assert len(figures) == 200
