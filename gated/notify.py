"""sd_notify for systemd: READY, STATUS, WATCHDOG and STOPPING; silent when not run by systemd."""

from __future__ import annotations

import os
import time


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        # systemd sets WATCHDOG_PID to the service's main pid; a child that inherited it is not ours.
        self.watchdog_seconds: float | None = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6
        self._last_status = ""

    def _send(self, text: str) -> None:
        if self.enabled:
            from systemd import daemon

            daemon.notify(text)

    def ready(self, status: str) -> None:
        self._last_status = status
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self._send(f"STATUS={status}")

    def watchdog(self) -> None:
        if self.watchdog_seconds:
            self._send("WATCHDOG=1")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) order this against its own
        # SIGHUP; older managers ignore it. READY=1 must follow when the reload is over.
        self._send(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self._send("STOPPING=1")
