"""Device context read from /proc, /sys and os-release; what the system does not say is left out."""

from __future__ import annotations

from pathlib import Path

import pytest

from gated import __version__, device

ROUTE_HEAD = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def fake_system(root: Path, iface: str, *, kind: int = 1, wireless: bool = False, physical: bool = True,
                devtype: str = "", route: bool = True) -> dict[str, Path]:
    net = root / "sys" / iface
    net.mkdir(parents=True)
    (net / "type").write_text(f"{kind}\n")
    (net / "address").write_text("dc:a6:32:01:02:03\n")
    (net / "uevent").write_text(f"INTERFACE={iface}\n" + (f"DEVTYPE={devtype}\n" if devtype else ""))
    if wireless:
        (net / "wireless").mkdir()
    if physical:
        (net / "device").mkdir()
    proc = root / "proc"
    proc.mkdir()
    lines = [f"{iface}\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"]  # the LAN route
    if route:  # default route via 127.0.0.1, so the local-address probe stays on this machine
        lines.insert(0, f"{iface}\t00000000\t0100007F\t0003\t0\t0\t600\t00000000\t0\t0\t0\n")
    (proc / "route").write_text(ROUTE_HEAD + "".join(lines))
    (proc / "wireless").write_text(
        "Inter-| sta-|   Quality        |   Discarded packets               | Missed | WE\n"
        " face | tus | link level noise |  nwid  crypt   frag  retry   misc | beacon | 22\n"
        f"{iface}: 0000   54.  -56.  -256        0      0      0      0     12        0\n")
    os_release = root / "os-release"
    os_release.write_text('PRETTY_NAME="Raspbian GNU/Linux 12 (bookworm)"\nNAME="Raspbian GNU/Linux"\n')
    return {"sys_net": root / "sys", "proc_net": proc, "os_release": os_release}


def test_wifi_gate_reports_wifi_its_address_mac_and_signal(tmp_path):
    info = device.read(**fake_system(tmp_path, "wlan0", wireless=True))
    assert (info.network_type, info.interface, info.network_signal) == ("Wifi", "wlan0", "-56 dBm")
    assert info.local_ip == "127.0.0.1" and info.mac_address == "dc:a6:32:01:02:03"
    assert info.firmware_version == "Raspbian GNU/Linux 12 (bookworm)"
    assert info.software_version == f"gated {__version__}"


@pytest.mark.parametrize("iface,kw,expected", [
    ("eth0", {}, "Wired"),
    ("wwan0", {"kind": 519, "physical": False}, "Mobile"),
    ("usb0", {"devtype": "wwan"}, "Mobile"),
    ("veth1", {"physical": False}, None),  # a container's virtual link says nothing of the medium
    ("br0", {"devtype": "bridge", "physical": False}, None),
    ("ppp0", {"kind": 512, "physical": False}, None),  # PPP: a cellular modem as often as DSL
])
def test_network_type_comes_from_the_kernel_and_is_left_out_when_it_cannot_tell(tmp_path, iface, kw, expected):
    info = device.read(**fake_system(tmp_path, iface, **kw))
    assert info.network_type == expected and info.network_signal is None


def test_without_a_default_route_no_network_facts_are_given(tmp_path):
    info = device.read(**fake_system(tmp_path, "eth0", route=False))
    assert (info.interface, info.network_type, info.local_ip, info.mac_address) == (None, None, None, None)
    assert info.firmware_version  # the OS is still known


def test_os_release_without_pretty_name_falls_back_to_name_and_version(tmp_path):
    path = tmp_path / "os-release"
    path.write_text("NAME=Debian\nVERSION_ID='12'\n")
    assert device.os_version(path) == "Debian 12"
    assert device.os_version(tmp_path / "absent") is None


def test_lowest_metric_default_route_wins(tmp_path):
    route = tmp_path / "route"
    route.write_text(ROUTE_HEAD + "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
                                  "eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n")
    assert device.default_route(route) == ("eth0", "192.168.0.1")
