"""End-to-end: ``syncd sync`` as a subprocess against nginx and a file:// manifest repo."""

from __future__ import annotations

import fcntl
import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from harness import World

pytestmark = pytest.mark.e2e


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ledger_rows(world: World, table: str) -> dict[str, tuple[object, ...]]:
    db = sqlite3.connect(world.state / "ledger.sqlite3")
    try:
        return {r[0]: r for r in db.execute(f"SELECT * FROM {table}")}  # noqa: S608 (fixed names)
    finally:
        db.close()


def test_second_pass_changes_nothing(world: World) -> None:
    """A pass right after a successful pass downloads nothing and leaves the files untouched."""
    a = world.asset("a.bin", 100_000, seed=1)
    world.manifest("a.toml", {**a, "dest": "x/a.bin"})
    world.repo.commit("add a")
    assert world.sync().code == 0
    before = os.stat(world.export / "x/a.bin")
    run = world.sync()
    assert run.code == 0
    after = os.stat(world.export / "x/a.bin")
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert run.named("asset_published") == []
    assert run.one("pass_finished")["skipped"] == 1


def test_new_commit_syncs_only_new_assets(world: World) -> None:
    """A later commit adding a manifest publishes just its asset; earlier ones are skipped."""
    a = world.asset("a.bin", 10_000, seed=1)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    world.repo.commit("add a")
    assert world.sync().code == 0
    b = world.asset("b.bin", 20_000, seed=2)
    world.manifest("team/b.toml", {**b, "dest": "deep/dir/b.bin", "description": "shard b"})
    commit = world.repo.commit("add b")
    run = world.sync()
    assert run.code == 0, run.err
    assert [e["dest"] for e in run.named("asset_published")] == ["deep/dir/b.bin"]
    assert run.one("pass_finished")["commit"] == commit
    assert sha(world.export / "deep/dir/b.bin") == b["sha256"]
    assert ledger_rows(world, "published")["deep/dir/b.bin"][5] == commit


def test_file_deleted_by_hand_comes_back(world: World) -> None:
    """A published file removed from the export is downloaded again on the next pass."""
    a = world.asset("a.bin", 50_000, seed=3)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    world.repo.commit("add a")
    assert world.sync().code == 0
    (world.export / "a.bin").unlink()
    run = world.sync()
    assert run.code == 0
    assert sha(world.export / "a.bin") == a["sha256"]
    assert run.one("asset_published")["dest"] == "a.bin"


def test_invalid_manifest_is_skipped_and_others_land(world: World) -> None:
    """A broken manifest is reported once with file and commit; the good one still lands; exit 1."""
    good = world.asset("good.bin", 1000, seed=4)
    world.manifest("good.toml", {**good, "dest": "good.bin"})
    world.repo.write("assets/bad.toml", '[[asset]]\nsource = "x"\nsha256 = "abc"\n')
    commit = world.repo.commit("good and bad")
    run = world.sync()
    assert run.code == 1
    assert sha(world.export / "good.bin") == good["sha256"]
    bad = run.one("manifest_invalid")
    assert bad["manifest"] == "assets/bad.toml"
    assert bad["commit"] == commit
    assert "asset[0].sha256" in bad["error"]
    assert "asset[0].size: required field is missing" in bad["error"]
    # Fixing the manifest in a later commit makes the pass clean again.
    world.repo.remove("assets/bad.toml")
    world.repo.commit("drop bad")
    assert world.sync().code == 0


def test_manifest_with_thousands_of_problems_is_one_bounded_event(world: World) -> None:
    """A manifest with a problem in each of 3,000 assets is one manifest_invalid event of bounded size
    (journald splits lines over 48 KiB), with the full count; the good manifest still lands."""
    good = world.asset("good.bin", 1000, seed=4)
    world.manifest("good.toml", {**good, "dest": "good.bin"})
    key = "k" * 300
    body = "".join(f'[[asset]]\nsource = "s/{i}"\nsize = 1\ndest = "d/{i}"\n{key} = 1\n' for i in range(3000))
    world.repo.write("assets/bad.toml", body)
    world.repo.commit("a typo in every asset")
    run = world.sync()
    assert run.code == 1
    assert sha(world.export / "good.bin") == good["sha256"]
    lines = [line for line in run.err.splitlines() if '"manifest_invalid"' in line]
    assert len(lines) == 1 and len(lines[0].encode()) < 48 * 1024, len(lines[0])
    bad = run.one("manifest_invalid")
    assert bad["problem_count"] > 3000  # a missing sha256 and an unknown key in each asset
    assert len(bad["problems"]) == 21 and bad["problems"][-1].startswith("… and ")


def test_checksum_mismatch_leaves_nothing(world: World) -> None:
    """Bytes that do not hash to the manifest's sha256 never reach dest; others publish; exit 1."""
    good = world.asset("good.bin", 5000, seed=5)
    bad = world.asset("bad.bin", 300_000, seed=6)
    bad["sha256"] = "0" * 64
    world.manifest("m.toml", {**good, "dest": "good.bin"}, {**bad, "dest": "bad.bin"})
    world.repo.commit("one corrupted")
    run = world.sync()
    assert run.code == 1
    assert not (world.export / "bad.bin").exists()
    assert sha(world.export / "good.bin") == good["sha256"]
    failed = run.one("asset_failed")
    assert failed["dest"] == "bad.bin" and "sha256 mismatch" in failed["error"]
    assert world.staging_files() == []
    assert ledger_rows(world, "failures")["bad.bin"][2] == 1
    assert "bad.bin" not in ledger_rows(world, "published")


def test_size_mismatch_is_refused_before_body(world: World) -> None:
    """A manifest size that differs from the server's Content-Length fails the asset; nothing lands."""
    a = world.asset("s.bin", 4096, seed=7)
    world.manifest("m.toml", {**a, "size": 4000, "dest": "s.bin"})
    world.repo.commit("wrong size")
    run = world.sync()
    assert run.code == 1
    assert "Content-Length 4096 differs" in run.one("asset_failed")["error"]
    assert not (world.export / "s.bin").exists()
    assert world.staging_files() == []


def test_missing_upload_404(world: World) -> None:
    """A source that is not in Artifactory fails with HTTP 404 named in the event; exit 1."""
    world.manifest(
        "m.toml", {"source": f"{world.tag}/nope.bin", "sha256": "a" * 64, "size": 1, "dest": "nope.bin"}
    )
    world.repo.commit("missing upload")
    run = world.sync()
    assert run.code == 1
    ev = run.one("asset_failed")
    assert "HTTP 404" in ev["error"] and ev["source"] == f"{world.tag}/nope.bin"
    assert world.export_files() == []


def test_wrong_token_401_and_secret_never_printed(world: World) -> None:
    """A rejected token fails with HTTP 401, and neither token appears in any output."""
    a = world.asset("a.bin", 100, seed=8)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    world.repo.commit("add")
    wrong = "WRONG-token-9f8e7d6c5b4a"
    (world.config_path.parent / "artifactory.token").write_text(wrong)
    for args in ((), ("--dry-run",)):
        run = world.sync(*args)
        text = run.out + run.err
        assert wrong not in text and world.nginx.token not in text
    run = world.sync()
    assert run.code == 1
    assert "HTTP 401" in run.one("asset_failed")["error"]
    assert world.export_files() == []


def test_basic_auth(world: World) -> None:
    """username + password_file authenticate with basic auth."""
    world.auth = "basic"
    world.write_config()
    a = world.asset("a.bin", 1234, seed=9)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    world.repo.commit("add")
    run = world.sync()
    assert run.code == 0, run.err
    assert sha(world.export / "a.bin") == a["sha256"]
    assert world.nginx.password not in run.err


def test_symlink_at_dest_is_refused(world: World, tmp_path: Path) -> None:
    """A symlink planted at dest is neither followed nor replaced; its target stays untouched."""
    outside = tmp_path / "outside.txt"
    outside.write_text("do not touch")
    os.symlink(outside, world.export / "a.bin")
    a = world.asset("a.bin", 100, seed=10)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    world.repo.commit("add")
    run = world.sync()
    assert run.code == 1
    assert "symlink" in run.one("asset_refused")["error"]
    assert os.path.islink(world.export / "a.bin")
    assert outside.read_text() == "do not touch"


def test_symlinked_parent_cannot_redirect_writes(world: World, tmp_path: Path) -> None:
    """A directory symlink inside the export pointing outside it is refused; nothing is written there."""
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, world.export / "datasets")
    a = world.asset("a.bin", 100, seed=11)
    b = world.asset("b.bin", 100, seed=12)
    world.manifest("m.toml", {**a, "dest": "datasets/v1/a.bin"}, {**b, "dest": "ok/b.bin"})
    world.repo.commit("add")
    run = world.sync()
    assert run.code == 1
    refused = run.one("asset_refused")
    assert refused["dest"] == "datasets/v1/a.bin"
    assert list(outside.iterdir()) == []
    assert sha(world.export / "ok/b.bin") == b["sha256"]


def test_unknown_file_with_same_content_is_adopted(world: World) -> None:
    """A file already at dest with the right bytes is adopted (0444, in the ledger), not downloaded."""
    a = world.asset("a.bin", 2048, seed=13)
    (world.export / "pre").mkdir()
    (world.export / "pre/a.bin").write_bytes((world.blobs / "a.bin").read_bytes())
    world.manifest("m.toml", {**a, "dest": "pre/a.bin"})
    world.repo.commit("add")
    run = world.sync()
    assert run.code == 0, run.err
    assert run.one("asset_adopted")["dest"] == "pre/a.bin"
    assert run.named("asset_published") == []
    assert (world.export / "pre/a.bin").stat().st_mode & 0o777 == 0o444
    assert ledger_rows(world, "published")["pre/a.bin"][7] == "adopted"


def test_unknown_file_with_other_content_is_refused(world: World) -> None:
    """A different file already at dest is refused and left byte-for-byte as it was."""
    a = world.asset("a.bin", 2048, seed=14)
    (world.export / "a.bin").write_bytes(b"somebody else's file")
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    world.repo.commit("add")
    run = world.sync()
    assert run.code == 1
    assert "different file is at dest" in run.one("asset_refused")["error"]
    assert (world.export / "a.bin").read_bytes() == b"somebody else's file"


def test_changing_published_sha_needs_replace(world: World) -> None:
    """A new sha256 for a published dest is refused; with replace = true it is replaced."""
    v1 = world.asset("v1.bin", 3000, seed=15)
    v2 = world.asset("v2.bin", 4000, seed=16)
    world.manifest("m.toml", {**v1, "dest": "model.bin"})
    world.repo.commit("v1")
    assert world.sync().code == 0
    world.manifest("m.toml", {**v2, "dest": "model.bin"})
    world.repo.commit("v2 without replace")
    run = world.sync()
    assert run.code == 1
    assert "replace = true" in run.one("asset_refused")["error"]
    assert sha(world.export / "model.bin") == v1["sha256"]
    world.manifest("m.toml", {**v2, "dest": "model.bin", "replace": True})
    world.repo.commit("v2 with replace")
    run = world.sync()
    assert run.code == 0, run.err
    assert run.one("asset_published")["replaced"] is True
    assert sha(world.export / "model.bin") == v2["sha256"]


def test_removed_entry_is_orphaned_not_deleted(world: World) -> None:
    """Dropping a manifest entry leaves its file in place and logs asset_orphaned once."""
    a = world.asset("a.bin", 100, seed=17)
    b = world.asset("b.bin", 100, seed=18)
    world.manifest("m.toml", {**a, "dest": "a.bin"}, {**b, "dest": "b.bin"})
    world.repo.commit("two")
    assert world.sync().code == 0
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    world.repo.commit("drop b")
    run = world.sync()
    assert run.code == 0
    assert run.one("asset_orphaned")["dest"] == "b.bin"
    assert sha(world.export / "b.bin") == b["sha256"]
    assert world.sync().named("asset_orphaned") == []


def test_same_dest_in_two_files_refused(world: World) -> None:
    """Two manifests claiming one dest: neither is synced, the event names both files."""
    a = world.asset("a.bin", 100, seed=19)
    b = world.asset("b.bin", 100, seed=20)
    world.manifest("one.toml", {**a, "dest": "same.bin"})
    world.manifest("two.toml", {**b, "dest": "same.bin"})
    world.repo.commit("clash")
    run = world.sync()
    assert run.code == 1
    err = run.one("asset_refused")["error"]
    assert "assets/one.toml" in err and "assets/two.toml" in err
    assert not (world.export / "same.bin").exists()


def test_second_instance_is_refused(world: World) -> None:
    """While another process holds the state lock, syncd sync exits 1 with a clear message."""
    world.state.mkdir()
    with open(world.state / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write("4242\n")
        fh.flush()
        run = world.sync()
    assert run.code == 1
    assert "another syncd (pid 4242)" in run.one("command_failed")["error"]


def test_dry_run_changes_nothing(world: World) -> None:
    """--dry-run prints download/skip/refuse lines, writes nothing to export or ledger, exits 0."""
    a = world.asset("a.bin", 100, seed=21)
    b = world.asset("b.bin", 100, seed=22)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    assert world.sync().code == 0
    ledger_before = (world.state / "ledger.sqlite3").read_bytes()
    world.manifest("m.toml", {**a, "dest": "a.bin"}, {**b, "dest": "b.bin"})
    world.repo.commit("b")
    run = world.sync("--dry-run")
    assert run.code == 0, run.err
    assert "download  b.bin" in run.out
    assert "skip      a.bin" in run.out
    assert "1 to download" in run.out
    assert world.export_files() == ["a.bin"]
    assert (world.state / "ledger.sqlite3").read_bytes() == ledger_before


def test_dry_run_exit_1_on_refusal(world: World) -> None:
    """--dry-run exits 1 when something would be refused (pending downloads are not failures)."""
    (world.export / "a.bin").symlink_to("/etc/hostname")
    a = world.asset("a.bin", 100, seed=23)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    run = world.sync("--dry-run")
    assert run.code == 1
    assert "refuse    a.bin" in run.out


def test_missing_export_root_is_not_created(world: World) -> None:
    """A missing export root (NFS not mounted) fails the pass with exit 1 and is never created."""
    world.export.rmdir()
    a = world.asset("a.bin", 100, seed=24)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    run = world.sync()
    assert run.code == 1
    assert "does not exist" in run.one("command_failed")["error"]
    assert not world.export.exists()


def test_config_error_exit_2(world: World) -> None:
    """An unknown config key is a configuration error: exit 2, the key named."""
    world.write_config(download={"concurency": 3})
    run = world.sync()
    assert run.code == 2
    assert "at 'download.concurency': unknown key" in run.one("config_invalid")["error"]


def test_check_config_reports_every_problem(world: World) -> None:
    """check-config lists all problems at once and exits 2; a good config exits 0."""
    assert world.run("check-config", "-c", str(world.config_path)).code == 0
    world.write_config(export={"root": "relative/path"}, download={"timeout": "soon", "x": 1})
    run = world.run("check-config", "-c", str(world.config_path))
    assert run.code == 2
    assert "at 'download.timeout'" in run.err
    assert "at 'download.x': unknown key" in run.err


def test_config_from_environment(world: World) -> None:
    """$SYNCD_CONFIG names the config file when -c is absent."""
    run = world.run("check-config", env={"SYNCD_CONFIG": str(world.config_path)})
    assert run.code == 0
    assert str(world.config_path) in run.out


def test_world_readable_secret_refused(world: World) -> None:
    """A token file readable by others is a configuration error naming the key and the fix."""
    (world.config_path.parent / "artifactory.token").chmod(0o644)
    run = world.sync()
    assert run.code == 2
    assert "chmod 600" in run.one("config_invalid")["error"]


def test_many_assets_concurrently(world: World) -> None:
    """Forty assets across four manifests all land byte-exact in one pass."""
    for m in range(4):
        assets = []
        for i in range(10):
            a = world.asset(f"m{m}/f{i}.bin", 1000 + 97 * i, seed=m * 100 + i)
            assets.append({**a, "dest": f"many/m{m}/f{i}.bin"})
        world.manifest(f"m{m}.toml", *assets)
    world.repo.commit("many")
    run = world.sync()
    assert run.code == 0, run.err
    assert len(run.named("asset_published")) == 40
    assert len(world.export_files()) == 40
    for m in range(4):
        for i in range(10):
            src = world.blobs / f"m{m}/f{i}.bin"
            assert (world.export / f"many/m{m}/f{i}.bin").read_bytes() == src.read_bytes()


def test_dry_run_beside_a_running_syncd(world: World) -> None:
    """With the lock held, --dry-run plans against the last fetched commit and touches nothing."""
    a = world.asset("a.bin", 100, seed=30)
    world.manifest("m.toml", {**a, "dest": "a.bin"})
    synced = world.repo.commit("a")
    assert world.sync().code == 0
    (world.export / "a.bin").unlink()
    b = world.asset("b.bin", 100, seed=31)
    world.manifest("b.toml", {**b, "dest": "b.bin"})
    world.repo.commit("b, not fetched yet")
    clone_ref = world.state / "repo.git" / "packed-refs"
    before = clone_ref.read_bytes() if clone_ref.exists() else b""
    with open(world.state / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write("4343\n")
        fh.flush()
        run = world.sync("--dry-run")
    assert run.code == 0, run.err
    assert run.one("git_not_fetched")["commit"] == synced
    assert "download  a.bin" in run.out and "b.bin" not in run.out
    assert "not fetched: another syncd (pid 4343)" in run.out
    assert world.export_files() == []
    assert (clone_ref.read_bytes() if clone_ref.exists() else b"") == before
