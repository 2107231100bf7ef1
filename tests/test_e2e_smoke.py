"""End-to-end: the installed syncd command against nginx and a file:// manifest repo."""

from __future__ import annotations

import hashlib

import pytest

from harness import World

pytestmark = pytest.mark.e2e


def test_merged_asset_lands_byte_exact(world: World) -> None:
    """A merged manifest's asset appears at dest with the exact bytes, mode 0444, exit 0."""
    a = world.asset("train-000.tar", 300_000, seed=1)
    world.manifest("team/a.toml", {**a, "dest": "datasets/train-000.tar"})
    commit = world.repo.commit("add train-000")
    run = world.sync()
    assert run.code == 0, run.err
    dest = world.export / "datasets/train-000.tar"
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == a["sha256"]
    assert dest.stat().st_mode & 0o777 == 0o444
    assert run.one("asset_published")["dest"] == "datasets/train-000.tar"
    assert run.one("pass_finished")["commit"] == commit
    assert world.staging_files() == []
