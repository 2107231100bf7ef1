"""pytest fixtures for the real Prometheus consumers (see :mod:`prom`).

Register in ``tests/conftest.py`` with ``pytest_plugins = ["prom_fixtures"]`` (``tests`` is on sys.path
there). Fixture names are prefixed ``prom_`` so that they do not shadow a test module's own fixtures.

- ``prom_server`` (session): one prometheus for the whole run, scraping nothing at first. A test adds
  what it wants scraped with ``prom_scrape(target)``, which returns a job name unique to the test (so
  samples from earlier tests never match) and stops scraping it at teardown. The first sample of an
  added target comes after ~2.5-6 s; a fresh prometheus per test would cost ~5 s.
- ``prom_node_exporter`` (per test): node_exporter reading a fresh ``prom_node_exporter.textfile_dir``
  (point ``[metrics] textfile`` at ``textfile_dir / "syncd.prom"``). It starts in ~0.05 s; a shared one
  would mix textfiles of different tests (node_exporter refuses duplicate series across files).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from prom import NodeExporter, Prometheus, start_node_exporter, start_prometheus


@pytest.fixture(scope="session")
def prom_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A session-wide prometheus on 127.0.0.1 (1 s scrape interval) with no targets of its own."""
    server = start_prometheus(tmp_path_factory.mktemp("prometheus"), {})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prom_scrape(prom_server: Prometheus) -> Iterator[Callable[[str], str]]:
    """``prom_scrape("127.0.0.1:PORT" or a loopback URL) -> job``: have ``prom_server`` scrape it under a
    job name unique to this test; query with ``match={"job": job}`` or ``{job="..."}``."""
    added: list[str] = []

    def scrape(target: str) -> str:
        job = prom_server.add_target(target)
        added.append(job)
        return job

    try:
        yield scrape
    finally:
        for job in added:
            prom_server.remove_target(job)


@pytest.fixture
def prom_node_exporter(tmp_path: Path) -> Iterator[NodeExporter]:
    """node_exporter (textfile collector only) reading ``tmp_path/textfile``, for this test only."""
    with start_node_exporter(tmp_path / "node_exporter", tmp_path / "textfile") as server:
        yield server
