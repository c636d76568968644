"""Barcode masks: one grammar for the local backend, Entry's barcodeMasks and installers' masks.

Grammar, matched against the whole token:
    #   exactly one digit 0-9
    ?   exactly one character
    *   any run of characters, including none
    anything else is literal (case-sensitive)

Examples: "390##########" matches "3901234567890"; "VIP-*" matches "VIP-0042";
"??-####" matches "AB-1234".
"""

from __future__ import annotations

import re
from collections.abc import Iterable


def mask_to_regex(mask: str) -> str:
    out = []
    for ch in mask:
        if ch == "#":
            out.append("[0-9]")
        elif ch == "?":
            out.append(".")
        elif ch == "*":
            out.append(".*")
        else:
            out.append(re.escape(ch))
    return "".join(out)


class MaskSet:
    """A compiled set of masks; `match(token)` returns the first mask that matches, or None."""

    def __init__(self, masks: Iterable[str]):
        self.masks = [m for m in masks if m]
        # One alternation with named groups is far faster than 1,000 separate regexes.
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
