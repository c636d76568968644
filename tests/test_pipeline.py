"""End to end with fakes we do not own: scan -> decision -> SQLite row -> gpiozero mock pins."""

from __future__ import annotations

import asyncio
import io
import logging
import re

import pytest
from gpiozero.exc import GPIOZeroError

from gated import logs
from gated.daemon import build
from gated.drivers.gpio import Outputs
from gated.model import InputKind, Reason, Scan, Source, Verdict, admit
from gated.store import Store

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


# --- hostile input (issue #17) -------------------------------------------------------------


def test_a_control_character_inside_a_code_is_refused_while_scanner_framing_is_still_removed(gate_config):
    cfg = gate_config()
    cfg.lane["debounce_seconds"] = 0.0
    decisions, rows, pins, _ = asyncio.run(_run(cfg, "T-\x000001", "\x02]C0T-0001\x03\r\n"))
    assert decisions[0].reason is Reason.MALFORMED  # not admitted as T-0001
    assert "U+0000" in decisions[0].detail and rows[0]["token"] == "T-\\x000001"
    assert decisions[1].reason is Reason.OK and rows[1]["token"] == "T-0001"  # STX, AIM id, ETX, CRLF removed
    assert pins[17] == [False, True, False]  # one relay pulse: the framed T-0001 only


def test_bytes_that_are_not_text_are_denied_malformed_and_stored_as_printable_ascii(gate_config):
    # What a reader decoding with surrogateescape hands over for b"AB\xff\xfeCD".
    decisions, rows, pins, _ = asyncio.run(_run(gate_config(), "AB\udcff\udcfeCD"))
    assert decisions[0].reason is Reason.MALFORMED and rows[0]["reason"] == "malformed"
    assert rows[0]["token"] == "AB\\udcff\\udcfeCD" and rows[0]["token"].isascii()
    assert pins[17] == [False]


async def _run_with(config, decide, *tokens):
    """_run, with the decider's answers replaced by `decide(scan)` (None: the real decider)."""
    parts = await build(config)
    real = parts.decider.decide

    async def patched(scan, mode, commit):
        return decide(scan) or await real(scan, mode, commit)

    parts.decider.decide = patched
    try:
        await parts.backend.sync(parts.store)
        out = [await parts.gate.handle(Scan(token=t, reader="front")) for t in tokens]
        await parts.gate.drain()
        await parts.outputs.settle()
        rows = await parts.store.call(lambda s: list(s.db.query("SELECT * FROM scans ORDER BY id")))
        return out, rows, [st.state for st in parts.outputs.pin_factory.pin(17).states]
    finally:
        await parts.close()


def test_an_answer_the_store_cannot_hold_is_a_recorded_deny_error_and_the_next_scan_is_handled(gate_config):
    cfg = gate_config()
    cfg.lane["debounce_seconds"] = 0.0

    def decide(scan):  # a backend's admit carrying a lone surrogate (case 2 of issue #17)
        if scan.token == "NOPE-1":
            return admit(Reason.OK, Source.ONLINE, backend="local", message="Ada \udcff")
        return None

    decisions, rows, relay = asyncio.run(_run_with(cfg, decide, "NOPE-1", "T-0001"))
    assert (decisions[0].verdict, decisions[0].reason) == (Verdict.DENY, Reason.ERROR)
    assert [(r["token"], r["verdict"], r["reason"]) for r in rows] == [("NOPE-1", "deny", "error"),
                                                                       ("T-0001", "admit", "ok")]
    assert relay == [False, True, False]  # the relay moved for T-0001 only


def test_when_even_the_record_fails_the_scan_is_a_logged_deny_and_the_relay_stays_shut(gate_config, monkeypatch,
                                                                                       caplog):
    def overflow(*args, **kw):
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    monkeypatch.setattr(Store, "record", overflow)
    caplog.set_level(logging.INFO, "gated")
    decisions, rows, relay = asyncio.run(_run_with(gate_config(), lambda scan: None, "T-0001"))
    assert (decisions[0].verdict, decisions[0].reason) == (Verdict.DENY, Reason.ERROR)
    assert rows == [] and relay == [False]
    lines = [r for r in caplog.records if getattr(r, "GATED_EVENT", "") == "scan"]
    assert len(lines) == 1 and " DENY error " in lines[0].getMessage()
    assert any("not recorded" in r.getMessage() for r in caplog.records)


def test_a_server_message_cannot_forge_a_scan_line_or_reach_the_terminal_raw(gate_config, caplog):
    forged = "Mallory\n19:10:00 lane-1 ADMIT ok online pretix …0001 3ms\x1b[2J\u202e"

    def decide(scan):
        return admit(Reason.OK, Source.ONLINE, backend="local", message=forged, detail="proxy says \r\x9b31m")

    terminal = io.StringIO()  # what `gated run` in a terminal prints: stderr through logs.PlainFormatter
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logs.PlainFormatter())
    caplog.set_level(logging.INFO, "gated")
    logging.getLogger("gated").addHandler(handler)
    try:
        _, rows, _ = asyncio.run(_run_with(gate_config(), decide, "NOPE-1"))
    finally:
        logging.getLogger("gated").removeHandler(handler)
    err = terminal.getvalue()
    scan_lines = [line for line in err.splitlines() if re.match(r"\S+ lane-1 (ADMIT|DENY) ", line)]
    assert len(scan_lines) == 1 and scan_lines[0].count("\\x0a19:10:00 lane-1 ADMIT") == 1
    assert not re.search("[\x1b\r\x9b\u202e]", err)
    assert rows[0]["message"] == forged  # the record keeps what the server said; only the log escapes it


def test_an_admit_whose_relay_fails_is_a_deny_and_leaves_the_ticket_unused(gate_config, monkeypatch):
    """A relay that cannot be switched lets nobody through: the admit already recorded becomes "nobody
    passed", so the visitor's next try (at this lane or another) is not refused as already used."""
    cfg = gate_config()
    cfg.lane["debounce_seconds"] = 0.0
    calls = []

    def broken_relay(self):
        calls.append(1)
        if len(calls) == 1:
            raise GPIOZeroError("relay pin write failed")
        return None

    monkeypatch.setattr(Outputs, "release", broken_relay)
    decisions, rows, _ = asyncio.run(_run_with(cfg, lambda scan: None, "T-0001", "T-0001"))
    assert [(d.verdict, d.reason) for d in decisions] == [(Verdict.DENY, Reason.ERROR), (Verdict.ADMIT, Reason.OK)]
    assert [(r["verdict"], r["passed"]) for r in rows] == [("admit", 0), ("admit", None)]


@pytest.mark.parametrize("token", ["TICKET 01", "TICKET\xa001", "TICKET\u300001", "TICKET\u202801", "TICKET0\t1",
                                   "0\xa0\xa00"])
def test_a_tokens_redacted_tail_is_one_word_of_the_scan_line(token):
    # A QR code may hold any text: the line's token field must not split it into two words.
    from gated.tokens import redact

    shown = redact(token)
    assert shown.startswith("…") and len(shown.split()) == 1 and shown.isprintable()
