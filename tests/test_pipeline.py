"""End to end with fakes we do not own: scan -> decision -> SQLite row -> gpiozero mock pins."""

from __future__ import annotations

import asyncio

import pytest

from gated.daemon import build
from gated.model import InputKind, Reason, Scan, Verdict

LOCAL = """
[backend]
type = "local"
[backend.local]
tickets = "{tickets}"
masks = ["VIP-####"]
"""


@pytest.fixture
def gate_config(load_config, tickets_csv):
    def make(extra: str = "") -> object:
        csv = tickets_csv("""
            token,name,valid_from,valid_until,max_entries
            T-0001,Ada,,,
            T-0002,Bob,2099-01-01T00:00:00Z,,
            T-0003,Cy,2020-01-01T00:00:00Z,2020-12-31T00:00:00Z,
            T-0004,Twice,,,2
        """)
        return load_config(LOCAL.format(tickets=csv) + extra)
    return make


async def _run(config, *tokens, reader="front"):
    parts = await build(config)
    try:
        await parts.backend.sync(parts.store)
        out = []
        for t in tokens:
            out.append(await parts.gate.handle(Scan(token=t, reader=reader, input=InputKind.BARCODE)))
        await parts.gate.drain()
        await parts.outputs.settle()
        rows = await parts.store.call(lambda s: list(s.db.query("SELECT * FROM scans ORDER BY id")))
        pins = {n: [st.state for st in parts.outputs.pin_factory.pin(n).states] for n in (17, 22, 27)}
        relay_times = [st.timestamp for st in parts.outputs.pin_factory.pin(17).states]
        return out, rows, pins, relay_times
    finally:
        await parts.close()


def test_valid_ticket_pulses_relay_for_pulse_seconds_and_lights_green(gate_config):
    decisions, rows, pins, relay_times = asyncio.run(_run(gate_config(), "T-0001"))
    assert decisions[0].verdict is Verdict.ADMIT and decisions[0].message == "Ada"
    assert pins[17] == [False, True, False]
    assert 0.18 <= relay_times[2] <= 0.35  # held ~pulse_seconds (0.2)
    assert pins[27] == [False, True, False] and pins[22] == [False]
    assert rows[0]["verdict"] == "admit" and rows[0]["token"] == "T-0001" and rows[0]["upload"] == "none"


def test_unknown_ticket_is_denied_with_red_light_and_no_relay(gate_config):
    decisions, rows, pins, _ = asyncio.run(_run(gate_config(), "NOPE-1"))
    assert decisions[0].reason is Reason.UNKNOWN
    assert pins[17] == [False] and pins[22] == [False, True, False] and pins[27] == [False]
    assert rows[0]["verdict"] == "deny" and rows[0]["reason"] == "unknown"


@pytest.mark.parametrize("token,reason", [("T-0002", Reason.NOT_YET_VALID), ("T-0003", Reason.EXPIRED),
                                          ("VIP-1234", Reason.OK), ("VIP-12345", Reason.UNKNOWN)])
def test_time_windows_and_masks(gate_config, token, reason):
    decisions, *_ = asyncio.run(_run(gate_config(), token))
    assert decisions[0].reason is reason


def test_second_entry_is_denied_already_used_but_a_two_entry_ticket_enters_twice(gate_config):
    cfg = gate_config()
    cfg.lane["debounce_seconds"] = 0.0
    decisions, rows, *_ = asyncio.run(_run(cfg, "T-0001", "T-0001", "T-0004", "T-0004", "T-0004"))
    assert [d.reason for d in decisions] == [Reason.OK, Reason.ALREADY_USED, Reason.OK, Reason.OK,
                                             Reason.ALREADY_USED]
    assert len(rows) == 5


def test_repeat_within_debounce_window_is_one_scan(gate_config):
    decisions, rows, pins, _ = asyncio.run(_run(gate_config(), "T-0001", "T-0001"))
    assert decisions[1] is None
    assert len(rows) == 1 and pins[17] == [False, True, False]


@pytest.mark.parametrize("token", ["", "\r\n\t", "x" * 10_000, "\x00\x01\x02\x1b\x7f", "\ufffd\ufffd"])
def test_bad_input_is_denied_malformed_and_recorded(gate_config, token):
    decisions, rows, pins, _ = asyncio.run(_run(gate_config(), token))
    assert decisions[0].reason is Reason.MALFORMED
    assert rows[0]["reason"] == "malformed" and len(rows[0]["token"]) <= 256
    assert pins[17] == [False]


def test_locked_mode_denies_and_free_mode_admits_without_checking(gate_config):
    cfg = gate_config()
    cfg.lane["mode"] = "locked"
    assert asyncio.run(_run(cfg, "T-0001"))[0][0].reason is Reason.LOCKED
    cfg.lane["mode"] = "free"
    decisions, rows, pins, _ = asyncio.run(_run(cfg, "anything"))
    assert decisions[0].reason is Reason.FREE and pins[17] == [False, True, False]


def test_emergency_input_forces_free_passage_and_holds_relay(gate_config):
    cfg = gate_config("[input.emergency]\npin = 25\n")

    async def scenario():
        parts = await build(cfg)
        try:
            pin = parts.outputs.pin_factory.pin(25)
            pin.drive_low()  # contact closes: emergency active
            await asyncio.sleep(0)  # let the callback hop onto the loop
            for _ in range(100):
                if parts.decider.emergency:
                    break
                await asyncio.sleep(0.01)
            d = await parts.gate.handle(Scan(token="NOPE", reader="front"))
            held = parts.outputs.pin_factory.pin(17).state
            pin.drive_high()
            for _ in range(100):
                if not parts.decider.emergency:
                    break
                await asyncio.sleep(0.01)
            return d, held, parts.outputs.pin_factory.pin(17).state
        finally:
            await parts.close()

    decision, held, after = asyncio.run(scenario())
    assert decision.reason is Reason.EMERGENCY and held == 1 and after == 0
