"""Downloads from Artifactory with httpx: streamed, hashed while streaming, size-capped.

The only module that imports httpx; every httpx error leaves it as a :class:`~syncd.errors.FetchError`.

- Credentials (Bearer token or basic auth) are attached per request, and only when the request goes to the
  configured Artifactory origin (same scheme, host and port). Redirects are followed by hand, so a redirect
  to a signed storage URL on another host gets no ``Authorization`` header. ``trust_env`` is off: no
  ``.netrc`` credential or environment proxy is picked up behind the operator's back.
- ``X-Checksum-Sha256`` or ``Content-Length`` that contradict the manifest fail the asset before the body.
- The body is hashed as it streams (no second read) and the download stops as soon as more than ``size``
  bytes arrive.
- Messages show URLs without their query string (signed URLs carry temporary credentials there).
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from collections.abc import Callable
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import httpx

from syncd.config import Artifactory
from syncd.errors import FetchError, HTTPStatusError, VerifyError
from syncd.manifest import Asset

MAX_REDIRECTS = 10
_REDIRECTS = {301, 302, 303, 307, 308}
_SAFE_PATH = "/-._~!$&'()*+,;=:@"


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in, to compare origins."""
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return p.scheme.lower(), (p.hostname or "").lower(), port


def redact(url: str) -> str:
    """The URL without query, fragment or userinfo: safe for logs and messages."""
    p = urlsplit(url)
    host = p.hostname or ""
    netloc = f"{host}:{p.port}" if p.port else host
    return urlunsplit((p.scheme, netloc, p.path, "", ""))


class Fetcher:
    """An HTTP client bound to one Artifactory; safe to share between download threads."""

    def __init__(self, art: Artifactory, *, timeout: float, concurrency: int) -> None:
        self.base = art.url
        self.origin = origin(art.url)
        self._auth = _auth_header(art)
        verify: ssl.SSLContext | bool = True
        if art.ca_file is not None:
            ctx = ssl.create_default_context()
            ctx.load_verify_locations(cafile=str(art.ca_file))
            verify = ctx
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency),
            follow_redirects=False,
            trust_env=False,
            verify=verify,
            headers={"Accept-Encoding": "identity", "User-Agent": "syncd"},
        )

    def close(self) -> None:
        self._client.close()

    def url_for(self, asset: Asset) -> str:
        """The asset's URL under the Artifactory base URL (the source path percent-encoded)."""
        return f"{self.base}/{quote(asset.source, safe=_SAFE_PATH)}"

    def download(
        self,
        asset: Asset,
        write: Callable[[bytes], object],
        progress: Callable[[int], None] = lambda n: None,
    ) -> None:
        """Stream ``asset`` into ``write``; return once size and sha256 are verified.

        Raises :class:`HTTPStatusError`, :class:`VerifyError` or :class:`FetchError`. On any error the
        bytes already written must be discarded by the caller.
        """
        url = self.url_for(asset)
        try:
            with self._open(url) as (final_url, resp):
                _check_headers(asset, final_url, resp)
                digest = hashlib.sha256()
                received = 0
                chunks = resp.iter_raw() if _identity(resp) else resp.iter_bytes()
                for chunk in chunks:
                    received += len(chunk)
                    if received > asset.size:
                        raise VerifyError(
                            f"server sent more than the {asset.size} bytes in the manifest",
                            url=redact(final_url),
                            expected=str(asset.size),
                            actual=f">{asset.size}",
                        )
                    digest.update(chunk)
                    write(chunk)
                    progress(len(chunk))
        except httpx.HTTPError as exc:
            raise FetchError(f"{type(exc).__name__} from {redact(url)}: {exc}", url=redact(url)) from None
        if received != asset.size:
            raise FetchError(f"download ended after {received} of {asset.size} bytes", url=redact(url))
        actual = digest.hexdigest()
        if actual != asset.sha256:
            raise VerifyError(
                f"sha256 mismatch: expected {asset.sha256}, got {actual}",
                url=redact(url),
                expected=asset.sha256,
                actual=actual,
            )

    def _open(self, url: str) -> _Response:
        return _Response(self, url)

    def _send(self, url: str) -> httpx.Response:
        headers = {}
        if self._auth and origin(url) == self.origin:
            headers["Authorization"] = self._auth
        request = self._client.build_request("GET", url, headers=headers)
        return self._client.send(request, stream=True)


class _Response:
    """Follow redirects by hand (credentials only to the origin) and close the final response."""

    def __init__(self, fetcher: Fetcher, url: str) -> None:
        self.fetcher = fetcher
        self.url = url
        self.resp: httpx.Response | None = None

    def __enter__(self) -> tuple[str, httpx.Response]:
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            resp = self.fetcher._send(url)
            if resp.status_code not in _REDIRECTS:
                self.resp = resp
                if resp.status_code != 200:
                    resp.close()
                    raise HTTPStatusError(
                        f"HTTP {resp.status_code} {resp.reason_phrase} from {redact(url)}",
                        url=redact(url),
                        status=resp.status_code,
                    )
                return url, resp
            location = resp.headers.get("location")
            resp.close()
            if not location:
                raise FetchError(f"redirect without Location from {redact(url)}", url=redact(url))
            url = urljoin(url, location)
            if urlsplit(url).scheme not in ("http", "https"):
                raise FetchError(f"redirect to a non-HTTP URL from {redact(self.url)}")
        raise FetchError(f"more than {MAX_REDIRECTS} redirects from {redact(self.url)}")

    def __exit__(self, *exc: object) -> None:
        if self.resp is not None:
            self.resp.close()


def _identity(resp: httpx.Response) -> bool:
    encoding: str = resp.headers.get("content-encoding", "identity")
    return encoding.lower() == "identity"


def _check_headers(asset: Asset, url: str, resp: httpx.Response) -> None:
    claimed = resp.headers.get("x-checksum-sha256")
    if claimed and claimed.strip().lower() != asset.sha256:
        raise VerifyError(
            f"server's X-Checksum-Sha256 {claimed.strip().lower()} differs from the manifest's "
            f"{asset.sha256}; not downloading",
            url=redact(url),
            expected=asset.sha256,
            actual=claimed.strip().lower(),
        )
    length = resp.headers.get("content-length")
    if length is not None and _identity(resp) and length.isdigit() and int(length) != asset.size:
        raise VerifyError(
            f"server's Content-Length {length} differs from the manifest's size {asset.size}; "
            "not downloading",
            url=redact(url),
            expected=str(asset.size),
            actual=length,
        )


def _auth_header(art: Artifactory) -> str | None:
    if art.token is not None:
        return f"Bearer {art.token.reveal()}"
    if art.username is not None and art.password is not None:
        raw = f"{art.username}:{art.password.reveal()}".encode()
        return "Basic " + base64.b64encode(raw).decode()
    return None
