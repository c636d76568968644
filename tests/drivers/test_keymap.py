"""The keyboard-wedge decoder: the same keys mean different text per layout, and scanners rely on it."""

from __future__ import annotations

import logging
import string

import pytest
from evdev import InputEvent, ecodes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gated.drivers.hid import code_to_scan
from gated.drivers.keymap import LAYOUTS, KeyDecoder, keystrokes
from gated.model import InputKind, Scan
from gated.tokens import Malformed, normalise

T0 = 1_700_000_000.0


def typed(events, layout="us", **kw) -> list:
    decoder = KeyDecoder(layout, **kw)
    codes = [c for e in events for c in decoder.feed(e)]
    if (last := decoder.flush()) is not None:
        codes.append(last)
    return codes


def text(events, layout="us", **kw) -> str:
    return "|".join(c.text for c in typed(events, layout, **kw))


# (layout, chords, expected): what a person with that keyboard would see printed on the keys.
FACTS = [
    ("us", [("Y",), ("LEFTSHIFT", "2"), ("LEFTSHIFT", "APOSTROPHE"), ("102ND",), ("BACKSLASH",)], 'y@"<\\'),
    ("us", [("LEFTSHIFT", "SEMICOLON"), ("SLASH",), ("SLASH",), ("LEFTSHIFT", "MINUS")], "://_"),
    ("uk", [("LEFTSHIFT", "2"), ("LEFTSHIFT", "3"), ("LEFTSHIFT", "APOSTROPHE"), ("BACKSLASH",),
            ("LEFTSHIFT", "BACKSLASH"), ("102ND",), ("RIGHTALT", "4")], '"£@#~\\€'),
    ("de", [("Y",), ("Z",), ("LEFTSHIFT", "7"), ("LEFTSHIFT", "0"), ("SLASH",), ("LEFTSHIFT", "SLASH")], "zy/=-_"),
    ("de", [("RIGHTALT", "Q"), ("RIGHTALT", "7"), ("RIGHTALT", "8"), ("RIGHTALT", "9"), ("RIGHTALT", "0"),
            ("RIGHTALT", "MINUS"), ("RIGHTALT", "RIGHTBRACE"), ("RIGHTALT", "102ND"), ("RIGHTALT", "E")], "@{[]}\\~|€"),
    ("de", [("SEMICOLON",), ("LEFTSHIFT", "APOSTROPHE"), ("MINUS",), ("LEFTSHIFT", "3"), ("KPDOT",)], "öÄß§,"),
    ("fr", [("Q",), ("A",), ("W",), ("Z",), ("SEMICOLON",), ("M",)], "aqzwm,"),
    ("fr", [("1",), ("LEFTSHIFT", "1"), ("2",), ("LEFTSHIFT", "2"), ("7",), ("9",), ("0",)], "&1é2èçà"),
    ("fr", [("RIGHTALT", "0"), ("RIGHTALT", "3"), ("RIGHTALT", "E"), ("RIGHTALT", "8"), ("RIGHTALT", "4"),
            ("RIGHTALT", "EQUAL")], "@#€\\{}"),
    ("fr", [("DOT",), ("LEFTSHIFT", "DOT"), ("LEFTSHIFT", "COMMA"), ("6",), ("8",), ("SLASH",)], ":/.-_!"),
]


@pytest.mark.parametrize("layout,chords,expected", FACTS)
def test_each_layout_types_what_its_keycaps_show(layout, chords, expected, keys):
    t = keys()
    for chord in chords:
        t.tap(*chord)
    assert text(t.events, layout) == expected


def test_a_url_qr_typed_by_an_azerty_scanner_decodes_only_with_the_fr_keymap(keys):
    # h t t p s : / / t . f r / ? a = 1 & b = 2  as an AZERTY scanner presses them
    t = keys().keys("H", "T", "T", "P", "S", "DOT").tap("LEFTSHIFT", "DOT").tap("LEFTSHIFT", "DOT")
    t.keys("T").tap("LEFTSHIFT", "COMMA").keys("F", "R").tap("LEFTSHIFT", "DOT").tap("LEFTSHIFT", "M")
    t.keys("Q", "EQUAL").tap("LEFTSHIFT", "1").keys("1", "B", "EQUAL").tap("LEFTSHIFT", "2").keys("ENTER")
    assert text(t.events, "fr") == "https://t.fr/?a=1&b=2"
    assert text(t.events, "us") != "https://t.fr/?a=1&b=2"


def test_caps_lock_capitalises_letters_only_and_shift_undoes_it(keys):
    t = keys().keys("CAPSLOCK", "A", "1").tap("LEFTSHIFT", "B").keys("CAPSLOCK", "C")
    assert text(t.events, "us") == "A1bc"
    assert text(keys().keys("CAPSLOCK", "APOSTROPHE", "MINUS").events, "de") == "Äß"
    assert text(keys().keys("CAPSLOCK", "2", "Q").events, "fr") == "éA"  # AZERTY digits need Shift still


def test_altgr_applies_only_while_held_and_right_alt_on_us_types_nothing(keys):
    t = keys().tap("RIGHTALT", "Q").keys("Q")
    assert text(t.events, "de") == "@q"
    assert text(t.events, "us") == "q"  # us has no AltGr: right Alt + Q is a shortcut, not text


def test_a_key_the_layout_has_no_character_for_makes_the_code_malformed(keys):
    codes = typed(keys().keys("A").tap("RIGHTALT", "X").keys("B", "ENTER").events, "de")
    assert codes[0].text == "a\ufffdb"
    with pytest.raises(Malformed):
        normalise(codes[0].text)


@pytest.mark.parametrize("layout,chords,expected", [
    ("de", [("GRAVE",), ("A",)], "â"),
    ("de", [("GRAVE",), ("SPACE",)], "^"),
    ("de", [("EQUAL",), ("E",)], "é"),
    ("de", [("LEFTSHIFT", "EQUAL"), ("A",)], "à"),
    ("de", [("GRAVE",), ("X",)], "^x"),
    ("de", [("GRAVE",), ("GRAVE",)], "^"),
    ("de", [("GRAVE",), ("ENTER",)], "^"),
    ("fr", [("LEFTBRACE",), ("E",)], "ê"),
    ("fr", [("LEFTSHIFT", "LEFTBRACE"), ("I",)], "ï"),
])
def test_dead_keys_compose_with_the_next_key(layout, chords, expected, keys):
    t = keys()
    for chord in chords:
        t.tap(*chord)
    assert text(t.events, layout) == expected


def test_only_key_down_types_and_auto_repeat_is_ignored(typist):
    typist.event("KEY_A", 1).event("KEY_A", 2).event("KEY_A", 2).event("KEY_A", 0)
    typist.event("KEY_LEFTSHIFT", 1).event("KEY_B", 1).event("KEY_LEFTSHIFT", 0).event("KEY_B", 0)
    typist.tap("C")
    assert text(typist.events) == "aBc"


def test_release_events_alone_and_other_event_types_type_nothing(typist):
    typist.event("KEY_A", 0).event(ecodes.MSC_SCAN, 0x70004, ecodes.EV_MSC).event(ecodes.LED_CAPSL, 1, ecodes.EV_LED)
    assert typed(typist.events) == []


def test_non_printable_keys_are_ignored(typist):
    typist.keys("1", "F1", "ESC", "LEFT", "BACKSPACE", "HOME", "LEFTMETA", "NUMLOCK", "2", "ENTER")
    assert text(typist.events) == "12"


def test_enter_ends_a_code_and_tab_is_kept_inside_it(typist):
    typist.keys("A", "TAB", "B", "ENTER", "C", "KPENTER")
    codes = typed(typist.events)
    assert [(c.text, c.by) for c in codes] == [("a\tb", "enter"), ("c", "enter")]


def test_terminator_tab_ends_on_tab_or_enter(typist):
    typist.keys("A", "TAB", "B", "ENTER")
    assert [(c.text, c.by) for c in typed(typist.events, terminator="tab")] == [("a", "tab"), ("b", "enter")]


def test_terminator_none_keeps_newlines_and_ends_only_on_silence(typist):
    typist.keys("A", "ENTER", "B").pause(0.5).keys("C")
    codes = typed(typist.events, terminator="none", idle_seconds=0.2)
    assert [(c.text, c.by) for c in codes] == [("a\nb", "idle"), ("c", "idle")]


def test_a_missing_terminator_leaves_the_code_pending_until_silence_ends_it(typist):
    decoder = KeyDecoder("us", idle_seconds=0.2)
    assert [c for e in typist.keys("4", "2").events for c in decoder.feed(e)] == []
    assert decoder.pending
    code = decoder.flush()
    assert (code.text, code.by) == ("42", "idle") and not decoder.pending


def test_a_gap_in_the_kernel_timestamps_splits_codes_read_in_one_batch(typist):
    # The daemon stalled and read both codes at once: the event times still show the silence.
    typist.keys("1", "2").pause(1.0).keys("3", "ENTER")
    assert [(c.text, c.by) for c in typed(typist.events, idle_seconds=0.2)] == [("12", "idle"), ("3", "enter")]


def test_ctrl_types_control_characters_such_as_the_gs1_separator(typist):
    typist.keys("0", "1").tap("LEFTCTRL", "RIGHTBRACE").keys("1", "0").tap("RIGHTCTRL", "A").keys("ENTER")
    code = typed(typist.events)[0]
    assert code.text == "01\x1d10\x01"
    assert normalise(code.text) == "0110"


@pytest.mark.parametrize("digits,expected", [("65", "A"), ("0252", "ü"), ("130", "é"), ("0129", "\ufffd"),
                                             ("99999", "\ufffd")])
def test_alt_and_keypad_digits_enter_a_character_by_number(digits, expected, keys):
    t = keys().event("KEY_LEFTALT", 1)
    for d in digits:
        t.tap(f"KP{d}")
    t.event("KEY_LEFTALT", 0).keys("ENTER")
    assert text(t.events, "de") == expected


def test_keypad_digits_type_digits_on_every_layout(keys):
    t = keys().keys("KP1", "KP2", "KPMINUS", "KP9", "ENTER")
    assert {text(t.events, lay) for lay in LAYOUTS} == {"12-9"}


def test_an_overlong_code_is_cut_but_stays_too_long_for_the_pipeline(typist):
    typist.keys(*"ABCDEFGHIJKLMNO", "ENTER")
    code = typed(typist.events, max_length=10)[0]
    assert code.cut and code.length == 15 and code.text == "abcdefghijk"
    with pytest.raises(Malformed, match="11 characters, more than the 10 allowed"):
        normalise(code.text, max_length=10)


def test_reset_forgets_a_shift_held_when_the_device_vanished(typist, keys):
    decoder = KeyDecoder("us")
    for e in typist.event("KEY_LEFTSHIFT", 1).keys("A").events:
        decoder.feed(e)
    decoder.reset()
    assert [c.text for e in keys().keys("B", "ENTER").events for c in decoder.feed(e)] == ["b"]


ALPHABETS = {
    "us": string.ascii_letters + string.digits + string.punctuation + " ",
    "uk": string.ascii_letters + string.digits + string.punctuation + " £¬€",
    "de": string.ascii_letters + string.digits + string.punctuation + " äöüÄÖÜß§°€µ²³âêéèáàô",
    "fr": string.ascii_letters + string.digits + string.punctuation + " éèçàù²£µ§€¤°âêîôûëïü",
}


@pytest.mark.parametrize("layout", sorted(ALPHABETS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_text_a_scanner_types_in_a_layout_decodes_back(layout, data, keys):
    value = data.draw(st.text(alphabet=ALPHABETS[layout], min_size=1, max_size=40))
    events = keystrokes(value, layout) + keys(start=keys.T0 + 10).keys("ENTER").events
    assert [c.text for c in typed(events, layout, idle_seconds=1.0)] == [value]


_EVENTS = st.lists(st.tuples(
    st.sampled_from([ecodes.EV_KEY] * 6 + [ecodes.EV_SYN, ecodes.EV_MSC, ecodes.EV_LED]),
    st.one_of(st.integers(0, 767), st.sampled_from(sorted({*LAYOUTS["de"].keys, ecodes.KEY_LEFTSHIFT,
              ecodes.KEY_RIGHTALT, ecodes.KEY_LEFTALT, ecodes.KEY_CAPSLOCK, ecodes.KEY_ENTER, ecodes.KEY_KP0,
              ecodes.KEY_LEFTCTRL, ecodes.KEY_TAB}))),
    st.integers(-1, 3),
    st.floats(0, 0.5),
), max_size=300)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(raw=_EVENTS, layout=st.sampled_from(sorted(LAYOUTS)), terminator=st.sampled_from(["enter", "tab", "none"]),
       max_length=st.integers(1, 50))
def test_fuzzed_key_events_give_a_scan_or_a_logged_drop_and_never_raise(raw, layout, terminator, max_length, caplog):
    caplog.set_level(logging.DEBUG, logger="gated.drivers.hid")
    decoder = KeyDecoder(layout, terminator=terminator, idle_seconds=0.2, max_length=max_length)
    t = T0
    codes = []
    for etype, code, value, dt in raw:
        t += dt
        codes += decoder.feed(InputEvent(int(t), int(t % 1 * 1e6), etype, code, value))
    if (last := decoder.flush()) is not None:
        codes.append(last)
    for code in codes:
        assert len(code.text) <= max_length + 1
        caplog.clear()
        scan = code_to_scan(code, "front", InputKind.BARCODE, layout)
        if scan is None:
            assert caplog.records, "a code was dropped without a log line"
            continue
        assert isinstance(scan, Scan) and scan.raw_length == code.length
        try:
            normalise(scan.token, max_length=max_length)
        except Malformed:
            pass
        if code.cut or "\ufffd" in code.text:
            assert any(r.levelno == logging.WARNING for r in caplog.records)
