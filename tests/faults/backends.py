"""One kit per backend that has a simulator: its config, its set-up, tickets it admits offline, and what it counted.

The fault, crash and security tests run the same scenario against every kit, so a backend that
lands later (CM.com) is covered by adding a kit here. Each kit's `counted()` reads the simulator's
own record of what the server now holds, per ticket: that is what "uploaded exactly once" means.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from gated.simulators.base import Simulator

DEADLINE = 0.3  # [backend] timeout_seconds in these tests: short, so a stall costs little test time
# APIs where a scan whose online answer was lost is counted once: pretix by nonce, TiBillet and
# pretixdroid by the ticket's scanned state; Entry (Ticket Lookup) and CM.com (the changes since the
# scan) because gated checks before uploading such a scan. Every backend is in it now; the set stays
# so a new backend has to earn its place.
IDEMPOTENT = {"tibillet", "pretix", "pretixdroid", "entry", "cm"}


def quick(cfg):
    """A config's lane made fast for tests: no debounce, outputs on for 10 ms (nobody watches them)."""
    cfg.lane["debounce_seconds"] = 0.0
    cfg.relay["pulse_seconds"] = 0.01
    for led in cfg.leds.values():
        led["on_seconds"] = 0.01
    return cfg


def _secret_file(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@dataclass
class Kit:
    """A simulator plus what gated needs to talk to it. `url_path` is appended to the (proxy) base URL."""

    name: str
    sim: Simulator
    tokens: list[str]
    backend_toml: str  # [backend.TYPE] table and anything else the type needs, with {url} left to fill
    url_path: str = ""
    fallback: str = "policy"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.sim.server.server_address[1]

    def toml(self, url: str, *, deadline: float = DEADLINE, ca_file: str = "", backend_extra: str = "") -> str:
        ca = f'ca_file = "{ca_file}"\n' if ca_file else ""
        ca += backend_extra + "\n" if backend_extra else ""
        return textwrap.dedent(f"""
            [backend]
            type = "{self.name}"
            url = "{url}{self.url_path}"
            timeout_seconds = {deadline}
            probe_interval_seconds = 0.05
            sync_interval_seconds = 3600
            """) + ca + textwrap.dedent(self.backend_toml) + f'\n[offline]\nfallback = "{self.fallback}"\n'

    async def prepare(self, parts) -> None:
        """Pair and download offline data, as an installed gate would have done before the fault."""
        if self.name == "tibillet":
            await parts.backend.pair(parts.store, self.sim.new_device("Fault lane"))
        if self.name != "pretixdroid":
            await parts.backend.sync(parts.store)

    def counted(self) -> Counter[str]:
        """How many times the server now counts each of our tickets as checked in / received."""
        sim = self.sim
        with sim.lock:
            if self.name == "entry":
                # Entry keeps both: admits it answered online, and offline scans uploaded to it.
                online = Counter(t for t, scans in sim.history.items() for h in scans if h["status"] == "Admit")
                return online + Counter(s["token"] for s in sim.received_scans() if s["status"] == "Admit")
            if self.name == "tibillet":
                by_uuid = self.extra["uuids"]
                return Counter(by_uuid[u] for _, u in sim.scans if u in by_uuid)
            if self.name == "pretix":
                return Counter({t: len(sim.successful(t)) for t in self.tokens if sim.successful(t)})
            if self.name == "pretixdroid":
                return Counter(sim.redeems)
            if self.name == "cm":
                service = self.extra["service"]
                return Counter({t: sim.barcodes[service][t]["count_checked_in"] for t in self.tokens
                                if sim.barcodes[service][t]["count_checked_in"]})
        raise AssertionError(self.name)

    def stop(self) -> None:
        self.sim.stop()


_RSA: list[rsa.RSAPrivateKey] = []


def _rsa_key() -> rsa.RSAPrivateKey:
    if not _RSA:  # RSA-2048 generation is the slow part of a TiBillet kit: once per test session
        _RSA.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    return _RSA[0]


def make_kit(name: str, folder: Path, n_tokens: int = 3) -> Kit:
    """A started simulator with `n_tokens` tickets that its backend admits offline."""
    if name == "entry":
        from gated.simulators.entry import DEFAULT_API_KEY, EntrySimulator, SimTicket

        # Tickets Entry knows (online they would be admitted) whose codes also match the event's mask.
        tokens = [f"3901{i:09d}" for i in range(1, n_tokens + 1)]
        sim = EntrySimulator(tickets=[SimTicket(t, "390:SIM:EVT1", "Fault", str(i)) for i, t in enumerate(tokens)])
        sim.start()
        key = _secret_file(folder, "entry-api.key", DEFAULT_API_KEY)
        return Kit(name, sim, tokens, f"""
            [backend.entry]
            api_key_file = "{key}"
            venue_code = "TS"
            data_account_id = "390"
            make = "Raspberry Pi"
            model = "Pi 4 Model B"
            """)
    if name == "tibillet":
        from gated.simulators.tibillet import TibilletSim, public_pem

        key = _rsa_key()
        sim = TibilletSim().start()
        event = sim.add_event("Concert", key)
        pem = folder / "concert.pem"
        pem.write_bytes(public_pem(key))
        issued = [sim.issue(event, "Ada", f"Fault{i}") for i in range(n_tokens)]
        return Kit(name, sim, [code for _, code in issued], f"""
            [backend.tibillet]
            public_keys = ["{pem}"]
            event_uuid = "{event}"
            """, extra={"uuids": {u: code for u, code in issued}})
    if name == "pretix":
        from gated.simulators.pretix import PretixSim

        sim = PretixSim("demo", "democon").start()
        token = _secret_file(folder, "pretix-device.token", sim.device_token())
        return Kit(name, sim, [sim.add_position(1, f"Visitor {i}") for i in range(n_tokens)], f"""
            [backend.pretix]
            organizer = "demo"
            event = "democon"
            checkin_list = 1
            token_file = "{token}"
            """)
    if name == "pretixdroid":
        from gated.simulators.pretix import PretixdroidSim

        sim = PretixdroidSim("demo", "democon", "S3CRET-KEY").start()
        key = _secret_file(folder, "droid.key", "S3CRET-KEY")
        # No offline data exists for this API: only [offline] fallback = "admit" keeps a lane moving.
        return Kit(name, sim, [sim.add_ticket(f"droid-ticket-{i:04d}") for i in range(n_tokens)], f"""
            [backend.pretixdroid]
            organizer = "demo"
            event = "democon"
            key_file = "{key}"
            """, fallback="admit")
    if name == "cm":
        from gated.simulators.cm import PREFIX, CMSimulator

        sim = CMSimulator(username="scanner", password="letmein").start()
        service = sim.add_service("Main Entrance")
        tokens = [f"FAULT-{i:04d}" for i in range(n_tokens)]
        for t in tokens:
            sim.add_barcode(service, t)
        password = _secret_file(folder, "cm-password", "letmein")
        return Kit(name, sim, tokens, f"""
            [backend.cm]
            username = "scanner"
            password_file = "{password}"
            strategy = "direct"
            service_name = "Main Entrance"
            """, url_path=PREFIX, extra={"service": service})
    raise ValueError(name)


def available_backends() -> list[str]:
    """Every online backend: each has a simulator, so none may drop out of the fault suites unnoticed."""
    return ["entry", "tibillet", "pretix", "pretixdroid", "cm"]
