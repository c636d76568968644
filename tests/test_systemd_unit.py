"""The shipped systemd unit and journal catalog: systemd's own tools accept them as they are."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gated.logs import MESSAGE_IDS

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "gated.service"
CATALOG = SYSTEMD / "gated.catalog"

needs_analyze = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
needs_journalctl = pytest.mark.skipif(not shutil.which("journalctl"), reason="journalctl not installed")


def unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> every value it is given (units repeat keys such as DeviceAllow=), comments dropped."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with its gated commands pointed at /bin/true: verify checks that binaries exist."""
    text = re.sub(r"^(ExecStart|ExecStartPre)=\S+", r"\1=/bin/true", UNIT.read_text(), flags=re.M)
    path = tmp_path / "gated.service"
    path.write_text(text)
    return path


@needs_analyze
def test_unit_passes_systemd_analyze_verify_without_a_single_warning(unit_copy: Path) -> None:
    # verify returns 0 on an unknown or misspelt key and only prints a warning: any output fails.
    r = subprocess.run(["systemd-analyze", "verify", str(unit_copy)], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


@needs_analyze
def test_unit_hardening_exposure_is_at_most_2_0(unit_copy: Path) -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20", str(unit_copy)],
                       capture_output=True, text=True, timeout=30)
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout
    assert r.returncode == 0, r.stdout


def test_unit_runs_gated_as_a_notify_service_with_watchdog_restart_and_reload() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["WatchdogSec"] == ["30"] and s["Restart"] == ["always"] and s["RestartSec"] == ["2"]
    assert s["ExecStart"] == ["/opt/gated/venv/bin/gated run --config /etc/gated/gated.toml"]
    # a bad edit fails fast in the journal with every problem listed, before the daemon starts
    assert s["ExecStartPre"] == ["/opt/gated/venv/bin/gated check --quiet --config /etc/gated/gated.toml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["SyslogIdentifier"] == ["gated"]


def test_unit_runs_as_gated_with_device_groups_and_its_own_state_and_config_directories() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["User"] == ["gated"]
    assert set(s["SupplementaryGroups"][0].split()) == {"gpio", "input", "dialout"}
    assert s["StateDirectory"] == ["gated"] and s["ConfigurationDirectory"] == ["gated"]
    # lgpio makes a FIFO in the working directory: it must be the writable state directory
    assert s["WorkingDirectory"] == ["/var/lib/gated"]
    assert s["DevicePolicy"] == ["closed"]
    allowed = {v.split()[0] for v in s["DeviceAllow"]}
    assert {"char-gpiochip", "char-input", "char-usb_device", "char-ttyUSB", "char-ttyACM"} <= allowed


def test_unit_starts_without_waiting_for_the_network_and_never_filters_api_addresses() -> None:
    # A gate must start and decide offline when the network is down; and an IP allow list goes
    # stale when the ticketing API's addresses change, turning every online check into a timeout.
    s = unit_settings(UNIT.read_text())
    ordering = " ".join(s.get("After", []) + s.get("Wants", []) + s.get("Requires", []))
    assert "network-online.target" not in ordering
    assert "IPAddressDeny" not in s and "IPAddressAllow" not in s


def catalog_ids(text: str) -> list[str]:
    return re.findall(r"^-- ([0-9a-f]{32})$", text, flags=re.M)


def test_catalog_explains_every_message_id_gated_logs_exactly_once() -> None:
    ids = catalog_ids(CATALOG.read_text())
    assert sorted(ids) == sorted(MESSAGE_IDS.values())
    for entry in re.split(r"^-- [0-9a-f]{32}\n", CATALOG.read_text(), flags=re.M)[1:]:
        head, _, body = entry.partition("\n\n")
        assert re.search(r"^Subject: \S", head, flags=re.M) and "Defined-By: gated" in head
        assert len(body.split()) > 30, head  # says what happened and what to do, not just a title


@needs_journalctl
def test_catalog_compiles_with_journalctl_update_catalog(tmp_path: Path) -> None:
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir)
    r = subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], capture_output=True, text=True,
                       timeout=30)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    listed = subprocess.run(["journalctl", f"--root={tmp_path}", "--list-catalog"], capture_output=True,
                            text=True, timeout=30, check=True).stdout
    subjects = dict(line.split(" ", 1) for line in listed.splitlines())
    assert set(subjects) == set(MESSAGE_IDS.values())
    assert all(s.startswith("gated: ") for s in subjects.values())
