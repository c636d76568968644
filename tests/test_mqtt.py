"""Lanes of one venue share admissions through a real Mosquitto broker on 127.0.0.1.

Each lane is the daemon's own pipeline (gated.daemon.build + Gate.handle, or `gated run` as a process)
with its own SQLite file and a local backend, so every decision is offline: only MQTT can tell lane B
what lane A admitted. Run with -s to see the measured figures.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from gated import config as configmod
from gated import mqtt
from gated.daemon import build
from gated.model import InputKind, Reason, Scan, Verdict
from gated.store import Store

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def need_broker() -> None:
    """Skip a test that needs a real broker; the message, signature and replay tests run without one."""
    if not os.path.exists(MOSQUITTO):
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")

KEY = "test-venue-key-0123456789abcdef"
ROOT = Path(__file__).parent.parent


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(predicate, timeout: float, what: str) -> None:
    """Poll a condition with a bound (for state we cannot be notified of, e.g. a socket accepting)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


class Broker:
    """A private Mosquitto with persistence on disk, saved on every change so SIGKILL loses nothing."""

    def __init__(self, root: Path, port: int | None = None, extra: str = ""):
        self.port = port or free_port()
        self.dir = root
        self.conf = root / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""  # else it drops to "mosquitto" and cannot write here
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\npersistence true\npersistence_location {root}/\n"
            f"autosave_interval 1\nautosave_on_changes true\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
            f"{user}"
            f"log_dest file {root}/mosquitto.log\n" + (extra or "allow_anonymous true\n"))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def accepting() -> bool:
            assert self.proc.poll() is None, (self.dir / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False

        wait_until(accepting, 5, "mosquitto to listen")
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    need_broker()
    b = Broker(tmp_path_factory.mktemp("broker")).start()
    yield b
    b.stop()


@pytest.fixture
def own_broker(tmp_path):
    """A broker this test may kill and restart."""
    need_broker()
    made: list[Broker] = []

    def make(port: int | None = None, extra: str = "", start: bool = True) -> Broker:
        d = tmp_path / f"broker{len(made)}"
        d.mkdir()
        b = Broker(d, port, extra)
        made.append(b)
        return b.start() if start else b

    yield make
    for b in made:
        b.stop()


def venue_files(folder: Path) -> tuple[Path, Path]:
    """(key, tickets) of a venue in `folder`, written unless there: the HMAC key and 200 tickets T-0000..."""
    key, tickets = folder / "venue.key", folder / "tickets.csv"
    if not key.exists():
        key.write_text(KEY + "\n")
        key.chmod(0o600)
    if not tickets.exists():
        tickets.write_text("token,name\n" + "".join(f"T-{i:04d},Holder {i}\n" for i in range(200)))
    return key, tickets


def lane_config(folder: Path, name: str, port: int | None, *, key_file: Path, prefix: str, lane_extra: str = "",
                extra: str = "", mqtt_extra: str = "") -> configmod.Config:
    """Write and load lane `name`'s config in folder/name: a local backend on venue_files' tickets, a stdin
    reader, mock pins, its own store; `lane_extra` goes into [lane], `extra` after the store, and [mqtt]
    (127.0.0.1:port, then `mqtt_extra`) unless `port` is None."""
    d = folder / name
    d.mkdir(exist_ok=True)
    text = f"""
        [lane]
        name = "{name}"
        serial = "S-{name}"
        debounce_seconds = 0.0
        {lane_extra}
        [backend]
        type = "local"
        [backend.local]
        tickets = "{venue_files(folder)[1]}"
        [reader.front]
        type = "stdin"
        [gpio]
        pin_factory = "mock"
        [relay]
        pin = 17
        pulse_seconds = 0.01
        [store]
        path = "{d / 'gated.db'}"
    """ + extra
    if port is not None:
        text += f"""
        [mqtt]
        url = "mqtt://127.0.0.1:{port}"
        hmac_key_file = "{key_file}"
        topic_prefix = "{prefix}"
        """ + mqtt_extra
    path = d / "gated.toml"
    path.write_text("\n".join(line.strip() for line in text.splitlines()) + "\n")
    return configmod.load(str(path))


@pytest.fixture
def venue(tmp_path):
    """Write lane configs of one venue (one prefix, one key, one ticket list); returns a maker."""
    prefix = f"gated/test-{uuid.uuid4().hex[:8]}"  # fresh topics and sessions for every test
    key, _ = venue_files(tmp_path)

    def lane(name: str, port: int | None, mqtt_extra: str = "", *, key_file: Path = key) -> configmod.Config:
        return lane_config(tmp_path, name, port, key_file=key_file, prefix=prefix, mqtt_extra=mqtt_extra)

    lane.prefix = prefix
    return lane


class Lane:
    def __init__(self, config, parts, link):
        self.config, self.parts, self.link = config, parts, link
        self.name = config.lane.name

    async def scan(self, token: str):
        return await self.parts.gate.handle(Scan(token=token, reader="front", input=InputKind.BARCODE))


async def open_lane(config, on_mode=None) -> Lane:
    parts = await build(config)
    try:
        await parts.backend.sync(parts.store)
        return Lane(config, parts, mqtt.attach(config, parts.store, parts.gate, on_mode=on_mode))
    except BaseException:
        await parts.close()
        raise


async def close_lane(lane: Lane) -> None:
    if lane.link is not None:
        await asyncio.to_thread(lane.link.stop)
    await lane.parts.close()


@asynccontextmanager
async def lanes(*configs, ready: bool = True, on_mode=None):
    opened = []
    try:
        for c in configs:
            opened.append(await open_lane(c, on_mode))
        if ready:
            for lane in opened:
                if lane.link is not None:
                    assert await asyncio.to_thread(lane.link.ready.wait, 5), f"{lane.name} not subscribed"
        yield opened
    finally:
        for lane in opened:
            await close_lane(lane)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Subscriber:
    """A plain MQTT client watching topics, as a fleet dashboard would."""

    def __init__(self, port: int, topic: str):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}",
                                  protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(5)

    def _on_message(self, _c, _u, msg) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload, msg.retain))
            self.cond.notify_all()

    def wait_for(self, match, timeout: float = 5.0):
        """The first message (topic, payload, retain) for which match(...) holds."""
        def find():
            return next((m for m in self.messages if match(*m)), None)
        with self.cond:
            assert self.cond.wait_for(lambda: find() is not None, timeout), \
                f"not seen within {timeout} s; got {[(t, p[:80]) for t, p, _ in self.messages]}"
            return find()

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- messages and config -----------------------------------------------------------------------

def test_a_message_signed_with_another_key_or_altered_after_signing_is_refused():
    key, other = mqtt.VenueKey(KEY), mqtt.VenueKey("another-venue-key-0123456789")
    body = mqtt.admission_body(key, lane="a", nonce="n-1", ticket_key="T-1", event="", wall=1.7e9,
                               direction="entry")
    assert mqtt.admission_row(key.open(key.sign(body)), "a") == ("n-1", key.ticket("T-1"), "entry", 1.7e9, "a")
    with pytest.raises(mqtt.BadMessage, match="bad signature"):
        key.open(other.sign(body))
    altered = json.loads(key.sign(body))
    altered["key"] = key.ticket("T-2")  # re-pointed at another ticket
    with pytest.raises(mqtt.BadMessage, match="bad signature"):
        key.open(json.dumps(altered).encode())
    with pytest.raises(mqtt.BadMessage, match="not JSON"):
        key.open(b"\xff{")
    with pytest.raises(mqtt.BadMessage, match="not signed"):
        key.open(json.dumps(body).encode())
    with pytest.raises(mqtt.BadMessage, match="lane does not match"):  # lane-b speaking for lane a
        mqtt.admission_row(key.open(key.sign(body)), "b")


def test_the_shared_hash_is_not_the_token_and_differs_between_venues():
    shared = mqtt.VenueKey(KEY).ticket("T-0001")
    assert "T-0001" not in shared and len(shared) == 64
    assert shared != mqtt.VenueKey("another-venue-key-0123456789").ticket("T-0001")


def test_commands_are_refused_when_stale_replayed_or_for_another_lane():
    key = mqtt.VenueKey(KEY)
    now = time.time()
    cmd = key.open(mqtt.command_message(key, "locked", "north-3", now=now))
    assert mqtt.command_mode(cmd, lane="north-3", to_all=False, now=now) == "locked"
    with pytest.raises(mqtt.BadMessage, match="another lane"):
        mqtt.command_mode(cmd, lane="north-4", to_all=False, now=now)
    with pytest.raises(mqtt.BadMessage, match="within the last 60 s"):
        mqtt.command_mode(cmd, lane="north-3", to_all=False, now=now + 61)
    everyone = key.open(mqtt.command_message(key, "free", now=now))
    assert mqtt.command_mode(everyone, lane="north-4", to_all=True, now=now) == "free"


def test_mqtt_config_problems_name_the_key(tmp_path, venue):
    cfg = venue("lane-a", None).path
    text = Path(cfg).read_text() + '\n[mqtt]\nurl = "http://broker:1883"\ntopic_prefix = "gated/#"\n' \
        'password_file = "pw"\n'
    Path(cfg).write_text(text)
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(cfg)
    problems = e.value.problems
    assert any(p.startswith("[mqtt] hmac_key_file: missing;") for p in problems)
    assert any(p.startswith('[mqtt] password_file = "pw": file not found') for p in problems)
    assert '[mqtt] url = "http://broker:1883": must start with "mqtt://" or "mqtts://", ' \
           'e.g. "mqtt://broker.local:1883".' in problems
    assert any(p.startswith('[mqtt] topic_prefix = "gated/#": must be topic levels') for p in problems)


def test_a_short_venue_key_is_refused_at_start(tmp_path, venue):
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    short.chmod(0o600)
    config = venue("lane-a", free_port(), key_file=short)  # refused before any connection
    with pytest.raises(configmod.ConfigError) as e:
        asyncio.run(open_lane(config))
    assert "use at least 16" in e.value.problems[0]


# --- hostile messages, replays: handed to the link as paho would, no broker needed --------------

class FakeClient:
    """Stands in for paho's client when a test hands messages to a link: records acknowledgements."""

    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, mid: int, _qos: int) -> None:
        self.acked.append(mid)


def message(topic: str, payload: bytes, *, mid: int = 1, retain: bool = False) -> paho.MQTTMessage:
    msg = paho.MQTTMessage(mid, topic.encode())
    msg.payload, msg.qos, msg.retain = payload, 1, retain
    return msg


def unstarted_link(config, *, on_mode=None, **options) -> mqtt.LaneLink:
    """A lane's link, never connected: a test calls its paho callback (_on_message) itself."""
    return mqtt.LaneLink(config.mqtt, lane=config.lane.name, serial=config.lane.serial, backend_type="local",
                         record=len, on_mode=on_mode, **options)


@pytest.fixture(scope="module")
def scratch_store(tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("store") / "gated.db")
    yield store
    store.close()


SIGNED_LIKE = b'"v":1,"type":"command","lane":"lane-a","mode":"free","nonce":"n","wall_ms":1'


@pytest.mark.parametrize("payload", [
    pytest.param(b"[" * 50_000 + b"]" * 50_000, id="nested 50,000 deep"),
    pytest.param(b"[" * 2_000 + b"]" * 2_000, id="nested 2,000 deep within the size bound"),
    pytest.param(b'{"sig":"' + "é".encode() * 64 + b'",' + SIGNED_LIKE + b"}", id="sig not ASCII"),
    pytest.param(b'{"sig":"\\udcff",' + SIGNED_LIKE + b"}", id="sig a lone surrogate"),
    pytest.param(b'{"sig":"00","v":NaN}', id="NaN"),
    pytest.param(b'{"sig":"00","v":' + b"9" * 5000 + b"}", id="5,000-digit integer"),
    pytest.param(b"\xff\xfe{", id="not UTF-8"),
    pytest.param(b'{"sig":"00","pad":"' + b"a" * 10_000 + b'"}', id="10 kB"),
])
def test_a_malformed_payload_is_a_bad_message_and_nothing_else(payload):
    with pytest.raises(mqtt.BadMessage):
        mqtt.VenueKey(KEY).open(payload)


HOSTILE_TEXT = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=80)
HOSTILE_VALUE = st.one_of(
    st.sampled_from([None, True, 2**64, 10**400, -1, 2**53, "\udcff", "a" * 100_000, "", "entry"]),
    st.integers(-2**70, 2**70), st.floats(), HOSTILE_TEXT, st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["nonce", "key", "direction", "wall_ms", "lane", "type", "event", "v"]),
       value=HOSTILE_VALUE)
def test_a_signed_admission_with_a_hostile_value_is_refused_or_stored(scratch_store, field, value):
    """A lane holding the venue key may still send garbage: it must never fail the SQLite write."""
    key = mqtt.VenueKey(KEY)
    body = mqtt.admission_body(key, lane="lane-a", nonce=str(uuid.uuid4()), ticket_key="T-1", event="",
                               wall=1.7e9, direction="entry")
    body[field] = value
    try:
        payload = key.sign(body)
    except ValueError:  # NaN or infinity: cannot be signed, so sent with a made-up signature
        payload = json.dumps({**body, "sig": "0" * 64}).encode()
    try:
        row = mqtt.admission_row(key.open(payload), "lane-a")
    except mqtt.BadMessage:
        return
    scratch_store.record_shared([row])
    stored = scratch_store.db.conn.execute("SELECT key_hash, wall FROM admissions WHERE nonce = ?",
                                           (row[0],)).fetchone()
    assert stored is not None and stored[1] == row[3]


def test_a_flood_of_malformed_messages_logs_a_few_lines_and_a_valid_command_still_works(venue, caplog):
    caplog.set_level(logging.DEBUG, logger="gated")
    config = venue("lane-f", free_port(), "commands = true\n")
    obeyed: list[str] = []
    link = unstarted_link(config, on_mode=obeyed.append)
    client = FakeClient()
    junk = [b"[" * 50_000 + b"]" * 50_000, b"[" * 2_000 + b"]" * 2_000,
            b'{"sig":"' + "é".encode() * 64 + b'",' + SIGNED_LIKE + b"}", b'{"sig":"\\udcff",' + SIGNED_LIKE + b"}",
            b"\xff"]
    topics = [f"{venue.prefix}/admission/lane-x", f"{venue.prefix}/command/lane-f", f"{venue.prefix}/command"]
    for i in range(3000):
        link._on_message(client, None, message(topics[i % 3], junk[i % len(junk)], mid=i))
    valid = mqtt.command_message(mqtt.VenueKey(KEY), "locked", "lane-f")
    link._on_message(client, None, message(topics[1], valid, mid=3000))
    assert obeyed == ["locked"]
    assert sorted(client.acked) == list(range(3001))  # every message acknowledged: none comes back
    lines = [r.getMessage() for r in caplog.records]
    # One line a minute per topic kind says what was wrong, one says the mode; no traceback.
    assert len(lines) == 3, lines
    assert any("ignored an MQTT message" in line for line in lines)
    assert any("refused an MQTT command" in line for line in lines)
    assert not any(r.exc_info for r in caplog.records)


def test_a_command_replayed_after_a_restart_or_a_clock_jump_is_refused(venue, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gated.mqtt")
    config = venue("lane-c", free_port(), "commands = true\n")
    key = mqtt.VenueKey(KEY)
    topic = f"{venue.prefix}/command/lane-c"
    client = FakeClient()
    sent = time.time()
    captured = mqtt.command_message(key, "free", "lane-c", now=sent)
    obeyed: list[str] = []
    clock = [sent + 1]

    def lane_link(store: Store) -> mqtt.LaneLink:
        ledger = mqtt.CommandLedger(get=store.get, put=store.set)  # as attach() wires it
        return unstarted_link(config, on_mode=obeyed.append, ledger=ledger, clock=lambda: clock[0])

    store = Store(tmp_path / "lane.db")
    lane_link(store)._on_message(client, None, message(topic, captured))
    assert obeyed == ["free"]
    store.close()

    store = Store(tmp_path / "lane.db")  # the lane restarts; the command is replayed 5 s after it was sent
    try:
        link = lane_link(store)
        clock[0] = sent + 5
        link._on_message(client, None, message(topic, captured))
        assert obeyed == ["free"]
        assert "a replay of a command already obeyed" in caplog.text
        link._on_message(client, None, message(topic, mqtt.command_message(key, "locked", "lane-c", now=sent + 5)))
        assert obeyed == ["free", "locked"]
        # Much later a new command; then the lane's clock jumps back to when the captured one was fresh.
        clock[0] = sent + 600
        link._on_message(client, None, message(topic, mqtt.command_message(key, "normal", "lane-c", now=sent + 600)))
        clock[0] = sent + 5
        link._on_message(client, None, message(topic, captured))
        assert obeyed == ["free", "locked", "normal"]
    finally:
        store.close()


@pytest.mark.parametrize("row", ['{"newest_ms": 1e400, "seen": {}}', f'{{"newest_ms": {10**30}, "seen": {{}}}}',
                                 '{"newest_ms": true, "seen": {}}', '{"newest_ms": 0, "seen": {"n": 1e300}}',
                                 '{"newest_ms": 0, "seen": []}', "not json"])
def test_a_damaged_command_record_starts_anew_and_commands_are_obeyed_again(tmp_path, row):
    store = Store(tmp_path / "lane.db")
    try:
        store.set(mqtt.COMMANDS_KEY, row)
        ledger = mqtt.CommandLedger(get=store.get, put=store.set)
        now = time.time()
        ledger.obey("fresh-nonce", int(now * 1000), now)  # raises BadMessage if refused
        assert json.loads(store.get(mqtt.COMMANDS_KEY))["seen"] == {"fresh-nonce": int(now * 1000)}
    finally:
        store.close()


# --- sharing between lanes ---------------------------------------------------------------------

def test_token_admitted_at_one_lane_is_denied_already_used_at_the_others(venue, broker):
    """50 tokens over 3 lanes: each admission reaches the two other lanes; the figure is printed."""

    async def run():
        configs = [venue(n, broker.port) for n in ("lane-a", "lane-b", "lane-c")]
        async with lanes(*configs) as (a, b, c):
            trio = [a, b, c]
            delays = []
            for i in range(50):
                at = trio[i % 3]
                others = [x for x in trio if x is not at]
                expected = [x.link.received + 1 for x in others]
                decision = await at.scan(f"T-{i:04d}")
                assert decision.verdict is Verdict.ADMIT
                t0 = time.monotonic()

                async def arrival(lane, n, t0=t0):
                    assert await asyncio.to_thread(lane.link.wait_received, n, 5), f"{lane.name} got nothing"
                    return time.monotonic() - t0

                delays += await asyncio.gather(*(arrival(x, n) for x, n in zip(others, expected, strict=True)))
            # Every lane now denies every token it did not admit itself, and the admitting lane too.
            for i in range(50):
                for lane in trio:
                    d = await lane.scan(f"T-{i:04d}")
                    assert (d.verdict, d.reason) == (Verdict.DENY, Reason.ALREADY_USED), (lane.name, i)
            return delays

    delays = asyncio.run(run())
    ms = [d * 1000 for d in delays]
    print(f"\nlane-to-lane propagation, 3 lanes, 50 tokens ({len(ms)} deliveries): "
          f"p50 {pct(ms, 0.5):.1f} ms, p99 {pct(ms, 0.99):.1f} ms, max {max(ms):.1f} ms")
    assert pct(ms, 0.99) < 1000  # loopback: well under a second, the time a person takes to step up


def test_scan_latency_is_the_same_with_publishing_on_off_or_the_broker_dead(venue, broker):
    """Publishing is off the decision path: the broker's state cannot change a scan's latency."""
    dead = free_port()  # nothing listens there

    async def run():
        configs = [venue("off", None), venue("on", broker.port), venue("dead", dead)]
        async with lanes(*configs, ready=False) as trio:
            assert await asyncio.to_thread(trio[1].link.ready.wait, 5)
            times = {lane.name: [] for lane in trio}
            for i in range(60):
                for lane in trio[i % 3:] + trio[:i % 3]:  # interleaved and rotated: noise hits all alike
                    d = await lane.scan(f"T-{i:04d}")
                    assert d.verdict is Verdict.ADMIT
                    times[lane.name].append(lane.parts.gate.last_act_ms)
            assert trio[2].link.connected is False and trio[2].link.queued == 60
            return times

    times = asyncio.run(run())
    p50 = {k: statistics.median(v) for k, v in times.items()}
    p99 = {k: pct(v, 0.99) for k, v in times.items()}
    print("\nscan -> relay latency, 60 scans each: " + ", ".join(
        f"publishing {k}: p50 {p50[k]:.2f} ms p99 {p99[k]:.2f} ms" for k in ("off", "on", "dead")))
    for k in ("on", "dead"):  # a publish on the scan path would cost the dead lane a timeout per scan
        assert p50[k] <= 2 * p50["off"] + 5.0, p50


def test_admissions_made_while_the_broker_is_down_reach_the_other_lane_after_it_restarts(venue, own_broker):
    b = own_broker()

    async def run():
        async with lanes(venue("lane-a", b.port), venue("lane-b", b.port)) as (a, lb):
            assert (await a.scan("T-0100")).verdict is Verdict.ADMIT
            assert await asyncio.to_thread(lb.link.wait_received, 1, 5)
            b.kill()
            await asyncio.to_thread(wait_until, lambda: not a.link.connected and not lb.link.connected, 5,
                                    "the lanes to notice the broker is gone")
            for i in range(101, 106):  # decided offline as always: the broker is not asked
                assert (await a.scan(f"T-{i:04d}")).verdict is Verdict.ADMIT
            assert (await lb.scan("T-0106")).verdict is Verdict.ADMIT  # B's own admission, queued at B
            assert (await lb.scan("T-0100")).reason is Reason.ALREADY_USED  # shared before the outage
            restarted = time.monotonic()
            b.start()
            assert await asyncio.to_thread(lb.link.wait_received, 6, 15), lb.link.received
            caught_up = time.monotonic() - restarted
            assert await asyncio.to_thread(a.link.wait_received, 1, 15), a.link.received
            for i in range(101, 106):
                assert (await lb.scan(f"T-{i:04d}")).reason is Reason.ALREADY_USED
            assert (await a.scan("T-0106")).reason is Reason.ALREADY_USED  # B's reached A as well
            return caught_up

    caught_up = asyncio.run(run())
    print(f"\nbroker killed and restarted: the other lane caught up {caught_up:.2f} s after the restart")


def test_a_lane_restarted_during_the_event_catches_up_on_what_it_missed(venue, broker):
    async def run():
        config_b = venue("lane-b", broker.port)
        async with lanes(venue("lane-a", broker.port)) as (a,):
            b = await open_lane(config_b)
            assert await asyncio.to_thread(b.link.ready.wait, 5)
            await close_lane(b)  # lane B reboots; the broker keeps its session and queues for it
            for i in range(110, 113):
                assert (await a.scan(f"T-{i:04d}")).verdict is Verdict.ADMIT
            await asyncio.to_thread(wait_until, lambda: a.link.sent == 3, 5, "the broker to take A's admissions")
            b = await open_lane(config_b)
            try:
                assert await asyncio.to_thread(b.link.wait_received, 3, 5), b.link.received
                assert [(await b.scan(f"T-{i:04d}")).reason for i in range(110, 113)] == [Reason.ALREADY_USED] * 3
            finally:
                await close_lane(b)

    asyncio.run(run())


def test_a_forged_admission_is_ignored_and_logged(venue, broker, caplog):
    caplog.set_level(logging.WARNING, logger="gated.mqtt")
    key = mqtt.VenueKey(KEY)

    async def run():
        async with lanes(venue("lane-b", broker.port)) as (b,):
            intruder = Subscriber(broker.port, "nothing/here")
            try:
                topic = f"{venue.prefix}/admission/lane-a"
                # A stray client that sniffed a real ticket hash but has not got the venue key:
                forged = mqtt.admission_body(key, lane="lane-a", nonce="forged-1", ticket_key="T-0120", event="",
                                             wall=time.time(), direction="entry")
                intruder.publish(topic, mqtt.VenueKey("guessed-key-0123456789abcdef").sign(forged))
                intruder.publish(topic, json.dumps(forged).encode())  # unsigned
                # A genuine message after them: once it is recorded, the forged ones were handled.
                genuine = mqtt.admission_body(key, lane="lane-a", nonce="real-1", ticket_key="T-0121", event="",
                                              wall=time.time(), direction="entry")
                intruder.publish(topic, key.sign(genuine))
            finally:
                intruder.close()
            assert await asyncio.to_thread(b.link.wait_received, 1, 5)
            assert b.link.received == 1
            assert (await b.scan("T-0120")).verdict is Verdict.ADMIT  # the forgery blocked nobody
            assert (await b.scan("T-0121")).reason is Reason.ALREADY_USED

    asyncio.run(run())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("ignored an MQTT message on" in w and "bad signature" in w for w in warnings), warnings
    assert "T-0120" not in caplog.text


def test_when_the_queue_overflows_the_oldest_admissions_are_dropped_with_a_warning(venue, own_broker, caplog):
    caplog.set_level(logging.WARNING, logger="gated.mqtt")
    port = free_port()

    async def run():
        b = own_broker(port)
        async with lanes(venue("lane-b", port)) as (lb,):
            b.kill()  # lane B's session is on disk; lane A never reaches the broker until it is back
            async with lanes(venue("lane-a", port, "queue_size = 3"), ready=False) as (a,):
                for i in range(130, 135):
                    assert (await a.scan(f"T-{i:04d}")).verdict is Verdict.ADMIT
                await asyncio.to_thread(wait_until, lambda: "MQTT queue full (3): dropped" in caplog.text, 5,
                                        "the drop warning")
                assert a.link.dropped == 2
                b.start()
                assert await asyncio.to_thread(lb.link.wait_received, 3, 15)
                assert [(await lb.scan(f"T-{i:04d}")).verdict for i in range(130, 135)] == \
                    [Verdict.ADMIT, Verdict.ADMIT, Verdict.DENY, Verdict.DENY, Verdict.DENY]

    asyncio.run(run())


# --- status, last will, commands: `gated run` as a process ------------------------------------

def test_status_last_will_and_signed_commands_seen_from_a_dashboard(venue, broker, tmp_path):
    config = venue("lane-d", broker.port, "commands = true\nhomeassistant_discovery = true\n"
                   f'homeassistant_prefix = "{venue.prefix}/ha"\n')
    status_topic, avail_topic = f"{venue.prefix}/status/lane-d", f"{venue.prefix}/availability/lane-d"
    watch = Subscriber(broker.port, f"{venue.prefix}/#")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("JOURNAL_STREAM", None)
    log_path = tmp_path / "daemon.log"
    daemon = subprocess.Popen([sys.executable, "-m", "gated", "run", "--config", config.path],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log_path.open("w"),
                              env=env, cwd=ROOT, text=True)
    key = mqtt.VenueKey(KEY)

    def status_with(**want):
        def match(topic, payload, _retain):
            if topic != status_topic:
                return False
            body = key.open(payload)  # signed: a dashboard can trust it
            return all(body.get(k) == v for k, v in want.items())
        return match

    try:
        watch.wait_for(lambda t, p, r: t == avail_topic and p == b"online", 10)
        watch.wait_for(status_with(state="online", mode="normal"), 10)
        late = Subscriber(broker.port, status_topic)  # a dashboard opened later still sees the lane
        try:
            _, payload, retained = late.wait_for(status_with(state="online"))
        finally:
            late.close()
        body = key.open(payload)
        assert retained and body["version"] and body["api"] == "local" and body["readers"] == {"front": "running"}
        _, ha, _ = watch.wait_for(lambda t, p, r: t.startswith(f"{venue.prefix}/ha/sensor/") and
                                  t.endswith("/mode/config"))
        assert json.loads(ha)["availability_topic"] == avail_topic
        # The doors-open check (gated ready) as a binary sensor: this lane's outputs were never tested.
        _, ha, _ = watch.wait_for(lambda t, p, r: t == f"{venue.prefix}/ha/binary_sensor/lane-d/ready/config")
        assert json.loads(ha)["state_topic"] == status_topic
        _, payload, _ = watch.wait_for(status_with(ready="OFF"), 10)
        assert "outputs" in key.open(payload)["not_ready"].split(", ")

        # A forged command changes nothing; a signed one locks the lane, between two scans.
        watch.publish(f"{venue.prefix}/command/lane-d",
                      mqtt.command_message(mqtt.VenueKey("guessed-key-0123456789abcdef"), "free", "lane-d"))
        assert mqtt.main(["locked", "--lane", "lane-d", "--config", config.path]) == 0
        watch.wait_for(status_with(mode="locked"), 5)
        daemon.stdin.write("T-0150\n")
        daemon.stdin.flush()
        wait_until(lambda: "DENY locked" in log_path.read_text(), 5, "the scan to be denied")
        log_text = log_path.read_text()
        assert "refused an MQTT command" in log_text and "bad signature" in log_text
        assert "lane-d mode is now locked (MQTT command)" in log_text

        daemon.send_signal(signal.SIGKILL)  # no goodbye: the broker announces the last will
        daemon.wait(5)
        watch.wait_for(lambda t, p, r: t == avail_topic and p == b"offline", 5)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(5)
        watch.close()


def test_a_lane_that_stops_cleanly_says_offline_in_its_status(venue, broker):
    watch = Subscriber(broker.port, f"{venue.prefix}/#")
    key = mqtt.VenueKey(KEY)

    async def run():
        async with lanes(venue("lane-e", broker.port)) as (e,):
            await e.scan("T-0160")
            e.link.set_status(api="local", queue=0, last_scan="ADMIT", mode="normal", readers={})
            watch.wait_for(lambda t, p, r: t.endswith("/status/lane-e") and key.open(p)["state"] == "online")

    try:
        asyncio.run(run())
        _, payload, _ = watch.wait_for(lambda t, p, r: t.endswith("/status/lane-e")
                                       and key.open(p)["state"] == "offline")
        assert key.open(payload)["last_scan"] == "ADMIT"
        watch.wait_for(lambda t, p, r: t.endswith("/availability/lane-e") and p == b"offline")
    finally:
        watch.close()


class Obeyed(list):
    """An on_mode hook: the modes a lane was told to take, in order; `changed` is set at each."""

    def __init__(self):
        super().__init__()
        self.changed = threading.Event()

    def __call__(self, mode: str) -> None:
        self.append(mode)
        self.changed.set()


def test_a_captured_command_replayed_after_the_lane_restarts_is_refused(venue, broker, caplog):
    caplog.set_level(logging.INFO, logger="gated.mqtt")
    config = venue("lane-r", broker.port, "commands = true\n")
    key = mqtt.VenueKey(KEY)
    topic = f"{venue.prefix}/command/lane-r"
    captured = mqtt.command_message(key, "free", "lane-r")
    obeyed = Obeyed()
    async def run():
        sender = Subscriber(broker.port, "nothing/here")
        try:
            async with lanes(config, on_mode=obeyed):
                sender.publish(topic, captured)
                assert await asyncio.to_thread(obeyed.changed.wait, 5)
            obeyed.changed.clear()
            # The lane restarts (same store); someone who captured the command sends it again, then
            # the operator sends a new one: once that is obeyed, the replay before it was handled.
            async with lanes(config, on_mode=obeyed):
                sender.publish(topic, captured)
                sender.publish(topic, mqtt.command_message(key, "locked", "lane-r"))
                assert await asyncio.to_thread(obeyed.changed.wait, 5)
        finally:
            sender.close()

    asyncio.run(run())
    assert obeyed == ["free", "locked"]
    assert "refused an MQTT command" in caplog.text and "a replay of a command already obeyed" in caplog.text


def test_a_flood_of_malformed_messages_through_the_broker_leaves_the_lane_working(venue, broker, caplog):
    caplog.set_level(logging.INFO, logger="gated.mqtt")
    config = venue("lane-m", broker.port, "commands = true\n")
    junk = [b"[" * 50_000 + b"]" * 50_000, b"[" * 2_000 + b"]" * 2_000,
            b'{"sig":"' + "é".encode() * 64 + b'",' + SIGNED_LIKE + b"}", b"\xff"]
    obeyed = Obeyed()
    async def run():
        sender = Subscriber(broker.port, "nothing/here")
        try:
            async with lanes(config, on_mode=obeyed) as (lane,):
                last = None
                for i in range(100):
                    topic = f"{venue.prefix}/command/lane-m" if i % 2 else f"{venue.prefix}/admission/lane-x"
                    last = sender.client.publish(topic, junk[i % len(junk)], qos=1)
                last.wait_for_publish(10)
                sender.publish(f"{venue.prefix}/command/lane-m",
                               mqtt.command_message(mqtt.VenueKey(KEY), "locked", "lane-m"))
                assert await asyncio.to_thread(obeyed.changed.wait, 10)
                assert (await lane.scan("T-0180")).verdict is Verdict.ADMIT  # still deciding
        finally:
            sender.close()

    asyncio.run(run())
    assert obeyed == ["locked"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]  # one a minute per topic kind
    assert not any(r.exc_info for r in caplog.records)


# --- the broker's ACL, as docs/mqtt.md sets it up ----------------------------------------------

def documented_acl() -> str:
    return (ROOT / "docs" / "mqtt.md").read_text().split("```acl\n", 1)[1].split("```", 1)[0]


def test_the_documented_acl_stops_one_lane_speaking_for_another(venue, own_broker, tmp_path):
    prefix = venue.prefix
    passwords = tmp_path / "passwd"
    for user in ("lane-a", "lane-b"):
        subprocess.run(["mosquitto_passwd", *(["-c"] if user == "lane-a" else []), "-b", str(passwords), user,
                        f"pw-{user}"], check=True, capture_output=True)
    acl = tmp_path / "acl"
    acl.write_text(documented_acl().replace("gated/stadium-north", prefix))
    b = own_broker(extra=f"allow_anonymous false\npassword_file {passwords}\nacl_file {acl}\n")
    configs = []
    for user in ("lane-a", "lane-b"):
        pw = tmp_path / f"{user}.pw"
        pw.write_text(f"pw-{user}\n")
        pw.chmod(0o600)
        configs.append(venue(user, b.port, f'username = "{user}"\npassword_file = "{pw}"\n'))
    key = mqtt.VenueKey(KEY)

    async def run():
        async with lanes(*configs) as (a, lb):
            # lane-b's account publishes an admission in lane-a's name: the broker drops it.
            rogue = paho.Client(CallbackAPIVersion.VERSION2, client_id="rogue", protocol=paho.MQTTv5)
            rogue.username_pw_set("lane-b", "pw-lane-b")
            rogue.connect("127.0.0.1", b.port)
            rogue.loop_start()
            body = mqtt.admission_body(key, lane="lane-a", nonce="rogue-1", ticket_key="T-0170", event="",
                                       wall=time.time(), direction="entry")
            rogue.publish(f"{prefix}/admission/lane-a", key.sign(body), qos=1).wait_for_publish(5)
            rogue.disconnect()
            rogue.loop_stop()
            assert (await a.scan("T-0171")).verdict is Verdict.ADMIT  # a genuine one goes through
            assert await asyncio.to_thread(lb.link.wait_received, 1, 5)
            assert lb.link.received == 1
            assert (await lb.scan("T-0170")).verdict is Verdict.ADMIT
            assert (await lb.scan("T-0171")).reason is Reason.ALREADY_USED

    asyncio.run(run())
