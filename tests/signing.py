"""Signed commits for tests: real ed25519 SSH and OpenPGP keys, and commits signed by git itself.

Every tool runs isolated from the user's configuration: git with ``GIT_CONFIG_GLOBAL=/dev/null`` and
``GIT_CONFIG_NOSYSTEM=1`` and fixed identities, gpg with its own temporary ``GNUPGHOME``, no ssh-agent.
gpg starts a gpg-agent in each home; :func:`stop_gpg_agent` ends it (call it when the test is done).
Nothing here imports syncd.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pygit2

IDENTITY = {
    "GIT_AUTHOR_NAME": "Signing Test",
    "GIT_AUTHOR_EMAIL": "signer@example.com",
    "GIT_COMMITTER_NAME": "Signing Test",
    "GIT_COMMITTER_EMAIL": "signer@example.com",
}


@dataclass(frozen=True)
class SshKey:
    """An ed25519 key pair on disk; ``line`` is the public key line (``ssh-ed25519 AAAA... name``)."""

    private: Path
    public: Path
    line: str


@dataclass(frozen=True)
class GpgKey:
    """An OpenPGP signing key in its own gpg home."""

    home: Path
    fingerprint: str
    uid: str


def _env(**extra: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_CONFIG_NOSYSTEM": "1",
        **IDENTITY,
    }
    env.update(extra)
    return env


def _run(
    argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, stdin: bytes = b""
) -> bytes:
    done = subprocess.run(argv, cwd=cwd, env=env or _env(), input=stdin, capture_output=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"{argv} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")
    return done.stdout


def ssh_key(dir: Path, name: str) -> SshKey:
    """A new passphrase-less ed25519 key ``dir/name`` with comment ``name``."""
    dir.mkdir(parents=True, exist_ok=True)
    private = dir / name
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(private)])
    public = dir / f"{name}.pub"
    return SshKey(private, public, public.read_text().strip())


def allowed_signers(path: Path, entries: Iterable[tuple[str, SshKey, str]]) -> Path:
    """Write an allowed-signers file: one ``principal [options] key`` line per (principal, key, options)."""
    lines = [
        " ".join(part for part in (principal, options, key.line) if part)
        for principal, key, options in entries
    ]
    path.write_text("".join(line + "\n" for line in lines))
    return path


def gpg_home(
    dir: Path,
    uid: str = "Alice Example <alice@example.com>",
    *,
    expiry: str = "1y",
    faked_time: str | None = None,
) -> GpgKey:
    """A new ed25519 signing key in a new gpg home under ``dir`` (keep ``dir`` short: the agent's socket
    lives there). ``faked_time`` (e.g. ``20200101T000000``) creates it in the past, so ``expiry="1d"``
    makes a key that has already expired."""
    home = dir / f"gnupg{len(list(dir.glob('gnupg*'))) if dir.exists() else 0}"
    home.mkdir(parents=True, mode=0o700)
    argv = ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", uid, "ed25519", "sign", expiry]
    if faked_time is not None:
        argv[1:1] = ["--faked-system-time", faked_time]
    _run(argv, env=_gpg_env(home))
    listing = _run(["gpg", "--with-colons", "--list-keys", uid], env=_gpg_env(home)).decode()
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    return GpgKey(home, fpr, uid)


def _gpg_env(home: Path) -> dict[str, str]:
    return _env(GNUPGHOME=str(home), HOME=str(home))


def gpg_sign_in_past(key: GpgKey, data: bytes, when: str) -> bytes:
    """An armored detached signature over ``data`` made at the faked time ``when`` (for expired keys)."""
    argv = ["gpg", "--batch", "--faked-system-time", when, "-u", key.fingerprint, "--armor", "--detach-sign"]
    return _run(argv, env=_gpg_env(key.home), stdin=data)


def revoke(key: GpgKey) -> None:
    """Import the key's own revocation certificate (gpg stores it with a ``:`` guarding the armor)."""
    cert = (key.home / "openpgp-revocs.d" / f"{key.fingerprint}.rev").read_text()
    armored = cert.replace(":-----BEGIN PGP PUBLIC KEY BLOCK-----", "-----BEGIN PGP PUBLIC KEY BLOCK-----")
    _run(["gpg", "--batch", "--import"], env=_gpg_env(key.home), stdin=armored.encode())


def export_keyring(keys: Iterable[GpgKey], path: Path, *, armor: bool = False) -> Path:
    """Write the public keys as one binary keyring (``gpg --export``), or armored if asked."""
    data = b"".join(
        _run(["gpg", *(["--armor"] if armor else []), "--export", k.fingerprint], env=_gpg_env(k.home))
        for k in keys
    )
    path.write_bytes(data)
    return path


def stop_gpg_agent(key: GpgKey) -> None:
    """End the gpg-agent that gpg started for this key's home."""
    subprocess.run(
        ["gpgconf", "--kill", "gpg-agent"], env=_gpg_env(key.home), capture_output=True, timeout=30
    )


def init_repo(workdir: Path) -> Path:
    """A new git repository with branch ``main``."""
    workdir.mkdir(parents=True, exist_ok=True)
    _run(["git", "init", "-q", "-b", "main", str(workdir)])
    return workdir


def commit_signed(
    workdir: Path,
    message: str,
    *,
    ssh: SshKey | None = None,
    gpg: GpgKey | None = None,
    files: dict[str, str] | None = None,
    date: str | None = None,
) -> str:
    """Write ``files``, stage everything and commit, signed by ``ssh`` or ``gpg`` (or unsigned) as git
    signs; ``date`` (git's date formats, e.g. ``2024-01-01T00:00:00Z``) sets author and committer time.
    Initialises the repository if needed. Returns the commit id."""
    if not (workdir / ".git").exists():
        init_repo(workdir)
    for name, text in (files or {"README": message}).items():
        target = workdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    _run(["git", "add", "-A"], cwd=workdir)
    extra = {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date} if date else {}
    argv = ["git"]
    if ssh is not None:
        argv += [
            "-c",
            "gpg.format=ssh",
            "-c",
            f"user.signingKey={ssh.public}",
            "-c",
            "gpg.ssh.program=ssh-keygen",
        ]
    elif gpg is not None:
        argv += ["-c", f"user.signingKey={gpg.fingerprint}", "-c", "gpg.program=gpg"]
        extra.update(GNUPGHOME=str(gpg.home), HOME=str(gpg.home))
    argv += ["commit", "-q", "--allow-empty", "-m", message]
    if ssh is not None or gpg is not None:
        argv.append("-S")
    _run(argv, cwd=workdir, env=_env(**extra))
    return _run(["git", "rev-parse", "HEAD"], cwd=workdir).decode().strip()


def tamper(workdir: Path, commit: str) -> str:
    """Store a copy of ``commit`` whose message differs but whose ``gpgsig`` header is kept; its id."""
    raw = _run(["git", "cat-file", "commit", commit], cwd=workdir)
    head, sep, body = raw.partition(b"\n\n")
    assert sep, "a commit object has a blank line before its message"
    forged = head + sep + b"tampered: " + body
    argv = ["git", "hash-object", "-t", "commit", "-w", "--stdin", "--literally"]
    return _run(argv, cwd=workdir, stdin=forged).decode().strip()


def signed_parts(workdir: Path, commit: str) -> tuple[bytes | None, bytes | None, int]:
    """What the verifier is given, as pygit2 reads it: (signature, signed payload, committer time)."""
    repo = pygit2.Repository(str(workdir))
    obj = repo[commit]
    assert isinstance(obj, pygit2.Commit)
    signature, payload = obj.gpg_signature
    return signature, payload, obj.commit_time
