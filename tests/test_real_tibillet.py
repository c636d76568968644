"""gated's TiBillet backend against the real TiBillet server (Lespass), run by hand.

CI cannot run it: Lespass's source is not available there. On a machine with a copy of
TiBillet/Lespass (see the TiBillet peer scripts, peers/tibillet-lespass/, kept outside this repository):

    LESPASS_GIT_DIR=... peers/tibillet-lespass/setup.sh /tmp/lespass-out/out.json   # fresh state
    peers/tibillet-lespass/start.sh 8780 /tmp/lespass.pid
    GATED_TIBILLET_OUT=/tmp/lespass-out/out.json .venv/bin/python -m pytest -s -v tests/test_real_tibillet.py
    peers/tibillet-lespass/stop.sh /tmp/lespass.pid

The tests run in file order and change the server's state (pairing is one-shot, scans count):
rerun setup.sh before running them again. Skipped when GATED_TIBILLET_OUT is not set.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

import httpx
import pytest

from gated import cli
from gated.daemon import build
from gated.doctor import run_checks
from gated.model import Reason, Scan, Source, Verdict
from gated.policy.tibillet import KeyRefused
from gated.store import Store
from gated.upload import Uploader

OUT = os.environ.get("GATED_TIBILLET_OUT", "")
pytestmark = pytest.mark.skipif(not OUT, reason="GATED_TIBILLET_OUT (the peer's out.json) is not set")


@pytest.fixture(scope="module")
def lespass():
    out = json.loads(Path(OUT).read_text())
    out["base_url"] = os.environ.get("GATED_TIBILLET_URL", out["base_url"])
    try:
        httpx.get(out["base_url"] + "/scan/check_api_scan/", timeout=5)
    except httpx.HTTPError as e:
        pytest.skip(f"the real server is not running at {out['base_url']}: {e}")
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory, lespass):
    path = tmp_path_factory.mktemp("real-tibillet")
    (path / "event.pem").write_text(lespass["event"]["public_pem"])
    (path / "other-event.pem").write_text(lespass["other_event"]["public_pem"])
    return path


def _config(lespass, folder: Path, url: str | None = None, extra: str = "", other_key: bool = False) -> Path:
    """An installer's config: the site's URL only (no path_prefix), the event and its public key (and
    with `other_key` the other event's too, as a festival's installer may list all its events' keys)."""
    path = folder / f"gated-{abs(hash((url, extra, other_key)))}.toml"
    keys = [folder / "other-event.pem", folder / "event.pem"] if other_key else [folder / "event.pem"]
    path.write_text(f"""
[lane]
name = "real-tibillet"
debounce_seconds = 0.0
[reader.front]
type = "stdin"
[gpio]
pin_factory = "mock"
[backend]
type = "tibillet"
url = "{url or lespass['base_url']}"
timeout_seconds = 2.0
[backend.tibillet]
public_keys = [{", ".join(f'"{k}"' for k in keys)}]
event_uuid = "{lespass['event']['uuid']}"
{extra}
[offline]
fallback = "deny"
[store]
path = "{folder / 'gated.db'}"
""")
    return path


def _check(lespass, code: str) -> dict:
    """The ticket as the server now has it, asked with the seeded device's key (changes nothing)."""
    response = httpx.post(lespass["base_url"] + "/scan/check_ticket/", json={"qrcode_data": code},
                          headers={"Authorization": lespass["auth_header"]}, timeout=10)
    return response.json().get("ticket") or response.json()


async def _decide(path: Path, codes: list[tuple[str, str]], sync: bool = False):
    from gated import config as configmod

    parts = await build(configmod.load(str(path)))
    try:
        if sync:
            await parts.backend.sync(parts.store)
        out = []
        for label, code in codes:
            d = await parts.gate.handle(Scan(token=code, reader="front"))
            print(f"  {label:<22} {d.verdict:<5} {d.reason:<17} {d.source:<7} {d.backend_code or d.message!s}")
            out.append(d)
        await parts.gate.drain()
        return out
    finally:
        await parts.close()


def test_1_pair_with_only_the_site_url(lespass, folder, capsys):
    path = _config(lespass, folder)
    rc = cli.main(["pair", "--config", str(path), lespass["pairing"]["token"]])
    out, err = capsys.readouterr()
    with capsys.disabled():
        print("\n$ gated pair CODE  (config: url only)\n" + out + err)
    assert rc == 0 and f"scan API at {lespass['base_url']}/scan/ (found)" in out
    assert 'health check: the new key is accepted as device "Gate B"' in out


def test_2_every_ticket_state_online(lespass, folder, capsys):
    t = lespass["tickets"]
    codes = [("valid", t["valid"][0]["qrcode_data"]), ("valid, again", t["valid"][0]["qrcode_data"]),
             ("already scanned", t["already_scanned"][0]["qrcode_data"]),
             ("canceled", t["canceled"][0]["qrcode_data"]), ("inactive", t["inactive"][0]["qrcode_data"]),
             ("created (unpaid)", t["created_unpaid"][0]["qrcode_data"]),
             ("other event", t["other_event"][0]["qrcode_data"]), ("unknown", t["unknown"][0]["qrcode_data"]),
             ("forged signature", t["forged_signature"][0]["qrcode_data"])]
    with capsys.disabled():
        print("\nonline, entry lane:")
        decisions = asyncio.run(_decide(_config(lespass, folder), codes))
        assert [(d.verdict, d.reason) for d in decisions] == [
            (Verdict.ADMIT, Reason.OK), (Verdict.DENY, Reason.ALREADY_USED), (Verdict.DENY, Reason.ALREADY_USED),
            (Verdict.DENY, Reason.CANCELED), (Verdict.DENY, Reason.REJECTED), (Verdict.DENY, Reason.NOT_PAID),
            (Verdict.DENY, Reason.WRONG_EVENT), (Verdict.DENY, Reason.UNKNOWN),
            (Verdict.DENY, Reason.INVALID_SIGNATURE)]
        assert all(d.source is Source.ONLINE for d in decisions)
        print("server state afterwards (check_ticket):")
        for label in ("canceled", "inactive", "created_unpaid", "other_event"):
            ticket = _check(lespass, t[label][0]["qrcode_data"])
            print(f"  {label:<22} {ticket['status']!r}, is_scanned {ticket['is_scanned']}")
            assert ticket["status"] == t[label][0]["status"] and ticket["is_scanned"] is False
        ticket = _check(lespass, t["valid"][0]["qrcode_data"])
        print(f"  {'valid':<22} {ticket['status']!r}, scanned_by {ticket['scanned_by']}")
        assert ticket["scanned_by"] == lespass["pairing"]["device_uuid"]


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_3_offline_signed_codes_and_downloaded_statuses(lespass, folder, capsys):
    t = lespass["tickets"]
    with capsys.disabled():
        print("\nstatuses downloaded from list_tickets, then the API unreachable:")

        async def sync():
            from gated import config as configmod
            parts = await build(configmod.load(str(_config(lespass, folder))))
            try:
                await parts.backend.sync(parts.store)
                return await parts.store.call(parts.backend.statuses, 0.0)
            finally:
                await parts.close()

        print(f"  synced: {asyncio.run(sync())[0]} tickets")
        codes = [("valid #2", t["valid"][1]["qrcode_data"]), ("valid #3", t["valid"][2]["qrcode_data"]),
                 ("valid #3, again", t["valid"][2]["qrcode_data"]),
                 ("canceled", t["canceled"][0]["qrcode_data"]),
                 ("created (unpaid)", t["created_unpaid"][0]["qrcode_data"]),
                 ("already scanned", t["already_scanned"][0]["qrcode_data"]),
                 ("other event", t["other_event"][0]["qrcode_data"]),
                 ("forged signature", t["forged_signature"][0]["qrcode_data"])]
        decisions = asyncio.run(_decide(_config(lespass, folder, url=_dead_url()), codes))
        assert [(d.verdict, d.reason) for d in decisions] == [
            (Verdict.ADMIT, Reason.OK), (Verdict.ADMIT, Reason.OK), (Verdict.DENY, Reason.ALREADY_USED),
            (Verdict.DENY, Reason.CANCELED), (Verdict.DENY, Reason.NOT_PAID), (Verdict.DENY, Reason.ALREADY_USED),
            (Verdict.DENY, Reason.INVALID_SIGNATURE), (Verdict.DENY, Reason.INVALID_SIGNATURE)]
        assert all(d.source is Source.OFFLINE for d in decisions)

        print("with the other event's key configured too (synced again), the API unreachable:")
        asyncio.run(_decide(_config(lespass, folder, other_key=True), [], sync=True))
        both = asyncio.run(_decide(_config(lespass, folder, url=_dead_url(), other_key=True),
                                   [("valid #4", t["valid"][3]["qrcode_data"]), codes[6]]))
        assert [(d.verdict, d.reason) for d in both] == [(Verdict.ADMIT, Reason.OK), (Verdict.DENY, Reason.WRONG_EVENT)]


def test_4_upload_after_recovery(lespass, folder, capsys):
    t = lespass["tickets"]

    async def drain():
        from gated import config as configmod
        parts = await build(configmod.load(str(_config(lespass, folder))))
        try:
            before = await parts.store.call(Store.queue_stats)
            sent = await Uploader(parts.backend, parts.store).drain()
            return before, sent, await parts.store.call(Store.queue_stats)
        finally:
            await parts.close()

    with capsys.disabled():
        before, sent, after = asyncio.run(drain())
        print(f"\nupload after recovery: {before.pending} queued, {sent} done, {after.pending} left, "
              f"{after.parked} parked")
        for label, ticket in (("valid #2", t["valid"][1]), ("valid #3", t["valid"][2]),
                              ("canceled", t["canceled"][0])):
            now = _check(lespass, ticket["qrcode_data"])
            print(f"  {label:<22} {now['status']!r}, scanned_by {now['scanned_by']}")
        assert after.pending == 0 and after.parked == 0
        for ticket in t["valid"][1:3]:
            assert _check(lespass, ticket["qrcode_data"])["scanned_by"] == lespass["pairing"]["device_uuid"]
        assert _check(lespass, t["canceled"][0]["qrcode_data"])["status"] == t["canceled"][0]["status"]


def test_5_refused_keys_are_named_in_pair_probe_and_doctor(lespass, folder, capsys):
    bad = folder / "bad.key"
    bad.write_text("AAAAAAAA.wrongwrongwrongwrongwrongwrongwr\n")
    bad.chmod(0o600)
    archived = folder / "archived.key"
    archived.write_text(lespass["archived_device_api_key"] + "\n")
    archived.chmod(0o600)
    with capsys.disabled():
        print()
        for label, key in (("unknown key", bad), ("archived device", archived)):
            path = _config(lespass, folder, extra=f'api_key_file = "{key}"')

            async def probe(path=path):
                from gated import config as configmod
                parts = await build(configmod.load(str(path)))
                try:
                    await parts.backend.probe()
                finally:
                    await parts.close()

            with pytest.raises(KeyRefused) as refused:
                asyncio.run(probe())
            print(f"  probe, {label}: {refused.value}")
            backend = next(c for c in run_checks(str(path))[0] if c.name == "backend")
            print(f"  gated doctor, {label}: {backend.status} {backend.detail}\n    -> {backend.fix}")
            assert backend.status == "FAIL" and "credentials refused" in backend.detail
