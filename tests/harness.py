"""A syncd world for end-to-end tests: a manifest repo, nginx as Artifactory, an export, a config.

``World.sync()`` runs the installed ``syncd`` command as a subprocess and returns its exit code, stdout
and the JSON log events it printed on stderr.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from servers import GitRepo, Nginx, make_asset

# The shape of an unencrypted OpenSSH private key (cipher "none"): enough for the config's key check, for
# tests that never connect with it.
SSH_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    + base64.b64encode(b"openssh-key-v1\0\0\0\0\x04none" + bytes(32)).decode()
    + "\n-----END OPENSSH PRIVATE KEY-----\n"
)


def examples(n: int) -> int:
    """How many generated examples a property test runs: ``n`` in CI, ``n * $SYNCD_SOAK`` in a soak run
    (``SYNCD_SOAK=20 scripts/test -k hostile``)."""
    return n * max(1, int(os.environ.get("SYNCD_SOAK", "1")))


def syncd_command() -> str:
    """The installed ``syncd`` entry point (next to this Python, else on PATH)."""
    beside = Path(sys.executable).parent / "syncd"
    if beside.exists():
        return str(beside)
    found = shutil.which("syncd")
    assert found, "syncd is not installed: pip install -e ."
    return found


@dataclass
class Run:
    """One finished ``syncd`` process."""

    code: int
    out: str
    err: str
    events: list[dict[str, Any]]

    def named(self, event: str) -> list[dict[str, Any]]:
        """The log events called ``event``."""
        return [e for e in self.events if e.get("event") == event]

    def one(self, event: str) -> dict[str, Any]:
        found = self.named(event)
        assert len(found) == 1, f"expected one {event!r}, got {found}\n{self.err}"
        return found[0]


def on_a_terminal(argv: list[str], timeout: float = 30) -> tuple[int, str]:
    """Run ``argv`` with stdout and stderr on a pseudo-terminal; its exit code and everything it drew."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    while select.select([master], [], [], timeout)[0]:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=timeout), out.decode(errors="replace")


def parse_events(text: str) -> list[dict[str, Any]]:
    """Every JSON object line of ``text``; any other line fails the test (logs are JSON only)."""
    events = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise AssertionError(f"stderr line is not JSON: {line!r}") from exc
    return events


@dataclass
class World:
    """Everything one end-to-end test needs, under ``base``."""

    base: Path
    repo: GitRepo
    nginx: Nginx
    auth: str = "bearer"
    extra_config: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.export = self.base / "export"
        self.export.mkdir(parents=True)
        self.state = self.base / "state"
        self.tag = uuid.uuid4().hex[:8]
        self.blobs = self.nginx.root / self.tag  # this test's "Artifactory repository"
        self.blobs.mkdir(parents=True)
        self.config_path = self.base / "etc" / "syncd.conf"
        self.config_path.parent.mkdir()
        token = self.config_path.parent / "artifactory.token"
        token.write_text(self.nginx.token + "\n")
        token.chmod(0o600)
        password = self.config_path.parent / "artifactory.password"
        password.write_text(self.nginx.password + "\n")
        password.chmod(0o600)
        self.write_config()

    @property
    def url(self) -> str:
        return {
            "bearer": self.nginx.bearer_url(),
            "basic": self.nginx.basic_url(),
            "open": self.nginx.open_url(),
        }[self.auth]

    def write_config(self, **sections: dict[str, Any]) -> Path:
        art: dict[str, Any] = {"url": self.url}
        if self.auth == "bearer":
            art["token_file"] = "artifactory.token"
        elif self.auth == "basic":
            art["username"] = self.nginx.user
            art["password_file"] = "artifactory.password"
        cfg: dict[str, dict[str, Any]] = {
            "source": {"url": self.repo.url, "branch": "main", "path": "assets", **self.source},
            "artifactory": art,
            "export": {"root": str(self.export)},
            "download": {"concurrency": 4, "timeout": "10s"},
            "state": {"directory": str(self.state)},
        }
        for name, values in {**self.extra_config, **sections}.items():
            cfg.setdefault(name, {}).update(values)
        self.config_path.write_text(to_toml(cfg))
        return self.config_path

    def asset(self, name: str, size: int, seed: int = 0) -> dict[str, Any]:
        """Upload a blob to "Artifactory"; return its manifest fields (source, sha256, size)."""
        sha, n = make_asset(self.blobs, name, size, seed)
        return {"source": f"{self.tag}/{name}", "sha256": sha, "size": n}

    def manifest(self, path: str, *assets: dict[str, Any]) -> None:
        """Write ``assets/<path>`` with one [[asset]] table per dict (not committed yet)."""
        self.repo.write(f"assets/{path}", manifest_text(*assets))

    def sync(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Run:
        """Run ``syncd sync -c CONFIG ARGS`` and collect its result."""
        return self.run("sync", "-c", str(self.config_path), *args, env=env, timeout=timeout)

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Run:
        full_env = {k: v for k, v in os.environ.items() if k not in ("SYNCD_CONFIG",)}
        full_env.update(env or {})
        proc = subprocess.run(
            [syncd_command(), *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        # Commands that run passes log JSON only; validate and check-config talk to people.
        events = parse_events(proc.stderr) if args[0] in ("sync", "run") else []
        return Run(proc.returncode, proc.stdout, proc.stderr, events)

    def staging_files(self) -> list[str]:
        """Names in the default staging directory, its lock file (held each pass) excluded."""
        staging = self.export / ".syncd-staging"
        names = os.listdir(staging) if staging.exists() else []
        return sorted(n for n in names if n != ".syncd-staging.lock")

    def export_files(self) -> list[str]:
        """Every file under the export (relative), syncd's own top-level ``.syncd*`` names (staging, the
        export lock) excluded."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.export):
            if dirpath == str(self.export):
                dirnames[:] = [d for d in dirnames if not d.startswith(".syncd")]
                filenames = [f for f in filenames if not f.startswith(".syncd")]
            out += [os.path.relpath(os.path.join(dirpath, f), self.export) for f in filenames]
        return sorted(out)


def toml_str(value: str) -> str:
    """Render ``value`` as a TOML basic string (control characters escaped)."""
    out = []
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return json.dumps(str(v))


def to_toml(cfg: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def manifest_text(*assets: dict[str, Any]) -> str:
    out = []
    for a in assets:
        out.append("[[asset]]")
        out += [f"{k} = {toml_value(v)}" for k, v in a.items()]
        out.append("")
    return "\n".join(out)
