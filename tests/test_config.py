"""Config errors are the installer's UI: every message is asserted word for word."""

from __future__ import annotations

import importlib
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gated import cli
from gated import config as configmod
from gated.errors import ConfigError
from gated.schema import REQUIRED, check_table

CONFIG_DIR = Path(__file__).parent.parent / "config"


def problems(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "gated.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as e:
        configmod.load(str(path))
    return e.value.problems


MINIMAL = """
[reader.front]
type = "stdin"
[gpio]
pin_factory = "mock"
"""


def test_minimal_config_fills_every_default(tmp_path):
    path = tmp_path / "gated.toml"
    path.write_text(MINIMAL)
    c = configmod.load(str(path))
    assert c.backend.type == "local" and c.backend.timeout_seconds == 0.8
    assert c.relay.pin == 17 and c.relay.pulse_seconds == 0.2 and c.relay.safe_state == "locked"
    assert c.offline.fallback == "policy" and c.offline.max_age_seconds == 86400.0
    assert c.store.path == "/var/lib/gated/gated.db"
    assert c.lane.serial  # read from the machine, never empty


def test_every_problem_is_reported_at_once_with_section_key_value_and_rule(tmp_path):
    found = problems(tmp_path, """
        [lane]
        nmae = "x"
        mode = "closed"
        [reader.entrance]
        type = "hdi"
        [relay]
        pin = 27
        pulse_seconds = 0
        [led.green]
        pin = 27
        [backend]
        timeout_seconds = "2s"
        [offline]
        fallback = "allow"
    """)
    assert found == [
        '[lane] nmae: unknown key. Did you mean "name"? Allowed: debounce_seconds, mode, name, scan_mode, serial.',
        '[lane] mode = "closed": must be one of "normal", "free", "locked". Did you mean "locked"?',
        '[backend] timeout_seconds = "2s": must be a number (no quotes); durations are seconds: did you mean 2?',
        '[reader.entrance] type = "hdi": must be one of "hid", "serial", "nfc", "stdin". Did you mean "hid"?',
        "[relay] pulse_seconds = 0: must be above 0 and at most 60.",
        '[offline] fallback = "allow": must be one of "policy", "deny", "admit".',
        "[led.green] pin = 27: GPIO27 is already used by [relay].",
    ]


def test_no_reader_is_a_problem(tmp_path):
    assert problems(tmp_path, '[gpio]\npin_factory = "mock"\n') == [
        '[reader.NAME]: no reader configured; add one, e.g. [reader.front] with type = "hid".']


def test_unknown_section_suggests_the_nearest(tmp_path):
    assert problems(tmp_path, MINIMAL + "[realy]\npin = 3\n") == [
        '[realy]: unknown section. Did you mean "relay"? Sections: backend, buzzer, gpio, input, lane, led, '
        "log, metrics, mqtt, occupancy, offline, reader, relay, store, wallet."
    ]


def test_wrong_types_say_what_is_allowed(tmp_path):
    assert problems(tmp_path, MINIMAL + """
        [relay]
        pin = 40
        active_high = "yes"
        [lane]
        debounce_seconds = -1
        [backend.local]
        masks = "390#"
    """) == [
        "[lane] debounce_seconds = -1: must be at least 0 and at most 3600.",
        '[backend.local] masks = "390#": must be a list of texts, e.g. ["a", "b"].',
        "[relay] pin = 40: must be a BCM GPIO number from 0 to 27.",
        '[relay] active_high = "yes": must be true or false (no quotes).',
    ]


def test_missing_referenced_file_is_a_problem(tmp_path):
    found = problems(tmp_path, MINIMAL + '[backend.local]\ntickets = "nope.csv"\n')
    assert found == [f"[backend.local] tickets = \"nope.csv\": file not found: {tmp_path / 'nope.csv'}."]


def test_backend_table_for_another_type_is_flagged(tmp_path):
    found = problems(tmp_path, MINIMAL + '[backend.lcoal]\ntickets = "x"\n')
    assert found == ['[backend.lcoal]: unknown backend table. Did you mean "local"?']


def test_led_with_unknown_name_must_say_what_it_shows(tmp_path):
    assert problems(tmp_path, MINIMAL + "[led.amber]\npin = 5\n") == [
        '[led.amber] shows: missing; say "admit" or "deny" (only [led.green] and [led.red] have a default).'
    ]


def test_unknown_input_and_missing_pin(tmp_path):
    assert problems(tmp_path, MINIMAL + "[input.door]\npin = 5\n[input.passage]\ntimeout_seconds = 3.0\n") == [
        '[input.door]: unknown input. Inputs: passage, emergency.',
        "[input.passage] pin: missing; the BCM GPIO number.",
    ]


def test_syntax_error_names_the_file_and_position(tmp_path):
    found = problems(tmp_path, "[lane\nname = 1\n")
    assert len(found) == 1 and found[0].startswith(f"{tmp_path / 'gated.toml'}: not valid TOML:")
    assert "line 1" in found[0]


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError) as e:
        configmod.load(str(tmp_path / "absent.toml"))
    assert e.value.problems == [f"{tmp_path / 'absent.toml'}: file not found. Copy config/gated.example.toml "
                                "there, or pass --config PATH."]


def test_report_is_the_text_installers_see(tmp_path):
    path = tmp_path / "gated.toml"
    path.write_text(MINIMAL + "[relay]\npin = 99\n")
    with pytest.raises(ConfigError) as e:
        configmod.load(str(path))
    assert configmod.report(e.value) == (
        f"gated: {path} has 1 problem; nothing was started.\n"
        "  [relay] pin = 99: must be a BCM GPIO number from 0 to 27.\n"
        "Fix the file, then run: gated check")


def test_check_exits_2_with_every_problem_and_no_traceback(tmp_path, capsys):
    path = tmp_path / "gated.toml"
    path.write_text(MINIMAL + "[relay]\npin = 99\nbogus = 1\n")
    assert cli.main(["check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "has 2 problems; nothing was started." in err and "Traceback" not in err


def test_check_prints_resolved_config_and_exits_0(tmp_path, capsys):
    path = tmp_path / "gated.toml"
    path.write_text(MINIMAL)
    assert cli.main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[relay]\npin = 17\n" in out and 'fallback = "policy"' in out


def test_secret_values_are_masked_in_the_resolved_config(tmp_path):
    c = configmod.from_dict({"reader": {"front": {"type": "stdin"}}}, str(tmp_path / "x.toml"))
    c.backend_options["password"] = "hunter2"
    assert 'password = "***"' in configmod.dump(c) and "hunter2" not in configmod.dump(c)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_passes_check(path, shipped_config, capsys):
    copy = str(shipped_config(path.name))
    assert cli.main(["check", copy, copy]) == 0, capsys.readouterr().err


def test_gated_config_env_names_the_file(tmp_path, monkeypatch):
    path = tmp_path / "elsewhere.toml"
    path.write_text(MINIMAL)
    monkeypatch.setenv("GATED_CONFIG", str(path))
    assert configmod.load().path == str(path)


# --- numbers: no nan, no inf, nothing too large to use (issue 17, cases 4 and 6) -----------

NUMBER_KEYS = [(where, name, key) for where, schema in configmod.schemas().items()
               for name, key in schema.items() if key.kind in ("int", "float")]


def _problems_for(where: str, name: str, value: object) -> list[str]:
    """The problems naming `name` when a table of `where` holds only it, as gated.config checks a table."""
    heading = where.split(" ")[0]  # "[reader.NAME] hid" -> "[reader.NAME]"
    problems: list[str] = []
    section = check_table(heading, {name: value}, configmod.schemas()[where], Path("/"), problems)
    reader = configmod.AVAILABLE_READERS.get(where.split(" ")[-1]) if heading == "[reader.NAME]" else None
    check = getattr(importlib.import_module(reader), "check", None) if reader else None
    if check is not None:  # a reader type's own rules, e.g. serial stopbits 1, 1.5 or 2
        problems += check(section)
    return [p for p in problems if p.startswith(f"{heading} {name} = ")]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("where", "name", "key"), NUMBER_KEYS, ids=lambda v: v if isinstance(v, str) else "")
def test_every_number_key_refuses_nan_and_infinity(where, name, key, value):
    found = _problems_for(where, name, value)
    assert len(found) == 1 and found[0].startswith(f"{where.split(' ')[0]} {name} = {value}: must be "), found


@pytest.mark.parametrize(("where", "name", "key"), NUMBER_KEYS, ids=lambda v: v if isinstance(v, str) else "")
def test_every_number_key_refuses_values_too_large_to_use(where, name, key):
    # 1e300 seconds overflow asyncio's call_later and sleep; 2**64 does not fit an SQLite integer.
    huge = 2**64 if key.kind == "int" else 1e300
    found = _problems_for(where, name, huge)
    assert len(found) == 1 and found[0].startswith(f"{where.split(' ')[0]} {name} = {huge}: must be "), found
    assert _problems_for(where, name, key.default if key.default is not REQUIRED else key.maximum) == []


def test_nan_duration_is_named_with_file_section_key_value_and_rule(tmp_path):
    assert problems(tmp_path, MINIMAL + """
        [backend]
        timeout_seconds = nan
        [relay]
        pulse_seconds = nan
        [offline]
        max_age_seconds = inf
    """) == [
        "[backend] timeout_seconds = nan: must be above 0 and at most 30.",
        "[relay] pulse_seconds = nan: must be above 0 and at most 60.",
        "[offline] max_age_seconds = inf: must be above 0 and at most 31622400.",
    ]


@pytest.mark.parametrize("line", ["[backend]\ntimeout_seconds = nan", "[relay]\npulse_seconds = nan",
                                  "[offline]\nmax_age_seconds = nan", "[relay]\npulse_seconds = 1e12"])
def test_check_and_run_refuse_a_nan_or_huge_duration_with_exit_2_and_no_traceback(tmp_path, line):
    path = tmp_path / "gated.toml"
    path.write_text(MINIMAL + f'[store]\npath = "{tmp_path / "gated.db"}"\n' + line + "\n")
    key = line.split("\n")[1].split(" =")[0]
    for command in ("check", "run"):
        r = subprocess.run([sys.executable, "-m", "gated", command, "--config", str(path)],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 2, (command, r.stderr)
        assert f"{line.split(chr(10))[0]} {key} = " in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "gated.db").exists()  # nothing was started


def test_occupancy_keys_are_checked_with_the_rule_and_the_value_found(tmp_path):
    assert problems(tmp_path, MINIMAL + '[occupancy]\ncapacity = -1\nreset_at = "5am"\ncapcity = 3\n') == [
        "[occupancy] capacity = -1: must be at least 0 and at most 10000000.",
        '[occupancy] capcity: unknown key. Did you mean "capacity"? Allowed: capacity, reset_at.',
        '[occupancy] reset_at = "5am": must be a local time of day as "HH:MM", e.g. "05:00".',
    ]
    assert problems(tmp_path, MINIMAL + '[occupancy]\ncapacity = 1.5\nreset_at = "24:00"\n') == [
        "[occupancy] capacity = 1.5: must be a whole number.",
        '[occupancy] reset_at = "24:00": must be a local time of day as "HH:MM", e.g. "05:00".',
    ]
    assert problems(tmp_path, MINIMAL + "[occupancy]\ncapacity = nan\nreset_at = 5\n") == [
        "[occupancy] capacity = nan: must be a whole number.",
        "[occupancy] reset_at = 5: must be a text in quotes.",
    ]
    path = tmp_path / "ok.toml"
    path.write_text(MINIMAL + "[occupancy]\ncapacity = 500\n")
    c = configmod.load(str(path))
    assert (c.occupancy.capacity, c.occupancy.reset_at) == (500, "05:00")


def test_a_relative_metrics_textfile_resolves_against_the_config_folder(tmp_path):
    # docs/design.md: relative paths in a config file resolve against that file's folder, not gated's cwd.
    path = tmp_path / "gated.toml"
    path.write_text(MINIMAL + '[metrics]\ntextfile = "prom/gated.prom"\n')
    assert configmod.load(str(path)).metrics.textfile == str(tmp_path / "prom" / "gated.prom")


@pytest.mark.parametrize("name", ["north 3", "north\\n19:10:00 x ADMIT", "gate\\u001b[2J", "", "n" * 65])
def test_a_lane_name_that_would_break_the_log_line_is_a_config_error(load_config, name):
    with pytest.raises(ConfigError) as e:
        load_config(f'[lane]\nname = "{name}"\n[reader.front]\ntype = "stdin"\n', base="")
    assert any("[lane] name" in p and "printable characters without spaces" in p for p in e.value.problems)


@pytest.mark.parametrize("serial", ["PI-é01", "PI\\n0001", "S" * 65])
def test_a_lane_serial_no_http_header_can_carry_is_a_config_error(load_config, serial):
    # Entry's uploads name the lane's serial in a header: a non-ASCII one failed every upload.
    with pytest.raises(ConfigError) as e:
        load_config(f'[lane]\nserial = "{serial}"\n[reader.front]\ntype = "stdin"\n', base="")
    assert any("[lane] serial" in p and "printable ASCII" in p for p in e.value.problems)
