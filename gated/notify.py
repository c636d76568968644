"""sd_notify for systemd: READY, STATUS, WATCHDOG and STOPPING; silent when not run by systemd.

The datagram is sent without blocking. systemd-python's `daemon.notify()` blocks when the
receiver's queue is full, and a blocked notify would stall the decision loop that sends it:
a manager that is slow to read must cost a status line, never a visitor's scan.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        path = os.environ.get("NOTIFY_SOCKET", "")
        self.enabled = bool(path)
        # "@name" is an abstract socket (leading NUL), as sd_notify(3) documents.
        self._address = "\0" + path[1:] if path.startswith("@") else path
        self._socket: socket.socket | None = None
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        # systemd sets WATCHDOG_PID to the service's main pid; a child that inherited it is not ours.
        self.watchdog_seconds: float | None = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6
        self._last_status = ""

    def _send(self, text: str) -> None:
        if not self.enabled:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(text.encode(), socket.MSG_DONTWAIT, self._address)
        except OSError as e:  # queue full (EAGAIN), manager gone: drop this one, the next will try again
            log.debug("sd_notify %r not sent: %s", text.split("\n", 1)[0], e)

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
