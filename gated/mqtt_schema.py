"""The [mqtt] section: its keys and the rules across them.

It lives apart from gated.mqtt so that gated.config can check the section without importing the lane
link, which itself needs the config, the pipeline and the store (an import cycle otherwise).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from gated.schema import Key, Section, fmt

SCHEMA = {
    "url": Key("str", help='the broker, e.g. "mqtt://broker.local:1883" or "mqtts://broker.example.com:8883"'),
    "username": Key("str", default="", help="the lane's broker account (one per lane, for the broker's ACL)"),
    "password_file": Key("secret", default="", help="file holding the broker password (chmod 600)"),
    "ca_file": Key("path", default="", help="CA bundle (PEM) for an mqtts:// broker; default: the system's"),
    "topic_prefix": Key("str", default="", help='default "gated/<backend type>"; one prefix per venue'),
    "hmac_key_file": Key("secret", help="the venue's shared key file (the same on every lane, chmod 600)"),
    "share_admissions": Key("bool", default=True, help="publish admissions and record the other lanes'"),
    "status": Key("bool", default=True, help="publish retained lane status and an offline last will"),
    "commands": Key("bool", default=False, help="obey signed mode commands (free, locked, normal)"),
    "homeassistant_discovery": Key("bool", default=False, help="announce the lane's sensors to Home Assistant"),
    "homeassistant_prefix": Key("str", default="homeassistant", help="Home Assistant's discovery prefix"),
    "session_expiry_seconds": Key("float", default=7 * 86400.0, above=0, maximum=0xFFFFFFFF,
                                  help="how long the broker keeps queuing for a lane that is away"),
    "keepalive_seconds": Key("int", default=30, minimum=5, maximum=3600,
                             help="a lane silent for 1.5 times this is announced offline"),
    "queue_size": Key("int", default=10000, minimum=1, maximum=1_000_000,
                      help="admissions kept in memory while the broker is away; the oldest are dropped"),
}


def parse_url(url: str) -> tuple[bool, str, int]:
    """`mqtt://host:port` or `mqtts://host:port` -> (tls, host, port); ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError('must start with "mqtt://" or "mqtts://", e.g. "mqtt://broker.local:1883"')
    if parts.username or parts.password:
        raise ValueError("must not hold credentials; use username and password_file")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError('must be only the scheme, host and port, e.g. "mqtt://broker.local:1883"')
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError("names no host")
    tls = parts.scheme == "mqtts"
    return tls, parts.hostname, port or (8883 if tls else 1883)


def check(section: Section) -> list[str]:
    """Rules across the [mqtt] keys, in the config's words."""
    problems = []
    url = section.get("url")
    if url is not None:
        try:
            tls, _, _ = parse_url(url)
        except ValueError as e:
            problems.append(f"[mqtt] url = {fmt(url)}: {e}.")
        else:
            if section.get("ca_file") and not tls:
                problems.append(f'[mqtt] ca_file: only used with "mqtts://"; url is {fmt(url)}.')
    prefix = section.get("topic_prefix", "")
    if prefix and (re.search(r"[+#\x00]", prefix) or prefix.startswith("/") or prefix.endswith("/")
                   or "//" in prefix):
        problems.append(f"[mqtt] topic_prefix = {fmt(prefix)}: must be topic levels separated by \"/\", "
                        'without "+", "#" or a leading or trailing "/", e.g. "gated/stadium-north".')
    if section.get("password_file") and not section.get("username"):
        problems.append("[mqtt] password_file: set username too; the broker checks the pair.")
    return problems
