"""The benchmark harness tells the truth: verdicts, the summary, broken figures and the Markdown run.

Fake figure modules are put in `sys.modules` and named in `FIGURE_MODULES`, so these tests take
milliseconds and say nothing about performance; the few small real runs at the end check that a
figure measures what it names.
"""

from __future__ import annotations

import sys
import types

import pytest

import benchmarks.__main__ as harness
from benchmarks.common import Figure


def _module(name: str, figures) -> types.ModuleType:
    module = types.ModuleType(name)
    module.figures = figures
    return module


@pytest.fixture
def modules(monkeypatch):
    """modules({name: figures function or None}) registers fakes in that order; None: not importable."""

    def register(fakes: dict) -> None:
        for name, figures in fakes.items():
            if figures is not None:
                monkeypatch.setitem(sys.modules, name, _module(name, figures))
            else:
                monkeypatch.delitem(sys.modules, name, raising=False)
        monkeypatch.setattr(harness, "FIGURE_MODULES", list(fakes))
        monkeypatch.setattr(harness.os, "sync", lambda: None)  # nothing was written worth syncing

    return register


def test_a_row_without_a_target_says_dash_and_cannot_pass_or_fail():
    assert Figure("import of a list", "4.2 s").verdict == "-"
    # The old rows in cm_figures said "pass" with no target; such a row is now refused where it is made.
    with pytest.raises(ValueError, match="verdict exactly when it has a target"):
        Figure("download process RSS", "49.9 MB", "-", True)
    with pytest.raises(ValueError, match="verdict exactly when it has a target"):
        Figure("scans during a reload", "p99 5.6 ms", "p99 <= 5 ms", None)


def test_a_row_with_a_target_says_pass_or_fail_by_its_measurement():
    assert Figure("cold start", "163 ms", "<= 500 ms", True).verdict == "pass"
    assert Figure("scans during a reload", "p99 5.60 ms", "p99 <= 5 ms", False).verdict == "FAIL"


def test_the_summary_counts_only_rows_with_targets():
    rows = [Figure("a", "1", "<= 2", True), Figure("b", "3", "<= 2", False), Figure("c", "x"), Figure("d", "y")]
    assert harness.summary(rows) == "2 figures with targets, 1 below target"


def test_a_module_that_cannot_be_imported_is_a_fail_row_and_the_run_exits_non_zero(modules, capsys):
    modules({"fake_ok": lambda quick: [Figure("fine", "1 ms", "<= 5 ms", True)],
             "benchmarks.no_such_figures": None})
    rows = harness.collect(quick=True)
    assert [(f.name, f.verdict) for f in rows] == [
        ("fine", "pass"), ("benchmarks.no_such_figures: could not run", "FAIL")]
    assert rows[1].value == "ModuleNotFoundError: No module named 'benchmarks.no_such_figures'"
    assert harness.summary(rows) == "1 figures with targets, 0 below target, 1 could not run"
    assert harness.main(["--quick"]) == 1
    assert "FAIL  benchmarks.no_such_figures: could not run" in capsys.readouterr().out


def test_a_figure_that_raises_keeps_the_rows_before_it_and_the_next_module_still_runs(modules):
    def half(quick):
        yield Figure("measured first", "1 ms")
        raise RuntimeError("simulator did not start\nlong traceback text")

    modules({"fake_half": half, "fake_next": lambda quick: [Figure("next", "2 ms", "<= 5 ms", True)]})
    rows = harness.collect(quick=True)
    assert [(f.name, f.value, f.verdict) for f in rows] == [
        ("measured first", "1 ms", "-"),
        ("fake_half: could not run", "RuntimeError: simulator did not start", "FAIL"),
        ("next", "2 ms", "pass")]


def test_all_targets_met_exits_zero_and_a_missed_one_exits_one(modules):
    modules({"fake": lambda quick: [Figure("a", "1 ms", "<= 5 ms", True), Figure("b", "context")]})
    assert harness.main([]) == 0
    modules({"fake": lambda quick: [Figure("a", "6 ms", "<= 5 ms", False)]})
    assert harness.main([]) == 1


def test_quick_is_passed_to_every_module(modules):
    seen = []
    modules({"fake": lambda quick: seen.append(quick) or []})
    harness.collect(quick=True)
    harness.collect(quick=False)
    assert seen == [True, False]


def test_markdown_holds_the_machine_the_date_and_every_row_with_its_target_and_verdict(modules, tmp_path):
    modules({"fake": lambda quick: [Figure("offline decision", "p99 1.34 ms", "p99 <= 5 ms", True),
                                    Figure("  of which the commit", "p99 0.69 ms"),
                                    Figure("upload | pages", "4.8 s", "<= 30 s", False)]})
    out = tmp_path / "run.md"
    assert harness.main(["--quick", "--markdown", str(out)]) == 1
    text = out.read_text()
    assert text.startswith(harness.BEGIN) and text.rstrip().endswith(harness.END)
    assert "- command: `python -m benchmarks --quick` (a quick run: " in text
    assert "- date: 20" in text and " UTC" in text
    assert f"- machine: {harness.platform.node()}: " in text and "cores" in text
    assert "- result: 2 figures with targets, 1 below target, " in text
    assert "| offline decision | p99 1.34 ms | p99 <= 5 ms | pass |" in text
    assert "| &nbsp;&nbsp;of which the commit | p99 0.69 ms | - | - |" in text
    assert "| upload \\| pages | 4.8 s | <= 30 s | FAIL |" in text


def test_markdown_replaces_only_the_run_in_a_file_that_has_one(modules, tmp_path):
    modules({"fake": lambda quick: [Figure("new row", "1 ms", "<= 5 ms", True)]})
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\nprose before\n\n{harness.BEGIN}\n| old row |\n{harness.END}\n\nprose after\n")
    harness.main(["--markdown", str(readme)])
    text = readme.read_text()
    assert text.startswith("# Benchmarks\n\nprose before\n\n" + harness.BEGIN)
    assert text.endswith(harness.END + "\n\nprose after\n")
    assert "| new row | 1 ms | <= 5 ms | pass |" in text and "old row" not in text
    assert text.count(harness.BEGIN) == 1 and text.count(harness.END) == 1


def test_the_venue_figure_measures_the_metrics_hook_the_scan_path_runs():
    """A small real run: the figure times the hook gated.metrics puts on the scan path, and the
    textfile it exports shows the scans (this broke once when the hook moved)."""
    from benchmarks.venue_figures import offline_with_metrics

    offline, hook = offline_with_metrics(200, 5, 30)
    assert offline.ok is not None and "n=30" in offline.value
    assert hook.ok is None and " 0 scan series" not in hook.value and "scan series written" in hook.value


def test_a_figure_module_run_alone_prints_each_row_and_exits_one_on_a_fail(capsys):
    from benchmarks.common import show

    assert show([Figure("a", "1 ms", "<= 5 ms", True), Figure("b", "context")]) == 0
    assert show([Figure("a", "6 ms", "<= 5 ms", False), Figure("b", "context")]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "  FAIL  a: 6 ms  [target <= 5 ms]" and len(out) == 4


def test_the_breaker_open_figure_refuses_to_measure_when_the_breaker_never_opens(monkeypatch):
    """A refused connection is fast: scans that still asked the API would pass "breaker open" unmeasured."""
    from benchmarks.entry_figures import dead_server
    from gated.policy.breaker import Breaker

    monkeypatch.setattr(Breaker, "record", lambda self, ok, elapsed, now: False)
    with pytest.raises(AssertionError, match="the breaker did not open"):
        dead_server(1)


def test_the_hanging_burst_figure_refuses_to_measure_an_api_that_answers(monkeypatch):
    from benchmarks.entry_figures import hanging_burst
    from gated.simulators.entry import EntrySimulator

    real_start = EntrySimulator.start

    def never_stalls(self):
        started = real_start(self)
        self.stall.set = lambda: None
        return started

    monkeypatch.setattr(EntrySimulator, "start", never_stalls)
    with pytest.raises(AssertionError, match="the API was not hanging"):
        hanging_burst(1)


def test_the_scans_during_a_pretix_sync_figure_refuses_a_sync_of_the_changes_alone(monkeypatch):
    from benchmarks.pretix_figures import child, start_simulator
    from gated.store import Store

    real_get = Store.get

    def since_remembered(self, key, *args, **kw):  # as if forgetting the last download failed
        return "2026-01-01T00:00:00Z" if ":orders_since:" in key else real_get(self, key, *args, **kw)

    monkeypatch.setattr(Store, "get", since_remembered)
    sim, url, token = start_simulator(200)
    try:
        with pytest.raises(AssertionError, match="the sync was not a full download"):
            child(url, token, 200, 30, 1)
    finally:
        sim.terminate()
        sim.wait(10)


def test_a_cm_sync_that_loaded_less_than_it_was_given_fails_however_fast(monkeypatch):
    import benchmarks.cm_figures as cm

    class Sim:
        pid = 0

        def terminate(self): ...

        def wait(self, timeout): ...

    measured = {"ingest_s": 0.5, "loaded": 99_999, "rss_before_mb": 40.0, "peak_rss_mb": 41.0,
                "first_reload": {"peak_rss_mb": 45.0, "written_mb": 30.0}, "decide_ms": [1.0], "paced_ms": [1.0],
                "paced_steal": 0.0, "during_reload_ms": [1.0], "reload_s": 5.0, "commits": [0.5],
                "reload_steal": 0.0, "competing_ms": [1.0], "upload_s": 0.1, "uploaded": 2000}
    monkeypatch.setattr(cm, "start_simulator", lambda barcodes: (Sim(), "http://127.0.0.1:9"))
    monkeypatch.setattr(cm, "run_child", lambda *args, timeout: measured)
    sync = cm.figures(quick=True)[0]
    assert sync.verdict == "FAIL" and "99,999 loaded" in sync.value
