"""Drain the outbox: scans decided offline go to the API in order, never dropped, at least once.

Once exactly wherever the API recognises a repeat (pretix's nonce, TiBillet's and pretixdroid's scanned
state, Entry's `Filename`); docs/reliability.md says where a lost answer can still count one twice.

Outcome rules per scan (libpretixsync's uploadCheckins, but parked rather than dropped):
sent -> done; a permanent refusal -> parked with its reason, logged, visible in `gated queue`;
anything else (timeout, 5xx, network) -> kept, retried with jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable

from gated.errors import GatedError, Unreachable
from gated.policy.base import Backend
from gated.quiet import Quiet
from gated.store import Store, StoreThread

log = logging.getLogger(__name__)


class Uploader:
    def __init__(self, backend: Backend, store: StoreThread, *, batch: int = 100,
                 idle_seconds: float = 60.0, max_backoff: float = 300.0):
        self.backend = backend
        self.store = store
        self.batch = batch
        self.idle_seconds = idle_seconds
        self.max_backoff = max_backoff
        self._wake = asyncio.Event()
        self.failures = 0
        self.can_upload = lambda: True  # the daemon points this at the breaker

    def wake(self) -> None:
        self._wake.set()

    @property
    def quiet(self) -> Quiet:
        """The lane's scans (the backend carries them, see Backend.quiet): each step of an upload
        (read a batch, send it, mark it sent) starts in a gap between scans, since the store thread
        takes calls in order and a scan must not queue behind a batch."""
        return self.backend.quiet

    async def run(self) -> None:
        while True:
            delay = self._backoff() if self.failures else self.idle_seconds
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except TimeoutError:
                pass
            self._wake.clear()
            if self.can_upload():
                await self.drain()

    def _backoff(self) -> float:
        base = min(self.max_backoff, 2.0 ** min(self.failures, 12))
        return random.uniform(base / 2, base)  # full jitter: lanes that lost the link together spread out

    async def drain(self) -> int:
        """Upload until the queue is empty or the API fails; returns how many were sent."""
        total, started = 0, time.monotonic()
        while True:
            await self.quiet.gap()
            rows = await self.store.call(Store.pending, self.batch)
            if not rows:
                break
            try:
                result = await self.backend.upload(rows)
            except Unreachable as e:
                self.failures += 1
                await self.store.call(Store.mark_failed, [r["nonce"] for r in rows], str(e))
                log.warning("upload of %d queued scans failed (%s); retrying later", len(rows), e,
                            extra={"GATED_EVENT": "upload_failed"})
                break
            except GatedError as e:
                # Refused as a whole (bad credentials, malformed batch): park, never loop on it.
                for r in rows:
                    await self.store.call(Store.mark_parked, r["nonce"], str(e))
                log.error("upload refused, %d scans parked: %s (see gated queue)", len(rows), e,
                          extra={"GATED_EVENT": "upload_parked"})
                continue
            self.failures = 0
            await self.quiet.gap()
            await self.store.call(Store.mark_sent, result.sent)
            for nonce, error in result.parked.items():
                await self.store.call(Store.mark_parked, nonce, error)
                log.error("scan %s parked: %s (see gated queue)", nonce, error,
                          extra={"GATED_EVENT": "upload_parked", "GATED_NONCE": nonce})
            if result.retry:
                await self.store.call(Store.mark_failed, list(result.retry), "; ".join(set(result.retry.values())))
                self.failures += 1
            total += len(result.sent)
            if result.retry:
                break
        if total:
            left = (await self.store.call(Store.queue_stats)).pending
            log.info("uploaded %d scans in %.1fs; %s", total, time.monotonic() - started,
                     "queue empty" if not left else f"{left} still queued",
                     extra={"GATED_EVENT": "upload", "GATED_UPLOADED": str(total)})
        return total


class Syncer:
    """Refresh the backend's offline data on an interval and when the API comes back."""

    def __init__(self, backend: Backend, store: StoreThread, interval: float):
        self.backend = backend
        self.store = store
        self.interval = interval
        self._wake = asyncio.Event()
        self.on_synced: Callable[[], Awaitable[object]] | None = None  # after each sync that succeeded

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.backend.sync(self.store)
                if self.on_synced is not None:
                    await self.on_synced()
            except Unreachable as e:
                log.info("offline data not refreshed: %s", e, extra={"GATED_EVENT": "sync_failed"})
            except GatedError as e:
                log.warning("offline data not refreshed: %s", e, extra={"GATED_EVENT": "sync_failed"})
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            self._wake.clear()
