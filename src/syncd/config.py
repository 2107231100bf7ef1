"""Load ``syncd.conf`` (TOML) into one frozen, typed :class:`Config`, or fail with every problem at once.

In: a path (``-c``, ``$SYNCD_CONFIG`` or ``/etc/syncd/syncd.conf``). Out: a :class:`Config` the rest of
syncd trusts. Raises :class:`~syncd.errors.ConfigError` listing each problem as ``at 'section.key': …``.

Path rules: a relative secret path (``ssh_key``, ``token_file``, ``password_file``) is resolved against
``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``) when set, else against the config file's directory;
other relative paths against the config file's directory. A secret file readable by group or others is
refused, as ssh refuses such a private key. Secret values are held in :class:`Secret`, whose ``repr`` and
``str`` never show the value.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from syncd.errors import ConfigError

DEFAULT_PATH = "/etc/syncd/syncd.conf"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


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


Duration = Annotated[float, BeforeValidator(parse_duration)]
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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SourceSection(_Section):
    url: str
    branch: str = "main"
    path: str = ""
    ssh_key: str | None = None
    known_hosts: str | None = None
    token_file: str | None = None
    allow_force_push: bool = False


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


class ScheduleSection(_Section):
    interval: Duration = Field(default=300.0, strict=False)
    jitter: ZeroOrDuration | None = Field(default=None, strict=False)


class StateSection(_Section):
    directory: str = "/var/lib/syncd"


# Every section of the file: its schema, and whether it must be present.
_SECTIONS: dict[str, tuple[type[_Section], bool]] = {
    "source": (SourceSection, True),
    "artifactory": (ArtifactorySection, True),
    "export": (ExportSection, True),
    "download": (DownloadSection, False),
    "schedule": (ScheduleSection, False),
    "state": (StateSection, False),
}


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


@dataclass(frozen=True)
class Artifactory:
    """The one origin assets are fetched from, and the credential that goes only there."""

    url: str
    token: Secret | None
    username: str | None
    password: Secret | None
    ca_file: Path | None


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


def config_path(cli_value: str | None) -> Path:
    """The config file to use: ``-c`` wins over ``$SYNCD_CONFIG``, which wins over the default."""
    return Path(cli_value or os.environ.get("SYNCD_CONFIG") or DEFAULT_PATH)


def load(path: Path) -> Config:
    """Read, validate and resolve ``path``; raise :class:`ConfigError` with every problem at once."""
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
    return _Resolver(path, problems).build(sections)


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
            else:
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


def _os_reason(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


class _Resolver:
    """Turns the parsed file into a :class:`Config`, collecting problems instead of stopping early."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.base = path.resolve().parent
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        self.secret_base = Path(creds) if creds else self.base
        self.problems = problems

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
            if not Path(export.root).is_absolute():
                self.problem("export.root", "must be an absolute path")
            staging = self.plain_path(export.staging) if export.staging else root / ".syncd-staging"
            if export.staging is not None and staging.resolve() == root.resolve():
                self.problem("export.staging", "must not be the export root itself")
        if self.problems:
            raise ConfigError(str(self.path), self.problems)
        assert source and art and export and root and staging
        download: DownloadSection = sections["download"]
        state: StateSection = sections["state"]
        schedule: ScheduleSection = sections["schedule"]
        jitter = schedule.interval / 10 if schedule.jitter is None else schedule.jitter
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
            backoff_max=max(download.backoff_max, download.backoff),
            state_dir=self.plain_path(state.directory),
            interval=schedule.interval,
            jitter=jitter,
        )

    def plain_path(self, value: str) -> Path:
        return Path(os.path.normpath(self.base / value))

    def secret_path(self, value: str) -> Path:
        return Path(os.path.normpath(self.secret_base / value))

    def read_secret(self, where: str, value: str) -> Secret | None:
        path = self.secret_path(value)
        if not self.check_secret_file(where, path):
            return None
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(where, f"cannot read {path}: {_os_reason(exc)}")
            return None
        if not text:
            self.problem(where, f"{path} is empty")
            return None
        return Secret(text)

    def check_secret_file(self, where: str, path: Path) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            # The configured name is not echoed: a common slip is pasting the secret itself here.
            self.problem(
                where,
                f"no such file in {path.parent} (the key names a file holding the secret, "
                "not the secret itself)",
            )
            return False
        except OSError as exc:
            self.problem(where, f"cannot read {path}: {_os_reason(exc)}")
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
        return True

    def _source(self, s: SourceSection) -> GitSource | None:
        parts = urlsplit(s.url)
        scheme = parts.scheme
        if scheme not in ("ssh", "https", "http", "file"):
            self.problem("source.url", "must start with ssh://, https://, http:// or file://")
            return None
        if parts.password:
            self.problem("source.url", "must not carry a password; put the token in source.token_file")
        if not s.branch or s.branch.startswith("-") or ".." in s.branch:
            self.problem("source.branch", f"{s.branch!r} is not a valid branch name")
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
                self.check_secret_file("source.ssh_key", ssh_key)
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
        if s.token_file is not None:
            if scheme in ("https", "http"):
                token = self.read_secret("source.token_file", s.token_file)
            else:
                self.problem("source.token_file", "only for an https:// (or http://) url")
        return GitSource(
            url=s.url,
            branch=s.branch,
            path=path,
            ssh_key=ssh_key,
            known_hosts=known_hosts,
            username=parts.username,
            token=token,
            allow_force_push=s.allow_force_push,
        )

    def _artifactory(self, a: ArtifactorySection) -> Artifactory | None:
        parts = urlsplit(a.url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            self.problem("artifactory.url", "must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            self.problem("artifactory.url", "must not carry credentials; use token_file or password_file")
        if parts.query or parts.fragment:
            self.problem("artifactory.url", "must not have a query or fragment")
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
        ca_file = None
        if a.ca_file is not None:
            ca_file = self.plain_path(a.ca_file)
            if not ca_file.is_file():
                self.problem("artifactory.ca_file", f"{ca_file} does not exist")
        return Artifactory(
            url=a.url.rstrip("/"),
            token=token,
            username=a.username,
            password=password,
            ca_file=ca_file,
        )


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
        "timeout_s": cfg.timeout,
        "retries": cfg.retries,
        "interval_s": cfg.interval,
        "jitter_s": cfg.jitter,
    }
