"""A real pretix server for the tests: installed from the package registry, seeded, run on 127.0.0.1.

pretix differs from its documents and from our simulator in ways that only show against the real
thing (validity 0 on signed tickets, 400 for refusals, 403 for a list's detail URL), so the tests
that matter for a venue run against it. The costly parts are cached outside the repository, under
`${XDG_CACHE_HOME:-~/.cache}/gated-tests/pretix-<version>/`:

- `venv/`: pretix and gunicorn from PyPI (about a minute to install);
- `template/`: a migrated SQLite database (migrations take about 90 s on two cores) holding an
  organizer whose events sign their tickets (`pretix_sig1`, set on the organizer so every event
  inherits it), a team API token, two gates and a few devices of the `pretixscan` security profile;
  `template/seed.json` names them. pretix's REST API offers none of these, so they are made once
  through pretix's own Django models.

Each test run copies the template database into a temporary folder, starts gunicorn on a free
port and creates everything else through the REST API with the team token, as a venue's tools
would: the event (in Europe/Berlin, so "today" and weekdays are not UTC's), products, a variation,
check-in lists and orders. A lock file keeps two runs from building the cache at once.

The clock is the real clock: nothing is frozen. A check-in at another time is made the way pretix
allows it, by sending `datetime` with the redeem.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

PRETIX_VERSION = "2026.8.0"
ORGANIZER = "gated"
EVENT = "democon"
TIMEZONE = "Europe/Berlin"
START_SECONDS = 120.0  # gunicorn importing pretix on a busy 2-core machine


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gated-tests" / f"pretix-{PRETIX_VERSION}"


def _log(message: str) -> None:
    # pytest captures stdout; stderr of a session fixture shows with -s and in CI logs on failure.
    print(f"[realpretix] {message}", file=sys.stderr, flush=True)


# Run inside pretix's own Python with its Django settings: the organizer-level things the REST API
# cannot make. Written by us against pretix's models (Organizer, Team, TeamAPIToken, Gate, Device).
BOOTSTRAP = r'''
import json, os, sys
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "pretix.settings")
import django
django.setup()
from django_scopes import scopes_disabled
from pretix.base.models import Device, Gate, Organizer, Team
from pretix.base.models.organizer import TeamAPIToken

with scopes_disabled():
    org = Organizer.objects.create(name="Gated Tests", slug=sys.argv[1])
    # Events inherit organizer settings: every event made later signs its tickets.
    org.settings.ticket_secret_generator = "pretix_sig1"
    team = Team.objects.create(organizer=org, name="Test tools", all_events=True,
                               all_event_permissions=True, all_organizer_permissions=True)
    token = TeamAPIToken.objects.create(team=team, name="gated tests")
    gates = {name: Gate.objects.create(organizer=org, name=name.title(), identifier=name)
             for name in ("north", "south")}
    devices = {}
    for name, gate in (("gate-north", "north"), ("gate-south", "south"), ("spare-1", None),
                       ("spare-2", None), ("spare-3", None)):
        d = Device.objects.create(organizer=org, name=name, all_events=True, security_profile="pretixscan",
                                  gate=gates[gate] if gate else None)
        devices[name] = {"setup_token": d.initialization_token, "gate": gates[gate].pk if gate else None}
    print(json.dumps({"team_token": token.token, "gates": {k: g.pk for k, g in gates.items()},
                      "devices": devices}))
'''


def _config_text(data: Path, url: str) -> str:
    # No celery (tasks run in the request), no redis or memcached, mail to a closed port so nothing
    # leaves the machine, the event's own zone comes from the event (the server's zone is UTC).
    return (f"[pretix]\ninstance_name=gated tests\nurl={url}\ndatadir={data}\necb_rates=off\n"
            f"[database]\nbackend=sqlite3\nname={data / 'db.sqlite3'}\n"
            "[mail]\nhost=127.0.0.1\nport=1\n[locale]\ntimezone=UTC\n[django]\ndebug=off\n")


def _run(args: list[str], env: dict[str, str], what: str, cwd: Path | None = None) -> str:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def ensure_cache() -> Path:
    """Install pretix and make the migrated template, once per machine; return the cache folder."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits here, then finds everything made
        venv = root / "venv"
        if not (venv / ".gated-ready").exists():
            started = time.monotonic()
            shutil.rmtree(venv, ignore_errors=True)
            _log(f"installing pretix {PRETIX_VERSION} into {venv} (once; about a minute)")
            _run([sys.executable, "-m", "venv", str(venv)], dict(os.environ), "python -m venv")
            _run([str(venv / "bin/pip"), "install", "-q", f"pretix=={PRETIX_VERSION}", "gunicorn"],
                 dict(os.environ), "pip install pretix")
            (venv / ".gated-ready").write_text(f"{time.monotonic() - started:.0f} s\n")
            _log(f"pretix installed in {time.monotonic() - started:.0f} s")
        template = root / "template"
        if not (template / "seed.json").exists():
            started = time.monotonic()
            shutil.rmtree(template, ignore_errors=True)
            work = root / "template.tmp"
            shutil.rmtree(work, ignore_errors=True)
            (work / "data").mkdir(parents=True)
            cfg = work / "pretix.cfg"
            cfg.write_text(_config_text(work / "data", "http://127.0.0.1:8000"))
            env = dict(os.environ, PRETIX_CONFIG_FILE=str(cfg))
            _log("migrating a pretix database (once; about 90 s)")
            _run([str(venv / "bin/python"), "-m", "pretix", "migrate", "--noinput"], env, "pretix migrate", cwd=work)
            (work / "bootstrap.py").write_text(BOOTSTRAP)
            seed = _run([str(venv / "bin/python"), str(work / "bootstrap.py"), ORGANIZER], env, "bootstrap", cwd=work)
            json.loads(seed.strip().splitlines()[-1])  # fails loudly if the script printed something else
            (work / "data" / "seed.json").write_text(seed.strip().splitlines()[-1])
            (work / "data").rename(template)
            shutil.rmtree(work, ignore_errors=True)
            _log(f"template database made in {time.monotonic() - started:.0f} s")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Position:
    """One ticket as pretix made it."""

    id: int
    order: str
    secret: str
    item: int
    variation: int | None
    status: str  # the order's: "p" paid, "n" pending, "c" canceled
    valid_from: str | None = None
    valid_until: str | None = None
    attendee_name: str = ""


@dataclass
class RealPretix:
    """A running pretix with one seeded event; `api()` talks to it with the team token."""

    url: str
    data: Path
    seed: dict[str, Any]
    process: subprocess.Popen | None = None
    items: dict[str, int] = field(default_factory=dict)
    variations: dict[str, int] = field(default_factory=dict)
    lists: dict[str, int] = field(default_factory=dict)
    dates: dict[str, int] = field(default_factory=dict)  # dates of series (add_series), by name
    organizer: str = ORGANIZER
    event: str = EVENT
    timezone: str = TIMEZONE
    _devices_used: set[str] = field(default_factory=set)
    _spare: int = 0
    _tokens: dict[str | None, str] = field(default_factory=dict)

    # --- starting and stopping ------------------------------------------------------------

    @classmethod
    def start(cls, workdir: Path) -> RealPretix:
        root = ensure_cache()
        started = time.monotonic()
        data = workdir / "data"
        shutil.copytree(root / "template", data)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        cfg = workdir / "pretix.cfg"
        cfg.write_text(_config_text(data, url))
        env = dict(os.environ, PRETIX_CONFIG_FILE=str(cfg))
        log = open(workdir / "gunicorn.log", "w")  # noqa: SIM115 (closed with the process)
        # One sync worker: SQLite takes one writer at a time, and the tests send one request at a time.
        process = subprocess.Popen(
            [str(root / "venv/bin/gunicorn"), "pretix.wsgi", "--bind", f"127.0.0.1:{port}", "--workers", "1",
             "--timeout", "120", "--name", "gated-test-pretix"],
            env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
        server = cls(url=url, data=data, seed=json.loads((data / "seed.json").read_text()), process=process)
        try:
            server._wait_until_up(workdir / "gunicorn.log")
            server._seed_event()
        except BaseException:
            server.stop()
            raise
        _log(f"pretix {PRETIX_VERSION} up at {url} and seeded in {time.monotonic() - started:.1f} s")
        return server

    def _wait_until_up(self, logfile: Path) -> None:
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pretix exited with {self.process.returncode}:\n{logfile.read_text()[-3000:]}")
            # Not /healthcheck/: it answers 503 without a real cache, which a test server has no need of.
            try:
                answer = httpx.get(f"{self.url}/api/v1/organizers/{self.organizer}/", timeout=2.0,
                                   headers={"Authorization": f"Token {self.seed['team_token']}"})
                if answer.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)  # bounded polling while gunicorn imports pretix
        raise RuntimeError(f"pretix did not answer within {START_SECONDS:.0f} s:\n{logfile.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    # --- REST with the team token ---------------------------------------------------------

    def api(self, method: str, path: str, *, token: str | None = None, device: str | None = None,
            expect: tuple[int, ...] | None = (200, 201), **kw: Any) -> httpx.Response:
        """Call pretix; `path` is below /api/v1/organizers/{organizer}/ unless it starts with /."""
        if not path.startswith("/"):
            path = f"/api/v1/organizers/{self.organizer}/{path}"
        auth = f"Device {device}" if device else f"Token {token or self.seed['team_token']}"
        response = httpx.request(method, self.url + path, headers={"Authorization": auth}, timeout=60.0, **kw)
        if expect is not None and response.status_code not in expect:
            raise AssertionError(f"{method} {path}: HTTP {response.status_code}: {response.text[:500]}")
        return response

    def ev(self, path: str = "") -> str:
        return f"events/{self.event}/{path}"

    # --- the event ------------------------------------------------------------------------

    def _seed_event(self) -> None:
        now = datetime.now(UTC)
        self.api("POST", "events/", json={
            "name": {"en": "Demo Conference"}, "slug": self.event, "currency": "EUR",
            "date_from": iso(now - timedelta(hours=2)), "date_to": iso(now + timedelta(days=2)),
            "date_admission": iso(now - timedelta(hours=3)), "timezone": self.timezone, "has_subevents": False})
        ticket = self.add_item("Ticket")
        vip = self.add_item("VIP", variations=["Gold", "Silver"])
        self.add_item("Workshop")
        self.api("POST", self.ev("quotas/"), json={
            "name": "All", "size": None, "items": list(self.items.values()),
            "variations": list(self.variations.values())})
        self.add_list("plain")
        self.add_list("multiple", allow_multiple_entries=True)
        self.add_list("after_exit", allow_entry_after_exit=True)
        self.add_list("pending", include_pending=True)
        self.add_list("vip_only", all_products=False, limit_products=[vip])
        self.add_list("tickets_rules", rules={"inList": [{"var": "product"}, {"objectList": [
            {"lookup": ["product", str(ticket), "Ticket"]}]}]})

    def add_item(self, name: str, variations: list[str] | None = None) -> int:
        body: dict[str, Any] = {"name": {"en": name}, "default_price": "10.00", "admission": True, "active": True,
                                "personalized": True}
        if variations:
            body["variations"] = [{"value": {"en": v}, "active": True, "default_price": "10.00"} for v in variations]
        item = self.api("POST", self.ev("items/"), json=body).json()
        self.items[name] = item["id"]
        for v in item.get("variations") or []:
            self.variations[f"{name}/{v['value']['en']}"] = v["id"]
        # Later items need their own quota, else pretix sells none of them.
        if self.lists:
            self.api("POST", self.ev("quotas/"), json={"name": name, "size": None, "items": [item["id"]],
                                                      "variations": [v["id"] for v in item.get("variations") or []]})
        return item["id"]

    def add_list(self, name: str, event: str | None = None, **settings: Any) -> int:
        """A check-in list of the event (or of `event`); settings as pretix's API names them (rules,
        include_pending...)."""
        body = {"name": name, "all_products": True, "limit_products": []} | settings
        self.lists[name] = self.api("POST", f"events/{event or self.event}/checkinlists/", json=body).json()["id"]
        return self.lists[name]

    def add_series(self, slug: str, admissions: dict[str, datetime]) -> None:
        """An event series `slug` with the product "Day ticket" and a date for each name in `admissions`,
        admission at that time, start 30 minutes later (`self.dates[name]` is its id)."""
        now = datetime.now(UTC)
        self.api("POST", "events/", json={
            "name": {"en": "Demo Series"}, "slug": slug, "currency": "EUR", "date_from": iso(now - timedelta(hours=2)),
            "timezone": self.timezone, "has_subevents": True})
        item = self.api("POST", f"events/{slug}/items/", json={
            "name": {"en": "Day ticket"}, "default_price": "10.00", "admission": True, "active": True,
            "personalized": True}).json()["id"]
        self.items["Day ticket"] = item
        for name, admission in admissions.items():
            date = self.api("POST", f"events/{slug}/subevents/", json={
                "name": {"en": name}, "active": True, "date_from": iso(admission + timedelta(minutes=30)),
                "date_admission": iso(admission), "item_price_overrides": [], "variation_price_overrides": [],
                "meta_data": {}}).json()["id"]
            self.api("POST", f"events/{slug}/quotas/", json={"name": name, "size": None, "items": [item],
                                                              "variations": [], "subevent": date})
            self.dates[name] = date

    def set_rules(self, name: str, rules: dict[str, Any]) -> None:
        self.api("PATCH", self.ev(f"checkinlists/{self.lists[name]}/"), json={"rules": rules})

    def event_detail(self) -> dict[str, Any]:
        return self.api("GET", self.ev()).json()

    # --- devices --------------------------------------------------------------------------

    def setup_token(self, gate: str | None = None) -> str:
        """An unused initialisation token of a `pretixscan` device (at `gate`: "north" or "south")."""
        if gate:
            name = f"gate-{gate}"
            if name in self._devices_used:
                raise AssertionError(f"device {name} is already initialised; use device_token(gate={gate!r})")
        else:
            self._spare += 1
            name = f"spare-{self._spare}"
            if name not in self.seed["devices"]:
                # More than the template holds: a new device through the API (no gate there).
                body = {"name": f"extra-{self._spare}", "all_events": True, "limit_events": [],
                        "security_profile": "pretixscan"}
                return self.api("POST", "devices/", json=body).json()["initialization_token"]
        self._devices_used.add(name)
        return self.seed["devices"][name]["setup_token"]

    def device_token(self, gate: str | None = "north") -> str:
        """The API token of an initialised `pretixscan` device, initialised as `gated pair` does it."""
        if gate not in self._tokens:
            answer = httpx.post(f"{self.url}/api/v1/device/initialize", timeout=30.0, json={
                "token": self.setup_token(gate), "hardware_brand": "Test", "hardware_model": "realpretix",
                "os_name": "Linux", "os_version": "test", "software_brand": "gated", "software_version": "test"})
            if answer.status_code != 200:
                raise AssertionError(f"device initialisation: HTTP {answer.status_code}: {answer.text}")
            self._tokens[gate] = answer.json()["api_token"]
        return self._tokens[gate]

    def gate_id(self, gate: str) -> int:
        return self.seed["gates"][gate]

    # --- orders, check-ins ----------------------------------------------------------------

    def order(self, status: str = "p", item: str = "Ticket", *, variation: str | None = None,
              valid_from: datetime | None = None, valid_until: datetime | None = None,
              secret: str | None = None, name: str = "Ada Lovelace", valid_if_pending: bool = False) -> Position:
        """An order of one position: status "p" paid, "n" pending, "c" canceled (made paid, then canceled).

        `secret` gives the position a random secret of our choosing instead of a signed one.
        """
        pos: dict[str, Any] = {"item": self.items[item], "attendee_name": name, "price": "10.00"}
        if variation:
            pos["variation"] = self.variations[f"{item}/{variation}"]
        if valid_from is not None:
            pos["valid_from"] = iso(valid_from)
        if valid_until is not None:
            pos["valid_until"] = iso(valid_until)
        if secret is not None:
            pos["secret"] = secret
        body = {"email": "ada@example.org", "locale": "en", "sales_channel": "web", "send_email": False,
                "status": "n" if status == "n" else "p", "payment_provider": "manual", "positions": [pos],
                "valid_if_pending": valid_if_pending}
        order = self.api("POST", self.ev("orders/"), json=body).json()
        if status == "c":
            self.api("POST", self.ev(f"orders/{order['code']}/mark_canceled/"), json={"send_email": False})
        p = order["positions"][0]
        return Position(id=p["id"], order=order["code"], secret=p["secret"], item=p["item"], variation=p["variation"],
                        status=status, valid_from=p.get("valid_from"), valid_until=p.get("valid_until"),
                        attendee_name=name)

    def redeem(self, secret: str, list_name: str, *, when: datetime | None = None, type: str = "entry",
               force: bool = False, device: str | None = None, nonce: str | None = None) -> dict[str, Any]:
        """Redeem as a scanner does; `device` is a device token (its gate counts), else the team token."""
        body: dict[str, Any] = {"secret": secret, "source_type": "barcode", "lists": [self.lists[list_name]],
                                "type": type, "force": force, "ignore_unpaid": False,
                                "nonce": nonce or secrets.token_hex(12), "questions_supported": False}
        if when is not None:
            body["datetime"] = iso(when)
        response = self.api("POST", "checkinrpc/redeem/", json=body, device=device, expect=None)
        answer = response.json()
        answer["http_status"] = response.status_code
        return answer

    def checkin(self, secret: str, list_name: str, when: datetime | None = None, type: str = "entry") -> None:
        """A check-in made on the server (by another scanner), forced so any state takes it."""
        answer = self.redeem(secret, list_name, when=when, type=type, force=True)
        if answer.get("status") != "ok":
            raise AssertionError(f"server-side check-in refused: {answer}")

    def checkins(self, position: Position | int, event: str | None = None) -> list[dict[str, Any]]:
        """The position's successful check-ins as pretix lists them (datetime, list, type, gate, device)."""
        pid = position.id if isinstance(position, Position) else position
        return self.api("GET", f"events/{event or self.event}/orderpositions/{pid}/").json()["checkins"]


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="microseconds")


@contextlib.contextmanager
def running(workdir: Path):
    """A seeded pretix for the length of the block."""
    server = RealPretix.start(workdir)
    try:
        yield server
    finally:
        server.stop()
