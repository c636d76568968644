"""pretix check-in list `rules` decided offline: pure evaluation of a list's JSON logic (no I/O).

pretix lets an organizer attach JSON logic to a check-in list ("only VIP tickets after 18:00", "at
most one entry a day"). Online, pretix applies it at redeem; offline, pretixSCAN applies it from
downloaded data, and so must a gate. `evaluate(rules, facts)` answers what pretix would: allowed or
not, and when not, pretix's own explanation text (`reason_explanation`), for the log and the
display.

Why a small evaluator of our own, not a JSON-logic package: PyPI has maintained pure-Python ones
(maykin-json-logic-py, python-jsonlogic; json-logic / json-logic-qubit / panzi-json-logic are
unmaintained), and they take custom operators. But what has to match is pretix's dialect, not
json-logic-js: pretix evaluates `and`/`or` eagerly, compares with its own coercions (`==` compares
as text when either side is text, `<` as floats when either side is a number and "false" when that
fails, datetimes as datetimes), and the explanation needs every comparison's own value. A package
would have its coercions replaced operator by operator and still leave the explanation to us. pretix
itself accepts only a small set (its `CheckinList.validate_rules`): `and`, `or`, `==`, `!=`, `<`,
`<=`, `>`, `>=`, `inList`, `isBefore`, `isAfter`, `var`, `buildTime`, `objectList`, `lookup`,
`entries_since`, `entries_before`, `entries_days_since`, `entries_days_before`. That is all this
module evaluates; about 150 lines, no dependency on the gate.

Semantics, from reading pretix 2026.8.0 (`pretix/base/services/checkin.py`, `helpers/jsonlogic.py`):
- Rules apply to entry scans only; the caller skips them for exits.
- Only the position's successful entry check-ins on this list count as entries (exits do not;
  refused and annulled check-ins are stored by pretix as unsuccessful and do not count). The scan
  being decided is not counted.
- "Today" starts at midnight in the event's time zone; days are calendar dates in that zone;
  `now_isoweekday` is the weekday there (Monday 1).
- `isBefore(a, b, tol)`: a < b + tol minutes; `isAfter(a, b, tol)`: a > b - tol minutes.
- `buildTime`: `custom` (an ISO date-time), `customtime` (a time of day, today in the event's zone),
  `date_from`, `date_to` (else date_from), `date_admission` (else date_from) of the event or date.
- `minutes_since_last_entry` / `minutes_since_first_entry`: whole minutes, rounded down, -1 with no
  entry.
- `entry_status`: "present" when the last check-in on the list is an entry, else "absent".
- An unknown variable is None in pretix; pretix's API refuses to store one, so here it is a rule gated
  cannot evaluate. An operator or variable gated cannot evaluate, and a rule that fails to evaluate
  (pretix: "Evaluation of custom rules has failed."), deny: never an admit.

The explanation follows pretix's documented approach (`_logic_explain`): each false comparison gets
a text and a weight (how little the visitor can change it, then how far off it is); the rule is put
in disjunctive normal form; the way to "true" whose worst failure weighs least, then with the fewest
failures, is explained (past MAX_WAYS ways, "Unknown reason": pretix would weigh them all). Texts
are pretix's English ones; times are shown in the event's zone, `HH:MM` within 12 hours of the
clock, else `YYYY-MM-DD HH:MM`. pretix words its explanation by the
server's clock at the answer, with `customtime` on that day, even for a check-in sent with an earlier
`datetime`; `Facts.clock` says which clock (by default the scan's time, the same thing at a gate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta, tzinfo
from functools import reduce
from typing import Any
from zoneinfo import ZoneInfo

# Everything pretix lets a list's rules contain (CheckinList.validate_rules).
VARIABLES = frozenset({"product", "variation", "now", "now_isoweekday", "entries_number", "entries_today",
                       "entries_days", "minutes_since_last_entry", "minutes_since_first_entry", "gate",
                       "entry_status"})
ENTRY_FUNCTIONS = ("entries_since", "entries_before", "entries_days_since", "entries_days_before")
EVALUATION_FAILED = "Evaluation of custom rules has failed."


class CannotEvaluate(Exception):
    """The rule uses something gated does not evaluate offline: the scan is denied, saying what."""


class _Failed(Exception):
    """The rule fails to evaluate, as it would in pretix (which then refuses the check-in)."""


@dataclass(frozen=True)
class CheckIn:
    """A check-in of the position, from the server's download or this lane's own record."""

    at: datetime  # time zone aware
    type: str = "entry"  # or "exit"
    list_id: int | None = None  # None: on the list being decided
    successful: bool = True  # False for refused or annulled ones, which pretix does not count


@dataclass(frozen=True)
class Facts:
    """What pretix knows when it applies a list's rules to one scan."""

    now: datetime  # the scan's time, time zone aware
    timezone: str | tzinfo  # the event's, e.g. "Europe/Berlin"
    product: int
    variation: int | None = None
    gate: int | None = None  # the pretix gate of this lane's device
    list_id: int | None = None
    checkins: Sequence[CheckIn] = ()
    date_from: datetime | None = None  # of the event, or of the position's date in a series
    date_to: datetime | None = None
    date_admission: datetime | None = None
    # pretix words its explanation by the server's clock when it answers, not by the scan's time
    # (which differ only for a check-in sent with an earlier `datetime`). None: the scan's time.
    clock: datetime | None = None


@dataclass(frozen=True)
class RuleResult:
    allowed: bool
    explanation: str | None = None  # pretix's reason_explanation when it refuses
    unsupported: bool = False  # True when gated could not evaluate the rule (and so denied)


def evaluate(rules: Any, facts: Facts) -> RuleResult:
    """Apply a check-in list's `rules` to an entry scan, as pretix would."""
    if not rules:
        return RuleResult(True)  # pretix skips an empty rule set
    env = _Env(facts)
    try:
        if env.apply(rules):
            return RuleResult(True)
        return RuleResult(False, _explain(rules, _Env(facts, clock=facts.clock)))
    except CannotEvaluate as e:
        return RuleResult(False, f"gated cannot evaluate this rule offline: {e}", unsupported=True)
    except (_Failed, TypeError, ValueError, KeyError, IndexError, AttributeError, OverflowError, RecursionError):
        return RuleResult(False, EVALUATION_FAILED)


# --- pretix's comparison dialect ---------------------------------------------------------------


def _equals(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) is bool(b)
    return a == b


def _less(a: Any, b: Any, *more: Any) -> bool:
    if {type(a), type(b)} & {int, float}:
        try:
            a, b = float(a), float(b)
        except (TypeError, ValueError):
            return False  # not comparable as numbers: pretix answers false, not an error
    return a < b and (not more or _less(b, *more))


def _less_or_equal(a: Any, b: Any, *more: Any) -> bool:
    return (_less(a, b) or _equals(a, b)) and (not more or _less_or_equal(b, *more))


def _tolerance(minutes: Any) -> timedelta:
    return timedelta(minutes=float(minutes)) if minutes else timedelta(0)


OPERATORS = {
    "==": _equals,
    "!=": lambda a, b: not _equals(a, b),
    "<": _less,
    "<=": _less_or_equal,
    ">": lambda a, b: _less(b, a),
    ">=": lambda a, b: _less(b, a) or _equals(a, b),
    # Both sides are evaluated before and/or combine them, as pretix does: an error anywhere denies.
    "and": lambda *args: reduce(lambda total, arg: total and arg, args, True),
    "or": lambda *args: reduce(lambda total, arg: total or arg, args, False),
    "inList": lambda a, b: a in b,
    "isBefore": lambda a, b, tol=None: a < b + _tolerance(tol),
    "isAfter": lambda a, b, tol=None: b < a + _tolerance(tol),
    "objectList": lambda *items: list(items),
    "lookup": lambda model, pk, label=None: int(pk),
}


@dataclass
class _Env:
    facts: Facts
    clock: datetime | None = None  # the day `customtime` means and explanations are worded by
    tz: tzinfo = field(init=False)

    def __post_init__(self) -> None:
        tz = self.facts.timezone
        self.tz = ZoneInfo(tz) if isinstance(tz, str) else tz
        self.clock = self.clock or self.facts.now

    def apply(self, rule: Any) -> Any:
        if not isinstance(rule, dict):
            return rule  # a literal (lists too, as in pretix)
        keys = [k for k in rule if not k.startswith("__")]
        if not keys:
            raise _Failed("empty operation")
        op = keys[0]
        args = rule[op] if isinstance(rule[op], list | tuple) else [rule[op]]
        values = [self.apply(a) for a in args]
        if op == "var":
            return self.var(values[0] if values else "")
        if op == "buildTime":
            return self.build_time(*values)
        if op in ENTRY_FUNCTIONS:
            return self.entries(op, *values)
        if op not in OPERATORS:
            raise CannotEvaluate(f"operator {op!r} (pretix does not accept it in check-in rules either)")
        return OPERATORS[op](*values)

    # --- variables --------------------------------------------------------------------------

    def var(self, name: Any) -> Any:
        if name not in VARIABLES:
            raise CannotEvaluate(f"variable {name!r}")
        f = self.facts
        if name == "now":
            return f.now
        if name == "now_isoweekday":
            return f.now.astimezone(self.tz).isoweekday()
        if name in ("product", "variation", "gate"):
            return getattr(f, name)
        if name == "entry_status":
            mine = sorted(self._on_list(), key=lambda c: c.at)
            return "present" if mine and mine[-1].type == "entry" else "absent"
        entries = [c.at for c in self._entries()]
        if name == "entries_number":
            return len(entries)
        if name == "entries_today":
            return len([t for t in entries if t >= self.midnight()])
        if name == "entries_days":
            return len(self._days(entries))
        if name == "minutes_since_last_entry":
            return (f.now - max(entries)).total_seconds() // 60 if entries else -1
        # minutes_since_first_entry
        return (f.now - min(entries)).total_seconds() // 60 if entries else -1

    def _on_list(self) -> list[CheckIn]:
        lid = self.facts.list_id
        return [c for c in self.facts.checkins
                if c.successful and (c.list_id is None or lid is None or c.list_id == lid)]

    def _entries(self) -> list[CheckIn]:
        return [c for c in self._on_list() if c.type == "entry"]

    def _days(self, times: list[datetime]) -> set:
        return {t.astimezone(self.tz).date() for t in times}

    def midnight(self) -> datetime:
        return self.facts.now.astimezone(self.tz).replace(hour=0, minute=0, second=0, microsecond=0)

    def entries(self, op: str, cutoff: Any) -> int:
        if not isinstance(cutoff, datetime):
            raise _Failed(f"{op} needs a time")
        times = [c.at for c in self._entries()]
        chosen = [t for t in times if (t >= cutoff if op.endswith("_since") else t < cutoff)]
        return len(self._days(chosen)) if "_days_" in op else len(chosen)

    def build_time(self, kind: Any = None, value: Any = None, *_: Any) -> datetime | None:
        f = self.facts
        if kind == "custom":
            t = datetime.fromisoformat(str(value))
            if t.tzinfo is None:
                raise _Failed("a time without zone cannot be compared")  # pretix fails here too
            return t
        if kind == "customtime":
            clock = time.fromisoformat(str(value))
            return self.clock.astimezone(self.tz).replace(hour=clock.hour, minute=clock.minute, second=clock.second,
                                                      microsecond=clock.microsecond)
        if kind == "date_from":
            return f.date_from
        if kind == "date_to":
            return f.date_to or f.date_from
        if kind == "date_admission":
            return f.date_admission or f.date_from
        raise CannotEvaluate(f"buildTime {kind!r}")


# --- the explanation ------------------------------------------------------------------------------

WEEKDAYS = {1: "Monday", 2: "Tuesday", 3: "Wednesday", 4: "Thursday", 5: "Friday", 6: "Saturday", 7: "Sunday"}
LABELS = {
    "minutes_since_last_entry": "time since last entry",
    "minutes_since_first_entry": "time since first entry",
    "entries_days": "number of days with an entry",
    "entries_number": "number of entries",
    "entries_today": "number of entries today",
    "entries_since": "number of entries since {}",
    "entries_before": "number of entries before {}",
    "entries_days_since": "number of days with an entry since {}",
    "entries_days_before": "number of days with an entry before {}",
    "now_isoweekday": "week day",
}
# How much the visitor's own conduct decides a count (lower: more), as pretix weighs them.
COUNT_WEIGHTS = {"minutes_since_first_entry": 80, "minutes_since_last_entry": 90, "entries_days": 100,
                 "entries_days_since": 105, "entries_days_before": 105, "entries_since": 110, "entries_before": 110,
                 "entries_number": 120, "entries_today": 140, "now_isoweekday": 210}
OPERATOR_WEIGHTS = {"==": 2, "<": 1, "<=": 1, ">": 1, ">=": 1, "!=": 3}
UNKNOWN_REASON = "Unknown reason"
# The ways in that an explanation weighs: each `and` of `or`s multiplies them (twenty of two make a
# million), and they are weighed on the scan's path. A real list's rules have a few dozen at most.
MAX_WAYS = 4096


@dataclass(frozen=True)
class _Leaf:
    """One comparison of the rule, its value, and what to say when it is false."""

    ok: bool
    weight: tuple[float, float] = (0, 0)
    text: str = ""


def _explain(rules: Any, env: _Env) -> str:
    if _ways(rules) > MAX_WAYS:
        return UNKNOWN_REASON
    try:
        paths = [[_leaf(x, env) for x in path] for path in _dnf(rules)]
    except _NoExplanation:
        return UNKNOWN_REASON
    # Each way to "true" weighs as much as its worst false comparison; explain the lightest, then
    # the one with the fewest false comparisons.
    def cost(path: list[_Leaf]) -> tuple[tuple[float, float], int]:
        failing = [x for x in path if not x.ok]
        return max((x.weight for x in failing), default=(0, 0)), len(failing)

    best = min(paths, key=cost)
    return ", ".join(x.text for x in best if not x.ok)


class _NoExplanation(Exception):
    """pretix gives "Unknown reason" for a comparison without a variable on its left."""


def _dnf(rule: Any) -> list[list[Any]]:
    """The rule as a list of ways to "true", each a list of comparisons that must all hold.

    For `and`, the comparisons that are not `or` come first and one `or` is spread out at a time,
    which keeps the order pretix's own conversion gives (it decides the order of the explanation).
    """
    if isinstance(rule, dict) and rule:
        op = next(iter(rule))
        args = rule[op] if isinstance(rule[op], list) else [rule[op]]
        if op == "or":
            return [path for a in args for path in _dnf(a)]
        if op == "and":
            spread = next((a for a in args if isinstance(a, dict) and "or" in a), None)
            if spread is None:
                paths: list[list[Any]] = [[]]
                for a in args:
                    paths = [p + q for p in paths for q in _dnf(a)]
                return paths
            others = [a for a in args if a is not spread]
            return [path for alternative in spread["or"] for path in _dnf({"and": [*others, alternative]})]
    return [[rule]]


def _ways(rule: Any) -> int:
    """How many ways to "true" `_dnf` makes of the rule, counted without making them."""
    if isinstance(rule, dict) and rule:
        op = next(iter(rule))
        args = rule[op] if isinstance(rule[op], list) else [rule[op]]
        if op == "or":
            return sum(_ways(a) for a in args)
        if op == "and":
            return reduce(lambda total, a: total * _ways(a), args, 1)
    return 1


def _leaf(rule: Any, env: _Env) -> _Leaf:
    if rule is True or rule is False:
        return _Leaf(rule, (100000, 0), "Always true" if rule else "Always false")
    if not isinstance(rule, dict):
        raise _NoExplanation()
    op = next(iter(rule))
    args = rule[op] if isinstance(rule[op], list) else [rule[op]]
    if env.apply(rule):
        return _Leaf(True)
    left, rhs = (args[0] if args else None), args[1:]
    if not isinstance(left, dict):
        raise _NoExplanation()
    now = env.clock
    if "var" in left:
        name = left["var"][0] if isinstance(left["var"], list) else left["var"]
    elif any(k in left for k in ENTRY_FUNCTIONS):
        name = next(k for k in ENTRY_FUNCTIONS if k in left)
    else:
        raise _NoExplanation()
    if name == "now":
        compare_to = env.apply(rhs[0]) if rhs else None
        if not isinstance(compare_to, datetime) or op not in ("isBefore", "isAfter"):
            raise _NoExplanation()
        tol = _tolerance(rhs[1] if len(rhs) > 1 else None)
        compare_to = compare_to + tol if op == "isBefore" else compare_to - tol
        side = "before" if op == "isBefore" else "after"
        return _Leaf(False, (200, abs((now - compare_to).total_seconds())),
                     f"Only allowed {side} {_when(compare_to, now, env.tz)}")
    if name == "entry_status":
        value = rhs[0] if rhs else None
        text = {"present": "Attendee is checked out", "absent": "Attendee is already checked in"}.get(value) \
            if op == "==" else None
        return _Leaf(False, (20, 0), text or f"{name} not {op} {rhs}")
    if name in ("product", "variation"):
        return _Leaf(False, (1000, 0), "Ticket type not allowed")
    if name == "gate":
        return _Leaf(False, (500, 0), "Wrong entrance gate")
    if name not in COUNT_WEIGHTS:
        raise _NoExplanation()
    label = LABELS[name]
    if name in ENTRY_FUNCTIONS:
        cutoff = env.apply(left[name][0] if isinstance(left[name], list) else left[name])
        label = label.format(_when(cutoff, now, env.tz))
        value = env.entries(name, cutoff)
    else:
        value = env.var(name)
    compare_to = env.apply(rhs[0]) if rhs else None
    penalty = 0
    if name in ("minutes_since_last_entry", "minutes_since_first_entry") and _against_minus_one(op, compare_to):
        penalty = 1000  # "has an entry at all" tests: technical, explained only when nothing else is
    weight = (COUNT_WEIGHTS[name] + OPERATOR_WEIGHTS.get(op, 0) + penalty, abs(compare_to - value))
    shown = WEEKDAYS.get(compare_to, compare_to) if name == "now_isoweekday" else compare_to
    text = {"==": f"{label} is not {shown}", "<": f"Maximum {label} exceeded", "<=": f"Maximum {label} exceeded",
            ">": f"Minimum {label} exceeded", ">=": f"Minimum {label} exceeded", "!=": f"{label} is {shown}"}.get(op)
    if text is None:
        raise _NoExplanation()
    return _Leaf(False, weight, text)  # pretix starts these with a lower-case word too


def _against_minus_one(op: str, value: Any) -> bool:
    return ((op == "<" and value <= 0) or (op == "<=" and value < 0) or (op == ">=" and value < 0)
            or (op == ">" and value <= 0) or (op in ("==", "!=") and value == -1))


def _when(t: datetime, now: datetime, tz: tzinfo) -> str:
    local = t.astimezone(tz)
    return local.strftime("%H:%M") if abs(now - t) < timedelta(hours=12) else local.strftime("%Y-%m-%d %H:%M")
