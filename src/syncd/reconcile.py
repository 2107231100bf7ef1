"""One reconcile pass: fetch git → desired state → plan → download/verify/publish → ledger → events.

``Reconciler.run_pass`` is the engine behind both ``syncd sync`` (one pass) and ``syncd run`` (a pass per
interval). It is level-triggered: each pass compares the manifests at the branch head with the ledger and
the export, so a failed asset is retried and a file deleted by hand comes back. It never raises for one bad
manifest or one failing asset: those are events (:mod:`syncd.events`, one each) and counted in the
:class:`PassResult`. It tells the world what happened only through events; it records each pass in the
ledger (for ``syncd status`` and the metrics' counters).
It raises a :class:`~syncd.errors.SyncdError` only when no pass is possible at all (export root missing,
git unreachable before anything was ever fetched, ledger unusable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import TextIO

import tenacity

from syncd import audit, incremental, prune, retry, signatures, verify
from syncd import events as ev
from syncd.audit import AuditObserver
from syncd.config import Config
from syncd.desired import Desired, load_desired
from syncd.errors import (
    FetchError,
    GitError,
    StopRequested,
    SyncdError,
    error_class,
    internal_error,
)
from syncd.fetch import Fetcher
from syncd.gitsource import ManifestRepo
from syncd.ledger import How, Ledger, Problem, Published, now
from syncd.manifest import Asset
from syncd.plan import Action, Kind, Pruning, plan, signature_gate, verify_slice
from syncd.progress import Progress
from syncd.provenance import Tracer
from syncd.publish import Export, StagedFile
from syncd.report import count_dry
from syncd.throttle import Throttle

PENDING_SAMPLE = 20  # pending dests kept in a pass's ledger summary for `syncd status`
# Group commit: verified files under GROUP_MAX_SIZE wait (at most GROUP_WAIT seconds, GROUP_FILES of them)
# to be made durable by one flush of the file system, then are linked into place one by one. Bigger files
# flush and publish in their download thread (their own bytes dominate the flush).
GROUP_MAX_SIZE = 4 << 20
GROUP_FILES = 128
GROUP_WAIT = 0.2


@dataclass
class PassResult:
    """What one pass did; ``ok`` means the export matches the manifests at ``commit``."""

    commit: str = ""
    planned: list[Action] = field(default_factory=list)
    published: int = 0
    adopted: int = 0
    skipped: int = 0
    refused: int = 0
    failed: int = 0
    orphaned: int = 0
    deferred: int = 0
    pending: int = 0  # downloads or verifications planned but not done (a stop, or a dry run)
    invalid: dict[str, tuple[str, ...]] = field(default_factory=dict)
    bytes: int = 0
    git_error: str = ""
    git_problem: GitProblem | None = None
    source_error: str = ""
    dry_run: bool = False
    head: str = ""  # the head fetched (differs from commit when the branch was rewritten)
    pending_dests: list[str] = field(default_factory=list)
    pruning: Pruning | None = None  # with [prune] enabled: what pruning decided (a dry run: would decide)
    pruned: int = 0
    pruned_bytes: int = 0
    prune_problem: str = ""  # a tripped safety valve (plan.VALVES)
    prune_error: str = ""

    @property
    def ok(self) -> bool:
        return self.healthy and not self.pending

    @property
    def healthy(self) -> bool:
        """Nothing failed, refused or invalid (downloads may still be pending: a dry run's plan)."""
        bad = self.refused or self.failed or self.deferred or self.invalid
        return not (bad or self.git_error or self.source_error or self.prune_problem)


class GitProblem(StrEnum):
    """Why a pass serves an older commit than the branch head (or none)."""

    UNREACHABLE = "unreachable"  # the fetch failed
    REWRITTEN = "rewritten"  # the branch no longer descends from the last synced commit
    NOT_IN_CLONE = "not_in_clone"  # the commit to serve is missing from the clone
    SIGNATURE = "signature_refused"  # the head's signature did not verify: the last verified one is served
    UNVERIFIED = "no_verified_commit"  # ... and no verified commit exists: nothing was planned


@dataclass(frozen=True)
class _Outcome:
    action: Action
    error: SyncdError | None = None
    bytes: int = 0
    seconds: float = 0.0
    how: How = How.DOWNLOADED
    identity: str = ""  # the file's staging.identity at its dest afterwards
    mode_restored: bool = False
    staged: StagedFile | None = None  # verified, waiting for its group's flush and publish


class Reconciler:
    """Owns the long-lived pieces (git clone, HTTP client, ledger) across passes."""

    def __init__(
        self,
        cfg: Config,
        *,
        dry_run: bool = False,
        progress_stream: TextIO | None = None,
        events: ev.EventBus | None = None,
        respect_backoff: bool = False,
        fetch: bool = True,
        periodic_verify: bool = False,
        prune_mode: str = "",
    ) -> None:
        self.cfg = cfg
        # "list" (syncd prune: a dry run that plans pruning even when [prune] is off) or "confirm" (syncd
        # prune --confirm: a pass that prunes past the safety valves).
        self.prune_mode = prune_mode
        self.fetch = fetch
        self.respect_backoff = respect_backoff
        self.dry_run = dry_run
        self.progress_stream = progress_stream
        self.events = events if events is not None else ev.EventBus([ev.LogObserver()])
        self.emit = self.events.emit
        self.stop = threading.Event()
        self.repo = ManifestRepo(cfg.source, cfg.state_dir, cfg.timeout)
        self.ledger = Ledger.in_state_dir(cfg.state_dir, readonly=dry_run)
        self.fetcher = Fetcher(
            cfg.artifactory,
            timeout=cfg.timeout,
            concurrency=cfg.concurrency,
            stop=self.stop,
            segments=cfg.segments,
            segment_min_size=cfg.segment_min_size,
        )
        src = cfg.source
        self.verifier = (
            signatures.Verifier(src.verify_signatures, src.trust_file, timeout=min(cfg.timeout, 30.0))
            if src.verify_signatures != "off" and src.trust_file is not None
            else None
        )
        self._verdicts: dict[str, signatures.Verdict] = {}  # commit → verdict, while the trust file is same
        self._trust_digest = ""
        self.periodic_verify = periodic_verify and cfg.verify_interval is not None
        self.tracer: Tracer | None = None
        self.audit: AuditObserver | None = None
        if not dry_run:  # the audit log hears each event first: durable before the others hear of it
            seq, _, digest = (self.ledger.get("audit_head") or "").partition(":")
            expected = (int(seq), digest) if seq.isdigit() and digest else None
            self.audit = AuditObserver(
                cfg.state_dir / audit.FILE_NAME, anchor=self._anchor, expected=expected
            )
            self.events.add(self.audit, first=True)
        self._throttle = Throttle(None)
        self._published: dict[str, str] = {}  # dest → identity at its dest, set by the download threads

    def close(self) -> None:
        if self.audit is not None:
            self.events.remove(self.audit)
            with contextlib.suppress(SyncdError):
                self.audit.close()
        self.fetcher.close()
        self.ledger.close()

    def _anchor(self, head: tuple[int, str]) -> None:
        """Where the audit log ended after a flush, kept in the ledger (``syncd audit --verify``)."""
        self.ledger.set("audit_head", f"{head[0]}:{head[1]}")

    def run_pass(self) -> PassResult:
        """One full reconcile pass. Raises :class:`SyncdError` only if no pass is possible (recorded in
        the ledger as a failed pass when the ledger itself is usable)."""
        started, started_at = time.monotonic(), now()
        result = PassResult(dry_run=self.dry_run)
        self.emit(ev.PassStarted(dry_run=self.dry_run, started_at=started_at))
        pass_id = None if self.dry_run else self.ledger.pass_started()
        try:
            self._run(result)
        except SyncdError as exc:
            if pass_id is not None:
                self._record_failed_pass(pass_id, exc, result)
            raise
        except Exception as exc:  # a bug: recorded in our words (type and place), then the caller logs it
            if pass_id is not None:
                self._record_failed_pass(pass_id, internal_error(exc), result)
            raise
        finished = self._finished(result, started_at, time.monotonic() - started)
        if pass_id is not None:
            self.ledger.pass_finished(
                pass_id,
                ok=result.ok,
                commit=result.commit or None,
                head=result.head or None,
                summary={**ev.summary(finished), "pending_dests": result.pending_dests[:PENDING_SAMPLE]},
                totals=_totals(result),
            )
        ledger = self.ledger
        self.emit(
            dataclasses.replace(
                finished,
                totals=ledger.totals(),
                last_success_at=ledger.get("last_success_at"),
                synced_commit=ledger.get("synced_commit"),
            )
        )
        return result

    def _run(self, result: PassResult) -> None:
        export = Export(self.cfg.export_root, self.cfg.staging)
        export.open(create_staging=not self.dry_run)
        try:
            if not self.dry_run:
                leftovers = export.clean_staging()
                if leftovers:
                    self.emit(ev.StagingCleaned(files=len(leftovers), staging=str(self.cfg.staging)))
            head = self._gate(self._head(result), result)
            result.commit = head or ""
            if head and self._servable(head, result):
                verdict = self._verdicts.get(head)
                self.tracer = Tracer(
                    self.repo,
                    head,
                    "good" if verdict else "off",
                    verdict.signer if verdict else "",
                    verdict.key if verdict else "",
                )
                self._reconcile(export, head, result)
        finally:
            export.close()
        if self.dry_run:
            count_dry(result)

    def _finished(self, result: PassResult, started_at: str, seconds: float) -> ev.PassFinished:
        """The PassFinished event for ``result``, with the export's state counted from the ledger."""
        wanted, orphaned, wanted_bytes = self.ledger.counts()
        failures = self.ledger.failures()
        state = ev.Counts(
            published=wanted,
            pending=result.pending,
            failing=sum(1 for f in failures.values() if f.kind is Problem.FAILED),
            refused=sum(1 for f in failures.values() if f.kind is Problem.REFUSED),
            orphaned=orphaned,
            deferred=result.deferred,
            invalid_manifests=len(result.invalid),
            published_bytes=wanted_bytes,
        )
        if self.dry_run:  # nothing was recorded: count what the plan says instead
            state = dataclasses.replace(state, refused=result.refused, orphaned=result.orphaned)
        return ev.PassFinished(
            commit=result.commit,
            ok=result.ok,
            dry_run=self.dry_run,
            published=result.published,
            adopted=result.adopted,
            skipped=result.skipped,
            refused=result.refused,
            failed=result.failed,
            orphaned=result.orphaned,
            deferred=result.deferred,
            pending=result.pending,
            invalid_manifests=len(result.invalid),
            git_error=result.git_error or None,
            git_problem=result.git_problem.value if result.git_problem else None,
            source_error=result.source_error or None,
            bytes=result.bytes,
            duration_s=round(seconds, 3),
            started_at=started_at,
            finished_at=now(),
            head=result.head or None,
            pruned=result.pruned,
            prune_problem=result.prune_problem or None,
            prune_error=result.prune_error or None,
            state=state,
        )

    def _record_failed_pass(self, pass_id: int, exc: SyncdError, result: PassResult) -> None:
        """A pass that could not run at all, in the ledger (unless the ledger is what failed)."""
        git_failed = isinstance(exc, GitError) and not result.head
        with contextlib.suppress(SyncdError):
            self.ledger.pass_finished(
                pass_id,
                ok=False,
                commit=None,
                head=None,
                summary={"error": str(exc), "error_type": type(exc).__name__},
                totals={"git_fetch_failed": 1} if git_failed else {},
            )

    def _narrow(self, export: Export, head: str) -> incremental.Narrow | None:
        synced = incremental.since_last(
            self.cfg,
            self.ledger,
            dry_run=self.dry_run,
            prune_mode=self.prune_mode,
            periodic=self.periodic_verify,
        )
        return incremental.narrow(self.cfg, self.ledger, self.repo, export, head, synced) if synced else None

    def _reconcile(self, export: Export, head: str, result: PassResult) -> None:
        narrow = self._narrow(export, head)
        if narrow is not None:  # only the changed manifest files' dests are planned (or none at all)
            desired, published, observed = narrow.desired, narrow.published, narrow.observed
            result.skipped = narrow.skipped
            wanted = narrow.wanted
        else:
            desired = load_desired(self.repo, self.ledger, head)
            self._report_invalid(desired, result)
            published = self.ledger.published()
            observed = dict(export.observe_all(sorted(desired.assets)))
            wanted = sorted(desired.assets)
        result.planned = plan(
            desired.assets,
            desired.conflicts,
            published,
            observed,
            self._deferred(desired),
            staging=export.staging_in_root(),
            recheck=self._slice(desired, published),
        )
        if not self.dry_run:
            # Files published before identities were recorded (schema 4): recorded as they are now.
            baseline = {
                a.dest: observed[a.dest].identity
                for a in result.planned
                if a.kind is Kind.SKIP and not published[a.dest].identity and observed[a.dest].identity
            }
            if baseline:
                self.ledger.set_identities(baseline)
            self._execute(export, result)
            self.ledger.record_directories(export.created())
            self._settle(desired, result, published)
            self.ledger.set("wanted_digest", f"{head}:{incremental.dests_digest(wanted)}")
        if self.cfg.prune.enabled or self.prune_mode:
            trusted = result.git_problem not in UNTRUSTED
            fetched = result.git_problem is not GitProblem.UNREACHABLE
            confirm = self.prune_mode == "confirm"
            decided = prune.decide(
                self.ledger,
                export,
                desired,
                self.cfg.prune,
                trusted=trusted,
                fetched=fetched,
                confirm=confirm,
            )
            result.pruning = decided
            if not self.dry_run:
                done = prune.carry_out(self.ledger, export, decided, self.emit, result.commit)
                result.pruned, result.pruned_bytes = done.pruned, done.pruned_bytes
                result.prune_problem, result.prune_error = done.problem, done.error

    def _slice(self, desired: Desired, published: dict[str, Published]) -> frozenset[str]:
        """``[verify] interval`` (``syncd run`` only): the published files to hash again this pass, so
        that the whole export is re-hashed once per interval; the cursor is kept in the ledger."""
        if not self.periodic_verify or self.dry_run or self.cfg.verify_interval is None:
            return frozenset()
        sizes = {
            d: p.size
            for d, p in published.items()
            if d in desired.assets and p.sha256 == desired.assets[d].sha256
        }
        share = self.cfg.interval / self.cfg.verify_interval
        cap = self.cfg.verify_max_rate * 1e6 * self.cfg.interval / 2  # at most half an interval's reading
        picked, cursor = verify_slice(sizes, self.ledger.get("verify_cursor") or "", share, cap)
        if cursor is not None:
            self.ledger.set("verify_cursor", cursor)
        return frozenset(picked)

    def _servable(self, head: str, result: PassResult) -> bool:
        """Whether this pass can plan at ``head``; if not, it plans nothing (so orphans nothing).

        ``head`` must be in the clone (the last good commit may not be, after a rewritten branch and a
        fresh clone), and ``[source] path`` must be a directory there: a missing one (a typo, a renamed
        directory) would find no manifests and orphan every published file."""
        if not self.repo.has_commit(head):
            result.git_error = (result.git_error + "; " if result.git_error else "") + (
                f"commit {head[:12]} is not in the clone; nothing was planned"
            )
            result.git_problem = result.git_problem or GitProblem.NOT_IN_CLONE
            return False
        path = self.cfg.source.path
        if self.repo.has_directory(head, path):
            return True
        result.source_error = (
            f"[source] path {path!r} is not a directory at commit {head[:12]} of branch "
            f"{self.cfg.source.branch!r}; nothing was planned, published files are kept"
        )
        self.emit(ev.SourcePathMissing(path=path, commit=head, error=result.source_error))
        return False

    def _head(self, result: PassResult) -> str:
        """The commit this pass serves: the fetched head, or the last good commit when git failed or
        the branch history was rewritten (unless ``allow_force_push``)."""
        cached = self.ledger.get("manifests_commit")
        branch = self.cfg.source.branch
        if not self.fetch:
            head = self.repo.last_fetched()
            reason = "another syncd owns the clone; last fetched head"
            self.emit(ev.GitNotFetched(commit=head, reason=reason))
            return head
        try:
            head = self.repo.fetch(stop=self.stop)
        except GitError as exc:
            if not cached:
                raise
            result.git_error, result.git_problem = str(exc), GitProblem.UNREACHABLE
            self.emit(ev.GitFailed(error=str(exc), source=self.cfg.source.url, serving_commit=cached))
            return cached
        result.head = head
        self.emit(ev.GitFetched(commit=head, branch=branch))
        if not cached or cached == head:
            return head
        if self.repo.has_commit(cached) and self.repo.is_ancestor(cached, head):
            return head
        if self.cfg.source.allow_force_push:
            self.emit(ev.GitRewritten(previous=cached, commit=head, branch=branch, followed=True))
            return head
        result.git_problem = GitProblem.REWRITTEN
        result.git_error = (
            f"branch {branch!r} was rewritten: {head[:12]} does not descend from the "
            f"last synced commit {cached[:12]}"
        )
        self.emit(
            ev.GitRewritten(
                previous=cached,
                commit=head,
                branch=branch,
                followed=False,
                serving_commit=cached,
                error=result.git_error + "; still serving the last good commit (set [source] "
                "allow_force_push = true to follow it)",
            )
        )
        return cached

    def _gate(self, head: str, result: PassResult) -> str | None:
        """With ``[source] verify_signatures``: ``head`` if its signature verifies, else the last commit
        planned at if that one does (as for a rewritten branch), else None (nothing is planned)."""
        if self.verifier is None:
            return head
        self._check_trust_file()
        verdict = self._verdict(head)
        if verdict.ok:
            return head
        last = self.ledger.get("manifests_commit")
        fallback = last if last and last != head and self.repo.has_commit(last) else None
        serve = signature_gate(
            head, verdict.ok, fallback, fallback is not None and self._verdict(fallback).ok
        )
        author = ""
        with contextlib.suppress(SyncdError):
            info = self.repo.commit_info(head)
            author = f"{info.author_name} <{info.author_email}>"
        result.git_problem = GitProblem.SIGNATURE if serve else GitProblem.UNVERIFIED
        serving = f"still serving the last verified commit {serve[:12]}" if serve else "nothing was planned"
        error = f"commit {head[:12]} by {author or 'unknown'} was refused: {verdict.reason}; {serving}"
        result.git_error = (result.git_error + "; " if result.git_error else "") + error
        self.emit(
            ev.SignatureRefused(
                commit=head,
                author=author,
                status=str(verdict.status),
                error=error,
                serving_commit=serve,
                key=verdict.key or None,
            )
        )
        return serve

    def _check_trust_file(self) -> None:
        """Forget every remembered verdict when the allowed-signers file or keyring changed: a key taken
        out of it must stop vouching for commits at the next pass, not at the next restart."""
        path = self.cfg.source.trust_file
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else ""
        except OSError:
            digest = "unreadable"  # the verifier says why, at every commit
        if digest != self._trust_digest:
            self._verdicts.clear()
            self._trust_digest = digest

    def _verdict(self, commit: str) -> signatures.Verdict:
        """The signature verdict of ``commit`` (memoized; logged once when good)."""
        assert self.verifier is not None
        if commit not in self._verdicts:
            try:
                sig, payload, when = self.repo.signed_parts(commit)
            except GitError as exc:
                return signatures.Verdict(signatures.Status.ERROR, reason=str(exc))
            verdict = self.verifier.verify(sig, payload or b"", when)
            if verdict.status is signatures.Status.ERROR:
                return verdict  # a tool failure is asked again next pass, not remembered
            if len(self._verdicts) > 1000:
                self._verdicts.clear()
            self._verdicts[commit] = verdict
            if verdict.ok:
                self.emit(ev.SignatureVerified(commit=commit, signer=verdict.signer, key=verdict.key))
        return self._verdicts[commit]

    def _deferred(self, desired: Desired) -> dict[str, str]:
        """Dests whose downloads wait out their across-pass backoff (daemon only)."""
        if not self.respect_backoff:
            return {}
        now = datetime.now(UTC)
        out = {}
        for dest, f in self.ledger.failures().items():
            asset = desired.assets.get(dest)
            if asset is None or asset.sha256 != f.sha256 or f.kind is Problem.REFUSED:
                continue  # a refusal never reached Artifactory: nothing to back off from
            until = retry.next_attempt(f.attempts, datetime.fromisoformat(f.last_failed_at))
            if until > now:
                out[dest] = (
                    f"failed {f.attempts} passes in a row (last: {f.last_error[:200]}); "
                    f"next try after {until:%H:%M:%S} UTC"
                )
        return out

    def _report_invalid(self, desired: Desired, result: PassResult) -> None:
        result.invalid = desired.invalid
        for path, problems in desired.invalid.items():
            self.emit(ev.ManifestInvalid(manifest=path, commit=desired.commit, problems=problems))

    def _execute(self, export: Export, result: PassResult) -> None:
        work = [a for a in result.planned if a.kind in (Kind.DOWNLOAD, Kind.VERIFY, Kind.RECHECK)]
        total = sum(a.asset.size for a in work if a.asset and a.kind is Kind.DOWNLOAD)
        progress = Progress(self.progress_stream, len(work), total, self._progress if work else None)
        for a in result.planned:
            if a.kind is Kind.SKIP:
                result.skipped += 1
            elif a.kind is Kind.REFUSE:
                self._refuse(a, a.reason, result, cause=a.cause)
            elif a.kind is Kind.DEFER:
                result.deferred += 1
                self.emit(ev.AssetDeferred(dest=a.dest, reason=a.reason, commit=result.commit))
        keep = {a.dest for a in result.planned if a.kind is Kind.DEFER}
        self._throttle = Throttle(self.cfg.verify_max_rate * 1e6, self.stop)
        self._published.clear()
        queue = iter(work)
        limit = 2 * self.cfg.concurrency  # bounded: memory does not grow with the number of assets
        with (
            ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="syncd-dl") as pool,
            self.ledger.batch(),
        ):
            running: set[Future[_Outcome]] = set()
            group: list[_Outcome] = []  # verified small files waiting for one flush (group commit)
            since = 0.0
            while True:
                for action in itertools.islice(queue, limit - len(running)):
                    running.add(pool.submit(self._work, export, action, progress))
                if not running:
                    break
                done, running = wait(running, timeout=GROUP_WAIT, return_when=FIRST_COMPLETED)
                for fut in done:
                    out = fut.result()
                    if out.staged is not None:
                        since = since if group else time.monotonic()
                        group.append(out)
                    else:
                        self._settle_one(out, result, keep, progress)
                if group and (
                    len(group) >= GROUP_FILES or not running or time.monotonic() - since >= GROUP_WAIT
                ):
                    self._commit(export, group, result, keep, progress)
                    group = []
        progress.finish()
        # Partials stay only for assets still wanted whose download broke on a transport fault.
        export.clean_staging(keep=keep)

    def _commit(
        self, export: Export, group: list[_Outcome], result: PassResult, keep: set[str], progress: Progress
    ) -> None:
        """Publish a group of verified files: one flush makes them all durable (where the file system can
        do it), then each is linked into place and recorded."""
        export.flush_group([o.staged for o in group if o.staged is not None])
        for out in group:
            assert out.staged is not None
            try:
                self._published[out.action.dest] = out.staged.publish(replace=out.action.replace)
                done = dataclasses.replace(out, staged=None)
            except SyncdError as exc:
                out.staged.discard()
                done = _Outcome(out.action, error=exc)
            except Exception as exc:  # a bug publishing one asset fails that asset only
                out.staged.discard()
                done = _Outcome(out.action, error=internal_error(exc))
            self._settle_one(done, result, keep, progress)

    def _settle_one(self, out: _Outcome, result: PassResult, keep: set[str], progress: Progress) -> None:
        try:
            self._record(out, result)
        except SyncdError:
            raise  # the ledger is unusable: no pass is possible
        except Exception as exc:  # a bug recording one asset fails that asset only
            self._record(_Outcome(out.action, error=internal_error(exc)), result)
        if isinstance(out.error, FetchError) and out.error.retryable:
            keep.add(out.action.dest)
        progress.file_done()

    def _progress(self, files_done: int, files: int, bytes_done: int, total: int) -> None:
        self.emit(ev.PassProgress(files_done, files, bytes_done, total))

    def _work(self, export: Export, action: Action, progress: Progress) -> _Outcome:
        asset = action.asset
        assert asset is not None
        started = time.monotonic()
        try:
            if self.stop.is_set():
                raise _Stopping("stopping: download not started")
            if action.kind is Kind.VERIFY:
                return self._verify(export, action)
            if action.kind is Kind.RECHECK:
                return self._recheck(export, action)
            attempts = retry.within_pass(
                self.cfg.retries, self.cfg.backoff, self.cfg.backoff_max, self.stop, self._retrying(asset)
            )
            staged = None
            for attempt in attempts:
                with attempt:
                    staged = self._attempt(export, action, progress, group=True)
        except SyncdError as exc:
            return _Outcome(action, error=exc)
        except Exception as exc:  # one asset's work is a hard boundary: a bug here fails only this asset
            return _Outcome(action, error=internal_error(exc))
        return _Outcome(action, bytes=asset.size, seconds=time.monotonic() - started, staged=staged)

    def _attempt(
        self, export: Export, action: Action, progress: Progress, *, group: bool = False
    ) -> StagedFile | None:
        """One download attempt: resume what staging holds, verify, publish. A transport fault keeps the
        partial for the next attempt; anything else removes it. With ``group``, a small file is returned
        verified but not published: it waits for its group's flush (:meth:`_commit`)."""
        asset = action.asset
        assert asset is not None
        staged = export.stage(asset.dest, asset.sha256, asset.size)
        stop = self.stop

        def on_bytes(n: int) -> None:
            progress.add_bytes(n)
            if stop.is_set():
                raise _Stopping("stopping: download interrupted (partial kept for resume)")

        try:
            self.fetcher.download(asset, staged, on_bytes)
        except FetchError as exc:
            if exc.retryable:
                staged.keep()
            else:
                staged.discard()
            raise
        except BaseException:
            staged.discard()
            raise
        if group and asset.size < GROUP_MAX_SIZE:
            return staged
        try:
            self._published[asset.dest] = staged.publish(replace=action.replace)
        except BaseException:
            staged.discard()
            raise
        return None

    def _retrying(self, asset: Asset) -> Callable[[tenacity.RetryCallState], None]:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            self.emit(
                ev.AssetRetry(
                    dest=asset.dest,
                    attempt=state.attempt_number,
                    error=str(exc),
                    wait_s=round(wait, 2),
                    source=asset.source,
                )
            )

        return before_sleep

    def _verify(self, export: Export, action: Action) -> _Outcome:
        asset = action.asset
        assert asset is not None
        actual, size = export.hash_file(asset.dest)
        if actual != asset.sha256 or size != asset.size:
            raise _Refusal(
                f"a different file is at dest (sha256 {actual}, {size} bytes) and syncd did not "
                "publish it; left untouched"
            )
        return _Outcome(action, how=How.ADOPTED, identity=export.make_read_only(asset.dest))

    def _recheck(self, export: Export, action: Action) -> _Outcome:
        """Hash a published file again; a different sha256 or size is a :class:`_Damaged` refusal."""
        asset = action.asset
        assert asset is not None
        throttle = self._throttle if action.cause == "periodic" else None

        def on_bytes(n: int) -> None:
            if self.stop.is_set() or (throttle is not None and not throttle.take(n)):
                raise _Stopping("stopping: re-hash interrupted")

        actual, size = export.hash_file(asset.dest, on_bytes)
        if actual != asset.sha256 or size != asset.size:
            seen = export.observe(asset.dest)
            raise _Damaged(
                f"re-hashed: sha256 {actual}, {size} bytes, not the published {asset.sha256}", seen.identity
            )
        mode = export.observe(asset.dest).mode
        return _Outcome(
            action, how=How.ADOPTED, identity=export.make_read_only(asset.dest), mode_restored=mode != 0o444
        )

    def _record(self, out: _Outcome, result: PassResult) -> None:
        a = out.action
        asset = a.asset
        assert asset is not None
        commit = result.commit
        if isinstance(out.error, _Damaged):
            self.ledger.mark_damaged(asset.dest, out.error.identity, str(out.error))
            self._refuse(
                a,
                f"file at dest was changed outside syncd ({out.error}); run syncd verify --repair to "
                "quarantine it and restore the reviewed file",
                result,
                cause="changed_outside",
            )
        elif isinstance(out.error, _Refusal):
            self._refuse(a, str(out.error), result, cause="foreign_file")
        elif isinstance(out.error, StopRequested):
            result.pending += 1  # not the asset's fault: no failure row, no backoff
            result.pending_dests.append(asset.dest)
            self.emit(ev.AssetInterrupted(dest=asset.dest, error=str(out.error), commit=commit))
        elif out.error is not None:
            result.failed += 1
            failed_passes = self.ledger.record_failure(asset.dest, asset.sha256, str(out.error))
            self.emit(
                ev.AssetFailed(
                    dest=asset.dest,
                    source=asset.source,
                    manifest=asset.manifest,
                    sha256=asset.sha256,
                    error=str(out.error),
                    failed_passes=failed_passes,
                    commit=commit,
                    error_class=error_class(out.error),
                )
            )
        elif a.kind is Kind.RECHECK:
            result.skipped += 1
            self.ledger.set_identities({asset.dest: out.identity})
            self.emit(
                ev.AssetRechecked(
                    dest=asset.dest,
                    reason=a.reason,
                    mode_restored=out.mode_restored,
                    commit=commit,
                    sha256=asset.sha256,
                    bytes=asset.size,
                )
            )
        elif out.how is How.ADOPTED:
            result.adopted += 1
            provenance = self._provenance(asset)
            self.ledger.record_published(
                asset, commit, How.ADOPTED, identity=out.identity, provenance=provenance
            )
            self.emit(
                ev.AssetAdopted(
                    dest=asset.dest,
                    sha256=asset.sha256,
                    bytes=asset.size,
                    manifest=asset.manifest,
                    commit=commit,
                    provenance=provenance,
                    source=asset.source,
                )
            )
        else:
            result.published += 1
            result.bytes += out.bytes
            provenance = self._provenance(asset)
            how = How.REPLACED if a.replace else How.DOWNLOADED
            identity = self._published.pop(asset.dest, "")
            self.ledger.record_published(asset, commit, how, identity=identity, provenance=provenance)
            mbps = out.bytes / out.seconds / 1e6 if out.seconds > 0 else 0.0
            self.emit(
                ev.AssetPublished(
                    dest=asset.dest,
                    source=asset.source,
                    sha256=asset.sha256,
                    bytes=out.bytes,
                    duration_s=round(out.seconds, 3),
                    mb_per_s=round(mbps, 1),
                    manifest=asset.manifest,
                    commit=commit,
                    replaced=a.replace,
                    provenance=provenance,
                )
            )

    def repair(self, findings: list[verify.Finding], stamp: str) -> int:
        """``syncd verify --repair``: for each finding, restore the published file through the same staging
        and rename path as a pass (the bad one moved to the quarantine first, never deleted); returns how
        many dests could not be repaired. The caller holds the state lock; this takes the export's."""
        published = self.ledger.published()
        by_dest: dict[str, set[str]] = {}
        for f in findings:
            by_dest.setdefault(f.dest, set()).add(f.kind)
        export = Export(self.cfg.export_root, self.cfg.staging)
        export.open()
        failed = 0
        try:
            export.clean_staging()
            progress = Progress(None, 0, 0, None)
            for dest, kinds in sorted(by_dest.items()):
                row = published.get(dest)
                if row is None:
                    continue
                try:
                    self._repair_one(export, row, kinds, stamp, progress)
                except SyncdError as exc:
                    failed += 1
                    self.emit(ev.RepairFailed(dest=dest, finding=",".join(sorted(kinds)), error=str(exc)))
        finally:
            export.close()
        return failed

    def _repair_one(
        self, export: Export, row: Published, kinds: set[str], stamp: str, progress: Progress
    ) -> None:
        asset = Asset(row.source, row.sha256, row.size, row.dest, row.manifest, 0)
        if row.orphaned_at is not None:
            raise SyncdError(
                "no manifest lists it any more (orphaned): not restored; remove it, or add it back"
            )
        if not kinds <= verify.REPAIRABLE:
            odd = ", ".join(sorted(kinds - verify.REPAIRABLE))
            raise SyncdError(f"{odd}: not repaired by syncd; fix the path or its permissions by hand")
        if kinds == {"mode"}:
            actual, size = export.hash_file(row.dest)
            if (actual, size) != (row.sha256, row.size):
                raise SyncdError("the file changed while being repaired; run syncd verify again")
            self.ledger.set_identities({row.dest: export.make_read_only(row.dest)})
            how = "mode_restored"
        else:
            in_place = not kinds & {"missing", "symlink", "not_a_file"}  # a regular file with bad bytes
            if kinds != {"missing"}:
                kind = next(k for k in verify.KINDS if k in kinds)
                moved = export.quarantine(row.dest, stamp, link=in_place)
                self.emit(
                    ev.AssetQuarantined(
                        dest=row.dest,
                        moved_to=moved,
                        finding=kind,
                        error=f"{kind}: not the published file",
                        sha256=row.sha256,
                        size=row.size,
                    )
                )
            action = Action(Kind.DOWNLOAD, row.dest, asset, "repair", replace=in_place)
            for attempt in retry.within_pass(
                self.cfg.retries, self.cfg.backoff, self.cfg.backoff_max, self.stop, self._retrying(asset)
            ):
                with attempt:
                    self._attempt(export, action, progress)
            export.sync_dirs()
            identity = self._published.pop(row.dest, "")
            self.ledger.record_published(
                asset, row.commit, How.REPAIRED, identity=identity, provenance=row.provenance
            )
            how = "downloaded"
        self.emit(
            ev.AssetRepaired(
                dest=row.dest,
                sha256=row.sha256,
                bytes=row.size,
                source=row.source,
                how=how,
                commit=row.commit,
                provenance=row.provenance,
            )
        )

    def _provenance(self, asset: Asset) -> dict[str, object]:
        return self.tracer.trace(asset).to_json() if self.tracer is not None else {}

    def _refuse(self, a: Action, reason: str, result: PassResult, *, cause: str) -> None:
        asset = a.asset
        assert asset is not None
        result.refused += 1
        passes = self.ledger.record_failure(a.dest, asset.sha256, reason, Problem.REFUSED)
        self.emit(
            ev.AssetRefused(
                dest=a.dest,
                manifest=asset.manifest,
                error=reason,
                commit=result.commit,
                cause=cause,
                source=asset.source,
                sha256=asset.sha256,
                passes=passes,
            )
        )

    def _settle(self, desired: Desired, result: PassResult, known: dict[str, Published]) -> None:
        """Record orphans and their returns, drop failures of dests no longer wanted. ``known``: the
        published rows the plan was made from (the pass changed none of their orphan marks since)."""
        orphans = [a.dest for a in result.planned if a.kind is Kind.ORPHAN]
        fresh = [d for d in orphans if known[d].orphaned_at is None]
        for a in result.planned:
            if a.kind is Kind.ORPHAN and a.dest in fresh:
                self.emit(ev.AssetOrphaned(dest=a.dest, reason=a.reason, commit=result.commit))
        result.orphaned = len(orphans)
        self.ledger.mark_orphaned(fresh)
        back = [d for d in desired.assets if d in known and known[d].orphaned_at is not None]
        self.ledger.unmark_orphaned(back)
        self.ledger.clear_failures(keep=list(desired.assets) + list(desired.conflicts))
        if result.ok:
            self.ledger.set("synced_commit", result.commit)


# A head served in place of the fetched one for these reasons was not trusted: pruning removes nothing.
UNTRUSTED = frozenset(
    {GitProblem.REWRITTEN, GitProblem.SIGNATURE, GitProblem.UNVERIFIED, GitProblem.NOT_IN_CLONE}
)


class _Refusal(SyncdError):
    """A verify found a different file at dest: refused, left untouched."""


class _Damaged(SyncdError):
    """A re-hash found a published file changed (``identity``: the file as found): refused, marked."""

    def __init__(self, message: str, identity: str) -> None:
        super().__init__(message)
        self.identity = identity


class _Stopping(StopRequested):
    """The daemon is stopping: not a fault of the asset; its partial is kept for resume."""


def _totals(result: PassResult) -> dict[str, int]:
    """What this pass adds to the ledger's running totals (the metrics' counters)."""
    return {
        "downloads_ok": result.published,
        "downloads_failed": result.failed,
        "downloaded_bytes": result.bytes,
        "git_fetch_ok": 1 if result.head else 0,
        "git_fetch_failed": 1 if result.git_problem is GitProblem.UNREACHABLE else 0,
        "pruned_files": result.pruned,
        "pruned_bytes": result.pruned_bytes,
    }
