"""The reconcile engine in-process, against a real file:// repo and nginx: caching and convergence."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from harness import World, on_a_terminal, syncd_command
from syncd import config, logs, manifest, reconcile
from syncd.ledger import Ledger
from syncd.reconcile import PassResult, Reconciler

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def quiet_logs(tmp_path: Path) -> None:
    """Send the engine's JSON log to a file so in-process passes do not clutter the test output."""
    logs.configure(open(tmp_path / "log.jsonl", "w"), console=False)  # noqa: SIM115


def one_pass(world: World) -> PassResult:
    rec = Reconciler(config.load(world.config_path))
    try:
        return rec.run_pass()
    finally:
        rec.close()


def count_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = manifest.parse

    def counting(file: str, data: bytes) -> list[manifest.Asset]:
        calls.append(file)
        return real(file, data)

    monkeypatch.setattr(manifest, "parse", counting)
    return calls


def test_unchanged_head_parses_no_manifest(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the branch head has not moved, a pass reads no manifest at all (ledger cache)."""
    for i in range(3):
        world.manifest(f"m{i}.toml", {**world.asset(f"{i}.bin", 100, seed=i), "dest": f"{i}.bin"})
    world.repo.commit("three")
    calls = count_parses(monkeypatch)
    assert one_pass(world).ok
    assert sorted(calls) == ["assets/m0.toml", "assets/m1.toml", "assets/m2.toml"]
    calls.clear()
    assert one_pass(world).ok
    assert calls == []


def _no_desired(*args: object) -> None:
    raise AssertionError("the full pass ran: load_desired was called")


def test_nothing_new_is_a_stat_walk(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same head, a healthy last pass and every file as recorded: the pass plans nothing (no manifest
    cache decoded, no plan) and counts every file as skipped."""
    for i in range(3):
        world.manifest(f"m{i}.toml", {**world.asset(f"{i}.bin", 100, seed=i), "dest": f"{i}.bin"})
    world.repo.commit("three")
    assert one_pass(world).ok
    monkeypatch.setattr(reconcile, "load_desired", _no_desired)
    result = one_pass(world)
    assert result.ok and result.skipped == 3 and result.planned == []


@pytest.mark.parametrize("change", ["delete", "chmod", "touch", "ledger_row", "failure"])
def test_anything_off_takes_the_full_pass(world: World, change: str) -> None:
    """A file deleted, chmodded or touched, a ledger row lost, or a failure recorded: the full pass runs
    and puts things right (the stat walk never decides anything itself)."""
    for i in range(2):
        world.manifest(f"m{i}.toml", {**world.asset(f"{i}.bin", 100, seed=i), "dest": f"{i}.bin"})
    world.repo.commit("two")
    assert one_pass(world).ok
    target = world.export / "1.bin"
    if change == "delete":
        target.unlink()
    elif change == "chmod":
        target.chmod(0o644)
    elif change == "touch":
        os.utime(target, (1, 1))
    elif change == "ledger_row":
        ledger = Ledger.in_state_dir(world.state)
        ledger.forget("1.bin")
        ledger.close()
    else:
        ledger = Ledger.in_state_dir(world.state)
        ledger.record_failure("1.bin", "0" * 64, "boom")
        ledger.close()
    result = one_pass(world)
    assert result.ok
    assert result.planned, "the full pass plans every asset"
    assert (world.export / "1.bin").read_bytes() == (world.blobs / "1.bin").read_bytes()


def _three(world: World) -> None:
    for i in range(3):
        world.manifest(f"m{i}.toml", {**world.asset(f"{i}.bin", 100, seed=i), "dest": f"{i}.bin"})
    world.repo.commit("three")
    assert one_pass(world).ok


def test_one_changed_manifest_plans_only_its_dests(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that changes one manifest file: only its dests are planned (no full desired state), the
    other files are stat-checked and skipped, and the next pass is a stat walk again."""
    _three(world)
    world.manifest("m1.toml", {**world.asset("1b.bin", 100, seed=9), "dest": "1b.bin"})
    world.repo.remove("assets/m2.toml")
    world.repo.commit("change m1, drop m2")
    monkeypatch.setattr(reconcile, "load_desired", _no_desired)
    result = one_pass(world)
    assert result.ok and (result.published, result.skipped, result.orphaned) == (1, 1, 2)
    assert sorted(a.dest for a in result.planned) == ["1.bin", "1b.bin", "2.bin"]
    assert (world.export / "1b.bin").read_bytes() == (world.blobs / "1b.bin").read_bytes()
    again = one_pass(world)
    assert again.ok and again.planned == [a for a in again.planned if a.kind.value == "orphan"]
    assert again.skipped == 2 and again.orphaned == 2
    world.repo.write("README.md", "not a manifest\n")
    world.repo.commit("docs only")
    docs = one_pass(world)
    assert docs.ok and docs.skipped == 2 and docs.published == 0


@pytest.mark.parametrize("trouble", ["conflict", "invalid", "touched"])
def test_changed_manifest_with_trouble_takes_the_full_pass(world: World, trouble: str) -> None:
    """A changed manifest that claims another file's dest, one that does not parse, or another file
    touched meanwhile: the full pass runs and reports it as always."""
    _three(world)
    if trouble == "conflict":
        world.manifest("m1.toml", {**world.asset("x.bin", 100, seed=7), "dest": "0.bin"})
    elif trouble == "invalid":
        world.repo.write("assets/m1.toml", "[[asset]]\nsource = 3\n")
    else:
        world.manifest("m1.toml", {**world.asset("1b.bin", 100, seed=9), "dest": "1b.bin"})
        (world.export / "0.bin").unlink()
    world.repo.commit(trouble)
    result = one_pass(world)
    assert result.planned and len([a for a in result.planned if a.kind.value != "orphan"]) >= 2
    if trouble == "conflict":
        assert result.refused >= 1
    elif trouble == "invalid":
        assert result.invalid
    else:
        assert (world.export / "0.bin").read_bytes() == (world.blobs / "0.bin").read_bytes()


def test_new_commit_parses_only_changed_files(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new commit re-reads just the manifest files its tree diff touches."""
    for i in range(3):
        world.manifest(f"m{i}.toml", {**world.asset(f"{i}.bin", 100, seed=i), "dest": f"{i}.bin"})
    world.repo.commit("three")
    assert one_pass(world).ok
    world.manifest("m1.toml", {**world.asset("1b.bin", 100, seed=9), "dest": "1b.bin"})
    world.repo.remove("assets/m2.toml")
    world.repo.commit("change m1, drop m2")
    calls = count_parses(monkeypatch)
    result = one_pass(world)
    # m1 at the head, and its previous version once: the provenance lookup of the new entry (1b.bin was
    # not in it, so the new commit introduced it). m0 and the removed m2 are never read.
    assert calls == ["assets/m1.toml", "assets/m1.toml"]
    assert result.published == 1 and result.orphaned == 2


def test_crash_between_rename_and_ledger_write_converges(world: World) -> None:
    """A file published but missing from the ledger (crash before the row) is adopted, not refused."""
    a = world.asset("a.bin", 5000, seed=1)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    assert one_pass(world).ok
    ledger = Ledger.in_state_dir(world.state)
    ledger.forget("a.bin")
    ledger.close()
    result = one_pass(world)
    assert result.ok and result.adopted == 1 and result.published == 0


def test_stale_staging_files_are_removed_at_start(world: World) -> None:
    """Leftovers in staging from a killed process are removed when the next pass starts."""
    a = world.asset("a.bin", 100, seed=1)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    staging = world.export / ".syncd-staging"
    staging.mkdir(mode=0o700)
    (staging / ("d" * 32 + ".part")).write_bytes(b"half a file")  # a syncd staging name
    assert one_pass(world).ok
    assert world.staging_files() == []
    assert oct(staging.stat().st_mode & 0o777) == "0o700"


def test_progress_on_a_terminal(world: World) -> None:
    """On a terminal, syncd sync draws a files/bytes progress line; off a terminal it draws none."""
    for i in range(3):
        world.manifest(f"m{i}.toml", {**world.asset(f"{i}.bin", 200_000, seed=i), "dest": f"{i}.bin"})
    world.repo.commit("three")
    code, text = on_a_terminal([syncd_command(), "sync", "-c", str(world.config_path)])
    assert code == 0
    assert "syncing 3/3 files" in text
    assert "585.9 KiB of 585.9 KiB" in text
    assert "asset_published" in text  # the console renderer, not JSON
    assert '{"timestamp"' not in text


def test_refusal_does_not_start_a_download_backoff(world: World) -> None:
    """A dest refused (symlink) and then fixed is downloaded on the next daemon pass, not deferred."""
    a = world.asset("a.bin", 100, seed=1)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    (world.export / "a.bin").symlink_to("/nonexistent")
    rec = Reconciler(config.load(world.config_path), respect_backoff=True)
    try:
        assert rec.run_pass().refused == 1
        (world.export / "a.bin").unlink()
        result = rec.run_pass()
    finally:
        rec.close()
    assert result.ok and result.published == 1 and result.deferred == 0


def test_download_failure_is_deferred_by_the_daemon(world: World) -> None:
    """A failed download is deferred on the daemon's next pass; a one-shot pass retries it at once."""
    world.manifest(
        "a.toml", {"source": f"{world.tag}/missing.bin", "sha256": "a" * 64, "size": 1, "dest": "a"}
    )
    world.repo.commit("a")
    daemon_like = Reconciler(config.load(world.config_path), respect_backoff=True)
    try:
        assert daemon_like.run_pass().failed == 1
        assert daemon_like.run_pass().deferred == 1
    finally:
        daemon_like.close()
    assert one_pass(world).failed == 1


SECRET = "tok-3f9a1c-SECRET"


@pytest.mark.parametrize(
    "exc",
    [
        TypeError(f"can't compare offset-naive and offset-aware datetimes {SECRET}"),
        ValueError(f"Invalid port: 'Authorization: Bearer {SECRET}'"),
        UnicodeEncodeError("ascii", f'W/"é{SECRET}"', 3, 4, f"ordinal not in range {SECRET}"),
    ],
    ids=["TypeError", "ValueError", "UnicodeEncodeError"],
)
def test_unexpected_exception_fails_only_that_asset(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    """A bug in one asset's work (any exception) fails that asset alone, without its text; the rest land."""
    for i in range(4):
        world.manifest(f"m{i}.toml", {**world.asset(f"{i}.bin", 3000, seed=i), "dest": f"{i}.bin"})
    world.repo.commit("four")
    rec = Reconciler(config.load(world.config_path), respect_backoff=True)
    real = rec.fetcher.download

    def download(asset: manifest.Asset, *args: object, **kwargs: object) -> None:
        if asset.dest == "2.bin":  # no real server can make an arbitrary internal bug: inject one
            raise exc
        real(asset, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rec.fetcher, "download", download)
    try:
        first = rec.run_pass()
        second = rec.run_pass()
    finally:
        rec.close()
    assert (first.published, first.failed, first.ok) == (3, 1, False)
    assert second.deferred == 1 and second.published == 0  # backed off as usual
    assert sorted(world.export_files()) == ["0.bin", "1.bin", "3.bin"]
    assert world.staging_files() == []
    events = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    failed = [e for e in events if e["event"] == "asset_failed"]
    assert [e["dest"] for e in failed] == ["2.bin"]
    assert failed[0]["error"].startswith(f"internal error: {type(exc).__name__} at test_reconcile.py:")
    assert SECRET not in (tmp_path / "log.jsonl").read_text()
    ledger = Ledger.in_state_dir(world.state)
    try:
        failures = ledger.failures()
    finally:
        ledger.close()
    assert list(failures) == ["2.bin"] and SECRET not in failures["2.bin"].last_error
    assert "internal error" in failures["2.bin"].last_error
    raw = b"".join(p.read_bytes() for p in world.state.glob("ledger.sqlite3*"))
    assert SECRET.encode() not in raw


def test_narrowing_source_path_drops_cached_manifests(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """After [source] path is narrowed, manifests outside it are no longer desired: orphaned, kept."""
    world.manifest("a/x.toml", {**world.asset("x.bin", 100, seed=1), "dest": "x.bin"})
    world.manifest("b/y.toml", {**world.asset("y.bin", 100, seed=2), "dest": "y.bin"})
    world.repo.commit("two dirs")
    assert one_pass(world).published == 2
    world.source["path"] = "assets/a"
    world.write_config()
    calls = count_parses(monkeypatch)
    narrowed = one_pass(world)  # same head: the cache was keyed on the old path
    assert calls == ["assets/a/x.toml"]
    assert (narrowed.ok, narrowed.published, narrowed.skipped, narrowed.orphaned) == (True, 0, 1, 1)
    world.manifest("a/z.toml", {**world.asset("z.bin", 100, seed=3), "dest": "z.bin"})
    world.repo.commit("new file under the narrowed path")
    later = one_pass(world)
    assert (later.published, later.skipped, later.orphaned) == (1, 1, 1)
    assert sorted(a.dest for a in later.planned if a.kind.value == "orphan") == ["y.bin"]
    assert world.export_files() == ["x.bin", "y.bin", "z.bin"]  # an orphan is left in place


def test_new_parse_rules_reparse_every_cached_manifest(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ledger cache built under other manifest rules (an older syncd) is discarded and re-parsed."""
    for i in range(2):
        world.manifest(f"m{i}.toml", {**world.asset(f"{i}.bin", 100, seed=i), "dest": f"{i}.bin"})
    world.repo.commit("two")
    assert one_pass(world).ok
    calls = count_parses(monkeypatch)
    assert one_pass(world).ok and calls == []
    monkeypatch.setattr(manifest, "RULES_VERSION", manifest.RULES_VERSION + 1)
    result = one_pass(world)
    assert sorted(calls) == ["assets/m0.toml", "assets/m1.toml"]
    assert result.ok and result.skipped == 2
    calls.clear()
    assert one_pass(world).ok and calls == []


def test_missing_source_path_is_a_pass_error(world: World) -> None:
    """A [source] path that is not a directory at the head fails the pass (exit 1) and orphans nothing."""
    world.manifest("a.toml", {**world.asset("a.bin", 100, seed=1), "dest": "a.bin"})
    world.repo.commit("a")
    assert world.sync().code == 0
    world.source["path"] = "asets"
    world.write_config()
    world.repo.write("README", "typo in path\n")
    world.repo.commit("new head")
    for _ in range(2):
        run = world.sync()
        assert run.code == 1, run.err
        err = run.one("source_path_missing")
        assert "'asets'" in err["error"] and err["commit"][:12] in err["error"]
        finished = run.one("pass_finished")
        assert finished["ok"] is False and finished["orphaned"] == 0
        assert not run.named("asset_orphaned") and "Traceback" not in run.err
    ledger = Ledger.in_state_dir(world.state)
    try:
        published = ledger.published()
    finally:
        ledger.close()
    assert list(published) == ["a.bin"] and published["a.bin"].orphaned_at is None
    world.source["path"] = "assets"
    world.write_config()
    back = world.sync()
    assert back.code == 0 and back.one("pass_finished")["skipped"] == 1


def test_overlapping_dests_in_two_files_are_both_refused(world: World) -> None:
    """A file dest 'p' and a dest under it 'p/q' (two files) are both refused, one asset_refused each."""
    world.manifest("a.toml", {**world.asset("p.bin", 100, seed=1), "dest": "p"})
    world.manifest("b.toml", {**world.asset("q.bin", 100, seed=2), "dest": "p/q"})
    world.manifest("c.toml", {**world.asset("ok.bin", 100, seed=3), "dest": "ok.bin"})
    world.repo.commit("overlap")
    for _ in range(2):
        run = world.sync()
        assert run.code == 1
        assert sorted(e["dest"] for e in run.named("asset_refused")) == ["p", "p/q"], run.err
        assert not run.named("asset_failed") and not run.named("manifest_invalid")
        assert world.export_files() == ["ok.bin"]


def test_overlapping_dests_in_one_file_make_it_invalid(world: World) -> None:
    """'p' and 'p/q' in one file make that file invalid (neither lands); other files still land."""
    world.manifest(
        "a.toml",
        {**world.asset("p.bin", 100, seed=1), "dest": "p"},
        {**world.asset("q.bin", 100, seed=2), "dest": "p/q"},
    )
    world.manifest("c.toml", {**world.asset("ok.bin", 100, seed=3), "dest": "ok.bin"})
    world.repo.commit("overlap")
    run = world.sync()
    assert run.code == 1
    problems = run.one("manifest_invalid")["problems"]
    assert len(problems) == 2 and all("'p'" in p for p in problems)
    assert world.export_files() == ["ok.bin"]


def test_sync_logs_each_config_warning(world: World) -> None:
    """syncd sync logs each accepted-but-risky setting (credentials over plain http) as config_insecure."""
    world.manifest("a.toml", {**world.asset("a.bin", 100, seed=1), "dest": "a.bin"})
    world.repo.commit("a")
    for args in ((), ("--dry-run",)):
        run = world.sync(*args)
        assert run.code == 0
        warning = run.one("config_insecure")
        assert warning["level"] == "warning" and "at 'artifactory.url'" in warning["warning"]
        assert world.nginx.token not in run.err


def test_last_good_commit_missing_from_clone_plans_nothing(world: World) -> None:
    """If the last good commit is not in the clone (rewritten branch, fresh clone), the pass fails and
    orphans nothing; allow_force_push = true follows the new head."""
    world.manifest("a.toml", {**world.asset("a.bin", 100, seed=1), "dest": "a.bin"})
    world.repo.commit("a")
    assert world.sync().code == 0
    db = sqlite3.connect(world.state / "ledger.sqlite3")
    with db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'manifests_commit'", ("0" * 40,))
    db.close()
    run = world.sync()
    assert run.code == 1 and "Traceback" not in run.err
    finished = run.one("pass_finished")
    assert "is not in the clone" in finished["git_error"] and finished["orphaned"] == 0
    assert not run.named("asset_orphaned") and world.export_files() == ["a.bin"]
    world.source["allow_force_push"] = True
    world.write_config()
    assert world.sync().one("pass_finished")["skipped"] == 1


def test_a_bug_outside_any_asset_is_logged_without_its_text(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """syncd sync turns an unexpected exception in the pass into internal_error (type, frames) and exit 1,
    never a traceback or the exception's text; status then shows the failed pass in the same words."""
    from syncd import cli

    world.manifest("a.toml", {**world.asset("a.bin", 100, seed=1), "dest": "a.bin"})
    world.repo.commit("a")

    def broken(*args: object) -> None:
        raise ValueError(f"Authorization: Bearer {SECRET}")

    monkeypatch.setattr(Reconciler, "_reconcile", broken)
    assert cli.main(["sync", "-c", str(world.config_path)]) == 1
    err = capsys.readouterr().err
    event = json.loads(next(line for line in err.splitlines() if '"internal_error"' in line))
    assert event["error"].startswith("internal error: ValueError at test_reconcile.py:")
    assert any("in run_pass" in f for f in event["frames"])
    assert SECRET not in err and "Traceback" not in err
    # the pass is recorded as failed, in our words, for `syncd status`
    assert cli.main(["status", "-c", str(world.config_path), "--json"]) == 1
    shown = capsys.readouterr().out
    assert json.loads(shown)["pass_error"].startswith("internal error: ValueError at ")
    assert SECRET not in shown


def test_periodic_verification_rehashes_a_slice_and_catches_what_the_stat_check_cannot(world: World) -> None:
    """``[verify] interval`` in ``syncd run``: each pass re-hashes about interval/verify-interval of the
    bytes (at least one file), cycling through every dest; a file whose bytes changed with its recorded
    identity unchanged (bit rot, or a tamperer who also rewrote the ledger's identity) is found by its
    slice and refused as changed_outside."""
    from syncd import events as ev

    for i in range(4):
        world.manifest(f"m{i}.toml", {**world.asset(f"{i}.bin", 1000, seed=i), "dest": f"{i}.bin"})
    world.repo.commit("four")
    world.write_config(schedule={"interval": "15m"}, verify={"interval": "1h"})  # a quarter per pass
    cfg = config.load(world.config_path)
    seen: list[ev.Event] = []
    rec = Reconciler(cfg, events=ev.EventBus([seen.append]), periodic_verify=True)
    try:
        assert rec.run_pass().ok
        rechecked: list[str] = []
        for _ in range(4):
            seen.clear()
            assert rec.run_pass().ok
            rechecked += [e.dest for e in seen if isinstance(e, ev.AssetRechecked)]
        assert sorted(rechecked) == ["0.bin", "1.bin", "2.bin", "3.bin"]  # each once in four passes
        target = world.export / "2.bin"
        os.chmod(target, 0o644)
        with open(target, "r+b") as fh:
            fh.write(b"!")
        os.chmod(target, 0o444)
        rec.ledger.set_identities({"2.bin": _identity(target)})  # the stat check is blind now
        refused: list[str] = []
        for _ in range(4):
            seen.clear()
            rec.run_pass()
            refused += [
                e.dest for e in seen if isinstance(e, ev.AssetRefused) and e.cause == "changed_outside"
            ]
        assert refused and set(refused) == {"2.bin"}
        assert rec.ledger.published()["2.bin"].damaged
    finally:
        rec.close()


def _identity(path: Path) -> str:
    from syncd.staging import identity

    return identity(os.stat(path))
