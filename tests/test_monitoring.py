"""Metrics end to end: the textfile written by ``syncd sync`` and ``/metrics`` served by ``syncd run``,
read by the real consumers (promtool, prometheus-node-exporter, prometheus) from Debian's packages."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness import World
from prom import NodeExporter, promtool_check_metrics, samples, start_node_exporter, start_prometheus
from servers import free_port
from test_daemon import Daemon

pytestmark = pytest.mark.e2e


def test_sync_writes_the_textfile_and_its_counters_survive_runs(world: World, tmp_path: Path) -> None:
    """Each `syncd sync` rewrites the textfile (0644, promtool-clean); download counters add up across
    processes (they live in the ledger); a failing asset shows in syncd_assets and syncd_last_pass_success;
    a dry run writes nothing."""
    textdir = tmp_path / "textfile"
    textdir.mkdir()
    prom = textdir / "syncd.prom"
    world.write_config(metrics={"textfile": str(prom)})
    a = world.asset("a.bin", 3000, seed=1)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    assert world.sync("--dry-run").code == 0 and not prom.exists()
    assert world.sync().code == 0
    first = samples(prom.read_text())
    assert prom.stat().st_mode & 0o777 == 0o644
    assert first['syncd_downloads_total{result="ok"}'] == 1 and first["syncd_downloaded_bytes_total"] == 3000
    assert first["syncd_last_pass_success"] == 1 and first['syncd_assets{state="published"}'] == 1
    assert promtool_check_metrics(prom.read_text()) == (0, "")
    b = world.asset("b.bin", 500, seed=2)
    world.manifest("b.toml", {**b, "dest": "b.bin"})
    world.manifest("c.toml", {**b, "sha256": "0" * 64, "dest": "c.bin"})
    commit = world.repo.commit("b and a bad c")
    assert world.sync().code == 1
    second = samples(prom.read_text())
    assert second['syncd_downloads_total{result="ok"}'] == 2
    assert second['syncd_downloads_total{result="failed"}'] == 1
    assert second["syncd_downloaded_bytes_total"] == 3500
    assert second["syncd_last_pass_success"] == 0 and second['syncd_assets{state="failing"}'] == 1
    assert second['syncd_git_fetch_total{result="ok"}'] == 2  # a dry run records nothing
    assert second["syncd_last_success_timestamp_seconds"] == first["syncd_last_pass_timestamp_seconds"]
    assert not any(commit in k for k in second)  # not in sync at the new commit: the old one is shown
    assert sorted(p.name for p in textdir.iterdir()) == ["syncd.prom"]
    assert not re.search(r'dest="', prom.read_text())


# the real consumers: node_exporter's textfile collector and a prometheus server ---------------------------


@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[tuple[NodeExporter, Path]]:
    textdir = tmp_path / "node-exporter"
    textdir.mkdir()
    with start_node_exporter(tmp_path / "ne", textdir) as exporter:
        yield exporter, textdir


def test_prometheus_scrapes_the_daemon_and_node_exporter_reads_the_textfile(
    world: World, tmp_path: Path, node_exporter: tuple[NodeExporter, Path]
) -> None:
    """A daemon with [http] listen and [metrics] textfile: prometheus scrapes /metrics and node_exporter
    (which reads the textfile), and its API returns syncd's values from both; promtool is clean on both."""
    exporter, textdir = node_exporter
    port = free_port()
    world.write_config(
        schedule={"interval": "1h"},
        http={"listen": f"127.0.0.1:{port}"},
        metrics={"textfile": str(textdir / "syncd.prom")},
    )
    a = world.asset("a.bin", 4096, seed=7)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    commit = world.repo.commit("a")
    d = Daemon(world, tmp_path)
    prom = None
    try:
        d.wait_event("pass_finished")
        served = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert served.status_code == 200 and served.headers["content-type"].startswith("text/plain")
        assert promtool_check_metrics(served.text) == (0, "")
        textfile = (textdir / "syncd.prom").read_text()
        assert promtool_check_metrics(textfile) == (0, "")
        scraped = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5).text
        assert "syncd_last_pass_success 1" in scraped
        assert "node_textfile_scrape_error 0" in scraped
        prom = start_prometheus(tmp_path / "prom", {"syncd": f"127.0.0.1:{port}", "node": exporter.target})
        for job in ("syncd", "node"):
            on = {"job": job}
            assert prom.wait_for("syncd_last_pass_success", match=on) == 1.0
            assert prom.wait_for("syncd_downloaded_bytes_total", match=on) == 4096.0
            (labels, _), *_ = prom.query("syncd_synced_commit_info", match=on)
            assert labels["commit"] == commit
        age = prom.wait_for("time() - syncd_last_success_timestamp_seconds", match={"job": "syncd"})
        assert 0 <= age < 120
        assets = {labels["state"]: v for labels, v in prom.query('syncd_assets{job="syncd"}')}
        assert assets["published"] == 1.0 and len(assets) == 6
        assert d.stop() == 0
    finally:
        if prom is not None:
            prom.stop()
        d.close()
