"""Helpers shared by the figure modules: percentiles, result rows, temporary configs, subprocesses,
the scan mixes the backends' figures measure."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gated.pipeline import Gate
    from gated.store import StoreThread


NO_TARGET = "-"


@dataclass
class Figure:
    """One printed row. A row with a target (from docs/design.md) has a verdict by measurement,
    `ok`; a row without one is context and says "-", so it can never pass or fail."""

    name: str
    value: str
    target: str = NO_TARGET
    ok: bool | None = None
    error: bool = False  # the figure could not be measured at all (see `Figure.broken`)

    def __post_init__(self) -> None:
        if (self.target == NO_TARGET) != (self.ok is None):
            raise ValueError(f"{self.name!r}: a row has a verdict exactly when it has a target "
                             f"(target {self.target!r}, ok {self.ok!r})")

    @classmethod
    def broken(cls, where: str, exc: BaseException) -> Figure:
        """The loud row for a figure module that cannot be imported or a figure that raised."""
        text = (str(exc).strip().splitlines() or [""])[0]
        return cls(f"{where}: could not run", f"{type(exc).__name__}: {text}".rstrip(": "), "runs", False,
                   error=True)

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "-"}[self.ok]


def line(fig: Figure) -> str:
    """The progress line printed as each row is measured."""
    return f"  {fig.verdict:4}  {fig.name}: {fig.value}  [target {fig.target}]"


def show(rows: Iterable[Figure]) -> int:
    """Print each row as it is measured, for a figure module run alone; returns its exit status, 1 if
    any row says FAIL, as `python -m benchmarks` does."""
    failed = False
    for fig in rows:
        print(line(fig), flush=True)
        failed |= fig.ok is False
    return int(failed)


def pct(values: Iterable[float], p: float) -> float:
    data = sorted(values)
    if not data:
        return float("nan")
    k = min(len(data) - 1, max(0, round(p / 100 * (len(data) - 1))))
    return data[k]


def latency_text(ms: list[float]) -> str:
    return f"p50 {pct(ms, 50):.2f} ms, p99 {pct(ms, 99):.2f} ms, max {max(ms):.2f} ms (n={len(ms)})"


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def workdir() -> Path:
    """A fresh folder for one figure's store and files, removed when the process exits (a full run
    writes a few hundred MB: on a Pi's SD card they must not stay)."""
    path = Path(tempfile.mkdtemp(prefix="gated-bench-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def write_config(folder: Path, extra: str, *, store: Path | None = None) -> Path:
    text = textwrap.dedent(f"""
        [lane]
        name = "bench-1"
        serial = "BENCH-0001"
        debounce_seconds = 0.0
        [reader.front]
        type = "stdin"
        [gpio]
        pin_factory = "mock"
        [relay]
        pin = 17
        [led.green]
        pin = 27
        [led.red]
        pin = 22
        [store]
        path = "{store or folder / 'gated.db'}"
    """) + textwrap.dedent(extra)
    path = folder / "gated.toml"
    path.write_text(text)
    return path


def secret_file(folder: Path, name: str, text: str) -> Path:
    """`text` in an owner-only file of `folder`, as gated wants its secrets."""
    path = folder / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


async def with_sync_store(cfg, measured):
    """Build the lane of `cfg` and return `await measured(parts, sync_store)`, housekeeping on and the
    syncer on its own store connection, as in the daemon; both closed after."""
    from gated.daemon import build
    from gated.store import StoreThread

    parts = await build(cfg)
    sync_store = StoreThread(cfg.store.path, "sync")
    try:
        async with housekeeping(parts.store):
            return await measured(parts, sync_store)
    finally:
        await parts.close()
        sync_store.close()


def notify_socket(folder: Path) -> tuple[socket.socket, str]:
    path = str(folder / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(30)
    return s, path


def start_daemon(config: Path, notify_path: str, **popen) -> tuple[subprocess.Popen, float]:
    """Start `gated run`; return the process and the seconds until READY=1 arrived."""
    env = {**os.environ, "NOTIFY_SOCKET": notify_path}
    sock = popen.pop("sock")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gated", "run", "--config", str(config)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, **popen)
    while True:
        msg = sock.recv(4096).decode()
        if "READY=1" in msg:
            return proc, time.perf_counter() - started


def run_child(module: str, *args: object, timeout: float) -> dict:
    """`python -m MODULE --child ARGS…` in a fresh interpreter, so its peak RSS is gated's side alone;
    returns the JSON it prints last."""
    out = subprocess.run([sys.executable, "-m", module, "--child", *map(str, args)], capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{module} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.asynccontextmanager
async def housekeeping(scans: StoreThread) -> AsyncIterator[None]:
    """The daemon's WAL upkeep (Daemon._housekeeping) on its cadence, checkpoints on a connection of
    their own as the syncer's: the scans' commits are measured against the WAL the daemon keeps."""
    from gated.daemon import HOUSEKEEPING_SECONDS
    from gated.store import StoreThread, keep_wal

    store = StoreThread(scans.store.path, "housekeeping")

    async def checkpoints() -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_SECONDS)
            await keep_wal(store, scans)

    task = asyncio.get_running_loop().create_task(checkpoints())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()


def set_idle(pid: int, idle: bool) -> None:
    """Every thread of process `pid` to SCHED_IDLE (or back to SCHED_OTHER); threads it starts later inherit."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setscheduler(int(tid), policy, os.sched_param(0))


async def decide_mix(gate: Gate, scans: int, valid: Callable[[], str], unknown: Callable[[], str],
                     rng: random.Random) -> list[float]:
    """`scans` decisions, a third each a valid token (mostly a first entry), a second entry of one
    admitted before and an unknown token; returns each one's scan -> relay command in ms."""
    from gated.model import Scan

    admitted: list[str] = []
    decide = []
    for i in range(scans):
        kind = i % 3
        if kind == 0 or not admitted:
            token = valid()
        elif kind == 1:
            token = rng.choice(admitted)
        else:
            token = unknown()
        decision = await gate.handle(Scan(token=token, reader="front"))
        if decision.admitted:
            admitted.append(token)
        decide.append(gate.last_act_ms)
    return decide


async def paced(gate: Gate, valid: Callable[[], str], until: asyncio.Task | None = None,
                n: int = 0) -> tuple[list[float], list[float]]:
    """A scan of `valid()` every 20 ms, `n` of them or until `until` is done; returns each one's
    scan -> relay command and durable commit in ms. A busy lane, not a flood: what runs beside it
    is what is measured."""
    from gated.model import Scan

    acted, committed = [], []
    while (until is None and len(acted) < n) or (until is not None and not until.done()):
        await gate.handle(Scan(token=valid(), reader="front"))
        acted.append(gate.last_act_ms)
        committed.append(gate.last_commit_ms)
        await asyncio.sleep(0.02)
    return acted, committed
