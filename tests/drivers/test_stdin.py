"""The stdin reader's line source: bytes in, one text line per code, bounded, whatever the bytes are."""

from __future__ import annotations

import io

from gated.drivers.stdin import read_lines


def test_a_line_that_is_not_text_is_one_line_and_reading_goes_on():
    lines = list(read_lines(io.BytesIO(b"T-0001\nAB\xff\xfeCD\nT-0002")))
    assert lines == ["T-0001\n", "AB\udcff\udcfeCD\n", "T-0002"]  # the bad bytes kept, for `malformed`


def test_an_endless_line_is_passed_on_cut_once_and_the_next_line_is_read_whole():
    lines = list(read_lines(io.BytesIO(b"X" * 100 + b"\nT-0001\n"), limit=16))
    assert lines == ["X" * 17, "T-0001\n"]  # the cut start is denied as oversize; the rest is skipped


def test_a_cut_line_is_always_too_long_to_be_a_code_even_when_its_characters_are_few():
    # 2-byte characters: the 16 bytes kept are 8 characters, which a max_length of 8+ would take for a
    # whole code; the cut start must still be refused, as serial and hid readers refuse theirs.
    lines = list(read_lines(io.BytesIO("é".encode() * 40 + b"\nT-0001\n"), limit=16))
    assert len(lines[0]) > 16 and lines[0].startswith("é" * 8) and lines[1:] == ["T-0001\n"]


def test_no_reader_max_length_fits_a_line_cut_at_the_stdin_limit():
    from gated.config import READER_COMMON
    from gated.drivers.stdin import MAX_LINE_BYTES

    assert READER_COMMON["max_length"].maximum <= MAX_LINE_BYTES


def test_a_line_of_exactly_the_limit_is_read_whole():
    lines = list(read_lines(io.BytesIO(b"X" * 16 + b"\nT-0001\n"), limit=16))
    assert lines == ["X" * 16 + "\n", "T-0001\n"]  # a code of max_length = 65536 characters is allowed
