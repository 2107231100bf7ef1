"""End-to-end over real smart HTTP (nginx + fcgiwrap + git-http-backend): token auth for the manifest repo."""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path

import pytest

from git_http import GitHttp
from harness import World
from servers import GitRepo, Nginx

pytestmark = pytest.mark.e2e


@pytest.fixture
def http_git_repo(git_http: GitHttp, tmp_path: Path) -> GitRepo:
    """A fresh manifest repo whose bare repo is served by `git_http`; ``.url`` is http://…/git/<name>."""
    name = f"manifests-{uuid.uuid4().hex[:12]}.git"
    return GitRepo(git_http.repos_dir / name, tmp_path / "work" / "manifests", url=git_http.url(name))


def _token_file(directory: Path, token: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "git.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path.absolute()


def _http_world(tmp_path: Path, repo: GitRepo, nginx: Nginx, token: str | None) -> World:
    source = {} if token is None else {"token_file": str(_token_file(tmp_path / "keys", token))}
    return World(tmp_path / "world", repo, nginx, source=source)


def _access_lines(git_http: GitHttp, repo: GitRepo) -> list[str]:
    """The server's access-log lines (``$request $status $remote_user``) for this test's repo."""
    name = repo.bare_path.name
    return [ln for ln in git_http.access_log.read_text().splitlines() if f"/git/{name}/" in ln]


def test_clone_then_fetch_over_http_with_token(
    tmp_path: Path, http_git_repo: GitRepo, nginx: Nginx, git_http: GitHttp
) -> None:
    """With the right token the first pass clones over http, lands the asset byte-exact, the next fetches."""
    world = _http_world(tmp_path, http_git_repo, nginx, git_http.token)
    a = world.asset("a.bin", 150_000, seed=11)
    world.manifest("team/a.toml", {**a, "dest": "datasets/a.bin"})
    first = world.repo.commit("a")
    run = world.sync()
    assert run.code == 0, run.err
    assert run.one("git_fetched")["commit"] == first
    assert run.one("pass_finished")["commit"] == first
    data = (world.export / "datasets/a.bin").read_bytes()
    assert hashlib.sha256(data).hexdigest() == a["sha256"] and len(data) == a["size"]
    clone = world.state / "repo.git"
    assert (clone / "HEAD").is_file()
    inode = clone.stat().st_ino
    assert git_http.token not in (clone / "config").read_text()  # the token is never persisted

    b = world.asset("b.bin", 2_000, seed=12)
    world.manifest("team/b.toml", {**b, "dest": "datasets/b.bin"})
    second = world.repo.commit("b")
    run = world.sync()
    assert run.code == 0, run.err
    assert run.one("git_fetched")["commit"] == second
    assert clone.stat().st_ino == inode  # fetched in place, never re-cloned
    data = (world.export / "datasets/b.bin").read_bytes()
    assert hashlib.sha256(data).hexdigest() == b["sha256"]
    # The server really enforced Basic auth: every 200 (ref list and pack) went to user syncd.
    lines = _access_lines(git_http, world.repo)
    ok = [ln for ln in lines if " 200 " in ln]
    assert any(ln.startswith("POST ") for ln in ok), lines
    assert all(ln.endswith(" 200 syncd") for ln in ok), lines


def test_wrong_token_fails_promptly_without_leaking(
    tmp_path: Path, http_git_repo: GitRepo, nginx: Nginx, git_http: GitHttp
) -> None:
    """A wrong token fails fast with exit 1 and "rejected … credentials", and no token is ever printed."""
    wrong = "wrongtok" + uuid.uuid4().hex
    world = _http_world(tmp_path, http_git_repo, nginx, wrong)
    a = world.asset("a.bin", 100, seed=13)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    started = time.monotonic()
    run = world.sync(timeout=60)
    elapsed = time.monotonic() - started
    assert run.code == 1, run.err
    assert elapsed < 30, f"took {elapsed:.1f}s"
    err = run.one("command_failed")["error"]
    assert "rejected" in err and "credentials" in err, err
    for secret in (wrong, git_http.token):
        assert secret not in run.out and secret not in run.err
    assert world.export_files() == []
    assert not (world.state / "repo.git").exists()
    # Bounded, not a retry loop: libgit2's probe without credentials, then the one try with syncd's
    # (wrong) token.
    lines = _access_lines(git_http, world.repo)
    assert 1 <= len(lines) <= 4 and all(" 401 " in ln for ln in lines), lines


def test_missing_token_fails_with_clear_message(
    tmp_path: Path, http_git_repo: GitRepo, nginx: Nginx, git_http: GitHttp
) -> None:
    """Without a token_file the protected server's 401 ends the pass with exit 1 and a credentials message."""
    world = _http_world(tmp_path, http_git_repo, nginx, None)
    a = world.asset("a.bin", 100, seed=14)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    world.repo.commit("a")
    run = world.sync(timeout=60)
    assert run.code == 1, run.err
    err = run.one("command_failed")["error"]
    assert "credentials" in err, err
    assert git_http.token not in run.out and git_http.token not in run.err
    assert world.export_files() == []
