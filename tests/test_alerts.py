"""What to announce, without I/O (syncd.alerts): dedup keys, what a pass judges, the git threshold,
reminders, recoveries and the words of a message. Table-driven and generated."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncd import alerts
from syncd import events as ev
from syncd.alerts import Collector, Open, Rules, compose, due, update_open

pytestmark = pytest.mark.unit
T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
C = "c" * 40


def failed(
    dest: str = "d/x.bin", cls: str = "http_404", error: str = "404 from …", n: int = 1
) -> ev.AssetFailed:
    return ev.AssetFailed(dest=dest, source="r/x", manifest="m.toml", sha256="a" * 64, error=error,
                          failed_passes=n, commit=C, error_class=cls)  # fmt: skip


def finished(**kw: object) -> ev.PassFinished:
    base: dict[str, object] = dict(
        commit=C, ok=False, dry_run=False, published=0, adopted=0, skipped=0, refused=0, failed=0,
        orphaned=0, deferred=0, pending=0, invalid_manifests=0, git_error=None, source_error=None, bytes=0,
        duration_s=0.1, finished_at=T0.isoformat(),
    )  # fmt: skip
    base.update(kw)
    return ev.PassFinished(**base)  # type: ignore[arg-type]


def view(*events: ev.Event, end: ev.Event | None = None) -> alerts.PassView:
    c = Collector("/export")
    for e in (*events, end or finished()):
        c.add(e)
    return c.view


@given(
    error=st.text(max_size=200),
    n=st.integers(1, 10_000),
    commit=st.text("0123456789abcdef", min_size=40, max_size=40),
)
def test_a_failure_has_one_key_whatever_its_text_count_or_commit(error: str, n: int, commit: str) -> None:
    """The dedup key is kind + dest + error class: never the message, a count or a commit."""
    e = failed(error=error, n=n)
    (alert,) = view(ev.AssetFailed(**{**e.__dict__, "commit": commit})).problems.values()
    assert alert.key == "asset_failed:d/x.bin:http_404"


def test_a_different_error_class_is_a_different_problem() -> None:
    keys = set(view(failed(cls="http_404")).problems) | set(view(failed(cls="checksum_mismatch")).problems)
    assert keys == {"asset_failed:d/x.bin:http_404", "asset_failed:d/x.bin:checksum_mismatch"}


def test_a_problem_seen_again_is_counted_and_keeps_when_it_was_first_seen() -> None:
    first = update_open({}, view(failed()), "t1")
    second = update_open(first, view(failed()), "t2")
    (p,) = second.values()
    assert (p.first_seen, p.passes) == ("t1", 2)


@pytest.mark.parametrize(
    ("label", "later", "still_open"),
    [
        (
            "the asset published",
            view(
                ev.AssetPublished(
                    dest="d/x.bin",
                    source="r/x",
                    sha256="a" * 64,
                    bytes=1,
                    duration_s=0,
                    mb_per_s=0,
                    manifest="m.toml",
                    commit=C,
                    replaced=False,
                )
            ),
            False,
        ),
        ("the entry was removed (a pass that saw nothing)", view(), False),
        (
            "the export was missing: nothing judged",
            view(end=ev.PassFailed("no root", "ExportMissingError")),
            True,
        ),
        ("git unreachable before a first fetch", view(end=ev.PassFailed("down", "GitError")), True),
        ("[source] path missing: nothing planned", view(end=finished(source_error="gone")), True),
        ("the commit was not in the clone", view(end=finished(git_problem="not_in_clone")), True),
        ("the asset waited out its backoff", view(ev.AssetDeferred("d/x.bin", "backoff", C)), True),
        ("a stop interrupted it", view(ev.AssetInterrupted("d/x.bin", "stopping", C)), True),
    ],
)
def test_a_problem_recovers_only_when_a_pass_judged_it(
    label: str, later: alerts.PassView, still_open: bool
) -> None:
    before = update_open({}, view(failed()), "t1")
    after = update_open(before, later, "t2")
    assert ("asset_failed:d/x.bin:http_404" in after) is still_open, label


def test_a_full_export_is_one_problem_not_one_per_asset() -> None:
    """Every asset failing with ENOSPC is one export_full problem; it recovers when something is
    written, and stays open when nothing was attempted."""
    full = view(*(failed(f"f{i}", "export_full") for i in range(50)))
    assert list(full.problems) == ["export_full"]
    (alert,) = full.problems.values()
    assert "50 asset(s)" in alert.title and len(alert.dests) == 10 and "/export" in alert.todo
    opened = update_open({}, full, "t1")
    assert "export_full" in update_open(opened, view(), "t2")  # nothing attempted: unknown
    other = view(failed("f1", "http_503"))
    assert "export_full" not in update_open(opened, other, "t2")  # a write got as far as the server


def _open(kind_event: ev.Event, passes: int, age: timedelta, end: ev.Event | None = None) -> Open:
    (alert,) = view(kind_event, end=end).problems.values()
    return Open(alert, (T0 - age).isoformat(), passes)


@pytest.mark.parametrize(
    ("passes", "minutes", "announce"),
    [(1, 60, False), (2, 60, False), (3, 14, False), (3, 15, True), (10, 1, False), (10, 20, True)],
)
def test_git_unreachable_is_announced_after_3_passes_and_15_minutes(
    passes: int, minutes: int, announce: bool
) -> None:
    p = _open(ev.GitFailed("unreachable", "ssh://git", C), passes, timedelta(minutes=minutes))
    assert due(p, Rules(), T0) is announce


@pytest.mark.parametrize(
    ("failed_passes", "min_failures", "announce"), [(1, 1, True), (1, 2, False), (2, 2, True)]
)
def test_min_failures(failed_passes: int, min_failures: int, announce: bool) -> None:
    p = _open(failed(n=failed_passes), 1, timedelta())
    assert due(p, Rules(min_failures=min_failures), T0) is announce


def test_compose_new_then_silence_then_a_reminder_then_a_recovery() -> None:
    rules = Rules(repeat=3600)
    opened = update_open({}, view(failed()), T0.isoformat())
    first = compose("mail", {"problem", "recovery"}, opened, {}, [], rules, T0)
    assert [a.key for a in first.new] == ["asset_failed:d/x.bin:http_404"] and first.kind == "problem"
    told = {a.key: (T0.isoformat(), a) for a in first.new}
    assert compose("mail", {"problem", "recovery"}, opened, told, [], rules, T0 + timedelta(minutes=59)).empty
    later = compose("mail", {"problem", "recovery"}, opened, told, [], rules, T0 + timedelta(hours=1))
    assert later.reminders and not later.new
    never = compose("mail", {"problem"}, opened, told, [], Rules(repeat=0), T0 + timedelta(days=30))
    assert never.empty
    gone = compose("mail", {"problem", "recovery"}, {}, told, [], rules, T0)
    assert [a.key for a in gone.recovered] == list(told) and gone.kind == "recovery"
    quiet = compose("mail", {"problem"}, {}, told, [], rules, T0)  # no "recovery": forgotten silently
    assert quiet.empty and quiet.forget == tuple(told)


def test_subject_counts_and_names_the_problems() -> None:
    problems = view(failed("a.tar", "checksum_mismatch"), failed("b.tar"), failed("c.tar")).problems
    opened = update_open({}, alerts.PassView(problems=problems), T0.isoformat())
    msg = compose("mail", {"problem"}, opened, {}, [], Rules(), T0)
    assert alerts.subject("nfs01", msg) == (
        "[syncd nfs01] 3 new problems: a.tar: checksum mismatch, b.tar: http 404, …"
    )
    body = alerts.body("nfs01", msg)
    assert body.count("\n* ") == 3 and "what to do: the file in Artifactory is not the one reviewed" in body


def test_an_alert_survives_its_json_and_a_damaged_one_is_dropped() -> None:
    (a,) = view(failed()).problems.values()
    assert alerts.Alert.from_json(a.to_json()) == a
    assert alerts.Alert.from_json("{not json") is None
    assert alerts.Alert.from_json('{"key": 1}') is None


@given(name=st.text(min_size=1, max_size=80))
def test_repository_text_never_breaks_a_mail_header_or_a_body_line(name: str) -> None:
    """A manifest path or dest with line breaks or control characters (git allows them in paths) becomes
    one escaped subject line: the mail is always built, and no header can be injected."""
    from syncd.config import Smtp
    from syncd.mail import message

    problem = ev.ManifestInvalid(
        manifest=f"assets/{name}\r\nBcc: evil@example.com", commit=C, problems=("x",)
    )
    opened = update_open({}, view(problem), T0.isoformat())
    msg = compose("mail", {"problem"}, opened, {}, [], Rules(), T0)
    subject = alerts.subject("nfs01", msg)
    assert "\n" not in subject and "\r" not in subject
    smtp = Smtp("m.example", 25, "none", None, None, "syncd@x.example", ("ops@x.example",), 5.0)
    mail = message(smtp, smtp.to, subject, alerts.body("nfs01", msg))
    assert mail["Bcc"] is None and mail["Subject"] == subject
    assert all(line.isprintable() for line in alerts.body("nfs01", msg).splitlines())


@pytest.mark.parametrize("stamp", ["garbage", "", "2026-12-03T11:00:00", "2026-12-03T11:00:00+00:00"])
def test_a_damaged_or_zoneless_time_in_the_ledger_never_stops_the_notifications(stamp: str) -> None:
    """A time the ledger holds that does not parse counts as long ago (the reminder and the git
    announcement are due); a zoneless one is UTC; nothing raises."""
    (alert,) = view(failed()).problems.values()
    opened = {alert.key: Open(alert, stamp, 5)}
    told = {alert.key: (stamp, alert)}
    msg = compose("mail", {"problem", "recovery"}, opened, told, [], Rules(repeat=600), T0)
    assert [a.key for a in msg.reminders] == [alert.key]
    git = _open(ev.GitFailed("down", "ssh://git", C), 3, timedelta())
    assert due(Open(git.alert, stamp, 3), Rules(), T0)


@pytest.mark.parametrize(
    ("classes", "keys"),
    [
        (["http_502", "http_503", "download_failed", "http_429", "http_408"], 1),
        (["http_503", "http_404"], 2),
        (["http_404", "checksum_mismatch", "size_mismatch"], 3),
    ],
)
def test_transient_failures_are_one_problem_however_they_flap(classes: list[str], keys: int) -> None:
    """A load balancer answering 502, then 503, then timing out is one open problem (counted pass after
    pass), not a new problem and a false recovery at every pass; what needs a person keeps its class."""
    opened: dict[str, Open] = {}
    for i, cls in enumerate(classes):
        opened = update_open(opened, view(failed(cls=cls, n=i + 1)), f"t{i}")
    seen = {alerts.stable_class(c) for c in classes}
    assert len(seen) == keys
    if keys == 1:
        (p,) = opened.values()
        assert p.passes == len(classes) and p.alert.key == "asset_failed:d/x.bin:unavailable"


def test_a_huge_digest_is_capped_and_counted() -> None:
    """20,000 failing assets: one message, whose body lists 100 of them and counts the rest."""
    from syncd.notify import _listed, _more

    problems = view(*(failed(f"d/{i:05}.bin") for i in range(20_000))).problems
    opened = update_open({}, alerts.PassView(problems=problems), T0.isoformat())
    msg = compose("mail", {"problem"}, opened, {}, [], Rules(), T0)
    listed = _listed(msg)
    text = alerts.body("nfs01", listed) + _more(msg, listed)
    assert len(msg.new) == 20_000 and len(listed.new) == 100
    assert "and 19900 more new problems" in text and len(text) < 100_000
    assert alerts.subject("nfs01", msg).startswith("[syncd nfs01] 20000 new problems: d/00000.bin")


def test_a_refused_signature_is_one_problem_per_status_and_unjudged_assets_stay_open() -> None:
    """signature_refused is a git-scope problem keyed by its status (not its commit, so a new unsigned
    head is the same problem); when no verified commit exists nothing was planned, so an asset problem
    open before neither recovers nor is judged."""
    refused = ev.SignatureRefused(commit="e" * 40, author="Eve <e@x>", status="unsigned", error="unsigned")
    again = ev.SignatureRefused(commit="f" * 40, author="Eve <e@x>", status="unsigned", error="unsigned")
    v = view(refused, end=finished(git_problem="signature_refused", git_error="refused"))
    (alert,) = v.problems.values()
    assert alert.key == "signature_refused:unsigned" and "allowed_signers" in alert.todo
    assert set(view(again).problems) == {"signature_refused:unsigned"}
    before = update_open({}, view(failed()), "t1")
    nothing = view(refused, end=finished(git_problem="no_verified_commit", git_error="refused"))
    assert "asset_failed:d/x.bin:http_404" in update_open(before, nothing, "t2")


def test_a_tripped_prune_valve_is_one_problem_that_recovers_when_a_pass_prunes_again() -> None:
    """prune_refused is a prune-scope problem keyed by its valve; the next pass without it recovers it."""
    v = view(
        end=finished(prune_problem="max_files", prune_error="120 file(s) would be removed, more than 100")
    )
    (alert,) = v.problems.values()
    assert alert.key == "prune_refused:max_files" and alert.scope == "prune"
    assert "syncd prune --confirm" in alert.todo and "120 file(s)" in alert.error
    opened = update_open({}, v, "t1")
    assert "prune_refused:max_files" in opened
    assert "prune_refused:max_files" not in update_open(opened, view(end=finished(ok=True)), "t2")
