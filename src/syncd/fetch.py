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
import email.utils
import hashlib
import re
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import httpx

from syncd.config import Artifactory
from syncd.errors import FetchError, HTTPStatusError, VerifyError
from syncd.manifest import Asset

MAX_REDIRECTS = 10
MIN_SPEED = 1024  # bytes/s, over a whole [download] timeout window: slower is a stalled server
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
        self.timeout = timeout
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

    def download(self, asset: Asset, sink: Sink, progress: Callable[[int], None] = lambda n: None) -> None:
        """Stream ``asset`` into ``sink``, resuming after the bytes it already holds; return once size and
        sha256 are verified.

        Resume: the kept bytes are re-hashed, then ``Range: bytes=N-`` is asked with ``If-Range`` (the
        validator recorded when the partial was started). A ``206`` whose ``Content-Range`` starts at N
        continues the file; a ``200`` (Range ignored, or the file changed) starts it over.

        Raises :class:`HTTPStatusError`, :class:`VerifyError` (bytes must be discarded) or
        :class:`FetchError` (``retryable``: a transport fault; the partial may be kept for resume).
        """
        url = self.url_for(asset)
        digest = hashlib.sha256()
        received = 0
        for chunk in sink.kept():
            digest.update(chunk)
            received += len(chunk)
        if received > asset.size:
            sink.restart(None)
            digest, received = hashlib.sha256(), 0
        if received and received == asset.size and digest.hexdigest() == asset.sha256:
            return  # a complete download that was not yet published (crash before the rename)
        if received == asset.size:
            sink.restart(None)
            digest, received = hashlib.sha256(), 0
        headers = {}
        if received:
            headers["Range"] = f"bytes={received}-"
            if sink.validator:
                headers["If-Range"] = sink.validator
        try:
            self._stream(asset, url, sink, progress, digest, received, headers)
        except HTTPStatusError as exc:
            if exc.status != 416 or not received:
                raise
            # The kept bytes do not fit the file the server has now: start over in this same attempt.
            sink.restart(None)
            self._stream(asset, url, sink, progress, hashlib.sha256(), 0, {})

    def _stream(
        self,
        asset: Asset,
        url: str,
        sink: Sink,
        progress: Callable[[int], None],
        digest: Any,
        received: int,
        headers: dict[str, str],
    ) -> None:
        """One request: stream the body (after ``received`` kept bytes) into ``sink``, then verify."""
        guard = _SpeedGuard(self.timeout)
        try:
            with _Response(self, url, headers) as (final_url, resp):
                if received and not _continues(resp, received, asset.size):
                    digest, received = hashlib.sha256(), 0  # Range ignored or file changed: start over
                _check_headers(asset, final_url, resp, full=received == 0)
                if received == 0:
                    sink.restart(_validator(resp))
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
                    sink.write(chunk)
                    progress(len(chunk))
                    guard.add(len(chunk), redact(final_url))
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

    def _send(self, url: str, headers: dict[str, str]) -> httpx.Response:
        headers = dict(headers)
        if self._auth and origin(url) == self.origin:
            headers["Authorization"] = self._auth
        request = self._client.build_request("GET", url, headers=headers)
        return self._client.send(request, stream=True)


class Sink(Protocol):
    """Where a download goes (a staging file): the bytes kept from an earlier attempt, and a validator
    (ETag or Last-Modified) recorded when they were started."""

    validator: str | None

    def kept(self) -> Iterator[bytes]:
        """The bytes already staged, in order (re-hashed before resuming)."""
        ...

    def write(self, data: bytes) -> None:
        """Append ``data``."""
        ...

    def restart(self, validator: str | None) -> None:
        """Drop every kept byte and remember ``validator`` for a later resume."""
        ...


class _SpeedGuard:
    """Fail a download that trickles: fewer than MIN_SPEED bytes/s over a whole ``timeout`` window.

    A per-read timeout never fires on a server that sends one byte every few seconds; this does."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.start = time.monotonic()
        self.bytes = 0

    def add(self, n: int, url: str) -> None:
        self.bytes += n
        elapsed = time.monotonic() - self.start
        if elapsed < self.window:
            return
        if self.bytes < MIN_SPEED * elapsed:
            raise FetchError(
                f"download too slow: {self.bytes} bytes in {elapsed:.0f} s from {url} "
                f"(less than {MIN_SPEED // 1024} KiB/s)",
                url=url,
            )
        self.start, self.bytes = time.monotonic(), 0


def _continues(resp: httpx.Response, offset: int, size: int) -> bool:
    """Whether ``resp`` is a 206 that continues exactly at ``offset`` of a ``size``-byte file."""
    if resp.status_code != 206:
        return False
    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("content-range", "").strip())
    if m is None:
        return False
    return int(m.group(1)) == offset and m.group(3) in (str(size), "*")


def _validator(resp: httpx.Response) -> str | None:
    """A strong ETag, else Last-Modified: what ``If-Range`` may carry to resume safely."""
    etag: str | None = resp.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    modified: str | None = resp.headers.get("last-modified")
    return modified


class _Response:
    """Follow redirects by hand (credentials only to the origin) and close the final response."""

    def __init__(self, fetcher: Fetcher, url: str, headers: dict[str, str]) -> None:
        self.fetcher = fetcher
        self.url = url
        self.headers = headers
        self.resp: httpx.Response | None = None

    def __enter__(self) -> tuple[str, httpx.Response]:
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            resp = self.fetcher._send(url, self.headers)
            if resp.status_code not in _REDIRECTS:
                self.resp = resp
                if resp.status_code not in (200, 206):
                    resp.close()
                    raise HTTPStatusError(
                        f"HTTP {resp.status_code} {resp.reason_phrase} from {redact(url)}",
                        url=redact(url),
                        status=resp.status_code,
                        retry_after=_retry_after(resp.headers.get("retry-after")),
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


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _check_headers(asset: Asset, url: str, resp: httpx.Response, *, full: bool) -> None:
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
    if full and length is not None and _identity(resp) and length.isdigit() and int(length) != asset.size:
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
