"""Shared pytest fixtures: real sshd and nginx on loopback, a fault HTTP server, git repos.

Nothing here imports syncd, so these fixtures work while the package is being written.
"""

from __future__ import annotations

import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from git_http import GitHttp, start_git_http
from harness import World
from servers import FaultServer, GitRepo, Nginx, Sshd, start_nginx, start_sshd
from syncd.publish import Export

MARKERS = {
    "unit": "pure logic, no sockets",
    "integration": "real servers (sshd, nginx, local HTTP) on 127.0.0.1",
    "e2e": "drives the installed syncd command as a subprocess",
    "system": "boots a real systemd in a container",
}


def pytest_configure(config: pytest.Config) -> None:
    """Register the project's test markers."""
    known = {line.split(":", 1)[0].strip() for line in config.getini("markers")}
    for name, description in MARKERS.items():
        if name not in known:  # pyproject.toml may already declare them
            config.addinivalue_line("markers", f"{name}: {description}")


@pytest.fixture(autouse=True)
def _no_network_in_unit_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests marked ``unit`` must not open network connections (AF_UNIX stays allowed)."""
    if request.node.get_closest_marker("unit") is None:
        return
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise RuntimeError(f"unit test tried to connect to {address!r}; mark it integration")
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A session-wide sshd on 127.0.0.1 serving repos under ``sshd.repos_dir``."""
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """A session-wide nginx on 127.0.0.1 serving ``nginx.root`` under /bearer/, /basic/, /open/."""
    server = start_nginx(tmp_path_factory.mktemp("nginx"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fault_server() -> Iterator[FaultServer]:
    """A fresh FaultServer for one test."""
    with FaultServer() as server:
        yield server


@pytest.fixture
def git_repo(tmp_path: Path) -> GitRepo:
    """A fresh manifest repo; the bare repo is ``tmp_path/remote/manifests.git`` (file:// URL)."""
    return GitRepo(tmp_path / "remote" / "manifests.git", tmp_path / "work" / "manifests")


@pytest.fixture
def ssh_git_repo(sshd: Sshd, tmp_path: Path) -> GitRepo:
    """A fresh manifest repo with its bare repo in ``sshd.repos_dir``; ``.url`` is ssh://."""
    name = f"manifests-{uuid.uuid4().hex[:12]}.git"
    return GitRepo(sshd.repos_dir / name, tmp_path / "work" / "manifests", url=sshd.url(name))


@pytest.fixture
def ssh_world(tmp_path: Path, ssh_git_repo: GitRepo, nginx: Nginx, sshd: Sshd) -> World:
    """A world whose manifest repo is reached over ssh:// with a key pair and known_hosts."""
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(sshd.client_key, keys / "id_ed25519")
    (keys / "id_ed25519").chmod(0o600)
    shutil.copy(sshd.known_hosts, keys / "known_hosts")
    source = {"ssh_key": str(keys / "id_ed25519"), "known_hosts": str(keys / "known_hosts")}
    return World(tmp_path / "world", ssh_git_repo, nginx, source=source)


@pytest.fixture
def world(tmp_path: Path, git_repo: GitRepo, nginx: Nginx) -> World:
    """A manifest repo (file://), nginx as Artifactory (bearer token), an export and a config."""
    return World(tmp_path / "world", git_repo, nginx)


@pytest.fixture(scope="session")
def git_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttp]:
    """A session-wide smart-HTTP git server (nginx + fcgiwrap + git-http-backend, Basic auth) on 127.0.0.1."""
    server = start_git_http(tmp_path_factory.mktemp("git_http"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def staged_export(tmp_path: Path) -> Iterator[Export]:
    """An open Export on an empty ``tmp_path/export`` (its default staging directory inside), for
    downloads into real staging files without a whole pass."""
    ex = Export(tmp_path / "export", tmp_path / "export" / ".syncd-staging")
    (tmp_path / "export").mkdir()
    ex.open()
    yield ex
    ex.close()
