"""The `gated` command: run, check, scan, queue, lookup. Exit codes are a contract (docs/design.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from gated import __version__
from gated import config as configmod
from gated.errors import BackendRejected, ConfigError, GatedError, StoreError

EXIT_OK, EXIT_DENY, EXIT_ERROR = 0, 1, 2


def _load(path: str | None):
    try:
        return configmod.load(path)
    except ConfigError as e:
        print(configmod.report(e), file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    from gated import preflight

    paths = args.files or [args.config]
    worst = EXIT_OK
    for path in paths:
        try:
            config = configmod.load(path)
            # What start-up would refuse beyond the file itself: under systemd this is ExecStartPre,
            # and a config it passes that `gated run` then refuses is a restart loop.
            problems = preflight.problems(config)
            if problems:
                raise ConfigError(config.path, problems)
        except ConfigError as e:
            print(configmod.report(e), file=sys.stderr)
            worst = EXIT_ERROR
            continue
        if len(paths) > 1 or args.quiet:
            print(f"{config.path}: OK")
        else:
            print(configmod.dump(config), end="")
            print(f"# {config.path}: OK", file=sys.stderr)
    return worst


def cmd_run(args: argparse.Namespace) -> int:
    from gated import logs

    config = _load(args.config)
    if config is None:
        logs.setup()
        logging.getLogger("gated").error("configuration invalid; nothing was started (see above)")
        return EXIT_ERROR
    logs.setup(config.log.journal, args.debug or config.log.debug)
    from gated.daemon import Daemon

    return asyncio.run(Daemon(config, simulate=args.simulate).run())


class _NoScanLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "gated.scan"


def cmd_scan(args: argparse.Namespace) -> int:
    from gated import logs
    from gated.daemon import one_scan
    from gated.drivers.base import DEFAULT_INPUT
    from gated.drivers.stdin import read_lines
    from gated.model import InputKind, Scan

    config = _load(args.config)
    if config is None:
        return EXIT_ERROR
    journal = logs.setup(config.log.journal, args.debug or config.log.debug)
    if not journal:  # the verdict line goes to stdout; do not print it twice
        for handler in logging.getLogger().handlers:
            handler.addFilter(_NoScanLines())
    # Bytes that are not text reach the pipeline as such (and are denied malformed), whatever the locale.
    token = next(read_lines(sys.stdin.buffer, sys.stdin.encoding or "utf-8"), "").rstrip("\r\n") \
        if args.token == "-" else args.token
    reader = args.reader or "cli"
    section = config.readers.get(reader)
    if args.reader and section is None:
        print(f"gated: no reader named {args.reader!r} in {config.path}; readers: "
              f"{', '.join(config.readers)}", file=sys.stderr)
        return EXIT_ERROR
    kind = InputKind(args.input) if args.input else (
        InputKind(section.get("input") or DEFAULT_INPUT[section.type]) if section else InputKind.BARCODE)
    label = f"{section.type}:{reader}" if section else "cli"
    scan = Scan(token=token, reader=reader, input=kind, raw_length=len(token))
    try:
        code, line = asyncio.run(one_scan(config, scan, label))
    except ConfigError as e:
        print(configmod.report(e), file=sys.stderr)
        return EXIT_ERROR
    except BackendRejected as e:  # bad credentials or list, a refused set-up: the installer must act
        print(f"gated: the ticket API refused: {logs.clean(e)}; the token was not decided", file=sys.stderr)
        return EXIT_ERROR
    except GatedError as e:
        print(f"gated: {logs.clean(e)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # noqa: BLE001 - whatever else came from outside: a message and exit 2, as promised
        logging.getLogger("gated").debug("gated scan failed", exc_info=True)
        print(f"gated: the scan failed: {logs.clean(f'{type(e).__name__}: {e}')} (--debug shows where)",
              file=sys.stderr)
        return EXIT_ERROR
    print(line)
    return code


def cmd_queue(args: argparse.Namespace) -> int:
    from gated.store import Store

    config = _load(args.config)
    if config is None:
        return EXIT_ERROR
    try:
        store = Store(config.store.path)
    except StoreError as e:
        print(f"gated: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if args.action == "retry":
            n = store.retry_parked()
            print(f"{n} parked scans queued again; the running daemon uploads them at its next round "
                  "(or: systemctl reload gated)")
        elif args.action == "export":
            for row in store.db.query("SELECT * FROM scans WHERE upload IN ('pending', 'parked') ORDER BY id"):
                row.pop("token", None)  # an export leaves the Pi: no ticket secrets in it
                print(json.dumps(row, sort_keys=True))
        else:
            stats = store.queue_stats()
            oldest = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stats.oldest_pending))
                      if stats.oldest_pending else "-")
            print(f"queued for upload: {stats.pending}\noldest queued: {oldest}\nparked: {stats.parked}")
            for row in store.parked():
                print(f"  parked {row['nonce']} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(row['wall']))} "
                      f"{row['verdict']} {row['reason']}: {row['upload_error']}")
    finally:
        store.close()
    return EXIT_OK


async def _with_backend(config, work):
    """Run `await work(backend, store)` with the configured backend and a store, closing both after."""
    from gated.policy import build_backend
    from gated.store import StoreThread

    backend = build_backend(config)
    store = StoreThread(config.store.path)
    try:
        return await work(backend, store)
    finally:
        await backend.close()
        store.close()


def cmd_lookup(args: argparse.Namespace) -> int:
    from gated import logs
    from gated.store import Store
    from gated.tokens import redact

    config = _load(args.config)
    if config is None:
        return EXIT_ERROR

    async def ask(backend, store) -> list[str] | None:
        await backend.start(store)
        return await backend.lookup(args.token)

    if config.backend.type != "local":
        try:
            online = asyncio.run(_with_backend(config, ask))
        except (GatedError, StoreError) as e:
            print(f"ticket API: not available ({e})")
        else:
            if online is not None:  # the server's words reach the terminal: escaped, as in every log line
                print("ticket API:")
                print("\n".join(f"  {logs.clean(line)}" for line in online))
    store = Store(config.store.path)
    try:
        ticket = store.ticket(config.backend.type, args.token)
        if ticket is None:
            print(f"{redact(args.token)}: not in the offline ticket data of backend {config.backend.type}")
        else:
            shown = {k: v for k, v in ticket.items() if k not in ("backend", "token", "data") and v is not None}
            print(f"{redact(args.token)}: " + logs.clean(", ".join(f"{k}={v}" for k, v in shown.items())))
        history = store.history(args.token)
        print(f"scans recorded here: {len(history)}")
        for h in history:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["wall"]))
            print(f"  {stamp} {h['lane']} {h['scan_mode']} {h['verdict'].upper()} {h['reason']} {h['source']}")
    finally:
        store.close()
    return EXIT_OK


def cmd_pair(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_ERROR

    from gated import logs

    try:
        said = asyncio.run(_with_backend(config, lambda backend, store: backend.pair(store, args.token)))
    except ConfigError as e:
        print(configmod.report(e), file=sys.stderr)
        return EXIT_ERROR
    except GatedError as e:
        print(f"gated: pairing failed: {logs.clean(e)}", file=sys.stderr)
        return EXIT_ERROR
    print(said)  # each backend escapes the server's names in it, line by line
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from gated import doctor

    if args.accept_new_store:
        return doctor.accept_new_store(args.config)
    return doctor.main(args.config, timeout=args.timeout)


def cmd_ready(args: argparse.Namespace) -> int:
    from gated import ready

    return ready.main(args.config, as_json=args.json)


def cmd_outputs(args: argparse.Namespace) -> int:
    from gated import wiring

    config = _load(args.config)
    if config is None:
        return EXIT_ERROR
    return wiring.run(config, yes=args.yes, seconds=args.seconds)


def cmd_list_devices(args: argparse.Namespace) -> int:
    from gated.drivers import hid, serial_qr

    def show(found: list, row) -> None:
        for name, details, access, group in map(row, found):
            warn = [] if access else [f"NO ACCESS: add the gated user to the {group} group"]
            print("  " + "  ".join([name, *filter(None, details), *warn]))
        if not found:
            print("  none found")

    print('Keyboard-wedge scanners, for [reader.NAME] type = "hid" (device = the first name, or match):')
    show(hid.list_devices(), lambda c: (c.links[0] if c.links else c.path, [
        f'"{c.name}"', f'match = "{c.vendor_product}"', f"({c.path})" if c.links else ""], c.access, "input"))
    print('Serial ports, for [reader.NAME] type = "serial" (port = the first name):')
    show(serial_qr.list_devices(), lambda s: (s.links[0] if s.links else s.path, [
        s.description, s.hwid, f"({s.path})" if s.links else ""], s.access, "dialout"))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gated", description="Turnstile and ticket-reader daemon.")
    parser.add_argument("--version", action="version", version=f"gated {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", metavar="PATH", default=None,
                       help=f"config file (default: $GATED_CONFIG or {configmod.DEFAULT_PATH})")
        p.set_defaults(func=func)
        return p

    p = command("run", cmd_run, "Run the gate daemon (journald under systemd, stderr otherwise).")
    p.add_argument("--debug", action="store_true", help="log gated's own debug lines")
    p.add_argument("--simulate", action="store_true",
                   help="bench mode: mock GPIO and codes typed on stdin instead of the configured readers")
    p = command("check", cmd_check, "Check config files; print the resolved config (exit 0) or every problem "
                "(exit 2).")
    p.add_argument("files", nargs="*", metavar="FILE", help="check these files instead of --config")
    p.add_argument("--quiet", action="store_true", help="print only OK or the problems (for ExecStartPre)")
    p = command("scan", cmd_scan, "Decide, record, act on and log one token, as the daemon would; exit 0 admit, "
                "1 deny, 2 error.")
    p.add_argument("--reader", metavar="NAME", help="act as this configured reader (its prefix/suffix rules)")
    p.add_argument("--input", choices=("barcode", "qr", "nfc"), help="what kind of code it is")
    p.add_argument("--debug", action="store_true", help="log gated's own debug lines")
    p.add_argument("token", metavar="TOKEN", help='the ticket code, or "-" to read it from stdin')
    p = command("queue", cmd_queue, "Show the upload queue and parked scans; retry parked; export as JSON lines.")
    p.add_argument("action", nargs="?", choices=("show", "retry", "export"), default="show")
    p = command("lookup", cmd_lookup, "Show what the ticket API and this gate know of a ticket, and its scans here.")
    p.add_argument("token", metavar="TOKEN")
    p = command("pair", cmd_pair, "Pair this gate with the ticketing backend (setup token or pairing code).")
    p.add_argument("token", metavar="TOKEN", help="the setup token, pairing code or setup QR text")
    p = command("doctor", cmd_doctor, "Check this gate: config, readers, GPIO, clock, disk, backend, offline data, "
                "queue, journal; exit 1 if any check fails.")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for the ticketing API (default 5)")
    p.add_argument("--accept-new-store", action="store_true",
                   help="confirm a store that replaced a damaged one: offline decisions stop following "
                        "[offline] fallback for it (see docs/reliability.md)")
    p = command("ready", cmd_ready, "Doors-open check: would this lane decide every ticket right without a network? "
                "Exit 0 ready, 1 not (each unmet condition named with its next step), 2 config error.")
    p.add_argument("--json", action="store_true", help='print a JSON list of {"check", "ok", "detail"}')
    command("list-devices", cmd_list_devices, "Show input devices and serial ports a scanner could be, with the "
            "stable /dev/.../by-id names to put in the config.")
    p = command("outputs", cmd_outputs, "Wiring test: switch the relay, LEDs and buzzer one at a time and show the "
                "passage and emergency inputs live.")
    p.add_argument("action", choices=("test",), help="test: cycle the outputs")
    p.add_argument("--yes", action="store_true", help="do not wait for Enter before each output")
    p.add_argument("--seconds", type=float, metavar="S", help="switch each output for S seconds "
                   "(default: its configured pulse, light or beep time)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    finally:
        if args.func in (cmd_scan, cmd_queue, cmd_lookup, cmd_pair) and os.geteuid() == 0:
            _hand_back_store(args.config)


def _hand_back_store(config_path: str | None) -> None:
    """As root, leave the store's files to the service user (gated.store.keep_owner)."""
    from gated.store import keep_owner

    try:
        keep_owner(configmod.load(config_path).store.path)
    except ConfigError:
        pass  # the command said what is wrong with the file; nothing of the store was opened


if __name__ == "__main__":
    sys.exit(main())
