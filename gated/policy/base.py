"""The one small interface every ticketing API implements, and what an upload round returns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from gated.config import Config
from gated.errors import BackendRejected
from gated.model import Decision, Scan, ScanMode
from gated.quiet import Quiet
from gated.store import Store, StoreThread


@dataclass
class UploadResult:
    """What became of a batch: uploaded, parked for good (with the reason), or left for later."""

    sent: list[str] = field(default_factory=list)
    parked: dict[str, str] = field(default_factory=dict)
    retry: dict[str, str] = field(default_factory=dict)


class Backend(ABC):
    """A ticketing API: online validation within a deadline, offline data, upload of queued scans.

    The online methods are coroutines on the event loop and raise `Unreachable` when the API
    does not answer usefully; the offline ones run on the store's thread with its Store.
    """

    name: str = ""
    online: bool = True  # False for backends that only decide from local data
    offline_first: bool = False  # True: an online API whose scans are decided offline, then uploaded

    def __init__(self, config: Config):
        self.config = config
        self.options = config.backend_options
        # The lane's scans (Gate.quiet once the gate is built): an upload builds and sends each
        # request in a gap between them.
        self.quiet = Quiet()

    async def start(self, store: StoreThread) -> None:  # noqa: B027 (optional hook)
        """Log in, load sessions; may raise Unreachable (the gate then starts offline)."""

    async def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""

    @abstractmethod
    async def validate(self, scan: Scan, scan_mode: ScanMode) -> Decision:
        """Ask the API; the answer is final. Raise Unreachable on timeout, network error or 5xx."""

    async def probe(self) -> None:  # noqa: B027 (optional hook)
        """Cheap request that proves the API is back; raise Unreachable if not."""

    @abstractmethod
    def decide_offline(self, store: Store, scan: Scan, scan_mode: ScanMode, now: float,
                       clock_trusted: bool) -> Decision:
        """Decide from offline data alone (no I/O but the store). Anti-passback is added by the caller."""

    def data_age(self, store: Store, now: float) -> float | None:
        """Seconds since offline data was refreshed; None when there is none yet."""
        return 0.0

    async def sync(self, store: StoreThread) -> None:  # noqa: B027 (optional hook)
        """Refresh offline data; never blocks scans (the store is a separate connection)."""

    async def upload(self, rows: list[dict[str, Any]]) -> UploadResult:
        """Upload scans decided offline; each row is a `scans` table row."""
        return UploadResult(sent=[r["nonce"] for r in rows])

    async def lookup(self, token: str) -> list[str] | None:
        """Ask the API about a ticket for `gated lookup`: lines to print, or None if it cannot."""
        return None

    async def pair(self, store: StoreThread, token: str) -> str:
        """`gated pair TOKEN`: obtain and store device credentials; return what to tell the installer."""
        raise BackendRejected(f"the {self.name} backend needs no pairing")

    async def not_passed(self, row: dict[str, Any]) -> None:  # noqa: B027 (optional hook)
        """An admitted visitor did not pass (passage sensor timeout): annul where the API allows."""

    def describe(self) -> str:
        """One phrase for the start-up banner."""
        return self.name

    # `gated ready` compares these two: None from either means the counts cannot be compared.
    async def ticket_count(self) -> int | None:
        """How many tickets the API says there are (what complete offline data holds); None: no such count."""
        return None

    def offline_count(self, store: Store) -> int | None:
        """How many tickets the offline data here holds, comparable with `ticket_count`; None: not comparable."""
        return None
