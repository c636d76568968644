"""`gated doctor`: the installer's one-screen check of a gate, each line OK/WARN/FAIL with a next step.

It looks without touching: no relay moves, no scan is recorded, the offline data is not synced.
Exit 0 when no line says FAIL, 1 otherwise. Every path it reads hangs off `System`, so the tests
(and a technician inspecting a copied SD card) can point it at another tree.

Long because it is one screen of independent checks, each a short function, read top to bottom in
the order the screen shows them; split up, the list an installer sees would be scattered.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gated import config as configmod
from gated import preflight
from gated.config import Config
from gated.errors import BackendRejected, ConfigError, GatedError, StoreError, Unreachable
from gated.logs import MAX_MESSAGE, clean
from gated.progress import Progress

OK, WARN, FAIL = "OK", "WARN", "FAIL"

# The unit starts gated with these supplementary groups whether or not /etc/group lists the
# user in them (systemd/gated.service SupplementaryGroups=), so they count for device access.
SERVICE_GROUPS = ("gpio", "input", "dialout")
EARLIEST_TRUSTED = 1704067200.0  # 2024-01-01T00:00:00Z, as the decider judges the clock
MIB = 1024 * 1024


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str
    fix: str = ""  # the next step; empty when there is nothing to do


@dataclass
class System:
    """Where doctor looks: the live machine by default; tests point it at a scratch tree."""

    dev: Path = Path("/dev")
    run: Path = Path("/run")
    sys: Path = Path("/sys")
    timedatectl: str | None = "timedatectl"
    chronyc: str | None = "chronyc"  # asked when timedatectl gives no answer (chrony without timedated)
    user: str = "gated"  # the service account whose access to devices and files matters
    min_free_fail: int = 50 * MIB
    min_free_warn: int = 500 * MIB
    backend_timeout: float = 5.0
    clock: Callable[[], float] = field(default=time.time)


# --- who may open what ---------------------------------------------------------------------


def service_account(user: str) -> tuple[int, set[int]] | None:
    """(uid, gids) the service runs with, or None when the account does not exist (a bench)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return None
    gids = set(os.getgrouplist(user, pw.pw_gid))
    for name in SERVICE_GROUPS:
        try:
            gids.add(grp.getgrnam(name).gr_gid)
        except KeyError:
            pass
    return pw.pw_uid, gids


def _name(lookup: Callable[[int], object], ident: int) -> str:
    try:
        return lookup(ident)[0]  # type: ignore[index]
    except KeyError:
        return str(ident)


def access_problem(path: Path, write: bool, user: str) -> str | None:
    """Why `user` (or, without that account, whoever runs doctor) cannot open `path`; None if it can."""
    try:
        st = os.stat(path)
    except OSError as e:
        return e.strerror or str(e)
    verb = "read and write" if write else "read"
    account = service_account(user)
    if account is None:
        if os.access(path, os.R_OK | (os.W_OK if write else 0)):
            return None
        return f"you may not {verb} it"
    uid, gids = account
    need = 0o6 if write else 0o4
    if uid == 0:
        return None
    if st.st_uid == uid:
        bits = st.st_mode >> 6
    elif st.st_gid in gids:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    if bits & need == need:
        return None
    owner = f"{_name(pwd.getpwuid, st.st_uid)}:{_name(grp.getgrgid, st.st_gid)}"
    return f"{owner} mode {stat.S_IMODE(st.st_mode):04o}: user {user} may not {verb} it"


# --- what is plugged in --------------------------------------------------------------------


def _nfc_ids() -> dict[tuple[int, int], str]:
    """USB readers nfcpy drives (PN531/PN533, ACR122U, Sony RC-S3xx), from nfcpy's own table."""
    from nfc.clf.device import usb_device_map

    return usb_device_map


def usb_nfc_readers(system: System) -> list[tuple[str, str, Path]]:
    """(usb port, chip, /dev/bus/usb node) of every USB NFC reader nfcpy knows."""
    known = _nfc_ids()
    found = []
    for dev in sorted((system.sys / "bus/usb/devices").glob("*")):
        try:
            vid = int((dev / "idVendor").read_text(), 16)
            pid = int((dev / "idProduct").read_text(), 16)
        except (OSError, ValueError):
            continue
        if (vid, pid) in known:
            try:
                node = system.dev / "bus/usb" / f"{int((dev / 'busnum').read_text()):03d}" / \
                    f"{int((dev / 'devnum').read_text()):03d}"
            except (OSError, ValueError):
                node = system.dev / "bus/usb"
            found.append((dev.name, known[(vid, pid)], node))
    return found


def _gated_names(system: System) -> dict[str, str]:
    """Resolved device -> its /dev/gated/ name (the udev rules' stable names), preferred when shown."""
    names = {}
    for link in sorted((system.dev / "gated").glob("*")):
        try:
            names[str(link.resolve(strict=True))] = str(link)
        except OSError:
            continue
    return names


def hid_candidates(system: System) -> list:
    from gated.drivers import hid

    return hid.list_devices(str(system.dev / "input"), str(system.sys / "class/input"))


def plugged_in(system: System) -> dict[str, list[str]]:
    """Candidate devices by kind, as names an installer can paste into the config."""
    from gated.drivers import serial_qr

    stable = _gated_names(system)

    def best(path: str, links: tuple[str, ...], label: str) -> str:
        name = stable.get(os.path.realpath(path)) or (links[0] if links else path)
        return f"{name} ({label})" if label else name

    hid = [best(c.path, c.links, c.name) for c in hid_candidates(system)]
    serial = [best(c.path, c.links, c.description) for c in serial_qr.list_devices(str(system.dev / "serial"))]
    nfc = [f"{chip} at usb {port}" for port, chip, _ in usb_nfc_readers(system)]
    return {"hid": hid, "serial": serial, "nfc": nfc}


def _candidates(found: list[str]) -> str:
    return ", ".join(found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "") if found else "none"


# --- the checks ----------------------------------------------------------------------------


def check_config(path: str, system: System) -> tuple[Check, Config | None]:
    try:
        config = configmod.load(path)
    except ConfigError as e:
        n = len(e.problems)
        first = e.problems[0] if e.problems else ""
        more = f" (+{n - 1} more)" if n > 1 else ""
        return Check("config", FAIL, f"{n} problem{'s' if n != 1 else ''}: {first}{more}",
                     f"gated check --config {path} lists every problem; fix them, then run doctor again"), None
    detail = (f"valid: {len(config.readers)} reader{'s' if len(config.readers) != 1 else ''}, "
              f"backend {config.backend.type}, relay GPIO{config.relay.pin}")
    refused = preflight.problems(config, ticket_list=False)
    if refused:
        more = f" (+{len(refused) - 1} more)" if len(refused) > 1 else ""
        return Check("config", FAIL, f"gated run would refuse to start: {refused[0]}{more}",
                     f"gated check --config {path} lists every problem; fix them, then run doctor again"), config
    problem = access_problem(Path(config.path), False, system.user) if service_account(system.user) else None
    if problem:
        return Check("config", WARN, f"{detail}; but {problem}",
                     f"chown root:{system.user} {config.path} && chmod 640 {config.path}"), config
    return Check("config", OK, detail), config


def check_readers(config: Config, system: System) -> list[Check]:
    found = plugged_in(system)
    checks = [_check_reader(name, section, found, system) for name, section in config.readers.items()]
    listing = "; ".join(f"{kind}: {_candidates(items)}" for kind, items in found.items())
    checks.append(Check("plugged in", OK, listing))
    return checks


def _check_reader(name: str, section: dict, found: dict[str, list[str]], system: System) -> Check:
    label = f"reader {name}"
    rtype = section["type"]
    if rtype == "stdin":
        return Check(label, WARN, "stdin: reads codes typed on a terminal; under systemd it reads nothing",
                     'at a gate use type = "hid", "serial" or "nfc" (see the plugged-in line)')
    if rtype == "nfc":
        return _check_nfc(label, str(section.get("device") or "usb"), system)
    if rtype == "hid" and section.get("match"):
        from gated.drivers import hid

        pattern = section["match"]
        matching = [c for c in hid_candidates(system) if hid.matches(c, pattern)]
        if not matching:
            return Check(label, FAIL, f"hid match {pattern!r}: no plugged-in keyboard device matches",
                         f"plug the scanner in, or change match; plugged in now: {_candidates(found['hid'])}")
        target = matching[0].path
    else:
        target = str(section.get("port") if rtype == "serial" else section.get("device") or "")
    if "://" in target:  # pyserial URL (socket://, rfc2217://): a network port, checked when opened
        return Check(label, OK, f"{rtype} {target} (network port, checked at start)")
    path = Path(target)
    if not path.exists():
        return Check(label, FAIL, f"{rtype} {target}: not found",
                     f"plug it in or correct the path; plugged in now: {_candidates(found.get(rtype, []))}")
    problem = access_problem(path, rtype == "serial", system.user)
    if problem:
        return Check(label, FAIL, f"{rtype} {target}: {problem}",
                     "install the udev rules (scripts/install), then unplug and replug the device")
    shown = target if os.path.realpath(path) == str(path) else f"{target} -> {os.path.realpath(path)}"
    return Check(label, OK, f"{rtype} {shown}")


def _check_nfc(label: str, device: str, system: System) -> Check:
    if device.startswith("udp"):
        return Check(label, OK, f"nfc {device} (nfcpy's simulated reader)")
    if device.startswith("tty:"):
        node = system.dev / f"tty{device.split(':')[1]}"
        problem = access_problem(node, True, system.user) if node.exists() else "not found"
        if problem:
            return Check(label, FAIL, f"nfc {device}: {node} {problem}",
                         "check the wiring and that the serial port is enabled (raspi-config: Interface, Serial)")
        return Check(label, OK, f"nfc {device}: {node}")
    readers = usb_nfc_readers(system)
    parts = device.split(":")
    if len(parts) == 3 and all(len(p) == 4 for p in parts[1:]):  # usb:VVVV:PPPP
        wanted = f"{parts[1]}:{parts[2]}".lower()
        readers = [r for r in readers if _usb_id(system, r[0]) == wanted]
    elif len(parts) == 3:  # usb:BBB:DDD, bus and device number
        readers = [r for r in readers if r[2].parts[-2:] == (f"{int(parts[1]):03d}", f"{int(parts[2]):03d}")]
    if not readers:
        return Check(label, FAIL, f"nfc {device}: no USB NFC reader nfcpy knows is plugged in",
                     "plug in a PN533 or ACR122U reader (lsusb lists what is there)")
    port, chip, node = readers[0]
    problem = access_problem(node, True, system.user)
    if problem:
        return Check(label, FAIL, f"nfc {device}: {chip} at usb {port}: {node} {problem}",
                     "install the udev rules (scripts/install), then replug the reader")
    return Check(label, OK, f"nfc {device}: {chip} at usb {port}")


def _usb_id(system: System, port: str) -> str:
    dev = system.sys / "bus/usb/devices" / port
    try:
        return f"{(dev / 'idVendor').read_text().strip()}:{(dev / 'idProduct').read_text().strip()}".lower()
    except OSError:
        return ""


def check_gpio(config: Config, system: System) -> Check:
    factory = config.gpio.pin_factory
    if factory == "mock":
        return Check("gpio", WARN, "mock pin factory: outputs are only logged, nothing is switched",
                     'on the gate set [gpio] pin_factory = "auto", then: gated outputs test')
    chips = sorted(system.dev.glob("gpiochip*"))
    if not chips:
        return Check("gpio", FAIL, f"no {system.dev}/gpiochip*: not a Raspberry Pi, or no GPIO driver",
                     'on a bench without GPIO set [gpio] pin_factory = "mock"')
    problems = {c: access_problem(c, True, system.user) for c in chips}
    usable = [c for c, p in problems.items() if p is None]
    if not usable:
        chip, problem = next(iter(problems.items()))
        return Check("gpio", FAIL, f"{chip}: {problem}",
                     "install the udev rules (scripts/install) so group gpio may use the GPIO chips")
    return Check("gpio", OK, f"{', '.join(c.name for c in usable)} usable ({factory} pin factory)")


def check_clock_sync(system: System) -> Check:
    synced: bool | None = None
    if system.timedatectl and shutil.which(system.timedatectl):
        try:
            r = subprocess.run([system.timedatectl, "show", "-p", "NTPSynchronized", "--value"],
                               capture_output=True, text=True, timeout=3)
            if r.returncode == 0 and r.stdout.strip() in ("yes", "no"):
                synced = r.stdout.strip() == "yes"
        except (OSError, subprocess.TimeoutExpired):
            pass
    if synced is None and system.chronyc and shutil.which(system.chronyc):
        try:
            r = subprocess.run([system.chronyc, "tracking"], capture_output=True, text=True, timeout=3)
            leap = [line.split(":", 1)[1].strip() for line in r.stdout.splitlines() if line.startswith("Leap status")]
            if r.returncode == 0 and leap:
                synced = leap[0] != "Not synchronised"
        except (OSError, subprocess.TimeoutExpired):
            pass
    if synced is None:
        timesync = system.run / "systemd/timesync"
        if (timesync / "synchronized").exists():
            synced = True
        elif timesync.is_dir():  # systemd-timesyncd runs but has not reached a server yet
            synced = False
    if synced is None:
        return Check("clock sync", WARN, "unknown: timedatectl gave no answer and no time service flag was found",
                     "check that a time service runs: timedatectl status")
    if not synced:
        return Check("clock sync", WARN, "not synchronised with a time server (a Pi has no battery clock)",
                     "give the Pi network access to NTP; see timedatectl timesync-status")
    return Check("clock sync", OK, "synchronised (NTP)")


def check_clock(now: float, newest_scan: float | None) -> Check:
    shown = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now))
    if now < EARLIEST_TRUSTED:
        return Check("clock", FAIL, f"reads {shown}: before 2024, so it was never set",
                     "set the time (NTP or date -s); until then offline checks skip time windows "
                     "and follow [offline] fallback")
    if newest_scan is not None and now < newest_scan:
        newest = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(newest_scan))
        return Check("clock", FAIL, f"reads {shown}: earlier than the newest scan recorded ({newest})",
                     "the clock went back: fix the time source; offline checks skip time windows meanwhile")
    return Check("clock", OK, f"reads {shown}")


def check_disk(store_path: Path, system: System) -> Check:
    folder = store_path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        vfs = os.statvfs(folder)
    except OSError as e:
        return Check("disk", FAIL, f"{folder}: {e.strerror}", "check the storage (SD card) and its mount")
    free = vfs.f_bavail * vfs.f_frsize
    size = store_path.stat().st_size if store_path.exists() else 0
    detail = f"{free / MIB:,.0f} MiB free on {folder} (store {size / MIB:,.1f} MiB)"
    if free < system.min_free_fail:
        return Check("disk", FAIL, detail, "free space now: a full disk stops gated recording scans "
                     "(journalctl --vacuum-size=50M frees journal space)")
    if free < system.min_free_warn:
        return Check("disk", WARN, detail, "free some space before it runs out; [store] retention_seconds "
                     "bounds the store")
    return Check("disk", OK, detail)


def check_journal(system: System) -> Check:
    path = system.run / "systemd/journal/socket"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(str(path))  # a datagram connect proves a listener without sending a line
    except FileNotFoundError:
        return Check("journal", FAIL, f"no journald socket at {path}: the daemon's log lines would be lost",
                     "start systemd-journald (systemctl status systemd-journald)")
    except OSError as e:
        return Check("journal", FAIL, f"{path}: {e.strerror or e}",
                     "restart systemd-journald (systemctl restart systemd-journald)")
    return Check("journal", OK, f"journald accepts messages ({path})")


# --- store, backend, offline data, queue ---------------------------------------------------


def _local_tickets(config: Config, progress: Progress) -> Check:
    from gated.policy.local import TicketListError, read_ticket_csv

    path = config.backend_options.get("tickets", "")
    masks = config.backend_options.get("masks", [])
    if not path:
        if masks:
            return Check("backend", OK, f"local: {len(masks)} barcode mask{'s' if len(masks) != 1 else ''}, "
                         "no ticket list")
        return Check("backend", WARN, "local: no ticket list and no masks, so every scan is denied",
                     "set [backend.local] tickets (a CSV file) or masks")
    n = 0
    try:
        for n, _ in enumerate(read_ticket_csv(path), 1):
            if n % 10000 == 0:
                progress.update(note=f"ticket list: {n:,} rows")
    except TicketListError as e:
        return Check("backend", FAIL, f"local ticket list not loadable: {e}",
                     "fix that line (the whole file is refused while one row is bad); the daemon keeps "
                     "the previous list until the file loads")
    return Check("backend", OK, f"local ticket list {path}: {n:,} tickets")


@dataclass
class StoreFacts:
    """What the store says: newest scan (for the clock), and the backend/data/queue lines."""

    newest_scan: float | None = None
    checks: list[Check] = field(default_factory=list)


async def _store_and_backend(config: Config, system: System, now: float, progress: Progress) -> StoreFacts:
    """Backend reachable and credentials accepted; offline data age; queue backlog."""
    from gated.policy import build_backend
    from gated.store import Store, StoreThread, keep_owner

    facts = StoreFacts()
    store_path = Path(config.store.path)
    backend = build_backend(config)
    if not backend.online:
        progress.update(note="ticket list")
        facts.checks.append(_local_tickets(config, progress))
        if not store_path.exists():  # nothing to ask: do not create a store as root here
            facts.checks.append(Check("queue", OK, f"no store yet at {store_path}; gated creates it at first start"))
            return facts
    try:
        store = StoreThread(store_path, "doctor", read_only_ok=True)
    except StoreError as e:
        facts.checks.append(Check("store", FAIL, str(e), "check the file and its folder's permissions; a corrupt "
                                  "store: move it aside and restart gated"))
        return facts
    try:
        if backend.online:
            progress.update(note=f"asking {backend.name}")
            facts.checks.append(await _reach(backend, store, system.backend_timeout))
        facts.checks += _store_state(config, backend.online, store.read_only, await store.call(Store.replaced))
        facts.newest_scan = await store.call(Store.high_water)
        facts.checks.append(_data_age(config, backend.online, await store.call(backend.data_age, now)))
        if backend.name == "tibillet":  # TiBillet: the downloaded ticket statuses beside the signature keys
            facts.checks.append(_tibillet_statuses(config, await store.call(backend.statuses, now)))
        facts.checks.append(_queue(await store.call(Store.queue_stats), now))
        if config.occupancy is not None:
            facts.checks.append(await _occupancy(config, store, now))
    except StoreError as e:
        facts.checks.append(Check("store", FAIL, str(e), "check the file and its folder's permissions"))
    finally:
        await backend.close()
        store.close()
        keep_owner(store_path)
    return facts


class _Said(logging.Handler):
    """The backend's own fault lines during the check: they name the key to fix (e.g. a refused API key
    that the backend reports as a log line and then as "unreachable"). Also keeps them off the screen."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


async def _reach(backend, store, timeout: float) -> Check:
    name = backend.name
    said = _Said()
    logger = logging.getLogger("gated")
    logger.addHandler(said)
    try:
        await asyncio.wait_for(_start_and_probe(backend, store), timeout)
    except TimeoutError:
        return Check("backend", FAIL, f"{name}: no answer within {timeout:g} s",
                     "check the network and [backend] url; gated decides offline meanwhile")
    except Unreachable as e:
        why = f"{e}" + (f"; {said.lines[0]}" if said.lines else "")
        if said.lines and "refused" in said.lines[0]:
            return Check("backend", FAIL, f"{name}: credentials refused: {why}",
                         f"check the credential files in [backend.{name}], or run gated pair")
        return Check("backend", FAIL, f"{name}: not reachable: {why}",
                     "check the network, DNS and [backend] url; gated decides offline meanwhile")
    except BackendRejected as e:
        return Check("backend", FAIL, f"{name}: credentials refused: {e}",
                     f"check the credential files in [backend.{name}], or run gated pair")
    except GatedError as e:
        return Check("backend", FAIL, f"{name}: {e}", "run gated check, then gated pair if the backend needs it")
    finally:
        logger.removeHandler(said)
    return Check("backend", OK, f"{name}: reachable, credentials accepted")


async def _start_and_probe(backend, store) -> None:
    await backend.start(store)
    await backend.probe()


def _store_state(config: Config, online: bool, read_only: str | None, replaced: dict | None) -> list[Check]:
    """What the store cannot do now: record (read-only), or remember (a replaced damaged store)."""
    checks = []
    on_error = config.store.get("on_error", "deny")
    if read_only is not None:
        what = ("every scan is denied" if on_error == "deny"
                else "scans are admitted unrecorded, never uploaded, unseen by anti-passback")
        checks.append(Check("store", FAIL, f"{config.store.path} cannot be written ({read_only}): scans are not "
                            f'recorded; [store] on_error = "{on_error}": {what}',
                            "the SD card may be failing (dmesg shows why it turned read-only): replace it, or "
                            "remount it read-write; gated records again by itself once it can write"))
    if replaced is not None:
        held = ("an unknown number of scans" if replaced.get("scans") is None
                else f"at least {replaced['scans']} scans")
        when = ("an unknown date" if replaced["at"] is None
                else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(replaced["at"])))
        until = "until the first successful sync" if online else "until you confirm it"
        checks.append(Check(
            "store", WARN, f"replaced a damaged store on {when}, moved aside to {replaced['moved']} ({held}): its "
            "admissions are lost, so a ticket admitted before may be admitted again; offline decisions follow "
            f'[offline] fallback = "{config.offline.fallback}" {until}',
            "make the ticket API reachable: the first sync ends this" if online else
            "check the lane's history by hand (the old file can be read with sqlite3), then: "
            "gated doctor --accept-new-store"))
    return checks


def accept_new_store(config_path: str | None = None) -> int:
    """`gated doctor --accept-new-store`: a technician ends a replaced store's fallback (Store.replaced)."""
    from gated.store import Store, keep_owner

    path = configmod.config_path(config_path)
    try:
        config = configmod.load(path)
    except ConfigError as e:
        print(configmod.report(e), file=sys.stderr)
        return 2
    if not Path(config.store.path).exists():  # do not create a store (as root) only to find nothing in it
        print(f"no store at {config.store.path}: nothing to confirm")
        return 0
    try:
        store = Store(config.store.path)
        try:
            info = store.accept_replaced()
        finally:
            store.close()
            keep_owner(config.store.path)
    except StoreError as e:
        print(f"gated: {clean(e)}", file=sys.stderr)
        return 1
    if info is None:
        print(f"{config.store.path} replaced no damaged store: nothing to confirm")
    else:
        print(f"confirmed: {config.store.path} is the lane's store from now on; offline decisions no longer "
              f"follow [offline] fallback for it (the damaged one stays at {info['moved']})")
    return 0


def ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _data_age(config: Config, online: bool, age: float | None) -> Check:
    fallback = config.offline.fallback
    limit = config.offline.max_age_seconds
    if not online:
        return Check("offline data", OK, "the local ticket list is the authority (never stale)")
    if age is None:
        return Check("offline data", WARN, f"none yet: while the API is unreachable scans follow "
                     f'[offline] fallback = "{fallback}"',
                     "start the daemon with the API reachable; it syncs at once")
    if age > limit:
        return Check("offline data", WARN, f"{ago(age)} old, older than [offline] max_age_seconds "
                     f'({ago(limit)}): scans offline follow fallback = "{fallback}"',
                     "make the API reachable; the daemon refreshes every "
                     f"{config.backend.sync_interval_seconds:g} s")
    return Check("offline data", OK, f"{ago(age)} old (limit {ago(limit)})")


def _tibillet_statuses(config: Config, statuses: tuple[int, float] | None) -> Check:
    """How old TiBillet's ticket statuses are: without them a canceled ticket's signed code admits offline."""
    if not config.backend_options.get("event_uuid"):
        return Check("ticket statuses", WARN, "[backend.tibillet] event_uuid is not set: TiBillet refuses entry "
                     "scans and offline a canceled ticket's signed code is admitted",
                     "set [backend.tibillet] event_uuid to the event's uuid")
    if statuses is None:
        return Check("ticket statuses", WARN, "none downloaded yet: offline a canceled ticket's signed code is "
                     "admitted", "start the daemon with the API reachable; it downloads them at once")
    tickets, age = statuses
    limit = config.offline.max_age_seconds
    if age > limit:
        return Check("ticket statuses", WARN, f"{tickets} ticket(s), {ago(age)} old, older than [offline] "
                     f"max_age_seconds ({ago(limit)})", "make the API reachable; the daemon refreshes every "
                     f"{config.backend.sync_interval_seconds:g} s")
    return Check("ticket statuses", OK, f"{tickets} ticket(s) from list_tickets, {ago(age)} old")


def _queue(stats, now: float) -> Check:
    parts = [f"{stats.pending} waiting for upload"]
    if stats.oldest_pending:
        parts.append(f"oldest {ago(max(0.0, now - stats.oldest_pending))} old")
    if stats.parked:
        parts.append(f"{stats.parked} parked (refused by the API)")
        return Check("queue", WARN, ", ".join(parts),
                     "gated queue shows why each was refused; fix the cause, then: gated queue retry")
    if stats.oldest_pending and now - stats.oldest_pending > 3600:
        return Check("queue", WARN, ", ".join(parts),
                     "uploads are not getting through: see the backend line; gated queue shows the errors")
    return Check("queue", OK, ", ".join(parts) if stats.pending else "empty")


async def _occupancy(config: Config, store, now: float) -> Check:
    """People inside as this lane's store knows them: its own counts and the other lanes' last heard."""
    from gated.occupancy import REMEMBER_KEY, Occupancy
    from gated.store import Store

    s = config.occupancy
    occ = Occupancy(config.lane.name, config.lane.scan_mode, s.capacity, s.reset_at, clock=lambda: now)
    occ.load(*await store.call(Store.occupancy_counts, occ.period))
    occ.recall(await store.call(Store.get, REMEMBER_KEY))
    own, lanes = occ.own(), len(occ.lane_counts())
    detail = (f"{occ.describe()} (venue, {lanes} lane{'s' if lanes != 1 else ''} as last heard); this lane "
              f"{own.entries} in, {own.exits} out since {s.reset_at}")
    if s.capacity and occ.venue_total() >= s.capacity:
        return Check("occupancy", WARN, detail + ": full, entries are denied `full`",
                     "an exit makes room; raise [occupancy] capacity only with the safety officer's word")
    return Check("occupancy", OK, detail)


# --- the whole screen ----------------------------------------------------------------------


def run_checks(config_path: str | None = None, system: System | None = None) -> tuple[list[Check], Config | None]:
    """Every check in screen order; the config is None when it did not load."""
    system = system or System()
    path = configmod.config_path(config_path)
    with Progress("gated doctor", total=6) as progress:
        progress.update(0, note="config")
        head, config = check_config(path, system)
        checks = [head]
        facts = StoreFacts()
        now = system.clock()
        if config is not None:
            progress.update(1, note="readers")
            checks += check_readers(config, system)
            checks.append(check_gpio(config, system))
            progress.update(2, note="store and backend")
            try:
                facts = asyncio.run(_store_and_backend(config, system, now, progress))
            except GatedError as e:  # a backend that cannot even be built from this config
                facts.checks.append(Check("backend", FAIL, str(e), "run gated check"))
        progress.update(4, note="clock")
        checks.append(check_clock_sync(system))
        checks.append(check_clock(now, facts.newest_scan))
        if config is not None:
            checks.append(check_disk(Path(config.store.path), system))
        checks += facts.checks
        progress.update(5, note="journal")
        checks.append(check_journal(system))
        progress.clear()
        progress.enabled = False  # the report replaces the progress line
    return checks, config


def render(checks: list[Check], config: Config | None, path: str, color: bool = False) -> str:
    paint = {OK: "\033[32m", WARN: "\033[33m", FAIL: "\033[1;31m"} if color else {}
    reset = "\033[0m" if color else ""
    title = f"gated doctor: {path}" + (f", lane {config.lane.name}" if config else "")
    width = max(len(c.name) for c in checks)
    lines = [title]
    for c in checks:
        status = f"{paint.get(c.status, '')}{c.status:<4}{reset}"
        # Details carry the words of servers, devices and files (an API's refusal, a device name):
        # escaped here, where they reach the terminal, so none can forge a line or drive the screen.
        lines.append(f"{status}  {c.name:<{width}}  {clean(c.detail, MAX_MESSAGE)}")
        if c.fix and c.status != OK:
            lines.append(f"{'':4}  {'':<{width}}  -> {clean(c.fix, MAX_MESSAGE)}")
    fails = sum(c.status == FAIL for c in checks)
    warns = sum(c.status == WARN for c in checks)
    if fails:
        lines.append(f"{fails} FAIL, {warns} WARN: fix the FAIL lines first, then run gated doctor again.")
    elif warns:
        lines.append(f"No FAIL, {warns} WARN: the gate can run; the WARN lines say what would make it better.")
    else:
        lines.append("All checks OK.")
    return "\n".join(lines)


def main(config_path: str | None = None, timeout: float = 5.0) -> int:
    """Print the screen; exit status 0 when nothing failed, 1 otherwise."""
    system = System(backend_timeout=timeout)
    checks, config = run_checks(config_path, system)
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(render(checks, config, configmod.config_path(config_path), color))
    return 1 if any(c.status == FAIL for c in checks) else 0
