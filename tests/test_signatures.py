"""Commit signature checks against real ssh-keygen and gpgv, with commits signed by git itself."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signing import (
    GpgKey,
    SshKey,
    allowed_signers,
    commit_signed,
    export_keyring,
    gpg_home,
    gpg_sign_in_past,
    revoke,
    signed_parts,
    ssh_key,
    stop_gpg_agent,
    tamper,
)
from syncd.signatures import Status, Verdict, Verifier, tool_problem, trust_file_problem

pytestmark = pytest.mark.integration

IN_2024 = "2024-01-01T00:00:00Z"
Parts = tuple[bytes | None, bytes | None, int]


@dataclass(frozen=True)
class Ssh:
    dir: Path
    repo: Path
    alice: SshKey
    bob: SshKey
    carol: SshKey  # listed nowhere
    allowed: Path


@dataclass(frozen=True)
class Gpg:
    repo: Path
    alice: GpgKey
    old: GpgKey  # created 2020, expired after a day
    revoked: GpgKey
    by_revoked: Parts  # signed before the key was revoked
    stranger: GpgKey  # in no keyring
    keyring: Path


@pytest.fixture(scope="module")
def ssh(tmp_path_factory: pytest.TempPathFactory) -> Ssh:
    d = tmp_path_factory.mktemp("ssh")
    alice, bob, carol = (ssh_key(d / "keys", name) for name in ("alice", "bob", "carol"))
    allowed = allowed_signers(d / "allowed_signers", [("alice@example.com", alice, 'namespaces="git"')])
    return Ssh(d, d / "repo", alice, bob, carol, allowed)


@pytest.fixture(scope="module")
def gpg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gpg]:
    d = tmp_path_factory.mktemp("g")  # short: each gpg home holds its agent's socket
    alice = gpg_home(d)
    old = gpg_home(d, "Old Key <old@example.com>", expiry="1d", faked_time="20200101T000000")
    revoked = gpg_home(d, "Revoked Key <revoked@example.com>")
    stranger = gpg_home(d, "Stranger <stranger@example.com>")
    try:
        by_revoked = signed_parts(d / "repo", commit_signed(d / "repo", "by revoked", gpg=revoked))
        revoke(revoked)
        keyring = export_keyring([alice, old, revoked], d / "trusted.gpg")
        yield Gpg(d / "repo", alice, old, revoked, by_revoked, stranger, keyring)
    finally:
        for key in (alice, old, revoked, stranger):
            stop_gpg_agent(key)


@pytest.fixture(scope="module")
def ssh_verifier(ssh: Ssh) -> Verifier:
    return Verifier("ssh", ssh.allowed)


@pytest.fixture(scope="module")
def gpg_verifier(gpg: Gpg) -> Verifier:
    return Verifier("gpg", gpg.keyring)


@pytest.fixture(scope="module")
def ssh_good(ssh: Ssh) -> Parts:
    return signed_parts(ssh.repo, commit_signed(ssh.repo, "by alice", ssh=ssh.alice, date=IN_2024))


@pytest.fixture(scope="module")
def gpg_good(gpg: Gpg) -> Parts:
    return signed_parts(gpg.repo, commit_signed(gpg.repo, "by alice", gpg=gpg.alice))


def check(verifier: Verifier, parts: Parts) -> Verdict:
    signature, payload, when = parts
    return verifier.verify(signature, payload or b"", when)


def ssh_commit(ssh: Ssh, key: SshKey, date: str = IN_2024) -> Parts:
    return signed_parts(ssh.repo, commit_signed(ssh.repo, f"by {key.public.stem}", ssh=key, date=date))


def only(ssh: Ssh, name: str, key: SshKey, options: str, principal: str = "bob@example.com") -> Verifier:
    return Verifier("ssh", allowed_signers(ssh.dir / name, [(principal, key, options)]))


# -- SSH ---------------------------------------------------------------------------------------------


def test_ssh_good(ssh_verifier: Verifier, ssh_good: Parts) -> None:
    """A commit signed by a listed key is good, naming the principal and the key's SHA256 fingerprint."""
    verdict = check(ssh_verifier, ssh_good)
    assert verdict.status is Status.GOOD and verdict.ok
    assert verdict.signer == "alice@example.com"
    assert verdict.key.startswith("SHA256:") and len(verdict.key) == 50


def test_ssh_good_with_several_principals(ssh: Ssh) -> None:
    """All principals of the matching line are the signer, comma-joined."""
    verifier = only(ssh, "two_names", ssh.bob, "", principal="bob@example.com,robert@example.com")
    verdict = check(verifier, ssh_commit(ssh, ssh.bob))
    assert verdict.status is Status.GOOD
    assert verdict.signer == "bob@example.com,robert@example.com"


def test_unsigned(ssh: Ssh, ssh_verifier: Verifier, gpg_verifier: Verifier) -> None:
    """An unsigned commit is unsigned, in either mode."""
    parts = signed_parts(ssh.repo, commit_signed(ssh.repo, "unsigned", date=IN_2024))
    assert parts[0] is None and parts[1] is None
    assert check(ssh_verifier, parts).status is Status.UNSIGNED
    assert check(gpg_verifier, parts).status is Status.UNSIGNED
    assert not check(ssh_verifier, parts).ok


def test_ssh_unknown_key(ssh: Ssh, ssh_verifier: Verifier) -> None:
    """A key the allowed-signers file does not list is unknown, and its fingerprint is shown."""
    verdict = check(ssh_verifier, ssh_commit(ssh, ssh.carol))
    assert verdict.status is Status.UNKNOWN_KEY
    assert verdict.key.startswith("SHA256:") and verdict.key in verdict.reason


def test_ssh_expired_at_commit_time(ssh: Ssh) -> None:
    """A key whose valid-before is before the commit's time is expired."""
    verdict = check(only(ssh, "expired", ssh.bob, 'valid-before="20200101"'), ssh_commit(ssh, ssh.bob))
    assert verdict.status is Status.EXPIRED
    assert "valid-after/valid-before" in verdict.reason


def test_ssh_not_yet_valid_at_commit_time(ssh: Ssh) -> None:
    """A key whose valid-after is after the commit's time is outside its window too."""
    verdict = check(only(ssh, "future", ssh.bob, 'valid-after="20300101"'), ssh_commit(ssh, ssh.bob))
    assert verdict.status is Status.EXPIRED


def test_ssh_window_is_judged_at_commit_time_not_now(ssh: Ssh) -> None:
    """A key valid until 2025 still signs a 2024 commit well after 2025 (git's -Overify-time)."""
    verifier = only(ssh, "rolled_over", ssh.bob, 'valid-before="20250101"')
    assert check(verifier, ssh_commit(ssh, ssh.bob, "2024-06-01T00:00:00Z")).status is Status.GOOD
    assert check(verifier, ssh_commit(ssh, ssh.bob, "2025-06-01T00:00:00Z")).status is Status.EXPIRED


def test_ssh_window_in_utc(ssh: Ssh) -> None:
    """A window given in UTC ("Z") is compared with the commit's UTC time, to the second."""
    verifier = only(ssh, "utc", ssh.bob, 'valid-after="20240101120000Z"')
    assert check(verifier, ssh_commit(ssh, ssh.bob, "2024-01-01T12:00:01Z")).status is Status.GOOD
    assert check(verifier, ssh_commit(ssh, ssh.bob, "2024-01-01T11:59:59Z")).status is Status.EXPIRED


def test_ssh_namespace_file_only_is_not_good(ssh: Ssh) -> None:
    """A key allowed only for namespace "file" does not sign git commits."""
    verdict = check(only(ssh, "file_only", ssh.bob, 'namespaces="file"'), ssh_commit(ssh, ssh.bob))
    assert verdict.status is Status.BAD_SIGNATURE
    assert "namespace" in verdict.reason


def test_ssh_tampered(ssh: Ssh, ssh_verifier: Verifier) -> None:
    """A commit whose message changed under the kept signature is a bad signature."""
    commit = commit_signed(ssh.repo, "to tamper", ssh=ssh.alice, date=IN_2024)
    assert (
        check(ssh_verifier, signed_parts(ssh.repo, tamper(ssh.repo, commit))).status is Status.BAD_SIGNATURE
    )


def test_ssh_signature_over_other_payload(ssh_verifier: Verifier, ssh_good: Parts) -> None:
    """A good signature presented with another payload is a bad signature."""
    signature, payload, when = ssh_good
    assert payload is not None
    verdict = ssh_verifier.verify(signature, payload.replace(b"by alice", b"by mallory"), when)
    assert verdict.status is Status.BAD_SIGNATURE


def test_pgp_signature_in_ssh_mode(ssh_verifier: Verifier, gpg_good: Parts) -> None:
    """An OpenPGP signature when the mode is ssh is an unknown key, and the reason says why."""
    verdict = check(ssh_verifier, gpg_good)
    assert verdict.status is Status.UNKNOWN_KEY
    assert verdict.reason == 'signed with OpenPGP but [source] verify_signatures = "ssh"'


def test_x509_signature_is_refused(ssh_verifier: Verifier) -> None:
    """A gpgsm (X.509) signature is not verified by syncd."""
    verdict = ssh_verifier.verify(b"-----BEGIN SIGNED MESSAGE-----\nMIIB\n", b"tree 0\n", 1)
    assert verdict.status is Status.UNKNOWN_KEY and "X.509" in verdict.reason


def test_ssh_ignores_home(ssh: Ssh, ssh_verifier: Verifier, monkeypatch: pytest.MonkeyPatch) -> None:
    """An allowed-signers file in $HOME trusting the key changes nothing: only the configured file counts."""
    home = ssh.dir / "home"
    (home / ".ssh").mkdir(parents=True, exist_ok=True)
    allowed_signers(home / ".ssh" / "allowed_signers", [("carol@example.com", ssh.carol, "")])
    monkeypatch.setenv("HOME", str(home))
    assert check(ssh_verifier, ssh_commit(ssh, ssh.carol)).status is Status.UNKNOWN_KEY


def test_commit_time_zero_is_judged_now(ssh: Ssh, ssh_good: Parts) -> None:
    """Without a committer time (0) the window is judged now, as git does."""
    signature, payload, _ = ssh_good
    verifier = only(ssh, "alice_until_2020", ssh.alice, 'valid-before="20200101"', "alice@example.com")
    assert verifier.verify(signature, payload or b"", 0).status is Status.EXPIRED
    assert check(verifier, ssh_good).status is Status.EXPIRED


def test_commit_time_out_of_range(ssh_verifier: Verifier, ssh_good: Parts) -> None:
    """A committer time ssh-keygen cannot be given is an error, not a verdict on the signature."""
    signature, payload, _ = ssh_good
    assert ssh_verifier.verify(signature, payload or b"", 2**62).status is Status.ERROR


# -- OpenPGP -----------------------------------------------------------------------------------------


def test_gpg_good(gpg: Gpg, gpg_verifier: Verifier, gpg_good: Parts) -> None:
    """A commit signed by a key in the keyring is good, naming its user id and primary fingerprint."""
    verdict = check(gpg_verifier, gpg_good)
    assert verdict.status is Status.GOOD and verdict.ok
    assert verdict.signer == gpg.alice.uid
    assert verdict.key == gpg.alice.fingerprint


def test_gpg_unknown_key(gpg: Gpg, gpg_verifier: Verifier) -> None:
    """A key not in the keyring is unknown."""
    parts = signed_parts(gpg.repo, commit_signed(gpg.repo, "by a stranger", gpg=gpg.stranger))
    verdict = check(gpg_verifier, parts)
    assert verdict.status is Status.UNKNOWN_KEY
    assert gpg.stranger.fingerprint in verdict.reason


def test_gpg_expired_key(gpg: Gpg, gpg_verifier: Verifier, gpg_good: Parts) -> None:
    """A signature made while the key was valid, by a key expired since, is expired (gpgv exits 0)."""
    _, payload, when = gpg_good
    assert payload is not None
    signature = gpg_sign_in_past(gpg.old, payload, "20200101T120000")
    verdict = gpg_verifier.verify(signature, payload, when)
    assert verdict.status is Status.EXPIRED and "expired" in verdict.reason
    assert verdict.key == gpg.old.fingerprint


def test_gpg_revoked_key(gpg: Gpg, gpg_verifier: Verifier) -> None:
    """A signature by a revoked key is not good (gpgv says "Good signature" and exits 0)."""
    verdict = check(gpg_verifier, gpg.by_revoked)
    assert verdict.status is Status.EXPIRED and "revoked" in verdict.reason


def test_gpg_tampered(gpg: Gpg, gpg_verifier: Verifier) -> None:
    """A commit whose message changed under the kept signature is a bad signature."""
    commit = commit_signed(gpg.repo, "to tamper", gpg=gpg.alice)
    assert (
        check(gpg_verifier, signed_parts(gpg.repo, tamper(gpg.repo, commit))).status is Status.BAD_SIGNATURE
    )


def test_gpg_signature_over_other_payload(gpg_verifier: Verifier, gpg_good: Parts) -> None:
    """A good signature presented with another payload is a bad signature."""
    signature, payload, when = gpg_good
    assert payload is not None
    verdict = gpg_verifier.verify(signature, payload.replace(b"by alice", b"by mallory"), when)
    assert verdict.status is Status.BAD_SIGNATURE


def test_gpg_two_signatures(gpg_verifier: Verifier, gpg_good: Parts) -> None:
    """A block of two OpenPGP signatures is refused, as git refuses it, even when both are good."""
    signature, payload, when = gpg_good
    assert signature is not None and payload is not None
    verdict = gpg_verifier.verify(signature + b"\n" + signature, payload, when)
    assert verdict.status is Status.BAD_SIGNATURE and "more than one" in verdict.reason


def test_ssh_signature_in_gpg_mode(gpg_verifier: Verifier, ssh_good: Parts) -> None:
    """An SSH signature when the mode is gpg is an unknown key."""
    verdict = check(gpg_verifier, ssh_good)
    assert verdict.status is Status.UNKNOWN_KEY
    assert verdict.reason == 'signed with SSH but [source] verify_signatures = "gpg"'


def test_gpg_armored_keyring_is_an_error(gpg: Gpg, gpg_good: Parts) -> None:
    """gpgv cannot read an armored keyring: an error, not an unknown key."""
    armored = export_keyring([gpg.alice], gpg.repo.parent / "trusted.asc", armor=True)
    verdict = check(Verifier("gpg", armored), gpg_good)
    assert verdict.status is Status.ERROR and "keyring" in verdict.reason


def test_gpg_ignores_home(gpg: Gpg, gpg_verifier: Verifier, monkeypatch: pytest.MonkeyPatch) -> None:
    """gpgv's default keyring in $GNUPGHOME or $HOME trusting the key changes nothing."""
    home = gpg.repo.parent / "home"
    (home / ".gnupg").mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in ("trustedkeys.gpg", "trustedkeys.kbx"):
        export_keyring([gpg.stranger], home / ".gnupg" / name)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GNUPGHOME", str(home / ".gnupg"))
    parts = signed_parts(gpg.repo, commit_signed(gpg.repo, "stranger again", gpg=gpg.stranger))
    assert check(gpg_verifier, parts).status is Status.UNKNOWN_KEY


# -- tools, limits, garbage --------------------------------------------------------------------------


@pytest.fixture
def trusted(ssh: Ssh, gpg: Gpg, ssh_good: Parts, gpg_good: Parts) -> dict[str, tuple[Path, Parts]]:
    """Per mode: a usable trust file and a commit it trusts."""
    return {"ssh": (ssh.allowed, ssh_good), "gpg": (gpg.keyring, gpg_good)}


@pytest.mark.parametrize("mode", ["ssh", "gpg"])
def test_timeout(tmp_path: Path, mode: str, trusted: dict[str, tuple[Path, Parts]]) -> None:
    """A tool that hangs is cut at the timeout, with everything it started."""
    pidfile = tmp_path / "pid"
    tool = tmp_path / "hang"
    tool.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > {pidfile}\nwait\n")
    tool.chmod(0o755)
    trust, parts = trusted[mode]
    started = time.monotonic()
    verdict = check(Verifier(mode, trust, timeout=0.5, tool=str(tool)), parts)
    assert time.monotonic() - started < 5
    assert verdict.status is Status.ERROR
    assert "timed out after 0.5s" in verdict.reason
    assert not _running(int(pidfile.read_text()))


def _running(pid: int) -> bool:
    """Whether ``pid`` lives (a zombie awaiting its reaper does not)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("mode", ["ssh", "gpg"])
def test_tool_missing(mode: str, trusted: dict[str, tuple[Path, Parts]]) -> None:
    """A tool that does not exist is an error naming it."""
    trust, parts = trusted[mode]
    verdict = check(Verifier(mode, trust, tool="/nonexistent/tool"), parts)
    assert verdict.status is Status.ERROR
    assert verdict.reason.startswith("tool could not run")


@pytest.mark.parametrize(("mode", "package"), [("ssh", "openssh-client"), ("gpg", "gpgv")])
def test_tool_problem(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    package: str,
    trusted: dict[str, tuple[Path, Parts]],
) -> None:
    """tool_problem names the Debian package when the tool is not on PATH, and a verifier says so too."""
    assert tool_problem(mode) is None
    monkeypatch.setenv("PATH", str(tmp_path))
    problem = tool_problem(mode)
    assert problem is not None and package in problem
    trust, parts = trusted[mode]
    verdict = check(Verifier(mode, trust), parts)
    assert verdict.status is Status.ERROR and package in verdict.reason


def test_oversized_signature_runs_nothing(ssh_good: Parts) -> None:
    """A signature over 64 KiB is bad without running any tool."""
    signature, payload, when = ssh_good
    assert signature is not None
    huge = signature + b"A" * 65536
    verdict = Verifier("ssh", Path("/nonexistent"), tool="/nonexistent/tool").verify(
        huge, payload or b"", when
    )
    assert verdict.status is Status.BAD_SIGNATURE


def test_oversized_payload(ssh_verifier: Verifier, ssh_good: Parts) -> None:
    """A payload over 16 MiB is an error."""
    signature, _, when = ssh_good
    assert ssh_verifier.verify(signature, b"x" * (16 * 1024 * 1024 + 1), when).status is Status.ERROR


def test_unknown_mode_is_refused(tmp_path: Path) -> None:
    """Only "ssh" and "gpg" are modes."""
    with pytest.raises(ValueError, match="ssh"):
        Verifier("x509", tmp_path)


def _signatures(good: bytes) -> st.SearchStrategy[bytes]:
    """Garbage, garbage behind each armor header, and a real signature with one byte changed."""
    blob = st.binary(max_size=600)
    flipped = st.tuples(st.integers(0, len(good) - 1), st.integers(1, 255)).map(
        lambda f: good[: f[0]] + bytes([good[f[0]] ^ f[1]]) + good[f[0] + 1 :]
    )
    return st.one_of(
        blob,
        blob.map(lambda b: b"-----BEGIN SSH SIGNATURE-----\n" + b),
        blob.map(lambda b: b"-----BEGIN PGP SIGNATURE-----\n" + b),
        blob.map(lambda b: b"-----BEGIN SSH SIGNATURE-----\n" + b + b"\n-----END SSH SIGNATURE-----\n"),
        flipped,
    )


def _same_content(one: bytes, other: bytes) -> bool:
    """Whether two armored signatures carry the same bytes (a changed newline or unused bit may not)."""

    def body(armored: bytes) -> bytes | None:
        lines = [line.strip() for line in armored.splitlines()]
        kept = [line for line in lines if line and not line.startswith((b"-----", b"="))]
        try:
            return base64.b64decode(b"".join(kept), validate=True)
        except ValueError:
            return None

    return body(one) is not None and body(one) == body(other)


@pytest.mark.parametrize("mode", ["ssh", "gpg"])
def test_garbage_is_never_good(
    mode: str, ssh_verifier: Verifier, gpg_verifier: Verifier, ssh_good: Parts, gpg_good: Parts
) -> None:
    """Random signatures and payloads are never good, and verify never raises."""
    verifier, (good, payload, _) = (ssh_verifier, ssh_good) if mode == "ssh" else (gpg_verifier, gpg_good)
    assert good is not None and payload is not None

    @settings(max_examples=30, deadline=None)
    @given(
        signature=_signatures(good),
        data=st.one_of(st.just(payload), st.binary(max_size=2000)),
        when=st.integers(-(2**63), 2**63),
    )
    def run(signature: bytes, data: bytes, when: int) -> None:
        verdict = verifier.verify(signature, data, when)
        assert isinstance(verdict, Verdict)
        assert verdict.status is not Status.GOOD or (data == payload and _same_content(signature, good))
        assert len(verdict.reason) < 500

    run()


# -- trust files -------------------------------------------------------------------------------------


def test_good_trust_files(ssh: Ssh, gpg: Gpg) -> None:
    """A listed key, options and comments, or a binary keyring, are usable."""
    assert trust_file_problem("ssh", ssh.allowed) is None
    mixed = ssh.dir / "mixed"
    mixed.write_text(
        "# the team\n\n"
        f'"alice example" namespaces="git",valid-after="20200101Z" {ssh.alice.line}\n'
        f'bob@example.com\tcert-authority,namespaces="git,file" {ssh.bob.line}\n'
    )
    assert trust_file_problem("ssh", mixed) is None
    assert trust_file_problem("gpg", gpg.keyring) is None


SSH_PROBLEMS = {
    "empty": "",
    "comments only": "# nobody yet\n\n   \n",
    "garbage": "this is not a key\n",
    "key type, no key": "alice@example.com ssh-ed25519\n",
    "bad base64": "alice@example.com ssh-ed25519 AAAA!!!!\n",
    "unquoted option": "alice@example.com namespaces=git {key}\n",
    "unknown option": 'alice@example.com nosuch="x" {key}\n',
    "bad time": 'alice@example.com valid-before="2020" {key}\n',
    "wrong key type": "alice@example.com ssh-rsa {blob}\n",
    "one good, one garbage": "alice@example.com {key}\ngarbage\n",
}


@pytest.mark.parametrize("case", SSH_PROBLEMS)
def test_ssh_trust_file_problems(ssh: Ssh, tmp_path: Path, case: str) -> None:
    """An allowed-signers file ssh-keygen would not use (wholly or in part) is a problem."""
    path = tmp_path / "allowed"
    path.write_text(SSH_PROBLEMS[case].format(key=ssh.alice.line, blob=ssh.alice.line.split()[1]))
    assert trust_file_problem("ssh", path) is not None


def test_gpg_trust_file_problems(gpg: Gpg, tmp_path: Path) -> None:
    """An empty, armored or non-OpenPGP keyring is a problem; the armored one says how to fix it."""
    empty = tmp_path / "empty.gpg"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.gpg"
    garbage.write_bytes(b"not a keyring\n")
    armored = export_keyring([gpg.alice], tmp_path / "armored.asc", armor=True)
    assert trust_file_problem("gpg", empty) is not None
    assert trust_file_problem("gpg", garbage) is not None
    problem = trust_file_problem("gpg", armored)
    assert problem is not None and "gpg --export" in problem and "--dearmor" in problem


@pytest.mark.parametrize("mode", ["ssh", "gpg"])
def test_missing_and_directory_trust_files(tmp_path: Path, mode: str) -> None:
    """A missing path, a directory or an unreadable file is a problem naming the path."""
    missing = trust_file_problem(mode, tmp_path / "nope")
    assert missing is not None and "does not exist" in missing
    directory = trust_file_problem(mode, tmp_path)
    assert directory is not None and "not a regular file" in directory
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.write_text("x")
        locked.chmod(0)
        assert trust_file_problem(mode, locked) is not None
