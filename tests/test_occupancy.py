"""People inside and the capacity stop: three lanes of one venue through a real Mosquitto on 127.0.0.1.

Lanes entry-a (entry), entry-b (entry, with a passage sensor on a gpiozero mock pin) and exit-c (exit)
each run the daemon's own pipeline with their own SQLite file and a local backend. The merge and the
share rule are also tested on their own, with clocks the test moves.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gated import doctor, mqtt
from gated.daemon import Daemon, build
from gated.model import InputKind, Reason, Scan, ScanMode, Source, Verdict, admit, deny
from gated.occupancy import Counts, Occupancy, period_start
from gated.policy.base import Backend
from gated.policy.decider import Decider
from gated.store import Store, StoreThread
from tests.drivers.support import until
from tests.test_mqtt import KEY, FakeClient, Subscriber, message, venue_files, wait_until
from tests.test_mqtt import broker as broker  # noqa: F401 - a fixture
from tests.test_mqtt import lane_config as mqtt_lane_config
from tests.test_mqtt import own_broker as own_broker  # noqa: F401 - a fixture

PASSAGE_PIN = 24


# --- the merge and the share rule, on their own ------------------------------------------------

COUNTS = st.builds(Counts, st.integers(0, 3), st.integers(0, 50), st.integers(0, 50))


@given(st.lists(COUNTS, min_size=1, max_size=8), st.randoms())
def test_any_order_or_repetition_of_messages_gives_the_same_counts(messages, rng):
    """What makes lanes agree after a split: the join does not care about order or duplicates."""
    def merged(seq):
        out = seq[0]
        for c in seq[1:]:
            out = out.join(c)
        return out

    shuffled = messages + rng.sample(messages, len(messages))  # every message again, in another order
    rng.shuffle(shuffled)
    assert merged(shuffled) == merged(messages)
    newest = max(c.period for c in messages)
    assert merged(messages).period == newest
    assert merged(messages).entries == max(c.entries for c in messages if c.period == newest)


class Clocks:
    def __init__(self, wall: float):
        self.wall, self.mono = wall, 1000.0


def test_a_silent_entry_lane_narrows_this_lanes_room_to_its_share():
    clocks = Clocks(time.time())
    occ = Occupancy("a", "entry", 10, "05:00", linked=True, clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    occ.link(True)
    occ.heard("b", Counts(occ.period, 2, 0), "entry")
    occ.heard("x", Counts(occ.period, 0, 0), "exit")
    for _ in range(2):
        occ.counted("entry", clocks.wall)
    assert occ.venue_total() == 4 and occ.full() == ""
    clocks.mono += 3.5  # b not heard for longer than STALE_SECONDS: it may be admitting unseen
    # 6 left when b went unheard, two entry lanes: this lane may take 3 of them
    for _ in range(3):
        assert occ.full() == ""
        occ.counted("entry", clocks.wall)
    assert occ.full().startswith("this lane's share of the room is used (3 of 6 left among 2 entry lanes")
    occ.heard("b", Counts(occ.period, 3, 0), "entry")  # b is back: the venue total decides again
    assert occ.venue_total() == 8 and occ.full() == ""
    occ.link(False)  # this lane lost the broker: at once, not after a timeout; 2 left, its share 1
    assert occ.full() == ""
    occ.counted("entry", clocks.wall)
    assert occ.full().startswith("this lane's share of the room is used (1 of 2 left")
    assert occ.venue_total() == 9


def test_at_reset_at_the_counts_start_again_and_old_periods_of_other_lanes_stop_counting():
    start = period_start(time.time(), 5, 0)
    clocks = Clocks(start + 3600)
    occ = Occupancy("a", "entry", 0, "05:00", clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    occ.load(40, 0)
    occ.heard("x", Counts(start, 0, 15), "exit")
    assert occ.venue_total() == 25
    clocks.wall = start + 86400 + 1  # 05:00:01 the next day (a day of 23 or 25 hours would shift it)
    if period_start(clocks.wall, 5, 0) == start:  # a daylight saving change today: one more hour
        clocks.wall += 3600
    assert occ.own().entries == 0 and occ.venue_total() == 0
    occ.counted("entry", start + 86000)  # a scan from before the reset belongs to the previous day
    occ.counted("entry", clocks.wall)
    occ.heard("x", Counts(occ.period, 0, 0), "exit")
    assert occ.venue_total() == 1 and occ.lane_counts()["x"].period == occ.period


# --- hostile messages ---------------------------------------------------------------------------

def signed_counts(lane="entry-b", direction="entry", period=None, entries=1, exits=0, key=KEY) -> bytes:
    body = {"v": 1, "type": "occupancy", "lane": lane, "direction": direction,
            "period": period_start(time.time(), 5, 0) if period is None else period, "entries": entries,
            "exits": exits, "wall_ms": int(time.time() * 1000)}
    try:
        return mqtt.VenueKey(key).sign(body)
    except ValueError:  # NaN or infinity: cannot be signed
        return json.dumps({**body, "sig": "0" * 64}).encode()


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(["entries", "exits", "period", "direction", "lane"]),
       value=st.one_of(st.sampled_from([None, True, 2**64, 10**400, -1, 10_000_001, "3", 1.5, "exit", []]),
                       st.integers(-2**70, 2**70), st.floats(), st.text(max_size=20)))
def test_a_signed_occupancy_message_with_a_hostile_value_never_gets_into_the_count(field, value):
    occ = Occupancy("entry-a", "entry", 100, "05:00", linked=True)
    args = {"period": None, "entries": 1, "exits": 0, "direction": "entry", "lane": "entry-b"} | {field: value}
    try:
        lane, counts, _ = mqtt.occupancy_row(mqtt.VenueKey(KEY).open(signed_counts(**args)), "entry-b", time.time())
    except mqtt.BadMessage:
        return
    occ.heard(lane, counts, "entry")
    assert 0 <= occ.lane_counts().get("entry-b", Counts(0)).entries <= 10_000_000
    assert isinstance(occ.venue_total(), int)


def test_forged_oversized_or_misaddressed_counts_are_refused_and_logged(tmp_path, caplog):
    config = lane_config(tmp_path, "entry-a", 1883, capacity=10, prefix="gated/t")
    occ = Occupancy("entry-a", "entry", 10, "05:00", linked=True)
    link = mqtt.LaneLink(config.mqtt, lane="entry-a", serial="S", backend_type="local", record=len, occupancy=occ)
    client = FakeClient()
    topic = "gated/t/occupancy/entry-b"
    for payload in (signed_counts(key="guessed-key-0123456789abcdef", entries=9),  # not the venue's key
                    signed_counts(entries=10_000_001),  # more people than a lane passes in a day
                    signed_counts(lane="entry-c", entries=9),  # another lane's name on b's topic
                    signed_counts(period=int(time.time()) + 3 * 86400, entries=9),  # a period days ahead
                    b'{"sig":"00","entries":' + b"9" * 5000 + b"}"):
        link._on_message(client, None, message(topic, payload))
    assert occ.venue_total() == 0 and "entry-b" not in occ.lane_counts()
    assert "ignored an MQTT message on gated/t/occupancy/entry-b: bad signature" in caplog.text
    link._on_message(client, None, message(topic, signed_counts(entries=4)))
    assert occ.venue_total() == 4 and len(client.acked) == 6  # each acknowledged: none comes back


# --- the capacity check in the decision ---------------------------------------------------------

class OnlineAPI(Backend):
    """An online backend whose validation is the check-in, as every real one's is; counts the calls."""

    name = "api"

    def __init__(self, config, offline: Reason = Reason.OK):
        super().__init__(config)
        self.asked, self.offline = 0, offline

    async def validate(self, scan, scan_mode):
        self.asked += 1
        return admit(Reason.OK, Source.ONLINE, backend=self.name, ticket_key=scan.token)

    def decide_offline(self, store, scan, scan_mode, now, clock_ok):
        if self.offline is Reason.OK:
            return admit(backend=self.name, ticket_key=scan.token)
        return deny(self.offline, backend=self.name)

    def data_age(self, store, now):
        return 0.0


@pytest.mark.parametrize(("offline", "expected"), [(Reason.OK, Reason.FULL), (Reason.STALE_DATA, Reason.FULL),
                                                   (Reason.CANCELED, Reason.CANCELED)])
def test_at_capacity_the_api_is_not_asked_so_the_ticket_is_not_checked_in(tmp_path, offline, expected):
    config = lane_config(tmp_path, "entry-a", None, capacity=1)

    async def run():
        store = StoreThread(tmp_path / "api.db")
        try:
            backend = OnlineAPI(config, offline)
            decider = Decider(config, backend, store)
            assert (await decider.decide(Scan("T-1"), ScanMode.ENTRY)).source is Source.ONLINE
            decider.full = lambda: "venue full: 1 inside, capacity 1"
            d = await decider.decide(Scan("T-2"), ScanMode.ENTRY)
            exit_decision = await decider.decide(Scan("T-1"), ScanMode.EXIT)
            return backend.asked, d, exit_decision
        finally:
            store.close()

    asked, d, exit_decision = asyncio.run(run())
    assert asked == 2  # T-1's entry and its exit; T-2 at capacity never reached the API
    assert d.verdict is Verdict.DENY and d.reason is expected
    assert exit_decision.admitted  # an exit is never held back: it makes room


# --- three lanes through a real broker ----------------------------------------------------------

def lane_config(tmp_path: Path, name: str, port: int | None, *, scan_mode: str = "entry", capacity: int = 0,
                passage: bool = False, reset_at: str = "05:00", prefix: str = "", extra_mqtt: str = ""):
    extra = f"""
        [occupancy]
        capacity = {capacity}
        reset_at = "{reset_at}"
    """
    if passage:
        extra += f"[input.passage]\npin = {PASSAGE_PIN}\ntimeout_seconds = 0.5\n"
    return mqtt_lane_config(tmp_path, name, port, key_file=venue_files(tmp_path)[0], prefix=prefix,
                            lane_extra=f'scan_mode = "{scan_mode}"', extra=extra, mqtt_extra=extra_mqtt)


class Lane:
    def __init__(self, config, parts, link):
        self.config, self.parts, self.link = config, parts, link
        self.name, self.occ = config.lane.name, parts.occupancy

    async def scan(self, token: str, *, passes: bool = True):
        """One scan; at a lane with a passage sensor the visitor pushes the turnstile (or does not)."""
        decision = await self.parts.gate.handle(Scan(token=token, reader="front", input=InputKind.BARCODE))
        if decision.admitted and self.config.passage is not None:
            relay = self.parts.outputs.relay
            await until(lambda: relay.value, what="the relay held for the passage")
            if passes:
                pin = self.parts.outputs.pin_factory.pin(PASSAGE_PIN)
                pin.drive_low()  # the rotation contact closes
                pin.drive_high()
            await until(lambda: not relay.value, what="the passage to end")
            await self.parts.gate.drain()
        return decision

    def stored(self) -> tuple[int, int]:
        return self.parts.store.call_sync(Store.occupancy_counts, self.occ.period)


@asynccontextmanager
async def venue(*configs, ready: bool = True):
    opened: list[Lane] = []
    try:
        for c in configs:
            parts = await build(c)
            await parts.backend.sync(parts.store)
            opened.append(Lane(c, parts, mqtt.attach(c, parts.store, parts.gate, occupancy=parts.occupancy)))
        for lane in opened if ready else ():
            if lane.link is not None:
                assert await asyncio.to_thread(lane.link.ready.wait, 5), f"{lane.name} not subscribed"
        yield opened
    finally:
        for lane in opened:
            if lane.link is not None:
                await asyncio.to_thread(lane.link.stop)
            await lane.parts.close()


def three(tmp_path, port, *, capacity=0, extra_mqtt="", reset_at="05:00"):
    prefix = f"gated/test-{uuid.uuid4().hex[:8]}"
    kw = {"capacity": capacity, "prefix": prefix, "extra_mqtt": extra_mqtt, "reset_at": reset_at}
    return (lane_config(tmp_path, "entry-a", port, **kw), lane_config(tmp_path, "entry-b", port, passage=True, **kw),
            lane_config(tmp_path, "exit-c", port, scan_mode="exit", **kw))


async def agree(lanes, total: int, timeout: float = 5.0) -> float:
    """Seconds until every lane knows every lane's counts and the same venue total, `total`."""
    started = time.monotonic()

    def agreed():
        views = [lane.occ.lane_counts() for lane in lanes]
        return all(v == views[0] for v in views) and len(views[0]) == len(lanes) \
            and all(lane.occ.venue_total() == total for lane in lanes)

    await until(agreed, timeout, f"every lane to agree on {total} inside: "
                f"{[(lane.name, lane.occ.lane_counts()) for lane in lanes]}")
    return time.monotonic() - started


def test_counts_and_the_venue_total_after_a_mixed_sequence(tmp_path, broker):  # noqa: F811
    configs = three(tmp_path, broker.port, capacity=10,
                    extra_mqtt=f'homeassistant_discovery = true\nhomeassistant_prefix = "{tmp_path.name}/ha"\n')
    prefix = configs[0].mqtt.topic_prefix
    watch = Subscriber(broker.port, "#")
    key = mqtt.VenueKey(KEY)

    async def run():
        async with venue(*configs) as (a, b, c):
            for token in ("T-0001", "T-0002", "T-0003"):
                assert (await a.scan(token)).verdict is Verdict.ADMIT
            assert (await a.scan("T-0001")).reason is Reason.ALREADY_USED  # a deny is nobody inside
            assert (await b.scan("T-0004")).verdict is Verdict.ADMIT
            assert (await b.scan("T-0005", passes=False)).verdict is Verdict.ADMIT  # admitted, nobody went in
            assert (await b.scan("T-0006")).verdict is Verdict.ADMIT
            for token in ("T-0001", "T-0004"):
                assert (await c.scan(token)).verdict is Verdict.ADMIT
            await agree((a, b, c), 3)
            assert [lane.occ.own() for lane in (a, b, c)] == [
                Counts(a.occ.period, 3, 0), Counts(a.occ.period, 2, 0), Counts(a.occ.period, 0, 2)]
            assert [lane.stored() for lane in (a, b, c)] == [(3, 0), (2, 0), (0, 2)]

            # Where people look: the status line, the retained status, Home Assistant.
            daemon = Daemon(a.config)
            daemon.parts = a.parts
            assert daemon._status(0) == f"local, 0 queued, last {a.parts.gate.last_scan}, 3 inside of 10"

            def status(lane: str, **want):
                def match(topic, payload, _retain):
                    if topic != f"{prefix}/status/{lane}":
                        return False
                    body = key.open(payload)
                    return all(body.get(k) == v for k, v in want.items())
                return match

            watch.wait_for(status("exit-c", inside=3, capacity=10, entries=0, exits=2))
            watch.wait_for(status("entry-b", inside=3, entries=2, exits=0))
            for lane, field in (("entry-a", "inside"), ("entry-a", "entries"), ("exit-c", "exits")):
                _, payload, _ = watch.wait_for(lambda t, p, r, lane=lane, field=field:
                                               t == f"{tmp_path.name}/ha/sensor/{lane}/{field}/config")
                sensor = json.loads(payload)
                assert sensor["state_topic"] == f"{prefix}/status/{lane}"
                assert sensor["value_template"] == f"{{{{ value_json.{field} }}}}"
                assert sensor["unit_of_measurement"] == "people"

    try:
        asyncio.run(run())
    finally:
        watch.close()
    # gated doctor reads the same from entry-a's store: its own counts, the others' as last heard
    store = StoreThread(configs[0].store.path)
    try:
        check = asyncio.run(doctor._occupancy(configs[0], store, time.time()))
    finally:
        store.close()
    assert (check.name, check.status, check.detail) == (
        "occupancy", "OK", "3 inside of 10 (venue, 3 lanes as last heard); this lane 3 in, 0 out since 05:00")


def test_after_a_broker_outage_the_totals_agree_within_5_s_and_equal_the_stored_records(tmp_path,
                                                                                       own_broker):  # noqa: F811
    b = own_broker()
    configs = three(tmp_path, b.port)

    async def run():
        async with venue(*configs) as lanes:
            a, lb, c = lanes
            await a.scan("T-0010")
            await lb.scan("T-0011")
            await agree(lanes, 2)
            b.kill()
            await asyncio.to_thread(wait_until, lambda: not any(lane.link.connected for lane in lanes), 5,
                                    "the lanes to notice the broker is gone")
            for lane, token in [(a, "T-0020"), (lb, "T-0021"), (a, "T-0022"), (lb, "T-0023"), (c, "T-0010"),
                                (c, "T-0020"), (a, "T-0024")]:
                assert (await lane.scan(token)).verdict is Verdict.ADMIT, (lane.name, token)
            assert a.occ.venue_total() == 5 and lb.occ.venue_total() == 4 and c.occ.venue_total() == 0
            b.start()
            took = await agree(lanes, 5, timeout=5.0)
            stored = [lane.stored() for lane in lanes]
            assert sum(e for e, _ in stored) - sum(x for _, x in stored) == 5
            assert {lane.name: (lane.occ.own().entries, lane.occ.own().exits) for lane in lanes} == \
                dict(zip(("entry-a", "entry-b", "exit-c"), stored, strict=True))
            return took

    took = asyncio.run(run())
    print(f"\nbroker back: the three lanes agreed {took:.2f} s later")


def test_at_capacity_every_entry_lane_denies_full_and_one_exit_lets_the_next_one_in(tmp_path, broker):  # noqa: F811
    configs = three(tmp_path, broker.port, capacity=3)

    async def run():
        async with venue(*configs) as (a, b, c):
            assert (await a.scan("T-0030")).admitted and (await a.scan("T-0031")).admitted
            assert (await b.scan("T-0032")).admitted
            await agree((a, b, c), 3)
            for lane, token in ((a, "T-0033"), (b, "T-0034"), (a, "T-0034")):
                d = await lane.scan(token)
                assert (d.verdict, d.reason) == (Verdict.DENY, Reason.FULL), (lane.name, d)
                assert d.detail == "venue full: 3 inside, capacity 3"
            assert (await a.scan("T-0030")).reason is Reason.ALREADY_USED  # a refused ticket keeps its reason
            assert (await c.scan("T-0030")).admitted  # one leaves
            await agree((a, b, c), 2)
            assert (await b.scan("T-0034")).admitted  # denied `full` before, not used up by it
            await agree((a, b, c), 3)
            assert (await a.scan("T-0033")).reason is Reason.FULL
            rows = a.parts.store.call_sync(lambda s: list(s.db.query(
                "SELECT reason, upload FROM scans WHERE reason = 'full'")))
            assert rows == [{"reason": "full", "upload": "none"}] * 3  # never a check-in, never uploaded

    asyncio.run(run())


def test_a_restart_keeps_the_counts_and_the_other_lanes_as_last_heard_even_without_the_broker(
        tmp_path, own_broker):  # noqa: F811
    b = own_broker()
    configs = three(tmp_path, b.port, capacity=4)

    async def run():
        async with venue(*configs) as lanes:
            a, lb, c = lanes
            for token in ("T-0040", "T-0041"):
                await a.scan(token)
            await lb.scan("T-0042")
            await c.scan("T-0040")
            await agree(lanes, 2)
        b.kill()
        async with venue(configs[0], ready=False) as (a,):  # entry-a alone, and no broker to hear from
            assert a.occ.own() == Counts(a.occ.period, 2, 0)
            assert a.occ.venue_total() == 2 and a.occ.lane_counts()["entry-b"].entries == 1
            # 2 places left, 2 entry lanes it cannot hear: it takes its share, 1, and no more
            assert (await a.scan("T-0043")).admitted
            d = await a.scan("T-0044")
            assert d.reason is Reason.FULL and d.detail.startswith("this lane's share of the room is used")

    asyncio.run(run())


def test_reset_at_starts_the_counts_again(tmp_path):
    config = lane_config(tmp_path, "entry-a", None)

    async def run(config, scans):
        async with venue(config) as (a,):
            for token, wall in scans:
                await a.parts.gate.handle(replace(Scan(token=token, reader="front"), wall=wall))
            return a.occ.own(), a.occ.venue_total()

    now = time.time()
    first, total = asyncio.run(run(config, [("T-0050", now - 7200), ("T-0051", now - 7200), ("T-0052", now)]))
    assert (first.entries, total) == (3, 3)
    # The same store with the reset an hour ago: only the scan since then counts.
    hour_ago = time.strftime("%H:%M", time.localtime(now - 3600))
    again = lane_config(tmp_path, "entry-a", None, reset_at=hour_ago)
    second, total = asyncio.run(run(again, []))
    assert (second.entries, second.exits, total) == (1, 0, 1)


def test_without_mqtt_a_single_lane_counts_and_stops_at_capacity(tmp_path):
    config = lane_config(tmp_path, "entry-a", None, capacity=1)

    async def run():
        async with venue(config) as (a,):
            assert (await a.scan("T-0060")).admitted
            return await a.scan("T-0061")

    assert asyncio.run(run()).reason is Reason.FULL


def test_a_person_admitted_unrecorded_still_counts_inside(tmp_path, monkeypatch):
    """[store] on_error = "admit" with a store that cannot record: the people let in are inside all the same."""
    from gated.errors import StoreError

    config = lane_config(tmp_path, "entry-a", None, capacity=1)
    config.store["on_error"] = "admit"

    def refuse(*args, **kwargs):
        raise StoreError("disk full")

    async def run():
        async with venue(config) as (a,):
            monkeypatch.setattr(Store, "record", refuse)
            assert (await a.scan("T-0060")).admitted
            return a.occ.venue_total(), await a.scan("T-0061")

    inside, second = asyncio.run(run())
    assert inside == 1 and second.reason is Reason.FULL
