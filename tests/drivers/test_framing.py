"""Serial framing: bytes arrive in any pieces; frames come out whole, bounded, and decoded or denied."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gated.drivers.framing import Frame, Framer, decode, terminator_bytes
from gated.drivers.serial_qr import frame_to_scan
from gated.model import InputKind
from gated.tokens import Malformed, normalise


def frames(framer: Framer, *chunks: bytes, t: float = 0.0, step: float = 0.001) -> list:
    out = []
    for chunk in chunks:
        out += framer.feed(chunk, t)
        t += step
    return out


@pytest.mark.parametrize("terminator,wire", [
    ("line", b"AAA\rBBB\nCCC\r\nDDD\r\n"),
    ("cr", b"AAA\rBBB\rCCC\rDDD\r"),
    ("lf", b"AAA\nBBB\nCCC\nDDD\n"),
    ("crlf", b"AAA\r\nBBB\r\nCCC\r\nDDD\r\n"),
    ("\u0003", b"AAA\x03BBB\x03CCC\x03DDD\x03"),
    ("#END#", b"AAA#END#BBB#END#CCC#END#DDD#END#"),
])
def test_each_terminator_splits_frames_even_when_reads_cut_through_it(terminator, wire):
    whole = [f.data for f in frames(Framer(terminator), wire)]
    bytewise = [f.data for f in frames(Framer(terminator), *(wire[i:i + 1] for i in range(len(wire))))]
    assert whole == bytewise == [b"AAA", b"BBB", b"CCC", b"DDD"]


def test_default_line_framing_does_not_make_an_empty_frame_of_a_crlf_split_across_reads():
    out = frames(Framer("line"), b"T-1\r", b"\nT-2\r", b"\n")
    assert [f.data for f in out] == [b"T-1", b"T-2"]


def test_a_frame_split_across_reads_comes_out_once_whole():
    framer = Framer("crlf")
    assert framer.feed(b"TICK", 0.0) == []
    assert [f.data for f in framer.feed(b"ET-42\r\nNE", 0.01)] == [b"TICKET-42"]
    assert framer.pending and framer.buffered == 2


def test_terminator_none_ends_frames_on_silence_only():
    framer = Framer("none", idle_seconds=0.05)
    assert framer.feed(b"QR-1\r\n", 0.0) == [] and framer.feed(b"more", 0.01) == []
    assert framer.deadline() == pytest.approx(0.06)
    assert framer.expire(0.03) == []
    out = framer.expire(0.07)
    assert [(f.data, f.by) for f in out] == [(b"QR-1\r\nmore", "idle")] and not framer.pending


def test_silence_between_two_reads_ends_the_first_frame_when_its_terminator_was_lost():
    framer = Framer("cr", idle_seconds=0.05)
    assert framer.feed(b"LOST", 0.0) == []
    out = framer.feed(b"NEXT\r", 1.0)
    assert [(f.data, f.by) for f in out] == [(b"LOST", "idle"), (b"NEXT", "terminator")]


def test_an_oversize_frame_is_cut_reported_once_and_the_next_frame_is_clean():
    framer = Framer("line", limit=16)
    out = frames(framer, b"X" * 10, b"Y" * 10, b"Z" * 1000, b"tail\r\nGOOD\r\n")
    assert [(f.data, f.cut, f.by) for f in out] == [(b"X" * 10 + b"Y" * 6, True, "limit"),
                                                    (b"GOOD", False, "terminator")]


def test_an_oversize_frame_in_a_single_read_is_cut_too():
    out = Framer("line", limit=4).feed(b"ABCDEFGH\nOK\n", 0.0)
    assert [(f.data, f.cut) for f in out] == [(b"ABCD", True), (b"OK", False)]


def test_a_multibyte_terminator_split_across_reads_ends_a_skipped_oversize_frame():
    framer = Framer("#END#", limit=4)
    out = frames(framer, b"ABCDEFG#E", b"ND#OK#END#")
    assert [(f.data, f.cut) for f in out] == [(b"ABCD", True), (b"OK", False)]


def test_64_kilobytes_of_noise_never_buffer_more_than_the_limit():
    rng = random.Random(1)
    framer = Framer("line", limit=1024)
    most = 0
    out = []
    for _ in range(64):
        out += framer.feed(rng.randbytes(1024), 0.0)
        most = max(most, framer.buffered)
    assert most <= 1024
    assert all(len(f.data) <= 1024 for f in out)


def test_a_stream_without_any_terminator_is_cut_at_the_limit_again_after_each_silence():
    framer = Framer("line", limit=100, idle_seconds=0.05)
    first = frames(framer, *([b"A" * 1000] * 64))
    assert [f.cut for f in first] == [True] and framer.buffered == 0
    assert framer.expire(1.0) == []  # the skipped rest ends quietly
    assert [f.data for f in framer.feed(b"OK\n", 1.1)] == [b"OK"]


def test_reset_forgets_half_a_frame():
    framer = Framer("line")
    framer.feed(b"HALF", 0.0)
    framer.reset()
    assert [f.data for f in framer.feed(b"WHOLE\n", 0.01)] == [b"WHOLE"]


@pytest.mark.parametrize("value,expected", [("line", None), ("cr", b"\r"), ("crlf", b"\r\n"), ("none", b""),
                                            ("\u0003", b"\x03"), ("\u00ff", b"\xff")])
def test_terminator_names_and_literal_bytes(value, expected):
    assert terminator_bytes(value) == expected


@pytest.mark.parametrize("value", ["", "€"])
def test_terminators_that_are_not_bytes_are_refused(value):
    with pytest.raises(ValueError):
        terminator_bytes(value)


def test_undecodable_bytes_become_a_token_the_pipeline_denies_malformed(caplog):
    text, clean = decode(b"T-\xff\xfe1", "utf-8")
    assert not clean and "\ufffd" in text
    assert decode("Grüße".encode("cp1252"), "cp1252") == ("Grüße", True)
    scan = frame_to_scan(Frame(b"T-\xff1", "terminator"), "qr", InputKind.QR)
    assert "not valid utf-8" in caplog.text and "T-" not in caplog.text  # the reason, not the content
    with pytest.raises(Malformed, match="not valid text"):
        normalise(scan.token)


def test_a_cut_frame_of_multibyte_text_is_still_too_long_for_the_pipeline(caplog):
    data = ("€" * 40).encode()[:40]  # 40 bytes, 13 whole characters and a broken one
    scan = frame_to_scan(Frame(data, "limit", cut=True), "qr", InputKind.QR, max_length=10)
    assert len(scan.token) > 10 and scan.raw_length == 40
    with pytest.raises(Malformed, match="more than the 10 allowed"):
        normalise(scan.token, max_length=10)
    assert "cut; denied as malformed" in caplog.text


def test_a_frame_of_control_characters_only_is_dropped_with_a_debug_line(caplog):
    caplog.set_level(logging.DEBUG, logger="gated.drivers.serial_qr")
    assert frame_to_scan(Frame(b"\x1b\x00\x1d \x7f", "terminator"), "qr", InputKind.QR) is None
    assert "control characters only; dropped" in caplog.text


PAYLOAD = st.binary(min_size=1, max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b)


@settings(max_examples=200, deadline=None)
@given(payloads=st.lists(PAYLOAD, max_size=20), ending=st.sampled_from([b"\r", b"\n", b"\r\n"]),
       cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_any_frames_cut_into_any_reads_come_out_as_sent(payloads, ending, cuts):
    wire = b"".join(p + ending for p in payloads)
    points = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    framer = Framer("line", limit=64)
    out = frames(framer, *(wire[a:b] for a, b in zip(points, points[1:], strict=False)))
    assert [f.data for f in out] == payloads


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reads=st.lists(st.tuples(st.binary(max_size=300), st.floats(0, 0.2)), max_size=30),
       terminator=st.sampled_from(["line", "cr", "lf", "crlf", "none", "\u0003", "##"]),
       limit=st.integers(1, 128), encoding=st.sampled_from(["utf-8", "latin-1", "ascii", "cp1252", "utf-16"]))
def test_fuzzed_serial_bytes_give_a_scan_or_a_logged_drop_and_never_raise(reads, terminator, limit, encoding,
                                                                           caplog):
    caplog.set_level(logging.DEBUG, logger="gated.drivers.serial_qr")
    framer = Framer(terminator, limit=limit, idle_seconds=0.1)
    t, out = 0.0, []
    for data, dt in reads:
        t += dt
        out += framer.feed(data, t)
        assert framer.buffered <= limit + 2  # never unbounded: the limit plus a split terminator
    out += framer.expire(t + 1)
    for frame in out:
        assert 0 < len(frame.data) <= limit
        caplog.clear()
        scan = frame_to_scan(frame, "qr", InputKind.QR, encoding, max_length=max(limit // 4, 1))
        if scan is None:
            assert caplog.records, "a frame was dropped without a log line"
            continue
        try:
            normalise(scan.token, max_length=max(limit // 4, 1))
        except Malformed:
            pass
        if frame.cut or "\ufffd" in scan.token:
            assert any(r.levelno == logging.WARNING for r in caplog.records)
