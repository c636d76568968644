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


# --- gated check asks what gated run would refuse (issue 17, case 15) ----------------------


def gated(command: str, config) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gated", command, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


SECRETS = {
    "mqtt": ("[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\nhmac_key_file = \"{key}\"\n", "[mqtt] hmac_key_file"),
    "pretix": ("[backend]\ntype = \"pretix\"\nurl = \"http://127.0.0.1:1\"\n[backend.pretix]\norganizer = \"o\"\n"
               "event = \"e\"\ncheckin_list = 1\ntoken_file = \"{key}\"\n", "[backend.pretix] token_file"),
    "entry": ("[backend]\ntype = \"entry\"\nurl = \"http://127.0.0.1:1\"\n[backend.entry]\napi_key_file = \"{key}\"\n"
              "venue_code = \"TS\"\ndata_account_id = \"390\"\nmake = \"Pi\"\nmodel = \"4\"\n",
              "[backend.entry] api_key_file"),
}


@pytest.mark.parametrize("table,where", SECRETS.values(), ids=SECRETS.keys())
def test_check_refuses_a_secret_file_others_can_read_as_run_does(write_config, tmp_path, table, where):
    key = tmp_path / "venue.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o644)
    config = write_config(table.format(key=key))
    said = f'{where} = "{key}": readable by others (mode 644); secrets must be owner-only: chmod 600 {key}\n'
    r = gated("check", config)
    assert r.returncode == 2 and "Traceback" not in r.stderr and f"  {said}" in r.stderr
    if "pretix" not in where:  # pretix logs it and decides offline; check is stricter there on purpose
        run = gated("run", config)
        assert run.returncode == 2 and said in run.stderr and "Traceback" not in run.stderr
    key.chmod(0o600)
    assert gated("check", config).returncode == 0


def test_check_refuses_a_venue_key_too_short_to_sign_with(write_config, tmp_path):
    key = tmp_path / "venue.key"
    key.write_text("short\n")
    key.chmod(0o600)
    r = gated("check", write_config(SECRETS["mqtt"][0].format(key=key)))
    assert r.returncode == 2 and "the key has 5 characters; use at least 16" in r.stderr


@pytest.mark.parametrize("content", [b"\n \n", b"\xff\xfe"], ids=["blank", "not UTF-8"])
def test_check_refuses_an_mqtt_password_file_run_would_refuse(write_config, tmp_path, content):
    key, password = tmp_path / "venue.key", tmp_path / "mqtt.password"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    password.write_bytes(content)
    key.chmod(0o600)
    password.chmod(0o600)
    config = write_config(SECRETS["mqtt"][0].format(key=key) + f'username = "lane-1"\npassword_file = "{password}"\n')
    said = f'[mqtt] password_file = "{password}": ' + ("the file is empty." if content.isspace() else "not UTF-8 text.")
    r = gated("check", config)
    assert r.returncode == 2 and f"  {said}" in r.stderr, r.stderr
    run = gated("run", config)
    assert run.returncode == 2 and said in run.stderr


def _store_paths(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "state").mkdir()
    (tmp_path / "notes.txt").write_text("the installer's notes, not a store\n")
    return {
        "proc": (Path("/proc/gated.db"), "/proc is on a virtual filesystem that cannot hold files"),
        "folder": (tmp_path / "state", f'is a folder; name a file in it, e.g. "{tmp_path / "state" / "gated.db"}"'),
        "parent is a file": (tmp_path / "a-file" / "sub" / "gated.db",
                             f"{tmp_path / 'a-file'} is a file, so the folder for the store cannot be made"),
        "not a store": (tmp_path / "notes.txt", "this file is not a gated store (not SQLite)"),
    }


@pytest.mark.parametrize("case", ["proc", "folder", "parent is a file", "not a store"])
def test_check_refuses_a_store_path_run_cannot_open(write_config, tmp_path, case):
    path, said = _store_paths(tmp_path)[case]
    config = write_config(f'[store]\npath = "{path}"\n')
    r = gated("check", config)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f'  [store] path = "{path}": {said}' in r.stderr
    run = gated("run", config)  # what check predicts: start-up refuses it too
    assert run.returncode != 0 and "cannot start" in run.stderr and "Traceback" not in run.stderr


def test_check_refuses_a_ticket_list_that_would_not_load_naming_file_and_line(write_config, tmp_path):
    tickets = tmp_path / "tickets.csv"
    tickets.write_bytes(b"token,valid_until\nT-1,\nT-2,nan\n")
    r = gated("check", write_config(f'[backend.local]\ntickets = "{tickets}"\n'))
    assert r.returncode == 2
    assert f"  [backend.local] tickets: {tickets}, line 3: valid_until = 'nan': not a time" in r.stderr


def test_check_lists_every_start_problem_at_once_and_writes_nothing(write_config, tmp_path):
    key = tmp_path / "venue.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    key.chmod(0o640)
    tickets = tmp_path / "tickets.csv"
    tickets.write_bytes(b"token\nT-1\n\xff\n")
    config = write_config(f'[backend.local]\ntickets = "{tickets}"\n[store]\npath = "/proc/gated.db"\n'
                          + SECRETS["mqtt"][0].format(key=key))
    r = gated("check", config)
    assert r.returncode == 2 and "has 3 problems; nothing was started." in r.stderr
    fresh = write_config(f'[store]\npath = "{tmp_path / "new" / "state" / "gated.db"}"\n', name="fresh.toml")
    assert gated("check", fresh).returncode == 0
    assert not (tmp_path / "new").exists()  # a store (and its folder) is made by run, not by check


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
