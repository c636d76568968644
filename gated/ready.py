"""`gated ready`: the doors-open check. Would this lane decide every ticket right without a network?

Each check is one line, ok or not, and a failed one names its next step. Exit 0 when every check
is ok, 1 otherwise, 2 when the config cannot be used. The daemon runs the same checks every minute
and publishes the answer in its retained MQTT status (a Home Assistant binary sensor, gated.mqtt).
Where doctor already checks something (readers, clock, store), its check is reused, not copied.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from gated import config as configmod
from gated import doctor
from gated.config import Config
from gated.doctor import FAIL, OK, System, ago
from gated.errors import ConfigError, GatedError, StoreError, Unreachable
from gated.logs import MAX_MESSAGE, clean

UPLOAD_LIMIT = 600.0  # a scan waiting longer than this for upload means uploads are not getting through
OUTPUTS_TESTED = "outputs:tested"  # the store's kv: {"boot_id", "at"} of the last full `gated outputs test`
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
BROKER_TIMEOUT = 5.0

Broker = Callable[[], Awaitable[str | None]]  # None when the broker is reachable, else why not


@dataclass(frozen=True)
class Result:
    check: str
    ok: bool
    detail: str
    fix: str = ""  # the next step when not ok

    def as_json(self) -> dict:
        detail = self.detail if self.ok or not self.fix else f"{self.detail}; next step: {self.fix}"
        return {"check": self.check, "ok": self.ok, "detail": detail}


def boot_id(path: Path = BOOT_ID) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def outputs_tested(boot: str, now: float) -> str:
    """The kv value `gated outputs test` records after switching every output."""
    return json.dumps({"boot_id": boot, "at": now})


# --- the checks ------------------------------------------------------------------------------


async def evaluate(config: Config, backend, store, system: System, broker: Broker | None,
                   boot: str | None = None) -> list[Result]:
    """Every check, in screen order. `store` is a StoreThread; `backend` has been started (or tried)."""
    from gated.store import Store

    now = system.clock()
    results: list[Result] = []
    results += await _offline_data(config, backend, store, now)
    results += await _clock(system, await store.call(Store.high_water), now)
    results.append(_uploads(await store.call(Store.queue_stats), now))
    # Off the event loop: the daemon runs these every minute beside its scans, and finding readers
    # opens every input device and walks sysfs.
    readers = await asyncio.to_thread(doctor.check_readers, config, system)
    for check in readers[:-1]:  # the last line lists what is plugged in
        results.append(Result(check.name, check.status != FAIL, check.detail, check.fix))
    results.append(_outputs(await store.call(Store.get, OUTPUTS_TESTED), boot_id() if boot is None else boot))
    results.append(await asyncio.to_thread(_store, config, store, system))
    if config.mqtt is not None and broker is not None:
        why = await broker()
        results.append(Result("mqtt broker", why is None, "reachable" if why is None else why,
                              "check the broker and [mqtt] url, username and password_file (docs/mqtt.md)"))
    return results


async def _offline_data(config: Config, backend, store, now: float) -> list[Result]:
    from gated.store import Store

    interval = config.backend.sync_interval_seconds
    if not backend.online:
        masks = config.backend_options.get("masks", [])
        n = await store.call(Store.ticket_count, backend.name) if config.backend_options.get("tickets") else 0
        if not n and not masks:
            present = Result("offline data", False, "no tickets loaded and no barcode masks",
                             "set [backend.local] tickets (a CSV file) or masks, then start gated (it loads the "
                             "list at start)")
        else:
            present = Result("offline data", True, f"local: {n:,} tickets, {len(masks)} masks")
        return [present, Result("ticket count", True, "not checked: the local ticket list is the authority"),
                Result("last sync", True, "not needed: the local ticket list is read from its file")]
    age = await store.call(backend.data_age, now)
    if age is None:
        return [Result("offline data", False, f"none: without the API every scan follows [offline] fallback = "
                       f'"{config.offline.fallback}"', "make the API reachable and start gated; it syncs at once")]
    results = [Result("offline data", True, f"{backend.name}: present")]
    local = await store.call(backend.offline_count)
    try:
        expected = await backend.ticket_count()
    except (GatedError, OSError) as e:
        results.append(Result("ticket count", False, f"not compared: the API did not say how many tickets there are "
                              f"({e})", "make the API reachable, then run gated ready again"))
    else:
        if local is None or expected is None:
            said = f" (the API says {expected:,})" if expected is not None else ""
            results.append(Result("ticket count", True, f"not checked: {backend.name}'s offline data cannot be "
                                  f"counted against the API{said}"))
        elif local != expected:
            results.append(Result("ticket count", False, f"{local:,} tickets here, the API says {expected:,}: "
                                  "the offline data is incomplete",
                                  "let gated sync (systemctl reload gated, or wait for the next sync), then check "
                                  "journalctl -u gated GATED_EVENT=sync_failed"))
        else:
            results.append(Result("ticket count", True, f"{local:,} tickets, as the API says"))
    if age >= 2 * interval:
        results.append(Result("last sync", False, f"{ago(age)} ago, more than twice [backend] "
                              f"sync_interval_seconds ({interval:g} s)",
                              "make the API reachable; journalctl -u gated GATED_EVENT=sync_failed says why not"))
    else:
        results.append(Result("last sync", True, f"{ago(age)} ago (limit {ago(2 * interval)})"))
    return results


async def _clock(system: System, newest_scan: float | None, now: float) -> list[Result]:
    sync = await asyncio.to_thread(doctor.check_clock_sync, system)
    clock = doctor.check_clock(now, newest_scan)
    return [Result("clock", clock.status == OK, clock.detail, clock.fix),
            Result("clock sync", sync.status == OK, sync.detail, sync.fix)]


def _uploads(stats, now: float) -> Result:
    if not stats.pending:
        return Result("uploads", True, "none waiting")
    age = max(0.0, now - stats.oldest_pending) if stats.oldest_pending else 0.0
    detail = f"{stats.pending} waiting, the oldest {ago(age)} old"
    if age > UPLOAD_LIMIT:
        return Result("uploads", False, f"{detail} (more than {ago(UPLOAD_LIMIT)})",
                      "make the API reachable; gated queue shows why uploads fail")
    return Result("uploads", True, detail)


def _outputs(recorded: str | None, boot: str) -> Result:
    fix = "stop gated, run gated outputs test and watch every output switch, then start gated"
    try:
        last = json.loads(recorded) if recorded else None
    except ValueError:
        last = None
    if not isinstance(last, dict):
        return Result("outputs", False, "never tested with gated outputs test", fix)
    at = last.get("at")  # the store's own row, but a damaged store may hold anything
    when = (time.strftime("%Y-%m-%d %H:%M", time.localtime(at))
            if type(at) in (int, float) and 0 <= at < 1e11 else "at an unknown time")
    if not boot or last.get("boot_id") != boot:
        return Result("outputs", False, f"last tested {when}, before this boot", fix)
    return Result("outputs", True, f"tested {when}, since boot")


def _store(config: Config, store, system: System) -> Result:
    path = config.store.path
    if store.read_only is not None:
        return Result("store", False, f"{path} cannot be written ({store.read_only}): scans would not be recorded",
                      "the SD card may be failing (dmesg says why): replace it, or remount it read-write")
    account = doctor.service_account(system.user)
    problem = doctor.access_problem(Path(path), True, system.user) if account else None
    if problem:
        return Result("store", False, f"{path}: {problem}", f"chown {system.user} {path}")
    return Result("store", True, f"{path} writable")


# --- the broker, for the command (the daemon asks its own link) ------------------------------


async def probe_broker(config: Config, timeout: float = BROKER_TIMEOUT) -> str | None:
    """Connect to [mqtt] url with the lane's credentials and wait for the broker's answer."""
    return await asyncio.to_thread(_probe_broker, config, timeout)


def _probe_broker(config: Config, timeout: float) -> str | None:
    import threading

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from gated.config import parse_mqtt_url
    from gated.mqtt import topic_level
    from gated.secrets import read_secret

    s = config.mqtt
    tls, host, port = parse_mqtt_url(s.url)
    # A client id of its own: the lane's would take over the running daemon's session.
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5,
                         client_id=f"gated-ready-{topic_level(config.lane.name)}-{uuid.uuid4().hex[:8]}")
    if s.username:
        client.username_pw_set(s.username, read_secret(s.password_file, "[mqtt] password_file")
                               if s.password_file else None)
    if tls:
        try:
            client.tls_set(ca_certs=s.ca_file or None)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError: a file that is not a PEM bundle
            return f"[mqtt] ca_file {s.ca_file or '(the system bundle)'} cannot be used: {e}"
    answered, outcome = threading.Event(), []

    def on_connect(_c, _u, _flags, reason, _props) -> None:
        outcome.append(None if not reason.is_failure else f"{host}:{port} refused the connection: {reason}")
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(host, port, keepalive=10)
    except OSError as e:
        return f"{host}:{port} not reachable: {e.strerror or e}"
    client.loop_start()
    try:
        if not answered.wait(timeout):
            return f"{host}:{port} did not answer within {timeout:g} s"
        return outcome[0]
    finally:
        client.disconnect()
        client.loop_stop()


# --- the command -----------------------------------------------------------------------------


async def _run(config: Config, system: System) -> list[Result]:
    from gated.policy import build_backend
    from gated.store import StoreThread, keep_owner

    path = Path(config.store.path)
    if not path.exists():  # do not create a store (as root) for a lane that never ran
        return [Result("store", False, f"no store at {path}: this lane has never run",
                       "start gated (systemctl start gated), then run gated ready again")]
    backend = build_backend(config)
    try:
        store = StoreThread(path, "ready", read_only_ok=True)
    except StoreError as e:
        return [Result("store", False, str(e), "check the file and its folder's permissions (gated doctor)")]
    try:
        if backend.online:
            try:
                await asyncio.wait_for(backend.start(store), system.backend_timeout)
            except (Unreachable, TimeoutError, StoreError):
                pass  # the ticket count says the API did not answer
        broker = (lambda: probe_broker(config)) if config.mqtt is not None else None
        return await evaluate(config, backend, store, system, broker)
    finally:
        await backend.close()
        store.close()
        keep_owner(path)


def render(results: list[Result], config: Config) -> str:
    failed = [r for r in results if not r.ok]
    head = (f"gated ready: lane {config.lane.name} is READY" if not failed else
            f"gated ready: lane {config.lane.name} is NOT READY ({len(failed)} of {len(results)} checks failed)")
    width = max(len(r.check) for r in results)
    lines = [head]
    for r in results:  # details carry servers' and devices' words: escaped as doctor.render does
        lines.append(f"{'ok' if r.ok else 'FAIL':<4}  {r.check:<{width}}  {clean(r.detail, MAX_MESSAGE)}")
        if not r.ok and r.fix:
            lines.append(f"{'':4}  {'':<{width}}  -> {clean(r.fix, MAX_MESSAGE)}")
    return "\n".join(lines)


def main(config_path: str | None = None, as_json: bool = False, system: System | None = None) -> int:
    """Exit 0 ready, 1 not ready (each failed check named), 2 the config cannot be used."""
    system = system or System()
    try:
        config = configmod.load(config_path)
        results = asyncio.run(_run(config, system))
    except ConfigError as e:
        print(configmod.report(e), file=sys.stderr)
        return 2
    except GatedError as e:  # a backend that cannot be built from this config
        print(f"gated: {clean(e)}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps([r.as_json() for r in results], indent=1))
    else:
        print(render(results, config))
    return 0 if all(r.ok for r in results) else 1


def summary(results: list[Result]) -> dict[str, str]:
    """The retained MQTT status fields: `ready` ON/OFF and the failed checks' names."""
    failed = [r.check for r in results if not r.ok]
    return {"ready": "OFF" if failed else "ON", "not_ready": ", ".join(failed)}

