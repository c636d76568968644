"""scripts/install and scripts/uninstall, run for real: into a scratch root (DESTDIR), and live inside
a private mount namespace whose /etc, /opt, /usr and /var are throw-away overlays.

The installer builds gated into a real virtualenv with pip. PIP_NO_DEPS=1 (pip's own setting)
keeps the default run to a few seconds; the slow test installs every dependency.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gated.logs import MESSAGE_IDS

REPO = Path(__file__).parent.parent
UNIT = "etc/systemd/system/gated.service"
RULES = "etc/udev/rules.d/99-gated.rules"
CATALOG = "usr/lib/systemd/catalog/gated.catalog"

pytestmark = pytest.mark.skipif(sys.platform != "linux" or not shutil.which("bash"), reason="Debian installer")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """A frozen copy of the checkout: others may edit the real one while this module runs."""
    dest = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("gated", "config", "systemd", "udev", "scripts", "docs"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=ignore)
    return dest


def run(checkout: Path, script: str, *args: str, deps: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if not deps:
        env["PIP_NO_DEPS"] = "1"
    return subprocess.run([str(checkout / "scripts" / script), *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def installed(checkout, tmp_path_factory) -> tuple[Path, str, bool]:
    """(root, installer output, whether a `gated` user existed on this machine before)."""
    user_before = _user_exists("gated")
    root = tmp_path_factory.mktemp("root")
    r = run(checkout, "install", "--destdir", str(root))
    assert r.returncode == 0, r.stdout + r.stderr
    return root, r.stdout, user_before


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        link = os.readlink(p) if p.is_symlink() else ""
        out[str(p.relative_to(root))] = (stat.S_IMODE(st.st_mode), st.st_size, st.st_mtime_ns, link)
    return out


def copy_root(root: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "root"
    shutil.copytree(root, dest, symlinks=True)
    return dest


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the scratch-root install -----------------------------------------------------------------


def test_install_lays_out_program_unit_rules_catalog_config_and_state(installed, checkout):
    root, out, _ = installed
    gated = root / "opt/gated/venv/bin/gated"
    assert subprocess.run([str(gated), "--version"], capture_output=True, text=True).stdout.startswith("gated ")
    assert os.readlink(root / "usr/local/bin/gated") == "/opt/gated/venv/bin/gated"
    assert (root / UNIT).read_bytes() == (checkout / "systemd/gated.service").read_bytes()
    assert (root / RULES).read_bytes() == (checkout / "udev/99-gated.rules").read_bytes()
    assert (root / CATALOG).read_bytes() == (checkout / "systemd/gated.catalog").read_bytes()
    assert (root / "opt/gated/README.md").is_file()
    assert "cdc_acm" in (root / "etc/modules-load.d/gated.conf").read_text().split()
    assert "blacklist pn533_usb" in (root / "etc/modprobe.d/gated-nfc.conf").read_text()
    assert mode(root / "etc/gated") == 0o750 and mode(root / "etc/gated/gated.toml") == 0o640
    assert mode(root / "var/lib/gated") == 0o750
    for path in (UNIT, RULES, CATALOG):
        assert mode(root / path) == 0o644
    # The checkout stays clean: pip built from a copy, not in the tree.
    assert not (checkout / "build").exists() and not list(checkout.glob("*.egg-info"))


def test_installed_config_passes_gated_check_and_keeps_its_store_in_var_lib(installed):
    root, _, _ = installed
    config = root / "etc/gated/gated.toml"
    r = subprocess.run([sys.executable, "-m", "gated", "check", "--config", str(config)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'path = "/var/lib/gated/gated.db"' in r.stdout
    assert (root / "etc/gated/demo-tickets.csv").is_file()  # the example's ticket list came along


def test_scratch_install_changes_nothing_on_this_machine_and_says_what_it_would_do(installed):
    root, out, user_before = installed
    assert "would run: useradd --system --user-group --home-dir /var/lib/gated" in out
    assert "would run: usermod --append --groups gpio\\,input\\,dialout gated" in out
    assert "would run: chown root:gated /etc/gated" in out
    assert "would run: systemctl daemon-reload" in out
    assert _user_exists("gated") == user_before


def test_catalog_parses_and_explains_every_message_id_gated_logs(installed):
    if not shutil.which("journalctl"):
        pytest.skip("no journalctl")
    root, _, _ = installed
    assert (root / "var/lib/systemd/catalog/database").stat().st_size > 0
    r = subprocess.run(["journalctl", f"--root={root}", "--list-catalog"], capture_output=True, text=True)
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    missing = {event: mid for event, mid in MESSAGE_IDS.items() if mid not in listed}
    assert r.returncode == 0 and missing == {}, r.stderr


def test_rerun_changes_nothing(installed, checkout, tmp_path):
    root = copy_root(installed[0], tmp_path)
    before = snapshot(root)
    r = run(checkout, "install", "--destdir", str(root))
    assert r.returncode == 0, r.stderr
    assert snapshot(root) == before
    assert "unchanged /opt/gated/venv" in r.stdout
    assert [line for line in r.stdout.splitlines() if line.startswith("[install] installed")] == []


def test_rerun_never_overwrites_the_installers_config_but_updates_a_changed_unit(installed, checkout, tmp_path):
    root = copy_root(installed[0], tmp_path)
    mine = '[lane]\nname = "south-1"\n'
    (root / "etc/gated/gated.toml").write_text(mine)
    (root / UNIT).write_text("# stale unit from an older version\n")
    r = run(checkout, "install", "--destdir", str(root))
    assert r.returncode == 0, r.stderr
    assert (root / "etc/gated/gated.toml").read_text() == mine
    assert "kept /etc/gated/gated.toml" in r.stdout
    assert (root / UNIT).read_bytes() == (checkout / "systemd/gated.service").read_bytes()
    assert "installed /etc/systemd/system/gated.service" in r.stdout


def test_uninstall_removes_the_program_but_keeps_scans_and_config(installed, checkout, tmp_path):
    root = copy_root(installed[0], tmp_path)
    (root / "var/lib/gated/gated.db").write_bytes(b"scans not uploaded yet")
    config = (root / "etc/gated/gated.toml").read_text()
    r = run(checkout, "uninstall", "--destdir", str(root))
    assert r.returncode == 0, r.stderr
    for gone in ("opt/gated", "usr/local/bin/gated", UNIT, RULES, CATALOG, "etc/modules-load.d/gated.conf",
                 "etc/modprobe.d/gated-nfc.conf"):
        assert not os.path.lexists(root / gone), gone
    assert (root / "var/lib/gated/gated.db").read_bytes() == b"scans not uploaded yet"
    assert (root / "etc/gated/gated.toml").read_text() == config
    assert "kept /var/lib/gated" in r.stdout and "--purge" in r.stdout


def test_uninstall_purge_removes_scans_and_config_too(installed, checkout, tmp_path):
    root = copy_root(installed[0], tmp_path)
    r = run(checkout, "uninstall", "--purge", "--destdir", str(root))
    assert r.returncode == 0, r.stderr
    assert not (root / "var/lib/gated").exists() and not (root / "etc/gated").exists()
    assert "would run: userdel gated" in r.stdout


# --- the unit and the rules, as installed ----------------------------------------------------


def test_installed_unit_verifies_with_its_programs_found_in_the_installed_tree(installed, tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("no systemd-analyze")
    root, _, _ = installed
    # systemd-analyze checks that ExecStart's program exists: point the unit's /opt/gated at the
    # scratch root, so it checks the very files the installer laid out.
    unit = tmp_path / "gated.service"
    unit.write_text((root / UNIT).read_text().replace("/opt/gated/", f"{root}/opt/gated/"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert (r.returncode, r.stdout.strip(), r.stderr.strip()) == (0, "", "")


def _udev_complaints(rules_dir: Path, tmp_path: Path) -> tuple[str, list[str]]:
    """Parse rules with the real udev: `udevadm verify` (systemd >= 254) or, on Debian 12's 252,
    `udevadm test` in a private mount namespace where rules_dir is /etc/udev/rules.d and the
    groups gated needs exist. A device path that does not exist stops it after parsing, so no
    device node on this machine is touched."""
    verify = subprocess.run(["udevadm", "verify", "--help"], capture_output=True, text=True)
    if verify.returncode == 0:
        r = subprocess.run(["udevadm", "verify", "--resolve-names=never", *map(str, rules_dir.glob("*.rules"))],
                           capture_output=True, text=True)
        return r.stdout + r.stderr, [] if r.returncode == 0 else (r.stdout + r.stderr).splitlines()
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("udevadm 252 has no verify; its test command needs root and unshare")
    group = tmp_path / "group"
    text = Path("/etc/group").read_text()
    for name, gid in (("gpio", 60997), ("input", 60998), ("dialout", 60999)):
        if f"\n{name}:" not in "\n" + text:
            text += f"{name}:x:{gid}:\n"
    group.write_text(text)
    script = (f"mount --bind {rules_dir} /etc/udev/rules.d && mount --bind {group} /etc/group && "
              "exec udevadm test --action=add /sys/devices/gated-no-such-device")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    return out, [line for line in out.splitlines() if line.startswith("/etc/udev/rules.d/")]


@pytest.fixture
def udevadm():
    if not shutil.which("udevadm"):
        pytest.skip("no udevadm (apt-get install udev)")


def test_installed_udev_rules_parse_without_a_complaint(installed, udevadm, tmp_path):
    root, _, _ = installed
    out, complaints = _udev_complaints(root / "etc/udev/rules.d", tmp_path)
    assert "99-gated.rules" in out  # udev really read the file
    assert complaints == []


def test_udev_check_reports_a_broken_rule(udevadm, tmp_path):
    rules = tmp_path / "rules.d"
    rules.mkdir()
    (rules / "99-gated.rules").write_text('SUBSYSTEM=="tty", GROUPP="dialout"\n')
    _, complaints = _udev_complaints(rules, tmp_path)
    assert complaints and "99-gated.rules" in complaints[0]


# --- live, inside a throw-away namespace -----------------------------------------------------

LIVE = r"""
set -e
for d in etc opt usr var; do
  mkdir -p "$OV/$d/up" "$OV/$d/work"
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$OV/$d/up,workdir=$OV/$d/work" "/$d"
done
# The program files were just built by the scratch install: seed them, so this run is about
# users, groups, ownership and the real paths (the installer sees a current venv and keeps it).
cp -a "$SCRATCH/opt/gated" /opt/gated
"$CHECKOUT/scripts/install" --no-apt > "$OUT/install1.txt" 2>&1
"$CHECKOUT/scripts/install" --no-apt > "$OUT/install2.txt" 2>&1
id gated > "$OUT/id.txt"
stat -c '%n %U:%G %a' /etc/gated /etc/gated/gated.toml /var/lib/gated /etc/systemd/system/gated.service \
  /etc/udev/rules.d/99-gated.rules /usr/lib/systemd/catalog/gated.catalog > "$OUT/stat.txt"
getent passwd gated > "$OUT/passwd.txt"
"$CHECKOUT/scripts/uninstall" > "$OUT/uninstall.txt" 2>&1
ls -d /var/lib/gated /etc/gated > "$OUT/kept.txt"
"$CHECKOUT/scripts/uninstall" --purge > "$OUT/purge.txt" 2>&1
getent passwd gated > "$OUT/after-purge.txt" || true
"""


def test_live_install_creates_user_groups_and_ownership_then_uninstalls(installed, checkout, tmp_path):
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for a private mount namespace")
    if os.path.exists("/opt/gated") or _user_exists("gated"):
        pytest.skip("gated is installed on this machine for real; not testing over it")
    root, _, _ = installed
    overlays, out = tmp_path / "ov", tmp_path / "out"
    overlays.mkdir()
    out.mkdir()
    env = dict(os.environ, OV=str(overlays), OUT=str(out), SCRATCH=str(root), CHECKOUT=str(checkout))
    if os.path.isdir("/run/systemd/system"):
        pytest.skip("systemd runs this machine: the installer would reload its systemd and udev")
    for d in ("lower", "upper", "work", "merged"):
        (tmp_path / "probe" / d).mkdir(parents=True)
    p = tmp_path / "probe"
    probe = subprocess.run(["unshare", "--mount", "mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={p}/lower,upperdir={p}/upper,workdir={p}/work", f"{p}/merged"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("overlayfs not available here")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", LIVE], env=env,
                       capture_output=True, text=True, timeout=300)
    logs = {p.name: p.read_text() for p in out.glob("*.txt")}
    assert r.returncode == 0, r.stderr + "\n".join(f"== {k}\n{v}" for k, v in logs.items())

    assert "user gated exists" not in logs["install1.txt"]  # it was created, not found
    ids = logs["id.txt"]
    assert all(f"({g})" in ids for g in ("gated", "gpio", "input", "dialout")), ids
    assert "/var/lib/gated:/usr/sbin/nologin" in logs["passwd.txt"]
    assert logs["stat.txt"].splitlines() == [
        "/etc/gated root:gated 750", "/etc/gated/gated.toml root:gated 640", "/var/lib/gated gated:gated 750",
        "/etc/systemd/system/gated.service root:root 644", "/etc/udev/rules.d/99-gated.rules root:root 644",
        "/usr/lib/systemd/catalog/gated.catalog root:root 644"]
    second = logs["install2.txt"]
    assert "user gated exists" in second and "group gpio exists" in second
    assert [line for line in second.splitlines() if line.startswith("[install] installed")] == []
    assert sorted(logs["kept.txt"].split()) == ["/etc/gated", "/var/lib/gated"]
    assert logs["after-purge.txt"] == ""
    # And the machine itself never saw any of it.
    assert not _user_exists("gated") and not os.path.exists("/opt/gated")


@pytest.mark.slow
def test_full_install_with_dependencies_runs_gated_check_from_the_venv(checkout, tmp_path):
    root = tmp_path / "root"
    r = run(checkout, "install", "--destdir", str(root), deps=True)
    assert r.returncode == 0, r.stdout + r.stderr
    check = subprocess.run([str(root / "opt/gated/venv/bin/gated"), "check", "--config",
                            str(root / "etc/gated/gated.toml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
