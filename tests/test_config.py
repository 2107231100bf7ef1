"""Unit tests for syncd.config: loading, validating and resolving syncd.conf (files in tmp_path only)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness import SSH_KEY, toml_str
from syncd.config import DEFAULT_PATH, Config, Secret, config_path, describe, load, parse_duration
from syncd.errors import ConfigError, SyncdError

pytestmark = pytest.mark.unit

TOKEN = "s3cr3t-TOKEN-value"
PASSWORD = "pa55-w0rd-VALUE"
UNKNOWN = "unknown key (check the spelling; see docs/configuration.md)"
NOT_A_DURATION = 'is not a duration: use "90s", "5m", "1h" or a number of seconds'

SSH_SOURCE = """\
[source]
url = "ssh://git@git.example.com/ml/asset-manifests.git"
path = "assets"
ssh_key = "id_ed25519"
known_hosts = "known_hosts"
"""
HTTPS_SOURCE = """\
[source]
url = "https://git.example.com/ml/asset-manifests.git"
"""
ARTIFACTORY = """\
[artifactory]
url = "https://artifactory.example.com/artifactory"
token_file = "artifactory.token"
"""
EXPORT = """\
[export]
root = "/srv/nfs/ml-assets"
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the caller's $CREDENTIALS_DIRECTORY or $SYNCD_CONFIG."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("SYNCD_CONFIG", raising=False)


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    """A config directory holding an ssh key, known_hosts and an Artifactory token, secrets at 0600."""
    d = (tmp_path / "etc-syncd").resolve()
    d.mkdir()
    secret(d / "id_ed25519", SSH_KEY)
    secret(d / "artifactory.token", TOKEN + "\n")
    (d / "known_hosts").write_text("[git.example.com]:22 ssh-ed25519 AAAA\n")
    return d


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    """Write a secret file with ``mode``."""
    path.write_text(text)
    path.chmod(mode)
    return path


def write(d: Path, *parts: str, name: str = "syncd.conf") -> Path:
    """Write the config sections ``parts`` to ``d/name`` and return its path."""
    p = d / name
    p.write_text("\n".join(parts))
    return p


def problems(path: Path) -> list[str]:
    """The problems ``load`` reports for ``path`` (fails the test if it loads)."""
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.path == str(path)
    return info.value.problems


# a valid configuration --------------------------------------------------------------------------------


def test_full_valid_config_resolves_paths_and_defaults(confdir: Path) -> None:
    """A full valid ssh + token config loads with absolute paths, secrets read and documented defaults."""
    path = write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT)
    cfg = load(path)
    assert isinstance(cfg, Config)
    assert cfg.path == path
    src = cfg.source
    assert (src.url, src.branch, src.path) == (
        "ssh://git@git.example.com/ml/asset-manifests.git",
        "main",
        "assets",
    )
    assert (src.ssh_key, src.known_hosts) == (confdir / "id_ed25519", confdir / "known_hosts")
    assert (src.username, src.token) == ("git", None)
    art = cfg.artifactory
    assert art.url == "https://artifactory.example.com/artifactory"
    assert art.token is not None and art.token.reveal() == TOKEN
    assert (art.username, art.password, art.ca_file) == (None, None, None)
    assert cfg.export_root == Path("/srv/nfs/ml-assets")
    assert cfg.staging == Path("/srv/nfs/ml-assets/.syncd-staging")
    assert (cfg.concurrency, cfg.timeout) == (4, 60.0)
    assert cfg.state_dir == Path("/var/lib/syncd")


def test_explicit_sections_and_relative_paths_resolve_against_config_dir(confdir: Path) -> None:
    """Relative staging, state directory and ca_file resolve against the config file's directory."""
    (confdir / "ca.pem").write_bytes(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes())
    path = write(
        confdir,
        SSH_SOURCE.replace('path = "assets"', 'path = "/assets/ml/"\nbranch = "release"'),
        ARTIFACTORY.replace('artifactory"\n', 'artifactory/"\nca_file = "ca.pem"\n'),
        EXPORT + 'staging = "../staging"\n',
        '[download]\nconcurrency = 16\ntimeout = "5m"\n',
        '[state]\ndirectory = "state"\n',
    )
    cfg = load(path)
    assert (cfg.source.branch, cfg.source.path) == ("release", "assets/ml")
    assert cfg.artifactory.url == "https://artifactory.example.com/artifactory"
    assert cfg.artifactory.ca_file == confdir / "ca.pem"
    assert cfg.staging == confdir.parent / "staging"
    assert (cfg.concurrency, cfg.timeout) == (16, 300.0)
    assert cfg.state_dir == confdir / "state"


def test_config_path_given_relatively_still_resolves_absolutely(
    confdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading 'syncd.conf' from inside its directory still yields absolute secret and state paths."""
    write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, '[state]\ndirectory = "state"\n')
    monkeypatch.chdir(confdir)
    cfg = load(Path("syncd.conf"))
    assert cfg.source.ssh_key == confdir / "id_ed25519"
    assert cfg.state_dir == confdir / "state"


def test_relative_secrets_resolve_against_credentials_directory(
    confdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With $CREDENTIALS_DIRECTORY set, relative secrets resolve there; known_hosts stays in config dir."""
    creds = (tmp_path / "credentials").resolve()
    creds.mkdir()
    secret(creds / "id_ed25519", SSH_KEY)
    secret(creds / "artifactory.token", "token-from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT))
    assert cfg.source.ssh_key == creds / "id_ed25519"
    assert cfg.source.known_hosts == confdir / "known_hosts"
    assert cfg.artifactory.token is not None and cfg.artifactory.token.reveal() == "token-from-systemd"


def test_absolute_secret_path_ignores_credentials_directory(
    confdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An absolute secret path is used as written even when $CREDENTIALS_DIRECTORY is set."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "empty-creds"))
    art = ARTIFACTORY.replace('"artifactory.token"', f'"{confdir / "artifactory.token"}"')
    cfg = load(write(confdir, HTTPS_SOURCE, art, EXPORT))
    assert cfg.artifactory.token is not None and cfg.artifactory.token.reveal() == TOKEN


def test_https_source_reads_its_token_file(confdir: Path) -> None:
    """An https source with token_file reads the token as a Secret and takes source.username."""
    secret(confdir / "git.token", "git-token\n")
    src = '[source]\nurl = "https://git.example.com/m.git"\nusername = "ci"\ntoken_file = "git.token"\n'
    cfg = load(write(confdir, src, ARTIFACTORY, EXPORT))
    assert cfg.source.token is not None and cfg.source.token.reveal() == "git-token"
    assert (cfg.source.username, cfg.source.ssh_key, cfg.source.known_hosts) == ("ci", None, None)


def test_username_with_password_file_gives_basic_auth(confdir: Path) -> None:
    """username + password_file yields basic-auth credentials and no token."""
    secret(confdir / "art.password", PASSWORD)
    art = '[artifactory]\nurl = "https://a.example.com"\nusername = "svc"\npassword_file = "art.password"\n'
    cfg = load(write(confdir, HTTPS_SOURCE, art, EXPORT))
    assert (cfg.artifactory.username, cfg.artifactory.token) == ("svc", None)
    assert cfg.artifactory.password is not None and cfg.artifactory.password.reveal() == PASSWORD


def test_anonymous_artifactory_is_allowed(confdir: Path) -> None:
    """An [artifactory] section without credentials loads with no token, username or password."""
    cfg = load(write(confdir, HTTPS_SOURCE, '[artifactory]\nurl = "http://127.0.0.1:8080/a"\n', EXPORT))
    art = cfg.artifactory
    assert (art.url, art.token, art.username, art.password) == ("http://127.0.0.1:8080/a", None, None, None)


# secret files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_secret_readable_by_others_is_refused(confdir: Path, mode: int) -> None:
    """A token file readable by group or others is refused with its mode and a chmod 600 hint."""
    p = secret(confdir / "artifactory.token", TOKEN, mode)
    errs = problems(write(confdir, HTTPS_SOURCE, ARTIFACTORY, EXPORT))
    assert errs == [
        f"at 'artifactory.token_file': {p} is readable by group or others (mode {mode:04o}); "
        f"run: chmod 600 {p}"
    ]
    assert TOKEN not in "".join(errs)


def test_ssh_key_readable_by_others_is_refused(confdir: Path) -> None:
    """An ssh private key with mode 0644 is refused at 'source.ssh_key', as ssh itself does."""
    p = secret(confdir / "id_ed25519", SSH_KEY, 0o644)
    assert problems(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT)) == [
        f"at 'source.ssh_key': {p} is readable by group or others (mode 0644); run: chmod 600 {p}"
    ]


def test_owner_only_modes_are_accepted(confdir: Path) -> None:
    """A secret file at 0400 is accepted (only group/other bits matter)."""
    secret(confdir / "artifactory.token", TOKEN, 0o400)
    assert load(write(confdir, HTTPS_SOURCE, ARTIFACTORY, EXPORT)).artifactory.token is not None


def test_missing_secret_file_is_named(confdir: Path) -> None:
    """A token_file that does not exist is reported with the directory it was looked up in."""
    (confdir / "artifactory.token").unlink()
    assert problems(write(confdir, HTTPS_SOURCE, ARTIFACTORY, EXPORT)) == [
        f"at 'artifactory.token_file': no such file (a relative name is looked up in {confdir}; the key "
        "names a file holding the secret, not the secret itself; the name is not shown)"
    ]


def test_missing_secret_in_credentials_directory_names_that_path(
    confdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With $CREDENTIALS_DIRECTORY set, a missing secret is reported at its path there."""
    creds = (tmp_path / "creds").resolve()
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert problems(write(confdir, HTTPS_SOURCE, ARTIFACTORY, EXPORT)) == [
        f"at 'artifactory.token_file': no such file (a relative name is looked up in {creds}; the key "
        "names a file holding the secret, not the secret itself; the name is not shown)"
    ]


@pytest.mark.parametrize("pasted", ["A" * 700, "AKCp8abc/SECRETzz1" + "x" * 40, "tok\x01en"])
def test_a_secret_pasted_as_the_file_name_is_never_echoed(confdir: Path, pasted: str) -> None:
    """A token pasted where a file name belongs (too long, with a '/', odd bytes) is not repeated, in
    part or whole, whatever error the lookup gives."""
    text = f"""[source]\nurl = "file:///srv/git/m.git"\n[artifactory]\nurl = "https://a.example"
token_file = {toml_str(pasted)}\n[export]\nroot = "/srv/nfs"\n"""
    path = confdir / "pasted.conf"
    path.write_text(text)
    found = "\n".join(problems(path))
    assert "artifactory.token_file" in found
    for piece in {pasted, *pasted.split("/")}:
        assert piece not in found


def test_empty_secret_file_is_refused(confdir: Path) -> None:
    """A token file holding only whitespace is reported as empty."""
    p = secret(confdir / "artifactory.token", "  \n")
    assert problems(write(confdir, HTTPS_SOURCE, ARTIFACTORY, EXPORT)) == [
        f"at 'artifactory.token_file': {p} is empty"
    ]


def test_secret_that_is_a_directory_is_refused(confdir: Path) -> None:
    """A token_file path naming a directory is refused as not a regular file."""
    (confdir / "artifactory.token").unlink()
    (confdir / "artifactory.token").mkdir(mode=0o700)
    p = confdir / "artifactory.token"
    assert problems(write(confdir, HTTPS_SOURCE, ARTIFACTORY, EXPORT)) == [
        f"at 'artifactory.token_file': {p} is not a regular file"
    ]


# unknown keys, several problems, types ----------------------------------------------------------------


def test_unknown_key_is_an_error(confdir: Path) -> None:
    """A misspelt key ('[export] roott') is an unknown-key error, plus the then-missing 'export.root'."""
    errs = problems(write(confdir, SSH_SOURCE, ARTIFACTORY, '[export]\nroott = "/srv/x"\n'))
    assert f"at 'export.roott': {UNKNOWN}" in errs
    assert errs == ["at 'export.root': required key is missing", f"at 'export.roott': {UNKNOWN}"]


def test_unknown_section_is_an_error(confdir: Path) -> None:
    """An unknown top-level section is reported as such."""
    assert problems(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, "[daemon]\ninterval = 5\n")) == [
        "at 'daemon': unknown section (check the spelling; see docs/configuration.md)"
    ]


def test_several_problems_are_reported_at_once(confdir: Path) -> None:
    """An unknown key, a bad duration, a bad concurrency and a missing section are all reported together."""
    path = write(
        confdir,
        SSH_SOURCE + 'brnach = "main"\n',
        '[download]\ntimeout = "5 minutes"\nconcurrency = 0\n',
    )
    assert problems(path) == [
        f"at 'source.brnach': {UNKNOWN}",
        "at 'artifactory': required section is missing",
        "at 'export': required section is missing",
        "at 'download.concurrency': Input should be greater than or equal to 1",
        f"at 'download.timeout': '5 minutes' {NOT_A_DURATION}",
    ]


def test_resolver_problems_are_reported_at_once(confdir: Path) -> None:
    """Path, url, branch and credential problems found after parsing are all listed in one ConfigError."""
    src = '[source]\nurl = "file:///srv/git/m.git"\nbranch = "-x"\npath = "a/../b"\nknown_hosts = "kh"\n'
    art = '[artifactory]\nurl = "ftp://a.example.com/?q=1"\nusername = "svc"\n'
    assert problems(write(confdir, src, art, '[export]\nroot = "rel"\nstaging = "rel"\n')) == [
        "at 'source.branch': '-x' is not a valid branch name ('@' alone or a leading '-')",
        "at 'source.path': must not contain '..'",
        "at 'source.known_hosts': only for an ssh:// url",
        "at 'artifactory.url': must be an http:// or https:// URL with a host",
        "at 'artifactory.url': must not have a query or fragment",
        "at 'artifactory.password_file': username and password_file go together",
        "at 'export.root': must be an absolute path",
        "at 'export.staging': must not be the export root itself",
    ]


def test_schema_and_secret_problems_are_reported_together(confdir: Path) -> None:
    """An unknown key and a group-readable token file are reported in the same ConfigError."""
    p = secret(confdir / "artifactory.token", TOKEN, 0o644)
    errs = problems(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT + 'roott = "/x"\n'))
    assert errs == [
        f"at 'export.roott': {UNKNOWN}",
        f"at 'artifactory.token_file': {p} is readable by group or others (mode 0644); run: chmod 600 {p}",
    ]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('export = "x"\n', "at 'export': must be a [export] table"),
        (
            "[download]\nconcurrency = 65\n",
            "at 'download.concurrency': Input should be less than or equal to 64",
        ),
        ('[download]\nconcurrency = "4"\n', "at 'download.concurrency': Input should be a valid integer"),
        ("[download]\nconcurrency = 4.0\n", "at 'download.concurrency': Input should be a valid integer"),
        ("[state]\ndirectory = 1\n", "at 'state.directory': Input should be a valid string"),
    ],
    ids=["section-not-table", "concurrency-high", "concurrency-str", "concurrency-float", "dir-int"],
)
def test_wrong_types_and_ranges_are_rejected(confdir: Path, extra: str, expected: str) -> None:
    """Values of the wrong type or out of range are rejected strictly, with the key named."""
    parts = (
        [extra, SSH_SOURCE, ARTIFACTORY]
        if extra.startswith("export")
        else [SSH_SOURCE, ARTIFACTORY, EXPORT, extra]
    )
    assert problems(write(confdir, *parts)) == [expected]


# durations --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ('"90s"', 90.0),
        ('"5m"', 300.0),
        ('"1h"', 3600.0),
        ('"250ms"', 0.25),
        ("30", 30.0),
        ("1.5", 1.5),
        ('"1.5"', 1.5),
        ('"2d"', 172800.0),
        ('" 10s "', 10.0),
    ],
)
def test_durations_parse(confdir: Path, raw: str, seconds: float) -> None:
    """schedule.interval accepts "90s", "5m", "1h", "250ms", plain seconds (int, float or string)."""
    cfg = load(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, f"[schedule]\ninterval = {raw}\n"))
    assert cfg.interval == seconds
    assert isinstance(cfg.interval, float)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('"5 minutes"', f"'5 minutes' {NOT_A_DURATION}"),
        ('"-1s"', f"'-1s' {NOT_A_DURATION}"),
        ('"1w"', f"'1w' {NOT_A_DURATION}"),
        ('""', f"'' {NOT_A_DURATION}"),
        ("-5", "a duration must be a finite number greater than zero"),
        ("0", "a duration must be a finite number greater than zero"),
        ('"0s"', "a duration must be a finite number greater than zero"),
        ("true", 'expected a duration such as "90s", "5m", "1h" or a number of seconds'),
        ("[1]", f"[1] {NOT_A_DURATION}"),
    ],
)
def test_bad_durations_are_rejected(confdir: Path, raw: str, message: str) -> None:
    """Durations that are not a positive number of seconds or a number with ms/s/m/h/d are rejected."""
    path = write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, f"[download]\ntimeout = {raw}\n")
    assert problems(path) == [f"at 'download.timeout': {message}"]


@pytest.mark.parametrize("raw", ["nan", "inf", "+inf"])
def test_non_finite_durations_are_rejected(confdir: Path, raw: str) -> None:
    """A TOML nan or inf timeout is a configuration error, not a value that crashes the first fetch."""
    with pytest.raises(ConfigError):
        load(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, f"[download]\ntimeout = {raw}\n"))


def test_parse_duration_directly() -> None:
    """parse_duration turns each documented form into float seconds."""
    assert [parse_duration(v) for v in ("90s", "5m", "1h", "250ms", 30, 1.5)] == [
        90.0,
        300.0,
        3600.0,
        0.25,
        30.0,
        1.5,
    ]
    with pytest.raises(ValueError, match="must be a finite number greater than zero"):
        parse_duration(0)
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(False)


# source and artifactory urls --------------------------------------------------------------------------


def test_ssh_url_without_known_hosts_is_refused(confdir: Path) -> None:
    """An ssh:// source without known_hosts is refused: host keys must be checked."""
    src = SSH_SOURCE.replace('known_hosts = "known_hosts"\n', "")
    assert problems(write(confdir, src, ARTIFACTORY, EXPORT)) == [
        "at 'source.known_hosts': required for an ssh:// url: unknown or changed host keys are refused"
    ]


def test_ssh_url_without_key_is_refused(confdir: Path) -> None:
    """An ssh:// source without ssh_key is refused."""
    src = SSH_SOURCE.replace('ssh_key = "id_ed25519"\n', "")
    assert problems(write(confdir, src, ARTIFACTORY, EXPORT)) == [
        "at 'source.ssh_key': required for an ssh:// url"
    ]


def test_known_hosts_that_does_not_exist_is_refused(confdir: Path) -> None:
    """A known_hosts path that does not exist is reported with its resolved path."""
    (confdir / "known_hosts").unlink()
    assert problems(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT)) == [
        f"at 'source.known_hosts': {confdir / 'known_hosts'} does not exist"
    ]


def test_ssh_options_on_https_url_are_refused(confdir: Path) -> None:
    """ssh_key and known_hosts on a non-ssh url are errors, not silently ignored."""
    src = HTTPS_SOURCE + 'ssh_key = "id_ed25519"\nknown_hosts = "known_hosts"\n'
    assert problems(write(confdir, src, ARTIFACTORY, EXPORT)) == [
        "at 'source.ssh_key': only for an ssh:// url",
        "at 'source.known_hosts': only for an ssh:// url",
    ]


def test_token_file_on_non_https_source_is_refused(confdir: Path) -> None:
    """source.token_file on a file:// url is an error."""
    src = '[source]\nurl = "file:///srv/git/m.git"\ntoken_file = "artifactory.token"\n'
    assert problems(write(confdir, src, ARTIFACTORY, EXPORT)) == [
        "at 'source.token_file': only for an https:// (or http://) url"
    ]


@pytest.mark.parametrize(
    "url",
    [f"ssh://git:{TOKEN}@git.example.com/m.git", f"https://ci:{TOKEN}@git.example.com/m.git"],
    ids=["ssh", "https"],
)
def test_source_url_with_password_is_refused(confdir: Path, url: str) -> None:
    """A source url carrying a password is refused, and the password is not echoed back."""
    src = SSH_SOURCE.replace("ssh://git@git.example.com/ml/asset-manifests.git", url)
    if url.startswith("https"):
        src = f'[source]\nurl = "{url}"\n'
    with pytest.raises(ConfigError) as info:
        load(write(confdir, src, ARTIFACTORY, EXPORT))
    assert info.value.problems == [
        "at 'source.url': must not carry a password; put the token in source.token_file"
    ]
    assert TOKEN not in str(info.value)


@pytest.mark.parametrize(
    "url", ["ftp://git.example.com/m.git", "git@git.example.com:ml/m.git", "/srv/git/m.git"]
)
def test_source_url_with_unsupported_scheme_is_refused(confdir: Path, url: str) -> None:
    """A source url that is not ssh://, https:// or file:// (scp syntax, plain paths) is refused."""
    assert problems(write(confdir, f'[source]\nurl = "{url}"\n', ARTIFACTORY, EXPORT)) == [
        "at 'source.url': must start with ssh://, https://, http:// or file://"
    ]


@pytest.mark.parametrize(
    "url",
    [f"https://svc:{TOKEN}@a.example.com/artifactory", f"https://{TOKEN}@a.example.com/"],
    ids=["user:pw", "user"],
)
def test_artifactory_url_with_userinfo_is_refused(confdir: Path, url: str) -> None:
    """Credentials in the Artifactory url are refused and not repeated in the error."""
    art = ARTIFACTORY.replace("https://artifactory.example.com/artifactory", url)
    with pytest.raises(ConfigError) as info:
        load(write(confdir, HTTPS_SOURCE, art, EXPORT))
    assert info.value.problems == [
        "at 'artifactory.url': must not carry credentials; use token_file or password_file"
    ]
    assert TOKEN not in str(info.value)


def test_token_file_with_username_is_refused(confdir: Path) -> None:
    """token_file together with username is ambiguous and refused."""
    art = ARTIFACTORY + 'username = "svc"\n'
    assert problems(write(confdir, HTTPS_SOURCE, art, EXPORT)) == [
        "at 'artifactory.token_file': use either token_file or username + password_file"
    ]


def test_username_without_password_file_is_refused(confdir: Path) -> None:
    """username without password_file is refused at 'artifactory.password_file'."""
    art = '[artifactory]\nurl = "https://a.example.com"\nusername = "svc"\n'
    assert problems(write(confdir, HTTPS_SOURCE, art, EXPORT)) == [
        "at 'artifactory.password_file': username and password_file go together"
    ]


def test_password_file_without_username_is_refused(confdir: Path) -> None:
    """password_file without username is refused at 'artifactory.username'."""
    secret(confdir / "pw", PASSWORD)
    art = '[artifactory]\nurl = "https://a.example.com"\npassword_file = "pw"\n'
    assert problems(write(confdir, HTTPS_SOURCE, art, EXPORT)) == [
        "at 'artifactory.username': username and password_file go together"
    ]


def test_a_ca_file_without_a_pem_certificate_is_refused_at_load(confdir: Path) -> None:
    """check-config catches a ca_file OpenSSL cannot load (not only the first connection)."""
    (confdir / "ca.pem").write_text("not a certificate\n")
    art = ARTIFACTORY + 'ca_file = "ca.pem"\n'
    assert problems(write(confdir, HTTPS_SOURCE, art, EXPORT)) == [
        f"at 'artifactory.ca_file': {confdir / 'ca.pem'} cannot be read or holds no PEM certificate "
        "(a CA bundle in PEM is expected)"
    ]


def test_missing_ca_file_is_refused(confdir: Path) -> None:
    """A ca_file that does not exist is reported with its resolved path."""
    art = ARTIFACTORY + 'ca_file = "ca.pem"\n'
    assert problems(write(confdir, HTTPS_SOURCE, art, EXPORT)) == [
        f"at 'artifactory.ca_file': {confdir / 'ca.pem'} does not exist"
    ]


# secrets never shown ----------------------------------------------------------------------------------


def test_secret_repr_str_and_format_hide_the_value() -> None:
    """Secret shows only asterisks in repr, str and f-strings; reveal() returns the value."""
    s = Secret(TOKEN)
    assert repr(s) == str(s) == f"{s}" == "Secret('**********')"
    assert TOKEN not in f"{s!r} {s!s} {s:}"
    assert s.reveal() == TOKEN


def test_loaded_config_never_shows_secrets(confdir: Path) -> None:
    """repr/str of a loaded Config and describe() contain neither the token nor the password."""
    secret(confdir / "git.token", PASSWORD)
    src = '[source]\nurl = "https://git.example.com/m.git"\nusername = "ci"\ntoken_file = "git.token"\n'
    cfg = load(write(confdir, src, ARTIFACTORY, EXPORT))
    for text in (repr(cfg), str(cfg), repr(cfg.artifactory), repr(cfg.source), str(describe(cfg))):
        assert TOKEN not in text
        assert PASSWORD not in text
    assert describe(cfg) == {
        "source": "https://git.example.com/m.git",
        "branch": "main",
        "path": ".",
        "artifactory": "https://artifactory.example.com/artifactory",
        "export_root": "/srv/nfs/ml-assets",
        "staging": "/srv/nfs/ml-assets/.syncd-staging",
        "state_dir": "/var/lib/syncd",
        "concurrency": 4,
        "segments": 4,
        "segment_min_size": 64 << 20,
        "timeout_s": 60.0,
        "retries": 5,
        "interval_s": 300.0,
        "jitter_s": 30.0,
        "stale_after_s": 1500.0,
        "metrics_textfile": None,
        "http_listen": None,
        "trigger": False,
        "notify": None,
        "verify_signatures": "off",
        "verify_interval_s": None,
        "prune": "off",
    }


@pytest.mark.parametrize(
    "art",
    [
        f'[artifactory]\nurl = "https://a.example.com"\ntoken = "{TOKEN}"\n',
        f'[artifactory]\nurl = "https://a.example.com"\ntoken_file = ["{TOKEN}"]\n',
        f'[artifactory]\nurl = "https://a.example.com"\ntoken_file = "{TOKEN}"\n',
        f'[artifactory]\nurl = "https://a.example.com"\nusername = "{TOKEN}"\n',
    ],
    ids=["inline-token", "wrong-type", "token-as-path", "username-only"],
)
def test_config_errors_never_contain_secret_text(confdir: Path, art: str) -> None:
    """A secret pasted into the config in the wrong place never appears in the ConfigError text."""
    with pytest.raises(ConfigError) as info:
        load(write(confdir, HTTPS_SOURCE, art, EXPORT, "[download]\ntimeout = 0\n"))
    assert TOKEN not in str(info.value)
    assert TOKEN not in repr(info.value)


# the file itself, exit code, config_path --------------------------------------------------------------


def test_missing_config_file(tmp_path: Path) -> None:
    """A config path that does not exist is a ConfigError saying so, with exit code 2."""
    p = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as info:
        load(p)
    assert info.value.problems == ["the file does not exist"]
    assert str(info.value) == f"{p}: invalid configuration:\n  the file does not exist"
    assert info.value.exit_code == 2


def test_invalid_toml_config(confdir: Path) -> None:
    """A config that is not valid TOML is a ConfigError with tomllib's message and line."""
    p = write(confdir, "[source]\nurl = \n")
    assert problems(p) == ["not valid TOML: Invalid value (at line 2, column 7)"]


def test_deeply_nested_config_is_a_config_error(confdir: Path) -> None:
    """A pathologically nested TOML config is a ConfigError, never a RecursionError."""
    p = confdir / "syncd.conf"
    p.write_text("x = " + "[" * 5000)
    assert problems(p) == ["not valid TOML: nested too deeply"]


def test_non_utf8_config(confdir: Path) -> None:
    """A config that is not UTF-8 cannot be read, and says so."""
    p = confdir / "syncd.conf"
    p.write_bytes(b'[source]\nurl = "\xff"\n')
    assert problems(p) == ["cannot read the file: UnicodeDecodeError"]


def test_config_path_that_is_a_directory(confdir: Path) -> None:
    """A config path naming a directory is a readable error, not a traceback."""
    assert problems(confdir) == ["cannot read the file: Is a directory"]


def test_config_error_is_a_syncd_error_with_exit_code_2() -> None:
    """ConfigError is a SyncdError with exit code 2 and lists every problem on its own line."""
    err = ConfigError("/etc/syncd/syncd.conf", ["at 'a': x", "at 'b': y"])
    assert isinstance(err, SyncdError)
    assert (err.exit_code, ConfigError.exit_code, SyncdError.exit_code) == (2, 2, 1)
    assert str(err) == "/etc/syncd/syncd.conf: invalid configuration:\n  at 'a': x\n  at 'b': y"


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """-c wins over $SYNCD_CONFIG, which wins over /etc/syncd/syncd.conf."""
    assert DEFAULT_PATH == "/etc/syncd/syncd.conf"
    assert config_path(None) == Path("/etc/syncd/syncd.conf")
    monkeypatch.setenv("SYNCD_CONFIG", "/opt/env.conf")
    assert config_path(None) == Path("/opt/env.conf")
    assert config_path("/opt/cli.conf") == Path("/opt/cli.conf")
    monkeypatch.setenv("SYNCD_CONFIG", "")
    assert config_path(None) == Path("/etc/syncd/syncd.conf")


def test_config_path_accepts_relative_cli_value() -> None:
    """A relative -c value is returned as given (load resolves relative paths later)."""
    assert config_path("conf/syncd.conf") == Path("conf/syncd.conf")
    assert not config_path("conf/syncd.conf").is_absolute()
    assert os.environ.get("SYNCD_CONFIG") is None


# durations that make no sense -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('[download]\ntimeout = "500ms"\n', "at 'download.timeout': must be at least 1s (got 500ms)"),
        ('[schedule]\ninterval = "1ms"\n', "at 'schedule.interval': must be at least 100ms (got 1ms)"),
        (
            '[schedule]\ninterval = "10s"\njitter = "10s"\n',
            "at 'schedule.jitter': must be shorter than schedule.interval (10s >= 10s)",
        ),
        (
            '[schedule]\ninterval = "1m"\njitter = "1h"\n',
            "at 'schedule.jitter': must be shorter than schedule.interval (3600s >= 60s)",
        ),
        (
            '[download]\nbackoff = "2m"\n',
            "at 'download.backoff': must not be longer than download.backoff_max (120s > 60s)",
        ),
    ],
    ids=["timeout-500ms", "interval-1ms", "jitter-equal", "jitter-longer", "backoff-over-max"],
)
def test_durations_that_make_no_sense_are_refused(confdir: Path, extra: str, expected: str) -> None:
    """A timeout under 1s, an interval under 100ms, a jitter not shorter than the interval and a backoff
    longer than backoff_max are refused at their key (backoff is no longer raised silently)."""
    assert problems(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, extra)) == [expected]


def test_duration_floors_themselves_are_accepted(confdir: Path) -> None:
    """timeout = 1s, interval = 100ms with jitter 0, and backoff equal to backoff_max all load as given."""
    extra = (
        '[download]\ntimeout = "1s"\nbackoff = "5s"\nbackoff_max = "5s"\n'
        '[schedule]\ninterval = "100ms"\njitter = 0\n'
    )
    cfg = load(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, extra))
    assert (cfg.timeout, cfg.interval, cfg.jitter, cfg.backoff, cfg.backoff_max) == (1.0, 0.1, 0.0, 5.0, 5.0)


# export.staging ---------------------------------------------------------------------------------------


def _other_filesystem(than: Path) -> Path | None:
    """A directory on another file system than ``than`` (tmpfs /dev/shm, /run), or None."""
    for candidate in (Path("/dev/shm"), Path("/run"), Path("/proc/self")):
        try:
            if candidate.is_dir() and candidate.stat().st_dev != than.stat().st_dev:
                return candidate
        except OSError:
            continue
    return None


def test_staging_on_another_file_system_is_refused(confdir: Path, tmp_path: Path) -> None:
    """A staging directory (not created yet) whose nearest existing parent is on another file system
    than the existing export root is refused at load, before anything is created there."""
    root = tmp_path / "export"
    root.mkdir()
    other = _other_filesystem(root)
    if other is None:
        pytest.skip("no second file system visible")
    staging = other / f"syncd-staging-{os.getpid()}" / "sub"
    export = f'[export]\nroot = "{root}"\nstaging = "{staging}"\n'
    assert problems(write(confdir, SSH_SOURCE, ARTIFACTORY, export)) == [
        f"at 'export.staging': {staging} is on another file system than export.root ({root}): the rename "
        "into the export would not be atomic; use a directory on the export's file system"
    ]
    assert not staging.parent.exists()


def test_staging_beside_the_root_on_its_file_system_is_accepted(confdir: Path, tmp_path: Path) -> None:
    """A staging directory next to the root on the same file system, not created yet, is fine."""
    root = tmp_path / "export"
    root.mkdir()
    export = f'[export]\nroot = "{root}"\nstaging = "{tmp_path / "stage" / "x"}"\n'
    assert load(write(confdir, SSH_SOURCE, ARTIFACTORY, export)).staging == tmp_path / "stage" / "x"


def test_staging_check_is_skipped_while_the_root_is_missing(confdir: Path, tmp_path: Path) -> None:
    """With no root yet (the mount is missing) the file system check is skipped: check-config still passes."""
    root = tmp_path / "not-mounted"
    export = f'[export]\nroot = "{root}"\nstaging = "/dev/shm/x"\n'
    assert load(write(confdir, SSH_SOURCE, ARTIFACTORY, export)).export_root == root


@pytest.mark.parametrize("staging", ["/srv", "/", "/srv/nfs", "/srv/nfs/ml-assets/.."])
def test_staging_above_the_root_is_refused(confdir: Path, staging: str) -> None:
    """A staging directory that contains the export root (syncd empties it each pass) is refused."""
    export = EXPORT + f'staging = "{staging}"\n'
    assert problems(write(confdir, SSH_SOURCE, ARTIFACTORY, export)) == [
        f"at 'export.staging': {os.path.normpath(staging)} contains the export root; "
        "syncd empties its staging directory every pass"
    ]


def test_staging_that_is_the_root_through_a_symlink_is_refused(confdir: Path, tmp_path: Path) -> None:
    """A staging path that resolves to the export root (via a symbolic link) is refused."""
    root = tmp_path / "export"
    root.mkdir()
    (tmp_path / "alias").symlink_to(root)
    export = f'[export]\nroot = "{root}"\nstaging = "{tmp_path / "alias"}"\n'
    assert problems(write(confdir, SSH_SOURCE, ARTIFACTORY, export)) == [
        "at 'export.staging': must not be the export root itself"
    ]


# source.url userinfo, source.username -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            f"https://{TOKEN}@git.example.com/m.git",
            "must not carry a user name (a token there would be logged); "
            "use source.username and source.token_file",
        ),
        (f"https://git.example.com/m.git?private_token={TOKEN}", "must not have a query or fragment"),
        (f"https://git.example.com/m.git#{TOKEN}", "must not have a query or fragment"),
        ("https://git.example.com:99999/m.git", "has an invalid port (a number from 1 to 65535)"),
        ("https://git.example.com:abc/m.git", "has an invalid port (a number from 1 to 65535)"),
        ("https:///m.git", "must name a host"),
        ("https://git.example.com/m .git", "is not a URL (spaces, control characters or a bad [host])"),
        ("https://[::1/m.git", "is not a URL (spaces, control characters or a bad [host])"),
    ],
    ids=["token-as-user", "query", "fragment", "port-range", "port-text", "no-host", "space", "bracket"],
)
def test_source_url_problems_never_echo_it(confdir: Path, url: str, expected: str) -> None:
    """A source url with a user name (http/https), query, fragment, bad port or no host is refused at
    'source.url', and the error never repeats the url."""
    with pytest.raises(ConfigError) as info:
        load(write(confdir, f'[source]\nurl = "{url}"\n', ARTIFACTORY, EXPORT))
    assert info.value.problems == [f"at 'source.url': {expected}"]
    assert TOKEN not in str(info.value) and url not in str(info.value)


@pytest.mark.parametrize("user", ["-oProxyCommand=x", "a%40b", "a:b"])
def test_ssh_user_must_be_a_plain_name(confdir: Path, user: str) -> None:
    """An ssh:// user that is not a plain name (option-like, percent-encoded) is refused."""
    src = SSH_SOURCE.replace("ssh://git@", f"ssh://{user}@")
    expected = (
        "must not carry a password; put the token in source.token_file"
        if ":" in user
        else "the ssh user name must be a plain name such as git@"
    )
    assert problems(write(confdir, src, ARTIFACTORY, EXPORT)) == [f"at 'source.url': {expected}"]


def test_source_username_is_for_http_only(confdir: Path) -> None:
    """[source] username is refused on an ssh:// url (the ssh user goes in the url) and must be a plain
    basic-auth user (no ':' or blank)."""
    assert problems(write(confdir, SSH_SOURCE + 'username = "ci"\n', ARTIFACTORY, EXPORT)) == [
        "at 'source.username': only for an https:// (or http://) url"
    ]
    assert problems(write(confdir, HTTPS_SOURCE + 'username = "c:i"\n', ARTIFACTORY, EXPORT)) == [
        "at 'source.username': must be printable ASCII without spaces or ':'"
    ]


def test_bad_artifactory_port_is_refused(confdir: Path) -> None:
    """An Artifactory url with a port out of range is a config error (not a crash at start)."""
    art = ARTIFACTORY.replace("artifactory.example.com/", "artifactory.example.com:70000/")
    assert problems(write(confdir, HTTPS_SOURCE, art, EXPORT)) == [
        "at 'artifactory.url': has an invalid port (a number from 1 to 65535)"
    ]


# warnings ---------------------------------------------------------------------------------------------


def test_plain_http_with_credentials_is_allowed_with_warnings(confdir: Path) -> None:
    """http:// with an Artifactory token, and an http:// source with a token_file, load with one warning
    each; https:// and anonymous http:// give none."""
    secret(confdir / "git.token", "git-token\n")
    src = '[source]\nurl = "http://git.example.com/m.git"\ntoken_file = "git.token"\n'
    art = ARTIFACTORY.replace("https://", "http://")
    cfg = load(write(confdir, src, art, EXPORT))
    assert cfg.warnings == (
        "at 'source.url': plain http:// sends source.token_file's token unencrypted; use https://",
        "at 'artifactory.url': plain http:// sends the Artifactory credentials unencrypted; use https://",
    )
    assert load(write(confdir, HTTPS_SOURCE, ARTIFACTORY, EXPORT)).warnings == ()
    anonymous = '[artifactory]\nurl = "http://a.example.com"\n'
    assert (
        load(write(confdir, '[source]\nurl = "http://g.example.com/m.git"\n', anonymous, EXPORT)).warnings
        == ()
    )


def test_check_config_prints_warnings_on_stderr(confdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """syncd check-config exits 0 and prints each warning as 'warning: …' on stderr, the summary on stdout."""
    from syncd import cli

    art = ARTIFACTORY.replace("https://", "http://")
    path = write(confdir, HTTPS_SOURCE, art, EXPORT)
    assert cli.main(["check-config", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == (
        "warning: at 'artifactory.url': plain http:// sends the Artifactory credentials unencrypted; "
        "use https://\n"
    )
    assert out.startswith(f"{path}: OK\n") and TOKEN not in out + err


# [status], [metrics], [http] ------------------------------------------------------------------------


def test_monitoring_sections_default_off_and_stale_after_follows_interval(confdir: Path) -> None:
    """Without [metrics]/[http] nothing is served or written; stale_after defaults to 3 x interval + 10m."""
    cfg = load(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, '[schedule]\ninterval = "2m"\n'))
    assert (cfg.metrics_textfile, cfg.http_listen, cfg.trigger_secret) == (None, None, None)
    assert cfg.stale_after == 3 * 120 + 600
    cfg = load(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, '[status]\nstale_after = "45m"\n'))
    assert cfg.stale_after == 2700


def test_monitoring_sections_load(confdir: Path) -> None:
    """A textfile, an IPv4 or bracketed IPv6 listen address and a trigger secret load as typed values."""
    secret(confdir / "trigger.secret", "hook-secret\n")
    for listen, want in (("127.0.0.1:9847", ("127.0.0.1", 9847)), ("[::1]:80", ("::1", 80))):
        cfg = load(
            write(
                confdir,
                SSH_SOURCE,
                ARTIFACTORY,
                EXPORT,
                '[metrics]\ntextfile = "/var/lib/prometheus/node-exporter/syncd.prom"\n',
                f'[http]\nlisten = "{listen}"\ntrigger_secret_file = "trigger.secret"\n',
            )
        )
        assert cfg.metrics_textfile == Path("/var/lib/prometheus/node-exporter/syncd.prom")
        assert cfg.http_listen == want
        assert cfg.trigger_secret is not None and cfg.trigger_secret.reveal() == "hook-secret"
        assert describe(cfg)["trigger"] is True
        assert "hook-secret" not in repr(describe(cfg))


@pytest.mark.parametrize(
    ("section", "where", "expected"),
    [
        ('[metrics]\ntextfile = "/tmp/syncd.txt"\n', "metrics.textfile", "must end in '.prom'"),
        ('[metrics]\ntextfile = "syncd.prom"\n', "metrics.textfile", "must be an absolute path"),
        ('[http]\nlisten = "localhost:9847"\n', "http.listen", "is not an IP address and port"),
        ('[http]\nlisten = "127.0.0.1"\n', "http.listen", "is not an IP address and port"),
        ('[http]\nlisten = "127.0.0.1:0"\n', "http.listen", "is not an IP address and port"),
        ('[http]\nlisten = "127.0.0.1:99999"\n', "http.listen", "is not an IP address and port"),
        ('[http]\nlisten = "::1:9847"\n', "http.listen", "is not an IP address and port"),
        ('[http]\ntrigger_secret_file = "x"\n', "http.trigger_secret_file", "has no effect without"),
        (
            '[http]\nlisten = "127.0.0.1:1"\ntrigger_secret_file = "nope"\n',
            "http.trigger_secret_file",
            "no such",
        ),
        ('[status]\nstale_after = "soon"\n', "status.stale_after", NOT_A_DURATION),
        ("[http]\nport = 1\n", "http.port", UNKNOWN),
    ],
)
def test_bad_monitoring_settings_name_the_key(confdir: Path, section: str, where: str, expected: str) -> None:
    """Each bad [metrics]/[http]/[status] value is one problem at its key."""
    found = problems(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, section))
    assert len(found) == 1 and found[0].startswith(f"at '{where}': ") and expected in found[0], found


SMTP_HEAD = '[notify]\n[notify.smtp]\nhost = "m.example"\n'


# [notify] ------------------------------------------------------------------------------------------
NOTIFY = """\
[notify]
events = ["problem", "recovery", "published"]
repeat = "12h"
min_failures = 2
mail_authors = true
author_domains = ["bank.example"]

[notify.smtp]
host = "smtp.bank.example"
username = "syncd"
password_file = "smtp.password"
from = "syncd <syncd@nfs01.bank.example>"
to = ["ml-platform-ops@bank.example", "oncall@bank.example"]

[notify.webhook]
url = "https://chat.bank.example/hooks/SECRET-PATH?sig=SECRET-SIG"
token_file = "hook.token"
hmac_secret_file = "hook.hmac"
timeout = "5s"
"""


def test_notify_loads_with_its_defaults_and_never_shows_the_webhook_path(confdir: Path) -> None:
    for name in ("smtp.password", "hook.token", "hook.hmac"):
        secret(confdir / name, f"{name}-{PASSWORD}\n")
    cfg = load(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, NOTIFY))
    n = cfg.notify
    assert n is not None and n.smtp is not None and n.webhook is not None
    assert n.events == {"problem", "recovery", "published"} and (n.repeat, n.min_failures) == (43200, 2)
    assert (n.smtp.port, n.smtp.security, n.smtp.timeout) == (587, "starttls", 30.0)
    assert n.smtp.password is not None and n.smtp.password.reveal() == f"smtp.password-{PASSWORD}"
    assert n.webhook.timeout == 5.0 and n.author_domains == ("bank.example",)
    shown = str(describe(cfg)) + repr(cfg)
    assert "SECRET" not in shown and PASSWORD not in shown
    assert "webhook to https://chat.bank.example" in str(describe(cfg)["notify"])


def test_no_notify_section_means_no_notifications(confdir: Path) -> None:
    assert load(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT)).notify is None


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ('[notify]\nevents = ["problem"]\n', "at 'notify': configures no channel"),
        ('[notify]\nevents = ["problems"]\n[notify.webhook]\nurl = "https://h.example/x"\n',
         "at 'notify.events': unknown event 'problems'"),
        ('[notify]\nevents = []\n[notify.webhook]\nurl = "https://h.example/x"\n',
         "at 'notify.events': is empty"),
        ('[notify]\nmail_authors = true\n[notify.webhook]\nurl = "https://h.example/x"\n',
         "at 'notify.author_domains': must list"),
        (SMTP_HEAD + 'from = "x"\nto = ["a@b.example"]\n',
         "at 'notify.smtp.from': 'x' is not a mail address"),
        (SMTP_HEAD + 'from = "a@b.example"\nto = []\n',
         "at 'notify.smtp.to': lists no recipient"),
        (SMTP_HEAD + 'from = "a@b.example"\nto = ["a@b.example, c@d.example"]\n',
         "at 'notify.smtp.to.0': 'a@b.example, c@d.example' is not one mail address"),
        (SMTP_HEAD + 'security = "ssl"\nfrom = "a@b.example"\nto = ["a@b.example"]\n',
         "at 'notify.smtp.security': 'ssl' is not one of"),
        (SMTP_HEAD + 'username = "u"\nfrom = "a@b.example"\nto = ["a@b.example"]\n',
         "at 'notify.smtp.password_file': username and password_file go together"),
        (SMTP_HEAD + 'from = "a@b.example"\nto = ["a@b.example"]\ntimeout = "10ms"\n',
         "at 'notify.smtp.timeout': must be at least 1s"),
        (SMTP_HEAD + 'from = "a@b.example"\n', "at 'notify.smtp.to': required"),
        ('[notify]\n[notify.smtp]\nhots = "m.example"\n', "at 'notify.smtp.hots': unknown key"),
        ('[notify]\n[notify.webhook]\nurl = "https://user:SECRET@h.example/x"\n',
         "at 'notify.webhook.url': must not carry credentials"),
        ('[notify]\n[notify.webhook]\nurl = "ftp://h.example/SECRET"\n',
         "at 'notify.webhook.url': must be an http"),
        ('[notify]\n[notify.webhook]\nurl = "https://h.example/x"\ntoken_file = "missing"\n',
         "at 'notify.webhook.token_file': no such file"),
        ('[notify]\n[notify.webhook]\nurl = "https://h.example/x"\nca_file = "nope.pem"\n',
         "at 'notify.webhook.ca_file':"),
    ],
)  # fmt: skip
def test_notify_problems_name_the_key(confdir: Path, section: str, expected: str) -> None:
    found = problems(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, section))
    assert any(p.startswith(expected) for p in found), found
    assert not any("SECRET" in p for p in found)


def test_a_password_over_plain_smtp_to_another_host_is_a_warning(confdir: Path) -> None:
    secret(confdir / "smtp.password", PASSWORD)
    smtp = 'security = "none"\nusername = "u"\npassword_file = "smtp.password"\n'
    smtp += 'from = "a@b.example"\nto = ["a@b.example"]\n'
    cfg = load(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, SMTP_HEAD + smtp))
    assert cfg.notify is not None and cfg.notify.smtp is not None and cfg.notify.smtp.port == 25
    assert any("notify.smtp.security" in w and "unencrypted" in w for w in cfg.warnings)


# [prune] ----------------------------------------------------------------------------------------------


def test_prune_is_off_by_default_and_reads_its_keys(confdir: Path) -> None:
    """No [prune]: off, 7 days, 100 files, 5 %; the keys as given otherwise."""
    cfg = load(write(confdir, HTTPS_SOURCE, ARTIFACTORY, EXPORT))
    assert (cfg.prune.enabled, cfg.prune.grace, cfg.prune.max_files, cfg.prune.max_fraction) == (
        False, 7 * 86400.0, 100, 0.05,
    )  # fmt: skip
    section = '[prune]\nenabled = true\ngrace = "36h"\nmax_files = 5000\nmax_fraction = 1\n'
    cfg = load(write(confdir, HTTPS_SOURCE, ARTIFACTORY, EXPORT, section))
    assert (cfg.prune.enabled, cfg.prune.grace, cfg.prune.max_files, cfg.prune.max_fraction) == (
        True, 36 * 3600.0, 5000, 1.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("section", "where"),
    [
        ('grace = "0s"', "prune.grace"),
        ('grace = "soon"', "prune.grace"),
        ("max_files = -1", "prune.max_files"),
        ("max_fraction = 1.5", "prune.max_fraction"),
        ("max_fraction = -0.1", "prune.max_fraction"),
        ('enabled = "yes"', "prune.enabled"),
        ("grace_period = 1", "prune.grace_period"),
    ],
)
def test_bad_prune_keys_are_named(confdir: Path, section: str, where: str) -> None:
    """Each bad [prune] key is a problem naming it."""
    found = problems(write(confdir, HTTPS_SOURCE, ARTIFACTORY, EXPORT, f"[prune]\n{section}\n"))
    assert any(p.startswith(f"at '{where}'") for p in found), found


@pytest.mark.parametrize(
    ("value", "expected"),
    [('"64MiB"', 64 << 20), ('"500MB"', 500_000_000), ("1048576", 1 << 20), ('"1 GiB"', 1 << 30), ('"7"', 7)],
)
def test_segment_min_size_takes_sizes(confdir: Path, value: str, expected: int) -> None:
    """[download] segment_min_size reads binary and decimal units or a plain number of bytes."""
    cfg = load(write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, f"[download]\nsegment_min_size = {value}\n"))
    assert cfg.segment_min_size == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("segment_min_size", '"64 furlongs"'),
        ("segment_min_size", "0"),
        ("segment_min_size", "true"),
        ("segments", "0"),
        ("segments", "17"),
    ],
)
def test_bad_segment_settings_are_named(confdir: Path, key: str, value: str) -> None:
    """A bad [download] segments or segment_min_size is reported at its key."""
    path = write(confdir, SSH_SOURCE, ARTIFACTORY, EXPORT, f"[download]\n{key} = {value}\n")
    assert any(p.startswith(f"at 'download.{key}'") for p in problems(path)), problems(path)
