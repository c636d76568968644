"""Share each admission with the venue's other lanes over MQTT, record theirs, and publish lane status.

Flow: the Gate records a scan -> `on_decided` -> `LaneLink.admitted()` appends to a bounded in-memory
queue (no I/O, no crypto on the scan path) -> the link's worker thread signs and publishes it with QoS 1.
Admissions from other lanes arrive on paho's network thread, are verified, and the worker writes them
to the admissions table through the scan path's own store, where the Decider's anti-passback
(`Store.inside`) counts them. A dead broker only fills the queue; no decision ever waits for it.

Catch-up after a disconnect uses a persistent MQTT v5 session (clean_start false, a session expiry):
the broker keeps this lane's subscription and queues what it missed, and the lane acknowledges each
message only once it is committed to SQLite. docs/mqtt.md explains why not retained summaries.

Long because the link's three threads (event loop, paho's network thread, the worker) share one
queue and one session, and their hand-offs are easiest to check in one file; the [mqtt] keys and
their rules are apart, in gated/config.py.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gated import __version__
from gated.config import parse_mqtt_url
from gated.errors import ConfigError, GatedError, StoreError
from gated.logs import clean
from gated.occupancy import HEARTBEAT_SECONDS, REMEMBER_KEY, Counts, Occupancy, valid_counts
from gated.schema import Section
from gated.secrets import read_secret
from gated.store import Store

if TYPE_CHECKING:
    from gated.config import Config
    from gated.model import Decision, Scan, ScanMode
    from gated.pipeline import Gate
    from gated.store import StoreThread

log = logging.getLogger(__name__)

VERSION = 1
MODES = ("normal", "free", "locked")
WINDOW = 100  # admissions handed to paho and not yet acknowledged by the broker
BATCH = 200  # remote admissions committed in one transaction: few fsyncs, short write locks
STATUS_INTERVAL = 1.0  # retained status at most once a second; the latest value wins
COMMAND_WINDOW = 60.0  # a command older (or further ahead) than this is refused: no late replays
COMMANDS_KEY = "mqtt:commands"  # the store's kv entry of the commands obeyed lately (CommandLedger)
# Messages are a few hundred bytes: anything bigger is refused before it is parsed. (Asking the broker
# for a Maximum Packet Size instead let 20 oversize messages stall the lane's subscription on
# Mosquitto 2.0.11; the broker's own max_packet_size, docs/mqtt.md, is the place for that bound.)
MAX_PAYLOAD = 4096
MAX_WALL_MS = 2**53  # times beyond this are not real (year 285,000) and lose precision as floats
# Reconnect quickly after a broker restart, but back off to 15 s so a dead broker is not hammered.
RECONNECT_MIN, RECONNECT_MAX = 0.5, 15
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NONCE = re.compile(r"[!-~]{1,64}")  # printable ASCII: scan nonces are UUIDs


class BadMessage(GatedError, ValueError):
    """An MQTT message that is not a valid, signed gated message; the text says what is wrong."""


def shown(value: Any, limit: int = 60) -> str:
    """A value from a message or topic as a log line may quote it: the log's own escaping (logs.clean), short."""
    return clean(value if isinstance(value, str) else repr(value), limit)


# --- topics (the [mqtt] keys and their rules: gated.config) ----------------------------------

def topic_level(text: str) -> str:
    """A name usable as one MQTT topic level (no separator or wildcard characters)."""
    return re.sub(r"[/+#\x00]", "_", text) or "_"


class Topics:
    """Where a lane publishes and what it subscribes to, under the venue's prefix."""

    def __init__(self, prefix: str, lane: str):
        self.admission_base = f"{prefix}/admission/"
        self.admission = self.admission_base + lane  # this lane's admissions
        self.admissions = self.admission_base + "+"  # every lane's
        self.status = f"{prefix}/status/{lane}"  # retained JSON
        self.availability = f"{prefix}/availability/{lane}"  # retained "online" / "offline" (last will)
        self.command = f"{prefix}/command/{lane}"  # this lane only
        self.command_all = f"{prefix}/command"  # every lane of the venue
        self.occupancy_base = f"{prefix}/occupancy/"
        self.occupancy = self.occupancy_base + lane  # retained: this lane's counts (gated.occupancy)
        self.occupancies = self.occupancy_base + "+"


# --- messages --------------------------------------------------------------------------------

def canonical(body: dict[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, ASCII; values are texts and integers only."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


class VenueKey:
    """The venue's shared secret, split in two so a ticket hash can never double as a signature."""

    def __init__(self, secret: str):
        raw = secret.encode()
        self._identity = hmac.new(raw, b"gated/mqtt/v1/ticket", hashlib.sha256).digest()
        self._signing = hmac.new(raw, b"gated/mqtt/v1/message", hashlib.sha256).digest()

    def ticket(self, ticket_key: str) -> str:
        """The ticket identity as lanes share it: HMAC-SHA256, never the token or the identity itself."""
        return hmac.new(self._identity, ticket_key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def sign(self, body: dict[str, Any]) -> bytes:
        sig = hmac.new(self._signing, canonical(body), hashlib.sha256).hexdigest()
        return canonical({**body, "sig": sig})

    def open(self, payload: bytes) -> dict[str, Any]:
        """The body of a signed message; BadMessage when it is too big, not JSON, unsigned or signed by
        another key. Never anything else, whatever the payload: it comes from anyone on the broker."""
        if len(payload) > MAX_PAYLOAD:
            raise BadMessage(f"{len(payload)} bytes, more than {MAX_PAYLOAD}")
        try:
            body = json.loads(payload)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise BadMessage("not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("sig"), str):
            raise BadMessage("not signed")
        sig = body.pop("sig")
        try:
            expected = hmac.new(self._signing, canonical(body), hashlib.sha256).hexdigest()
        except (ValueError, RecursionError):
            raise BadMessage("holds a value that cannot be signed") from None
        # As bytes: compare_digest refuses a str that is not ASCII with a TypeError.
        if not hmac.compare_digest(sig.encode("utf-8", "surrogatepass"), expected.encode()):
            raise BadMessage("bad signature (not signed with this venue's hmac key)")
        if body.get("v") != VERSION:
            raise BadMessage(f"unsupported message version {shown(body.get('v'))}")
        return body


def admission_body(key: VenueKey, *, lane: str, nonce: str, ticket_key: str, event: str, wall: float,
                   direction: str) -> dict[str, Any]:
    return {"v": VERSION, "type": "admission", "lane": lane, "nonce": nonce, "key": key.ticket(ticket_key),
            "event": event, "wall_ms": int(wall * 1000), "direction": direction}


def admission_row(body: dict[str, Any], sender: str) -> tuple[str, str, str, float, str]:
    """(nonce, key_hash, direction, wall, lane) for the admissions table, from a verified body.

    Every value is checked for type, size and range here, before it can reach SQLite: a lane holding
    the venue key may still be broken, and a lone surrogate or 2**64 would fail the whole batch.
    """
    nonce, key, direction, wall_ms, lane = (body.get(k) for k in ("nonce", "key", "direction", "wall_ms", "lane"))
    if body.get("type") != "admission":
        raise BadMessage(f"a {shown(body.get('type'))} message on an admission topic")
    if not isinstance(lane, str) or len(lane) > 128 or topic_level(lane) != sender:
        raise BadMessage("its lane does not match the topic it came on")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise BadMessage("no valid nonce")
    if not isinstance(key, str) or not _HEX64.fullmatch(key):
        raise BadMessage("no valid ticket hash")
    if direction not in ("entry", "exit"):
        raise BadMessage("no valid direction")
    if not _valid_wall_ms(wall_ms):
        raise BadMessage("no valid time")
    return nonce, key, direction, wall_ms / 1000, lane


def occupancy_body(*, lane: str, direction: str, counts: Counts, wall: float) -> dict[str, Any]:
    return {"v": VERSION, "type": "occupancy", "lane": lane, "direction": direction, "period": counts.period,
            "entries": counts.entries, "exits": counts.exits, "wall_ms": int(wall * 1000)}


def occupancy_row(body: dict[str, Any], sender: str, now: float) -> tuple[str, Counts, str]:
    """(lane, counts, direction) from a verified occupancy body; BadMessage for any value out of type or range.

    A period more than a day ahead of this lane's clock is refused: it would win every merge for that
    lane until the day came (Counts.join), freezing its counts.
    """
    lane, direction = body.get("lane"), body.get("direction")
    if body.get("type") != "occupancy":
        raise BadMessage(f"a {shown(body.get('type'))} message on an occupancy topic")
    if not isinstance(lane, str) or len(lane) > 128 or topic_level(lane) != sender:
        raise BadMessage("its lane does not match the topic it came on")
    if direction not in ("entry", "exit"):
        raise BadMessage("no valid direction")
    try:
        counts = valid_counts(body.get("period"), body.get("entries"), body.get("exits"))
    except ValueError as e:
        raise BadMessage(str(e)) from None
    if counts.period > now + 86400:
        raise BadMessage("a period that starts more than a day from now")
    return lane, counts, direction


def _valid_wall_ms(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_WALL_MS


def command_message(key: VenueKey, mode: str, lane: str = "*", now: float | None = None) -> bytes:
    """A signed mode command for one lane (by name) or every lane ("*")."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    now = time.time() if now is None else now
    return key.sign({"v": VERSION, "type": "command", "lane": lane, "mode": mode, "nonce": str(uuid.uuid4()),
                     "wall_ms": int(now * 1000)})


def command_mode(body: dict[str, Any], *, lane: str, to_all: bool, now: float) -> str:
    """The mode a verified command asks for, or BadMessage when it is not for this lane or not fresh."""
    if body.get("type") != "command":
        raise BadMessage(f"a {shown(body.get('type'))} message on a command topic")
    if body.get("lane") != ("*" if to_all else lane):
        raise BadMessage("addressed to another lane")
    if body.get("mode") not in MODES:
        raise BadMessage(f"unknown mode {shown(body.get('mode'))}")
    wall_ms = body.get("wall_ms")
    if not _valid_wall_ms(wall_ms) or abs(now - wall_ms / 1000) > COMMAND_WINDOW:
        raise BadMessage(f"not sent within the last {COMMAND_WINDOW:g} s (old, replayed, or a clock is wrong)")
    if not isinstance(body.get("nonce"), str) or not _NONCE.fullmatch(body["nonce"]):
        raise BadMessage("no valid nonce")
    return body["mode"]


class CommandLedger:
    """The signed commands obeyed lately, kept in the store (kv `mqtt:commands`) so a restart forgets none.

    A command is refused when its nonce was obeyed before, or when it was sent more than
    COMMAND_WINDOW before the newest command obeyed. Both rules go by the senders' timestamps, not
    this lane's clock: a nonce can be forgotten once that rule refuses its command anyway, and a
    lane clock that jumps back cannot make a captured command fresh again.

    Args:
        get, put: read and write one kv entry of the store; without them the ledger lives in memory.
    """

    def __init__(self, get: Callable[[str], str | None] | None = None,
                 put: Callable[[str, str], None] | None = None):
        memory: dict[str, str] = {}
        self._get = get or memory.get
        self._put = put or memory.__setitem__
        self._lock = threading.Lock()

    def obey(self, nonce: str, wall_ms: int, now: float) -> None:
        """Record a command as obeyed, before it is applied; BadMessage if it must not be (a replay)."""
        window_ms = int(COMMAND_WINDOW * 1000)
        with self._lock:
            newest, seen = self._load(now)
            if wall_ms < newest - window_ms:
                raise BadMessage(f"sent more than {COMMAND_WINDOW:g} s before a command already obeyed "
                                 "(a replay, or the sender's clock is wrong)")
            if nonce in seen:
                raise BadMessage("a replay of a command already obeyed")
            newest = max(newest, wall_ms)
            seen = {n: t for n, t in seen.items() if t >= newest - window_ms}
            seen[nonce] = wall_ms
            self._put(COMMANDS_KEY, json.dumps({"newest_ms": newest, "seen": seen}, sort_keys=True))

    def _load(self, now: float) -> tuple[int, dict[str, int]]:
        raw = self._get(COMMANDS_KEY)
        if raw is None:
            return 0, {}
        try:
            state = json.loads(raw)
            newest, seen = state["newest_ms"], state["seen"]
            # Bounded too: a damaged newest_ms of 10**30 would refuse every command for good.
            if _valid_wall_ms(newest) and isinstance(seen, dict) and all(map(_valid_wall_ms, seen.values())):
                return newest, seen
        except (ValueError, TypeError, KeyError):
            pass
        # Written only by obey(), so the store was damaged. Starting over from this lane's clock still
        # refuses every command sent more than COMMAND_WINDOW ago; refusing all would end commands for good.
        log.warning("the record of MQTT commands obeyed (%s in the store) is damaged; started anew",
                    COMMANDS_KEY, extra={"GATED_EVENT": "mqtt_bad_command"})
        return int(now * 1000), {}


class _Throttle:
    """One WARNING per interval for a repeating fault, counting the ones not shown."""

    def __init__(self, interval: float = 60.0):
        self.interval = interval
        self._last: float | None = None
        self._hidden = 0
        self._lock = threading.Lock()

    def warn(self, msg: str, *args: Any, event: str, exc_info: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < self.interval:
                self._hidden += 1
                return
            hidden, self._hidden, self._last = self._hidden, 0, now
        if hidden:
            msg += f" ({hidden} more like it since the last report)"
        log.warning(msg, *args, extra={"GATED_EVENT": event}, exc_info=exc_info)


def _no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    # Small messages, each answered: without TCP_NODELAY a publish right after an ack waits for the
    # peer's delayed ACK (40 ms on Linux).
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (a test double, a proxy): keep Nagle
        pass


def read_venue_key(path: str) -> VenueKey:
    where = "[mqtt] hmac_key_file"
    secret = read_secret(path, where)
    if len(secret) < 16:
        raise ConfigError(where, [f'{where} = "{path}": the key has {len(secret)} characters; use at least 16, '
                                  "e.g. the output of: openssl rand -hex 32"])
    return VenueKey(secret)


# --- the link --------------------------------------------------------------------------------

class LaneLink:
    """One lane's MQTT client: paho's network thread plus one worker thread; never on the scan path.

    Args:
        section: the checked [mqtt] table.
        lane, serial: the lane's name (topics, messages) and serial (with the name: the client id).
        backend_type: names the default topic prefix.
        record: writes remote admission rows; returns how many were new (called on the worker thread).
        on_mode: called (on paho's thread) with "free", "locked" or "normal" for a valid command.
        ledger: the commands obeyed, in the store (see attach); default: in memory only.
        clock: wall time, for a command's freshness.
        occupancy: this lane's people counts, shared on `<prefix>/occupancy/<lane>` (retained), and the
            other lanes' heard into it; remember(text) keeps the other lanes' counts in the store.
    """

    def __init__(self, section: Section, *, lane: str, serial: str, backend_type: str,
                 record: Callable[[list[tuple]], int], on_mode: Callable[[str], None] | None = None,
                 ledger: CommandLedger | None = None, clock: Callable[[], float] = time.time,
                 occupancy: Occupancy | None = None, remember: Callable[[str], None] | None = None):
        self.settings = section
        self.key = read_venue_key(section.hmac_key_file)
        self.password = read_secret(section.password_file, "[mqtt] password_file") if section.password_file else None
        self.tls, self.host, self.port = parse_mqtt_url(section.url)
        self.lane = lane
        self.level = topic_level(lane)
        self.prefix = section.topic_prefix or f"gated/{topic_level(backend_type)}"
        self.topics = Topics(self.prefix, self.level)
        self.client_id = f"gated-{self.level}-{topic_level(serial)}"
        self.queue_size = section.queue_size
        self._record = record
        self._on_mode = on_mode
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._stop_deadline = 0.0
        self._out: deque[tuple[str, str, str, float, str]] = deque()
        self._inflight: list[Any] = []  # paho MQTTMessageInfo of admissions the broker has not acked
        self._inbox: deque[tuple[int, int, int, tuple]] = deque()  # (connection, mid, qos, row)
        self._generation = 0  # counts connections: an ack belongs to the connection that got the message
        self.connected = False
        self.ready = threading.Event()  # connected, and the broker confirmed the subscriptions
        self._state = "starting"
        self._down_since = 0.0
        self.sent = 0  # admissions the broker took
        self.received = 0  # other lanes' admissions recorded here
        self.dropped = 0  # admissions dropped unshared because the queue was full
        self._dropped_reported = 0
        self._drop_warned = 0.0
        self.changed = threading.Condition()  # notified when `received` grows
        self._status: dict[str, Any] = {}
        self._status_dirty = False
        self._status_sent = 0.0
        self._ledger = ledger or CommandLedger()
        self._clock = clock
        # One WARNING a minute each, so a flood on one topic cannot hide what happens on the other.
        self._bad = _Throttle()
        self._bad_commands = _Throttle()
        self._client: Any = None
        self._worker: threading.Thread | None = None
        self.occupancy = occupancy
        self._remember = remember
        self._occ_dirty = True
        self._occ_sent = 0.0
        self._occ_remembered = ("", 0.0)  # (text, monotonic time) last written to the store
        self._bad_occupancy = _Throttle()
        if occupancy is not None:
            occupancy.on_change.append(self._occupancy_changed)

    def describe(self) -> str:
        what = [w for w, on in (("admissions", self.settings.share_admissions), ("status", self.settings.status),
                                ("commands", self.settings.commands), ("occupancy", self.occupancy is not None))
                if on]
        return (f"mqtt{'s' if self.tls else ''}://{self.host}:{self.port} as {self.client_id}, "
                f"topics {self.prefix}/…, sharing {', '.join(what) or 'nothing'}")

    # --- called from the event loop ------------------------------------------------------

    def admitted(self, scan: Scan, decision: Decision, scan_mode: ScanMode) -> None:
        """Queue an admission for the other lanes; returns at once, whatever the broker is doing."""
        if not decision.admitted or decision.ticket_key is None:
            return
        item = (scan.nonce, decision.ticket_key, decision.event_id or "", scan.wall, str(scan_mode))
        with self._lock:
            if len(self._out) >= self.queue_size:
                self._out.popleft()  # the oldest goes: recent admissions matter most at a gate
                self.dropped += 1
            self._out.append(item)
        self._wake.set()

    @property
    def queued(self) -> int:
        """Admissions waiting for the broker (it is away, or they are being sent)."""
        return len(self._out)

    def set_status(self, **fields: Any) -> None:
        """Update the retained status; published by the worker at most once a second."""
        with self._lock:
            self._status.update(fields)
            self._status_dirty = True

    def wait_received(self, count: int, timeout: float) -> bool:
        """Block until `count` remote admissions have been recorded here (status views, tests)."""
        with self.changed:
            return self.changed.wait_for(lambda: self.received >= count, timeout)

    # --- start and stop ------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; returns at once, even when the broker is unreachable."""
        # paho costs ~100 ms to import: only lanes that use MQTT pay it.
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        s = self.settings
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5,
                             manual_ack=True)  # ack once committed: a crash before the commit gets it again
        if s.username:
            client.username_pw_set(s.username, self.password)
        if self.tls:
            client.tls_set(ca_certs=s.ca_file or None)  # certificate and host name verified
        if s.status:
            client.will_set(self.topics.availability, "offline", qos=1, retain=True)
        client.reconnect_delay_set(RECONNECT_MIN, RECONNECT_MAX)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = lambda *_: self._wake.set()  # a broker ack frees room in the window
        client.on_socket_open = _no_delay
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = int(s.session_expiry_seconds)
        client.connect_async(self.host, self.port, keepalive=s.keepalive_seconds, clean_start=False,
                             properties=props)
        self._client = client
        client.loop_start()
        self._worker = threading.Thread(target=self._run, name="gated-mqtt", daemon=True)
        self._worker.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Share what is queued (up to `timeout`), announce offline, disconnect. Blocks: run it off the loop."""
        if self._client is None:
            return
        self._stop_deadline = time.monotonic() + timeout
        self._stopping.set()
        self._wake.set()
        if self._worker is not None:
            self._worker.join(timeout + 1)
        if self.occupancy is not None and self._remember is not None:  # what the next start recalls
            try:
                self._remember(self.occupancy.remembered())
            except StoreError as e:
                log.warning("other lanes' counts not kept in the store: %s", e, extra={"GATED_EVENT": "store_error"})
        acked = sum(i.is_published() for i in self._inflight)
        self.sent += acked
        left = len(self._out) + len(self._inflight) - acked
        self._inflight = []
        if left:
            log.warning("%d admissions not shared with the other lanes: the MQTT broker did not take them "
                        "before stop", left, extra={"GATED_EVENT": "mqtt_unshared"})
        if self.connected and self.settings.status:
            infos = [self._client.publish(self.topics.status, self._status_payload("offline"), qos=1, retain=True),
                     self._client.publish(self.topics.availability, "offline", qos=1, retain=True)]
            for info in infos:
                try:
                    info.wait_for_publish(1.0)
                except (RuntimeError, ValueError):  # the connection went meanwhile: the last will says it
                    break
        self._client.disconnect()
        self._client.loop_stop()
        self._client = None
        log.info("MQTT link stopped (%d admissions shared, %d received)", self.sent, self.received,
                 extra={"GATED_EVENT": "mqtt_stopped"})

    # --- paho's network thread -----------------------------------------------------------

    def _on_connect(self, client: Any, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            self._went_down(f"the broker refused the connection: {reason}")
            return
        from paho.mqtt.subscribeoptions import SubscribeOptions

        subs = []
        if self.settings.share_admissions:
            # noLocal: the broker does not echo our own admissions back.
            subs.append((self.topics.admissions, SubscribeOptions(qos=1, noLocal=True)))
        if self.settings.commands:
            subs += [(self.topics.command, SubscribeOptions(qos=1)), (self.topics.command_all, SubscribeOptions(qos=1))]
        if self.occupancy is not None:  # the retained counts of every lane come first, then each change
            subs.append((self.topics.occupancies, SubscribeOptions(qos=1, noLocal=True)))
        if subs:
            client.subscribe(subs)
        else:
            self.ready.set()
        if self.settings.status:
            client.publish(self.topics.availability, "online", qos=1, retain=True)
            if self.settings.homeassistant_discovery:
                self._discovery(client)
        with self._lock:
            self.connected = True
            self._generation += 1
            self._status_dirty = self._occ_dirty = True
            queued = len(self._out)
        if self.occupancy is not None:
            self.occupancy.link(True)
        before, self._state = self._state, "up"
        if before == "down":
            log.info("MQTT broker %s:%d reachable again after %.0f s; sharing %d queued admissions",
                     self.host, self.port, time.monotonic() - self._down_since, queued,
                     extra={"GATED_EVENT": "mqtt_up"})
        else:
            log.info("MQTT connected to %s:%d as %s", self.host, self.port, self.client_id,
                     extra={"GATED_EVENT": "mqtt_up"})
        if not flags.session_present and self.settings.share_admissions:
            # A fresh session knows nothing of what the other lanes admitted while we had none.
            level = logging.WARNING if before == "down" else logging.INFO
            log.log(level, "new MQTT session for %s: admissions shared before it are not known here",
                    self.client_id, extra={"GATED_EVENT": "mqtt_session"})
        self._wake.set()

    def _on_subscribe(self, _client: Any, _userdata: Any, _mid: int, reasons: list, _props: Any) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:  # e.g. "Not authorized": the broker's ACL does not give this lane its topics
            log.warning("MQTT broker refused this lane's subscriptions (%s); check its ACL", ", ".join(refused),
                        extra={"GATED_EVENT": "mqtt_refused"})
        self.ready.set()

    def _on_connect_fail(self, _client: Any, _userdata: Any) -> None:
        self._went_down("cannot connect")

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        with self._lock:
            self.connected = False
        if self.occupancy is not None:
            self.occupancy.link(False)
        self.ready.clear()
        if not self._stopping.is_set():
            self._went_down("connection lost" if str(reason) == "Unspecified error" else str(reason))

    def _went_down(self, why: str) -> None:
        with self._lock:
            self.connected = False
        if self.occupancy is not None:
            self.occupancy.link(False)
        self.ready.clear()
        if self._state != "down":
            self._state, self._down_since = "down", time.monotonic()
            log.warning("MQTT broker %s:%d unreachable (%s); admissions are shared when it is back (up to %d "
                        "kept here)", self.host, self.port, why, self.queue_size, extra={"GATED_EVENT": "mqtt_down"})

    def _on_message(self, client: Any, _userdata: Any, msg: Any) -> None:
        # Anyone on the broker can send anything: whatever it is, it costs at most one WARNING a
        # minute (a bad message says why, without a traceback) and it is acknowledged.
        try:
            topic = msg.topic
            if topic.startswith(self.topics.admission_base):
                if self._take_admission(msg, topic):
                    return  # acknowledged by the worker once recorded
            elif topic in (self.topics.command, self.topics.command_all):
                self._command(msg, topic)
            elif topic.startswith(self.topics.occupancy_base) and self.occupancy is not None:
                self._take_occupancy(msg, topic)
        except Exception as e:  # a fault of ours, not the message's: the shown line keeps the traceback
            self._bad.warn("MQTT message not handled: %s", shown(repr(e), 200), event="mqtt_bad_message",
                           exc_info=True)
        client.ack(msg.mid, msg.qos)

    def _take_admission(self, msg: Any, topic: str) -> bool:
        try:
            row = admission_row(self.key.open(msg.payload), topic[len(self.topics.admission_base):])
        except BadMessage as e:
            self._bad.warn("ignored an MQTT message on %s: %s", shown(topic, 200), e, event="mqtt_bad_message")
            return False
        with self._lock:
            self._inbox.append((self._generation, msg.mid, msg.qos, row))
        self._wake.set()
        return True

    def _take_occupancy(self, msg: Any, topic: str) -> None:
        try:
            lane, counts, direction = occupancy_row(self.key.open(msg.payload),
                                                    topic[len(self.topics.occupancy_base):], self._clock())
        except BadMessage as e:
            self._bad_occupancy.warn("ignored an MQTT message on %s: %s", shown(topic, 200), e,
                                     event="mqtt_bad_message")
            return
        # A retained copy is what the lane said last, perhaps long ago: it counts, but does not show
        # that the lane is still there (Occupancy.degraded).
        self.occupancy.heard(lane, counts, direction, live=not msg.retain)

    def _occupancy_changed(self) -> None:
        self._occ_dirty = True
        self._status_dirty = True
        self._wake.set()

    def _command(self, msg: Any, topic: str) -> None:
        now = self._clock()
        try:
            if msg.retain:
                raise BadMessage("retained; commands are obeyed only when sent")
            body = self.key.open(msg.payload)
            mode = command_mode(body, lane=self.lane, to_all=topic == self.topics.command_all, now=now)
            try:
                self._ledger.obey(body["nonce"], body["wall_ms"], now)
            except StoreError as e:  # not recorded as obeyed: obeyed, it could be replayed
                raise BadMessage(f"cannot be recorded as obeyed ({e})") from None
        except BadMessage as e:
            self._bad_commands.warn("refused an MQTT command on %s: %s", shown(topic, 200), e,
                                    event="mqtt_bad_command")
            return
        log.info("%s mode %s requested by a signed MQTT command", self.lane, mode,
                 extra={"GATED_EVENT": "mqtt_command", "GATED_LANE": self.lane})
        if self._on_mode is not None:
            self._on_mode(mode)

    def _discovery(self, client: Any) -> None:
        """Home Assistant MQTT discovery: one device per lane, its sensors read the retained status."""
        # The node id is the lane's name, so a broker ACL can give each lane its own discovery topics
        # (`pattern write homeassistant/sensor/%u/+/config`); the ids HA keys on include the serial.
        node = re.sub(r"[^A-Za-z0-9_-]", "_", self.level)
        device_id = re.sub(r"[^A-Za-z0-9_-]", "_", self.client_id)
        device = {"identifiers": [device_id], "name": f"gated {self.lane}", "manufacturer": "gated",
                  "model": "ticket gate lane", "sw_version": __version__}
        sensors = [("api", "Ticket API", {}), ("mode", "Mode", {}), ("last_scan", "Last scan", {}),
                   ("queue", "Upload queue", {"unit_of_measurement": "scans", "state_class": "measurement"})]
        if self.occupancy is not None:  # the venue's total as this lane knows it, and the lane's own count
            people = {"unit_of_measurement": "people", "state_class": "measurement"}
            own = "entries" if self.occupancy.scan_mode == "entry" else "exits"
            sensors += [("inside", "People inside (venue)", people),
                        (own, f"{own.capitalize()} since {self.occupancy.reset_at}", people)]
        prefix = self.settings.homeassistant_prefix
        for field, name, extra in sensors:
            config = {"name": name, "unique_id": f"{device_id}_{field}", "state_topic": self.topics.status,
                      "value_template": f"{{{{ value_json.{field} }}}}", "availability_topic": self.topics.availability,
                      "device": device, **extra}
            client.publish(f"{prefix}/sensor/{node}/{field}/config", json.dumps(config), qos=1, retain=True)
        # The doors-open check (gated.ready), refreshed by the daemon every minute in the same status.
        ready = {"name": "Ready", "unique_id": f"{device_id}_ready", "state_topic": self.topics.status,
                 "value_template": "{{ value_json.ready | default('OFF') }}",
                 "availability_topic": self.topics.availability, "device": device}
        client.publish(f"{prefix}/binary_sensor/{node}/ready/config", json.dumps(ready), qos=1, retain=True)

    # --- the worker thread ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(0.5)  # also the status and drop-report tick
            self._wake.clear()
            try:
                self._record_inbox()
                self._publish_queue()
                self._publish_occupancy()
                self._publish_status()
                self._report_drops()
            except Exception:
                log.exception("MQTT link step failed; trying again")
                time.sleep(0.5)
            if self._stopping.is_set() and (not self.connected or time.monotonic() > self._stop_deadline
                                            or (not self._out and all(i.is_published() for i in self._inflight))):
                return

    def _record_inbox(self) -> None:
        while True:
            with self._lock:
                batch = [self._inbox.popleft() for _ in range(min(BATCH, len(self._inbox)))]
            if not batch:
                return
            try:
                added = self._record([row for *_, row in batch])
            except StoreError as e:
                with self._lock:
                    self._inbox.extendleft(reversed(batch))  # not acked: kept, tried again
                self._bad.warn("other lanes' admissions not recorded yet: %s", e, event="store_error")
                time.sleep(0.5)
                return
            with self.changed:
                self.received += added
                self.changed.notify_all()
            with self._lock:
                generation, client = self._generation, self._client
            for gen, mid, qos, _row in batch:
                if gen == generation and client is not None:
                    client.ack(mid, qos)

    def _publish_queue(self) -> None:
        if not self.connected:
            return
        still = [i for i in self._inflight if not i.is_published()]
        self.sent += len(self._inflight) - len(still)
        self._inflight = still
        while len(self._inflight) < WINDOW:
            with self._lock:
                if not self._out:
                    return
                nonce, ticket_key, event, wall, direction = self._out.popleft()
            body = admission_body(self.key, lane=self.lane, nonce=nonce, ticket_key=ticket_key, event=event,
                                  wall=wall, direction=direction)
            # Handed to paho, a message survives a disconnect: paho sends it again after reconnecting.
            self._inflight.append(self._client.publish(self.topics.admission, self.key.sign(body), qos=1))

    def _publish_occupancy(self) -> None:
        """This lane's counts, retained, on every change and every HEARTBEAT_SECONDS (the other lanes
        tell from the heartbeat that it is still heard); the other lanes' counts kept in the store."""
        occ = self.occupancy
        if occ is None:
            return
        now = time.monotonic()
        if self.connected and (self._occ_dirty or now - self._occ_sent >= HEARTBEAT_SECONDS):
            self._occ_dirty, self._occ_sent = False, now
            body = occupancy_body(lane=self.lane, direction=occ.scan_mode, counts=occ.own(), wall=time.time())
            self._client.publish(self.topics.occupancy, self.key.sign(body), qos=1, retain=True)
        text, written = self._occ_remembered
        if self._remember is not None and now - written >= 10:  # a restart with the broker away starts from these
            new = occ.remembered()
            if new != text:
                try:
                    self._remember(new)
                except StoreError as e:
                    self._bad.warn("other lanes' counts not kept in the store: %s", e, event="store_error")
            self._occ_remembered = (new, now)

    def _status_payload(self, state: str) -> bytes:
        with self._lock:
            fields = dict(self._status)
            queued = len(self._out)
        if self.occupancy is not None:
            own = self.occupancy.own()
            fields |= {"inside": self.occupancy.venue_total(), "capacity": self.occupancy.capacity,
                       "entries": own.entries, "exits": own.exits}
        body = {**fields, "v": VERSION, "type": "status", "lane": self.lane, "state": state, "version": __version__,
                "shared_queue": queued, "shared_in": self.received, "shared_dropped": self.dropped,
                "wall_ms": int(time.time() * 1000)}
        return self.key.sign(body)

    def _publish_status(self) -> None:
        if not (self.settings.status and self.connected):
            return
        now = time.monotonic()
        with self._lock:
            if not self._status_dirty or now - self._status_sent < STATUS_INTERVAL:
                return
            self._status_dirty = False
            self._status_sent = now
        self._client.publish(self.topics.status, self._status_payload("online"), qos=1, retain=True)

    def _report_drops(self) -> None:
        dropped = self.dropped
        if dropped > self._dropped_reported and time.monotonic() - self._drop_warned >= 60:
            log.warning("MQTT queue full (%d): dropped %d oldest admissions unshared (%d in all)", self.queue_size,
                        dropped - self._dropped_reported, dropped, extra={"GATED_EVENT": "mqtt_dropped"})
            self._dropped_reported, self._drop_warned = dropped, time.monotonic()


def attach(config: Config, store: StoreThread, gate: Gate, on_mode: Callable[[str], None] | None = None,
           occupancy: Occupancy | None = None) -> LaneLink | None:
    """Build and start the lane link for `config`, wired to the gate and the scan path's store; None without [mqtt].

    Raises ConfigError when a secret file is wrong. Remote admissions, and the commands obeyed, are
    written through the scan path's own store thread: SQLite then has one writer, anti-passback reads
    the admissions at once, and a restarted lane still knows which commands it obeyed.
    """
    if config.mqtt is None:
        return None
    ledger = CommandLedger(get=lambda key: store.call_sync(Store.get, key),
                           put=lambda key, value: store.call_sync(Store.set, key, value))
    link = LaneLink(config.mqtt, lane=config.lane.name, serial=config.lane.serial, backend_type=config.backend.type,
                    record=lambda rows: store.call_sync(Store.record_shared, rows), on_mode=on_mode, ledger=ledger,
                    occupancy=occupancy, remember=lambda text: store.call_sync(Store.set, REMEMBER_KEY, text))
    if config.mqtt.share_admissions:
        store.call_sync(Store.share_identities, link.key.ticket)
        gate.on_decided.append(lambda scan, decision: link.admitted(scan, decision, gate.scan_mode))
    link.start()
    return link


def main(argv: list[str] | None = None) -> int:
    """`python -m gated.mqtt MODE [--lane NAME] [--config PATH]`: send a signed mode command."""
    import argparse

    from gated import config as configmod

    p = argparse.ArgumentParser(prog="python -m gated.mqtt",
                                description="Send a signed mode command to one lane or every lane of the venue "
                                            "(the lanes need [mqtt] commands = true).")
    p.add_argument("mode", choices=MODES)
    p.add_argument("--lane", default="*", help="the lane's [lane] name; default: every lane")
    p.add_argument("--config", help="a gated.toml with the venue's [mqtt] table (default: GATED_CONFIG or "
                                    f"{configmod.DEFAULT_PATH})")
    args = p.parse_args(argv)
    try:
        config = configmod.load(args.config)
        if config.mqtt is None:
            raise ConfigError(config.path, [f"{config.path}: no [mqtt] table."])
        s = config.mqtt
        key = read_venue_key(s.hmac_key_file)
        password = read_secret(s.password_file, "[mqtt] password_file") if s.password_file else None
    except ConfigError as e:
        print(configmod.report(e))
        return 2
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    tls, host, port = parse_mqtt_url(s.url)
    topics = Topics(s.topic_prefix or f"gated/{topic_level(config.backend.type)}", topic_level(args.lane))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"gated-cmd-{uuid.uuid4().hex[:12]}",
                         protocol=mqtt.MQTTv5)
    if s.username:
        client.username_pw_set(s.username, password)
    if tls:
        client.tls_set(ca_certs=s.ca_file or None)
    try:
        client.connect(host, port, keepalive=30)
    except OSError as e:
        print(f"cannot reach the MQTT broker at {host}:{port}: {e}")
        return 1
    client.loop_start()
    topic = topics.command_all if args.lane == "*" else topics.command
    info = client.publish(topic, command_message(key, args.mode, args.lane), qos=1)
    try:
        info.wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()
    if not info.is_published():
        print(f"the broker did not take the command on {topic} within 5 s")
        return 1
    print(f"sent: mode {args.mode} to {'every lane' if args.lane == '*' else args.lane} on {topic}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
