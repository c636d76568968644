"""The stdin reader's line source: bytes in, one text line per code, bounded, whatever the bytes are."""

from __future__ import annotations

import io

from gated.drivers.stdin import read_lines


def test_a_line_that_is_not_text_is_one_line_and_reading_goes_on():
    lines = list(read_lines(io.BytesIO(b"T-0001\nAB\xff\xfeCD\nT-0002")))
    assert lines == ["T-0001\n", "AB\udcff\udcfeCD\n", "T-0002"]  # the bad bytes kept, for `malformed`


def test_an_endless_line_is_passed_on_cut_once_and_the_next_line_is_read_whole():
    lines = list(read_lines(io.BytesIO(b"X" * 100 + b"\nT-0001\n"), limit=16))
    assert lines == ["X" * 16, "T-0001\n"]  # the cut start is denied as oversize; the rest is skipped
