"""``syncd run``: the resident daemon for ``Type=notify`` — the reconcile pass on a schedule.

In: a config path. Out: an exit code (0 after a graceful stop). Control: the main thread is the event
loop: it waits on a self-pipe that receives signals (``signal.set_wakeup_fd``) and pings the watchdog;
APScheduler 3 (a ``BackgroundScheduler`` with one worker thread) runs the pass every ``interval`` plus up to
``jitter``, starting right away. A pass still running when the next is due is coalesced, never queued or
run twice at once (``max_instances=1``, ``coalesce=True``).

Signals: SIGTERM/SIGINT stop gracefully (no new downloads; in-flight ones interrupted, their partials kept
in staging for the next pass to resume; the ledger consistent; exit 0); SIGHUP re-reads the config (an
invalid one is logged and the old one stays); SIGUSR1 starts a pass now, or one more right after the
running one. A stop waits for the running pass at most ``[download] timeout`` + :data:`STOP_GRACE` s
(a pass checks the stop event between steps, and git and downloads within about a second); past that the
daemon logs ``stop_forced`` and exits 0 anyway (stale git lock files are removed at the next start), so
systemd never has to SIGKILL it. A pass that cannot run (git unreachable, the export held by another
syncd, a ledger error) is logged as ``pass_failed`` and the next one is tried at the next interval.

Events: the daemon wires the observers (the JSON log, the systemd STATUS line, the metrics) to the engine's
event bus, records its pid and next poll in the ledger for ``syncd status``, and, with ``[http] listen``,
serves ``/healthz``, ``/metrics`` and ``/trigger`` (:mod:`syncd.httpd`); a trigger is a SIGUSR1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from syncd import __version__, config, logs, status
from syncd import events as ev
from syncd.config import Config
from syncd.errors import ConfigError, LedgerError, SyncdError, frames, internal_error
from syncd.httpd import Listener
from syncd.metrics import Metrics
from syncd.notify import Announcer
from syncd.reconcile import Reconciler
from syncd.statedir import StateLock
from syncd.systemd import Notifier, StatusObserver

log = logs.get()
JOB = "poll"
STOP_GRACE = 10.0  # seconds past [download] timeout that a stop waits for the running pass
REFRESH = 30.0  # seconds between refreshes of the STATUS line between passes
HEALTH_CACHE = 1.0  # seconds a /healthz answer is reused
NOTIFY_GRACE = 5.0  # seconds a stop waits for a mail or webhook in flight
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


class Daemon:
    """One resident syncd: config, lock, scheduler, and the loop that answers signals."""

    def __init__(self, path: Path, cfg: Config) -> None:
        self.path = path
        self.cfg = cfg
        self.notifier = Notifier()
        self.status = StatusObserver(self.notifier, self._next_poll)
        self.metrics = Metrics(cfg.metrics_textfile)
        self.notify = _NotifySlot()
        self.events = ev.EventBus([ev.LogObserver(), self.status, self.metrics, self.notify])
        self.rec = Reconciler(cfg, events=self.events, respect_backoff=True, periodic_verify=True)
        self._set_notify(cfg)
        self.listener: Listener | None = None
        self._pending: Config | None = None  # a reloaded config, applied between passes
        self._pass_lock = threading.Lock()
        self._wanted = False  # a pass was requested (SIGUSR1, /trigger) and has not started yet
        self._oneshot = False  # a one-shot job for it is pending
        self._running = False
        self._stopping = False
        self._first_started = threading.Event()
        self._last_refresh = 0.0
        self._trigger_lock = threading.Lock()
        self._health_lock = threading.Lock()
        self._health_cached: tuple[float, tuple[int, bytes]] | None = None
        self.forced = False  # the stop did not wait for a stuck pass: exit without joining its thread
        self.scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    # the pass -----------------------------------------------------------------------------------
    def _job(self, requested: bool = False) -> None:
        """One pass, and one more while a pass was requested during it. ``requested``: the one-shot job
        that :meth:`pass_now` adds; it does nothing if a pass began since it was requested."""
        with self._pass_lock:
            if requested:
                with self._trigger_lock:
                    self._oneshot = False
                    if not self._wanted:
                        return
            while not self._stopping:
                with self._trigger_lock:
                    self._wanted = False
                    self._running = True
                self._first_started.set()
                try:
                    self._apply_pending()
                    self.rec.run_pass()
                except SyncdError as exc:
                    self.events.emit(ev.PassFailed(error=str(exc), error_type=type(exc).__name__))
                    if isinstance(exc, LedgerError) and self._pending is None:
                        self._pending = self.cfg  # reopen the ledger next pass: checked, set aside if garbage
                except Exception as exc:  # keep the daemon alive; frames name the bug, not its text
                    err = internal_error(exc)
                    log.error(
                        "internal_error", error=str(err), error_type=type(exc).__name__, frames=frames(exc)
                    )
                    self.events.emit(ev.PassFailed(error=str(err), error_type=type(exc).__name__))
                self._record_schedule()
                with self._trigger_lock:  # a request seen while _running is True is served here
                    self._running = False
                    if not self._wanted:
                        break

    def _apply_pending(self) -> None:
        """Start a new Reconciler for a reloaded config (or to reopen the ledger). The old one is closed
        first: its ledger connection must be gone before a damaged ledger is set aside, or its close
        would remove the new ledger's WAL file by name. If the new one cannot start, the next pass tries
        again (and fails clearly until then)."""
        cfg, self._pending = self._pending, None
        if cfg is None:
            return
        self.rec.close()
        try:
            self.rec = Reconciler(cfg, events=self.events, respect_backoff=True, periodic_verify=True)
        except BaseException:
            self._pending = cfg
            raise
        self.cfg = cfg

    def _set_notify(self, cfg: Config) -> None:
        """Mail and webhooks for ``cfg``: on a reload the notifier is reconfigured in place (its messages
        in flight are kept and recorded), started, or stopped."""
        if self.notify.inner is not None:
            self.notify.inner.reconfigure(cfg.notify, str(cfg.export_root))
        elif cfg.notify is not None:
            self.notify.inner = Announcer(
                cfg.notify,
                lambda: (self.rec.ledger, self.rec.repo),
                export_root=str(cfg.export_root),
                on_sent=self._notices_sent,
            )

    def _notices_sent(self) -> None:
        """A mail or webhook send ended (on its thread): record it soon, on the pass's thread (the
        scheduler's one worker), not at the next pass, so a crash in between re-sends nothing."""
        if self.scheduler.running and not self._stopping:
            with contextlib.suppress(Exception):
                self.scheduler.add_job(self._record_notices, id="record-notices", replace_existing=True)

    def _record_notices(self) -> None:
        with self._pass_lock:
            if self.notify.inner is not None:
                self.notify.inner.record()

    def _next_poll(self) -> datetime | None:
        job = self.scheduler.get_job(JOB) if self.scheduler.running else None
        return job.next_run_time if job is not None else None

    def _record_schedule(self) -> None:
        """Tell ``syncd status`` (through the ledger) this daemon's pid and when it polls next. On the
        pass thread, the ledger's one user; a ledger that cannot take it is the next pass's problem."""
        nxt = self._next_poll()
        with contextlib.suppress(SyncdError):
            if self.rec.ledger.get("daemon_pid") != str(os.getpid()):  # a new ledger (reopened, set aside)
                self.rec.ledger.set("daemon_pid", str(os.getpid()))
            if nxt is not None:
                self.rec.ledger.set("next_poll_at", nxt.astimezone(UTC).isoformat(timespec="seconds"))

    def _health(self) -> tuple[int, bytes]:
        """``GET /healthz``: the ``status --json`` object; 503 only when stale (a restart might help).

        Read at most once per :data:`HEALTH_CACHE` seconds, by one request at a time: each read opens
        the ledger and checks it, and unauthenticated requests must not be able to slow a pass."""
        with self._health_lock:
            now = time.monotonic()
            if self._health_cached is None or now - self._health_cached[0] >= HEALTH_CACHE:
                st = status.read(self.cfg)
                answer = (503 if st.state == "stale" else 200), json.dumps(st.to_json()).encode()
                self._health_cached = (time.monotonic(), answer)
            return self._health_cached[1]

    def _seed(self) -> None:
        """Before the first pass: what the ledger already knows, for the metrics and the STATUS line."""
        ledger = self.rec.ledger
        with contextlib.suppress(SyncdError, ValueError):
            last_success = ledger.get("last_success_at")
            self.metrics.seed(ledger.totals(), last_success, ledger.get("synced_commit"))
            if last_success:
                self.status.last_success = datetime.fromisoformat(last_success)
            ledger.set("daemon_pid", str(os.getpid()))

    # control ------------------------------------------------------------------------------------
    def _trigger(self) -> IntervalTrigger:
        return IntervalTrigger(seconds=self.cfg.interval, jitter=self.cfg.jitter or None, timezone=UTC)

    def pass_now(self, by: str = "SIGUSR1") -> str:
        """SIGUSR1 or ``POST /trigger``: a pass now, or one more right after the running one (never two
        at once); returns which.

        While a pass runs, the request is a flag its loop checks at the end. Otherwise a one-shot job is
        added (at most one pending), never ``modify_job`` on the poll job: that is skipped without a word
        by APScheduler when the poll job's last run has not quite returned (``max_instances=1``), which
        lost a request made in that moment."""
        with self._trigger_lock:
            self._wanted = True
            if self._running:
                when = "after the running pass"
            else:
                when = "now"
                if not self._oneshot:
                    self._oneshot = True
                    self.scheduler.add_job(self._job, kwargs={"requested": True}, name="requested pass")
        log.info("pass_requested", when=when, by=by)
        return when

    def reload(self) -> None:
        """SIGHUP: re-read the config; keep the old one if the new one is invalid."""
        self.notifier.reloading()
        try:
            cfg = config.load(self.path)
        except ConfigError as exc:
            log.error("config_reload_failed", config=str(self.path), error=str(exc), problems=exc.problems)
            self.notifier.ready()
            self.status.refresh()
            return
        if cfg.state_dir != self.cfg.state_dir:
            log.warning(
                "config_reload_partial",
                error="state.directory changes only on restart",
                kept=str(self.cfg.state_dir),
            )
            cfg = dataclasses.replace(cfg, state_dir=self.cfg.state_dir)
        _warn_insecure(self.path, cfg)
        old_secret = self.cfg.trigger_secret.reveal() if self.cfg.trigger_secret else None
        new_secret = cfg.trigger_secret.reveal() if cfg.trigger_secret else None
        if cfg.http_listen != self.cfg.http_listen or new_secret != old_secret:
            log.warning(
                "config_reload_partial",
                error="[http] listen and trigger_secret_file change only on restart",
                kept=config.describe(self.cfg)["http_listen"],
            )
            cfg = dataclasses.replace(
                cfg, http_listen=self.cfg.http_listen, trigger_secret=self.cfg.trigger_secret
            )
        self.metrics.textfile = cfg.metrics_textfile
        self._set_notify(cfg)
        schedule_changed = (cfg.interval, cfg.jitter) != (self.cfg.interval, self.cfg.jitter)
        self._pending = cfg
        self.cfg = cfg
        if schedule_changed:
            self.scheduler.reschedule_job(JOB, trigger=self._trigger())
        log.info("config_reloaded", config=str(self.path), interval_s=cfg.interval, jitter_s=cfg.jitter)
        self.notifier.ready()
        self.status.refresh()

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit code."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        for sig in _SIGNALS:
            signal.signal(sig, lambda *_: None)  # the byte on the wakeup fd does the work
        try:
            log.info("daemon_started", version=__version__, pid=os.getpid(), **config.describe(self.cfg))
            _warn_insecure(self.path, self.cfg)
            self._seed()
            self._listen()
            self.scheduler.add_job(
                self._job, self._trigger(), id=JOB, next_run_time=datetime.now(UTC), name="reconcile pass"
            )
            self.scheduler.start()
            self._first_started.wait(timeout=30)
            self.notifier.ready("first pass running")
            self._loop(rfd)
        finally:
            self._stop()
            signal.set_wakeup_fd(old_wakeup)
            for sig in _SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            os.close(rfd)
            os.close(wfd)
        return 0

    def _listen(self) -> None:
        if self.cfg.http_listen is None:
            return
        secret = self.cfg.trigger_secret
        self.listener = Listener(
            self.cfg.http_listen,
            health=self._health,
            metrics=self.metrics.render,
            trigger=lambda: self.pass_now(by="POST /trigger"),
            secret=secret,
        )
        self.listener.start()
        host, port = self.listener.bound
        log.info("http_listening", address=host, port=port, trigger=secret is not None)

    def _loop(self, rfd: int) -> None:
        ping = self.notifier.watchdog_interval
        next_ping = time.monotonic()
        while True:
            now = time.monotonic()
            if ping is not None and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + ping
            if now - self._last_refresh >= REFRESH:
                self._last_refresh = now
                self.status.refresh()  # the age of the last success in systemctl status
            timeout = min(REFRESH, max(0.0, next_ping - now)) if ping is not None else REFRESH
            ready, _, _ = select.select([rfd], [], [], timeout)
            if not ready:
                continue
            with contextlib.suppress(BlockingIOError):
                for signum in os.read(rfd, 64):
                    if signum in (signal.SIGTERM, signal.SIGINT):
                        log.info("stop_requested", signal=signal.Signals(signum).name)
                        return
                    if signum == signal.SIGHUP:
                        self.reload()
                    elif signum == signal.SIGUSR1:
                        self.pass_now()

    def _stop(self) -> None:
        self.notifier.stopping()
        self._stopping = True
        if self.listener is not None:
            self.listener.close()
        self.rec.stop.set()
        started = time.monotonic()
        grace = self.cfg.timeout + STOP_GRACE
        if self.scheduler.running:
            # Let the running pass end first: BaseScheduler.shutdown() holds its job-store lock while it
            # waits for the executor, and a pass ends with status.refresh() -> get_job(), which needs it.
            if self._pass_lock.acquire(timeout=grace):
                self._pass_lock.release()
                self.scheduler.shutdown(wait=True)
            else:
                self.forced = True
                log.warning(
                    "stop_forced",
                    waited_s=round(time.monotonic() - started, 3),
                    error=f"the running pass did not end within {grace:g} s of the stop; exiting anyway "
                    "(partials stay in staging, stale git locks are removed at the next start)",
                )
                self.scheduler.shutdown(wait=False)
        if not self.forced:
            if self.notify.inner is not None:
                self.notify.inner.flush(wait=NOTIFY_GRACE)  # record what was sent; a send in flight goes on
            self.rec.close()  # else the stuck pass still holds the ledger; the process exit closes it
        log.info("daemon_stopped", duration_s=round(time.monotonic() - started, 3), forced=self.forced)


def _warn_insecure(path: Path, cfg: Config) -> None:
    """One ``config_insecure`` warning per risky but accepted setting (e.g. credentials over http)."""
    for warning in cfg.warnings:
        log.warning("config_insecure", config=str(path), warning=warning)


class _NotifySlot:
    """The notifier's place on the event bus, so a reload can swap it (or switch it off)."""

    def __init__(self) -> None:
        self.inner: Announcer | None = None

    def __call__(self, event: ev.Event) -> None:
        inner = self.inner
        if inner is not None:
            inner(event)


class _SkipNotice(logging.Filter):
    """Drop APScheduler's "skipped: maximum number of running instances reached": a long pass makes
    it every interval, and coalescing it is the intended behaviour. Other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in str(record.msg)


def run(path: Path) -> int:
    """Load the config, take the state lock, and run the daemon until stopped.

    After a forced stop the process ends with ``os._exit``: the stuck pass's worker thread would
    otherwise be joined at interpreter exit (concurrent.futures joins its threads), i.e. never."""
    cfg = config.load(path)
    logging.getLogger("apscheduler.scheduler").addFilter(_SkipNotice())
    lock = StateLock(cfg.state_dir)
    lock.acquire()
    daemon: Daemon | None = None
    try:
        daemon = Daemon(path, cfg)
        return daemon.run()
    finally:
        lock.release()
        if daemon is not None and daemon.forced:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
