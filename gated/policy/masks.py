"""Barcode masks: one grammar for the local backend, Entry's barcodeMasks and installers' masks.

Grammar, matched against the whole token:
    #   exactly one digit 0-9
    ?   exactly one character
    *   any run of characters, including none
    anything else is literal (case-sensitive)

Examples: "390##########" matches "3901234567890"; "VIP-*" matches "VIP-0042";
"??-####" matches "AB-1234".

Masks come from servers, so they are hostile input: matching takes time linear in the token's
length for every mask (see `mask_to_regex`), never the exponential backtracking that a plain
translation of several `*` into `.*` gives Python's `re`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def _fixed(piece: str) -> str:
    """The regex of a piece without `*`: one single-character atom per character."""
    out = []
    for ch in piece:
        if ch == "#":
            out.append("[0-9]")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re.escape(ch))
    return "".join(out)


def mask_to_regex(mask: str) -> str:
    """A regex that `fullmatch`es (DOTALL) exactly the tokens the mask matches, in linear time.

    The mask is split at its runs of `*` into fixed-width pieces: first *middle… *last. The first
    is anchored at the start and the last at the end; each middle piece is taken at its leftmost
    place after the previous one, inside an atomic group so `re` never gives that place back.
    The leftmost place is always right: any later one leaves less room for what follows. So each
    piece is searched for once, and a token of n characters costs at most n × len(mask) steps.
    """
    pieces = re.split(r"\*+", mask)
    if len(pieces) == 1:
        return _fixed(mask)
    first, *middle, last = pieces
    return _fixed(first) + "".join(f"(?>.*?{_fixed(p)})" for p in middle) + ".*" + _fixed(last)


class MaskSet:
    """A compiled set of masks; `match(token)` returns the first mask that matches, or None."""

    def __init__(self, masks: Iterable[str]):
        self.masks = [m for m in masks if m]
        # One alternation with named groups is far faster than 1,000 separate regexes; it stays
        # linear because each alternative is, and `re` tries each alternative once from position 0.
        parts = [f"(?P<m{i}>{mask_to_regex(m)})" for i, m in enumerate(self.masks)]
        self._regex = re.compile("|".join(parts), re.DOTALL) if parts else None

    def __len__(self) -> int:
        return len(self.masks)

    def match(self, token: str) -> str | None:
        if self._regex is None:
            return None
        m = self._regex.fullmatch(token)
        if m is None:
            return None
        return self.masks[int(m.lastgroup[1:])]
