"""The `gated` commands as an installer runs them: exit codes, printed lines, what they change."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gated import cli
from gated.model import Reason, Scan, ScanMode, Source, deny
from gated.store import Store

TICKETS = """
token,name
T-0001,Ada
"""


def scan(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gated", "scan", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def local(write_config, tickets_csv):
    return write_config(f'[backend.local]\ntickets = "{tickets_csv(TICKETS)}"\nmasks = ["VIP-####"]\n')


def test_scan_admits_with_exit_0_then_denies_the_reuse_with_exit_1(write_config, tickets_csv):
    config = local(write_config, tickets_csv)
    first = scan(config, "T-0001")  # a 6-character code shows at most half of itself: …001
    assert first.returncode == 0, first.stderr
    assert re.fullmatch(r"lane-1 ADMIT ok offline local cli …001 \d+ms \"Ada\"\n", first.stdout)
    assert "output relay (GPIO17) on" in first.stderr and "output relay (GPIO17) off" in first.stderr
    second = scan(config, "T-0001")  # a separate run: not debounced, anti-passback from the store
    assert second.returncode == 1
    assert re.fullmatch(r"lane-1 DENY already_used offline local cli …001 \d+ms \"Ada\"\n", second.stdout)


def test_scan_as_a_configured_reader_applies_its_prefix_and_reads_the_token_from_stdin(write_config, tickets_csv):
    config = local(write_config, tickets_csv)
    config.write_text(config.read_text().replace('[reader.front]\ntype = "stdin"',
                                                 '[reader.front]\ntype = "stdin"\nprefix = "TKT:"'))
    r = subprocess.run([sys.executable, "-m", "gated", "scan", "--config", str(config), "--reader", "front", "-"],
                       input="TKT:VIP-1234\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and " ADMIT ok offline local stdin:front …1234 " in r.stdout


def test_scan_with_a_broken_config_or_unknown_reader_exits_2_without_traceback(write_config, tickets_csv):
    config = local(write_config, tickets_csv)
    r = scan(config, "--reader", "side", "T-0001")
    assert r.returncode == 2 and "no reader named 'side'" in r.stderr and r.stdout == ""
    config.write_text(config.read_text() + "\n[relay]\nbogus = 1\n")
    r = scan(config, "T-0001")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nothing was started" in r.stderr


def test_simulate_runs_a_hardware_config_with_typed_codes_and_mock_pins(write_config, tickets_csv):
    config = local(write_config, tickets_csv)
    text = config.read_text().replace('[reader.front]\ntype = "stdin"',
                                      '[reader.front]\ntype = "hid"\ndevice = "/dev/input/by-id/absent-kbd"')
    config.write_text(text.replace('pin_factory = "mock"', 'pin_factory = "lgpio"'))
    proc = subprocess.Popen([sys.executable, "-m", "gated", "run", "--simulate", "--config", str(config)],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write("T-0001\n")
    proc.stdin.flush()
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if " ADMIT " in line:
            break
    proc.terminate()
    proc.communicate(timeout=20)
    text = "".join(lines)
    assert proc.returncode == 0
    assert "readers: front (stdin)" in text and " ADMIT ok offline local stdin:front …001 " in text


def test_queue_shows_parked_scans_retries_them_and_exports_without_tokens(write_config, capsys):
    config = write_config()
    store = Store(str(config.parent / "gated.db"))
    scans = [Scan(token=f"SECRET-{i}", reader="front") for i in range(3)]
    for s in scans:
        store.record(s, deny(Reason.UNKNOWN, Source.OFFLINE, backend="entry"), lane="lane-1",
                     scan_mode=ScanMode.ENTRY, latency_ms=1.0, queue_upload=True)
    store.mark_parked(scans[0].nonce, "HTTP 422: unknown event")
    store.close()

    assert cli.main(["queue", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "queued for upload: 2\n" in out and "parked: 1\n" in out
    assert f"parked {scans[0].nonce} " in out and "HTTP 422: unknown event" in out

    assert cli.main(["queue", "--config", str(config), "export"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["nonce"] for r in rows) == sorted(s.nonce for s in scans)
    assert all("token" not in r for r in rows) and "SECRET" not in json.dumps(rows)

    assert cli.main(["queue", "--config", str(config), "retry"]) == 0
    assert capsys.readouterr().out.startswith("1 parked scans queued again")
    assert cli.main(["queue", "--config", str(config)]) == 0
    assert "queued for upload: 3\n" in capsys.readouterr().out


def test_scan_run_as_root_leaves_the_store_and_its_list_files_to_the_service_user(write_config, tickets_csv):
    if os.geteuid() != 0:
        pytest.skip("needs root to set owners")
    config = local(write_config, tickets_csv)
    state = Path(config).parent
    shutil.chown(state, user="nobody")  # as scripts/install leaves /var/lib/gated: the service user's
    assert scan(config, "T-0001").returncode == 0  # loads the local list: a list file is created
    made = [*state.glob("gated.db*"), *(state / "gated.db-tickets").iterdir()]
    assert any(p.name.endswith(".sqlite") for p in made)
    assert {p.owner() for p in made} == {"nobody"}, {p.name: p.owner() for p in made}


def test_scan_ends_any_error_from_outside_with_a_message_and_exit_2_not_a_traceback(write_config, tickets_csv):
    # A sync failing in a way no handler foresaw (a list row the parser chokes on), planted in the process.
    plant = ("import sys\n"
             "import gated.policy.local as local\n"
             "async def sync(self, store):\n"
             "    raise ValueError('row 3 of the list: \\x1b[2Jcannot parse')\n"
             "local.LocalBackend.sync = sync\n"
             "from gated import cli\n"
             "sys.exit(cli.main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", plant, "scan", "--config", str(local(write_config, tickets_csv)),
                        "T-0001"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert "gated: the scan failed: ValueError: row 3 of the list: \\x1b[2Jcannot parse" in r.stderr
    assert "Traceback" not in r.stderr and "\x1b" not in r.stderr
