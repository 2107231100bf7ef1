"""The chat or incident webhook (``[notify.webhook]``): one JSON POST per message.

httpx, as for downloads, with ``trust_env`` off (no proxy, no ``.netrc``), redirects never followed (a
3xx is a failure: the Bearer token and the body go to the configured URL only), TLS verified against the
system store plus ``ca_file``. The optional ``X-Syncd-Signature: sha256=<hex>`` is the HMAC-SHA256 of the
exact body bytes, as GitHub signs its webhooks. The URL is never shown beyond its origin: its path or
query is often the secret (Slack, Teams, Mattermost).
"""

from __future__ import annotations

import hashlib
import hmac
import json

import httpx

from syncd import __version__
from syncd.config import Webhook, webhook_origin
from syncd.errors import NotifyError
from syncd.mail import tls_context


def signature(secret: str, body: bytes) -> str:
    """The ``X-Syncd-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(hook: Webhook, payload: dict[str, object]) -> None:
    """POST ``payload`` as JSON; raise :class:`NotifyError` unless the answer is 2xx."""
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {"Content-Type": "application/json", "User-Agent": f"syncd/{__version__}"}
    if hook.token is not None:
        headers["Authorization"] = f"Bearer {hook.token.reveal()}"
    if hook.hmac_secret is not None:
        headers["X-Syncd-Signature"] = signature(hook.hmac_secret.reveal(), body)
    where = webhook_origin(hook.url)
    try:
        with httpx.Client(
            verify=tls_context(hook.ca_file),
            trust_env=False,
            follow_redirects=False,
            timeout=httpx.Timeout(hook.timeout),
        ) as client:
            resp = client.post(hook.url, content=body, headers=headers)
    except Exception as exc:
        raise NotifyError(f"webhook to {where} failed: {_why(exc)}") from None
    if 300 <= resp.status_code < 400:
        raise NotifyError(
            f"webhook at {where} answered a redirect ({resp.status_code}), which syncd does not follow "
            "(the token and the message go to the configured URL only); configure the final URL"
        )
    if not 200 <= resp.status_code < 300:
        raise NotifyError(f"webhook at {where} answered {resp.status_code}")


def _why(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.ConnectError):
        cause = exc.__cause__ or exc.__context__
        text = type(cause).__name__ if cause else ""
        if "Certificate" in text or "SSL" in text:
            return "TLS failed (is the server's certificate trusted? ca_file?)"
        return "cannot connect"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}"
    return f"unexpected {type(exc).__name__}"
