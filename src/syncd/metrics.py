"""Prometheus metrics: an observer of pass events, rendered with ``prometheus_client`` (the only module
that imports it) for ``GET /metrics`` and for the node_exporter textfile.

The metric names are a contract (docs/monitoring.md); no metric has a per-asset label. The asset states,
the last pass and the counters come from :class:`~syncd.events.PassFinished` (which carries the ledger's
state and running totals, so ``syncd_downloads_total`` and friends survive a restart); between passes the
counters also move with each ``AssetPublished``/``AssetFailed``/``Git*`` event, so a long pass shows
progress. ``syncd_pass_duration_seconds`` is a histogram of this process's passes (it starts empty).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from syncd import __version__, logs
from syncd import events as ev

log = logs.get()
STATES = ("published", "pending", "failing", "refused", "orphaned", "deferred")
BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, float("inf"))


def _timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None


class Metrics(Collector):
    """The syncd metrics, kept from events; thread-safe (events arrive from the pass's threads)."""

    def __init__(self, textfile: Path | None = None) -> None:
        self.textfile = textfile
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.duration = Histogram(
            "syncd_pass_duration_seconds",
            "How long each pass of this process took (dry runs excluded)",
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.registry.register(self)
        self.last: ev.PassFinished | None = None
        self.last_success: float | None = None
        self.synced_commit: str | None = None
        self.totals: dict[str, int] = {}
        self._textfile_error = ""

    def seed(self, totals: Mapping[str, int], last_success_at: str | None, synced_commit: str | None) -> None:
        """What the ledger knew at start-up, before this process's first pass."""
        with self._lock:
            self.totals = dict(totals)
            self.last_success, self.synced_commit = _timestamp(last_success_at), synced_commit

    # the observer ---------------------------------------------------------------------------------------
    def __call__(self, event: ev.Event) -> None:
        with self._lock:
            self._apply(event)
        if isinstance(event, ev.PassFinished):
            self.write_textfile()

    def _apply(self, event: ev.Event) -> None:
        t = self.totals
        if isinstance(event, ev.AssetPublished):
            t["downloads_ok"] = t.get("downloads_ok", 0) + 1
            t["downloaded_bytes"] = t.get("downloaded_bytes", 0) + event.bytes
        elif isinstance(event, ev.AssetFailed):
            t["downloads_failed"] = t.get("downloads_failed", 0) + 1
        elif isinstance(event, ev.GitFetched):
            t["git_fetch_ok"] = t.get("git_fetch_ok", 0) + 1
        elif isinstance(event, ev.GitFailed):
            t["git_fetch_failed"] = t.get("git_fetch_failed", 0) + 1
        elif isinstance(event, ev.PassFinished):
            self.last = event
            if event.totals:
                self.totals = dict(event.totals)  # the ledger's count, which includes the above
            self.last_success = _timestamp(event.last_success_at) or self.last_success
            self.synced_commit = event.synced_commit or self.synced_commit
            if not event.dry_run:
                self.duration.observe(event.duration_s)

    # rendering ------------------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        with self._lock:
            last, totals = self.last, dict(self.totals)
            last_success, synced = self.last_success, self.synced_commit
        yield _gauge("syncd_build_info", "The running syncd's version (value 1)", 1, version=__version__)
        yield _gauge(
            "syncd_last_pass_success",
            "1 if the last pass ended with the export matching every manifest, else 0",
            None if last is None else int(last.ok),
        )
        yield _gauge(
            "syncd_last_pass_timestamp_seconds",
            "When the last pass ended (Unix time)",
            None if last is None else _timestamp(last.finished_at),
        )
        yield _gauge(
            "syncd_last_success_timestamp_seconds",
            "When a pass last ended with the export in sync (Unix time); alert on its age",
            last_success,
        )
        assets = GaugeMetricFamily("syncd_assets", "Assets by state after the last pass", labels=["state"])
        if last is not None:
            for state in STATES:
                assets.add_metric([state], getattr(last.state, state))
        yield assets
        yield _gauge(
            "syncd_invalid_manifests",
            "Manifest files that were invalid at the last pass",
            None if last is None else last.state.invalid_manifests,
        )
        if synced:
            yield _gauge(
                "syncd_synced_commit_info",
                "The last commit the export was in sync with (value 1)",
                1,
                commit=synced,
            )
        yield _counter(
            "syncd_downloaded_bytes", "Bytes downloaded and published", totals.get("downloaded_bytes", 0)
        )
        downloads = CounterMetricFamily("syncd_downloads", "Asset downloads by result", labels=["result"])
        downloads.add_metric(["ok"], totals.get("downloads_ok", 0))
        downloads.add_metric(["failed"], totals.get("downloads_failed", 0))
        yield downloads
        yield _counter("syncd_pruned_files", "Files removed by [prune]", totals.get("pruned_files", 0))
        yield _counter(
            "syncd_pruned_bytes", "Bytes of the files removed by [prune]", totals.get("pruned_bytes", 0)
        )
        fetches = CounterMetricFamily("syncd_git_fetch", "Git fetches by result", labels=["result"])
        fetches.add_metric(["ok"], totals.get("git_fetch_ok", 0))
        fetches.add_metric(["failed"], totals.get("git_fetch_failed", 0))
        yield fetches

    def render(self) -> bytes:
        """The Prometheus text format of every metric."""
        return bytes(generate_latest(self.registry))

    def write_textfile(self) -> None:
        """Write the textfile (if configured) atomically: a temporary file in the same directory (a name
        node_exporter ignores: it reads only ``*.prom``), mode 0644, then renamed over the old one. A
        failure is one ``metrics_textfile_failed`` warning (per distinct error), never a failed pass."""
        if self.textfile is None:
            return
        try:
            _write_atomically(self.textfile, self.render())
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
            if why != self._textfile_error:
                log.warning("metrics_textfile_failed", textfile=str(self.textfile), error=why)
            self._textfile_error = why
        else:
            self._textfile_error = ""


def _gauge(name: str, doc: str, value: float | None, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    if value is not None:
        family.add_metric(list(labels.values()), value)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o644)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
