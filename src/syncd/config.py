"""Load ``syncd.conf`` (TOML) into one frozen, typed :class:`Config`, or fail with every problem at once.

In: a path (``-c``, ``$SYNCD_CONFIG`` or ``/etc/syncd/syncd.conf``). Out: a :class:`Config` the rest of
syncd trusts. Raises :class:`~syncd.errors.ConfigError` listing each problem as ``at 'section.key': …``.

Path rules: a relative secret path (``ssh_key``, ``token_file``, ``password_file``) is resolved against
``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``) when set, else against the config file's directory;
other relative paths against the config file's directory. A secret file readable by group or others, or
owned by another user than the one running syncd, is refused, as ssh refuses such a private key; a secret
that cannot travel in an HTTP header (a line break, a control or non-ASCII character) is refused at load,
never echoed. Secret values are held in :class:`Secret`, whose ``repr`` and ``str`` never show the value.

URLs never carry credentials: userinfo (other than a plain ssh user such as ``git@``), a query or a
fragment is refused, so every URL in :class:`Config` can be logged as it is. Problems that are not fatal
(plain ``http://`` with credentials) are kept in :attr:`Config.warnings`.
"""

from __future__ import annotations

import base64
import codecs
import ipaddress
import math
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from syncd.errors import ConfigError

DEFAULT_PATH = "/etc/syncd/syncd.conf"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
# Floors below which a duration makes no sense: a network timeout under a second fails on any real link;
# an interval under 100 ms is a busy loop against the git server (tests use 200 ms).
MIN_TIMEOUT = 1.0
MIN_INTERVAL = 0.1
# A secret file holds one token or password; anything bigger is a wrong path, not a secret.
_MAX_SECRET_BYTES = 64 * 1024
# A user name that may stand in an ssh:// url: no option-like leading '-', no '@', ':' or '%'.
_PLAIN_SSH_USER = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,63}")
_DEFAULT_PORTS = {"http": 80, "https": 443, "ssh": 22}


def parse_duration(value: object, *, allow_zero: bool = False) -> float:
    """Turn ``"90s"``, ``"5m"``, ``"1h"``, ``"250ms"`` or a number of seconds into seconds (float)."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as "90s", "5m", "1h" or a number of seconds')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError(f'{value!r} is not a duration: use "90s", "5m", "1h" or a number of seconds')
    if allow_zero and seconds == 0:
        return 0.0
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("a duration must be a finite number greater than zero")
    if seconds > 366 * 86400:
        raise ValueError("a duration must be at most a year")
    return seconds


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
}


def parse_size(value: object) -> int:
    """Turn ``"64MiB"``, ``"500MB"``, ``"1GiB"`` or a number of bytes into bytes (int, at least 1)."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as "64MiB", "500MB" or a number of bytes')
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    else:
        raise ValueError(f'{value!r} is not a size: use "64MiB", "500MB", "1GiB" or a number of bytes')
    if size < 1:
        raise ValueError("a size must be at least 1 byte")
    if size > 1 << 50:
        raise ValueError("a size must be at most 1 PiB")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
ZeroOrDuration = Annotated[float, BeforeValidator(lambda v: parse_duration(v, allow_zero=True))]


class Secret:
    """A credential read from a file; it never shows itself in ``repr``, ``str`` or logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret itself, for the one call that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__


def secret_value(data: bytes) -> tuple[str, str]:
    """The secret held in a file's bytes, as ``(value, "")``, or ``("", why it is refused)``.

    One trailing line ending (and trailing blanks) is dropped, as editors and ``echo`` add them. What
    remains must be printable ASCII (0x20-0x7e) without leading or trailing blanks: anything else cannot be
    sent in an HTTP header (h11 rejects it, and its error text holds the header). ``why`` never quotes the
    value."""
    text = data.rstrip(b" \t\r\n")
    if not text.strip(b" \t"):
        return "", "is empty"
    if text[:1] in (b" ", b"\t"):
        return "", "starts with a blank"
    if b"\n" in text or b"\r" in text:
        return "", "holds a line break inside the secret (a secret is one line)"
    if any(b < 0x20 or b == 0x7F for b in text):
        return "", "holds a control character"
    if any(b > 0x7F for b in text):
        return "", "holds a non-ASCII character"
    return text.decode("ascii"), ""


def branch_problem(name: str) -> str:
    """Why ``name`` cannot be the branch ``refs/heads/<name>``, or "" when it can.

    git check-ref-format's rules: no control character, space, ``~ ^ : ? * [ \\``, no ``..`` or ``@{``, no
    empty component (``//``, a leading or trailing ``/``), no component starting with ``.`` or ending with
    ``.lock``, no trailing ``.``. Also refused: ``@`` (git's name for HEAD) and a leading ``-`` (an option to
    git), which ref names allow but ``git branch`` does not."""
    if not name:
        return "empty"
    if name == "@" or name.startswith("-"):
        return "'@' alone or a leading '-'"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "a control character"
    bad = sorted({c for c in name if c in " ~^:?*[\\"})
    if bad:
        return "contains " + " ".join(repr(c) for c in bad)
    if ".." in name or "@{" in name:
        return "contains '..' or '@{'"
    if name.endswith("."):
        return "ends with '.'"
    for part in name.split("/"):
        if not part:
            return "an empty part: a leading or trailing '/', or '//'"
        if part.startswith("."):
            return "a part starting with '.'"
        if part.endswith(".lock"):
            return "a part ending with '.lock'"
    return ""


def _split_url(url: str) -> SplitResult | None:
    """``urlsplit(url)``, or None when it is not a URL at all (a bracket left open, an odd character)."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return None
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _port_ok(parts: SplitResult) -> bool:
    """Whether the URL's port, if any, is a number from 1 to 65535."""
    try:
        port = parts.port
    except ValueError:
        return False
    return port is None or port > 0


_OPENSSH_KEY = re.compile(
    rb"-----BEGIN OPENSSH PRIVATE KEY-----\s+([A-Za-z0-9+/=\s]+?)-----END OPENSSH PRIVATE KEY-----"
)
_PEM_KEY = re.compile(rb"-----BEGIN (RSA |EC |DSA |ENCRYPTED )?PRIVATE KEY-----")


def ssh_key_problem(data: bytes) -> str:
    """Why ``data`` is not a private key syncd can use without a passphrase, or "" when it is. The text
    never quotes the file (it may be a secret pasted in the wrong place)."""
    if len(data) > _MAX_SECRET_BYTES:
        return "is larger than 64 KiB: not a private key"
    if m := _OPENSSH_KEY.search(data):
        try:
            blob = base64.b64decode(b"".join(m.group(1).split()), validate=True)
        except ValueError:
            return "is not a readable OpenSSH private key (bad base64)"
        magic = b"openssh-key-v1\0"
        if not blob.startswith(magic) or len(blob) < len(magic) + 4:
            return "is not a readable OpenSSH private key"
        n = int.from_bytes(blob[len(magic) : len(magic) + 4], "big")
        cipher = blob[len(magic) + 4 : len(magic) + 4 + n]
        if cipher != b"none":
            return "is protected by a passphrase, which syncd cannot type: use a key without one"
        return ""
    if m := _PEM_KEY.search(data):
        if m.group(1) == b"ENCRYPTED " or b"Proc-Type: 4,ENCRYPTED" in data:
            return "is protected by a passphrase, which syncd cannot type: use a key without one"
        return ""
    return "is not a private key (expected an OpenSSH or PEM private key, as ssh-keygen writes)"


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")  # "_" is not DNS, but internal names use it


def host_problem(host: str) -> str:
    """Why ``host`` (a URL's host, brackets removed) cannot be connected to, or "" when it can: an IP
    address, or a DNS name in its ASCII form (labels of letters, digits and '-', punycode that decodes)."""
    try:
        ipaddress.ip_address(host)
        return ""
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return "the host name is empty or longer than 253 characters"
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            return (
                "the host is not a DNS name (labels of ASCII letters, digits and '-'; write an "
                "international name in its xn-- form) or an IP address"
            )
        if label.lower().startswith("xn--"):
            try:
                codecs.decode(label.encode(), "idna")
            except UnicodeError:
                return "the host has an xn-- label that is not valid punycode"
    return ""


def origin(url: str) -> tuple[str, str, int | None] | None:
    """``(scheme, host, port)`` of ``url``, the port defaulted by scheme; None when ``url`` has no host or
    a bad port. Credentials go only to the origin of the configured URL."""
    parts = _split_url(url)
    if parts is None or not parts.hostname or not _port_ok(parts):
        return None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname.lower(), parts.port or _DEFAULT_PORTS.get(scheme)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SourceSection(_Section):
    url: str
    branch: str = "main"
    path: str = ""
    ssh_key: str | None = None
    known_hosts: str | None = None
    username: str | None = None
    token_file: str | None = None
    allow_force_push: bool = False
    verify_signatures: str = "off"
    allowed_signers: str | None = None
    gpg_keyring: str | None = None


class ArtifactorySection(_Section):
    url: str
    token_file: str | None = None
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None


class ExportSection(_Section):
    root: str
    staging: str | None = None


class DownloadSection(_Section):
    concurrency: int = Field(default=4, ge=1, le=64)
    timeout: Duration = Field(default=60.0, strict=False)
    retries: int = Field(default=5, ge=1, le=100)
    backoff: Duration = Field(default=1.0, strict=False)
    backoff_max: Duration = Field(default=60.0, strict=False)
    segments: int = Field(default=4, ge=1, le=16)
    segment_min_size: Size = Field(default=64 << 20, strict=False)


class ScheduleSection(_Section):
    interval: Duration = Field(default=300.0, strict=False)
    jitter: ZeroOrDuration | None = Field(default=None, strict=False)


class StateSection(_Section):
    directory: str = "/var/lib/syncd"


class StatusSection(_Section):
    stale_after: Duration | None = Field(default=None, strict=False)


class MetricsSection(_Section):
    textfile: str | None = None


class HttpSection(_Section):
    listen: str | None = None
    trigger_secret_file: str | None = None


class SmtpSection(_Section):
    host: str
    port: int | None = Field(default=None, ge=1, le=65535)
    security: str = "starttls"
    username: str | None = None
    password_file: str | None = None
    from_: str = Field(alias="from")
    to: list[str]
    timeout: Duration = Field(default=30.0, strict=False)
    ca_file: str | None = None


class WebhookSection(_Section):
    url: str
    token_file: str | None = None
    hmac_secret_file: str | None = None
    timeout: Duration = Field(default=10.0, strict=False)
    ca_file: str | None = None


class VerifySection(_Section):
    interval: Duration | None = Field(default=None, strict=False)
    max_rate: float = Field(default=100.0, gt=0, strict=False)


class PruneSection(_Section):
    enabled: bool = False
    grace: Duration = Field(default=7 * 86400.0, strict=False)
    max_files: int = Field(default=100, ge=0)
    max_fraction: float = Field(default=0.05, ge=0, le=1, strict=False)


class NotifySection(_Section):
    events: list[str] = Field(default_factory=lambda: ["problem", "recovery"])
    repeat: ZeroOrDuration = Field(default=86400.0, strict=False)
    min_failures: int = Field(default=1, ge=1, le=1000)
    mail_authors: bool = False
    author_domains: list[str] = Field(default_factory=list)
    smtp: SmtpSection | None = None
    webhook: WebhookSection | None = None


# Every section of the file: its schema, and whether it must be present.
_SECTIONS: dict[str, tuple[type[_Section], bool]] = {
    "source": (SourceSection, True),
    "artifactory": (ArtifactorySection, True),
    "export": (ExportSection, True),
    "download": (DownloadSection, False),
    "schedule": (ScheduleSection, False),
    "state": (StateSection, False),
    "status": (StatusSection, False),
    "metrics": (MetricsSection, False),
    "http": (HttpSection, False),
    "notify": (NotifySection, False),
    "verify": (VerifySection, False),
    "prune": (PruneSection, False),
}
NOTIFY_EVENTS = ("problem", "recovery", "published")
SMTP_SECURITY = {"starttls": 587, "tls": 465, "none": 25}  # the default port of each


@dataclass(frozen=True)
class GitSource:
    """Where the manifests live and how to reach them."""

    url: str
    branch: str
    path: str
    ssh_key: Path | None
    known_hosts: Path | None
    username: str | None
    token: Secret | None
    allow_force_push: bool = False
    verify_signatures: str = "off"  # "off", "ssh" or "gpg": the head commit's signature must verify
    trust_file: Path | None = None  # allowed_signers (ssh) or gpg_keyring (gpg)


@dataclass(frozen=True)
class Artifactory:
    """The one origin assets are fetched from, and the credential that goes only there."""

    url: str
    token: Secret | None
    username: str | None
    password: Secret | None
    ca_file: Path | None


@dataclass(frozen=True)
class Smtp:
    """``[notify.smtp]``: the mail relay, and who gets the ops mail."""

    host: str
    port: int
    security: str  # "starttls", "tls" (implicit) or "none"
    username: str | None
    password: Secret | None
    sender: str  # the From: header ("from" in the file)
    to: tuple[str, ...]
    timeout: float
    ca_file: Path | None = None


@dataclass(frozen=True)
class Webhook:
    """``[notify.webhook]``: one JSON POST per message. Its URL often holds a secret in its path or
    query (Slack, Teams, Mattermost), so only :func:`webhook_origin` of it is ever logged (or shown by
    ``repr``)."""

    url: str = field(repr=False)
    token: Secret | None
    hmac_secret: Secret | None
    timeout: float
    ca_file: Path | None = None


@dataclass(frozen=True)
class Notify:
    """``[notify]``: what is announced (``events``), how often, and on which channels."""

    events: frozenset[str]
    repeat: float  # seconds; 0 = a problem is announced once
    min_failures: int
    mail_authors: bool
    author_domains: tuple[str, ...]
    smtp: Smtp | None
    webhook: Webhook | None


def webhook_origin(url: str) -> str:
    """What of a webhook URL may be shown: scheme, host and port (the path and query may be a secret)."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}"


@dataclass(frozen=True)
class Prune:
    """``[prune]``: whether files whose manifest entry is gone are removed, after how long, and the
    safety valves (a pass that would remove more than ``max_files`` files, or more than ``max_fraction``
    of the published files, removes nothing)."""

    enabled: bool = False
    grace: float = 7 * 86400.0
    max_files: int = 100
    max_fraction: float = 0.05


@dataclass(frozen=True)
class Config:
    """The validated configuration: every path absolute, every secret read."""

    path: Path
    source: GitSource
    artifactory: Artifactory
    export_root: Path
    staging: Path
    concurrency: int
    timeout: float
    state_dir: Path
    interval: float = 300.0
    jitter: float = 30.0
    retries: int = 5
    backoff: float = 1.0
    backoff_max: float = 60.0
    segments: int = 4  # [download] segments: ranged requests at once for one big file
    segment_min_size: int = 64 << 20  # [download] segment_min_size: smaller files come as one stream
    # [status] stale_after: no pass finished within it makes `syncd status` say stale (exit 3)
    stale_after: float = 3 * 300.0 + 600.0
    metrics_textfile: Path | None = None
    http_listen: tuple[str, int] | None = None  # (IP address, port) that `syncd run` serves
    trigger_secret: Secret | None = None  # POST /trigger exists only with this
    notify: Notify | None = None  # [notify]: mail and webhooks; None when the section is absent
    verify_interval: float | None = None  # [verify] interval: the whole export re-hashed once per it
    verify_max_rate: float = 100.0  # [verify] max_rate: MB/s that the periodic re-hash reads at most
    prune: Prune = field(default_factory=Prune)  # [prune]: off unless enabled
    # Problems that do not stop syncd (plain http:// with credentials), each as "at 'section.key': …";
    # check-config prints them and a pass logs them as config_insecure.
    warnings: tuple[str, ...] = ()


def config_path(cli_value: str | None) -> Path:
    """The config file to use: ``-c`` wins over ``$SYNCD_CONFIG``, which wins over the default."""
    return Path(cli_value or os.environ.get("SYNCD_CONFIG") or DEFAULT_PATH)


def load(path: Path, *, secrets: bool = True) -> Config:
    """Read, validate and resolve ``path``; raise :class:`ConfigError` with every problem at once.

    With ``secrets=False`` (``syncd status``, which may run as another user than the daemon and needs
    no credential) secret files are neither checked nor read: each secret is an empty :class:`Secret`."""
    shown = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(shown, ["the file does not exist"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(shown, [f"cannot read the file: {_os_reason(exc)}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(shown, [f"not valid TOML: {exc}"]) from None
    except RecursionError:
        raise ConfigError(shown, ["not valid TOML: nested too deeply"]) from None
    sections, problems = _validate_sections(raw)
    return _Resolver(path, problems, secrets=secrets).build(sections)


TOKEN_FILE_ENV = "SYNCD_ARTIFACTORY_TOKEN_FILE"  # noqa: S105 - the name of a variable, not a secret
_FLAG_NAMES = {"artifactory.url": "--artifactory", "artifactory.token_file": "--token-file"}


def artifactory_from_flags(url: str, token_file: str | None) -> tuple[Artifactory, list[str]]:
    """``--artifactory URL [--token-file FILE]``: an :class:`Artifactory` for the commands an ML engineer
    runs on a laptop (``syncd manifest new``, ``syncd validate --remote``), where there is no syncd
    config. ``token_file`` defaults to ``$SYNCD_ARTIFACTORY_TOKEN_FILE``; it is checked as the config's
    ``token_file`` is (a regular file only its owner can read, one printable line). Raises
    :class:`ConfigError` naming the flag, never quoting the secret; returns the warnings too (a token
    sent over plain http://)."""
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV) or None
    resolver = _Resolver(Path.cwd() / "syncd", [])
    art = resolver._artifactory(ArtifactorySection(url=url, token_file=token_file))
    problems, warnings = resolver.problems, resolver.warnings
    for key, flag in _FLAG_NAMES.items():
        problems = [p.replace(f"at '{key}'", f"at '{flag}'") for p in problems]
        warnings = [w.replace(f"at '{key}'", f"at '{flag}'") for w in warnings]
    if problems:
        raise ConfigError("command line", problems)
    assert art is not None
    return art, warnings


def _validate_sections(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Validate each section on its own, so one bad section does not hide another's problems."""
    problems = [
        f"at '{name}': unknown section (check the spelling; see docs/configuration.md)"
        for name in raw
        if name not in _SECTIONS
    ]
    sections: dict[str, Any] = {}
    for name, (model, required) in _SECTIONS.items():
        if name not in raw:
            if required:
                problems.append(f"at '{name}': required section is missing")
            elif name != "notify":  # no [notify]: nothing is announced
                sections[name] = model()
            continue
        if not isinstance(raw[name], dict):
            problems.append(f"at '{name}': must be a [{name}] table")
            continue
        try:
            sections[name] = model.model_validate(raw[name])
        except ValidationError as exc:
            problems += _pydantic_problems(exc, name)
    return sections, problems


def _pydantic_problems(exc: ValidationError, section: str) -> list[str]:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join([section, *(str(p) for p in err["loc"])])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg.removeprefix("Value error, ")
        problems.append(f"at '{where}': {msg}")
    return problems


def _seconds(value: float) -> str:
    """A duration for a message: "250ms", "1.5s"."""
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


def _nearest_existing(path: Path) -> Path | None:
    """``path`` or its nearest ancestor that exists (where a mkdir of ``path`` would land); None when
    one cannot be inspected."""
    for candidate in (path, *path.parents):
        try:
            candidate.stat()
        except FileNotFoundError:
            continue
        except OSError:
            return None
        return candidate
    return None


def _os_reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


class _Resolver:
    """Turns the parsed file into a :class:`Config`, collecting problems instead of stopping early."""

    def __init__(self, path: Path, problems: list[str], *, secrets: bool = True) -> None:
        self.path = path
        self.secrets = secrets
        self.base = path.resolve().parent
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        self.secret_base = Path(creds) if creds else self.base
        self.problems = problems
        self.warnings: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"at '{where}': {message}")

    def build(self, sections: dict[str, Any]) -> Config:
        """Check every section that passed its schema; raise with all problems, or build the Config."""
        source = self._source(sections["source"]) if "source" in sections else None
        art = self._artifactory(sections["artifactory"]) if "artifactory" in sections else None
        export: ExportSection | None = sections.get("export")
        root = staging = None
        if export is not None:
            root = self.plain_path(export.root)
            staging = self.plain_path(export.staging) if export.staging else root / ".syncd-staging"
            if not Path(export.root).is_absolute():
                self.problem("export.root", "must be an absolute path")
            self._check_staging(root, staging, explicit=export.staging is not None)
        self._check_durations(sections.get("download"), sections.get("schedule"))
        textfile = self._textfile(sections.get("metrics"))
        listen, trigger = self._http(sections.get("http"))
        notify = self._notify(sections["notify"]) if sections.get("notify") is not None else None
        verify: VerifySection = sections.get("verify") or VerifySection()
        if verify.interval is not None and verify.interval < 3600:
            self.problem("verify.interval", "must be at least 1h (the whole export is re-hashed once per it)")
        prune: PruneSection = sections.get("prune") or PruneSection()
        if self.problems:
            raise ConfigError(str(self.path), self.problems)
        assert source and art and export and root and staging
        download: DownloadSection = sections["download"]
        state: StateSection = sections["state"]
        schedule: ScheduleSection = sections["schedule"]
        jitter = schedule.interval / 10 if schedule.jitter is None else schedule.jitter
        status: StatusSection = sections["status"]
        stale = status.stale_after if status.stale_after is not None else 3 * schedule.interval + 600
        return Config(
            path=self.path,
            source=source,
            artifactory=art,
            export_root=root,
            staging=staging,
            concurrency=download.concurrency,
            timeout=download.timeout,
            retries=download.retries,
            backoff=download.backoff,
            backoff_max=download.backoff_max,
            segments=download.segments,
            segment_min_size=download.segment_min_size,
            state_dir=self.plain_path(state.directory),
            interval=schedule.interval,
            jitter=jitter,
            stale_after=stale,
            metrics_textfile=textfile,
            http_listen=listen,
            trigger_secret=trigger,
            notify=notify,
            verify_interval=verify.interval,
            verify_max_rate=verify.max_rate,
            prune=Prune(prune.enabled, prune.grace, prune.max_files, prune.max_fraction),
            warnings=tuple(self.warnings),
        )

    def _check_staging(self, root: Path, staging: Path, *, explicit: bool) -> None:
        """Staging is emptied every pass and renamed from: never the root or above it, never on another
        file system than the root (checked when the root exists; check-config works before the mount)."""
        real_root, real_staging = Path(os.path.realpath(root)), Path(os.path.realpath(staging))
        if explicit and real_staging == real_root:
            self.problem("export.staging", "must not be the export root itself")
            return
        if explicit and real_staging in real_root.parents:
            self.problem(
                "export.staging",
                f"{staging} contains the export root; syncd empties its staging directory every pass",
            )
            return
        try:
            root_dev = root.stat().st_dev
        except OSError:
            return  # no root yet (the mount is missing): the pass reports it, not the config
        existing = _nearest_existing(staging)
        if existing is not None and existing.stat().st_dev != root_dev:
            self.problem(
                "export.staging",
                f"{staging} is on another file system than export.root ({root}): the rename into the "
                "export would not be atomic; use a directory on the export's file system",
            )

    def _check_durations(self, d: DownloadSection | None, s: ScheduleSection | None) -> None:
        """Durations that parse but make no sense together, or are too short to be meant."""
        if d is not None:
            if d.timeout < MIN_TIMEOUT:
                self.problem("download.timeout", f"must be at least 1s (got {_seconds(d.timeout)})")
            if d.backoff > d.backoff_max:
                self.problem(
                    "download.backoff",
                    f"must not be longer than download.backoff_max ({_seconds(d.backoff)} > "
                    f"{_seconds(d.backoff_max)})",
                )
        if s is not None:
            if s.interval < MIN_INTERVAL:
                self.problem("schedule.interval", f"must be at least 100ms (got {_seconds(s.interval)})")
            elif s.jitter is not None and s.jitter >= s.interval:
                self.problem(
                    "schedule.jitter",
                    f"must be shorter than schedule.interval ({_seconds(s.jitter)} >= "
                    f"{_seconds(s.interval)})",
                )

    def _textfile(self, m: MetricsSection | None) -> Path | None:
        """``[metrics] textfile``: an absolute ``*.prom`` path (node_exporter reads only those)."""
        if m is None or m.textfile is None:
            return None
        path = Path(m.textfile)
        if not path.is_absolute():
            self.problem("metrics.textfile", "must be an absolute path")
        elif not path.name.endswith(".prom") or path.name == ".prom":
            self.problem(
                "metrics.textfile",
                f"{path.name!r} must end in '.prom' (node_exporter's textfile collector reads only those)",
            )
        else:
            return Path(os.path.normpath(path))
        return None

    def _http(self, h: HttpSection | None) -> tuple[tuple[str, int] | None, Secret | None]:
        """``[http]``: ``listen`` is ``IP:port`` (``[IPv6]:port``); ``trigger_secret_file`` needs it."""
        if h is None or h.listen is None:
            if h is not None and h.trigger_secret_file is not None:
                self.problem("http.trigger_secret_file", "has no effect without [http] listen")
            return None, None
        listen = listen_address(h.listen)
        if listen is None:
            self.problem(
                "http.listen",
                f'{h.listen!r} is not an IP address and port such as "127.0.0.1:9847" or "[::1]:9847" '
                "(a host name is not accepted: syncd binds exactly the address given)",
            )
        trigger = None
        if h.trigger_secret_file is not None:
            trigger = self.read_secret("http.trigger_secret_file", h.trigger_secret_file)
        return listen, trigger

    def _notify(self, n: NotifySection) -> Notify | None:
        """``[notify]`` and its channels: at least one channel; every address and URL checked."""
        for event in n.events:
            if event not in NOTIFY_EVENTS:
                self.problem("notify.events", f"unknown event {event!r} (one of: {', '.join(NOTIFY_EVENTS)})")
        if not n.events:
            self.problem("notify.events", 'is empty: list what to announce, such as ["problem", "recovery"]')
        if n.smtp is None and n.webhook is None:
            self.problem("notify", "configures no channel: add [notify.smtp] or [notify.webhook]")
        for i, domain in enumerate(n.author_domains):
            if why := host_problem(domain):
                self.problem(f"notify.author_domains.{i}", f"{domain!r}: {why}")
        if n.mail_authors and not n.author_domains:
            self.problem(
                "notify.author_domains",
                "must list the mail domains of commit authors who may be mailed (mail_authors = true); "
                "an author e-mail in git is whatever the author typed",
            )
        if n.mail_authors and n.smtp is None:
            self.problem("notify.mail_authors", "needs [notify.smtp]")
        smtp = self._smtp(n.smtp) if n.smtp is not None else None
        webhook = self._webhook(n.webhook) if n.webhook is not None else None
        return Notify(
            events=frozenset(n.events),
            repeat=n.repeat,
            min_failures=n.min_failures,
            mail_authors=n.mail_authors,
            author_domains=tuple(d.lower().rstrip(".") for d in n.author_domains),
            smtp=smtp,
            webhook=webhook,
        )

    def _smtp(self, m: SmtpSection) -> Smtp:
        if why := host_problem(m.host):
            self.problem("notify.smtp.host", f"{m.host!r}: {why}")
        if m.security not in SMTP_SECURITY:
            self.problem(
                "notify.smtp.security",
                f"{m.security!r} is not one of: starttls, tls (implicit, port 465), none",
            )
        if m.timeout < MIN_TIMEOUT:
            self.problem("notify.smtp.timeout", f"must be at least 1s (got {_seconds(m.timeout)})")
        password = None
        if (m.username is None) != (m.password_file is None):
            missing = "password_file" if m.password_file is None else "username"
            self.problem(f"notify.smtp.{missing}", "username and password_file go together")
        elif m.password_file is not None:
            password = self.read_secret("notify.smtp.password_file", m.password_file)
            if m.security == "none" and not _loopback(m.host):
                self.warnings.append(
                    "at 'notify.smtp.security': \"none\" sends the SMTP password unencrypted; "
                    'use "starttls" or "tls"'
                )
        if m.username is not None and not _basic_user_ok(m.username):
            self.problem("notify.smtp.username", "must be printable ASCII without spaces or ':'")
        if why := address_problem(m.from_, display=True):
            self.problem("notify.smtp.from", why)
        if not m.to:
            self.problem("notify.smtp.to", "lists no recipient")
        for i, to in enumerate(m.to):
            if why := address_problem(to, display=True):
                self.problem(f"notify.smtp.to.{i}", why)
        return Smtp(
            host=m.host,
            port=m.port or SMTP_SECURITY.get(m.security, 25),
            security=m.security,
            username=m.username,
            password=password,
            sender=m.from_,
            to=tuple(m.to),
            timeout=m.timeout,
            ca_file=self._ca_file("notify.smtp.ca_file", m.ca_file),
        )

    def _webhook(self, w: WebhookSection) -> Webhook:
        where = "notify.webhook.url"  # never quoted: its path or query is often the secret
        parts = _split_url(w.url)
        if parts is None or parts.scheme not in ("https", "http") or not parts.hostname:
            self.problem(where, "must be an http:// or https:// URL with a host (not shown)")
        else:
            if parts.username is not None or parts.password is not None:
                self.problem(where, "must not carry credentials; use token_file")
            if "#" in w.url:
                self.problem(where, "must not have a fragment")
            if not _port_ok(parts):
                self.problem(where, "has an invalid port (a number from 1 to 65535)")
            elif why := host_problem(parts.hostname):
                self.problem(where, why)
        if w.timeout < MIN_TIMEOUT:
            self.problem("notify.webhook.timeout", f"must be at least 1s (got {_seconds(w.timeout)})")
        token = self.read_secret("notify.webhook.token_file", w.token_file) if w.token_file else None
        hmac_secret = (
            self.read_secret("notify.webhook.hmac_secret_file", w.hmac_secret_file)
            if w.hmac_secret_file
            else None
        )
        if w.url.lower().startswith("http://") and parts is not None and not _loopback(parts.hostname or ""):
            self.warnings.append(
                "at 'notify.webhook.url': plain http:// sends the messages (and any token) unencrypted; "
                "use https://"
            )
        return Webhook(
            url=w.url,
            token=token,
            hmac_secret=hmac_secret,
            timeout=w.timeout,
            ca_file=self._ca_file("notify.webhook.ca_file", w.ca_file),
        )

    def _ca_file(self, where: str, value: str | None) -> Path | None:
        """An extra CA bundle (PEM) to trust besides the system store, or None."""
        if value is None:
            return None
        path = self.plain_path(value)
        if not path.is_file():
            self.problem(where, f"{path} does not exist")
        elif not _pem_certificates_load(path):
            self.problem(
                where, f"{path} cannot be read or holds no PEM certificate (a CA bundle in PEM is expected)"
            )
        return path

    def plain_path(self, value: str) -> Path:
        return Path(os.path.normpath(self.base / value))

    def secret_path(self, value: str) -> Path:
        return Path(os.path.normpath(self.secret_base / value))

    def read_secret(self, where: str, value: str) -> Secret | None:
        """Read the secret file ``value`` for key ``where``; on any problem record it (the file named, the
        secret never quoted) and return None."""
        if not self.secrets:
            return Secret("")
        path = self.secret_path(value)
        if not self.check_secret_file(where, path):
            return None
        try:
            with path.open("rb") as fh:
                data = fh.read(_MAX_SECRET_BYTES + 1)
        except OSError as exc:
            self.problem(where, f"cannot read {path}: {_os_reason(exc)}")
            return None
        if len(data) > _MAX_SECRET_BYTES:
            self.problem(where, f"{path} is larger than 64 KiB: not a secret file")
            return None
        text, why = secret_value(data)
        if why:
            hint = "" if why == "is empty" else "; a secret must be one line of printable ASCII (not shown)"
            self.problem(where, f"{path} {why}{hint}")
            return None
        return Secret(text)

    def check_secret_file(self, where: str, path: Path) -> bool:
        """Whether ``path`` is a regular file that only the user running syncd can read and change."""
        try:
            st = path.stat()
        except OSError as exc:
            # Until a file is found there, no part of the configured name is echoed: a common slip is
            # pasting the secret itself here (a long token gives ENAMETOOLONG, one with '/' ENOENT).
            reason = "no such file" if isinstance(exc, FileNotFoundError) else _os_reason(exc)
            self.problem(
                where,
                f"{reason} (a relative name is looked up in {self.secret_base}; the key names a file "
                "holding the secret, not the secret itself; the name is not shown)",
            )
            return False
        if not stat.S_ISREG(st.st_mode):
            self.problem(where, f"{path} is not a regular file")
            return False
        if st.st_mode & 0o077:
            self.problem(
                where,
                f"{path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run: chmod 600 {path}",
            )
            return False
        euid = os.geteuid()
        if st.st_uid != euid:
            # Another user could replace the secret (or read it): ssh refuses such a key too.
            self.problem(
                where,
                f"{path} is owned by uid {st.st_uid}, not by the user running syncd (uid {euid}); "
                f"run: chown {euid} {path}",
            )
            return False
        return True

    def _check_ssh_key(self, path: Path) -> None:
        """An ssh key must be an unencrypted private key: syncd has no one to type a passphrase."""
        try:
            with path.open("rb") as fh:
                data = fh.read(_MAX_SECRET_BYTES + 1)
        except OSError as exc:
            self.problem("source.ssh_key", f"cannot read {path}: {_os_reason(exc)}")
            return
        why = ssh_key_problem(data)
        if why:
            self.problem("source.ssh_key", f"{path} {why}")

    def _source_url(self, url: str) -> SplitResult | None:
        """Check ``source.url``; return its parts, or None when nothing else about the source can be
        checked. Messages never quote the URL: its userinfo may be a token."""
        where = "source.url"
        parts = _split_url(url)
        if parts is None:
            self.problem(where, "is not a URL (spaces, control characters or a bad [host])")
            return None
        if parts.scheme not in ("ssh", "https", "http", "file"):
            self.problem(where, "must start with ssh://, https://, http:// or file://")
            return None
        if parts.password is not None:
            self.problem(where, "must not carry a password; put the token in source.token_file")
        elif parts.username is not None and parts.scheme != "ssh":
            self.problem(
                where,
                "must not carry a user name (a token there would be logged); "
                "use source.username and source.token_file",
            )
        elif parts.username is not None and not _PLAIN_SSH_USER.fullmatch(parts.username):
            self.problem(where, "the ssh user name must be a plain name such as git@")
        if "?" in url or "#" in url:
            self.problem(where, "must not have a query or fragment")
        if not _port_ok(parts):
            self.problem(where, "has an invalid port (a number from 1 to 65535)")
        if parts.scheme != "file" and not parts.hostname:
            self.problem(where, "must name a host")
        elif parts.scheme == "file" and parts.hostname not in (None, "", "localhost"):
            self.problem(where, "a file:// URL names no host: file:///path/to/repo.git")
        elif parts.scheme != "file" and (why := host_problem(parts.hostname or "")):
            self.problem(where, why)
        return parts

    def _source(self, s: SourceSection) -> GitSource | None:
        parts = self._source_url(s.url)
        if parts is None:
            return None
        scheme = parts.scheme
        why = branch_problem(s.branch)
        if why:
            self.problem("source.branch", f"{s.branch[:100]!r} is not a valid branch name ({why})")
        path = s.path.strip("/")
        if ".." in path.split("/"):
            self.problem("source.path", "must not contain '..'")
        ssh_key = known_hosts = None
        token = None
        if scheme == "ssh":
            if s.ssh_key is None:
                self.problem("source.ssh_key", "required for an ssh:// url")
            else:
                ssh_key = self.secret_path(s.ssh_key)
                if self.secrets and self.check_secret_file("source.ssh_key", ssh_key):
                    self._check_ssh_key(ssh_key)
            if s.known_hosts is None:
                self.problem(
                    "source.known_hosts",
                    "required for an ssh:// url: unknown or changed host keys are refused",
                )
            else:
                known_hosts = self.plain_path(s.known_hosts)
                if not known_hosts.is_file():
                    self.problem("source.known_hosts", f"{known_hosts} does not exist")
        else:
            for key in ("ssh_key", "known_hosts"):
                if getattr(s, key) is not None:
                    self.problem(f"source.{key}", "only for an ssh:// url")
        for key in ("username", "token_file"):
            if getattr(s, key) is not None and scheme not in ("https", "http"):
                self.problem(f"source.{key}", "only for an https:// (or http://) url")
        if s.username is not None and not _basic_user_ok(s.username):
            self.problem("source.username", "must be printable ASCII without spaces or ':'")
        if s.token_file is not None and scheme in ("https", "http"):
            token = self.read_secret("source.token_file", s.token_file)
            if scheme == "http":
                self.warnings.append(
                    "at 'source.url': plain http:// sends source.token_file's token unencrypted; use https://"
                )
        mode, trust_file = self._signatures(s)
        return GitSource(
            url=s.url,
            branch=s.branch,
            path=path,
            ssh_key=ssh_key,
            known_hosts=known_hosts,
            username=parts.username if scheme == "ssh" else s.username,
            token=token,
            allow_force_push=s.allow_force_push,
            verify_signatures=mode,
            trust_file=trust_file,
        )

    def _signatures(self, s: SourceSection) -> tuple[str, Path | None]:
        """``[source] verify_signatures`` and its trust file: an empty, unreadable or missing one is a
        problem (never "nothing is trusted" silently), as is a missing ssh-keygen or gpgv."""
        from syncd import signatures

        mode = s.verify_signatures
        wanted = {"ssh": "allowed_signers", "gpg": "gpg_keyring"}
        if mode not in ("off", *wanted):
            self.problem("source.verify_signatures", 'must be "off", "ssh" or "gpg"')
            return "off", None
        for m, key in wanted.items():
            if getattr(s, key) is not None and mode != m:
                self.problem(f"source.{key}", f'only with verify_signatures = "{m}"')
        if mode == "off":
            return mode, None
        key = wanted[mode]
        value = getattr(s, key)
        if value is None:
            self.problem(f"source.{key}", f'required with verify_signatures = "{mode}"')
            return mode, None
        path = self.plain_path(value)
        why = signatures.trust_file_problem(mode, path) or signatures.tool_problem(mode)
        if why:
            self.problem(f"source.{key}", why)
        return mode, path

    def _artifactory_url(self, url: str) -> None:
        """Check ``artifactory.url`` (messages never quote it: its userinfo may be a token)."""
        where = "artifactory.url"
        parts = _split_url(url)
        if parts is None:
            self.problem(where, "must be an http:// or https:// URL with a host")
            return
        if parts.scheme not in ("https", "http") or not parts.hostname:
            self.problem(where, "must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            self.problem(where, "must not carry credentials; use token_file or password_file")
        if "?" in url or "#" in url:
            self.problem(where, "must not have a query or fragment")
        if not _port_ok(parts):
            self.problem(where, "has an invalid port (a number from 1 to 65535)")
        if parts.hostname and (why := host_problem(parts.hostname)):
            self.problem(where, why)

    def _artifactory(self, a: ArtifactorySection) -> Artifactory | None:
        self._artifactory_url(a.url)
        token = password = None
        if a.token_file is not None:
            if a.username is not None or a.password_file is not None:
                self.problem("artifactory.token_file", "use either token_file or username + password_file")
            token = self.read_secret("artifactory.token_file", a.token_file)
        elif (a.username is None) != (a.password_file is None):
            missing = "password_file" if a.password_file is None else "username"
            self.problem(f"artifactory.{missing}", "username and password_file go together")
        elif a.password_file is not None:
            password = self.read_secret("artifactory.password_file", a.password_file)
        if a.username is not None and not _basic_user_ok(a.username):
            self.problem("artifactory.username", "must be printable ASCII without spaces or ':'")
        if (token or password) and a.url.lower().startswith("http://"):
            self.warnings.append(
                "at 'artifactory.url': plain http:// sends the Artifactory credentials unencrypted; "
                "use https://"
            )
        ca_file = self._ca_file("artifactory.ca_file", a.ca_file)
        return Artifactory(
            url=a.url.rstrip("/"),
            token=token,
            username=a.username,
            password=password,
            ca_file=ca_file,
        )


def _pem_certificates_load(path: Path) -> bool:
    """Whether OpenSSL can load ``path`` as CA certificates (what the TLS context does with it)."""
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError):
        return False
    return True


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def address_problem(text: str, *, display: bool = False) -> str:
    """Why ``text`` is not one mail address (``user@example.com``, with ``display`` also ``Name <…>``),
    or "" when it is. Parsed as the header of an e-mail would be (``email.headerregistry``)."""
    from email.policy import default

    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text) or "," in text:
        return f"{text!r} is not one mail address (a control character or a ',')"
    example = '"syncd <syncd@nfs01.example.com>"' if display else '"ops@example.com"'
    try:
        header = default.header_factory("To", text)
        addresses = header.addresses
    except Exception:  # the header parser's own errors: any of them means "not an address"
        return f"{text!r} is not a mail address such as {example}"
    if header.defects or len(addresses) != 1:
        return f"{text!r} is not a mail address such as {example}"
    parsed = addresses[0]
    if (parsed.display_name and not display) or not parsed.username or not parsed.domain:
        return f"{text!r} is not a mail address such as {example}"
    if why := host_problem(parsed.domain):
        return f"{text!r}: its domain: {why}"
    return ""


def listen_address(text: str) -> tuple[str, int] | None:
    """``"127.0.0.1:9847"`` or ``"[::1]:9847"`` → ``(address, port)``; None unless an IP and a port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not port.isascii() or not 0 < int(port) < 65536:
        return None
    bracketed = host.startswith("[") and host.endswith("]")
    host = host[1:-1] if bracketed else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if (ip.version == 6) != bracketed:
        return None
    return str(ip), int(port)


def _basic_user_ok(name: str) -> bool:
    """Whether ``name`` can be the user of HTTP basic auth: printable ASCII, no blank, no ':'."""
    return bool(name) and all(0x21 <= ord(c) <= 0x7E and c != ":" for c in name)


def describe(cfg: Config) -> Mapping[str, Any]:
    """A secret-free summary of the configuration, for ``check-config`` and start-up logs."""
    return {
        "source": cfg.source.url,
        "branch": cfg.source.branch,
        "path": cfg.source.path or ".",
        "artifactory": cfg.artifactory.url,
        "export_root": str(cfg.export_root),
        "staging": str(cfg.staging),
        "state_dir": str(cfg.state_dir),
        "concurrency": cfg.concurrency,
        "segments": cfg.segments,
        "segment_min_size": cfg.segment_min_size,
        "timeout_s": cfg.timeout,
        "retries": cfg.retries,
        "interval_s": cfg.interval,
        "jitter_s": cfg.jitter,
        "stale_after_s": cfg.stale_after,
        "metrics_textfile": str(cfg.metrics_textfile) if cfg.metrics_textfile else None,
        "http_listen": _shown_listen(cfg.http_listen),
        "trigger": cfg.trigger_secret is not None,
        "notify": _shown_notify(cfg.notify),
        "verify_signatures": (
            f"{cfg.source.verify_signatures} ({cfg.source.trust_file})"
            if cfg.source.trust_file
            else cfg.source.verify_signatures
        ),
        "verify_interval_s": cfg.verify_interval,
        "prune": (
            f"after {cfg.prune.grace:g}s, at most {cfg.prune.max_files} files and "
            f"{cfg.prune.max_fraction:.0%} a pass"
            if cfg.prune.enabled
            else "off"
        ),
    }


def _shown_notify(n: Notify | None) -> str | None:
    if n is None:
        return None
    channels = []
    if n.smtp is not None:
        channels.append(f"mail via {n.smtp.host}:{n.smtp.port} ({n.smtp.security}) to {len(n.smtp.to)}")
    if n.webhook is not None:
        channels.append(f"webhook to {webhook_origin(n.webhook.url)}")
    return f"{', '.join(sorted(n.events))} by " + " and ".join(channels)


def _shown_listen(listen: tuple[str, int] | None) -> str | None:
    if listen is None:
        return None
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
