"""Real SMTP servers on 127.0.0.1 for testing syncd's mail notifications.

Plain Python (no pytest import), like :mod:`servers`.

- :class:`SmtpServer` runs aiosmtpd's threaded ``Controller``: plain, STARTTLS (required) or implicit
  TLS (port-465 style), optional AUTH PLAIN/LOGIN against a user→password dict, and an optional fixed
  rejection code for RCPT or DATA. Accepted messages are recorded as :class:`Received`.
- :class:`HangingSmtp` is a bare TCP listener that never greets (or greets, answers EHLO, then goes
  silent), to test client timeouts.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import errno
import logging
import socket
import ssl
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from servers import STOP_TIMEOUT, Stoppable, TestCA, free_port, wait_for_count

__all__ = ["HangingSmtp", "Received", "SmtpServer"]

POLL = 0.02


class _DropLoginDataDeprecation(logging.Filter):
    """aiosmtpd's own AUTH code sets the deprecated ``Session.login_data``, which logs a warning on
    every successful login: drop just that line from its ``mail.log`` logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Session.login_data is deprecated")


logging.getLogger("mail.log").addFilter(_DropLoginDataDeprecation())


@dataclass
class Received:
    """One message an :class:`SmtpServer` accepted."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # the DATA payload as sent (dot-unstuffed), CRLF line ends
    message: EmailMessage  # ``data`` with CRLF turned into LF, parsed with ``email.policy.default``
    auth_user: str | None  # the login that authenticated the session, if any
    tls: bool  # the session was encrypted (STARTTLS or implicit TLS)


def _server_context(ca: TestCA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # verify_mode CERT_NONE: no client certs
    ctx.load_cert_chain(str(ca.server_cert), str(ca.server_key))
    return ctx


class _Handler:
    """aiosmtpd handler hooks; all state lives on the owning :class:`SmtpServer`."""

    def __init__(self, owner: SmtpServer) -> None:
        self._owner = owner

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self._owner._rejection("rcpt")
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        reply = self._owner._rejection("data")
        if reply is not None:
            return reply
        data = envelope.original_content or b""
        parsed = email.message_from_bytes(data.replace(b"\r\n", b"\n"), policy=email.policy.default)
        auth_data = session.auth_data
        transport = server.transport
        received = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            message=parsed,
            auth_user=auth_data if session.authenticated and isinstance(auth_data, str) else None,
            tls=transport is not None and transport.get_extra_info("ssl_object") is not None,
        )
        self._owner._record(received)
        return "250 OK"


class _Controller(Controller):
    """A Controller whose SMTP instances get the AUTH-over-plain setting without aiosmtpd's warning.

    aiosmtpd's ``SMTP(auth_required=True, auth_require_tls=False)`` emits a ``UserWarning`` (and logs a
    warning) on *every connection*. Here that combination is chosen on purpose (plain+auth test
    servers) or is wrong anyway (implicit TLS: aiosmtpd only counts STARTTLS as TLS), so the flag is
    set after construction instead.
    """

    def __init__(self, *args: Any, auth_require_tls: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._auth_require_tls = auth_require_tls

    def factory(self) -> SMTP:
        smtp = SMTP(self.handler, **self.SMTP_kwargs)
        if not hasattr(smtp, "_auth_require_tls"):  # pragma: no cover - aiosmtpd internals moved
            raise RuntimeError("aiosmtpd.smtp.SMTP has no _auth_require_tls: update tests/mailservers.py")
        smtp._auth_require_tls = self._auth_require_tls
        return smtp


class SmtpServer(Stoppable):
    """aiosmtpd on 127.0.0.1 in a thread, recording accepted mail in :attr:`messages`.

    ``starttls=ca`` advertises STARTTLS (the CA's server certificate) and refuses MAIL/AUTH etc. before
    it (530). ``implicit_tls=ca`` makes the whole connection TLS (like port 465). ``auth={user: pw}``
    requires AUTH (PLAIN or LOGIN; a wrong password gets 535, MAIL without AUTH gets 530). Without TLS
    aiosmtpd neither advertises nor accepts AUTH (538) unless ``auth_require_tls=False``; with
    ``implicit_tls`` AUTH is always allowed. ``reject=550`` (or 451, …) answers every RCPT with that
    code, or every DATA with ``reject_at="data"``; :attr:`reject` may be changed while running.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        starttls: TestCA | None = None,
        implicit_tls: TestCA | None = None,
        auth: dict[str, str] | None = None,
        auth_require_tls: bool = True,
        reject: int | None = None,
        reject_at: Literal["rcpt", "data"] = "rcpt",
        hostname: str = "127.0.0.1",
    ) -> None:
        if starttls is not None and implicit_tls is not None:
            raise ValueError("use starttls or implicit_tls, not both")
        if reject_at not in ("rcpt", "data"):
            raise ValueError(f"reject_at must be 'rcpt' or 'data', not {reject_at!r}")
        self.hostname = hostname
        self.auth = dict(auth) if auth is not None else None
        self.reject = reject
        self.reject_at = reject_at
        self.starttls = starttls is not None
        self.implicit_tls = implicit_tls is not None
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self._stopped = False

        smtp_kwargs: dict[str, Any] = {
            "server_hostname": hostname,  # else aiosmtpd calls socket.getfqdn() per connection
            "ident": "syncd test SMTP",
        }
        if starttls is not None:
            smtp_kwargs.update(tls_context=_server_context(starttls), require_starttls=True)
        if self.auth is not None:
            smtp_kwargs.update(auth_required=True, authenticator=self._authenticate)
        ssl_context = _server_context(implicit_tls) if implicit_tls is not None else None
        # aiosmtpd only knows STARTTLS as TLS: with implicit TLS it would neither advertise nor allow AUTH
        require_tls = auth_require_tls and implicit_tls is None

        attempts = 1 if port is not None else 5
        for attempt in range(attempts):
            chosen = port if port is not None else free_port()
            controller = _Controller(
                _Handler(self),
                hostname=hostname,
                port=chosen,
                ssl_context=ssl_context,
                auth_require_tls=require_tls,
                ready_timeout=10.0,
                **smtp_kwargs,
            )
            try:
                controller.start()
            except OSError as exc:
                controller.stop(no_assert=True)
                controller.loop.close()
                if exc.errno != errno.EADDRINUSE or attempt == attempts - 1:
                    raise
                continue
            break
        self._controller = controller
        self.port: int = chosen

    # -- public API
    @property
    def messages(self) -> list[Received]:
        """Snapshot of the messages accepted so far, oldest first."""
        with self._lock:
            return list(self._messages)

    def wait_for(self, n: int = 1, timeout: float = 10) -> list[Received]:
        """Wait until at least ``n`` messages arrived and return them; AssertionError after ``timeout``."""
        return wait_for_count(
            lambda: self.messages,
            n,
            timeout,
            lambda got: (
                f"SMTP 127.0.0.1:{self.port}: "
                f"{[(r.mail_from, r.rcpt_tos, r.message.get('Subject')) for r in got]}"
            ),
        )

    def clear(self) -> None:
        """Forget the recorded messages."""
        with self._lock:
            self._messages.clear()

    def stop(self) -> None:
        """Stop the server thread and close the listener (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._controller.stop()

    # -- internals (called on the server's event-loop thread)
    def _record(self, received: Received) -> None:
        with self._lock:
            self._messages.append(received)

    def _rejection(self, stage: str) -> str | None:
        code = self.reject
        if code is None or stage != self.reject_at:
            return None
        return f"{code} {stage.upper()} rejected by the syncd test server"

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if mechanism not in ("PLAIN", "LOGIN") or not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        expected = (self.auth or {}).get(user)
        if expected is None or expected != password:
            return AuthResult(success=False, handled=False)  # aiosmtpd answers 535 5.7.8
        return AuthResult(success=True, auth_data=user)


class HangingSmtp(Stoppable):
    """A TCP listener on 127.0.0.1 that accepts connections and then never answers.

    ``mode="silent"`` never sends the 220 greeting. ``mode="greet_then_hang"`` sends the greeting,
    answers the first EHLO/HELO, then reads and ignores everything. Connections stay open until
    :meth:`stop`; :attr:`connections` counts those accepted.
    """

    def __init__(self, *, mode: Literal["silent", "greet_then_hang"] = "silent") -> None:
        if mode not in ("silent", "greet_then_hang"):
            raise ValueError(f"mode must be 'silent' or 'greet_then_hang', not {mode!r}")
        self.mode = mode
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._connections = 0
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(POLL * 5)
        self.port: int = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"HangingSmtp:{self.port}", daemon=True
        )
        self._thread.start()

    @property
    def connections(self) -> int:
        """How many connections were accepted so far."""
        with self._lock:
            return self._connections

    def stop(self) -> None:
        """Close the listener and every connection; join the threads (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=STOP_TIMEOUT)
        with self._lock:
            socks, threads = list(self._socks), list(self._threads)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(timeout=STOP_TIMEOUT)
        self._listener.close()

    # -- internals
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._connections += 1
                self._socks.append(conn)
                if self.mode == "greet_then_hang":
                    thread = threading.Thread(
                        target=self._greet_then_hang, args=(conn,), name=f"HangingSmtp:{self.port}:conn"
                    )
                    self._threads.append(thread)
                    thread.start()

    def _greet_then_hang(self, conn: socket.socket) -> None:
        conn.settimeout(POLL * 5)
        buf = b""
        answered = False
        try:
            conn.sendall(b"220 127.0.0.1 ESMTP syncd hanging test server\r\n")
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except TimeoutError:
                    continue
                if not chunk:
                    return  # the client closed
                if answered:
                    continue  # read and ignore
                buf += chunk
                if b"\r\n" not in buf and b"\n" not in buf:
                    continue
                line = buf.split(b"\n", 1)[0].strip().upper()
                answered = True
                if line.startswith(b"EHLO"):
                    conn.sendall(b"250-127.0.0.1\r\n250 HELP\r\n")
                elif line.startswith(b"HELO"):
                    conn.sendall(b"250 127.0.0.1\r\n")
        except OSError:
            return
