"""Barcode masks: the grammar, first-mask-wins, and linear time against hostile masks from servers."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gated.policy.masks import MaskSet


@contextmanager
def within(seconds: float) -> Iterator[None]:
    """Fail the block if it runs longer than `seconds`: `re` checks signals, so even a regex stops."""
    def expired(signum: int, frame: object) -> None:
        raise AssertionError(f"still matching after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def reference(mask: str, token: str) -> bool:
    """The grammar as a table: reachable[j] is True when the mask so far can match token[:j]."""
    reachable = [True] + [False] * len(token)
    for ch in mask:
        if ch == "*":
            seen = False
            for j in range(len(reachable)):
                seen = seen or reachable[j]
                reachable[j] = seen
        else:
            reachable = [False] + [
                reachable[j] and ((ch == "?" or c in "0123456789") if ch in "?#" else ch == c)
                for j, c in enumerate(token)
            ]
    return reachable[-1]


@pytest.mark.parametrize(("mask", "token", "matches"), [
    ("390##########", "3901234567890", True),
    ("390##########", "390123456789", False),  # one digit short
    ("390##########", "39012345678901", False),  # the whole token, not a prefix
    ("390##########", "390123456789A", False),
    ("390#", "390\u0663", False),  # "#" is ASCII 0-9 only, not every Unicode digit
    ("VIP-*", "VIP-0042", True),
    ("VIP-*", "VIP-", True),
    ("VIP-*", "vip-0042", False),  # case-sensitive
    ("??-####", "AB-1234", True),
    ("??-####", "A\n-1234", True),  # "?" is any character, a newline too
    ("A.B", "AxB", False),  # regex characters are literal
    ("A.B", "A.B", True),
    ("[#]", "[1]", True),
    ("*-*-*-*!", "a-b-c-d!", True),
    ("*-*-*-*!", "---!", True),
    ("*-*-*-*!", "--!", False),
    ("a*b*c", "abc", True),
    ("a*b*c", "aXbYbZc", True),
    ("a*b*c", "acb", False),
    ("**", "", True),
    ("*ab*ab*", "abab", True),
    ("*ab*ab*", "aba", False),
])
def test_grammar(mask, token, matches):
    assert (MaskSet([mask]).match(token) == mask) is matches


def test_the_first_matching_mask_is_named_and_empty_masks_are_ignored():
    masks = MaskSet(["", "VIP-####", "VIP-*", "*"])
    assert len(masks) == 3
    assert masks.match("VIP-0042") == "VIP-####"
    assert masks.match("VIP-A") == "VIP-*"
    assert masks.match("X") == "*"
    assert MaskSet([]).match("X") is None


# (mask, a 4,096-character token it almost matches, the same token changed at its end to match)
HOSTILE = [
    ("*-*-*-*!", "-" * 4096, "-" * 4095 + "!"),
    ("*-*-*-*-*-*-*-*-*-*!", "-" * 4096, "-" * 4095 + "!"),
    ("*a*a*a*a*a*a*b", "a" * 4096, "a" * 4095 + "b"),
    ("*#*#*#*#*#*#*x", "1" * 4096, "1" * 4095 + "x"),
    ("*?*?*?*?*?*?*!", "x" * 4096, "x" * 4095 + "!"),
    ("*" + "a" * 200 + "b*" + "a" * 200 + "b*", "a" * 4096, "a" * 3000 + "b" + "a" * 200 + "b" + "a" * 894),
]


@pytest.mark.parametrize(("mask", "token", "matching"), HOSTILE)
def test_a_hostile_mask_against_a_4096_character_token_is_answered_within_a_second(mask, token, matching):
    # The old translation ("*" as ".*") took 3 s at 600 characters and hours at 4,096.
    masks = MaskSet([mask])
    with within(1.0):
        assert masks.match(token) is None
        assert masks.match(matching) == mask


def test_a_thousand_masks_with_every_hostile_one_among_them_stay_fast():
    masks = MaskSet([f"{100 + i:03d}##########" for i in range(1000)] + [m for m, _, _ in HOSTILE])
    with within(2.0):
        for _, token, _ in HOSTILE:
            assert masks.match(token) is None
        assert masks.match("1071234567890") == "107##########"


# Few characters, so masks and tokens often meet; regex syntax and a lone surrogate are literals.
MASK_CHARS = st.sampled_from("ab1-#?*.([\\\udcff")
TOKEN_CHARS = st.sampled_from("ab12-\n\u0663*#?.([\\\udcff")


@settings(max_examples=1000, deadline=None)
@given(masks=st.lists(st.text(MASK_CHARS, max_size=10), min_size=1, max_size=4),
       token=st.text(TOKEN_CHARS, max_size=14))
def test_the_matcher_agrees_with_the_grammar_table(masks, token):
    expected = next((m for m in masks if m and reference(m, token)), None)
    assert MaskSet(masks).match(token) == expected
