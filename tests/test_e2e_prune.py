"""End-to-end: ``[prune]`` and ``syncd prune`` retire files whose manifest entry is gone, after the grace,
only when they are still what syncd published, and never past a safety valve without ``--confirm``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from harness import World, syncd_command

pytestmark = pytest.mark.e2e

GRACE = 1.5


def setup(world: World, n: int = 3, **prune: Any) -> list[dict[str, Any]]:
    """``n`` assets under ds/v1/ published; [prune] enabled with a short grace."""
    world.write_config(prune={"enabled": True, "grace": f"{GRACE}s", "max_fraction": 1.0, **prune})
    assets = [{**world.asset(f"f{i}.bin", 1000 + i, seed=i), "dest": f"ds/v1/f{i}.bin"} for i in range(n)]
    world.manifest("ds.toml", *assets)
    world.repo.commit("publish")
    run = world.sync()
    assert run.code == 0, run.err
    return assets


def retire(world: World, assets: list[dict[str, Any]], keep: int) -> None:
    world.manifest("ds.toml", *assets[:keep])
    world.repo.commit(f"retire all but {keep}")


def audit(world: World) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (world.state / "audit.jsonl").read_text().splitlines()]


def test_an_orphan_goes_only_after_the_grace(world: World) -> None:
    """Orphaned: kept (syncd prune says until when); past the grace: removed with its empty directory,
    an audit record and a metric; a second pass changes nothing."""
    assets = setup(world, 2)
    world.manifest("ds.toml", assets[0], {**world.asset("g.bin", 10), "dest": "other/g.bin"})
    world.repo.commit("retire f1")
    run = world.sync()
    assert run.code == 0, run.err
    assert run.named("asset_orphaned")[0]["dest"] == "ds/v1/f1.bin"
    assert not run.named("asset_pruned")
    assert (world.export / "ds/v1/f1.bin").exists()
    listed = world.run("prune", "-c", str(world.config_path))
    assert listed.code == 0, listed.err
    assert "keep      ds/v1/f1.bin  (orphaned since" in listed.out and "removable after" in listed.out
    time.sleep(GRACE + 0.2)
    listed = world.run("prune", "-c", str(world.config_path))
    assert listed.out.startswith("remove    ds/v1/f1.bin  (1001 B, orphaned since"), listed.out
    run = world.sync()
    assert run.code == 0, run.err
    pruned = run.one("asset_pruned")
    assert (pruned["dest"], pruned["bytes"], pruned["gone"]) == ("ds/v1/f1.bin", 1001, False)
    assert not (world.export / "ds/v1/f1.bin").exists()
    assert (world.export / "ds/v1/f0.bin").exists()
    assert [r["dest"] for r in audit(world) if r["event"] == "pruned"] == ["ds/v1/f1.bin"]
    status = json.loads(world.run("status", "--json", "-c", str(world.config_path)).out)
    assert status["pruned_total"] == 1 and status["state"] == "ok"
    again = world.sync()
    assert again.code == 0 and not again.named("asset_pruned")
    assert world.export_files() == ["ds/v1/f0.bin", "other/g.bin"]


def test_empty_directories_syncd_made_go_and_others_stay(world: World) -> None:
    """Every file of a directory syncd created retired: the directory goes too; one with a foreign file,
    or one an admin made, stays."""
    world.write_config(prune={"enabled": True, "grace": f"{GRACE}s", "max_fraction": 1.0})
    (world.export / "admin").mkdir()
    a = {**world.asset("a.bin", 10, seed=1), "dest": "mine/deep/a.bin"}
    b = {**world.asset("b.bin", 10, seed=2), "dest": "shared/b.bin"}
    c = {**world.asset("c.bin", 10, seed=3), "dest": "admin/c.bin"}
    keep = {**world.asset("k.bin", 10, seed=4), "dest": "keep.bin"}
    world.manifest("m.toml", a, b, c, keep)
    world.repo.commit("publish")
    assert world.sync().code == 0
    (world.export / "shared" / "notes.txt").write_text("someone else's\n")
    world.manifest("m.toml", keep)
    world.repo.commit("retire")
    assert world.sync().code == 0
    time.sleep(GRACE + 0.2)
    run = world.sync()
    assert run.code == 0, run.err
    assert sorted(e["dest"] for e in run.named("asset_pruned")) == [
        "admin/c.bin",
        "mine/deep/a.bin",
        "shared/b.bin",
    ]
    assert not (world.export / "mine").exists()
    assert (world.export / "shared" / "notes.txt").read_text() == "someone else's\n"
    assert (world.export / "admin").is_dir()
    assert world.export_files() == ["keep.bin", "shared/notes.txt"]


def test_a_file_changed_since_publish_is_never_removed(world: World) -> None:
    """A retired file that was rewritten or re-linked on the export stays (kept: changed)."""
    assets = setup(world, 3)
    retire(world, assets, 1)
    assert world.sync().code == 0
    f1, f2 = world.export / "ds/v1/f1.bin", world.export / "ds/v1/f2.bin"
    f1.chmod(0o644)
    f1.write_bytes(b"edited by hand")
    os.replace(f2, world.export / "ds/v1/moved")  # a new inode at f2's dest
    (world.export / "ds/v1/moved").rename(f2)
    os.utime(f2, (1, 1))
    time.sleep(GRACE + 0.2)
    run = world.sync()
    assert run.code == 0, run.err
    assert not run.named("asset_pruned")
    assert f1.read_bytes() == b"edited by hand" and f2.exists()
    listed = world.run("prune", "-c", str(world.config_path))
    assert "keep      ds/v1/f1.bin  (changed since syncd recorded it" in listed.out
    assert "keep      ds/v1/f2.bin  (changed since syncd recorded it" in listed.out


def test_a_symlink_at_an_orphans_dest_is_never_followed(world: World, tmp_path: Any) -> None:
    """A retired dest replaced by a symlink to a file outside the export: neither is removed."""
    assets = setup(world, 2)
    retire(world, assets, 1)
    assert world.sync().code == 0
    outside = tmp_path / "precious"
    outside.write_text("keep me\n")
    dest = world.export / "ds/v1/f1.bin"
    dest.chmod(0o644)
    dest.unlink()
    dest.symlink_to(outside)
    time.sleep(GRACE + 0.2)
    run = world.sync()
    assert run.code == 0, run.err
    assert not run.named("asset_pruned")
    assert dest.is_symlink() and outside.read_text() == "keep me\n"


@pytest.mark.parametrize(
    ("prune", "keep", "valve"),
    [({"max_files": 1}, 1, "max_files"), ({"max_fraction": 0.5}, 1, "max_fraction")],
)
def test_a_safety_valve_removes_nothing_and_confirm_goes_past_it(
    world: World, prune: dict[str, Any], keep: int, valve: str
) -> None:
    """Too many (or too large a share) would go: an error event, exit 1, a status problem, nothing removed;
    syncd prune --confirm then removes them (and audits each)."""
    assets = setup(world, 3, **prune)
    retire(world, assets, keep)
    assert world.sync().code == 0
    time.sleep(GRACE + 0.2)
    run = world.sync()
    assert run.code == 1
    refused = run.one("prune_refused")
    assert refused["valve"] == valve and refused["would_remove"] == 2
    assert not run.named("asset_pruned")
    assert len(world.export_files()) == 3
    status = world.run("status", "-c", str(world.config_path))
    assert status.code == 1 and "  prune    " in status.out and "syncd prune --confirm" in status.out
    assert [r["valve"] for r in audit(world) if r["event"] == "prune_refused"] == [valve]
    listed = world.run("prune", "-c", str(world.config_path))
    assert f"prune refused ({valve})" in listed.out
    confirmed = world.run("prune", "--confirm", "-c", str(world.config_path))
    assert confirmed.code == 0, confirmed.err
    assert world.export_files() == ["ds/v1/f0.bin"]
    assert sorted(r["dest"] for r in audit(world) if r["event"] == "pruned") == [
        "ds/v1/f1.bin",
        "ds/v1/f2.bin",
    ]
    status = json.loads(world.run("status", "--json", "-c", str(world.config_path)).out)
    assert status["pruned_total"] == 2
    assert world.sync().code == 0  # the valve no longer trips: nothing left to remove


def test_no_assets_at_the_head_trips_a_valve(world: World) -> None:
    """Every manifest gone from the branch (it looks like "delete everything"): nothing is removed."""
    assets = setup(world, 2)
    world.repo.remove("assets/ds.toml")
    world.repo.write("assets/README", "manifests live here\n")
    world.repo.commit("oops")
    assert world.sync().code == 0
    time.sleep(GRACE + 0.2)
    run = world.sync()
    assert run.code == 1
    assert run.one("prune_refused")["valve"] == "no_assets"
    assert len(world.export_files()) == len(assets)


def test_a_refused_rewrite_trips_a_valve(world: World) -> None:
    """A force-pushed branch (refused, the last good commit served): nothing is removed."""
    assets = setup(world, 3)
    base = world.repo.head()
    retire(world, assets, 2)
    assert world.sync().code == 0
    world.repo.force_reset(base)
    world.manifest("ds.toml", *assets, {**world.asset("n.bin", 10), "dest": "n.bin"})
    world.repo.commit("rewritten")
    world.repo.git("push", "--quiet", "--force", "origin", "HEAD:refs/heads/main")
    time.sleep(GRACE + 0.2)
    run = world.sync()
    assert run.code == 1
    assert run.one("prune_refused")["valve"] == "untrusted_head"
    assert (world.export / "ds/v1/f2.bin").exists()


def test_the_dry_run_lists_exactly_what_the_pass_removes(world: World) -> None:
    """syncd sync --dry-run's remove lines are the dests the real pass then prunes."""
    assets = setup(world, 6)
    retire(world, assets, 2)
    assert world.sync().code == 0
    time.sleep(GRACE + 0.2)
    dry = world.sync("--dry-run")
    assert dry.code == 0, dry.err
    listed = sorted(line.split()[1] for line in dry.out.splitlines() if line.startswith("remove "))
    real = world.sync()
    assert real.code == 0, real.err
    assert (
        listed
        == sorted(e["dest"] for e in real.named("asset_pruned"))
        == [f"ds/v1/f{i}.bin" for i in range(2, 6)]
    )


def test_prune_is_off_by_default(world: World) -> None:
    """Without [prune] enabled an orphan stays forever; syncd prune says so."""
    assets = [
        {**world.asset("a.bin", 10), "dest": "a.bin"},
        {**world.asset("b.bin", 10, seed=1), "dest": "b.bin"},
    ]
    world.manifest("m.toml", *assets)
    world.repo.commit("p")
    assert world.sync().code == 0
    world.manifest("m.toml", assets[0])
    world.repo.commit("r")
    assert world.sync().code == 0
    assert world.sync().code == 0
    assert world.export_files() == ["a.bin", "b.bin"]
    listed = world.run("prune", "-c", str(world.config_path))
    assert "[prune] enabled is false" in listed.err


def test_sigkill_mid_prune_converges(world: World) -> None:
    """SIGKILL at a random moment of a pass that prunes 150 files; the next pass finishes the job: every
    orphan gone, its ledger row forgotten, nothing left in staging, the kept files intact."""
    rng = random.Random(11)  # noqa: S311 - test timing, not crypto
    assets = setup(world, 160, max_files=1000)
    retire(world, assets, 10)
    assert world.sync().code == 0
    time.sleep(GRACE + 0.2)
    proc = subprocess.Popen(
        [syncd_command(), "sync", "-c", str(world.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    kill_after = rng.randint(5, 100)  # the k-th removal logged (each event is one stderr line)
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        seen += '"asset_pruned"' in line
        if seen == kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    left = len(world.export_files())
    assert 10 < left <= 160 - kill_after, left  # killed mid-prune
    run = world.sync()
    assert run.code == 0, run.err
    assert world.export_files() == sorted(f"ds/v1/f{i}.bin" for i in range(10))
    assert world.staging_files() == []
    listed = world.run("prune", "-c", str(world.config_path))
    assert "remove " not in listed.out
    pruned = {r["dest"] for r in audit(world) if r["event"] == "pruned"}
    assert pruned <= {f"ds/v1/f{i}.bin" for i in range(10, 160)}


def test_an_entry_moved_into_an_invalid_manifest_is_never_pruned(world: World) -> None:
    """A retired-looking dest whose entry moved into a file with a typo (invalid at the head) stays, in
    the same commit and when the file breaks later; fixed, the pass keeps serving it."""
    assets = setup(world, 3)
    world.manifest("ds.toml", *assets[:1])
    world.manifest("other.toml", {**assets[1], "bogus": 1})
    world.manifest("third.toml", assets[2])
    world.repo.commit("move f1 into a file with a typo, f2 into a good one")
    assert world.sync().code == 1  # the invalid manifest
    world.repo.write("assets/third.toml", "[[asset]\n")  # f2's new home breaks later
    world.repo.commit("break third.toml")
    time.sleep(GRACE + 0.2)
    run = world.sync()
    assert run.code == 1 and not run.named("asset_pruned")
    assert len(world.export_files()) == 3
    listed = world.run("prune", "-c", str(world.config_path))
    assert "invalid at the head (it may still list this dest): nothing is pruned until fixed" in listed.out


def test_confirm_plans_at_the_head_so_a_dest_wanted_again_stays(world: World) -> None:
    """Retired, past its grace, then re-added at the head: syncd prune --confirm (no pass in between)
    sees the head and keeps it."""
    assets = setup(world, 3)
    retire(world, assets, 1)
    assert world.sync().code == 0
    time.sleep(GRACE + 0.2)
    world.manifest("ds.toml", *assets[:2])
    world.repo.commit("f1 is wanted again")
    confirmed = world.run("prune", "--confirm", "-c", str(world.config_path))
    assert confirmed.code == 0, confirmed.err
    assert "remove    ds/v1/f2.bin" in confirmed.out and "ds/v1/f1.bin" not in confirmed.out
    assert world.export_files() == ["ds/v1/f0.bin", "ds/v1/f1.bin"]


def test_confirm_needs_the_daemon_stopped(world: World) -> None:
    """--confirm while another syncd holds the state directory: exit 1, a message saying to stop it."""
    setup(world, 1)
    hold = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(world.state / "lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        run = world.run("prune", "--confirm", "-c", str(world.config_path))
        assert run.code == 1 and "stop the daemon first" in run.err
        listed = world.run("prune", "-c", str(world.config_path))
        assert listed.code == 0, listed.err  # the listing works beside it
    finally:
        holder.kill()
        holder.wait()


def test_a_directory_recreated_at_a_path_syncd_made_is_kept(world: World) -> None:
    """An admin who removed a syncd-made directory and made a new one at the same path keeps it."""
    assets = setup(world, 1)
    world.manifest("ds.toml", {**world.asset("k.bin", 10), "dest": "keep.bin"})
    world.repo.commit("retire")
    assert world.sync().code == 0
    v1 = world.export / "ds" / "v1"
    (v1 / "f0.bin").chmod(0o644)
    (v1 / "f0.bin").unlink()
    v1.rmdir()
    (world.export / "ds").rmdir()
    (world.export / "ds" / "v1").mkdir(parents=True)  # the admin's (a new inode, or a reused one: see docs)
    (world.export / "ds" / "hold").mkdir()  # and one beside it, so the new ds gets a different inode
    time.sleep(GRACE + 0.2)
    run = world.sync()
    assert run.code == 0, run.err
    pruned = run.one("asset_pruned")
    assert pruned["gone"] is True and "ds" not in pruned["directories"]
    assert (world.export / "ds" / "hold").is_dir()
    assert assets


def test_confirm_keeps_what_an_unfetched_or_refused_head_may_want(world: World) -> None:
    """Past its grace, re-added at a head that cannot be served: git unreachable, the file stays (no
    valve); a refused force-push, the untrusted_head valve holds even for --confirm."""
    assets = setup(world, 3)
    retire(world, assets, 2)
    assert world.sync().code == 0
    time.sleep(GRACE + 0.2)
    world.manifest("ds.toml", *assets)
    world.repo.commit("f2 is wanted again")
    bare = world.repo.bare_path
    hidden = bare.with_name(bare.name + ".away")
    bare.rename(hidden)
    try:
        run = world.run("prune", "--confirm", "-c", str(world.config_path))
        assert run.code == 1
        assert "keep      ds/v1/f2.bin  (the branch head could not be fetched" in run.out
        assert (world.export / "ds/v1/f2.bin").exists()
    finally:
        hidden.rename(bare)
    base = world.repo.git("rev-list", "--max-parents=0", "HEAD").strip()
    world.repo.force_reset(base)
    world.manifest("ds.toml", *assets, {**world.asset("n.bin", 10), "dest": "n.bin"})
    world.repo.commit("rewritten, f2 wanted")
    world.repo.git("push", "--quiet", "--force", "origin", "HEAD:refs/heads/main")
    run = world.run("prune", "--confirm", "-c", str(world.config_path))
    assert run.code == 1
    assert "prune refused (untrusted_head)" in run.out
    assert (world.export / "ds/v1/f2.bin").exists()
