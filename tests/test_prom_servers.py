"""Self-test of tests/prom.py: node_exporter's textfile collector, a prometheus server and promtool, all
from Debian's packages, on 127.0.0.1 only."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from prom import (
    NodeExporter,
    Prometheus,
    listening_addresses,
    promtool_check_metrics,
    start_node_exporter,
    start_prometheus,
)
from servers import FaultServer, _pid_alive

pytestmark = pytest.mark.integration
pytest_plugins = ["prom_fixtures"]  # until tests/conftest.py registers it for every module

TEXTFILE = (
    "# HELP syncd_last_pass_success Whether the last pass succeeded (1) or not (0).\n"
    "# TYPE syncd_last_pass_success gauge\n"
    "syncd_last_pass_success 1\n"
)
SERVED = (
    "# HELP syncd_last_pass_success Whether the last pass succeeded (1) or not (0).\n"
    "# TYPE syncd_last_pass_success gauge\n"
    "syncd_last_pass_success 0\n"
    "# HELP syncd_downloads_total Downloads by result.\n"
    "# TYPE syncd_downloads_total counter\n"
    'syncd_downloads_total{result="ok"} 7\n'
    'syncd_downloads_total{result="failed"} 2\n'
)
BAD = (  # a counter without the _total suffix
    "# HELP syncd_downloaded_bytes Bytes downloaded.\n"
    "# TYPE syncd_downloaded_bytes counter\n"
    "syncd_downloaded_bytes 5\n"
)


def test_node_exporter_and_prometheus_read_the_textfile_and_a_metrics_endpoint(tmp_path: Path) -> None:
    textfile_dir = tmp_path / "textfile"
    textfile_dir.mkdir()
    (textfile_dir / "syncd.prom").write_text(TEXTFILE)

    with start_node_exporter(tmp_path / "ne", textfile_dir) as exporter, FaultServer() as served:
        text = exporter.scrape()
        assert "\nsyncd_last_pass_success 1\n" in text
        assert "node_textfile_scrape_error 0" in text
        assert "node_cpu_seconds_total" not in text and "go_goroutines" not in text  # textfile only
        assert promtool_check_metrics(text) == (0, "")
        assert listening_addresses(exporter.pid) == [("127.0.0.1", exporter.port)]

        served.route("/metrics", body=SERVED.encode(), headers={"Content-Type": "text/plain; version=0.0.4"})
        started = time.monotonic()
        with start_prometheus(
            tmp_path / "prom", {"node": exporter.target, "syncd": f"{served.url}/metrics"}
        ) as prom:
            assert listening_addresses(prom.pid) == [("127.0.0.1", prom.port)]
            assert prom.wait_for("syncd_last_pass_success", lambda v: v == 1.0, match={"job": "node"}) == 1.0
            first_scrape = time.monotonic() - started
            assert prom.wait_for('syncd_last_pass_success{job="syncd"}', lambda v: v == 0.0) == 0.0
            got = {labels["result"]: value for labels, value in prom.query("syncd_downloads_total")}
            assert got == {"ok": 7.0, "failed": 2.0}
            prom.wait_targets_up()
            assert prom.targets_up() == {"node": True, "syncd": True}

            # a rewritten textfile reaches prometheus at a later scrape
            (textfile_dir / "syncd.prom").write_text(TEXTFILE.replace(" 1\n", " 0\n"))
            assert prom.wait_for('syncd_last_pass_success{job="node"}', lambda v: v == 0.0, timeout=10) == 0.0
            print(f"prometheus: first sample {first_scrape:.2f}s after start")
        assert not _pid_alive(prom.pid)
    assert not _pid_alive(exporter.pid)


def test_the_fixtures_scrape_a_target_added_while_prometheus_runs(
    prom_server: Prometheus, prom_scrape: Callable[[str], str], prom_node_exporter: NodeExporter
) -> None:
    """The session prometheus picks up a target added by a test (file-based discovery) under a job of
    its own; the per-test node_exporter reads its own empty textfile directory."""
    assert list(prom_node_exporter.textfile_dir.iterdir()) == []
    (prom_node_exporter.textfile_dir / "syncd.prom").write_text(TEXTFILE)
    job = prom_scrape(prom_node_exporter.target)
    assert prom_server.jobs[job] == f"{prom_node_exporter.metrics_url}"
    started = time.monotonic()
    assert prom_server.wait_for("syncd_last_pass_success", match={"job": job}) == 1.0
    print(f"prometheus: first sample of an added target after {time.monotonic() - started:.2f}s")
    assert prom_server.targets_up()[job] is True


def test_promtool_check_metrics() -> None:
    assert promtool_check_metrics(SERVED) == (0, "")
    code, output = promtool_check_metrics(BAD)
    assert code != 0
    assert 'syncd_downloaded_bytes counter metrics should have "_total" suffix' in output
    code, output = promtool_check_metrics("syncd_x{ 1\n")
    assert code != 0 and "pars" in output


def test_only_loopback_targets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        start_prometheus(tmp_path, ["192.0.2.1:9100"])
    assert not (tmp_path / "prometheus.yml").exists()
