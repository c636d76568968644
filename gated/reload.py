"""Full ticket-list reloads in a child process, so a lane keeps its pace while 100,000 codes arrive.

A reload parses and writes hundreds of pages. On the daemon's own syncer thread that work holds
the interpreter lock in long stretches (each page's `json.loads` is one uninterruptible call), and
every scan, which hops between the event loop and the store thread several times, waits behind
it (figures in benchmarks/README.md). A child process has its own interpreter lock, and the
kernel, not Python, shares the CPU between the two.

The child is `python -m gated.reload`. It reads its job (the checked config, the backend's session,
the store's path) pickled on stdin, builds the same backend class, and runs the backend's
`reload_here()` against its own connection to the same SQLite file. It writes a new generation of
the list, which scans start to read only when it is complete (Store.load_tickets). Its stdout
carries one JSON line: the result, or the error in the terms the parent raises. Its stdin stays
open as a lifeline: when the daemon dies, even by SIGKILL, the child sees end-of-file and exits,
and the next reload drops the half-written generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import struct
import sys
import threading
from typing import Any

from gated.errors import BackendRejected, ConfigError, GatedError, StoreError, Unreachable

log = logging.getLogger(__name__)

# The reload yields the CPU to the daemon (and to anything else the Pi runs) when both want it:
# SCHED_IDLE, so a scan's threads take the CPU from it the moment they wake (at nice 10 they could
# wait for its time slice), else nice 10. Lowering a child of the same user needs no privilege,
# but the unit's system call filter must allow sched_setscheduler and setpriority (see
# systemd/gated.service).
NICENESS = 10
ERRORS: dict[str, type[GatedError]] = {c.__name__: c for c in (Unreachable, BackendRejected, StoreError)}
_HEADER = struct.Struct("!I")
DEADLINE = 3600.0  # a stuck reload (a server trickling bytes) must not hold the uploads' lock for ever


async def run_in_child(job: dict[str, Any]) -> dict[str, Any]:
    """Run `job` in a child process; returns the backend's result dict or raises its GatedError.

    `job` holds "config" (Config), "state" (the backend's reload_state()) and "store" (the path).
    Cancelling this coroutine (the daemon stopping) ends the child before it returns.
    """
    # -P: not the current directory first on sys.path (`sudo gated scan` may start it anywhere).
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "gated.reload", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        yield_cpu(proc.pid)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(encode_job(job))
        await proc.stdin.drain()
        # Not communicate(): it closes stdin at once, and a closed stdin tells the child to stop.
        out, err = await asyncio.wait_for(asyncio.gather(proc.stdout.read(), proc.stderr.read()), DEADLINE)
        proc.stdin.close()
        await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise Unreachable(f"ticket list reload took more than {DEADLINE / 60:g} minutes; stopped") from None
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    for line in err.decode(errors="replace").splitlines():
        if line.strip():  # the child's own warnings, into the daemon's journal
            log.warning("ticket list reload: %s", line, extra={"GATED_EVENT": "sync_child"})
    answer = _last_json(out)
    if answer is not None and "error" in answer:
        kind = ERRORS.get(answer["error"], GatedError)
        raise kind(answer["message"])
    if proc.returncode != 0 or answer is None:
        raise StoreError(f"ticket list reload process failed (exit {proc.returncode}); its output is logged above")
    return answer


def encode_job(job: dict[str, Any]) -> bytes:
    """The job as the child reads it from stdin: length, then the pickle."""
    payload = pickle.dumps(job)
    return _HEADER.pack(len(payload)) + payload


def _last_json(out: bytes) -> dict[str, Any] | None:
    for line in reversed(out.decode(errors="replace").splitlines()):
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                return value
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: its own, unlike ru_maxrss, which exec inherits)."""
    return _proc_self("status", "VmHWM:") / 1024


def written_mb() -> float:
    """What this process had the kernel write to disk so far (/proc/self/io write_bytes)."""
    return _proc_self("io", "write_bytes:") / 1e6


def _proc_self(name: str, field: str) -> float:
    with open(f"/proc/self/{name}") as f:
        for line in f:
            if line.startswith(field):
                return float(line.split()[1])
    return float("nan")


# --- the child ---------------------------------------------------------------------------------

def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _read_job(fd: int) -> dict[str, Any]:
    # Raw reads on the descriptor, not sys.stdin: the lifeline thread below blocks on the same one,
    # and a thread parked inside a buffered reader's lock breaks the interpreter's shutdown.
    head = _read_exactly(fd, _HEADER.size)
    if len(head) != _HEADER.size:
        raise SystemExit("gated.reload: no job on stdin (this module is started by the daemon)")
    (size,) = _HEADER.unpack(head)
    return pickle.loads(_read_exactly(fd, size))  # noqa: S301 - written by our own parent over a pipe


def _watch_parent(fd: int) -> None:
    """Exit as soon as the parent's end of stdin closes: it answered, stopped or died."""
    def wait() -> None:
        while os.read(fd, 4096):
            pass
        os._exit(3)
    threading.Thread(target=wait, name="gated-reload-lifeline", daemon=True).start()


async def _child(job: dict[str, Any]) -> dict[str, Any]:
    from gated import policy
    from gated.store import StoreThread

    backend = policy.build_backend(job["config"])
    backend.restore_state(job["state"])
    store = StoreThread(job["store"], "reload")
    try:
        return await backend.reload_here(store)
    finally:
        await backend.close()
        store.close()


def yield_cpu(pid: int) -> None:
    """Thread `pid`, and the threads it starts from then on, to SCHED_IDLE at nice 10 or lower
    (see NICENESS).

    The daemon calls it on the reload process the moment it is started: its interpreter's start
    and imports (~0.2 s of CPU) would otherwise compete with scans at the daemon's own priority.
    """
    with contextlib.suppress(OSError):  # EPERM under a filter without setpriority: normal priority
        os.setpriority(os.PRIO_PROCESS, pid, max(NICENESS, os.getpriority(os.PRIO_PROCESS, pid)))
    with contextlib.suppress(OSError, AttributeError):  # refused, or not Linux: nice 10 it is
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))


def main() -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    job = _read_job(0)  # the daemon lowered this process before writing it (run_in_child)
    _watch_parent(0)
    try:
        result = asyncio.run(_child(job))
    except (Unreachable, BackendRejected, StoreError) as e:
        result = {"error": type(e).__name__, "message": str(e)}
    except ConfigError as e:
        result = {"error": "BackendRejected", "message": "; ".join(e.problems)}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
