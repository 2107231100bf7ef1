"""What to tell people, decided without I/O: one pass's events → the open problems → per channel, one
message of what is new, still open (a reminder), recovered and published.

A **problem** has a stable key: its kind, its dest or manifest file, and its error class (never a
duration, a byte count or a time), so the same problem is announced once however its text varies. A
problem is **judged** by a pass only if that pass looked at it: a pass that could not plan (git
unreachable before a first fetch, ``[source] path`` missing) says nothing about the assets, and an asset
that waited out its backoff or was interrupted by a stop is neither failing anew nor recovered. A
problem not judged stays open as it was; one judged and not seen again has recovered.

Per channel (``mail``, ``webhook``, ``author:<e-mail>``) the ledger keeps what it was told is open and
when; a message is composed from that and the open problems, and the channel's state changes only once
the message was accepted. A message that fails is composed again, with whatever changed, at the next
pass: nothing is lost and nothing is announced twice.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from syncd import events as ev
from syncd.report import shown

GIT_PASSES = 3  # git unreachable is announced after this many passes in a row …
GIT_SECONDS = 15 * 60.0  # … and this long, whichever is later
TITLE_CHARS = 120
SUBJECT_CHARS = 400
LINE_CHARS = 2000  # one line of a mail body (an error, a list of dests)


@dataclass(frozen=True)
class Alert:
    """One problem, as a message shows it. ``scope`` says which passes judge it (see the module doc)."""

    key: str
    kind: str  # asset_failed, asset_refused, manifest_invalid, git_unreachable, git_rewritten, …
    scope: str  # "assets", "git", "pass", "source", "space" or "prune"
    title: str  # "datasets/x.tar: checksum mismatch"
    error: str
    todo: str  # what to do about it
    dest: str = ""
    source: str = ""
    manifest: str = ""
    commit: str = ""
    sha256: str = ""
    failed_passes: int = 0
    author: str = ""  # "Name <e-mail>" of the commit that introduced the entry (or last changed the file)
    author_email: str = ""
    introduced_by: str = ""  # that commit
    dests: tuple[str, ...] = ()  # export_full: the assets that could not be written (a sample)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Alert | None:
        """The alert stored as ``text``, or None when it does not decode (a damaged row is dropped)."""
        return _load(cls, text)

    def fields(self) -> dict[str, object]:
        """The message fields (mail body and webhook JSON): the empty ones left out."""
        out = {k: v for k, v in asdict(self).items() if v not in ("", 0, (), None) and k != "scope"}
        if "dests" in out:
            out["dests"] = list(self.dests)
        return out


@dataclass(frozen=True)
class Landed:
    """One published file, for the "published" digest and its author's mail."""

    dest: str
    bytes: int
    sha256: str
    source: str
    manifest: str
    commit: str
    author: str = ""
    author_email: str = ""
    introduced_by: str = ""

    @property
    def key(self) -> str:
        return f"{self.dest}@{self.sha256}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Landed | None:
        return _load(cls, text)

    def fields(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v not in ("", None)}


_T = TypeVar("_T", Alert, Landed)
_TYPES = {"str": str, "int": int}


def _load(cls: type[_T], text: str) -> _T | None:
    """``cls`` from its stored JSON, or None unless every field has the type syncd writes: a damaged or
    hand-edited row is dropped, never a reason to stop announcing."""
    try:
        raw = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        v = raw[f.name]
        if f.type == "tuple[str, ...]":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                return None
            v = tuple(v)
        elif type(v) is not _TYPES.get(str(f.type), object):
            return None
        values[f.name] = v
    try:
        return cls(**values)
    except TypeError:  # a required field is missing
        return None


# --------------------------------------------------------------------------------------- one pass
_TODO = {
    "checksum_mismatch": "the file in Artifactory is not the one reviewed: check the upload, or fix sha256 "
    "and size in {manifest} with a pull request",
    "size_mismatch": "the file in Artifactory has another size than the manifest says: check the upload, "
    "or fix size and sha256 in {manifest} with a pull request",
    "http_404": "Artifactory has no file at the source: check the source path in {manifest}, or upload it",
    "http_401": "Artifactory refused syncd's credentials: check [artifactory] token_file on this server",
    "http_403": "Artifactory refused syncd access to the source: check the token's permissions",
    "internal_error": "a bug in syncd: report it with the journal lines (journalctl -u syncd)",
    "publish_failed": "syncd could not write the dest on the export: see the error, fix the export",
    "symlink": "a symbolic link is at the dest: remove it; syncd then publishes the file",
    "blocked_path": "a symbolic link or a file is in the dest's path: remove it or choose another dest",
    "not_a_file": "something other than a file is at the dest: move it away or choose another dest",
    "unreadable": "syncd cannot inspect the dest (permissions, a stale NFS handle): check the export",
    "sha256_changed": "the manifest changes a published file: add replace = true to the entry in "
    "{manifest}, or restore the old sha256 (GPU servers may have the old file open)",
    "changed_outside": "the published file was changed by hand: restore it, or remove it so syncd publishes "
    "it again",
    "conflict": "two manifest entries claim this dest: remove one of them with a pull request",
    "in_staging": "the dest is syncd's staging directory: choose another dest in {manifest}",
    "foreign_file": "a file syncd did not publish is at the dest: move it away (syncd then publishes the "
    "reviewed file) or make the manifest match it",
}
_DEFAULT_TODO = "syncd retries at every pass; if it persists, check Artifactory and the network"


def _todo(cls: str, manifest: str) -> str:
    return _TODO.get(cls, _DEFAULT_TODO).format(manifest=manifest or "the manifest")


def stable_class(cls: str) -> str:
    """The error class a key uses: the transient ones (a 5xx, 408 or 429, a timeout, a reset) are one
    class, ``unavailable``, so a load balancer answering 502 then 503 then timing out is one problem, not
    a new one and a false recovery at every pass. What needs a person (404, 401, 403, a checksum or size
    mismatch, a full export) keeps its own class."""
    if (
        cls == "download_failed"
        or cls in ("http_408", "http_429")
        or (cls.startswith("http_5") and len(cls) == 8)
    ):
        return "unavailable"
    return cls


def _title(where: str, what: str) -> str:
    text = f"{where}: {what}"
    return text if len(text) <= TITLE_CHARS else text[: TITLE_CHARS - 1] + "…"


def _said(cls: str) -> str:
    return cls.replace("_", " ")


@dataclass
class PassView:
    """What one pass said, gathered from its events (:class:`Collector`)."""

    dry_run: bool = False
    commit: str = ""
    problems: dict[str, Alert] = field(default_factory=dict)
    published: list[Landed] = field(default_factory=list)
    judged: set[str] = field(default_factory=set)  # scopes this pass judged
    unjudged_dests: set[str] = field(default_factory=set)  # deferred or interrupted: unknown this pass

    def judges(self, alert: Alert) -> bool:
        return alert.scope in self.judged and not (alert.dest and alert.dest in self.unjudged_dests)


class Collector:
    """Gathers one pass's events into a :class:`PassView` (not thread-safe: the pass's thread)."""

    def __init__(self, export_root: str = "") -> None:
        self.export_root = export_root
        self.view = PassView()
        self._full: list[str] = []
        self._wrote = False  # an asset was written or failed for another reason than space

    def add(self, e: ev.Event) -> None:
        v = self.view
        if isinstance(e, ev.AssetFailed):
            if e.error_class == "export_full":
                self._full.append(e.dest)
                return
            self._wrote = True
            cls = e.error_class or "download_failed"
            self._add(
                Alert(
                    key=f"asset_failed:{e.dest}:{stable_class(cls)}",
                    kind="asset_failed",
                    scope="assets",
                    title=_title(e.dest, _said(cls)),
                    error=e.error,
                    todo=_todo(cls, e.manifest),
                    dest=e.dest,
                    source=e.source,
                    manifest=e.manifest,
                    commit=e.commit,
                    sha256=e.sha256,
                    failed_passes=e.failed_passes,
                )
            )
        elif isinstance(e, ev.AssetRefused):
            cause = e.cause or "refused"
            self._add(
                Alert(
                    key=f"asset_refused:{e.dest}:{cause}",
                    kind="asset_refused",
                    scope="assets",
                    title=_title(e.dest, f"refused ({_said(cause)})"),
                    error=e.error,
                    todo=_todo(cause, e.manifest),
                    dest=e.dest,
                    source=e.source,
                    manifest=e.manifest,
                    commit=e.commit,
                    sha256=e.sha256,
                )
            )
        elif isinstance(e, ev.ManifestInvalid):
            n = len(e.problems)
            self._add(
                Alert(
                    key=f"manifest_invalid:{e.manifest}",
                    kind="manifest_invalid",
                    scope="assets",
                    title=_title(e.manifest, f"invalid manifest ({n} problem{'s' if n != 1 else ''})"),
                    error=str(e.fields()["error"]),
                    todo=f"fix {e.manifest} with a pull request (run: syncd validate {e.manifest}); "
                    "none of its assets are synced until then",
                    manifest=e.manifest,
                    commit=e.commit,
                )
            )
        elif isinstance(e, ev.AssetPublished | ev.AssetAdopted):
            self._wrote = True
            if isinstance(e, ev.AssetPublished):
                v.published.append(Landed(e.dest, e.bytes, e.sha256, e.source, e.manifest, e.commit))
        elif isinstance(e, ev.AssetDeferred | ev.AssetInterrupted):
            v.unjudged_dests.add(e.dest)
        elif isinstance(e, ev.GitFailed):
            self._git_unreachable(e.error, e.serving_commit)
        elif isinstance(e, ev.GitRewritten) and not e.followed:
            self._add(
                Alert(
                    key="git_rewritten",
                    kind="git_rewritten",
                    scope="git",
                    title=_title("git", "branch history rewritten, not followed"),
                    error=e.error or "",
                    todo="the branch was force-pushed: restore it (push the old commit back), or set "
                    "[source] allow_force_push = true to follow it; syncd serves the last good commit",
                    commit=e.serving_commit or e.previous,
                )
            )
        elif isinstance(e, ev.SignatureRefused):
            self._add(
                Alert(
                    key=f"signature_refused:{e.status}",
                    kind="signature_refused",
                    scope="git",
                    title=_title("git", f"commit {e.commit[:12]} refused: {e.status.replace('_', ' ')}"),
                    error=e.error,
                    todo="the branch head must be signed by a key in [source] allowed_signers (or "
                    "gpg_keyring): sign the merge (or add the platform's key), or revert the unsigned "
                    "commit; syncd "
                    + (
                        f"serves the last verified commit {e.serving_commit[:12]}"
                        if e.serving_commit
                        else "has no verified commit to serve"
                    ),
                    commit=e.commit,
                    author=e.author,
                )
            )
        elif isinstance(e, ev.SourcePathMissing):
            self._add(
                Alert(
                    key=f"source_path_missing:{e.path}",
                    kind="source_path_missing",
                    scope="source",
                    title=_title("git", f"[source] path {e.path!r} missing"),
                    error=e.error,
                    todo="restore the directory in the repository, or fix [source] path; published files "
                    "are kept",
                    commit=e.commit,
                )
            )
        elif isinstance(e, ev.PassFinished):
            self._finish(e)
        elif isinstance(e, ev.PassFailed):
            self._failed(e)

    def _add(self, alert: Alert) -> None:
        self.view.problems[alert.key] = alert

    def _git_unreachable(self, error: str, serving: str) -> None:
        self._add(
            Alert(
                key="git_unreachable",
                kind="git_unreachable",
                scope="git",
                title=_title("git", "unreachable"),
                error=error,
                todo="check the git server, the network and syncd's git credentials ([source]); syncd "
                + (
                    f"serves the last fetched commit {serving[:12]}"
                    if serving
                    else "has nothing to serve yet"
                ),
                commit=serving,
            )
        )

    def _finish(self, e: ev.PassFinished) -> None:
        v = self.view
        v.dry_run, v.commit = e.dry_run, e.commit
        v.judged |= {"pass", "source", "git", "prune"}
        if e.prune_problem:
            self._add(
                Alert(
                    key=f"prune_refused:{e.prune_problem}",
                    kind="prune_refused",
                    scope="prune",
                    title=_title("prune", f"refused ({e.prune_problem}): nothing was removed"),
                    error=e.prune_error or "",
                    todo="check the branch and the manifests at its head; if the removal is meant, run "
                    "syncd prune (to list the files) and syncd prune --confirm",
                    commit=e.commit,
                )
            )
        if not e.source_error and e.git_problem not in ("not_in_clone", "no_verified_commit"):
            v.judged.add("assets")
        if self._full:
            self._add(
                Alert(
                    key="export_full",
                    kind="export_full",
                    scope="space",
                    title=_title("export", f"full: {len(self._full)} asset(s) could not be written"),
                    error=f"no space left on the export file system {self.export_root}".strip(),
                    todo=f"free space on the export file system {self.export_root} (df -h); syncd retries "
                    "at every pass",
                    dests=tuple(sorted(self._full)[:10]),
                )
            )
            v.judged.add("space")
        elif self._wrote:
            v.judged.add("space")

    def _failed(self, e: ev.PassFailed) -> None:
        v = self.view
        v.judged.add("pass")
        if e.error_type == "GitError":
            v.judged.add("git")
            self._git_unreachable(e.error, "")
        elif e.error_type == "ExportMissingError":
            self._add(
                Alert(
                    key="export_missing",
                    kind="export_missing",
                    scope="pass",
                    title=_title("export", "missing"),
                    error=e.error,
                    todo="mount the export (is the NFS mount up? systemctl status of its .mount unit); "
                    "syncd never creates the export root",
                )
            )
        else:
            self._add(
                Alert(
                    key=f"pass_failed:{e.error_type}",
                    kind="pass_failed",
                    scope="pass",
                    title=_title("syncd", f"no pass possible ({e.error_type})"),
                    error=e.error,
                    todo="see the error; journalctl -u syncd shows the details",
                )
            )


# ------------------------------------------------------------------------------------ across passes
@dataclass(frozen=True)
class Open:
    """An open problem: the alert as last seen, when it was first seen, in how many passes in a row."""

    alert: Alert
    first_seen: str
    passes: int


def update_open(before: Mapping[str, Open], view: PassView, now: str) -> dict[str, Open]:
    """The open problems after ``view``: those it saw (counted), and those it did not judge (as they
    were). A problem it judged and did not see is gone: it recovered."""
    out = {}
    for key, alert in view.problems.items():
        old = before.get(key)
        if old is not None and not alert.author and old.alert.author:
            alert = replace(
                alert, author=old.alert.author, author_email=old.alert.author_email,
                introduced_by=old.alert.introduced_by,
            )  # fmt: skip
        out[key] = Open(alert, old.first_seen if old else now, old.passes + 1 if old else 1)
    for key, old in before.items():
        if key not in out and not view.judges(old.alert):
            out[key] = old
    return out


@dataclass(frozen=True)
class Rules:
    """``[notify]``'s timing: ``repeat`` seconds (0: never remind), ``min_failures`` passes."""

    repeat: float = 86400.0
    min_failures: int = 1


def when(text: str) -> datetime | None:
    """A time the ledger holds, as an aware datetime (a zoneless one is UTC); None if it does not parse
    (a damaged row must never stop the notifications)."""
    try:
        t = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def due(p: Open, rules: Rules, now: datetime) -> bool:
    """Whether an open problem is ready to be announced (an unreadable first-seen time counts as old)."""
    if p.alert.kind == "git_unreachable":
        first = when(p.first_seen)
        age = (now - first).total_seconds() if first is not None else GIT_SECONDS
        return p.passes >= GIT_PASSES and age >= GIT_SECONDS
    if p.alert.kind == "asset_failed":
        return p.alert.failed_passes >= rules.min_failures
    return True


@dataclass(frozen=True)
class Message:
    """What one channel is told after one pass. ``recovered`` lists what it was told was open and no
    longer is; ``forget`` the keys to drop without a word (the channel does not want recoveries)."""

    channel: str
    new: tuple[Alert, ...] = ()
    reminders: tuple[Alert, ...] = ()
    recovered: tuple[Alert, ...] = ()
    published: tuple[Landed, ...] = ()
    forget: tuple[str, ...] = ()
    kind: str = ""  # "problem", "recovery", "published" or "test": the most urgent content

    @property
    def empty(self) -> bool:
        return not (self.new or self.reminders or self.recovered or self.published)


def compose(
    channel: str,
    wants: Iterable[str],
    open_: Mapping[str, Open],
    told: Mapping[str, tuple[str, Alert | None]],
    outbox: Iterable[Landed],
    rules: Rules,
    now: datetime,
    only: Callable[[Alert], bool] | None = None,
) -> Message:
    """The message for ``channel``: ``told`` is what it was told is open (key → (when, alert))."""
    wants = set(wants)
    mine = {k: p for k, p in open_.items() if only is None or only(p.alert)}
    new, reminders = [], []
    if "problem" in wants:
        for key, p in sorted(mine.items()):
            if key not in told:
                if due(p, rules, now):
                    new.append(p.alert)
            elif rules.repeat > 0:
                at = when(told[key][0])
                if at is None or (now - at).total_seconds() >= rules.repeat:
                    reminders.append(p.alert)
    gone = sorted(k for k in told if k not in mine)
    recovered: list[Alert] = []
    forget: list[str] = []
    for key in gone:
        alert = told[key][1]
        if "recovery" in wants and alert is not None:
            recovered.append(alert)
        else:
            forget.append(key)
    published = tuple(sorted(outbox, key=lambda x: x.dest)) if "published" in wants else ()
    kind = "problem" if new or reminders else "recovery" if recovered else "published" if published else ""
    return Message(channel, tuple(new), tuple(reminders), tuple(recovered), published, tuple(forget), kind)


# ------------------------------------------------------------------------------------------ words
def subject(host: str, m: Message) -> str:
    """``[syncd nfs01] 2 new problems: datasets/x.tar: checksum mismatch, … · 1 recovered``."""
    parts = []
    if m.new:
        parts.append(_counted(len(m.new), "new problem") + ": " + _list(a.title for a in m.new))
    if m.reminders:
        parts.append(
            _counted(len(m.reminders), "problem") + " still open: " + _list(a.title for a in m.reminders)
        )
    if m.recovered:
        parts.append(f"{len(m.recovered)} recovered: " + _list(a.title for a in m.recovered))
    if m.published:
        parts.append(_counted(len(m.published), "file") + " published: " + _list(x.dest for x in m.published))
    if m.kind == "test":
        parts.append("test message")
    return shown(f"[syncd {host}] " + " · ".join(parts), SUBJECT_CHARS)  # one line: never a header break


def _counted(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


def _list(items: Iterable[str], limit: int = 2) -> str:
    shown = list(items)
    head = ", ".join(shown[:limit])
    return head + (", …" if len(shown) > limit else "")


_LABELS = (
    ("dest", "dest"),
    ("source", "source"),
    ("manifest", "manifest"),
    ("commit", "commit"),
    ("introduced_by", "added by commit"),
    ("author", "author"),
    ("error", "error"),
    ("todo", "what to do"),
    ("dests", "assets"),
)


def _alert_lines(a: Alert) -> list[str]:
    shown = a.fields()
    lines = [f"* {a.title}"]
    for name, label in _LABELS:
        if name in shown:
            value = shown[name]
            if name == "commit" or name == "introduced_by":
                value = str(value)[:12]
            if name == "dests":
                value = ", ".join(a.dests)
            lines.append(f"  {label}: {value}")
    return lines


def body(host: str, m: Message, *, status_hint: bool = True) -> str:
    """The plain-text mail body: each problem with dest, source, manifest, commit, author, error and
    what to do; then what recovered and what landed; then where to look."""
    out: list[str] = []
    if m.kind == "test":
        out += [f"This is a test message from syncd on {host} (syncd notify --test).", ""]
    for title, items in (("New problems", m.new), ("Still open", m.reminders)):
        if items:
            out.append(f"{title} ({len(items)}):")
            for a in items:
                out += _alert_lines(a)
            out.append("")
    if m.recovered:
        out.append(f"Recovered ({len(m.recovered)}):")
        out += [f"* {a.title}" for a in m.recovered]
        out.append("")
    if m.published:
        out.append(f"Published ({len(m.published)}):")
        for x in m.published:
            who = f", added in {x.introduced_by[:12]} by {x.author}" if x.author else ""
            out.append(f"* {x.dest} ({_size(x.bytes)}, commit {x.commit[:12]}{who})")
        out.append("")
    if status_hint:
        out += [
            f"On {host}: syncd status   (what is wrong now)",
            "         journalctl -u syncd   (the details)",
        ]
    return "\n".join(shown(line, LINE_CHARS) for line in out).rstrip("\n") + "\n"


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def payload(host: str, m: Message, at: str) -> dict[str, object]:
    """The webhook's JSON body (schema: docs/notifications.md)."""
    return {
        "schema": 1,
        "host": host,
        "kind": m.kind,
        "at": at,
        "summary": subject(host, m),
        "problems": [{**a.fields(), "reminder": False} for a in m.new]
        + [{**a.fields(), "reminder": True} for a in m.reminders],
        "recovered": [a.fields() for a in m.recovered],
        "published": [x.fields() for x in m.published],
    }
