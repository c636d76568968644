"""`gated run` as a subprocess for the reliability tests: codes in on stdin, log lines back from stderr.

Optionally wrapped (`wrap=[...]`, e.g. unshare for a private mount namespace, or libfaketime's
environment) and with NOTIFY_SOCKET/WATCHDOG_USEC set the way systemd sets them.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

VERDICT = re.compile(r"^\S+ (?P<lane>\S+) (?P<word>ADMIT|DENY) (?P<reason>\S+) (?P<source>\S+) \S+ \S+ …(?P<tail>\S+) ")


class GatedRun:
    def __init__(self, config: Path, *, env: dict[str, str] | None = None, wrap: list[str] | None = None,
                 watchdog_pid_self: bool = False):
        base = {k: v for k, v in os.environ.items()
                if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM", "GATED_CONFIG")}
        base["PYTHONIOENCODING"] = "utf-8"
        base.update(env or {})
        cmd = [sys.executable, "-m", "gated", "run", "--config", str(config)]
        if watchdog_pid_self:  # systemd sets WATCHDOG_PID to the main pid; exec keeps sh's pid for python
            cmd = ["sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *cmd]
        self.proc = subprocess.Popen([*(wrap or []), *cmd], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", env=base)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def feed(self, *codes: str) -> None:
        self.proc.stdin.write("".join(f"{c}\n" for c in codes))
        self.proc.stdin.flush()

    def wait_line(self, pattern: str, timeout: float = 10.0) -> str:
        """The next stderr line matching `pattern`; fails after `timeout` or when stderr ends."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"no line matching {pattern!r}; gated said:\n" + "\n".join(self.seen[-40:]))
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def verdict(self, timeout: float = 10.0) -> re.Match:
        """The next scan line, parsed."""
        return VERDICT.match(self.wait_line(VERDICT.pattern, timeout))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit code; the remaining lines are kept in `seen`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def wait_exit(self, timeout: float = 15.0) -> int:
        rc = self.proc.wait(timeout)
        while (line := self.lines.get(timeout=timeout)) is not None:
            self.seen.append(line)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
