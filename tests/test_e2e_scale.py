"""The scale case of bench/bench_scale.py at a reduced size (2,000 assets in 20 manifest files), end to
end with `syncd sync`: the first pass publishes everything, a pass with no new commit and a pass after one
changed manifest file plan only what changed, and the export stays exact. (Timings are the bench's job.)"""

from __future__ import annotations

import hashlib
import json

import pytest

from harness import World

pytestmark = pytest.mark.e2e

ASSETS, PER_FILE = 2000, 100


def test_reduced_scale_passes_plan_only_what_changed(world: World) -> None:
    """2,000 assets of 1 KiB in 20 files: then no commit (all skipped, nothing planned), then one file changed
    (one asset added, one dropped): one download, one orphan, the rest skipped; status stays exact."""
    entries = []
    for i in range(ASSETS):
        entries.append(
            {**world.asset(f"s/{i:05d}.bin", 1024, seed=i), "dest": f"d{i // PER_FILE:02d}/{i:05d}.bin"}
        )
    for f in range(ASSETS // PER_FILE):
        world.manifest(f"m{f:02d}.toml", *entries[f * PER_FILE : (f + 1) * PER_FILE])
    world.repo.commit("2,000 assets")
    first = world.sync(timeout=600)
    assert first.code == 0, first.err[-3000:]
    assert first.one("pass_finished")["published"] == ASSETS

    quiet = world.sync()
    assert quiet.code == 0, quiet.err[-3000:]
    done = quiet.one("pass_finished")
    assert (done["published"], done["skipped"], done["orphaned"]) == (0, ASSETS, 0)

    changed = entries[5 * PER_FILE : 6 * PER_FILE]
    gone = changed.pop(0)
    changed.append({**world.asset("s/new.bin", 2048, seed=99), "dest": "d05/new.bin"})
    world.manifest("m05.toml", *changed)
    world.repo.commit("one file changed")
    one = world.sync()
    assert one.code == 0, one.err[-3000:]
    done = one.one("pass_finished")
    assert (done["published"], done["skipped"], done["orphaned"]) == (1, ASSETS - 1, 1)
    assert [e["dest"] for e in one.named("asset_orphaned")] == [gone["dest"]]
    assert (world.export / "d05/new.bin").read_bytes() == (world.blobs / "s/new.bin").read_bytes()

    status = world.run("status", "--json", "-c", str(world.config_path))
    assert status.code == 0, status.err
    assert json.loads(status.out)["state"] == "ok"
    for e in entries[:50] + changed[-1:]:
        path = world.export / e["dest"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"], e["dest"]
