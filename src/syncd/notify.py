"""Tell people: the observer that turns each pass's events into at most one message per channel.

In: the pass's events (:mod:`syncd.events`). Out: mail (:mod:`syncd.mail`) and webhook posts
(:mod:`syncd.webhook`), and the notification state in the ledger. What to say is decided by
:mod:`syncd.alerts` (pure); this module gathers the events, keeps the state, looks up who added an asset
(:meth:`ManifestRepo.introduced`) and sends.

It never blocks, slows or fails a pass: the decision is a few ledger rows on the pass's thread, at the
end of a pass; each send runs on a thread of its own, bounded by the channel's ``timeout``, at most one
per channel at a time. The outcome of a send is written to the ledger at the next decision (or by
:meth:`Announcer.flush`, which ``syncd sync`` calls before it exits), so the ledger keeps its one writer.
A message that was not accepted is logged once as ``notify_failed`` and composed again at the next pass.
A crash between a send and its record re-sends that message once after the restart (at least once).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from syncd import alerts, logs, mail, manifest, webhook
from syncd import events as ev
from syncd.alerts import Alert, Landed, Message, Open, Rules
from syncd.config import Notify, address_problem, webhook_origin
from syncd.errors import ManifestError, NotifyError, SyncdError, frames, internal_error
from syncd.gitsource import ManifestRepo
from syncd.ledger import Ledger

log = logs.get()
MAIL, WEBHOOK, AUTHOR = "mail", "webhook", "author:"
MAX_LOOKUPS = 10_000  # provenance lookups per pass …
LOOKUP_SECONDS = 2.0  # … and the time they may take in all (a 4 MiB manifest takes ~1 s to parse)
MAX_LISTED = 100  # files listed in one message; the rest are counted


def host_name() -> str:
    """This machine's short name, for the subject: ``[syncd nfs01]``."""
    return socket.gethostname().split(".")[0] or "localhost"


@dataclass(frozen=True)
class Outcome:
    message: Message
    at: str
    error: str = ""


class Sender:
    """Sends messages on their own threads, at most one per channel at a time.

    A send is bounded by its channel's ``timeout``: each network step by the client's own timeout, and the
    whole mail session by a watchdog that shuts its socket down at the deadline (a relay answering every
    command just in time cannot hold it). The channel stays busy, and the outcome unrecorded, until the
    send has really ended, so an abandoned send can never be delivered after being counted as failed.
    ``on_done`` is called (on the send's thread) when an outcome is ready to be recorded."""

    def __init__(self, notify: Notify, host: str, on_done: Callable[[], None] | None = None) -> None:
        self.notify = notify
        self.host = host
        self.on_done = on_done
        self._lock = threading.Lock()
        self._busy: dict[str, threading.Thread] = {}
        self._done: list[Outcome] = []

    def busy(self, channel: str) -> bool:
        with self._lock:
            return channel in self._busy

    def submit(self, msg: Message) -> None:
        at = datetime.now(UTC).isoformat(timespec="seconds")
        t = threading.Thread(
            target=self._run, args=(msg, at), name=f"syncd-notify-{msg.channel}", daemon=True
        )
        with self._lock:
            self._busy[msg.channel] = t
        t.start()

    def _run(self, msg: Message, at: str) -> None:
        error = self.attempt(msg, at)
        with self._lock:
            self._done.append(Outcome(msg, at, error))
            self._busy.pop(msg.channel, None)
        if self.on_done is not None:
            with contextlib.suppress(Exception):
                self.on_done()

    def attempt(self, msg: Message, at: str) -> str:
        """Send ``msg`` now; return "" when it was accepted, else why not (our words)."""
        cancel = mail.Cancel()
        watchdog = threading.Timer(self.timeout(msg.channel), cancel.fire)
        watchdog.daemon = True
        watchdog.start()
        try:
            self.deliver(msg, at, cancel)
        except NotifyError as exc:
            return str(exc)
        except Exception as exc:  # a bug: our words, never the text
            return str(internal_error(exc))
        finally:
            watchdog.cancel()
        return ""

    def timeout(self, channel: str) -> float:
        n = self.notify
        if channel == WEBHOOK and n.webhook is not None:
            return n.webhook.timeout
        return n.smtp.timeout if n.smtp is not None else 30.0

    def deliver(self, msg: Message, at: str, cancel: mail.Cancel | None = None) -> None:
        """Send ``msg`` now on its channel; raise :class:`NotifyError` if it was not accepted."""
        n, host = self.notify, self.host
        listed = _listed(msg)
        if msg.channel == WEBHOOK:
            if n.webhook is None:
                raise NotifyError("no [notify.webhook] any more; dropped")
            payload = alerts.payload(host, listed, at)
            payload["summary"] = alerts.subject(host, msg)
            payload["problem_count"] = len(msg.new) + len(msg.reminders)
            payload["recovered_count"] = len(msg.recovered)
            payload["published_count"] = len(msg.published)
            webhook.post(n.webhook, payload, cancel)
            return
        if n.smtp is None:
            raise NotifyError("no [notify.smtp] any more; dropped")
        to = n.smtp.to if msg.channel == MAIL else (msg.channel.removeprefix(AUTHOR),)
        text = alerts.body(host, listed) + _more(msg, listed)
        subject = alerts.subject(host, msg)
        mail.send(n.smtp, mail.message(n.smtp, to, subject, text), to, cancel)

    def results(self) -> list[Outcome]:
        with self._lock:
            done, self._done = self._done, []
        return done

    def wait(self, timeout: float) -> None:
        """Wait at most ``timeout`` s for the messages in flight."""
        end = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._busy.values())
            if not threads or time.monotonic() >= end:
                return
            threads[0].join(max(0.0, end - time.monotonic()))


def _listed(msg: Message) -> Message:
    """``msg`` with at most :data:`MAX_LISTED` items in each list (the subject and the counts tell the
    rest): 20,000 failing assets must not become a 10 MB mail that the relay refuses at every pass."""
    return replace(
        msg,
        new=msg.new[:MAX_LISTED],
        reminders=msg.reminders[:MAX_LISTED],
        recovered=msg.recovered[:MAX_LISTED],
        published=msg.published[:MAX_LISTED],
    )


def _more(msg: Message, listed: Message) -> str:
    cut = [
        (len(getattr(msg, name)) - len(getattr(listed, name)), what)
        for name, what in (("new", "new problems"), ("reminders", "open problems"),
                           ("recovered", "recovered"), ("published", "files published"))
    ]  # fmt: skip
    shown = [f"{n} more {what}" for n, what in cut if n > 0]
    return f"\n(and {', '.join(shown)}: syncd status lists them)\n" if shown else ""


class Announcer:
    """The observer: gathers a pass's events; at its end decides and sends (see the module doc).

    ``engine`` returns the pass's ledger and git clone (the daemon replaces them on a reload)."""

    def __init__(
        self,
        notify: Notify,
        engine: Callable[[], tuple[Ledger, ManifestRepo]],
        *,
        export_root: str = "",
        host: str | None = None,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        """``on_sent`` is called from a send's thread when an outcome waits to be recorded: the daemon
        then runs :meth:`record` on the pass's thread between passes."""
        self.notify = notify
        self.engine = engine
        self.export_root = export_root
        self.host = host or host_name()
        self.active = True  # False after a reload removed [notify]: only outcomes are still recorded
        self.sender = Sender(notify, self.host, on_done=on_sent)
        self.rules = Rules(repeat=notify.repeat, min_failures=notify.min_failures)
        self._collector = alerts.Collector(export_root)
        self._valid: dict[str, bool] = {}  # author address → whether it is one valid address

    def reconfigure(self, notify: Notify | None, export_root: str) -> None:
        """A reload: the new [notify] applies from the next decision; messages in flight are kept and
        recorded. ``None`` (the section removed) stops announcing."""
        self.active = notify is not None
        if notify is None:
            return
        self.notify, self.export_root = notify, export_root
        self.sender.notify = notify
        self.rules = Rules(repeat=notify.repeat, min_failures=notify.min_failures)

    def record(self) -> None:
        """Record the outcome of the sends that ended (call it on the ledger's thread)."""
        with contextlib.suppress(SyncdError):
            self._record(self.engine()[0])

    def __call__(self, event: ev.Event) -> None:
        if isinstance(event, ev.PassStarted):
            self._collector = alerts.Collector(self.export_root)
            return
        if isinstance(event, ev.AssetRetry | ev.PassProgress):
            return  # from download threads, and nothing to announce
        if not self.active:
            if isinstance(event, ev.PassFinished | ev.PassFailed):
                self.record()
            return
        self._collector.add(event)
        if isinstance(event, ev.PassFinished | ev.PassFailed):
            view, self._collector = self._collector.view, alerts.Collector(self.export_root)
            if not view.dry_run:
                self._settle(view)

    # on the pass's thread -------------------------------------------------------------------------
    def _settle(self, view: alerts.PassView) -> None:
        try:
            ledger, repo = self.engine()
            self._record(ledger)
            now = datetime.now(UTC)
            stamp = now.isoformat(timespec="seconds")
            before = _open_from(ledger.notices_open())
            after = alerts.update_open(before, view, stamp)
            lookups = _Lookups(repo, view.commit)
            for key, p in after.items():
                if key not in before or not p.alert.author:
                    after[key] = replace(p, alert=lookups.alert(p.alert))
            ledger.set_notices_open(
                {k: (p.first_seen, p.passes, p.alert.to_json()) for k, p in after.items()}
            )
            self._queue(ledger, [lookups.landed(x) for x in view.published])
            self._dispatch(ledger, after, now)
        except SyncdError as exc:  # the ledger is unusable: the pass reports that itself
            log.error("notify_failed", channel="*", error=f"nothing announced this pass: {exc}")
        except Exception as exc:  # a bug (or a damaged row): said at every pass, never silent
            log.error(
                "notify_failed",
                channel="*",
                error=f"nothing announced this pass: {internal_error(exc)}",
                frames=frames(exc),
            )

    def _queue(self, ledger: Ledger, landed: list[Landed]) -> None:
        items: dict[str, dict[str, str]] = {}
        n = self.notify
        for x in landed:
            if "published" in n.events:
                for channel in self._channels():
                    items.setdefault(channel, {})[x.key] = x.to_json()
            if self._author_ok(x.author_email):
                items.setdefault(AUTHOR + x.author_email.lower(), {})[x.key] = x.to_json()
        if items:
            ledger.queue_notices(items)

    def _channels(self) -> list[str]:
        n = self.notify
        return ([MAIL] if n.smtp is not None else []) + ([WEBHOOK] if n.webhook is not None else [])

    def _author_ok(self, email: str) -> bool:
        """Whether ``email`` may get author mail: ``mail_authors`` on, a valid address, and its domain
        one of ``author_domains`` or below one (``x@bank.example.evil.com`` is not)."""
        n = self.notify
        if not (n.mail_authors and n.smtp is not None and email and "@" in email):
            return False
        domain = email.rsplit("@", 1)[1].lower().rstrip(".")
        if not any(domain == d or domain.endswith("." + d) for d in n.author_domains):
            return False
        if email not in self._valid:  # parsing an address is slow; 20,000 problems name a few authors
            if len(self._valid) > 10_000:
                self._valid.clear()
            self._valid[email] = not address_problem(email)
        return self._valid[email]

    def _dispatch(self, ledger: Ledger, open_: Mapping[str, Open], now: datetime) -> None:
        told_all = ledger.notices_sent()
        outbox_all = ledger.outbox()
        authors = {
            AUTHOR + p.alert.author_email.lower()
            for p in open_.values()
            if self._author_ok(p.alert.author_email)
        }
        channels = self._channels() + sorted(
            (authors | {c for c in (*told_all, *outbox_all) if c.startswith(AUTHOR)}) - set(self._channels())
        )
        for channel in channels:
            if self.sender.busy(channel):
                continue  # its last message is still in flight: this pass's news goes with the next one
            if channel.startswith(AUTHOR) and not self._author_ok(channel.removeprefix(AUTHOR)):
                # mail_authors off, or the domain no longer listed: its state goes, unsent
                ledger.notices_delivered(
                    channel, announced={}, at="", recovered=list(told_all.get(channel, {})),
                    sent=list(outbox_all.get(channel, {})),
                )  # fmt: skip
                continue
            told = {k: (at, Alert.from_json(a)) for k, (at, a) in told_all.get(channel, {}).items()}
            queued = {k: Landed.from_json(v) for k, v in outbox_all.get(channel, {}).items()}
            outbox = [x for x in queued.values() if x is not None]
            damaged = [k for k, x in queued.items() if x is None or x.key != k]
            if damaged:  # rows that do not decode are dropped, not kept for ever
                ledger.notices_delivered(channel, announced={}, at="", recovered=(), sent=damaged)
            if channel.startswith(AUTHOR):
                email = channel.removeprefix(AUTHOR)
                wants: Iterable[str] = ("problem", "published")
                only: Callable[[Alert], bool] | None = _by(email)
                rules = replace(self.rules, repeat=0)  # an author is told once
            else:
                wants, only, rules = self.notify.events, None, self.rules
            msg = alerts.compose(channel, wants, open_, told, outbox, rules, now, only)
            if msg.empty:
                if msg.forget:
                    ledger.notices_delivered(channel, announced={}, at="", recovered=msg.forget, sent=())
                continue
            self.sender.submit(msg)

    def _record(self, ledger: Ledger) -> None:
        """Write the outcome of the sends that ended since the last call (on the ledger's thread)."""
        for out in self.sender.results():
            m = out.message
            if out.error:
                log.error(
                    "notify_failed",
                    channel=self._shown(m.channel),
                    kind=m.kind,
                    error=out.error,
                    retry="next pass",
                )
                continue
            ledger.notices_delivered(
                m.channel,
                announced={a.key: a.to_json() for a in (*m.new, *m.reminders)},
                at=out.at,
                recovered=[a.key for a in m.recovered] + list(m.forget),
                sent=[x.key for x in m.published],
            )
            log.info(
                "notification_sent",
                channel=self._shown(m.channel),
                kind=m.kind,
                new=len(m.new),
                reminders=len(m.reminders),
                recovered=len(m.recovered),
                published=len(m.published),
            )

    def _shown(self, channel: str) -> str:
        return shown_channel(self.notify, channel)

    # from the caller ------------------------------------------------------------------------------
    def pass_failed(self, exc: SyncdError) -> None:
        """``syncd sync``: a pass that could not run at all (the daemon emits this as an event)."""
        self(ev.PassFailed(error=str(exc), error_type=type(exc).__name__))

    def flush(self, wait: float | None = None) -> None:
        """Wait for the messages in flight (at most ``wait`` s; by default as long as the longest channel
        timeout allows) and record their outcome."""
        longest = max((self.sender.timeout(c) for c in self._channels()), default=0.0) + 2.0
        self.sender.wait(longest if wait is None else wait)
        self.record()


def send_test(notify: Notify, host: str | None = None) -> list[tuple[str, str]]:
    """``syncd notify --test``: a test message on every channel, now; (channel as shown, error or "")."""
    host = host or host_name()
    sender = Sender(notify, host)
    at = datetime.now(UTC).isoformat(timespec="seconds")
    channels = ([MAIL] if notify.smtp else []) + ([WEBHOOK] if notify.webhook else [])
    return [(shown_channel(notify, c), sender.attempt(Message(c, kind="test"), at)) for c in channels]


def shown_channel(notify: Notify, channel: str) -> str:
    """A channel as logs and ``notify --test`` name it: never the webhook's path or query."""
    if channel == WEBHOOK and notify.webhook is not None:
        return f"webhook {webhook_origin(notify.webhook.url)}"
    if channel == MAIL and notify.smtp is not None:
        return f"mail via {notify.smtp.host}:{notify.smtp.port}"
    return channel


def _by(email: str) -> Callable[[Alert], bool]:
    return lambda a: a.author_email.lower() == email


def _open_from(rows: Mapping[str, tuple[str, int, str]]) -> dict[str, Open]:
    out = {}
    for key, (first, passes, text) in rows.items():
        alert = Alert.from_json(text)
        if alert is not None and alert.key == key:
            out[key] = Open(alert, first, passes)
    return out


class _OutOfTime(Exception):
    """The pass's time for provenance lookups is used up: the message names no author."""


class _Lookups:
    """Who added an entry (from git), at most :data:`MAX_LOOKUPS` per pass; a failure names no one."""

    def __init__(self, repo: ManifestRepo, head: str) -> None:
        self.repo = repo
        self.head = head
        self.left = MAX_LOOKUPS
        self.until = time.monotonic() + LOOKUP_SECONDS
        self._parsed: dict[tuple[str, str], frozenset[tuple[str, str]]] = {}

    def _entries(self, path: str, blob: str) -> frozenset[tuple[str, str]]:
        key = (path, blob)
        if key not in self._parsed:
            if time.monotonic() > self.until:
                raise _OutOfTime
            try:
                found = frozenset((a.dest, a.sha256) for a in manifest.parse(path, self.repo.read(blob)))
            except (ManifestError, SyncdError):
                found = frozenset()
            self._parsed[key] = found
        return self._parsed[key]

    def _who(self, path: str, dest: str, sha256: str, commit: str) -> tuple[str, str, str]:
        if not path or not (commit or self.head) or self.left <= 0 or time.monotonic() > self.until:
            return "", "", ""
        self.left -= 1
        head = commit or self.head
        try:
            if dest:
                found = self.repo.introduced(head, path, lambda b: (dest, sha256) in self._entries(path, b))
            else:
                found = self.repo.introduced(head, path, lambda b: False)  # the file's last change
            info = self.repo.commit_info(found)
        except Exception:  # a lookup may fail; the message then names no author
            return "", "", ""
        name = info.author_name.replace("\n", " ")[:100]
        email = info.author_email.replace("\n", " ")[:200]
        return f"{name} <{email}>", email, info.commit

    def alert(self, a: Alert) -> Alert:
        if a.author or not a.manifest:
            return a
        who, email, commit = self._who(a.manifest, a.dest, a.sha256, a.commit)
        return replace(a, author=who, author_email=email, introduced_by=commit) if who else a

    def landed(self, x: Landed) -> Landed:
        who, email, commit = self._who(x.manifest, x.dest, x.sha256, x.commit)
        return replace(x, author=who, author_email=email, introduced_by=commit) if who else x
