"""Prometheus metrics: the textfile and the endpoint parse with prometheus_client's own parser, and a
scan shows up in the counter and the histogram. Real store, real pipeline, real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import textwrap
import types

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gated import config as configmod
from gated import metrics
from gated.daemon import build
from gated.errors import ConfigError
from gated.model import Scan
from gated.store import StoreThread
from tests.test_mqtt import free_port


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_scan_shows_up_in_the_textfile_and_on_the_endpoint(load_config, tickets_csv, tmp_path):
    port = free_port()
    prom = tmp_path / "node-exporter" / "gated.prom"
    prom.parent.mkdir()
    csv = tickets_csv("token,name\nSECRET-TICKET-1,Ada Lovelace\n")
    config = load_config(textwrap.dedent(f"""
        [backend]
        type = "local"
        [backend.local]
        tickets = "{csv}"
        [metrics]
        textfile = "{prom}"
        listen = "127.0.0.1:{port}"
        interval_seconds = 1
    """))

    async def main() -> tuple[str, str]:
        parts = await build(config)
        await parts.backend.sync(parts.store)
        side = StoreThread(config.store.path, "sync")
        exporter = metrics.attach(config.metrics, parts.gate, metrics.Lane(
            side, lambda: parts.decider, lambda: {"front": True}, lambda: (412, 500)))
        try:
            await parts.gate.handle(Scan(token="SECRET-TICKET-1", reader="front"))
            await parts.gate.handle(Scan(token="NOT-A-TICKET", reader="front"))
            await exporter.once()
            async with httpx.AsyncClient() as client:
                served = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
        finally:
            exporter.close()
            side.close()
            await parts.close()
        return prom.read_text(), served

    written, served = asyncio.run(main())
    assert [p.name for p in prom.parent.iterdir()] == ["gated.prom"]  # the temporary file was renamed
    for text in (written, served):
        got = samples(text)
        assert got[("gated_scans_total", (("reason", "ok"), ("source", "offline"), ("verdict", "admit")))] == 1
        assert got[("gated_scans_total", (("reason", "unknown"), ("source", "offline"), ("verdict", "deny")))] == 1
        assert got[("gated_scan_to_relay_seconds_count", ())] == 2
        assert got[("gated_scan_to_relay_seconds_bucket", (("le", "1.0"),))] == 2
        assert got[("gated_scan_to_relay_seconds_sum", ())] > 0
        assert got[("gated_upload_queue_scans", ())] == 0
        assert got[("gated_lane_mode", (("mode", "normal"),))] == 1
        assert got[("gated_lane_mode", (("mode", "locked"),))] == 0
        assert got[("gated_reader_up", (("reader", "front"),))] == 1
        assert got[("gated_occupancy", ())] == 412 and got[("gated_capacity", ())] == 500
        assert got[("gated_breaker_open", (("backend", "local"),))] == 0
        assert got[("gated_offline_data_age_seconds", (("backend", "local"), ("kind", "decisions")))] == 0
        assert "SECRET" not in text and "Lovelace" not in text and "NOT-A-TICKET" not in text


def test_without_metrics_nothing_is_counted(load_config):
    config = load_config()
    assert config.metrics is None

    async def main():
        parts = await build(config)
        try:
            assert metrics.attach(config.metrics, parts.gate, None) is None
            assert parts.gate.on_decided == [] and parts.gate.on_logged == []
        finally:
            await parts.close()

    asyncio.run(main())


@pytest.mark.parametrize(("table", "message"), [
    ('listen = "localhost"', '[metrics] listen = "localhost": must be "host:port", e.g. "127.0.0.1:9464".'),
    ("interval_seconds = 0", "[metrics] interval_seconds = 0"),
    ('textfile = "/var/lib/node-exporter/gated.txt"', "node_exporter reads only files named *.prom"),
])
def test_metrics_config_problems_name_the_key(load_config, table, message):
    with pytest.raises(ConfigError) as e:
        load_config(f"[metrics]\n{table}\n")
    assert any(message in p for p in e.value.problems), e.value.problems


def test_every_metrics_problem_is_reported_at_once(load_config):
    with pytest.raises(ConfigError) as e:
        load_config('[metrics]\nlisten = "localhost"\ntextfile = "/var/lib/node-exporter/gated.txt"\n')
    assert [p.split(" =")[0] for p in e.value.problems] == ["[metrics] listen", "[metrics] textfile"]


def test_the_metrics_keys_are_the_designs():
    # A contract (docs/design.md): renaming a key breaks installers' files. test_docs checks the example.
    assert {"textfile", "listen", "interval_seconds"} == set(configmod.METRICS)


def test_a_scan_the_store_cannot_record_is_counted_too(load_config, tickets_csv, tmp_path, monkeypatch):
    """A failing store is what monitoring is for: its denies count like any other scan."""
    from gated.errors import StoreError
    from gated.store import Store

    csv = tickets_csv("token,name\nSECRET-TICKET-1,Ada Lovelace\n")
    config = load_config(textwrap.dedent(f"""
        [backend]
        type = "local"
        [backend.local]
        tickets = "{csv}"
        [metrics]
        textfile = "{tmp_path / 'gated.prom'}"
    """))

    def refuse(*args, **kwargs):
        raise StoreError("disk full")

    async def main() -> str:
        parts = await build(config)
        await parts.backend.sync(parts.store)
        side = StoreThread(config.store.path, "sync")
        exporter = metrics.attach(config.metrics, parts.gate, metrics.Lane(side, lambda: parts.decider, dict))
        try:
            monkeypatch.setattr(Store, "record", refuse)
            decision = await parts.gate.handle(Scan(token="SECRET-TICKET-1", reader="front"))
            assert str(decision.reason) == "error"
            return exporter.metrics.text().decode()
        finally:
            exporter.close()
            side.close()
            await parts.close()

    got = samples(asyncio.run(main()))
    assert got[("gated_scans_total", (("reason", "error"), ("source", "offline"), ("verdict", "deny")))] == 1
    assert got[("gated_scan_to_relay_seconds_count", ())] == 1


def test_without_occupancy_no_people_count_is_exported(load_config, tmp_path):
    """A lane that does not count people must not tell the venue's dashboard that nobody is inside."""
    from gated.daemon import Daemon

    config = load_config(f'[metrics]\ntextfile = "{tmp_path / "gated.prom"}"\n')

    async def main() -> str:
        daemon = Daemon(config)
        daemon.parts = parts = await build(config)
        side = StoreThread(config.store.path, "sync")
        daemon.syncer, daemon._reader_objs = types.SimpleNamespace(store=side), {}
        assert daemon._start_metrics([]) is None
        exporter = daemon.exporter
        try:
            await exporter.metrics.refresh(exporter.lane)
            return exporter.metrics.text().decode()
        finally:
            exporter.close()
            side.close()
            await parts.close()

    text = asyncio.run(main())
    assert "gated_occupancy" not in text and "gated_capacity" not in text
    assert "gated_scans_total" in text or "gated_scan_to_relay_seconds" in text
