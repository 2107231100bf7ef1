"""One reconcile pass: fetch git → desired state → plan → download/verify/publish → ledger → summary.

``Reconciler.run_pass`` is the engine behind both ``syncd sync`` (one pass) and ``syncd run`` (a pass per
interval). It is level-triggered: each pass compares the manifests at the branch head with the ledger and
the export, so a failed asset is retried and a file deleted by hand comes back. It never raises for one bad
manifest or one failing asset: those are logged (one event each) and counted in the :class:`PassResult`.
It raises a :class:`~syncd.errors.SyncdError` only when no pass is possible at all (export root missing,
git unreachable before anything was ever fetched, ledger unusable).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO

import tenacity

from syncd import logs, manifest, retry
from syncd.config import Config
from syncd.errors import FetchError, GitError, ManifestError, StopRequested, SyncdError
from syncd.fetch import Fetcher
from syncd.gitsource import ManifestRepo
from syncd.ledger import CachedManifest, Ledger
from syncd.manifest import Asset
from syncd.plan import Action, Kind, plan
from syncd.progress import Progress
from syncd.publish import Export
from syncd.report import count_dry

log = logs.get()
MAX_PROBLEMS_LOGGED = 20  # per manifest_invalid event; `syncd validate` lists every problem
MAX_PROBLEM_CHARS = 500
REFUSED = "refused: "  # prefix of a failure row written for a refusal (not a download failure)


@dataclass(frozen=True)
class Desired:
    """The desired state at one commit."""

    commit: str
    assets: dict[str, Asset]
    conflicts: dict[str, list[Asset]]
    invalid: dict[str, tuple[str, ...]]


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
    invalid: dict[str, tuple[str, ...]] = field(default_factory=dict)
    bytes: int = 0
    git_error: str = ""
    source_error: str = ""
    dry_run: bool = False

    @property
    def ok(self) -> bool:
        bad = self.refused or self.failed or self.deferred or self.invalid
        return not (bad or self.git_error or self.source_error)


@dataclass(frozen=True)
class _Outcome:
    action: Action
    error: SyncdError | None = None
    bytes: int = 0
    seconds: float = 0.0
    how: str = "downloaded"


def cache_key(source_path: str) -> str:
    """Everything that shapes the manifest cache besides the commit: ``[source] path`` (which files
    are manifests) and the version of the parse rules (what a file's parse is)."""
    return json.dumps({"path": source_path, "rules": manifest.RULES_VERSION}, sort_keys=True)


def load_desired(repo: ManifestRepo, ledger: Ledger, head: str) -> Desired:
    """The assets wanted at ``head``, reusing the ledger's manifest cache through a tree diff.

    The cache is used only if it was built under the same :func:`cache_key` and decodes; otherwise every
    manifest at ``head`` is read and parsed again. The caller checks first that ``[source] path`` is a
    directory at ``head`` (:meth:`Reconciler._servable`). Raises :class:`GitError` on a git read error."""
    key = cache_key(repo.source.path)
    cached_commit, cache = ledger.manifest_cache(key)
    if cached_commit != head:
        if cached_commit and repo.has_commit(cached_commit):
            change = repo.changes(cached_commit, head)
            upserts = {p: _parse(repo, p, repo.blob_id(head, p)) for p in sorted(change.changed)}
            ledger.update_manifests(head, key, upserts, change.deleted)
            for p in change.deleted:
                cache.pop(p, None)
            cache.update(upserts)
        else:
            blobs = repo.manifests(head)
            cache = {
                p: cache[p] if p in cache and cache[p].blob == b else _parse(repo, p, b)
                for p, b in sorted(blobs.items())
            }
            ledger.update_manifests(head, key, cache, (), replace_all=True)
    every = [a for c in cache.values() for a in c.assets]
    conflicts = manifest.conflicts(every)
    assets = {a.dest: a for a in every if a.dest not in conflicts}
    invalid = {p: c.problems for p, c in sorted(cache.items()) if c.problems}
    return Desired(head, assets, conflicts, invalid)


def _parse(repo: ManifestRepo, path: str, blob: str) -> CachedManifest:
    try:
        return CachedManifest(blob, assets=tuple(manifest.parse(path, repo.read_manifest(path, blob))))
    except ManifestError as exc:
        return CachedManifest(blob, problems=tuple(exc.problems))


class Reconciler:
    """Owns the long-lived pieces (git clone, HTTP client, ledger) across passes."""

    def __init__(
        self,
        cfg: Config,
        *,
        dry_run: bool = False,
        progress_stream: TextIO | None = None,
        on_status: Callable[[str], None] | None = None,
        respect_backoff: bool = False,
        fetch: bool = True,
    ) -> None:
        self.cfg = cfg
        self.fetch = fetch
        self.respect_backoff = respect_backoff
        self.dry_run = dry_run
        self.progress_stream = progress_stream
        self.on_status = on_status
        self.stop = threading.Event()
        self.repo = ManifestRepo(cfg.source, cfg.state_dir, cfg.timeout)
        self.ledger = Ledger.in_state_dir(cfg.state_dir, readonly=dry_run)
        self.fetcher = Fetcher(
            cfg.artifactory, timeout=cfg.timeout, concurrency=cfg.concurrency, stop=self.stop
        )

    def close(self) -> None:
        self.fetcher.close()
        self.ledger.close()

    def run_pass(self) -> PassResult:
        """One full reconcile pass. Raises :class:`SyncdError` only if no pass is possible."""
        started = time.monotonic()
        result = PassResult(dry_run=self.dry_run)
        export = Export(self.cfg.export_root, self.cfg.staging)
        export.open(create_staging=not self.dry_run)
        try:
            if not self.dry_run:
                leftovers = export.clean_staging()
                if leftovers:
                    log.info("staging_cleaned", files=len(leftovers), staging=str(self.cfg.staging))
            head = self._head(result)
            result.commit = head
            if self._servable(head, result):
                self._reconcile(export, head, result)
        finally:
            export.close()
        if self.dry_run:
            count_dry(result)
        log.log(
            20 if result.ok else 40,
            "pass_finished",
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
            invalid_manifests=len(result.invalid),
            git_error=result.git_error or None,
            source_error=result.source_error or None,
            bytes=result.bytes,
            duration_s=round(time.monotonic() - started, 3),
        )
        return result

    def _reconcile(self, export: Export, head: str, result: PassResult) -> None:
        desired = load_desired(self.repo, self.ledger, head)
        self._report_invalid(desired, result)
        published = self.ledger.published()
        observed = {d: export.observe(d) for d in desired.assets}
        result.planned = plan(
            desired.assets,
            desired.conflicts,
            published,
            observed,
            self._deferred(desired),
            staging=export.staging_in_root(),
        )
        if not self.dry_run:
            self._execute(export, result)
            self._settle(desired, result)

    def _servable(self, head: str, result: PassResult) -> bool:
        """Whether this pass can plan at ``head``; if not, it plans nothing (so orphans nothing).

        ``head`` must be in the clone (the last good commit may not be, after a rewritten branch and a
        fresh clone), and ``[source] path`` must be a directory there: a missing one (a typo, a renamed
        directory) would find no manifests and orphan every published file."""
        if not self.repo.has_commit(head):
            result.git_error = (result.git_error + "; " if result.git_error else "") + (
                f"commit {head[:12]} is not in the clone; nothing was planned"
            )
            return False
        path = self.cfg.source.path
        if self.repo.has_directory(head, path):
            return True
        result.source_error = (
            f"[source] path {path!r} is not a directory at commit {head[:12]} of branch "
            f"{self.cfg.source.branch!r}; nothing was planned, published files are kept"
        )
        log.error("source_path_missing", path=path, commit=head, error=result.source_error)
        return False

    def _head(self, result: PassResult) -> str:
        """The commit this pass serves: the fetched head, or the last good commit when git failed or
        the branch history was rewritten (unless ``allow_force_push``)."""
        cached = self.ledger.get("manifests_commit")
        if not self.fetch:
            head = self.repo.last_fetched()
            log.info("git_not_fetched", commit=head, reason="another syncd owns the clone; last fetched head")
            return head
        try:
            head = self.repo.fetch(stop=self.stop)
        except GitError as exc:
            if not cached:
                raise
            result.git_error = str(exc)
            log.error("git_fetch_failed", error=str(exc), source=self.cfg.source.url, serving_commit=cached)
            return cached
        log.info("git_fetched", commit=head, branch=self.cfg.source.branch)
        if not cached or cached == head:
            return head
        if self.repo.has_commit(cached) and self.repo.is_ancestor(cached, head):
            return head
        if self.cfg.source.allow_force_push:
            log.warning(
                "git_history_rewritten",
                previous=cached,
                commit=head,
                action="following it",
                branch=self.cfg.source.branch,
            )
            return head
        result.git_error = (
            f"branch {self.cfg.source.branch!r} was rewritten: {head[:12]} does not descend from the "
            f"last synced commit {cached[:12]}"
        )
        log.error(
            "git_history_rewritten",
            previous=cached,
            commit=head,
            serving_commit=cached,
            branch=self.cfg.source.branch,
            error=result.git_error + "; still serving the last good commit (set [source] "
            "allow_force_push = true to follow it)",
        )
        return cached

    def _deferred(self, desired: Desired) -> dict[str, str]:
        """Dests whose downloads wait out their across-pass backoff (daemon only)."""
        if not self.respect_backoff:
            return {}
        now = datetime.now(UTC)
        out = {}
        for dest, f in self.ledger.failures().items():
            asset = desired.assets.get(dest)
            if asset is None or asset.sha256 != f.sha256 or f.last_error.startswith(REFUSED):
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
            # One bounded event per file, however many problems it has (a 9,000-asset file with a typo in
            # every asset made a 7 MB line, which journald splits into invalid JSON): validate lists all.
            shown = [p if len(p) <= MAX_PROBLEM_CHARS else p[:MAX_PROBLEM_CHARS] + "…" for p in problems]
            more = len(problems) - MAX_PROBLEMS_LOGGED
            log.error(
                "manifest_invalid",
                manifest=path,
                commit=desired.commit,
                error="; ".join(shown[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else ""),
                problems=shown[:MAX_PROBLEMS_LOGGED] + ([f"… and {more} more"] if more > 0 else []),
                problem_count=len(problems),
            )

    def _execute(self, export: Export, result: PassResult) -> None:
        work = [a for a in result.planned if a.kind in (Kind.DOWNLOAD, Kind.VERIFY)]
        total = sum(a.asset.size for a in work if a.asset and a.kind is Kind.DOWNLOAD)
        progress = Progress(self.progress_stream, len(work), total, self.on_status if work else None)
        for a in result.planned:
            if a.kind is Kind.SKIP:
                result.skipped += 1
            elif a.kind is Kind.REFUSE:
                self._refuse(a, a.reason, result)
            elif a.kind is Kind.DEFER:
                result.deferred += 1
                log.info("asset_deferred", dest=a.dest, reason=a.reason, commit=result.commit)
        keep = {a.dest for a in result.planned if a.kind is Kind.DEFER}
        queue = iter(work)
        limit = 2 * self.cfg.concurrency  # bounded: memory does not grow with the number of assets
        with (
            ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="syncd-dl") as pool,
            self.ledger.batch(),
        ):
            running: set[Future[_Outcome]] = set()
            while True:
                for action in itertools.islice(queue, limit - len(running)):
                    running.add(pool.submit(self._work, export, action, progress))
                if not running:
                    break
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    out = fut.result()
                    try:
                        self._record(out, result)
                    except SyncdError:
                        raise  # the ledger is unusable: no pass is possible
                    except Exception as exc:  # a bug recording one asset fails that asset only
                        self._record(_Outcome(out.action, error=internal_error(exc)), result)
                    if isinstance(out.error, FetchError) and out.error.retryable:
                        keep.add(out.action.dest)
                    progress.file_done()
        progress.finish()
        # Partials stay only for assets still wanted whose download broke on a transport fault.
        export.clean_staging(keep=keep)

    def _work(self, export: Export, action: Action, progress: Progress) -> _Outcome:
        asset = action.asset
        assert asset is not None
        started = time.monotonic()
        try:
            if self.stop.is_set():
                raise _Stopping("stopping: download not started")
            if action.kind is Kind.VERIFY:
                return self._verify(export, action)
            attempts = retry.within_pass(
                self.cfg.retries, self.cfg.backoff, self.cfg.backoff_max, self.stop, self._retrying(asset)
            )
            for attempt in attempts:
                with attempt:
                    self._attempt(export, action, progress)
        except SyncdError as exc:
            return _Outcome(action, error=exc)
        except Exception as exc:  # one asset's work is a hard boundary: a bug here fails only this asset
            return _Outcome(action, error=internal_error(exc))
        return _Outcome(action, bytes=asset.size, seconds=time.monotonic() - started)

    def _attempt(self, export: Export, action: Action, progress: Progress) -> None:
        """One download attempt: resume what staging holds, verify, publish. A transport fault keeps the
        partial for the next attempt; anything else removes it."""
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
        try:
            staged.publish(replace=action.replace)
        except BaseException:
            staged.discard()
            raise

    def _retrying(self, asset: Asset) -> Callable[[tenacity.RetryCallState], None]:
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            wait = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "asset_retry",
                dest=asset.dest,
                attempt=state.attempt_number,
                error=str(exc),
                wait_s=round(wait, 2),
                source=asset.source,
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
        export.make_read_only(asset.dest)
        return _Outcome(action, how="adopted")

    def _record(self, out: _Outcome, result: PassResult) -> None:
        a = out.action
        asset = a.asset
        assert asset is not None
        if isinstance(out.error, _Refusal):
            self._refuse(a, str(out.error), result)
        elif isinstance(out.error, StopRequested):
            result.failed += 1  # not the asset's fault: no failure row, no backoff
            log.info("asset_interrupted", dest=asset.dest, error=str(out.error), commit=result.commit)
        elif out.error is not None:
            result.failed += 1
            failed_passes = self.ledger.record_failure(asset.dest, asset.sha256, str(out.error))
            log.error(
                "asset_failed",
                dest=asset.dest,
                source=asset.source,
                manifest=asset.manifest,
                sha256=asset.sha256,
                error=str(out.error),
                failed_passes=failed_passes,
                retry="next pass",
                commit=result.commit,
            )
        elif out.how == "adopted":
            result.adopted += 1
            self.ledger.record_published(asset, result.commit, "adopted")
            log.info(
                "asset_adopted",
                dest=asset.dest,
                sha256=asset.sha256,
                bytes=asset.size,
                manifest=asset.manifest,
                commit=result.commit,
            )
        else:
            result.published += 1
            result.bytes += out.bytes
            self.ledger.record_published(asset, result.commit, "downloaded")
            mbps = out.bytes / out.seconds / 1e6 if out.seconds > 0 else 0.0
            log.info(
                "asset_published",
                dest=asset.dest,
                source=asset.source,
                sha256=asset.sha256,
                bytes=out.bytes,
                duration_s=round(out.seconds, 3),
                mb_per_s=round(mbps, 1),
                manifest=asset.manifest,
                commit=result.commit,
                replaced=a.replace,
            )

    def _refuse(self, a: Action, reason: str, result: PassResult) -> None:
        asset = a.asset
        assert asset is not None
        result.refused += 1
        self.ledger.record_failure(a.dest, asset.sha256, REFUSED + reason)
        log.error("asset_refused", dest=a.dest, manifest=asset.manifest, error=reason, commit=result.commit)

    def _settle(self, desired: Desired, result: PassResult) -> None:
        orphans = [a.dest for a in result.planned if a.kind is Kind.ORPHAN]
        known = self.ledger.published()
        fresh = [d for d in orphans if known[d].orphaned_at is None]
        for a in result.planned:
            if a.kind is Kind.ORPHAN and a.dest in fresh:
                log.warning("asset_orphaned", dest=a.dest, reason=a.reason, commit=result.commit)
        result.orphaned = len(orphans)
        self.ledger.mark_orphaned(fresh)
        back = [d for d in desired.assets if d in known and known[d].orphaned_at is not None]
        self.ledger.unmark_orphaned(back)
        self.ledger.clear_failures(keep=list(desired.assets) + list(desired.conflicts))
        if result.ok:
            self.ledger.set("synced_commit", result.commit)


class _Refusal(SyncdError):
    """A verify found a different file at dest: refused, left untouched."""


class _Stopping(StopRequested):
    """The daemon is stopping: not a fault of the asset; its partial is kept for resume."""


class InternalError(SyncdError):
    """An unexpected exception inside one asset's work (a bug): that asset fails, the pass goes on."""


def frames(exc: BaseException) -> list[str]:
    """Where ``exc`` travelled, as ``file:line in function`` (innermost last): enough to find the bug,
    and safe to log, unlike a traceback, whose last line is the exception's text."""
    return [
        f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"
        for f in traceback.extract_tb(exc.__traceback__)
    ]


def internal_error(exc: BaseException) -> InternalError:
    """A message of our own for ``exc``: its type and where it was raised, never its text (which can
    hold a header value, a URL with credentials or a response body)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    return InternalError(
        f"internal error: {type(exc).__name__}{where} (a bug in syncd; please report it with this "
        "line and the syncd version)"
    )
