"""pretix check-in rules offline (gated/policy/pretix_rules.py): each operator, then scan for scan vs real pretix."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from gated.policy.pretix_rules import EVALUATION_FAILED, UNKNOWN_REASON, CheckIn, Facts, RuleResult, evaluate

BERLIN = ZoneInfo("Europe/Berlin")
# Wednesday 2026-03-04, 10:30 in Berlin (09:30 UTC).
NOW = datetime(2026, 3, 4, 10, 30, tzinfo=BERLIN)


def facts(**kw) -> Facts:
    base = dict(now=NOW, timezone="Europe/Berlin", product=1, variation=None, gate=7, list_id=5,
                date_from=datetime(2026, 3, 4, 9, 0, tzinfo=BERLIN), date_to=datetime(2026, 3, 6, 18, 0, tzinfo=BERLIN),
                date_admission=datetime(2026, 3, 4, 8, 0, tzinfo=BERLIN))
    return Facts(**(base | kw))


def entries(*times: datetime, type: str = "entry", list_id: int | None = 5) -> list[CheckIn]:
    return [CheckIn(at=t, type=type, list_id=list_id) for t in times]


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, tzinfo=BERLIN)


def custom(t: datetime) -> dict:
    return {"buildTime": ["custom", t.astimezone(UTC).isoformat().replace("+00:00", "Z")]}


NOW_VAR = {"var": "now"}


def products(*ids: int) -> dict:
    return {"inList": [{"var": "product"}, {"objectList": [{"lookup": ["product", str(i), "x"]} for i in ids]}]}


# --- one operator at a time --------------------------------------------------------------------


def test_no_rules_allow():
    assert evaluate({}, facts()).allowed and evaluate(None, facts()).allowed


@pytest.mark.parametrize("product,allowed", [(1, True), (2, True), (3, False)])
def test_product_limit_with_inlist_and_lookup(product, allowed):
    result = evaluate(products(1, 2), facts(product=product))
    assert result.allowed is allowed
    assert result.explanation == (None if allowed else "Ticket type not allowed")


def test_variation_is_compared_like_pretix_including_text_against_number():
    rule = {"==": [{"var": "variation"}, "12"]}  # "==" with text on one side compares as text
    assert evaluate(rule, facts(variation=12)).allowed
    assert not evaluate(rule, facts(variation=13)).allowed
    assert not evaluate(rule, facts(variation=None)).allowed


def test_gate():
    assert evaluate({"==": [{"var": "gate"}, 7]}, facts()).allowed
    refused = evaluate({"==": [{"var": "gate"}, 8]}, facts())
    assert (refused.allowed, refused.explanation) == (False, "Wrong entrance gate")


@pytest.mark.parametrize("tolerance,scan,allowed", [
    (None, at(4, 10, 0), False), (None, at(4, 10, 1), True),
    (10, at(4, 9, 51), True), (10, at(4, 9, 50), False), ("10", at(4, 9, 51), True), (0, at(4, 9, 59), False),
])
def test_is_after_with_tolerance_in_minutes(tolerance, scan, allowed):
    rule = {"isAfter": [NOW_VAR, custom(at(4, 10, 0)), tolerance]}
    assert evaluate(rule, facts(now=scan)).allowed is allowed


@pytest.mark.parametrize("tolerance,scan,allowed", [
    (None, at(4, 9, 59), True), (None, at(4, 10, 0), False), (5, at(4, 10, 4), True), (5, at(4, 10, 5), False),
])
def test_is_before_with_tolerance_in_minutes(tolerance, scan, allowed):
    rule = {"isBefore": [NOW_VAR, custom(at(4, 10, 0)), tolerance]}
    assert evaluate(rule, facts(now=scan)).allowed is allowed


def test_refused_time_is_explained_in_the_events_zone_short_when_near_long_when_far():
    near = evaluate({"isAfter": [NOW_VAR, custom(at(4, 12, 0)), 15]}, facts())
    far = evaluate({"isBefore": [NOW_VAR, custom(at(3, 9, 0))]}, facts())
    assert near.explanation == "Only allowed after 11:45"
    assert far.explanation == "Only allowed before 2026-03-03 09:00"


@pytest.mark.parametrize("kind,value,scan,allowed", [
    ("date_admission", None, at(4, 7, 59), False), ("date_admission", None, at(4, 8, 1), True),
    ("date_from", None, at(4, 8, 59), False), ("date_from", None, at(4, 9, 1), True),
    ("customtime", "10:15:00", at(4, 10, 14), False), ("customtime", "10:15", at(4, 10, 16), True),
])
def test_build_time_kinds(kind, value, scan, allowed):
    rule = {"isAfter": [NOW_VAR, {"buildTime": [kind, value] if value else [kind]}]}
    assert evaluate(rule, facts(now=scan)).allowed is allowed


def test_date_to_and_admission_fall_back_to_date_from():
    f = facts(date_to=None, date_admission=None, now=at(4, 8, 30))
    assert not evaluate({"isAfter": [NOW_VAR, {"buildTime": ["date_admission"]}]}, f).allowed
    assert evaluate({"isBefore": [NOW_VAR, {"buildTime": ["date_to"]}]}, f).allowed


def test_customtime_is_today_in_the_events_zone_not_utc():
    # 00:30 in Berlin is still the previous day in UTC: "after 00:15 today" must hold.
    scan = datetime(2026, 3, 5, 0, 30, tzinfo=BERLIN)
    assert evaluate({"isAfter": [NOW_VAR, {"buildTime": ["customtime", "00:15"]}]}, facts(now=scan)).allowed


def test_weekday_in_the_events_zone():
    late_tuesday_utc = datetime(2026, 3, 3, 23, 30, tzinfo=UTC)  # already Wednesday in Berlin
    rule = {"==": [{"var": "now_isoweekday"}, 3]}
    assert evaluate(rule, facts(now=late_tuesday_utc)).allowed
    refused = evaluate({"==": [{"var": "now_isoweekday"}, 6]}, facts())
    assert refused.explanation == "week day is not Saturday"


def test_entries_number_counts_successful_entries_on_this_list_only():
    history = (entries(at(4, 9)) + entries(at(4, 9, 30), type="exit")
               + entries(at(4, 9, 40), list_id=6)
               + [CheckIn(at=at(4, 9, 50), successful=False)])  # annulled
    rule = {"<": [{"var": "entries_number"}, 2]}
    assert evaluate(rule, facts(checkins=history)).allowed
    refused = evaluate(rule, facts(checkins=history + entries(at(4, 10))))
    assert refused.explanation == "Maximum number of entries exceeded"


def test_entries_today_starts_at_the_events_midnight():
    just_before = datetime(2026, 3, 3, 22, 59, tzinfo=UTC)  # 23:59 Berlin on the 3rd
    just_after = datetime(2026, 3, 3, 23, 1, tzinfo=UTC)  # 00:01 Berlin on the 4th
    rule = {"<": [{"var": "entries_today"}, 1]}
    assert evaluate(rule, facts(checkins=entries(just_before))).allowed
    assert not evaluate(rule, facts(checkins=entries(just_after))).allowed


def test_entries_days_counts_calendar_days_in_the_events_zone():
    history = entries(datetime(2026, 3, 1, 22, 30, tzinfo=UTC), datetime(2026, 3, 1, 23, 30, tzinfo=UTC),
                      at(3, 12))  # 23:30 on the 1st and 00:30 on the 2nd in Berlin (one UTC day), then the 3rd
    assert not evaluate({"<": [{"var": "entries_days"}, 3]}, facts(checkins=history)).allowed
    assert evaluate({"<": [{"var": "entries_days"}, 4]}, facts(checkins=history)).allowed


@pytest.mark.parametrize("op,count", [("entries_since", 2), ("entries_before", 1), ("entries_days_since", 1),
                                      ("entries_days_before", 1)])
def test_entries_since_and_before_a_time(op, count):
    history = entries(at(3, 20), at(4, 9), at(4, 10))
    cutoff = custom(at(4, 8))
    assert evaluate({"==": [{op: [cutoff]}, count]}, facts(checkins=history)).allowed
    refused = evaluate({"==": [{op: [cutoff]}, count + 5]}, facts(checkins=history))
    assert not refused.allowed and refused.explanation.endswith(f"since 08:00 is not {count + 5}" if "since" in op
                                                               else f"before 08:00 is not {count + 5}")


def test_minutes_since_last_and_first_entry_round_down_and_are_minus_one_without_entries():
    rule_last = {"or": [{"==": [{"var": "minutes_since_last_entry"}, -1]},
                        {">=": [{"var": "minutes_since_last_entry"}, 60]}]}
    assert evaluate(rule_last, facts()).allowed  # no entry yet
    assert not evaluate(rule_last, facts(checkins=entries(NOW - timedelta(minutes=59, seconds=59)))).allowed
    assert evaluate(rule_last, facts(checkins=entries(NOW - timedelta(minutes=60)))).allowed
    refused = evaluate(rule_last, facts(checkins=entries(NOW - timedelta(minutes=10))))
    assert refused.explanation == "Minimum time since last entry exceeded"
    rule_first = {"<": [{"var": "minutes_since_first_entry"}, 120]}
    history = entries(NOW - timedelta(minutes=130), NOW - timedelta(minutes=5))
    assert not evaluate(rule_first, facts(checkins=history)).allowed
    assert evaluate(rule_first, facts(checkins=history[1:])).allowed


def test_entry_status_follows_the_last_check_in():
    rule = {"==": [{"var": "entry_status"}, "absent"]}
    assert evaluate(rule, facts()).allowed
    inside = facts(checkins=entries(at(4, 9)))
    assert evaluate(rule, inside).explanation == "Attendee is already checked in"
    left = facts(checkins=entries(at(4, 9)) + entries(at(4, 9, 30), type="exit"))
    assert evaluate(rule, left).allowed


def test_comparisons_coerce_like_pretix():
    assert evaluate({"<": [{"var": "entries_number"}, "1"]}, facts()).allowed  # text compared as a number
    assert not evaluate({"<": [NOW_VAR, 5]}, facts()).allowed  # not comparable: false, not an error
    assert evaluate({"<=": [{"var": "entries_number"}, 0]}, facts()).allowed
    assert evaluate({">=": [{"var": "product"}, 1]}, facts()).allowed


def test_explanation_picks_the_way_in_the_visitor_is_closest_to():
    # Regular tickets 10:00-11:00, VIP any time: a regular ticket at 11:30 hears about the time,
    # not about buying VIP (the product weighs more, being hard to change).
    rule = {"or": [{"and": [products(1), {"isAfter": [NOW_VAR, custom(at(4, 10))]},
                            {"isBefore": [NOW_VAR, custom(at(4, 11))]}]}, products(2)]}
    refused = evaluate(rule, facts(now=at(4, 11, 30)))
    assert (refused.allowed, refused.explanation) == (False, "Only allowed before 11:00")
    assert evaluate(rule, facts(now=at(4, 11, 30), product=2)).allowed


def test_explanation_of_several_failures_on_one_way_in_lists_them_in_order():
    rule = {"and": [{"==": [{"var": "now_isoweekday"}, 6]}, {"isBefore": [NOW_VAR, custom(at(4, 9))]}]}
    assert evaluate(rule, facts()).explanation == "week day is not Saturday, Only allowed before 09:00"


@pytest.mark.parametrize("rule,what", [
    ({"regex": [{"var": "product"}, "1"]}, "operator 'regex'"),
    ({"==": [{"var": "attendee_age"}, 18]}, "variable 'attendee_age'"),
    ({"isAfter": [NOW_VAR, {"buildTime": ["date_presale"]}]}, "buildTime 'date_presale'"),
    ({"or": [{"==": [1, 1]}, {"!": [False]}]}, "operator '!'"),  # even where the rest already says yes
])
def test_what_gated_cannot_evaluate_denies_and_says_what(rule, what):
    result = evaluate(rule, facts())
    assert (result.allowed, result.unsupported) == (False, True) and what in result.explanation


def test_a_rule_that_fails_to_evaluate_denies_as_pretix_does():
    naive = {"isAfter": [NOW_VAR, {"buildTime": ["custom", "2026-03-04T09:00:00"]}]}  # no zone
    result = evaluate(naive, facts())
    assert (result.allowed, result.explanation, result.unsupported) == (False, EVALUATION_FAILED, False)


def test_a_rule_with_too_many_ways_in_is_refused_without_naming_one():
    # Each `and` of `or`s multiplies the ways in that the explanation weighs (2**13 here): on the
    # store thread's scan path that would hold up every scan, so past MAX_WAYS none is named.
    either = {"or": [{"==": [{"var": "product"}, 2]}, {"==": [{"var": "gate"}, 3]}]}
    wide = {"and": [either] * 13}
    assert evaluate(wide, facts()) == RuleResult(False, UNKNOWN_REASON)
    small = {"and": [either] * 3}
    assert evaluate(small, facts()).explanation == "Wrong entrance gate"


def test_a_rule_nested_deeper_than_python_evaluates_denies_as_pretix_does():
    # pretix denies when its evaluation raises, whatever the error; escaping here, a RecursionError
    # would leave the decider without a decision.
    rule: dict = {"==": [{"var": "product"}, 1]}
    for _ in range(2000):
        rule = {"and": [rule, True]}
    result = evaluate(rule, facts())
    assert (result.allowed, result.explanation, result.unsupported) == (False, EVALUATION_FAILED, False)


# --- the same scans, decided by real pretix online and by this module -----------------------------
#
# Each scenario makes a check-in list with rules (and multiple entries allowed, so pretix's answer
# depends on the rules alone), positions, then scans them in time order. Before each scan the
# position's check-ins are read back from pretix (what gated downloads) and the rules evaluated here;
# then pretix redeems the same scan at the same `datetime` with the device of gate "north". Exit scans
# are made too (rules do not apply to them) so that entry_status has something to follow.


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _scenarios(srv, now: datetime) -> list[tuple[str, dict, list[tuple[str, str, datetime, str]]]]:
    """(list name, rules, scans as (position key, product/variation spec, time, entry|exit))."""
    tz = ZoneInfo(srv.timezone)
    midnight = now.astimezone(tz).replace(hour=0, minute=0, second=0, microsecond=0)

    def day(days_ago: int, hour: int, minute: int = 0) -> datetime:
        return (midnight - timedelta(days=days_ago)).replace(hour=hour, minute=minute)

    ticket, vip, workshop = srv.items["Ticket"], srv.items["VIP"], srv.items["Workshop"]
    gold = srv.variations["VIP/Gold"]
    t0 = now - timedelta(hours=6)
    weekdays = sorted({day(d, 12).isoweekday() for d in (2, 4)})
    return [
        ("r_products", {"inList": [{"var": "product"}, {"objectList": [
            {"lookup": ["product", str(ticket), "Ticket"]}, {"lookup": ["product", str(workshop), "Workshop"]}]}]},
         [("a", "Ticket", t0, "entry"), ("b", "VIP/Gold", t0, "entry"), ("c", "Workshop", t0, "entry")]),
        ("r_variation", {"==": [{"var": "variation"}, gold]},
         [("a", "VIP/Gold", t0, "entry"), ("b", "VIP/Silver", t0, "entry"), ("c", "Ticket", t0, "entry")]),
        ("r_weekday", {"or": [{"==": [{"var": "now_isoweekday"}, w]} for w in weekdays]},
         [("a", "Ticket", day(d, 12), "entry") for d in (6, 5, 4, 3, 2, 1)]),
        ("r_window", {"and": [{"isAfter": [{"var": "now"}, custom(t0 - timedelta(minutes=60)), 10]},
                              {"isBefore": [{"var": "now"}, custom(t0 - timedelta(minutes=20)), 5]}]},
         [("a", "Ticket", t0 - timedelta(minutes=m), "entry") for m in (75, 71, 69, 40, 16, 14)]),
        ("r_event_times", {"or": [{"and": [{"isAfter": [{"var": "now"}, {"buildTime": ["date_admission"]}, None]},
                                           {"isBefore": [{"var": "now"}, {"buildTime": ["date_to"]}]}]},
                                  {"inList": [{"var": "product"}, {"objectList": [
                                      {"lookup": ["product", str(vip), "VIP"]}]}]}]},
         [("a", "Ticket", now - timedelta(hours=h), "entry") for h in (5, 4, 3.5, 2.5, 1)]
         + [("b", "VIP/Silver", now - timedelta(hours=5), "entry")]),
        ("r_customtime", {"and": [{"isAfter": [{"var": "now"}, {"buildTime": ["customtime", "10:00:00"]}]},
                                  {"isBefore": [{"var": "now"}, {"buildTime": ["customtime", "18:30"]}, 15]}]},
         [("a", "Ticket", day(3, h, m), "entry") for h, m in ((9, 30), (10, 5), (18, 40), (18, 50))]),
        ("r_entries_number", {"<": [{"var": "entries_number"}, 3]},
         [("a", "Ticket", t0 + timedelta(minutes=m), k) for m, k in
          ((0, "entry"), (5, "exit"), (10, "entry"), (20, "entry"), (30, "entry"), (40, "exit"), (50, "entry"))]),
        ("r_entries_today", {"<": [{"var": "entries_today"}, 2]},
         [("a", "Ticket", t, "entry") for t in (day(3, 23, 30), day(2, 0, 10), day(2, 8), day(2, 12), day(1, 9))]),
        ("r_entries_days", {"<=": [{"var": "entries_days"}, 1]},
         [("a", "Ticket", t, "entry") for t in (day(4, 23, 50), day(3, 0, 20), day(3, 9), day(2, 9))]),
        ("r_last_entry", {"or": [{"==": [{"var": "minutes_since_last_entry"}, -1]},
                                 {">": [{"var": "minutes_since_last_entry"}, 60]}]},
         [("a", "Ticket", t0 + timedelta(minutes=m), "entry") for m in (0, 30, 61, 100, 200, 201)]),
        ("r_first_entry", {"or": [{"==": [{"var": "minutes_since_first_entry"}, -1]},
                                  {"<": [{"var": "minutes_since_first_entry"}, 120]}]},
         [("a", "Ticket", t0 + timedelta(minutes=m), "entry") for m in (0, 50, 119, 121, 180)]),
        ("r_since_before", {"and": [{"<": [{"entries_since": [custom(day(2, 0))]}, 2]},
                                    {"<=": [{"entries_before": [custom(day(2, 0))]}, 1]},
                                    {"<": [{"entries_days_since": [custom(day(3, 0))]}, 3]},
                                    {"<": [{"entries_days_before": [custom(day(3, 0))]}, 2]}]},
         [("a", "Ticket", t, "entry") for t in (day(5, 10), day(4, 10), day(4, 11), day(3, 10), day(2, 10),
                                                day(2, 11), day(2, 12), day(1, 10))]
         + [("b", "Ticket", t, "entry") for t in (day(3, 10), day(2, 10), day(1, 10), day(1, 11))]),
        ("r_gate", {"or": [{"==": [{"var": "gate"}, srv.gate_id("south")]},
                           {"inList": [{"var": "product"}, {"objectList": [
                               {"lookup": ["product", str(vip), "VIP"]}]}]}]},
         [("a", "Ticket", t0, "entry"), ("b", "VIP/Gold", t0, "entry")]),
        ("r_entry_status", {"==": [{"var": "entry_status"}, "absent"]},
         [("a", "Ticket", t0 + timedelta(minutes=m), k) for m, k in
          ((0, "entry"), (1, "entry"), (2, "exit"), (3, "entry"), (4, "entry"))]),
        ("r_mixed", {"or": [{"and": [{"inList": [{"var": "product"}, {"objectList": [
                                         {"lookup": ["product", str(vip), "VIP"]}]}]},
                                     {"isAfter": [{"var": "now"}, custom(t0 + timedelta(minutes=30))]}]},
                            {"and": [{"inList": [{"var": "product"}, {"objectList": [
                                         {"lookup": ["product", str(ticket), "Ticket"]}]}]},
                                     {"<": [{"var": "entries_today"}, 1]},
                                     {"!=": [{"var": "now_isoweekday"}, day(2, 12).isoweekday()]}]}]},
         [("a", "VIP/Gold", t0, "entry"), ("a", "VIP/Gold", t0 + timedelta(minutes=31), "entry"),
          ("b", "Ticket", day(2, 12), "entry"), ("b", "Ticket", day(1, 12), "entry"),
          ("b", "Ticket", day(1, 13), "entry"), ("c", "Workshop", t0, "entry")]),
    ]


def test_rules_agree_with_real_pretix_scan_for_scan(real_pretix):
    srv = real_pretix
    device = srv.device_token("north")
    event = srv.event_detail()
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)  # every scan in the (recent) past
    scans = refused = disagreements = texts = 0
    report = []
    for list_name, rules, plan in _scenarios(srv, now):
        list_id = srv.add_list(list_name, allow_multiple_entries=True, rules=rules)
        positions = {}
        for key, spec, when, kind in plan:
            item, _, variation = spec.partition("/")
            if key not in positions:
                positions[key] = srv.order("p", item, variation=variation or None)
            pos = positions[key]
            history = [CheckIn(at=_parse(c["datetime"]), type=c["type"], list_id=c["list"])
                       for c in srv.checkins(pos)]
            mine = evaluate(rules, Facts(
                now=when, timezone=event["timezone"], product=pos.item, variation=pos.variation,
                gate=srv.gate_id("north"), list_id=list_id, checkins=history,
                date_from=_parse(event["date_from"]), date_to=_parse(event["date_to"]),
                date_admission=_parse(event["date_admission"]), clock=datetime.now(UTC)))
            answer = srv.redeem(pos.secret, list_name, when=when, type=kind, device=device)
            theirs = answer.get("status") == "ok"
            assert theirs or answer.get("reason") == "rules", answer  # nothing but the rules may refuse here
            if kind == "exit":
                assert theirs, answer
                continue
            scans += 1
            refused += not theirs
            if theirs != mine.allowed:
                disagreements += 1
                report.append(f"{list_name} {key}@{when.isoformat()}: pretix {answer}, gated {mine}")
            elif not theirs and answer.get("reason_explanation") != mine.explanation:
                texts += 1
                report.append(f"{list_name} {key}@{when.isoformat()}: pretix says "
                              f"{answer.get('reason_explanation')!r}, gated {mine.explanation!r}")
    print(f"\ndifferential: {scans} entry scans ({refused} refused by pretix) on {len(_scenarios(srv, now))} lists, "
          f"{disagreements} verdict disagreements, {texts} explanation differences")
    assert report == [], "\n".join(report)
    assert scans >= 60 and 20 <= refused <= scans - 20  # both verdicts well represented
