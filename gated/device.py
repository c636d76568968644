"""System facts that ticketing APIs ask for as device context: network, address, versions; never invented.

Everything is read from the running system (/proc, /sys, /etc/os-release) and anything that cannot
be read is left out (None), because a made-up network type or address misleads whoever reads the
API's logs more than a missing one. Reading takes a few file reads and one UDP `connect` (which
sends no packet), so callers refresh it off the scan path and reuse the result.
"""

from __future__ import annotations

import platform
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from gated import __version__

WIFI, WIRED, MOBILE = "Wifi", "Wired", "Mobile"

_ARPHRD_ETHER, _ARPHRD_RAWIP, _ARPHRD_NONE = 1, 519, 0xFFFE


@dataclass(frozen=True)
class DeviceInfo:
    """What is known of this device; None where the system does not say."""

    software_version: str
    firmware_version: str | None = None  # the OS, e.g. "Debian GNU/Linux 12 (bookworm)"
    interface: str | None = None  # the interface of the default route
    network_type: str | None = None  # "Wifi" | "Wired" | "Mobile"
    local_ip: str | None = None
    mac_address: str | None = None
    network_signal: str | None = None  # Wi-Fi signal level, e.g. "-52 dBm"


def file_text(path: str | Path) -> str:
    """A small text file of the system (/sys, /proc, /etc), stripped of whitespace and the NUL that
    device-tree strings end with; "" when it cannot be read. Bytes that are not UTF-8 are replaced."""
    try:
        return Path(path).read_bytes().decode("utf-8", "replace").strip("\x00 \t\r\n")
    except OSError:
        return ""


def hardware() -> tuple[str, str]:
    """(maker, model) of this machine: the device tree's model on a Pi or another board, else DMI."""
    model = file_text("/sys/firmware/devicetree/base/model") or file_text("/proc/device-tree/model")
    if model:
        return ("Raspberry Pi" if model.startswith("Raspberry Pi") else model.split()[0]), model
    vendor, product = file_text("/sys/class/dmi/id/sys_vendor"), file_text("/sys/class/dmi/id/product_name")
    return vendor or "unknown", product or platform.machine() or "unknown"


def machine_serial() -> str:
    """The Pi's own serial number (as the Pi Foundation's tools read it), else the machine id, else the host name."""
    for path in ("/sys/firmware/devicetree/base/serial-number", "/proc/device-tree/serial-number"):
        if value := file_text(path):
            return value
    for line in file_text("/proc/cpuinfo").splitlines():
        if line.startswith("Serial") and ":" in line:
            return line.split(":", 1)[1].strip()
    return file_text("/etc/machine-id")[:16] or socket.gethostname()


def software_version() -> str:
    return f"gated {__version__}"


def os_version(path: str | Path = "/etc/os-release") -> str | None:
    """PRETTY_NAME from os-release (else NAME VERSION_ID), or None."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip().strip("\"'")
    if fields.get("PRETTY_NAME"):
        return fields["PRETTY_NAME"]
    name = " ".join(v for v in (fields.get("NAME"), fields.get("VERSION_ID")) if v)
    return name or None


def default_route(path: str | Path = "/proc/net/route") -> tuple[str, str | None] | None:
    """(interface, gateway address) of the IPv4 default route with the lowest metric, or None."""
    try:
        lines = Path(path).read_text().splitlines()[1:]
    except OSError:
        return None
    best: tuple[int, str, str | None] | None = None
    for line in lines:
        cols = line.split()
        if len(cols) < 8 or cols[1] != "00000000" or cols[7] != "00000000":
            continue
        try:
            flags, metric, gw = int(cols[3], 16), int(cols[6]), int(cols[2], 16)
        except ValueError:
            continue
        if not flags & 0x1:  # RTF_UP
            continue
        gateway = socket.inet_ntoa(struct.pack("<I", gw)) if gw else None
        if best is None or metric < best[0]:
            best = (metric, cols[0], gateway)
    return (best[1], best[2]) if best else None


def network_type(interface: str, sys_net: str | Path = "/sys/class/net") -> str | None:
    """Wifi, Mobile or Wired from what the kernel says of the interface; None when it cannot tell.

    A virtual interface (bridge, veth, VPN tunnel) says nothing about the medium, so it gives None.
    """
    base = Path(sys_net) / interface
    if (base / "wireless").exists() or (base / "phy80211").exists():
        return WIFI
    uevent = file_text(base / "uevent")
    devtype = next((line.split("=", 1)[1] for line in uevent.splitlines() if line.startswith("DEVTYPE=")), "")
    try:
        kind = int(file_text(base / "type"))
    except ValueError:
        kind = None
    # ppp0 is left out on purpose: it is a cellular modem as often as DSL (PPPoE).
    if devtype == "wwan" or (kind in (_ARPHRD_RAWIP, _ARPHRD_NONE) and interface.startswith(("wwan", "rmnet"))):
        return MOBILE
    if kind == _ARPHRD_ETHER and not devtype and (base / "device").exists():
        return WIRED
    return None


def wifi_signal(interface: str, path: str | Path = "/proc/net/wireless") -> str | None:
    """The signal level column of /proc/net/wireless for the interface, as "-52 dBm"."""
    try:
        lines = Path(path).read_text().splitlines()[2:]
    except OSError:
        return None
    for line in lines:
        name, sep, rest = line.partition(":")
        if sep and name.strip() == interface:
            cols = rest.split()
            if len(cols) >= 3:
                level = cols[2].rstrip(".")
                try:
                    return f"{int(float(level))} dBm"
                except ValueError:
                    return None
    return None


def local_ip(gateway: str | None) -> str | None:
    """The source address the kernel picks towards the gateway; a UDP connect sends nothing."""
    if not gateway:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((gateway, 9))
            address = s.getsockname()[0]
    except OSError:
        return None
    return None if address in ("0.0.0.0", "") else address


def read(*, sys_net: str | Path = "/sys/class/net", proc_net: str | Path = "/proc/net",
         os_release: str | Path = "/etc/os-release") -> DeviceInfo:
    """Read every fact now; blocking file reads only, a millisecond or so."""
    route = default_route(Path(proc_net) / "route")
    info = DeviceInfo(software_version=software_version(), firmware_version=os_version(os_release))
    if route is None:
        return info
    interface, gateway = route
    kind = network_type(interface, sys_net)
    mac = file_text(Path(sys_net) / interface / "address") or None
    if mac == "00:00:00:00:00:00":
        mac = None
    return DeviceInfo(
        software_version=info.software_version,
        firmware_version=info.firmware_version,
        interface=interface,
        network_type=kind,
        local_ip=local_ip(gateway),
        mac_address=mac,
        network_signal=wifi_signal(interface, Path(proc_net) / "wireless") if kind == WIFI else None,
    )

