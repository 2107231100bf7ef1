"""Commit signatures: the one module that runs the tools git runs to verify them.

A commit's ``gpgsig`` header is judged the way ``git verify-commit`` judges it, by the same programs, so a
commit syncd accepts is one git would call good:

- SSH (``-----BEGIN SSH SIGNATURE-----``): ``ssh-keygen -Y find-principals`` names the principals of the
  allowed-signers file whose key made the signature, then ``ssh-keygen -Y verify -n git`` checks the
  signature over the payload for one of them. Both get ``-Overify-time=`` the committer's time (as git
  passes it), so a key's ``valid-after``/``valid-before`` window is judged at the commit's time, not now.
  The time is given in UTC with a ``Z``; git gives local time without one, the same instant.
- OpenPGP (``-----BEGIN PGP SIGNATURE-----``): ``gpgv`` with the configured keyring and nothing else. Its
  ``--status-fd`` lines decide, never its exit status alone: gpgv exits 0 for a good signature by an
  expired or revoked key (``EXPKEYSIG``/``REVKEYSIG``), which syncd calls :attr:`Status.EXPIRED`.
- Any other armor (X.509 from gpgsm, garbage) is refused without running anything, and so is a signature
  of the other kind than the configured mode.

Each check gets a private temporary directory (0700, removed afterwards) as the tools' ``HOME``, working
directory and gpg home, a fixed environment (``PATH=/usr/bin:/bin``, ``LC_ALL=C``: nothing from the user's
home, no ``GNUPGHOME``, no agent), bounded input and output, and one deadline (``timeout``) for all its runs:
each run is its own process group, killed with everything it started when the deadline passes. The trust
file is checked first (:func:`trust_file_problem`): an empty or armored one is an error, not a silent
"unknown key" for every commit. Where ssh-keygen only says "No principal matched", syncd tells an expired
key from an unknown one by reading the allowed-signers file itself: the signature's public key listed on a
line with a validity window means the window excluded the commit's time (find-principals without
``verify-time`` judges the window now, which cannot tell them apart). :meth:`Verifier.verify` never
raises: every outcome is a :class:`Verdict`, whose reason is a short sentence in syncd's words (the tool's
text at most, escaped and bounded; never the payload).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

MAX_SIGNATURE = 64 * 1024
MAX_PAYLOAD = 16 * 1024 * 1024
MAX_TRUST_FILE = 4 * 1024 * 1024  # read for the expired-or-unknown question and config checks
MAX_OUTPUT = 64 * 1024  # of a tool's stdout or stderr kept
MAX_PRINCIPALS = 8  # tried with ``-Y verify``, one process each
MAX_TOOL_TEXT = 200

SSH_ARMOR = b"-----BEGIN SSH SIGNATURE-----"
PGP_ARMORS = (b"-----BEGIN PGP SIGNATURE-----", b"-----BEGIN PGP MESSAGE-----")  # as git's gpg-interface.c
X509_ARMOR = b"-----BEGIN SIGNED MESSAGE-----"
_ENV_PATH = "/usr/bin:/bin"
_TOOLS = {"ssh": ("ssh-keygen", "openssh-client"), "gpg": ("gpgv", "gpgv")}
_KIND_NAMES = {"ssh": "SSH", "gpg": "OpenPGP", "x509": "X.509 (gpgsm)"}


class Status(StrEnum):
    """What a signature check found."""

    GOOD = "good"
    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown_key"  # signed, but not by a trusted key (or by the other kind of key)
    BAD_SIGNATURE = "bad_signature"  # the signature does not verify over this commit
    EXPIRED = "expired"  # the key is outside its window (ssh), or the key or signature expired or was revoked
    ERROR = "error"  # the tool could not run, timed out, or said something syncd cannot read


@dataclass(frozen=True)
class Verdict:
    """One commit's signature check. ``signer``: the matched principals (ssh, comma-joined) or the key's
    user id (gpg); ``key``: the signing key's fingerprint (``SHA256:...`` for ssh; for gpg the primary
    key's 40 hex digits when the key is in the keyring, else the issuer's); ``reason``: for people."""

    status: Status
    signer: str = ""
    key: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        """True for a good signature by a trusted key, and only then."""
        return self.status is Status.GOOD


@dataclass(frozen=True)
class _Place:
    home: Path  # the private directory of one check
    deadline: float  # time.monotonic() at which its tools are killed


@dataclass(frozen=True)
class _Run:
    rc: int
    out: bytes
    err: bytes


class Verifier:
    """Checks commit signatures against one trust file. ``mode`` is ``"ssh"`` (``trust_file`` in git's
    ``gpg.ssh.allowedSignersFile`` format) or ``"gpg"`` (a binary keyring as gpgv reads it); ``tool`` is
    the path of ssh-keygen or gpgv (default: found on ``PATH`` now). Raises :class:`ValueError` for any
    other mode; a missing tool is reported by each :meth:`verify`."""

    def __init__(
        self, mode: str, trust_file: Path, *, timeout: float = 10.0, tool: str | None = None
    ) -> None:
        if mode not in _TOOLS:
            raise ValueError(f'signature mode must be "ssh" or "gpg", not {mode!r}')
        self.mode = mode
        self.trust_file = Path(os.path.abspath(trust_file))  # gpgv reads a relative keyring from its home
        self.timeout = timeout
        self.tool = tool if tool is not None else shutil.which(_TOOLS[mode][0])

    def verify(self, signature: bytes | None, payload: bytes, committed_at: int) -> Verdict:
        """Judge ``signature`` (the ``gpgsig`` header, None when unsigned) over ``payload`` (the commit
        without it) at ``committed_at`` (the committer's unix time). Never raises."""
        try:
            return self._verify(signature, payload, committed_at)
        except Exception as exc:  # the promise is a verdict for any input; a bug must not stop a pass
            return Verdict(Status.ERROR, reason=f"signature check failed unexpectedly ({type(exc).__name__})")

    def _verify(self, signature: bytes | None, payload: bytes, committed_at: int) -> Verdict:
        if signature is None:
            return Verdict(Status.UNSIGNED, reason="the commit is not signed")
        if len(signature) > MAX_SIGNATURE:
            return Verdict(Status.BAD_SIGNATURE, reason=f"the signature is over {MAX_SIGNATURE} bytes")
        if len(payload) > MAX_PAYLOAD:
            return Verdict(Status.ERROR, reason=f"the signed commit is over {MAX_PAYLOAD} bytes")
        kind = signature_kind(signature)
        if kind is None:
            return Verdict(Status.BAD_SIGNATURE, reason="the signature is not in a format git knows")
        if kind != self.mode:
            return Verdict(
                Status.UNKNOWN_KEY,
                reason=f'signed with {_KIND_NAMES[kind]} but [source] verify_signatures = "{self.mode}"',
            )
        if self.tool is None:
            return Verdict(Status.ERROR, reason=tool_problem(self.mode) or "the verifying tool is missing")
        problem = trust_file_problem(self.mode, self.trust_file)
        if problem is not None:  # an empty or armored trust file would otherwise read as "unknown key"
            return Verdict(Status.ERROR, reason=problem)
        deadline = time.monotonic() + self.timeout  # for all the runs of this one check
        with _private_dir() as home:
            sig_file = home / "signature"
            _write_private(sig_file, signature)
            if self.mode == "ssh":
                return self._ssh(signature, sig_file, payload, committed_at, _Place(home, deadline))
            data_file = home / "payload"
            _write_private(data_file, payload)
            return self._gpg(sig_file, data_file, _Place(home, deadline))

    def _ssh(
        self, signature: bytes, sig_file: Path, payload: bytes, committed_at: int, where: _Place
    ) -> Verdict:
        assert self.tool is not None
        at = verify_time(committed_at)
        if isinstance(at, Verdict):
            return at
        trust = str(self.trust_file)
        found = self._run([self.tool, "-Y", "find-principals", "-s", str(sig_file), "-f", trust, *at], where)
        if isinstance(found, Verdict):
            return found
        principals = [p for p in found.out.decode("utf-8", "replace").splitlines() if p.strip()]
        if found.rc != 0 or not principals:
            return self._ssh_unmatched(signature, found.err, committed_at)
        last = found
        for principal in principals[:MAX_PRINCIPALS]:
            argv = [self.tool, "-Y", "verify", "-f", trust, "-I", principal, "-n", "git", "-s", str(sig_file)]
            done = self._run([*argv, *at], where, stdin=payload)
            if isinstance(done, Verdict):
                return done
            good = _SSH_GOOD.match(done.out)
            if done.rc == 0 and good:
                signer = ",".join(principals)
                return Verdict(Status.GOOD, signer, good.group(1).decode(), f"good SSH signature by {signer}")
            last = done
        key = _ssh_fingerprint(signature)
        return Verdict(
            Status.BAD_SIGNATURE,
            ",".join(principals),
            key,
            f"the SSH signature by {_escaped(principals[0])} does not verify this commit{_said(last.err)}",
        )

    def _ssh_unmatched(self, signature: bytes, err: bytes, committed_at: int) -> Verdict:
        """find-principals matched nothing: an unreadable signature, an expired key, or an unknown one."""
        if b"usage:" in err:
            return Verdict(Status.ERROR, reason="ssh-keygen is too old for -Y find-principals (OpenSSH 8.2+)")
        blob = sshsig_public_key(signature)
        if blob is None:
            return Verdict(Status.BAD_SIGNATURE, reason=f"the SSH signature cannot be read{_said(err)}")
        key = fingerprint(blob)
        entries = [e for e in _read_signers(self.trust_file) if e.blob == blob]
        if any(e.windowed for e in entries) or b"key has expired" in err or b"key is not yet valid" in err:
            when = "now"
            if committed_at > 0:
                when = "the commit's time " + datetime.fromtimestamp(committed_at, UTC).strftime(
                    "%Y-%m-%d %H:%M:%SZ"
                )
            return Verdict(
                Status.EXPIRED,
                ",".join(e.principals for e in entries),
                key,
                f"key {key} is outside its valid-after/valid-before window at {when}{_said(err)}",
            )
        if entries:
            return Verdict(
                Status.UNKNOWN_KEY,
                key=key,
                reason=f"ssh-keygen did not accept the entry for key {key}{_said(err)}",
            )
        return Verdict(
            Status.UNKNOWN_KEY,
            key=key,
            reason=f"signed by SSH key {key}, which the allowed-signers file does not list",
        )

    def _gpg(self, sig_file: Path, data_file: Path, where: _Place) -> Verdict:
        assert self.tool is not None
        argv = [
            self.tool,
            "--homedir",
            str(where.home),
            "--keyring",
            str(self.trust_file),
            "--status-fd",
            "1",
        ]
        done = self._run([*argv, str(sig_file), str(data_file)], where)
        if isinstance(done, Verdict):
            return done
        return gpg_verdict(done.out, done.rc, done.err)

    def _run(self, argv: list[str], where: _Place, stdin: bytes = b"") -> _Run | Verdict:
        """Run one tool with a fixed environment in its own process group, killed at the deadline
        (``timeout`` seconds for all the runs one :meth:`verify` makes)."""
        name = Path(argv[0]).name
        env = {"PATH": _ENV_PATH, "LC_ALL": "C", "HOME": str(where.home)}
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=where.home,
                start_new_session=True,
            )
        except OSError as exc:
            return Verdict(
                Status.ERROR, reason=f"{_escaped(name)} could not run: {exc.strerror or type(exc).__name__}"
            )
        try:
            out, err = proc.communicate(stdin, timeout=max(0.0, where.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(proc)
            return Verdict(Status.ERROR, reason=f"{_escaped(name)} timed out after {self.timeout:g}s")
        except BaseException:
            _kill(proc)
            raise
        return _Run(proc.returncode, out[:MAX_OUTPUT], err[:MAX_OUTPUT])


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """End the tool and anything it started, and reap it."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired, OSError, ValueError):
        proc.communicate(timeout=2)


def signature_kind(signature: bytes) -> str | None:
    """``"ssh"``, ``"gpg"`` or ``"x509"`` by the armor the signature starts with (as git tells them)."""
    if signature.startswith(SSH_ARMOR):
        return "ssh"
    if signature.startswith(PGP_ARMORS):
        return "gpg"
    if signature.startswith(X509_ARMOR):
        return "x509"
    return None


def verify_time(committed_at: int) -> list[str] | Verdict:
    """ssh-keygen's ``-Overify-time=YYYYMMDDHHMMSSZ`` for the commit's time; none for time 0 (as git)."""
    if committed_at <= 0:
        return []
    try:
        when = datetime.fromtimestamp(committed_at, UTC)
    except (OverflowError, OSError, ValueError):
        return Verdict(Status.ERROR, reason=f"the commit's time {committed_at} is out of range")
    return [f"-Overify-time={when:%Y%m%d%H%M%S}Z"]


_SSH_GOOD = re.compile(rb'Good "git" signature for .+ with \S+ key (SHA256:[A-Za-z0-9+/]+)')


def sshsig_public_key(signature: bytes) -> bytes | None:
    """The public key blob inside an armored SSHSIG, or None if it cannot be read."""
    lines = signature.strip().splitlines()
    if len(lines) < 3 or lines[0].strip() != SSH_ARMOR or lines[-1].strip() != b"-----END SSH SIGNATURE-----":
        return None
    try:
        raw = base64.b64decode(b"".join(line.strip() for line in lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw.startswith(b"SSHSIG") or len(raw) < 14:
        return None
    (size,) = struct.unpack(">I", raw[10:14])
    blob = raw[14 : 14 + size]
    return blob if size and len(blob) == size else None


def fingerprint(blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _ssh_fingerprint(signature: bytes) -> str:
    blob = sshsig_public_key(signature)
    return fingerprint(blob) if blob is not None else ""


def gpg_verdict(status: bytes, rc: int, err: bytes = b"") -> Verdict:
    """Read gpgv's ``--status-fd`` lines. Only GOODSIG with VALIDSIG and exit 0 is good; the worst thing
    said wins (gpgv exits 0 for an expired or revoked key's good signature)."""
    words: dict[str, list[str]] = {}
    newsigs = 0
    for line in status.decode("utf-8", "replace").splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        name, _, rest = line[9:].partition(" ")
        newsigs += name == "NEWSIG"
        words.setdefault(name, rest.split(" "))
        if name == "ERROR" and ("keyblock_resource" in rest or "keydb_" in rest):
            return Verdict(
                Status.ERROR, reason="gpgv could not read the keyring (missing, or not a binary keyring)"
            )
    if b"keydb_search failed" in err:  # an unreadable keyring says so on stderr only
        return Verdict(Status.ERROR, reason=f"gpgv could not read the keyring{_said(err)}")
    if newsigs > 1:
        return Verdict(Status.BAD_SIGNATURE, reason="more than one OpenPGP signature (git refuses those too)")
    valid = words.get("VALIDSIG", [])
    primary = valid[9] if len(valid) >= 10 else (valid[0] if valid else "")
    for name, why in _GPG_EXPIRED.items():
        if name in words:
            return Verdict(Status.EXPIRED, _gpg_uid(words[name]), primary, why)
    if "BADSIG" in words:
        uid = _gpg_uid(words["BADSIG"])
        return Verdict(Status.BAD_SIGNATURE, uid, primary, f"the OpenPGP signature by {uid} does not verify")
    if "ERRSIG" in words:
        fields = words["ERRSIG"]
        issuer = fields[6] if len(fields) >= 7 and fields[6] != "-" else fields[0]
        if "NO_PUBKEY" in words:
            return Verdict(
                Status.UNKNOWN_KEY,
                key=issuer,
                reason=f"signed by OpenPGP key {_escaped(issuer)}, not in the keyring",
            )
        return Verdict(Status.BAD_SIGNATURE, key=issuer, reason="the OpenPGP signature cannot be checked")
    if "NODATA" in words:
        return Verdict(Status.BAD_SIGNATURE, reason="no OpenPGP signature could be read")
    if "GOODSIG" in words and valid and rc == 0:
        uid = _gpg_uid(words["GOODSIG"]) or primary
        return Verdict(Status.GOOD, uid, primary, f"good OpenPGP signature by {uid}")
    return Verdict(Status.ERROR, reason=f"gpgv said nothing syncd can read (exit {rc}){_said(err)}")


_GPG_EXPIRED = {
    "REVKEYSIG": "signed by a revoked OpenPGP key",
    "EXPKEYSIG": "signed by an expired OpenPGP key",
    "EXPSIG": "the OpenPGP signature has expired",
}


def _gpg_uid(fields: list[str]) -> str:
    """The user id after the key id in GOODSIG/BADSIG/EXP*SIG, escaped and bounded."""
    return _escaped(" ".join(fields[1:]))


# -- allowed-signers files ---------------------------------------------------------------------------

_KEY_TYPE = re.compile(
    r"(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com"
    r"|sk-ecdsa-sha2-nistp256@openssh\.com)(-cert-v01@openssh\.com)?"
)
_TIME = re.compile(r"\d{8}(\d{4}(\d{2})?)?Z?")
_OPTION = re.compile(r'(?i)(cert-authority|namespaces="[^"]*"|valid-(after|before)="([^"]*)")')


@dataclass(frozen=True)
class _Signer:
    principals: str
    windowed: bool  # has valid-after or valid-before
    blob: bytes


def _parse_signer(line: str) -> _Signer | str:
    """One non-comment line of an allowed-signers file, or what is wrong with it."""
    rest = line.strip()
    if rest.startswith('"'):
        end = rest.find('"', 1)
        if end < 1:
            return "its principals have no closing quote"
        principals, rest = rest[1:end], rest[end + 1 :]
    else:
        principals, rest = [*re.split(r"\s+", rest, maxsplit=1), ""][:2]
    fields = rest.split()
    options = ""
    if fields and not _KEY_TYPE.fullmatch(fields[0]):
        options, rest = _split_options(rest.strip())
        fields = rest.split()
    if not principals or not fields:
        return "it is not 'principals [options] key-type base64-key'"
    if len(fields) < 2 or not _KEY_TYPE.fullmatch(fields[0]):
        return "it has no SSH key (key type and base64 key)"
    blob = _key_blob(fields[0], fields[1])
    if blob is None:
        return f"its {fields[0]} key is not valid base64 of that key type"
    windowed = False
    for option in _comma_split(options):
        m = _OPTION.fullmatch(option)
        if m is None:
            return f"option {_escaped(option, 60)} is not one ssh-keygen knows (values need double quotes)"
        if m.group(3) is not None:
            windowed = True
            if not _TIME.fullmatch(m.group(3)):
                return f"option {_escaped(option, 60)} is not YYYYMMDD[Z] or YYYYMMDDHHMM[SS][Z]"
    return _Signer(principals, windowed, blob)


def _split_options(text: str) -> tuple[str, str]:
    """The options field (up to the first whitespace outside double quotes) and what follows it."""
    quoted = False
    for i, char in enumerate(text):
        if char == '"':
            quoted = not quoted
        elif char.isspace() and not quoted:
            return text[:i], text[i:]
    return text, ""


def _comma_split(options: str) -> list[str]:
    parts: list[str] = []
    current, quoted = "", False
    for char in options:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current] if options else []


def _key_blob(key_type: str, text: str) -> bytes | None:
    """The decoded key, if it is base64 whose first field names ``key_type`` (as sshkey_read checks)."""
    try:
        blob = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(blob) < 4:
        return None
    (size,) = struct.unpack(">I", blob[:4])
    return blob if blob[4 : 4 + size] == key_type.encode() else None


def _signer_lines(text: str) -> list[tuple[int, _Signer | str]]:
    return [
        (number, _parse_signer(line))
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#")
    ]


def _read_signers(path: Path) -> list[_Signer]:
    try:
        with path.open("rb") as f:
            text = f.read(MAX_TRUST_FILE).decode("utf-8", "replace")
    except OSError:
        return []
    return [entry for _, entry in _signer_lines(text) if isinstance(entry, _Signer)]


# -- configuration checks ----------------------------------------------------------------------------


def trust_file_problem(mode: str, path: Path) -> str | None:
    """None if ``path`` is a usable trust file for ``mode``, else what is wrong, as one sentence."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return f"{_escaped(str(path))} is not a regular file"
        with path.open("rb") as f:
            head = f.read(MAX_TRUST_FILE + 1)
    except FileNotFoundError:
        return f"{_escaped(str(path))} does not exist"
    except OSError as exc:
        return f"{_escaped(str(path))} cannot be read: {exc.strerror or type(exc).__name__}"
    if len(head) > MAX_TRUST_FILE:
        return f"{_escaped(str(path))} is over {MAX_TRUST_FILE} bytes"
    return _signers_problem(head) if mode == "ssh" else _keyring_problem(head)


def _signers_problem(content: bytes) -> str | None:
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return "the allowed-signers file is not UTF-8 text"
    lines = _signer_lines(text)
    for number, entry in lines:
        if isinstance(entry, str):
            return f"line {number} of the allowed-signers file cannot be used: {entry}"
    if not lines:
        return "the allowed-signers file lists no key (git would call every signature untrusted)"
    return None


def _keyring_problem(content: bytes) -> str | None:
    if not content.strip():
        return "the keyring is empty"
    if content.lstrip().startswith(b"-----BEGIN PGP"):
        return (
            "the keyring is ASCII-armored, but gpgv reads only binary keyrings: "
            "make one with `gpg --export KEYID > FILE` or `gpg --dearmor`"
        )
    if not (content[0] & 0x80 or content[8:12] == b"KBXf"):
        return "the keyring is not an OpenPGP keyring (make one with `gpg --export KEYID > FILE`)"
    return None


def tool_problem(mode: str) -> str | None:
    """None if ``mode``'s tool is on ``PATH``, else which Debian package provides it."""
    name, package = _TOOLS.get(mode, ("", ""))
    if not name:
        return f'signature mode must be "ssh" or "gpg", not {_escaped(mode)}'
    if shutil.which(name) is None:
        return (
            f"{name} is not installed (Debian package {package}); it verifies {_KIND_NAMES[mode]} signatures"
        )
    return None


# -- small helpers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _private_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="syncd-verify-"))  # mode 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _said(err: bytes) -> str:
    """``: <the tool's most telling stderr line>``, escaped and bounded, or nothing."""
    lines = [line.strip() for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    telling = [line for line in lines if line not in _VAGUE]
    return f" (tool said: {_escaped(telling[0])})" if telling else ""


_VAGUE = {"Could not verify signature.", "No principal matched."}


def _escaped(text: str, limit: int = MAX_TOOL_TEXT) -> str:
    """``text`` with anything but printable ASCII escaped (no line can be forged), cut to ``limit``."""
    shown = text.encode("ascii", "backslashreplace").decode("ascii")
    shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
