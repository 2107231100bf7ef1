"""End-to-end: ``syncd validate`` as a pull request's CI check would run it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import World, manifest_text
from servers import GitRepo

pytestmark = pytest.mark.e2e

SHA_A = "a" * 64
SHA_B = "b" * 64


def entry(dest: str, sha: str = SHA_A, **kw: object) -> dict[str, object]:
    return {"source": f"repo/{dest}", "sha256": sha, "size": 10, "dest": dest, **kw}


def test_valid_directory_passes(world: World, git_repo: GitRepo) -> None:
    """A directory of valid manifests (recursively) exits 0."""
    git_repo.write("assets/a.toml", manifest_text(entry("a.bin")))
    git_repo.write("assets/sub/b.toml", manifest_text(entry("b.bin")))
    run = world.run("validate", str(git_repo.work_path / "assets"))
    assert run.code == 0, run.out + run.err
    assert "2 file(s) OK" in run.err


def test_errors_name_file_line_and_field(world: World, git_repo: GitRepo) -> None:
    """Invalid TOML is reported as FILE:LINE, field problems as FILE: asset[N].field; exit 1."""
    bad_toml = git_repo.write("assets/broken.toml", '[[asset]]\nsource = "x"\nsize = \n')
    bad_field = git_repo.write(
        "assets/fields.toml", manifest_text(entry("ok.bin"), entry("../escape", sha="XYZ"))
    )
    run = world.run("validate", str(git_repo.work_path / "assets"))
    assert run.code == 1
    lines = run.out.splitlines()
    assert any(line.startswith(f"{bad_toml}:3: invalid TOML") for line in lines), lines
    assert f"{bad_field}: asset[1].dest: must not contain '..'" in lines
    assert any(line.startswith(f"{bad_field}: asset[1].sha256: must be 64 lowercase hex") for line in lines)


def test_duplicate_dest_across_files(world: World, tmp_path: Path) -> None:
    """Two files giving the same dest are both reported."""
    (tmp_path / "one.toml").write_text(manifest_text(entry("same.bin")))
    (tmp_path / "two.toml").write_text(manifest_text(entry("same.bin", sha=SHA_B)))
    run = world.run("validate", str(tmp_path / "one.toml"), str(tmp_path / "two.toml"))
    assert run.code == 1
    assert run.out.count("'same.bin' is also the dest of") == 2


def test_missing_path(world: World, tmp_path: Path) -> None:
    """A path that does not exist is an error, not a silent pass."""
    run = world.run("validate", str(tmp_path / "nope"))
    assert run.code == 1
    assert "no such file or directory" in run.out


def test_base_reports_changed_sha_without_replace(world: World, git_repo: GitRepo) -> None:
    """--base REV flags a dest whose sha256 changes since REV unless replace = true."""
    git_repo.write("assets/m.toml", manifest_text(entry("model.bin"), entry("other.bin")))
    base = git_repo.commit("published")
    git_repo.write("assets/m.toml", manifest_text(entry("model.bin", sha=SHA_B), entry("other.bin")))
    run = world.run("validate", "--base", base, str(git_repo.work_path / "assets"))
    assert run.code == 1
    assert "asset[0].sha256: dest 'model.bin' has sha256 " + SHA_A in run.out
    assert "replace = true" in run.out
    git_repo.write(
        "assets/m.toml",
        manifest_text(entry("model.bin", sha=SHA_B, replace=True), entry("other.bin")),
    )
    run = world.run("validate", "--base", base, str(git_repo.work_path / "assets"))
    assert run.code == 0, run.out


def test_base_allows_new_and_removed_assets(world: World, git_repo: GitRepo) -> None:
    """Adding a new dest or removing one is fine against --base."""
    git_repo.write("assets/m.toml", manifest_text(entry("old.bin")))
    base = git_repo.commit("base")
    git_repo.write("assets/m.toml", manifest_text(entry("new.bin")))
    run = world.run("validate", "--base", base, str(git_repo.work_path / "assets"))
    assert run.code == 0, run.out


def test_base_must_resolve(world: World, git_repo: GitRepo) -> None:
    """An unknown --base revision is an error naming it."""
    git_repo.write("assets/m.toml", manifest_text(entry("a.bin")))
    git_repo.commit("base")
    run = world.run("validate", "--base", "no-such-rev", str(git_repo.work_path / "assets"))
    assert run.code == 1
    assert "no-such-rev" in run.out


def test_file_dest_overlapping_a_directory_dest_across_files(world: World, tmp_path: Path) -> None:
    """'p' in one file and 'p/q' in another: both claims are reported (as the daemon refuses both)."""
    (tmp_path / "m").mkdir()
    one = tmp_path / "m" / "one.toml"
    two = tmp_path / "m" / "two.toml"
    one.write_text(manifest_text(entry("p")))
    two.write_text(manifest_text(entry("p/q")))
    run = world.run("validate", str(tmp_path / "m"))
    assert run.code == 1
    assert run.out.splitlines() == [
        f"{one}: asset[0].dest: 'p' is a file dest but 'p/q' ({two}: asset[0]) puts a file under it",
        f"{two}: asset[0].dest: 'p/q' needs 'p' to be a directory, but 'p' ({one}: asset[0]) makes it a file",
    ]


def test_non_ascii_names_print_on_an_ascii_terminal(world: World, tmp_path: Path) -> None:
    """With an ASCII-only stdout, a non-ASCII file name is printed as an escape, not a traceback."""
    (tmp_path / "m").mkdir()
    bad = tmp_path / "m" / "caf\u00e9.toml"
    bad.write_text("x = [\n")
    run = world.run("validate", str(tmp_path / "m"), env={"PYTHONIOENCODING": "ascii"})
    assert run.code == 1
    assert "Traceback" not in run.err
    assert run.out.startswith(f"{tmp_path}/m/caf\\xe9.toml")


def test_base_with_a_symlink_manifest_published_nothing(world: World, git_repo: GitRepo) -> None:
    """A manifest that was a symlink at --base published nothing there: its dests are new now."""
    git_repo.write("assets/real.toml", manifest_text(entry("a.bin")))
    os.symlink("real.toml", git_repo.work_path / "assets" / "link.toml")
    base = git_repo.commit("a symlink manifest")
    git_repo.remove("assets/link.toml")
    git_repo.write("assets/link.toml", manifest_text(entry("b.bin", sha=SHA_B)))
    git_repo.write("assets/real.toml", manifest_text(entry("a.bin")))
    run = world.run("validate", "--base", base, str(git_repo.work_path / "assets"))
    assert (run.code, run.out) == (0, ""), run.out
