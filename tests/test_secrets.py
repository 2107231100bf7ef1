"""Secrets never leak: secret files, URLs with credentials, git credentials only to source.url's origin.

Generated inputs (hypothesis): secret file contents, URLs carrying a token, branch names. The unit tests
load configs in temporary directories; the end-to-end ones run the installed ``syncd`` command.
"""

from __future__ import annotations

import base64
import os
import string
import subprocess
import tempfile
import uuid
from pathlib import Path

import httpx
import pygit2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from git_http import GitHttp
from harness import SSH_KEY, World, examples, syncd_command, toml_str
from servers import FaultServer, GitRepo, Nginx
from syncd.config import branch_problem, host_problem, load, ssh_key_problem
from syncd.errors import ConfigError

SETTINGS = settings(
    max_examples=examples(150),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# Markers around a generated secret: if any part of the secret is echoed, one of them is too.
HEAD, TAIL = "Qx7Hd", "Wz4Tl"
URL_SAFE = string.ascii_letters + string.digits + "-_.~"


def _write_config(d: Path, source: str, art: str, extra: str = "") -> Path:
    (d / "export").mkdir(exist_ok=True)
    conf = d / "syncd.conf"
    conf.write_text(f"{source}\n{art}\n[export]\nroot = {toml_str(str(d / 'export'))}\n{extra}")
    return conf


def _secret_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def _art(url: str = "https://a.example.com", token_file: str | None = "art.token") -> str:  # noqa: S107
    lines = ["[artifactory]", f"url = {toml_str(url)}"]
    if token_file:
        lines.append(f"token_file = {toml_str(token_file)}")
    return "\n".join(lines) + "\n"


FILE_SOURCE = '[source]\nurl = "file:///srv/git/m.git"\n'


def _check_config(conf: Path) -> subprocess.CompletedProcess[str]:
    """Run ``syncd check-config -c CONF`` as a subprocess."""
    return subprocess.run(
        [syncd_command(), "check-config", "-c", str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
        env={k: v for k, v in os.environ.items() if k not in ("SYNCD_CONFIG", "CREDENTIALS_DIRECTORY")},
    )


# secret files -----------------------------------------------------------------------------------------

_CORE = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \t\r\n\x00\x01\x1b\x7f\x85\u00a0\u2028\u202e")),
        st.characters(min_codepoint=0x20, max_codepoint=0x7E),
        st.characters(blacklist_categories=("Cs",)),  # any character UTF-8 can encode
    ),
    max_size=24,
)


@pytest.mark.unit
@SETTINGS
@given(core=_CORE, sandwich=st.booleans(), key=st.sampled_from(["artifactory", "source", "password"]))
def test_generated_secret_is_refused_unseen_or_is_a_legal_header_value(
    core: str, sandwich: bool, key: str
) -> None:
    """Any secret file content is either refused (naming the key and file, never echoing the secret) or
    accepted as printable ASCII without leading or trailing blanks, i.e. a legal HTTP header value."""
    secret = f"{HEAD}{core}{TAIL}" if sandwich else core
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp).resolve()
        path = _secret_file(d / "the.secret", secret.encode("utf-8"))
        if key == "artifactory":
            source, art, where = FILE_SOURCE, _art(token_file="the.secret"), "artifactory.token_file"
        elif key == "password":
            art = _art(token_file=None) + 'username = "svc"\npassword_file = "the.secret"\n'
            source, where = FILE_SOURCE, "artifactory.password_file"
        else:
            source = '[source]\nurl = "https://git.example.com/m.git"\ntoken_file = "the.secret"\n'
            art, where = _art(token_file=None), "source.token_file"
        try:
            cfg = load(_write_config(d, source, art))
        except ConfigError as exc:
            text = f"{exc}\n{exc!r}\n" + "\n".join(exc.problems)
            assert exc.problems == [p for p in exc.problems if p.startswith(f"at '{where}': {path}")]
            if sandwich:
                assert HEAD not in text and TAIL not in text
            assert secret.strip() not in text or len(secret.strip()) < 4
            return
    held = {
        "artifactory": cfg.artifactory.token,
        "password": cfg.artifactory.password,
        "source": cfg.source.token,
    }[key]
    assert held is not None
    value = held.reveal()
    assert value == secret.rstrip(" \t\r\n")
    assert value and all(0x20 <= ord(c) <= 0x7E for c in value)
    assert value == value.strip(" ")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"Qx7Hd\nWz4Tl\n", "holds a line break inside the secret (a secret is one line)"),
        (b"Qx7Hd\rWz4Tl", "holds a line break inside the secret (a secret is one line)"),
        (b"Qx7Hd\x00Wz4Tl", "holds a control character"),
        (b"Qx7Hd\tWz4Tl", "holds a control character"),
        (b"Qx7Hd\xc3\xb6Wz4Tl", "holds a non-ASCII character"),
        (b"Qx7Hd\xffWz4Tl", "holds a non-ASCII character"),
        (b" Qx7HdWz4Tl", "starts with a blank"),
    ],
    ids=["lf", "cr", "nul", "tab", "utf8", "not-utf8", "leading-blank"],
)
def test_secret_that_cannot_be_a_header_is_refused(tmp_path: Path, data: bytes, why: str) -> None:
    """A token with an inner line break, a control or non-ASCII byte is refused at load, file named."""
    path = _secret_file(tmp_path / "art.token", data)
    with pytest.raises(ConfigError) as info:
        load(_write_config(tmp_path, FILE_SOURCE, _art()))
    assert info.value.problems == [
        f"at 'artifactory.token_file': {path} {why}; a secret must be one line of printable ASCII (not shown)"
    ]
    assert HEAD not in str(info.value) and TAIL not in str(info.value)


@pytest.mark.unit
def test_trailing_line_ending_and_blanks_are_dropped(tmp_path: Path) -> None:
    """A token file written by an editor or echo ('tok\\r\\n', 'tok  \\n') gives the token alone."""
    for data in (b"tok-1\n", b"tok-1\r\n", b"tok-1  \n\n", b"tok-1"):
        _secret_file(tmp_path / "art.token", data)
        token = load(_write_config(tmp_path, FILE_SOURCE, _art())).artifactory.token
        assert token is not None and token.reveal() == "tok-1"


@pytest.mark.unit
def test_secret_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A 0600 secret file owned by another user than syncd's is refused, as ssh refuses such a key."""
    if os.geteuid() != 0:
        pytest.skip("needs root to chown a file to another user")
    path = _secret_file(tmp_path / "art.token", b"tok-2\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError) as info:
        load(_write_config(tmp_path, FILE_SOURCE, _art()))
    assert info.value.problems == [
        f"at 'artifactory.token_file': {path} is owned by uid 65534, not by the user running syncd "
        f"(uid 0); run: chown 0 {path}"
    ]


@pytest.mark.unit
def test_huge_secret_file_is_refused(tmp_path: Path) -> None:
    """A 'secret' file over 64 KiB (a wrong path) is refused without reading it all."""
    path = _secret_file(tmp_path / "art.token", b"x" * (64 * 1024 + 1))
    with pytest.raises(ConfigError) as info:
        load(_write_config(tmp_path, FILE_SOURCE, _art()))
    assert info.value.problems == [
        f"at 'artifactory.token_file': {path} is larger than 64 KiB: not a secret file"
    ]


def test_check_config_refuses_token_with_inner_newline(tmp_path: Path) -> None:
    """syncd check-config exits 2 on a token file with an inner newline; neither half is printed."""
    first, second = "half" + uuid.uuid4().hex, "other" + uuid.uuid4().hex
    path = _secret_file(tmp_path / "art.token", f"{first}\n{second}\n".encode())
    run = _check_config(_write_config(tmp_path, FILE_SOURCE, _art()))
    assert run.returncode == 2, run.stderr
    assert f"at 'artifactory.token_file': {path} holds a line break" in run.stderr
    for half in (first, second):
        assert half not in run.stdout + run.stderr


# URLs carrying credentials ----------------------------------------------------------------------------

_TOKEN = st.text(alphabet=URL_SAFE, min_size=8, max_size=32).map(lambda t: "tk" + t)


@st.composite
def _leaky_url(draw: st.DrawFn, schemes: tuple[str, ...]) -> tuple[str, str]:
    """A URL holding a generated token (as user, password, query, fragment) or a bad port, or both."""
    token = draw(_TOKEN)
    scheme = draw(st.sampled_from(schemes))
    host = draw(st.sampled_from(["git.example.com", "127.0.0.1", "[::1]", "h"]))
    port = draw(st.sampled_from(["", ":22", ":8443", ":0", ":65536", ":99999", ":abc", ":-1", ": 1"]))
    where = draw(st.sampled_from(["user", "password", "query", "fragment", "none"]))
    if where == "none" and port in ("", ":22", ":8443"):
        where = "query"
    if where == "user" and scheme == "ssh":
        where = "password"  # a plain ssh user (git@) is allowed: it is not where a token goes
    user = {"user": f"{token}@", "password": f"{draw(st.sampled_from(['', 'ci', 'git']))}:{token}@"}
    query = draw(st.sampled_from(["private_token", "access_token", "x"]))
    url = (
        f"{scheme}://{user.get(where, '')}{host}{port}/ml/m.git"
        + (f"?{query}={token}" if where == "query" else "")
        + (f"#{token}" if where == "fragment" else "")
    )
    return url, token


@pytest.mark.unit
@SETTINGS
@given(leak=_leaky_url(("ssh", "https", "http")))
def test_source_url_with_credentials_query_or_bad_port_is_refused_unseen(leak: tuple[str, str]) -> None:
    """A source.url with a token in its userinfo, query or fragment, or a bad port, is a ConfigError at
    'source.url' that never quotes the token."""
    url, token = leak
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp).resolve()
        _secret_file(d / "art.token", b"tok\n")
        _secret_file(d / "id", SSH_KEY.encode())
        (d / "kh").write_text("")
        extra = 'ssh_key = "id"\nknown_hosts = "kh"\n' if url.startswith("ssh") else ""
        with pytest.raises(ConfigError) as info:
            load(_write_config(d, f"[source]\nurl = {toml_str(url)}\n{extra}", _art()))
    assert info.value.problems and all(p.startswith("at 'source.url': ") for p in info.value.problems)
    assert token not in str(info.value) and token not in repr(info.value)


@pytest.mark.unit
@SETTINGS
@given(leak=_leaky_url(("https", "http")))
def test_artifactory_url_with_credentials_query_or_bad_port_is_refused_unseen(leak: tuple[str, str]) -> None:
    """An artifactory.url with a token in it or a bad port is a ConfigError that never quotes the token."""
    url, token = leak
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp).resolve()
        with pytest.raises(ConfigError) as info:
            load(_write_config(d, FILE_SOURCE, _art(url, token_file=None)))
    assert info.value.problems and all(p.startswith("at 'artifactory.url': ") for p in info.value.problems)
    assert token not in str(info.value)


@settings(max_examples=examples(4), deadline=None, database=None)
@given(leak=_leaky_url(("https", "http")), key=st.sampled_from(["source", "artifactory"]))
def test_check_config_never_prints_a_token_from_a_url(leak: tuple[str, str], key: str) -> None:
    """syncd check-config (a subprocess) exits 2 on a URL carrying a token and never prints the token."""
    url, token = leak
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp).resolve()
        _secret_file(d / "art.token", b"tok\n")
        if key == "source":
            conf = _write_config(d, f"[source]\nurl = {toml_str(url)}\n", _art())
        else:
            conf = _write_config(d, FILE_SOURCE, _art(url))
        run = _check_config(conf)
    assert run.returncode == 2, run.stderr
    assert f"at '{key}.url': " in run.stderr
    assert token not in run.stdout + run.stderr


@pytest.mark.parametrize("port", ["99999", "abc", "0"])
def test_bad_artifactory_port_is_exit_2_not_a_crash(tmp_path: Path, port: str) -> None:
    """syncd sync with artifactory.url on a bad port is a config error (exit 2, config_invalid), so
    systemd stops instead of restarting a crashing service forever."""
    _secret_file(tmp_path / "art.token", b"tok\n")
    conf = _write_config(tmp_path, FILE_SOURCE, _art(f"http://127.0.0.1:{port}/a"))
    run = subprocess.run(
        [syncd_command(), "sync", "-c", str(conf)], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 2, run.stderr
    assert '"event": "config_invalid"' in run.stderr or '"event":"config_invalid"' in run.stderr
    assert "at 'artifactory.url': has an invalid port" in run.stderr


# branch names -----------------------------------------------------------------------------------------

_REF_CHARS = [*"ab/.-@{}~^:?*[]\\ \t\x01\x7fé\u202e", "lock", ".lock", "..", "@{", "//"]


@pytest.mark.unit
@settings(max_examples=examples(400), deadline=None, database=None)
@given(name=st.one_of(st.lists(st.sampled_from(_REF_CHARS), max_size=8).map("".join), st.text(max_size=12)))
def test_branch_rule_agrees_with_libgit2(name: str) -> None:
    """branch_problem() accepts exactly the names libgit2 accepts as refs/heads/<name>, except '@' and a
    leading '-' (git branch refuses both); NUL is left out (libgit2 reads a C string up to it)."""
    assume("\x00" not in name)
    ours = branch_problem(name) == ""
    libgit2 = bool(pygit2.reference_is_valid_name(f"refs/heads/{name}")) and name != "@"
    if name.startswith("-"):
        assert not ours
        return
    assert ours == libgit2, (name, branch_problem(name))


@pytest.mark.unit
@pytest.mark.parametrize(
    "branch", ["*", "a b", "a:b", "a..b", "a/", "x.lock", ".hidden", "a@{1}", "@", "a\\b"]
)
def test_invalid_branch_names_are_refused(tmp_path: Path, branch: str) -> None:
    """Branch names that git would refuse are config errors at 'source.branch', not run-time failures."""
    _secret_file(tmp_path / "art.token", b"tok\n")
    source = FILE_SOURCE + f"branch = {toml_str(branch)}\n"
    with pytest.raises(ConfigError) as info:
        load(_write_config(tmp_path, source, _art()))
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"at 'source.branch': {branch!r} is not a valid branch name (")


# git credentials only to source.url's origin ----------------------------------------------------------


def _git_world(tmp_path: Path, repo: GitRepo, nginx: Nginx, url: str, token: str) -> World:
    keys = tmp_path / "keys"
    keys.mkdir()
    token_file = _secret_file(keys / "git.token", f"{token}\n".encode())
    return World(tmp_path / "world", repo, nginx, source={"url": url, "token_file": str(token_file)})


def _basic_secrets(requests: list[tuple[str, str, dict[str, str]]]) -> list[str]:
    """The decoded credentials of every Authorization header among ``requests``."""
    out = []
    for _, _, headers in requests:
        auth = headers.get("authorization", "")
        out.append(auth)
        if auth.lower().startswith("basic "):
            out.append(base64.b64decode(auth[6:] + "==").decode("latin-1"))
    return out


@pytest.mark.parametrize("status", [302, 301, 307])
def test_git_redirect_to_another_port_gets_no_token(
    tmp_path: Path, git_repo: GitRepo, nginx: Nginx, status: int
) -> None:
    """A git server whose info/refs redirects to another origin (another port on 127.0.0.1) that asks
    for credentials: that origin never sees the token, and the pass fails with a clear message."""
    token = "gittok" + uuid.uuid4().hex
    with FaultServer() as origin, FaultServer() as other:
        refs = "/git/m.git/info/refs"
        other.route(refs, status=401, headers={"WWW-Authenticate": 'Basic realm="other"'})
        origin.route(refs, status=status, redirect=f"{other.url}{refs}?service=git-upload-pack")
        world = _git_world(tmp_path, git_repo, nginx, f"{origin.url}/git/m.git", token)
        run = world.sync(timeout=60)
        seen = _basic_secrets(other.requests) + _basic_secrets(origin.requests)
        assert other.requests, "the redirect was not followed: the test proves nothing"
    assert run.code == 1, run.err
    assert not any(token in s for s in seen), seen
    err = run.one("command_failed")["error"]
    assert f"sent syncd on to http://127.0.0.1:{other.port}/git/m.git" in err, err
    assert "credentials go only to the scheme, host and port of [source] url" in err
    assert token not in run.out + run.err
    assert world.export_files() == []


def test_git_redirect_to_a_real_git_server_elsewhere_gets_no_token(
    tmp_path: Path, nginx: Nginx, git_http: GitHttp
) -> None:
    """Redirected to a real smart-HTTP git server on another port (which would accept the token), syncd
    sends nothing there: no request is authenticated, nothing is cloned, exit 1."""
    name = f"manifests-{uuid.uuid4().hex[:12]}.git"
    repo = GitRepo(git_http.repos_dir / name, tmp_path / "work" / "manifests", url=git_http.url(name))
    with FaultServer() as origin:
        refs = f"/git/{name}/info/refs"
        origin.route(refs, redirect=f"{git_http.url(name)}/info/refs?service=git-upload-pack")
        world = _git_world(tmp_path, repo, nginx, f"{origin.url}/git/{name}", git_http.token)
        a = world.asset("a.bin", 100, seed=21)
        world.manifest("a.toml", {**a, "dest": "a.bin"})
        world.repo.commit("a")
        run = world.sync(timeout=60)
        assert origin.requests
    assert run.code == 1, run.err
    lines = [ln for ln in git_http.access_log.read_text().splitlines() if f"/git/{name}/" in ln]
    assert lines and all(ln.endswith(" -") and " 401 " in ln for ln in lines), lines
    assert "credentials go only to" in run.one("command_failed")["error"]
    assert git_http.token not in run.out + run.err
    assert not (world.state / "repo.git").exists()


def test_git_failure_messages_are_syncd_own_text(tmp_path: Path, git_repo: GitRepo, nginx: Nginx) -> None:
    """A git server answering 500 with a body gives 'the server answered HTTP 500', no libgit2 or server
    text; git_fetch_failed names source.url as configured (it holds no credentials)."""
    with FaultServer() as server:
        server.route("/git/m.git/info/refs", status=500, body=b"Authorization: Bearer leaked\n")
        url = f"{server.url}/git/m.git"
        world = _git_world(tmp_path, git_repo, nginx, url, "gittok" + uuid.uuid4().hex)
        run = world.sync(timeout=60)
    assert run.code == 1, run.err
    err = run.one("command_failed")["error"]
    assert err == f"clone of {url} failed: the server answered HTTP 500", err
    assert "leaked" not in run.err


@pytest.mark.unit
@settings(max_examples=examples(100), deadline=None, database=None)
@given(
    token=_TOKEN,
    noise=st.text(max_size=300),
    form=st.sampled_from(["user", "password", "query", "fragment"]),
)
def test_libgit2_text_is_reduced_to_syncd_words(token: str, noise: str, form: str) -> None:
    """Whatever libgit2 says (URLs with credentials, control characters, any length), the GitError detail
    never holds the token, a control character or a line break, and stays bounded."""
    from syncd.gitsource import _reason, _safe

    url = {
        "user": f"https://{token}@h.example/x.git",
        "password": f"https://u:{token}@h.example/x.git",
        "query": f"https://h.example/x.git?access_token={token}",
        "fragment": f"https://h.example/x.git#{token}",
    }[form]
    shown = _reason(pygit2.GitError(f"weird failure {noise} at {url} {noise}"))
    assert token not in shown
    assert all(0x20 <= ord(c) <= 0x7E for c in shown), shown
    assert len(shown) <= 200
    assert token not in _safe(url) and _safe(url) == "https://h.example/x.git"


# hosts ------------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("artifactory.bank.example", True),
        ("127.0.0.1", True),
        ("::1", True),
        ("xn--bcher-kva.example", True),
        ("build_01.internal", True),
        ("xn--a", False),
        ("a..b", False),
        ("%31%32%37.0.0.1", False),
        ("-a.example", False),
        ("bücher.example", False),
        ("", False),
    ],
)
def test_hosts_that_cannot_be_reached_are_refused(host: str, ok: bool) -> None:
    """A URL host must be an IP address or an ASCII DNS name whose xn-- labels decode."""
    assert (host_problem(host) == "") is ok


@pytest.mark.unit
@settings(max_examples=examples(300), deadline=None, database=None)
@given(st.text(alphabet="abcxn-_.%0123456789ü", min_size=1, max_size=30))
def test_an_accepted_host_is_one_httpx_can_request(host: str) -> None:
    """Every host the config accepts is one httpx builds a request for (no failure at sync time)."""
    if host_problem(host) == "":
        request = httpx.Request("GET", f"https://{host}/artifactory/x")
        assert request.url.host


@pytest.mark.unit
@pytest.mark.parametrize("url", ["http://xn--a/a", "http://a..b:80/a", "http://%31%32%37.0.0.1:80/a"])
def test_check_config_refuses_an_unreachable_artifactory_host(tmp_path: Path, url: str) -> None:
    """A bad Artifactory host is a configuration error at load, not an error on every asset."""
    cfg = tmp_path / "syncd.conf"
    cfg.write_text(
        f'[source]\nurl = "file:///srv/git/m.git"\n[artifactory]\nurl = {toml_str(url)}\n'
        '[export]\nroot = "/srv/nfs"\n'
    )
    with pytest.raises(ConfigError) as info:
        load(cfg)
    assert any(p.startswith("at 'artifactory.url': the host") for p in info.value.problems)


@pytest.mark.unit
def test_file_url_with_a_host_is_refused(tmp_path: Path) -> None:
    """file://HOST/path is refused (the host part would be silently ignored, or hold a pasted token)."""
    cfg = tmp_path / "syncd.conf"
    cfg.write_text(
        '[source]\nurl = "file://SECRETzz1/x"\n[artifactory]\nurl = "https://a.example"\n'
        '[export]\nroot = "/srv/nfs"\n'
    )
    with pytest.raises(ConfigError) as info:
        load(cfg)
    assert any("file:// URL names no host" in p for p in info.value.problems)
    assert "SECRETzz1" not in str(info.value)


# ssh keys ---------------------------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("kind", ["ed25519", "ecdsa", "rsa-openssh", "rsa-pem", "rsa-pkcs8"])
@pytest.mark.parametrize("passphrase", ["", "SECRETpass1"])
def test_ssh_key_with_a_passphrase_or_not_a_key_is_refused(
    tmp_path: Path, kind: str, passphrase: str
) -> None:
    """Keys that ssh-keygen writes are accepted without a passphrase and refused with one (syncd cannot
    type it); the passphrase is never shown."""
    key = tmp_path / "id"
    key_type, _, fmt = kind.partition("-")
    args = ["ssh-keygen", "-q", "-t", key_type, "-N", passphrase, "-f", str(key)]
    subprocess.run(args + (["-m", fmt.upper()] if fmt and fmt != "openssh" else []), check=True)
    why = ssh_key_problem(key.read_bytes())
    assert (why == "") is (passphrase == ""), why
    assert "SECRET" not in why


@pytest.mark.unit
@settings(max_examples=examples(200), deadline=None, database=None)
@given(st.binary(max_size=300))
def test_bytes_that_are_no_key_are_refused_without_being_quoted(data: bytes) -> None:
    """Arbitrary bytes are never taken for a key, and the reason never quotes them."""
    why = ssh_key_problem(b"SECRETzz1" + data)
    assert why and "SECRETzz1" not in why
