"""`python -m benchmarks [--quick]`: each DESIGN.md performance figure with its target, pass or FAIL."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import sys
import time

from benchmarks import core
from benchmarks.common import Figure


def figures(quick: bool) -> list:
    n_tickets = 100_000 if quick else 1_000_000
    runs = [
        lambda: core.offline_decision(n_tickets, 1000, 300 if quick else 3000),
        lambda: [core.commit_only(200 if quick else 2000)],
        lambda: core.cold_start(3 if quick else 10),
        lambda: [core.memory(n_tickets)],
    ]
    # Figures that need a backend's simulator live beside it; they join when their module exists.
    for name in ("decoders", "entry_figures", "cm_figures", "venue_figures"):
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError:
            continue
        runs.append(lambda m=module: m.figures(quick))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller data sets, under a minute")
    args = parser.parse_args()
    print(f"gated benchmarks on {platform.node()}: {platform.machine()}, {shutil.os.cpu_count()} cores, "
          f"Python {platform.python_version()}{' (quick)' if args.quick else ''}")
    rows: list[Figure] = []
    started = time.monotonic()
    for run in figures(args.quick):
        # What one figure wrote and left to the kernel (a 1,000,000-line CSV) must not be written
        # back in the middle of the next one's commits.
        os.sync()
        for fig in run():
            rows.append(fig)
            print(f"  {fig.verdict:4}  {fig.name}: {fig.value}  [target {fig.target}]", flush=True)
    width = max(len(f.name) for f in rows)
    print(f"\n{'figure'.ljust(width)}  {'value':60}  {'target':16}  result")
    for f in rows:
        print(f"{f.name.ljust(width)}  {f.value:60}  {f.target:16}  {f.verdict}")
    failed = [f for f in rows if f.ok is False]
    print(f"\n{len(rows)} figures, {len(failed)} below target, {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
