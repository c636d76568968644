"""What asking `check_ticket/` before `ticket/` costs per scan on the real TiBillet server.

An entry scan on TiBillet is now two calls: `check_ticket/` (the status; nothing changes) and, for a
valid ticket only, `ticket/`. This times, through gated's own backend and HTTP client, interleaved:

- `check_ticket/` alone: what the status check adds to each admitted scan;
- `ticket/` alone, for an already scanned ticket (the server does the same lookups, without the save);
- gated's whole online decision for that ticket (`validate`: the check answers, nothing is scanned).

Usage (the real server running, see the TiBillet peer scripts, peers/tibillet-lespass/, kept outside this repository; changes nothing):

    .venv/bin/python scripts/tibillet_scan_cost.py /tmp/lespass-out/out.json [N]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from gated import config as configmod
from gated.model import Scan, ScanMode
from gated.policy.tibillet import TibilletBackend


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[int(len(values) * 0.9) - 1]
    return f"p50 {statistics.median(values) * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, max {values[-1] * 1000:.1f} ms"


async def main(out_path: str, n: int) -> None:
    out = json.loads(Path(out_path).read_text())
    folder = Path(tempfile.mkdtemp(prefix="tibillet-cost-"))
    key = folder / "api.key"
    key.write_text(out["api_key"] + "\n")
    key.chmod(0o600)
    config_path = folder / "gated.toml"
    config_path.write_text(f"""
[lane]
name = "cost"
[reader.front]
type = "stdin"
[backend]
type = "tibillet"
url = "{out['base_url']}"
timeout_seconds = 2.0
[backend.tibillet]
path_prefix = "/scan/"
event_uuid = "{out['event']['uuid']}"
api_key_file = "{key}"
[store]
path = "{folder / 'gated.db'}"
""")
    backend = TibilletBackend(configmod.load(str(config_path)))
    await backend.start(None)
    code = out["tickets"]["already_scanned"][0]["qrcode_data"]
    check, scan, decide = [], [], []
    try:
        for _ in range(5):  # connection made, server warm
            await backend.validate(Scan(token=code), ScanMode.ENTRY)
        for _ in range(n):
            t = time.perf_counter()
            assert (await backend._post("check_ticket/", code)).status_code == 200
            check.append(time.perf_counter() - t)
            t = time.perf_counter()
            assert (await backend._post("ticket/", code)).status_code == 200
            scan.append(time.perf_counter() - t)
            t = time.perf_counter()
            await backend.validate(Scan(token=code), ScanMode.ENTRY)
            decide.append(time.perf_counter() - t)
    finally:
        await backend.close()
    print(f"TiBillet (Lespass 1.8.28, 1 gunicorn worker, 127.0.0.1), n={n} each, interleaved:")
    print(f"  check_ticket/ alone (added to each admitted scan): {_ms(check)}")
    print(f"  ticket/ alone (already scanned ticket):            {_ms(scan)}")
    print(f"  gated validate, status check only (deny):          {_ms(decide)}")
    both = (statistics.median(check) + statistics.median(scan)) * 1000
    print(f"  admitted scan = check_ticket/ + ticket/ ≈ {both:.1f} ms at p50 "
          f"(was ticket/ alone: {statistics.median(scan) * 1000:.1f} ms)")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200))
