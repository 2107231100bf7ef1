"""``syncd status``: is the export in sync, and if not, what is wrong and what to do, from the ledger.

In: a :class:`~syncd.config.Config`. Out: a :class:`Status` (``to_json`` for ``--json`` and ``/healthz``,
``render`` for people, ``exit_code`` for a Nagios/Icinga check: 0 ok, 1 degraded, 3 stale).

It reads the ledger read-only (:class:`~syncd.ledger.Ledger` with ``readonly=True``): it never writes,
never takes the state lock, never creates the state directory or the ledger's ``-wal``/``-shm`` files, so
it works beside a running ``syncd run`` and when none runs. Everything it shows was recorded by the
passes themselves (the ``passes`` table, failures, the manifest cache) and by the daemon (its pid and
next poll), so ``status`` and the daemon can never disagree about what happened.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from syncd.config import Config
from syncd.errors import LedgerRefusedError
from syncd.ledger import Ledger, Problem
from syncd.progress import human
from syncd.report import shown
from syncd.systemd import ago

COUNTS = ("published", "pending", "failing", "refused", "orphaned", "deferred", "invalid_manifests")
MAX_LISTED = 50  # per kind of problem in the human output; --json lists all (pending: a sample)


@dataclass
class Status:
    """What ``syncd status`` knows; see docs/monitoring.md for the JSON schema."""

    state: str  # "ok", "degraded" or "stale"
    checked_at: str
    stale_after_s: float
    synced_commit: str | None = None
    head_commit: str | None = None
    last_pass: dict[str, Any] | None = None
    last_success_at: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    published_bytes: int = 0
    failing: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    invalid_manifests: list[dict[str, Any]] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    orphaned: list[dict[str, Any]] = field(default_factory=list)
    git_error: str | None = None
    git_problem: str | None = None
    source_error: str | None = None
    pass_error: str | None = None  # the last pass could not run at all (export missing, lock held …)
    prune_problem: str | None = None  # a tripped [prune] safety valve (plan.VALVES): nothing was removed
    prune_error: str | None = None
    pruned_total: int = 0  # files removed by [prune] since the ledger was made
    daemon: dict[str, Any] = field(default_factory=dict)
    stale_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    @property
    def exit_code(self) -> int:
        return {"ok": 0, "degraded": 1}.get(self.state, 3)


def _age(iso: object, now: datetime) -> float | None:
    """Seconds since ``iso`` (a ledger time; one without a zone is taken as UTC), None if unreadable."""
    if not isinstance(iso, str) or not iso:
        return None
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (now - when).total_seconds()


def _int(value: object) -> int:
    """A count from a pass summary; anything that is not a whole number counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _daemon(ledger: Ledger) -> dict[str, Any]:
    pid_text = ledger.get("daemon_pid")
    pid = int(pid_text) if pid_text and pid_text.isdigit() else None
    running = False
    if pid is not None:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                running = b"syncd" in fh.read()
        except OSError:
            running = False
    return {"pid": pid, "running": running, "next_poll_at": ledger.get("next_poll_at")}


def read(cfg: Config, now: datetime | None = None) -> Status:
    """The status of ``cfg``'s syncd. Raises :class:`LedgerRefusedError` (exit 2) when the state
    directory cannot be read by this user, :class:`~syncd.errors.LedgerError` when the ledger is
    unreadable."""
    now = now or datetime.now(UTC)
    base = Status(state="stale", checked_at=now.isoformat(timespec="seconds"), stale_after_s=cfg.stale_after)
    path = cfg.state_dir / "ledger.sqlite3"
    if not os.path.lexists(cfg.state_dir):
        base.stale_reason = f"syncd never ran: no state directory {cfg.state_dir}"
        return base
    if not os.access(cfg.state_dir, os.R_OK | os.X_OK):
        raise LedgerRefusedError(
            f"cannot read the state directory {cfg.state_dir} as this user: run syncd status as root or as "
            "the user syncd runs as (sudo -u syncd syncd status)"
        )
    if not os.path.lexists(path):
        base.stale_reason = f"syncd never ran: no ledger in {cfg.state_dir}"
        return base
    ledger = Ledger(path, readonly=True)
    try:
        return _from_ledger(ledger, base, now)
    finally:
        ledger.close()


def _from_ledger(ledger: Ledger, st: Status, now: datetime) -> Status:
    st.synced_commit = ledger.get("synced_commit")
    st.head_commit = ledger.get("head_commit")
    st.last_success_at = ledger.get("last_success_at")
    st.daemon = _daemon(ledger)
    finished = ledger.passes(1, finished=True)
    last = finished[0] if finished else None
    newest = ledger.passes(1)
    running = newest[0] if newest and newest[0].finished_at is None else None
    summary: Mapping[str, Any] = last.summary if last else {}
    if last is not None:
        st.last_pass = {
            "started_at": last.started_at,
            "finished_at": last.finished_at,
            "ok": bool(last.ok),
            "commit": last.commit,
            "duration_s": summary.get("duration_s"),
        }
    if running is not None:  # a pass row without an end: under way, or cut short by a crash or kill
        key = "pass_running_since" if st.daemon["running"] else "pass_interrupted_at"
        st.daemon[key] = running.started_at
    # The summary is JSON the ledger holds: read it defensively (a hand edit or a damaged row must not
    # turn status into a traceback).
    counts = summary.get("state")
    if isinstance(counts, dict):
        st.counts = {k: _int(counts.get(k)) for k in COUNTS}
        st.published_bytes = _int(counts.get("published_bytes"))
    pending = summary.get("pending_dests")
    st.pending = [str(d) for d in pending] if isinstance(pending, list) else []
    st.git_error = _text(summary.get("git_error"))
    st.git_problem = _text(summary.get("git_problem"))
    st.source_error = _text(summary.get("source_error"))
    st.pass_error = _text(summary.get("error"))
    st.prune_problem = _text(summary.get("prune_problem"))
    st.prune_error = _text(summary.get("prune_error"))
    st.pruned_total = _int(ledger.totals().get("pruned_files"))
    failures = ledger.failures()
    sources = ledger.cached_sources() if failures else {}  # decoded only when a failure needs its source
    for f in sorted(failures.values(), key=lambda f: f.dest):
        item = {"dest": f.dest, "attempts": f.attempts, "error": f.last_error, "since": f.first_failed_at}
        if f.kind is Problem.REFUSED:
            st.refused.append(item)
        else:
            st.failing.append({**item, "source": sources.get(f.dest)})
    st.invalid_manifests = [{"path": p, "problems": list(v)} for p, v in ledger.invalid_manifests().items()]
    orphans = ledger.orphaned_dests()
    st.orphaned = (
        [
            {"dest": p.dest, "since": p.orphaned_at}
            for p in sorted(ledger.published(orphans).values(), key=lambda p: p.dest)
            if p.orphaned_at is not None
        ]
        if orphans
        else []
    )
    age = _age(last.finished_at if last else None, now)
    if age is None:
        st.stale_reason = (
            "no pass has finished yet" if last is None else "the last pass's end time is unreadable"
        )
    elif age > st.stale_after_s:
        st.stale_reason = f"no pass finished for {ago(age).removesuffix(' ago')}"
    if st.stale_reason:
        st.state = "stale"
    elif not (last and last.ok) or problem_count(st):
        st.state = "degraded"
    else:
        st.state = "ok"
    return st


def problem_count(st: Status) -> int:
    c = st.counts
    n = c["failing"] + c["refused"] + c["invalid_manifests"] + c["pending"]
    return n + sum(1 for e in (st.git_error, st.source_error, st.pass_error, st.prune_error) if e)


_GIT_HINT = {
    "unreachable": "check the network, [source] url and credentials "
    "(journalctl -u syncd SYNCD_EVENT=git_fetch_failed)",
    "rewritten": "the branch was force-pushed: restore it, or set [source] allow_force_push = true "
    "to follow it",
    "not_in_clone": "the served commit is missing from the clone; the next successful fetch repairs it",
    "signature_refused": "sign the branch head with a key in [source] allowed_signers (or gpg_keyring), "
    "or revert the commit (see docs/audit.md)",
    "no_verified_commit": "nothing is synced until the branch head carries a trusted signature "
    "(see docs/audit.md)",
}


def render(st: Status, now: datetime | None = None) -> str:
    """One headline, then one line per problem with what to do; short when healthy."""
    now = now or datetime.now(UTC)
    lines = [_headline(st, now)]
    if st.state != "ok":
        if st.last_success_at:
            lines.append(f"  last success {st.last_success_at} ({ago(_age(st.last_success_at, now) or 0)})")
        elif st.last_pass:
            lines.append("  no pass has succeeded yet")
    d = st.daemon
    if d.get("pid") and not d.get("running") and st.state != "ok":
        lines.append(f"  daemon   pid {d['pid']} is not running → systemctl status syncd")
    if st.pass_error:
        lines.append(f"  pass     {st.pass_error} → fix this first: no pass could run")
    if st.git_error:
        hint = _GIT_HINT.get(st.git_problem or "", "see journalctl -u syncd")
        lines.append(f"  git      {st.git_error} → {hint}")
    if st.source_error:
        lines.append(f"  source   {st.source_error} → fix [source] path or the repository layout")
    if st.prune_error:
        lines.append(
            f"  prune    {st.prune_error} → check the branch; if the removal is meant, syncd prune --confirm"
        )
    for f in st.failing[:MAX_LISTED]:
        lines.append(
            f"  failing  {f['dest']}: {f['attempts']} attempt(s) since {f['since']}: {f['error']}"
            " → check the asset's source in Artifactory (retried with backoff)"
        )
    lines += _more(st.failing)
    for f in st.refused[:MAX_LISTED]:
        lines.append(
            f"  refused  {f['dest']}: {f['error']} → fix the manifest, or move the file at the dest aside"
        )
    lines += _more(st.refused)
    for m in st.invalid_manifests[:MAX_LISTED]:
        problems = m["problems"]
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        first = str(problems[0]).removeprefix(f"{m['path']}: ") if problems else "?"
        lines.append(f"  invalid  {m['path']}: {first}{more} → syncd validate {m['path']}")
    lines += _more(st.invalid_manifests)
    if st.counts["pending"]:
        sample = ", ".join(st.pending[:5]) + (" …" if st.counts["pending"] > 5 else "")
        lines.append(f"  pending  {st.counts['pending']} asset(s) not yet downloaded: {sample} → next pass")
    for o in st.orphaned[:MAX_LISTED]:
        lines.append(f"  orphaned {o['dest']} (since {o['since']}) → no manifest lists it; see syncd prune")
    lines += _more(st.orphaned)
    if st.state == "stale" and d.get("next_poll_at"):
        lines.append(f"  next poll was due {d['next_poll_at']} → systemctl status syncd; journalctl -u syncd")
    return "\n".join(shown(line) for line in lines)


def _headline(st: Status, now: datetime) -> str:
    """``in sync at 4f2a9c1 (2 min ago) · 312 assets · 1.2 TiB`` / ``2 problems …`` / ``stale: …``."""
    if st.state == "stale":
        return f"stale: {st.stale_reason}"
    commit = (st.last_pass or {}).get("commit") or st.synced_commit or ""
    at = f" at {commit[:7]}" if commit else ""
    age = _age((st.last_pass or {}).get("finished_at"), now)
    when = ago(age) if age is not None else "?"
    size = f" · {human(st.published_bytes)}" if st.published_bytes else ""
    assets = f" · {st.counts['published']} assets{size}"
    if st.state == "ok":
        return f"in sync{at} ({when}){assets}"
    n = problem_count(st)
    return f"{n} problem{'s' if n != 1 else ''}{at} (last pass {when}){assets}"


def _more(items: list[dict[str, Any]]) -> list[str]:
    if len(items) <= MAX_LISTED:
        return []
    return [f"  … and {len(items) - MAX_LISTED} more (syncd status --json lists all)"]
