"""The local backend's ticket list: a file a technician edits by hand, so hostile until checked."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gated.daemon import build
from gated.model import Reason, Scan
from gated.policy.local import TicketListError, read_ticket_csv

GOOD = b"token,name,valid_until,max_entries\nT-1,Ada,,\nT-2,Bob,2099-01-01T00:00:00Z,2\n"

# (file content, what the error says): each is a whole file that must not load.
BAD = {
    "latin-1": (b"token,name\nT-1,Ada\nT-9,Ren\xe9e\n", "line 3: not UTF-8 text (byte 0xe9"),
    "field over 128 KiB": (b'token,name\nT-1,Ada\nT-9,"' + b"x" * (140 * 1024) + b'"\n',
                           "line 3: a field longer than 128 KiB"),
    "unclosed quote": (b'token,name\nT-1,Ada\nT-9,"Eve\n' + b"T-3,Zed\n" * 20000, "line 3: a field longer"),
    "max_entries 2**66": (b"token,max_entries\nT-1,1\nT-9,99999999999999999999\n",
                          "line 3: max_entries = '99999999999999999999': must be a whole number from 0 to 1000000"),
    "max_entries negative": (b"token,max_entries\nT-1,1\nT-9,-1\n", "line 3: max_entries = '-1'"),
    "valid_until nan": (b"token,valid_until\nT-1,\nT-9,nan\n", "line 3: valid_until = 'nan': not a time from 1970"),
    "valid_until inf": (b"token,valid_until\nT-1,\nT-9,inf\n", "line 3: valid_until = 'inf'"),
    "valid_until 1e300": (b"token,valid_until\nT-1,\nT-9,1e300\n", "line 3: valid_until = '1e300'"),
    "valid_from year 10000": (b"token,valid_from\nT-1,\nT-9,10000-01-01\n", "line 3: valid_from = '10000-01-01'"),
    "valid_until not a time": (b"token,valid_until\nT-1,\nT-9,soon\n", "line 3: valid_until = 'soon'"),
}


@pytest.mark.parametrize("content,said", BAD.values(), ids=BAD.keys())
def test_a_bad_list_is_refused_naming_the_file_and_line(tmp_path, content, said):
    path = tmp_path / "tickets.csv"
    path.write_bytes(content)
    with pytest.raises(TicketListError) as e:
        list(read_ticket_csv(str(path)))
    assert str(e.value).startswith(f"{path}, {said}")
    assert "\n" not in str(e.value)  # one log line


def test_a_utf8_list_saved_by_excel_loads_with_its_names(tmp_path):
    path = tmp_path / "tickets.csv"
    path.write_bytes(b"\xef\xbb\xbftoken,name\r\nT-1,Ren\xc3\xa9e\r\nT-2,\"Line\r\nbreak\"\r\n")
    rows = list(read_ticket_csv(str(path)))
    assert [(r["token"], r["name"]) for r in rows] == [("T-1", "Renée"), ("T-2", "Line\r\nbreak")]


@pytest.fixture
def local_config(load_config, tmp_path):
    def make():
        return load_config(f'[backend.local]\ntickets = "{tmp_path / "tickets.csv"}"\n')

    (tmp_path / "tickets.csv").write_bytes(GOOD)
    return make


async def _sync_then_scan(config, tokens: list[str]) -> list:
    parts = await build(config)
    try:
        await parts.backend.sync(parts.store)
        return [await parts.gate.handle(Scan(token=t, reader="front")) for t in tokens]
    finally:
        await parts.close()


@pytest.mark.parametrize("content,said", BAD.values(), ids=BAD.keys())
def test_a_bad_list_keeps_the_previous_one_and_says_which_file_and_line(local_config, tmp_path, caplog,
                                                                       content, said):
    config = local_config()
    assert asyncio.run(_sync_then_scan(config, ["T-1"]))[0].admitted
    (tmp_path / "tickets.csv").write_bytes(content)  # the edited file replaces the good one
    with caplog.at_level(logging.ERROR, logger="gated"):
        second, nine = asyncio.run(_sync_then_scan(config, ["T-2", "T-9"]))
    assert second.admitted  # the previous list still decides
    assert nine.reason is Reason.UNKNOWN  # nothing of the bad file was loaded
    refused = [r.getMessage() for r in caplog.records if "ticket list not loaded" in r.getMessage()]
    assert len(refused) == 1 and f"{tmp_path / 'tickets.csv'}, {said}" in refused[0]
    assert "keeping the previous list (2 tickets)" in refused[0]


def test_a_ticket_valid_until_nan_is_never_admitted(local_config, tmp_path):
    (tmp_path / "tickets.csv").write_bytes(b"token,valid_until\nT-1,\nT-NAN,nan\n")
    assert not asyncio.run(_sync_then_scan(local_config(), ["T-NAN"]))[0].admitted


def test_a_bad_list_at_start_is_a_log_line_and_a_verdict_not_a_traceback(local_config, tmp_path):
    config = local_config()
    (tmp_path / "tickets.csv").write_bytes(BAD["latin-1"][0])
    r = subprocess.run([sys.executable, "-m", "gated", "scan", "--config", config.path, "T-1"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and " DENY unknown " in r.stdout  # no list was ever loaded
    assert "Traceback" not in r.stderr
    assert f"ticket list not loaded: {tmp_path / 'tickets.csv'}, line 3: not UTF-8 text" in r.stderr


def test_a_refused_file_is_not_read_again_until_it_changes(local_config, tmp_path, caplog):
    async def run(config):
        parts = await build(config)
        try:
            for _ in range(3):
                await parts.backend.sync(parts.store)
            Path(config.backend_options.tickets).write_bytes(GOOD)
            await parts.backend.sync(parts.store)
            return await parts.gate.handle(Scan(token="T-1", reader="front"))
        finally:
            await parts.close()

    (tmp_path / "tickets.csv").write_bytes(BAD["valid_until nan"][0])
    with caplog.at_level(logging.INFO, logger="gated"):
        decision = asyncio.run(run(local_config()))
    messages = [r.getMessage() for r in caplog.records]
    assert sum("ticket list not loaded" in m for m in messages) == 1  # once, not once per sync
    assert decision.admitted and any("loaded: 2 tickets" in m for m in messages)
