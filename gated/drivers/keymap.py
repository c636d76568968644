"""Pure: a keyboard-wedge scanner's evdev key events -> the text it typed, through table-driven layouts.

A scanner does not send characters, it presses keys as if it were a keyboard of the layout it was
configured for: on a German (QWERTZ) setting the key that types "z" is the one the US layout calls
Y, and on French AZERTY a digit needs Shift. So the decoder needs the same layout as the scanner.
Tables follow the Linux (xkb) layouts `us`, `gb`, `de` and `fr`; the host is Linux, so where Windows
and xkb differ (AltGr+2 on French is a plain "~" in xkb, a dead key on Windows) xkb wins.

No I/O here: events in, finished codes out. The reader does the waiting (idle timeouts).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

from evdev import InputEvent, ecodes

# Dead keys are written in the tables as combining characters; pressed alone (or before a space)
# they give the spacing form.
SPACING = {"\u0300": "`", "\u0301": "´", "\u0302": "^", "\u0303": "~", "\u0308": "¨"}
NONE = "\x00"  # "this level types nothing" in the tables below

# Letter keys type their own letter on every layout unless a layout moves them (de Y/Z, fr A/Q/W/Z/M).
_LETTERS = {f"KEY_{c}": c.lower() + c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}

# name -> levels: plain, Shift, AltGr, Shift+AltGr (missing trailing levels type nothing).
_US = _LETTERS | {
    "KEY_GRAVE": "`~", "KEY_1": "1!", "KEY_2": "2@", "KEY_3": "3#", "KEY_4": "4$", "KEY_5": "5%",
    "KEY_6": "6^", "KEY_7": "7&", "KEY_8": "8*", "KEY_9": "9(", "KEY_0": "0)", "KEY_MINUS": "-_",
    "KEY_EQUAL": "=+", "KEY_LEFTBRACE": "[{", "KEY_RIGHTBRACE": "]}", "KEY_BACKSLASH": "\\|",
    "KEY_SEMICOLON": ";:", "KEY_APOSTROPHE": "'\"", "KEY_COMMA": ",<", "KEY_DOT": ".>", "KEY_SLASH": "/?",
    "KEY_102ND": "<>", "KEY_SPACE": "  ",
}
_UK = _US | {
    "KEY_GRAVE": "`¬||", "KEY_2": '2"²', "KEY_3": "3£³", "KEY_4": "4$€", "KEY_APOSTROPHE": "'@",
    "KEY_BACKSLASH": "#~", "KEY_102ND": "\\|||",
}
_DE = _US | {
    "KEY_GRAVE": "\u0302°", "KEY_1": "1!¹", "KEY_2": '2"²', "KEY_3": "3§³", "KEY_4": "4$¼", "KEY_5": "5%½",
    "KEY_6": "6&¬", "KEY_7": "7/{", "KEY_8": "8([", "KEY_9": "9)]", "KEY_0": "0=}", "KEY_MINUS": "ß?\\",
    "KEY_EQUAL": "\u0301\u0300", "KEY_Q": "qQ@", "KEY_E": "eE€", "KEY_Y": "zZ", "KEY_LEFTBRACE": "üÜ",
    "KEY_RIGHTBRACE": "+*~", "KEY_SEMICOLON": "öÖ", "KEY_APOSTROPHE": "äÄ", "KEY_BACKSLASH": "#'",
    "KEY_102ND": "<>|", "KEY_Z": "yY", "KEY_M": "mMµ", "KEY_COMMA": ",;", "KEY_DOT": ".:", "KEY_SLASH": "-_",
}
_FR = _US | {
    "KEY_GRAVE": "²", "KEY_1": "&1", "KEY_2": "é2~", "KEY_3": '"3#', "KEY_4": "'4{", "KEY_5": "(5[",
    "KEY_6": "-6|", "KEY_7": "è7`", "KEY_8": "_8\\", "KEY_9": "ç9^", "KEY_0": "à0@", "KEY_MINUS": ")°]",
    "KEY_EQUAL": "=+}", "KEY_Q": "aA", "KEY_W": "zZ", "KEY_E": "eE€", "KEY_LEFTBRACE": "\u0302\u0308",
    "KEY_RIGHTBRACE": "$£¤", "KEY_A": "qQ", "KEY_SEMICOLON": "mM", "KEY_APOSTROPHE": "ù%",
    "KEY_BACKSLASH": "*µ", "KEY_102ND": "<>", "KEY_Z": "wW", "KEY_M": ",?", "KEY_COMMA": ";.",
    "KEY_DOT": ":/", "KEY_SLASH": "!§",
}
# The keypad types the same on every layout (as if Num Lock were on: a scanner that uses the keypad
# means digits), except the decimal key, which follows the country.
_KEYPAD = {f"KEY_KP{d}": d for d in "0123456789"} | {
    "KEY_KPDOT": ".", "KEY_KPSLASH": "/", "KEY_KPASTERISK": "*", "KEY_KPMINUS": "-", "KEY_KPPLUS": "+",
    "KEY_KPEQUAL": "=", "KEY_KPCOMMA": ",",
}


@dataclass(frozen=True)
class Layout:
    """One keyboard layout: key code -> the text of each level (plain, Shift, AltGr, Shift+AltGr)."""

    name: str
    keys: dict[int, tuple[str, str, str, str]]
    altgr: bool  # False: right Alt is plain Alt (us), as in xkb
    keypad: dict[int, str] = field(default_factory=dict)


def _layout(name: str, table: dict[str, str], *, altgr: bool = True, keypad: dict[str, str] | None = None) -> Layout:
    keys = {ecodes.ecodes[key]: tuple((levels + NONE * 4)[:4]) for key, levels in table.items()}
    pad = {ecodes.ecodes[k]: v for k, v in (_KEYPAD | (keypad or {})).items()}
    return Layout(name, keys, altgr, pad)  # type: ignore[arg-type]


LAYOUTS: dict[str, Layout] = {
    "us": _layout("us", _US, altgr=False),
    "uk": _layout("uk", _UK),
    "de": _layout("de", _DE, keypad={"KEY_KPDOT": ","}),
    "fr": _layout("fr", _FR),
}

TERMINATORS = ("enter", "tab", "none")

_SHIFT = {ecodes.KEY_LEFTSHIFT, ecodes.KEY_RIGHTSHIFT}
_CTRL = {ecodes.KEY_LEFTCTRL, ecodes.KEY_RIGHTCTRL}
_ENTER = {ecodes.KEY_ENTER, ecodes.KEY_KPENTER}
_KP_DIGITS = {getattr(ecodes, f"KEY_KP{d}"): d for d in "0123456789"}
_MAX_ALT_DIGITS = 5  # Alt+numpad codes are at most 4 digits ("0252"); more is noise


@dataclass(frozen=True)
class Code:
    """One finished code.

    `text` holds at most max_length + 1 characters: a code cut short stays one character too long,
    so the pipeline's length check denies it `malformed` instead of deciding on a fragment.
    """

    text: str
    length: int  # characters typed, including any cut off
    by: str  # "enter" | "tab" | "idle": what ended it
    cut: bool = False  # longer than max_length


class KeyDecoder:
    """Turns key events into codes for one device; keeps Shift, Caps Lock, AltGr and dead-key state.

    Rules, as a scanner relies on them:
      - only key-down events type; releases only end modifiers, and auto-repeat (value 2) is ignored,
        because a scanner never holds a key: a repeat is an artefact of a stalled host, not a character;
      - Caps Lock inverts Shift on alphabetic keys only (keys whose Shift level is the capital of the
        plain level), as xkb's ALPHABETIC key type does; digits and symbols ignore it;
      - Ctrl+key types the ASCII control character (Ctrl+] is GS, the GS1 separator some scanners send);
      - Alt held while keypad digits are typed enters a character by number, as scanners in
        "Alt mode" do to be layout-independent: a leading 0 means Windows-1252, otherwise code page 437;
      - a key the layout has no character for at the active level types U+FFFD, so the code is denied
        `malformed` rather than decided with a character missing; keys that type nothing anywhere
        (F-keys, arrows, Esc) are ignored;
      - terminator "enter": Enter ends the code, Tab is a character; "tab": Tab or Enter ends it;
        "none": only `idle_seconds` of silence ends it, and Enter is a newline inside it (multi-line
        codes). In every mode, a code left idle that long ends too (its terminator was lost).
    """

    def __init__(self, layout: str | Layout = "us", *, terminator: str = "enter", idle_seconds: float = 0.2,
                 max_length: int = 4096):
        if terminator not in TERMINATORS:
            raise ValueError(f"terminator must be one of {TERMINATORS}, not {terminator!r}")
        self.layout = LAYOUTS[layout] if isinstance(layout, str) else layout
        self.terminator = terminator
        self.idle_seconds = idle_seconds
        self.max_length = max_length
        self.reset()

    def reset(self) -> None:
        """Forget everything: held keys, Caps Lock, a half-typed code (used when a device is reopened)."""
        self._shift: set[int] = set()
        self._ctrl: set[int] = set()
        self._alt: set[int] = set()
        self._altgr = False
        self._caps = False
        self._dead = ""
        self._alt_digits = ""
        self._chars: list[str] = []
        self._count = 0
        self._last: float | None = None

    @property
    def pending(self) -> bool:
        """A code has begun and is not finished yet."""
        return self._count > 0 or bool(self._dead) or bool(self._alt_digits)

    def feed(self, event: InputEvent) -> list[Code]:
        """Take one event; return the codes it finished (usually none, at most two)."""
        if event.type != ecodes.EV_KEY:
            return []
        out: list[Code] = []
        now = event.sec + event.usec / 1_000_000
        # The kernel stamps each event, so a gap is seen even when the events are read in one batch
        # after a stall. A clock stepped backwards gives a negative gap: no gap.
        if self._last is not None and self.pending and now - self._last > self.idle_seconds:
            self._finish("idle", out)
        self._last = now
        self._key(event.code, event.value, out)
        return out

    def flush(self) -> Code | None:
        """End the code in progress because the device fell silent; None if there is none."""
        out: list[Code] = []
        self._finish("idle", out)
        return out[0] if out else None

    # --- internals ---------------------------------------------------------------------------

    def _key(self, code: int, value: int, out: list[Code]) -> None:
        if value == 2:
            return
        down = value == 1
        if code in _SHIFT:
            self._hold(self._shift, code, down)
        elif code in _CTRL:
            self._hold(self._ctrl, code, down)
        elif code == ecodes.KEY_RIGHTALT and self.layout.altgr:
            self._altgr = down
        elif code in (ecodes.KEY_LEFTALT, ecodes.KEY_RIGHTALT):
            self._hold(self._alt, code, down)
            if not down and not self._alt:
                self._alt_code()
        elif not down:
            return
        elif code == ecodes.KEY_CAPSLOCK:
            self._caps = not self._caps
        elif self._alt:
            if code in _KP_DIGITS and len(self._alt_digits) <= _MAX_ALT_DIGITS:
                self._alt_digits += _KP_DIGITS[code]
            # Alt with any other key is a shortcut, not text.
        elif code in _ENTER:
            if self.terminator == "none":
                self._type("\n")
            else:
                self._finish("enter", out)
        elif code == ecodes.KEY_TAB:
            if self.terminator == "tab":
                self._finish("tab", out)
            else:
                self._type("\t")
        elif code in self.layout.keypad:
            self._type(self.layout.keypad[code])
        elif code in self.layout.keys:
            self._type(self._char(code))

    @staticmethod
    def _hold(held: set[int], code: int, down: bool) -> None:
        if down:
            held.add(code)
        else:
            held.discard(code)

    def _char(self, code: int) -> str:
        plain, shifted, level3, level4 = self.layout.keys[code]
        shift = bool(self._shift)
        if self._altgr:
            ch = level4 if shift else level3
        else:
            if self._caps and plain.isalpha() and shifted == plain.upper() != plain:
                shift = not shift
            ch = shifted if shift else plain
        if ch == NONE:
            return "\ufffd"
        if self._ctrl:
            upper = ch.upper()
            return chr(ord(upper) & 0x1F) if len(upper) == 1 and "@" <= upper <= "_" else ""
        return ch

    def _type(self, ch: str) -> None:
        if not ch:
            return
        if ch in SPACING:  # a dead key: wait for the next character
            if self._dead:
                previous, self._dead = self._dead, ""
                self._put(SPACING[previous])
                if previous == ch:  # the same dead key twice types it once, as in xkb
                    return
            self._dead = ch
            return
        if self._dead:
            dead, self._dead = self._dead, ""
            if ch == " ":
                self._put(SPACING[dead])
                return
            composed = unicodedata.normalize("NFC", ch + dead)
            if len(composed) == 1:
                self._put(composed)
                return
            self._put(SPACING[dead])
        self._put(ch)

    def _alt_code(self) -> None:
        digits, self._alt_digits = self._alt_digits, ""
        if not digits:
            return
        if len(digits) > 4:
            self._type("\ufffd")
            return
        number = int(digits) % 256
        # Undefined Windows-1252 bytes (0x81, 0x8D, ...) come out as U+FFFD: malformed, not guessed.
        self._type(bytes([number]).decode("cp1252" if digits.startswith("0") else "cp437", errors="replace"))

    def _put(self, ch: str) -> None:
        self._count += 1
        if len(self._chars) <= self.max_length:  # keep one extra so a cut code stays too long
            self._chars.append(ch)

    def _finish(self, by: str, out: list[Code]) -> None:
        if self._dead:
            self._put(SPACING[self._dead])
            self._dead = ""
        self._alt_digits = ""
        if self._count:
            out.append(Code("".join(self._chars), self._count, by, self._count > self.max_length))
        self._chars = []
        self._count = 0


def keystrokes(text: str, layout: str | Layout = "us", *, start: float = 1_700_000_000.0,
               gap: float = 0.002) -> list[InputEvent]:
    """The key events a scanner set to `layout` sends to type `text` (without a terminator).

    For the opt-in rig test (fed to evdev.UInput) and the decoder benchmark. Raises ValueError for
    a character the layout cannot type.
    """
    lay = LAYOUTS[layout] if isinstance(layout, str) else layout
    index = _reverse(lay)
    events: list[InputEvent] = []
    t = start

    def emit(code: int, value: int) -> None:
        nonlocal t
        sec, usec = int(t), int(round((t % 1) * 1_000_000)) % 1_000_000
        events.append(InputEvent(sec, usec, ecodes.EV_KEY, code, value))
        events.append(InputEvent(sec, usec, ecodes.EV_SYN, ecodes.SYN_REPORT, 0))
        t += gap / 2

    def press(code: int, level: int) -> None:
        mods = ([ecodes.KEY_LEFTSHIFT] if level in (1, 3) else []) + ([ecodes.KEY_RIGHTALT] if level >= 2 else [])
        for m in mods:
            emit(m, 1)
        emit(code, 1)
        emit(code, 0)
        for m in reversed(mods):
            emit(m, 0)

    for ch in text:
        if ch in index:
            press(*index[ch])
            continue
        decomposed = unicodedata.normalize("NFD", ch)
        base, accent = decomposed[:1], decomposed[1:]
        if len(accent) == 1 and accent in index and base in index:
            press(*index[accent])
            press(*index[base])
        elif ch in SPACING.values() and _dead_for(ch) in index and " " in index:
            press(*index[_dead_for(ch)])
            press(*index[" "])
        else:
            raise ValueError(f"layout {lay.name!r} cannot type {ch!r}")
    return events


def _dead_for(spacing: str) -> str:
    return next((k for k, v in SPACING.items() if v == spacing), "")


_REVERSE: dict[str, dict[str, tuple[int, int]]] = {}


def _reverse(lay: Layout) -> dict[str, tuple[int, int]]:
    """char -> (key code, level), preferring the lowest level, main keys before the keypad."""
    if lay.name not in _REVERSE:
        index: dict[str, tuple[int, int]] = {"\n": (ecodes.KEY_ENTER, 0), "\t": (ecodes.KEY_TAB, 0)}
        for level in range(4):
            if level >= 2 and not lay.altgr:
                break
            for code, levels in sorted(lay.keys.items()):
                ch = levels[level]
                if ch != NONE and ch not in index:
                    index[ch] = (code, level)
        for code, ch in lay.keypad.items():
            index.setdefault(ch, (code, 0))
        _REVERSE[lay.name] = index
    return _REVERSE[lay.name]
