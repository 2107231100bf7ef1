"""TLS trust: Artifactory and git over HTTPS are verified against the system trust store, plus
``[artifactory] ca_file``; certifi's bundle is never used.

A real nginx speaks HTTPS on 127.0.0.1 with a certificate signed by a throw-away test CA, and serves both
the "Artifactory" files and the manifest repo (git-http-backend through the ``git_http`` fixture's
fcgiwrap). The system trust store is OpenSSL's default CA file and directory, which ``SSL_CERT_FILE`` and
``SSL_CERT_DIR`` replace: the very locations Python's ``ssl`` (for httpx) and pygit2 (for libgit2's
bundled OpenSSL) read, so a ``syncd sync`` run with ``SSL_CERT_FILE`` = the system bundle + the test CA
sees the test CA "installed in the system store", and nothing on the machine changes. Without the CA in
that file (the directory pointed at an empty one), the same run must fail.
"""

from __future__ import annotations

import hashlib
import ssl
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import certifi
import pygit2
import pytest

from git_http import GitHttp
from harness import Run, World
from servers import GitRepo, Nginx, TestCA, TlsNginx, ca_bundle, make_test_ca, start_tls_nginx
from syncd import gitsource
from syncd.config import Artifactory, GitSource, Secret
from syncd.errors import FetchError, GitError
from syncd.fetch import Fetcher, trust_context
from syncd.manifest import Asset

DEBIAN_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# OpenSSL's and libgit2's own wording for a refused certificate: never shown to the operator.
LIBRARY_TEXT = (
    "certificate verify failed",
    "unable to get local issuer",
    "SSL certificate is invalid",
    "[SSL",
    "_ssl.c",
    "libgit2",
    "Traceback",
)


@dataclass
class Pki:
    ca: TestCA  # signs the TLS nginx's certificate
    other: TestCA  # an unrelated CA
    with_ca: Path  # the system bundle + the test CA
    without_ca: Path  # the system bundle alone
    empty_dir: Path  # an SSL_CERT_DIR holding nothing

    def env(self, *, trusted: bool) -> dict[str, str]:
        """A ``syncd`` environment whose system trust store holds the test CA, or not."""
        bundle = self.with_ca if trusted else self.without_ca
        return {"SSL_CERT_FILE": str(bundle), "SSL_CERT_DIR": str(self.empty_dir)}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    system = Path(ssl.get_default_verify_paths().openssl_cafile)  # OpenSSL's compiled-in CA file
    if not system.is_file():
        pytest.skip(f"no system CA bundle at {system}")
    ca = make_test_ca(base / "ca")
    other = make_test_ca(base / "other", "syncd other CA")
    empty = base / "empty-certs"
    empty.mkdir()
    return Pki(
        ca=ca,
        other=other,
        with_ca=ca_bundle(base / "with-ca.crt", system, ca.cert),
        without_ca=ca_bundle(base / "without-ca.crt", system),
        empty_dir=empty,
    )


@pytest.fixture(scope="module")
def tls(
    pki: Pki, nginx: Nginx, git_http: GitHttp, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsNginx]:
    """HTTPS nginx: ``/bearer/`` serves the ``nginx`` fixture's files (same token), ``/git/`` the
    ``git_http`` fixture's repos (same user and token)."""
    server = start_tls_nginx(
        tmp_path_factory.mktemp("tls-nginx"),
        pki.ca,
        nginx.root,
        nginx.token,
        git_socket=git_http.socket,
        git_repos=git_http.repos_dir,
        git_htpasswd=git_http.workdir / "htpasswd",
    )
    try:
        yield server
    finally:
        server.stop()


def _https_world(tmp_path: Path, git_repo: GitRepo, nginx: Nginx, tls: TlsNginx, **art: str) -> World:
    world = World(tmp_path / "world", git_repo, nginx)
    world.write_config(artifactory={"url": tls.bearer_url(), **art}, download={"retries": 1})
    return world


def _one_asset(world: World, seed: int) -> dict[str, object]:
    a = world.asset("a.bin", 70_000, seed=seed)
    world.manifest("team/a.toml", {**a, "dest": "datasets/a.bin"})
    world.repo.commit("a")
    return a


def _landed(world: World, a: dict[str, object]) -> bool:
    dest = world.export / "datasets/a.bin"
    return dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == a["sha256"]


def _no_library_text(run: Run) -> None:
    for text in LIBRARY_TEXT:
        assert text not in run.err and text not in run.out, (text, run.err)


def _tls_requests(tls: TlsNginx, needle: str) -> list[str]:
    """The TLS nginx's access-log lines (``$request $status $ssl_protocol``) that contain ``needle``."""
    return [ln for ln in tls.access_log.read_text().splitlines() if needle in ln]


# --------------------------------------------------------------------------- Artifactory


@pytest.mark.e2e
def test_artifactory_is_verified_against_the_system_store(
    tmp_path: Path, git_repo: GitRepo, nginx: Nginx, tls: TlsNginx, pki: Pki
) -> None:
    """With the test CA in the system store (and no ca_file) the download over HTTPS lands byte-exact."""
    world = _https_world(tmp_path, git_repo, nginx, tls)
    a = _one_asset(world, seed=81)
    run = world.sync(env=pki.env(trusted=True))
    assert run.code == 0, run.err
    assert run.one("asset_published")["dest"] == "datasets/a.bin"
    assert _landed(world, a)
    lines = _tls_requests(tls, f"/bearer/{a['source']} ")
    assert lines and all(" 200 TLSv1." in ln for ln in lines), lines  # it really went over TLS


@pytest.mark.e2e
def test_artifactory_untrusted_fails_in_syncd_words(
    tmp_path: Path, git_repo: GitRepo, nginx: Nginx, tls: TlsNginx, pki: Pki
) -> None:
    """Without the CA in the system store (and no ca_file) the asset fails with syncd's TLS message, no
    library text; nothing lands and the server never saw a request."""
    world = _https_world(tmp_path, git_repo, nginx, tls)
    a = _one_asset(world, seed=82)
    run = world.sync(env=pki.env(trusted=False))
    assert run.code == 1, run.err
    failed = run.one("asset_failed")
    url = f"{tls.bearer_url()}/{a['source']}"
    assert failed["error"] == f"TLS error (CERTIFICATE_VERIFY_FAILED) from {url}", failed
    _no_library_text(run)
    assert not _landed(world, a) and world.export_files() == []
    assert _tls_requests(tls, f"/bearer/{a['source']} ") == []


@pytest.mark.e2e
def test_ca_file_is_trusted_when_the_system_store_lacks_the_ca(
    tmp_path: Path, git_repo: GitRepo, nginx: Nginx, tls: TlsNginx, pki: Pki
) -> None:
    """``ca_file`` = the test CA makes the same download succeed with a system store that lacks it."""
    world = _https_world(tmp_path, git_repo, nginx, tls, ca_file=str(pki.ca.cert))
    a = _one_asset(world, seed=83)
    run = world.sync(env=pki.env(trusted=False))
    assert run.code == 0, run.err
    assert _landed(world, a)


@pytest.mark.e2e
def test_ca_file_adds_to_the_system_store(
    tmp_path: Path, git_repo: GitRepo, nginx: Nginx, tls: TlsNginx, pki: Pki
) -> None:
    """``ca_file`` is added to the system store, not used instead of it: with an unrelated CA as ca_file
    the system store's test CA still verifies the server; with neither, it fails."""
    world = _https_world(tmp_path, git_repo, nginx, tls, ca_file=str(pki.other.cert))
    a = _one_asset(world, seed=84)
    run = world.sync(env=pki.env(trusted=False))
    assert run.code == 1, run.err
    assert run.one("asset_failed")["error"].startswith("TLS error (CERTIFICATE_VERIFY_FAILED) from ")
    run = world.sync(env=pki.env(trusted=True))
    assert run.code == 0, run.err
    assert _landed(world, a)


@pytest.mark.e2e
def test_ca_file_without_a_certificate_is_a_config_error(
    tmp_path: Path, git_repo: GitRepo, nginx: Nginx, tls: TlsNginx, pki: Pki
) -> None:
    """A ca_file that holds no PEM certificate ends the command with exit 2 and syncd's words naming
    ``artifactory.ca_file``, not OpenSSL's text and traceback; nothing is downloaded."""
    bad = tmp_path / "not-a-ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    world = _https_world(tmp_path, git_repo, nginx, tls, ca_file=str(bad))
    a = _one_asset(world, seed=87)
    run = world.sync(env=pki.env(trusted=True))
    assert run.code == 2, run.err
    event = run.one("config_invalid")
    problem = "cannot be read or holds no PEM certificate (a CA bundle in PEM is expected)"
    assert event["problems"] == [f"at 'artifactory.ca_file': {bad} {problem}"]  # found at load
    assert event["config"] == str(world.config_path)
    _no_library_text(run)
    assert "X509" not in run.err and "NO_CERTIFICATE" not in run.err
    assert not _landed(world, a)


@pytest.mark.integration
def test_certifi_is_never_consulted(
    pki: Pki, tls: TlsNginx, nginx: Nginx, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: even with certifi's bundle replaced by the test CA, a Fetcher without ca_file refuses the
    server when the system store lacks the CA (and certifi.where is never called); with ca_file it works."""
    calls: list[str] = []

    def where() -> str:
        calls.append("where")
        return str(pki.ca.cert)

    monkeypatch.setattr(certifi, "where", where)
    for name, value in pki.env(trusted=False).items():
        monkeypatch.setenv(name, value)
    name = f"tls-probe-{uuid.uuid4().hex[:8]}.bin"
    data = uuid.uuid4().bytes * 100
    (nginx.root / name).write_bytes(data)
    asset = Asset(
        source=name,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        dest=name,
        manifest="assets/m.toml",
        index=0,
    )

    def fetch(ca_file: Path | None) -> bytes:
        art = Artifactory(
            url=tls.bearer_url(), token=Secret(nginx.token), username=None, password=None, ca_file=ca_file
        )
        fetcher = Fetcher(art, timeout=5, concurrency=1)
        sink = _Memory()
        try:
            fetcher.download(asset, sink)
        finally:
            fetcher.close()
        return bytes(sink.data)

    with pytest.raises(FetchError) as info:
        fetch(None)
    assert str(info.value).startswith("TLS error (CERTIFICATE_VERIFY_FAILED) from https://127.0.0.1:")
    assert fetch(pki.ca.cert) == data
    assert calls == []


class _Memory:
    """A minimal in-memory Sink for :meth:`Fetcher.download`."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.validator: str | None = None

    def kept(self) -> Iterator[bytes]:
        return iter(())

    def restart(self, validator: str | None) -> None:
        self.data.clear()
        self.validator = validator

    def write(self, chunk: bytes) -> None:
        self.data += chunk


@pytest.mark.unit
def test_default_trust_is_the_debian_system_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no SSL_CERT_FILE/SSL_CERT_DIR, Artifactory's context holds exactly the Debian bundle's CAs (not
    certifi's), and git is pointed at OpenSSL's default file, which is that same bundle."""
    if not DEBIAN_BUNDLE.is_file():
        pytest.skip("not a Debian-style system trust store")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)

    def cas(ctx: ssl.SSLContext) -> set[bytes]:
        return {bytes(c) for c in ctx.get_ca_certs(binary_form=True)}

    debian = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    debian.load_verify_locations(cafile=str(DEBIAN_BUNDLE))
    certifi_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    certifi_ctx.load_verify_locations(cafile=certifi.where())
    ours = trust_context(None)
    assert cas(ours) == cas(debian) != cas(certifi_ctx)
    assert ours.verify_mode == ssl.CERT_REQUIRED and ours.check_hostname

    gitsource._trust_system_store()
    cert_file = pygit2.settings.ssl_cert_file
    assert cert_file is not None and Path(str(cert_file)).resolve() == DEBIAN_BUNDLE.resolve()


# --------------------------------------------------------------------------- git over HTTPS


def _token_file(directory: Path, token: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "git.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path.absolute()


@pytest.fixture
def https_git_repo(git_http: GitHttp, tls: TlsNginx, tmp_path: Path) -> GitRepo:
    """A fresh manifest repo among ``git_http``'s repos; ``.url`` is https://(TLS nginx)/git/<name>."""
    name = f"manifests-{uuid.uuid4().hex[:12]}.git"
    return GitRepo(git_http.repos_dir / name, tmp_path / "work" / "manifests", url=tls.git_url(name))


def _git_world(tmp_path: Path, repo: GitRepo, nginx: Nginx, tls: TlsNginx, git_http: GitHttp) -> World:
    token = _token_file(tmp_path / "keys", git_http.token)
    world = World(tmp_path / "world", repo, nginx, source={"token_file": str(token)})
    world.write_config(artifactory={"url": tls.bearer_url()}, download={"retries": 1})
    return world


@pytest.mark.e2e
def test_git_over_https_trusts_the_system_store(
    tmp_path: Path, https_git_repo: GitRepo, nginx: Nginx, tls: TlsNginx, git_http: GitHttp, pki: Pki
) -> None:
    """Git (libgit2's bundled OpenSSL) and Artifactory trust the same system store: with the test CA there,
    one pass clones over HTTPS and downloads over HTTPS."""
    world = _git_world(tmp_path, https_git_repo, nginx, tls, git_http)
    a = _one_asset(world, seed=85)
    run = world.sync(env=pki.env(trusted=True))
    assert run.code == 0, run.err
    assert run.one("git_fetched")["commit"] == world.repo.remote_head()
    assert _landed(world, a)
    name = world.repo.bare_path.name
    packs = _tls_requests(tls, f"POST /git/{name}/git-upload-pack ")
    assert packs and all(" 200 TLSv1." in ln for ln in packs), packs


@pytest.mark.e2e
def test_git_over_https_untrusted_fails_in_syncd_words(
    tmp_path: Path, https_git_repo: GitRepo, nginx: Nginx, tls: TlsNginx, git_http: GitHttp, pki: Pki
) -> None:
    """Without the CA in the system store the clone fails (exit 1) with syncd's TLS message, no libgit2
    text, no clone and no request reaching git-http-backend; ``[artifactory] ca_file`` is not git's."""
    world = _git_world(tmp_path, https_git_repo, nginx, tls, git_http)
    world.write_config(artifactory={"url": tls.bearer_url(), "ca_file": str(pki.ca.cert)})
    a = _one_asset(world, seed=86)
    run = world.sync(env=pki.env(trusted=False))
    assert run.code == 1, run.err
    err = run.one("command_failed")["error"]
    assert "the TLS certificate of 127.0.0.1 is not trusted" in err, err
    assert "known_hosts" not in err, err
    _no_library_text(run)
    assert git_http.token not in run.err and git_http.token not in run.out
    assert not (world.state / "repo.git").exists()
    assert not _landed(world, a)
    assert _tls_requests(tls, f"/git/{world.repo.bare_path.name}/") == []


@pytest.mark.integration
def test_git_is_given_the_system_store_before_each_https_fetch(
    tmp_path: Path, https_git_repo: GitRepo, git_http: GitHttp, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process: every HTTPS fetch first hands libgit2 the system store's locations as OpenSSL's defaults
    give them (here SSL_CERT_FILE / SSL_CERT_DIR), not only pygit2's import. The call is recorded and not
    passed on (libgit2's store only grows), so this process keeps not trusting the test CA: the fetch
    fails in syncd's words."""
    calls: list[tuple[object, object]] = []

    def record(self: object, cert_file: object, cert_dir: object) -> None:
        calls.append((cert_file, cert_dir))

    monkeypatch.setattr(type(pygit2.settings), "set_ssl_cert_locations", record)
    for name, value in pki.env(trusted=True).items():
        monkeypatch.setenv(name, value)
    https_git_repo.write("assets/a.toml", "")
    https_git_repo.commit("a")
    source = GitSource(
        url=https_git_repo.url,
        branch="main",
        path="assets",
        ssh_key=None,
        known_hosts=None,
        username=None,
        token=Secret(git_http.token),
    )
    state = tmp_path / "state"
    state.mkdir()
    repo = gitsource.ManifestRepo(source, state, timeout=10)
    for attempt in (1, 2):
        with pytest.raises(GitError, match=r"the TLS certificate of 127\.0\.0\.1 is not trusted"):
            repo.fetch()
        assert calls == [(str(pki.with_ca), str(pki.empty_dir))] * attempt
