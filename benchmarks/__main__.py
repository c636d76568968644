"""`python -m benchmarks [--quick] [--markdown FILE]`: each performance figure of docs/design.md with
its target and a verdict by measurement (pass or FAIL); rows without a target say "-"."""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Figure, line

# Each module has `figures(quick)`, which returns or yields its rows. A new module joins with one line.
FIGURE_MODULES = [
    "benchmarks.core",
    "benchmarks.decoders",
    "benchmarks.entry_figures",
    "benchmarks.cm_figures",
    "benchmarks.pretix_figures",
    "benchmarks.venue_figures",
]

# `--markdown FILE` replaces what stands between these two lines when FILE has them (so
# benchmarks/README.md keeps its prose around the run), and writes the run alone otherwise.
BEGIN = "<!-- benchmark run: written by `python -m benchmarks --markdown`, do not edit by hand -->"
END = "<!-- end of benchmark run -->"


def collect(quick: bool, show: Callable[[Figure], None] = lambda fig: None) -> list[Figure]:
    """Every module's rows in order. A module that cannot be imported, or a figure that raises, is a
    FAIL row with the exception's first line, never left out."""
    rows: list[Figure] = []
    for name in FIGURE_MODULES:
        # What one module wrote and left to the kernel must not be written back during the next one's commits.
        os.sync()
        try:
            for fig in importlib.import_module(name).figures(quick):
                rows.append(fig)
                show(fig)
        except Exception as exc:  # noqa: BLE001 (any failure becomes a row, and the run goes on)
            fig = Figure.broken(name, exc)
            rows.append(fig)
            show(fig)
    return rows


def summary(rows: list[Figure]) -> str:
    targeted = [f for f in rows if f.ok is not None and not f.error]
    below = [f for f in targeted if f.ok is False]
    broken = [f for f in rows if f.error]
    text = f"{len(targeted)} figures with targets, {len(below)} below target"
    return text + (f", {len(broken)} could not run" if broken else "")


def table(rows: list[Figure]) -> str:
    width = max([len("figure")] + [len(f.name) for f in rows])
    lines = [f"{'figure'.ljust(width)}  {'value':60}  {'target':16}  result"]
    lines += [f"{f.name.ljust(width)}  {f.value:60}  {f.target:16}  {f.verdict}" for f in rows]
    return "\n".join(lines)


def machine() -> str:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{platform.node()}: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}; load average (1/5/15 min) at the start {load}")


def markdown(rows: list[Figure], *, quick: bool, facts: str, started: str, seconds: float) -> str:
    def cell(text: str) -> str:
        indent = len(text) - len(text.lstrip(" "))  # sub-rows are indented; Markdown drops leading spaces
        return "&nbsp;" * indent + text.lstrip(" ").replace("|", "\\|")

    mode = "a quick run: 100,000 tickets instead of 1,000,000, fewer repetitions" if quick else "a full run"
    lines = [
        BEGIN,
        f"- command: `python -m benchmarks{' --quick' if quick else ''}` ({mode})",
        f"- date: {started}",
        f"- machine: {facts}",
        f"- result: {summary(rows)}, {seconds:.0f} s",
        "",
        "| figure | value | target | result |",
        "|---|---|---|---|",
    ]
    lines += [f"| {cell(f.name)} | {cell(f.value)} | {cell(f.target)} | {f.verdict} |" for f in rows]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        text = head + text.rstrip("\n") + rest.split(END, 1)[1]
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100,000 tickets instead of 1,000,000, fewer repetitions")
    parser.add_argument("--markdown", metavar="FILE", type=Path,
                        help="also write the run (machine, date, every row with its target and verdict) "
                             "as Markdown to FILE")
    args = parser.parse_args(argv)
    facts = machine()
    started_at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"gated benchmarks on {facts}{' (quick)' if args.quick else ''}", flush=True)
    started = time.monotonic()
    rows = collect(args.quick, show=lambda fig: print(line(fig), flush=True))
    seconds = time.monotonic() - started
    print(f"\n{table(rows)}\n\n{summary(rows)}, {seconds:.0f} s")
    if args.markdown:
        write_markdown(args.markdown, markdown(rows, quick=args.quick, facts=facts, started=started_at,
                                               seconds=seconds))
    return 1 if any(f.ok is False for f in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
