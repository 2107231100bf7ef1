"""Mail over SMTP (the only SMTP user): one plain-text message, sent with the standard library.

``smtplib`` and ``email.message.EmailMessage``: no dependency, maintained with Python, and all syncd needs
(STARTTLS, implicit TLS, AUTH, a timeout). TLS verifies the server certificate and its name against the
system trust store (plus ``[notify.smtp] ca_file``); with ``security = "starttls"`` a server that does not
offer STARTTLS is refused, never used in the clear. Errors are our own words: the SMTP reply code and
what it means, never the server's text or the password.
"""

from __future__ import annotations

import contextlib
import functools
import smtplib
import socket
import ssl
import threading
from collections.abc import Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from syncd import __version__
from syncd.config import Smtp
from syncd.errors import NotifyError


def tls_context(ca_file: object) -> ssl.SSLContext:
    """The system trust store (OpenSSL's default paths), plus ``ca_file`` when given."""
    ctx = ssl.create_default_context()
    if ca_file is not None:
        ctx.load_verify_locations(cafile=str(ca_file))
    return ctx


class Cancel:
    """Ends a connection (an ``smtplib.SMTP`` or an ``http.client`` connection: anything with a
    ``sock``) from another thread: :meth:`fire` (a watchdog at the deadline) shuts its socket down, and
    :meth:`check` after the connect refuses to go on once it has fired."""

    def __init__(self) -> None:
        self.fired = False
        self._lock = threading.Lock()
        self._conn: object | None = None

    def attach(self, conn: object) -> None:
        with self._lock:
            self._conn = conn
        self.check()

    def check(self) -> None:
        if self.fired:
            raise NotifyError("the send's time ran out")

    def fire(self) -> None:
        with self._lock:
            self.fired = True
            sock = getattr(self._conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def message(smtp: Smtp, to: Sequence[str], subject: str, body: str) -> EmailMessage:
    """A plain-text mail with the headers a mail system expects of an automatic one (RFC 3834). The
    Message-ID's domain is the sender's (``make_msgid`` would otherwise look up this host's FQDN)."""
    msg = EmailMessage()
    msg["From"] = smtp.sender
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = make_msgid("syncd", domain=_addr(smtp.sender).rsplit("@", 1)[-1])
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"  # Exchange: no out-of-office replies
    msg["X-Mailer"] = f"syncd {__version__}"
    msg.set_content(body)
    return msg


def send(smtp: Smtp, msg: EmailMessage, to: Sequence[str], cancel: Cancel | None = None) -> None:
    """Deliver ``msg`` to ``to`` through the relay; raise :class:`NotifyError` in our words. ``cancel``
    lets a watchdog end the session at its deadline."""
    where = f"{smtp.host}:{smtp.port}"
    try:
        ctx = tls_context(smtp.ca_file) if smtp.security != "none" else None
        client: smtplib.SMTP
        name = _ehlo_name()
        if smtp.security == "tls":
            client = smtplib.SMTP_SSL(local_hostname=name, timeout=smtp.timeout, context=ctx)
        else:
            client = smtplib.SMTP(local_hostname=name, timeout=smtp.timeout)
        client._host = smtp.host  # type: ignore[attr-defined]  # the TLS server name (connect() does not set it)
        if cancel is not None:
            cancel.attach(client)
        client.connect(smtp.host, smtp.port)
        if cancel is not None:
            cancel.check()  # the deadline passed while connecting: the watchdog found no socket yet
        with client:
            client.ehlo()
            if smtp.security == "starttls":
                if not client.has_extn("starttls"):
                    raise NotifyError(
                        f"mail server {where} does not offer STARTTLS; not sending in the clear"
                    )
                client.starttls(context=ctx)
                client.ehlo()
            if smtp.username is not None and smtp.password is not None:
                client.login(smtp.username, smtp.password.reveal())
            refused = client.send_message(msg, from_addr=_addr(smtp.sender), to_addrs=list(to))
            if refused:
                raise NotifyError(f"mail server {where} refused {len(refused)} of {len(to)} recipients")
    except NotifyError:
        raise
    except Exception as exc:
        why = "timed out (cut at the timeout)" if cancel is not None and cancel.fired else _why(exc)
        raise NotifyError(f"mail to {where} failed: {why}") from None


@functools.cache
def _ehlo_name() -> str:
    """This host's name for EHLO: its FQDN (looked up once per process, on a send's thread)."""
    fqdn = socket.getfqdn()
    return fqdn if "." in fqdn else socket.gethostname() or "localhost"


def _addr(text: str) -> str:
    from email.headerregistry import Address
    from email.policy import default

    header = default.header_factory("From", text)
    first: Address = header.addresses[0]
    return first.addr_spec


def _why(exc: BaseException) -> str:
    """Our words for an smtplib, ssl or socket failure (a reply code, never the server's text)."""
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return f"the server refused the user name or password ({exc.smtp_code})"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = sorted({str(code) for code, _ in exc.recipients.values()})
        return f"the server refused every recipient ({', '.join(codes)})"
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return f"the server refused the sender address ({exc.smtp_code})"
    if isinstance(exc, smtplib.SMTPResponseException):
        kind = "temporary" if 400 <= exc.smtp_code < 500 else "permanent"
        return f"the server answered {exc.smtp_code} ({kind} failure)"
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return "the server does not support what the configuration asks (AUTH?)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "the server's TLS certificate is not trusted or not for this host name (ca_file?)"
    if isinstance(exc, ssl.SSLError):
        return 'TLS failed (wrong security for this port? a port 465 server needs security = "tls")'
    if isinstance(exc, TimeoutError | socket.timeout) or "timed out" in type(exc).__name__.lower():
        return "timed out"
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return "the server closed the connection (or timed out)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"unexpected {type(exc).__name__}"
