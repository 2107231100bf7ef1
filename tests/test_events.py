"""The event path: the bus isolates observers, the log observer keeps the documented event shapes, the
STATUS line says what happened, and the metrics render the contract's names."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from prom import samples
from syncd import events as ev
from syncd.metrics import Metrics
from syncd.systemd import StatusObserver, ago, status_line

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)


def finished(**kw: Any) -> ev.PassFinished:
    base: dict[str, Any] = {
        "commit": "4f2a9c1" + "0" * 33,
        "ok": True,
        "dry_run": False,
        "published": 0,
        "adopted": 0,
        "skipped": 3,
        "refused": 0,
        "failed": 0,
        "orphaned": 0,
        "deferred": 0,
        "pending": 0,
        "invalid_manifests": 0,
        "git_error": None,
        "source_error": None,
        "bytes": 0,
        "duration_s": 1.5,
        "finished_at": NOW.isoformat(),
        "state": ev.Counts(published=312, published_bytes=int(1.2 * 1024**4)),
    }
    return ev.PassFinished(**{**base, **kw})


# the bus -----------------------------------------------------------------------------------------------


def test_an_observer_that_raises_is_reported_once_and_others_still_get_every_event() -> None:
    """A failing observer never stops delivery; it is logged once per (observer, event name), without its
    exception's text."""
    seen: list[ev.Event] = []

    def broken(event: ev.Event) -> None:
        raise ValueError("secret-token-in-text")

    bus = ev.EventBus([broken, seen.append])
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            bus.emit(ev.GitFetched(commit="c" * 40, branch="main"))
        bus.emit(ev.AssetDeferred(dest="d", reason="r", commit="c"))
    assert len(seen) == 4
    failed = [e for e in logs if e["event"] == "observer_failed"]
    assert [e["event_name"] for e in failed] == ["git_fetched", "asset_deferred"]
    assert failed[0]["error_type"] == "ValueError"
    assert "secret-token-in-text" not in repr(logs)


@settings(max_examples=50, deadline=None)
@given(
    problems=st.lists(st.text(max_size=800), max_size=60),
)
def test_manifest_invalid_log_fields_are_bounded(problems: list[str]) -> None:
    """However many problems of whatever length, the log event holds at most 20 (+1 summary) of at most
    501 characters, and counts them all."""
    fields = ev.ManifestInvalid(manifest="m.toml", commit="c", problems=tuple(problems)).fields()
    assert fields["problem_count"] == len(problems)
    assert len(fields["problems"]) <= ev.MAX_PROBLEMS_LOGGED + 1
    assert all(len(p) <= ev.MAX_PROBLEM_CHARS + 1 for p in fields["problems"][: ev.MAX_PROBLEMS_LOGGED])


def test_pass_finished_logs_the_documented_fields_and_levels() -> None:
    """pass_finished keeps its log fields (no internal state or totals) and is an error when not ok."""
    with structlog.testing.capture_logs() as logs:
        ev.LogObserver()(finished())
        ev.LogObserver()(finished(ok=False, failed=1))
        ev.LogObserver()(ev.PassProgress(1, 2, 3, 4))  # debug: not logged
    assert [e["log_level"] for e in logs] == ["info", "error"]
    assert set(logs[0]) >= {"commit", "ok", "dry_run", "pending", "git_error", "source_error", "duration_s"}
    assert not {"state", "totals", "started_at", "head"} & set(logs[0])


def test_every_emitted_event_is_documented_in_operations() -> None:
    """Each event name syncd can log (event classes and direct log calls) has an entry in
    docs/operations.md, and each documented event still exists."""
    src = "\n".join(p.read_text() for p in (ROOT / "src" / "syncd").glob("*.py"))
    names = set(re.findall(r'name: ClassVar\[str\] = "([a-z_]+)"', src))
    names |= set(re.findall(r'log\.(?:info|warning|error|debug|log\([^,]+,)\s*\(?\s*"([a-z_]+)"', src))
    names -= {"event", "pass_started", "pass_progress"}  # the base class; debug-only events
    docs = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", docs, re.M))
    assert sorted(names - documented) == []
    assert sorted(documented - names) == []


# the STATUS line ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "success", "expected"),
    [
        (None, None, "starting · last success never · next poll 12:05:00 UTC"),
        (finished(), NOW, "in sync at 4f2a9c1 · 312 assets · 1.2 TiB · next poll 12:05:00 UTC"),
        (
            finished(ok=False, failed=1, state=ev.Counts(failing=1, invalid_manifests=2)),
            NOW - timedelta(minutes=47),
            "1 failing, 2 invalid manifests · serving 4f2a9c1 · last success 47 min ago · next poll "
            "12:05:00 UTC (syncd status)",
        ),
        (
            finished(ok=False, git_error="branch 'main' was rewritten", git_problem="rewritten"),
            NOW - timedelta(hours=3),
            "branch rewritten, not followed · serving 4f2a9c1 · last success 3 h ago · next poll "
            "12:05:00 UTC (syncd status)",
        ),
        (
            finished(ok=False, git_error="could not connect", git_problem="unreachable"),
            None,
            "git unreachable · serving 4f2a9c1 · last success never · next poll 12:05:00 UTC (syncd status)",
        ),
        (
            ev.PassFailed(error="export root /srv/x is missing", error_type="ExportMissingError"),
            NOW - timedelta(days=3),
            "last pass failed: export root /srv/x is missing · last success 3 d ago · next poll 12:05:00 UTC "
            "(syncd status)",
        ),
    ],
)
def test_status_line(
    last: ev.PassFinished | ev.PassFailed | None, success: datetime | None, expected: str
) -> None:
    """The STATUS line names what is wrong (a rewritten branch is not 'unreachable') and the age of the
    last success."""
    assert status_line(last, success, NOW + timedelta(minutes=5), NOW) == expected


def test_ago() -> None:
    assert [ago(s) for s in (5, 61, 3599, 3600, 2 * 86400 - 1, 2 * 86400)] == [
        "just now",
        "1 min ago",
        "59 min ago",
        "1 h ago",
        "47 h ago",
        "2 d ago",
    ]


class _Notifier:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def status(self, text: str) -> None:
        self.sent.append(text)


def test_status_observer_follows_the_pass_and_refresh_waits_for_it() -> None:
    """Progress during the pass, the outcome after it; a refresh while a pass runs changes nothing."""
    n = _Notifier()
    obs = StatusObserver(n, lambda: None)  # type: ignore[arg-type]
    obs(ev.PassStarted(dry_run=False, started_at=NOW.isoformat()))
    obs(ev.PassProgress(1, 4, 1024**3, 4 * 1024**3))
    obs.refresh()
    assert n.sent == ["polling git", "downloading 1/4 (1.0 of 4.0 GiB)"]
    obs(finished())
    assert n.sent[-1].startswith("in sync at 4f2a9c1 · 312 assets")
    assert obs.last_success == NOW


# metrics -----------------------------------------------------------------------------------------------

CONTRACT = {
    "syncd_last_pass_success",
    "syncd_last_pass_timestamp_seconds",
    "syncd_last_success_timestamp_seconds",
    "syncd_pass_duration_seconds_bucket",
    "syncd_assets",
    "syncd_invalid_manifests",
    "syncd_downloaded_bytes_total",
    "syncd_downloads_total",
    "syncd_git_fetch_total",
    "syncd_synced_commit_info",
    "syncd_build_info",
}


def test_metrics_follow_events_and_take_the_ledgers_totals() -> None:
    """Counters move with asset and git events during a pass, then equal the ledger's totals at its end;
    every contract name is present; no label carries a dest."""
    m = Metrics()
    m.seed({"downloads_ok": 10, "downloaded_bytes": 1000}, None, None)
    m(ev.GitFetched(commit="c" * 40, branch="main"))
    m(ev.AssetPublished("a", "s", "0" * 64, 50, 1.0, 1.0, "m", "c", False))
    m(ev.AssetFailed("b", "s", "m", "0" * 64, "boom", 1, "c"))
    s = samples(m.render().decode())
    assert s['syncd_downloads_total{result="ok"}'] == 11
    assert s['syncd_downloads_total{result="failed"}'] == 1
    assert s["syncd_downloaded_bytes_total"] == 1050
    assert s['syncd_git_fetch_total{result="ok"}'] == 1
    totals = {"downloads_ok": 11, "downloads_failed": 1, "downloaded_bytes": 1050, "git_fetch_ok": 7}
    done = finished(
        ok=False,
        state=ev.Counts(published=5, failing=1, pending=2),
        totals=totals,
        last_success_at="2026-12-03T11:00:00+00:00",
        synced_commit="a" * 40,
    )
    m(done)
    text = m.render().decode()
    s = samples(text)
    assert s['syncd_git_fetch_total{result="ok"}'] == 7
    assert s["syncd_last_pass_success"] == 0
    assert s['syncd_assets{state="published"}'] == 5 and s['syncd_assets{state="pending"}'] == 2
    assert s["syncd_last_success_timestamp_seconds"] == datetime(2026, 12, 3, 11, tzinfo=UTC).timestamp()
    assert s[f'syncd_synced_commit_info{{commit="{"a" * 40}"}}'] == 1
    names = {re.sub(r"\{.*", "", k) for k in s}
    assert names >= CONTRACT
    assert "dest=" not in text


def test_metrics_textfile_is_written_atomically_with_mode_0644(tmp_path: Path) -> None:
    """After a pass the textfile holds the metrics at 0644 and no temporary file is left; a directory that
    cannot be written is one warning, never an exception."""
    path = tmp_path / "syncd.prom"
    m = Metrics(path)
    m(finished())
    assert path.stat().st_mode & 0o777 == 0o644
    assert "syncd_last_pass_success 1.0" in path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syncd.prom"]
    m.textfile = tmp_path / "missing" / "syncd.prom"
    with structlog.testing.capture_logs() as logs:
        m(finished())
        m(finished())
    assert [e["event"] for e in logs] == ["metrics_textfile_failed"]


@pytest.mark.skipif(not Path("/usr/bin/promtool").exists(), reason="promtool is installed by scripts/setup")
def test_promtool_finds_nothing_to_lint() -> None:
    """`promtool check metrics` is clean on syncd's metrics, before and after a pass."""
    m = Metrics()
    for text in (m.render(), (m(finished()), m.render())[1]):
        proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
