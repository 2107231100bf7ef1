"""Metrics end to end: the textfile written by ``syncd sync`` and ``/metrics`` served by ``syncd run``,
read by the real consumers (promtool, prometheus-node-exporter, prometheus) from Debian's packages."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import World
from servers import _stop_pid, free_port
from test_daemon import Daemon

pytestmark = pytest.mark.e2e


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )


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
    assert promtool(prom.read_text()).returncode == 0, promtool(prom.read_text()).stdout
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


class Proc:
    """A server process on 127.0.0.1, stopped by PID."""

    def __init__(self, argv: list[str], port: int, log: Path, ready: str) -> None:
        self.port = port
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{argv[0]} did not come up: {log.read_text()[-2000:]}")

    def stop(self) -> None:
        _stop_pid(self.proc.pid, self.proc, signal.SIGTERM)  # type: ignore[arg-type]


@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[tuple[Proc, Path]]:
    textdir = tmp_path / "node-exporter"
    textdir.mkdir()
    port = free_port()
    argv = [
        "prometheus-node-exporter",
        f"--web.listen-address=127.0.0.1:{port}",
        "--collector.disable-defaults",
        "--collector.textfile",
        f"--collector.textfile.directory={textdir}",
    ]
    proc = Proc(argv, port, tmp_path / "node-exporter.log", "/metrics")
    try:
        yield proc, textdir
    finally:
        proc.stop()


def start_prometheus(tmp_path: Path, targets: dict[str, int]) -> Proc:
    port = free_port()
    jobs = "".join(
        f"  - job_name: {job}\n    scrape_interval: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{p}']\n"
        for job, p in targets.items()
    )
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}")
    argv = [
        "prometheus",
        f"--config.file={cfg}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return Proc(argv, port, tmp_path / "prometheus.log", "/-/ready")


def query(prom: Proc, expr: str, want: Callable[[list[Any]], bool], timeout: float = 45) -> list[Any]:
    """Poll prometheus's HTTP API until the instant vector for ``expr`` satisfies ``want``."""
    deadline = time.monotonic() + timeout
    result: list[Any] = []
    while time.monotonic() < deadline:
        r = httpx.get(f"http://127.0.0.1:{prom.port}/api/v1/query", params={"query": expr}, timeout=5)
        result = r.json()["data"]["result"]
        if want(result):
            return result
        time.sleep(0.5)
    raise AssertionError(f"{expr}: {result}")


def test_prometheus_scrapes_the_daemon_and_node_exporter_reads_the_textfile(
    world: World, tmp_path: Path, node_exporter: tuple[Proc, Path]
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
        assert promtool(served.text).returncode == 0, promtool(served.text).stdout
        textfile = (textdir / "syncd.prom").read_text()
        assert promtool(textfile).returncode == 0, promtool(textfile).stdout
        scraped = httpx.get(f"http://127.0.0.1:{exporter.port}/metrics", timeout=5).text
        assert "syncd_last_pass_success 1" in scraped
        assert "node_textfile_scrape_error 0" in scraped
        prom = start_prometheus(tmp_path, {"syncd": port, "node": exporter.port})
        for job in ("syncd", "node"):
            got = query(prom, f'syncd_last_pass_success{{job="{job}"}}', lambda r: bool(r))
            assert float(got[0]["value"][1]) == 1.0
            got = query(prom, f'syncd_downloaded_bytes_total{{job="{job}"}}', lambda r: bool(r))
            assert float(got[0]["value"][1]) == 4096.0
            got = query(prom, f'syncd_synced_commit_info{{job="{job}"}}', lambda r: bool(r))
            assert got[0]["metric"]["commit"] == commit
        age = query(prom, 'time() - syncd_last_success_timestamp_seconds{job="syncd"}', lambda r: bool(r))
        assert 0 <= float(age[0]["value"][1]) < 120
        assets = query(prom, 'syncd_assets{job="syncd"}', lambda r: len(r) == 6)
        assert {s["metric"]["state"]: float(s["value"][1]) for s in assets}["published"] == 1.0
        assert d.stop() == 0
    finally:
        if prom is not None:
            prom.stop()
        d.close()
