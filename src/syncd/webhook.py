"""The chat or incident webhook (``[notify.webhook]``): one JSON POST per message.

``http.client`` from the standard library, for one reason: the send's watchdog must be able to cut the
connection at the deadline (a server that drips its answer a byte at a time defeats every per-read
timeout), and ``http.client`` exposes its socket. It also does exactly what is wanted and nothing more: no
redirects (a 3xx is a failure: the Bearer token and the body go to the configured URL only), no proxy from
the environment, no ``.netrc``, and only the status line and headers of the answer are read (never its
body, which could be gigabytes). TLS is verified against the system store plus ``ca_file``. The optional
``X-Syncd-Signature: sha256=<hex>`` is the HMAC-SHA256 of the exact body bytes, as GitHub signs its
webhooks. The URL is never shown beyond its origin: its path or query is often the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import socket
import ssl
from urllib.parse import urlsplit

from syncd import __version__
from syncd.config import Webhook, webhook_origin
from syncd.errors import NotifyError
from syncd.mail import Cancel, tls_context


def signature(secret: str, body: bytes) -> str:
    """The ``X-Syncd-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(hook: Webhook, payload: dict[str, object], cancel: Cancel | None = None) -> None:
    """POST ``payload`` as JSON; raise :class:`NotifyError` unless the answer is 2xx. ``cancel`` lets a
    watchdog end the request at its deadline."""
    body = json.dumps(payload, sort_keys=True).encode()
    parts = urlsplit(hook.url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {
        "Host": parts.netloc,
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "User-Agent": f"syncd/{__version__}",
        "Connection": "close",
    }
    if hook.token is not None:
        headers["Authorization"] = f"Bearer {hook.token.reveal()}"
    if hook.hmac_secret is not None:
        headers["X-Syncd-Signature"] = signature(hook.hmac_secret.reveal(), body)
    where = webhook_origin(hook.url)
    conn: http.client.HTTPConnection
    try:
        host = parts.hostname or ""
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                host, parts.port, timeout=hook.timeout, context=tls_context(hook.ca_file)
            )
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=hook.timeout)
        if cancel is not None:
            cancel.attach(conn)
        try:
            conn.connect()
            if cancel is not None:
                cancel.check()
            conn.putrequest("POST", target, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                conn.putheader(name, value)
            conn.endheaders(body)
            status = conn.getresponse().status  # the status line and headers only; the body is not read
        finally:
            conn.close()
    except NotifyError:
        raise
    except Exception as exc:
        why = "timed out (cut at the timeout)" if cancel is not None and cancel.fired else _why(exc)
        raise NotifyError(f"webhook to {where} failed: {why}") from None
    if 300 <= status < 400:
        raise NotifyError(
            f"webhook at {where} answered a redirect ({status}), which syncd does not follow "
            "(the token and the message go to the configured URL only); configure the final URL"
        )
    if not 200 <= status < 300:
        raise NotifyError(f"webhook at {where} answered {status}")


def _why(exc: BaseException) -> str:
    """Our words for a failed request (never the server's text, which could echo a header)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "the server's TLS certificate is not trusted or not for this host name (ca_file?)"
    if isinstance(exc, ssl.SSLError):
        return "TLS failed"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "the host name does not resolve"
    if isinstance(exc, http.client.HTTPException):
        return f"not a valid HTTP answer ({type(exc).__name__})"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"unexpected {type(exc).__name__}"
