"""Downloads from Artifactory with httpx: streamed, hashed while streaming, size-capped, time-bounded.

The only module that imports httpx (and httpcore, its transport); every error leaves it as a
:class:`~syncd.errors.FetchError` with a message of syncd's own.

- Credentials (Bearer token or basic auth) are attached per request, and only when the request goes to the
  configured Artifactory origin (same scheme, host and port). Redirects are followed by hand, so a redirect
  to a signed storage URL on another host gets no ``Authorization`` header. ``trust_env`` is off: no
  ``.netrc`` credential or environment proxy is picked up behind the operator's back.
- TLS: certificates are verified against the system trust store, plus ``[artifactory] ca_file`` when given
  (:func:`trust_context`); certifi's bundle is never used.
- ``X-Checksum-Sha256`` or ``Content-Length`` that contradict the manifest fail the asset before the body.
- The body is hashed as it streams (no second read) and the download stops as soon as more than ``size``
  bytes arrive. The body is stored exactly as sent: syncd asks for ``Accept-Encoding: identity`` and never
  decodes a ``Content-Encoding`` (no decompression bomb; what is hashed is what is stored).
- Time: every socket wait goes through :class:`_Wire`, which bounds each response head (connect, request,
  any number of ``1xx``, headers) by one ``timeout``, fails a body whose payload arrives slower than
  ``MIN_SPEED`` over a ``timeout`` window (chunk framing and trailers count as no payload), and ends the
  request within ``STOP_SLICE`` seconds of a stop request.
- Messages: URLs without userinfo, query or fragment; library exception text, reason phrases and header
  values never appear, except values that match a strict grammar (digits, hex); a credential that would
  still show is replaced by ``[redacted]``.
"""

from __future__ import annotations

import base64
import email.utils
import errno
import hashlib
import http
import json
import math
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import httpcore
import httpx

from syncd.config import Artifactory
from syncd.errors import ConfigError, FetchError, HTTPStatusError, StopRequested, SyncdError, VerifyError
from syncd.manifest import Asset

MAX_REDIRECTS = 10
MAX_JSON = 64 << 20  # the largest REST API answer read (a deep listing of ~300,000 files)
MIN_SPEED = 1024  # bytes/s of payload, over a whole [download] timeout window: slower is a stalled server
MAX_RETRY_AFTER = 86400.0  # a Retry-After further away than a day is not believed
MAX_VALIDATOR = 200  # longest ETag / Last-Modified kept for If-Range
STOP_SLICE = 1.0  # longest single socket wait, so that a stop request is seen within about a second
_REDIRECTS = {301, 302, 303, 307, 308}
_SAFE_PATH = "/-._~!$&'()*+,;=:@"
_E = TypeVar("_E", bound=BaseException)
_T = TypeVar("_T")
_PRINTABLE = re.compile(r"[\x20-\x7e]+")
_LOCATION_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))  # keep ASCII, percent-encode the rest


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in, to compare origins.

    Raises ValueError for a port that is not a number in 0-65535."""
    p = urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return p.scheme.lower(), (p.hostname or "").lower(), port


def redact(url: str) -> str:
    """The URL without query, fragment or userinfo: safe for logs and messages (never raises)."""
    p = urlsplit(url)
    host = p.hostname or ""
    try:
        port = p.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((p.scheme, netloc, p.path, "", ""))


def host_of(url: str) -> str:
    """``host[:port]`` of ``url``, escaped for a message (server-chosen text: ASCII, bounded)."""
    p = urlsplit(url)
    try:
        port = p.port
    except ValueError:
        port = None
    host = p.hostname or "?"
    return shown(f"{host}:{port}" if port else host, quote=False)


def shown(text: str, limit: int = 64, *, quote: bool = True) -> str:
    """Untrusted text made safe to print: ASCII only, control characters escaped, at most ``limit``
    characters of it (``...`` says it was cut). ``quote`` wraps it like ``repr``."""
    cut = text[:limit]
    out = ascii(cut) if quote else ascii(cut)[1:-1]
    return out + ("..." if len(text) > limit else "")


def trust_context(ca_file: Path | None) -> ssl.SSLContext:
    """The TLS client context for Artifactory: certificates verified against the system trust store, plus
    ``ca_file`` (PEM) when given.

    The system trust store is OpenSSL's default CA file and directory, which ``ca-certificates`` maintains
    on Debian (``/usr/lib/ssl/cert.pem`` -> ``/etc/ssl/certs/ca-certificates.crt``, ``/etc/ssl/certs``)
    and which ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` override: the same locations pygit2 hands libgit2 (see
    :mod:`syncd.gitsource`), so Artifactory and git trust the same CAs. Never certifi's bundle: httpx and
    httpcore fall back to it when given ``verify=True`` or no context, so syncd always passes this one.

    Raises :class:`ConfigError` (named after ``ca_file``) when ``ca_file`` holds no usable PEM certificate.
    """
    ctx = ssl.create_default_context()  # hostname check, CERT_REQUIRED, TLS 1.2+; OpenSSL's default paths
    if ca_file is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca_file))
        except (ssl.SSLError, OSError, ValueError):
            problem = "cannot be read or holds no PEM certificate (a CA bundle in PEM is expected)"
            raise ConfigError(str(ca_file), [f"at 'artifactory.ca_file': {problem}"]) from None
    return ctx


class Fetcher:
    """An HTTP client bound to one Artifactory; safe to share between download threads.

    ``stop``, when set, ends any request in progress within about ``STOP_SLICE`` seconds with
    :class:`~syncd.errors.StopRequested` (the partial is kept for resume)."""

    def __init__(
        self,
        art: Artifactory,
        *,
        timeout: float,
        concurrency: int,
        stop: threading.Event | None = None,
    ) -> None:
        self.timeout = timeout
        self.stop = stop
        self.base = art.url
        self.origin = origin(art.url)
        self._auth = _auth_header(art)
        self._secrets = _secrets(art)
        # The transport is used without httpx.Client: the client parses every Location itself (even with
        # follow_redirects off) and raises on a bad one, and keeps cookies a server sets; syncd wants
        # neither.
        self._transport = _Transport(
            trust_context(art.ca_file),
            max_connections=concurrency * 2,
            max_keepalive_connections=concurrency,
        )
        self._timeouts = httpx.Timeout(timeout).as_dict()

    def close(self) -> None:
        self._transport.close()

    def url_for(self, asset: Asset) -> str:
        """The asset's URL under the Artifactory base URL (the source path percent-encoded)."""
        return f"{self.base}/{quote(asset.source, safe=_SAFE_PATH)}"

    def download(self, asset: Asset, sink: Sink, progress: Callable[[int], None] = lambda n: None) -> None:
        """Stream ``asset`` into ``sink``, resuming after the bytes it already holds; return once size and
        sha256 are verified.

        Resume: the kept bytes are re-hashed, then ``Range: bytes=N-`` is asked with ``If-Range`` (the
        validator recorded when the partial was started). A ``206`` whose ``Content-Range`` starts at N
        continues the file; a ``200`` (Range ignored, or the file changed) starts it over. Kept bytes
        without a usable validator are dropped: a resume without ``If-Range`` could splice two versions.

        Raises :class:`HTTPStatusError`, :class:`VerifyError` (bytes must be discarded),
        :class:`StopRequested` (``stop`` was set) or :class:`FetchError` (``retryable``: a transport
        fault; the partial may be kept for resume). Nothing else, whatever the server sends.
        """
        url = self.url_for(asset)
        try:
            self._download(asset, url, sink, progress)
        except SyncdError as exc:
            self._scrub(exc)
            raise
        except Exception as exc:
            raise _unexpected(exc, url) from None

    def api_json(self, path: str, query: str = "") -> Any:
        """GET ``{base}/{path}[?query]`` (Artifactory's REST API) and return its parsed JSON, or None for
        a 404. At most :data:`MAX_JSON` bytes are read.

        Raises :class:`HTTPStatusError` (any other status but 200), :class:`StopRequested` or
        :class:`FetchError` (not JSON, too big, a transport fault)."""
        url = f"{self.base}/{quote(path, safe=_SAFE_PATH)}" + (f"?{query}" if query else "")
        body = bytearray()

        def collect(chunk: bytes) -> None:
            body.extend(chunk)
            if len(body) > MAX_JSON:
                where = redact(url)
                raise FetchError(f"answer larger than {MAX_JSON >> 20} MiB from {where}", url=where)

        try:
            self._get(url, collect, within=f"{self.base}/api/")
        except HTTPStatusError as exc:
            if exc.status == 404:
                return None
            raise
        try:
            return json.loads(bytes(body))
        except (ValueError, RecursionError):
            raise FetchError(f"answer from {redact(url)} is not JSON", url=redact(url)) from None

    def hash_remote(self, source: str, progress: Callable[[int], None] = lambda n: None) -> tuple[str, int]:
        """Stream ``source`` (a path under the base URL) and return its sha256 and size, storing nothing
        (``syncd manifest new --hash-locally``). Raises as :meth:`api_json` does; a 404 is an
        :class:`HTTPStatusError` (status 404)."""
        digest = hashlib.sha256()
        size = 0

        def take(chunk: bytes) -> None:
            nonlocal size
            digest.update(chunk)
            size += len(chunk)
            progress(len(chunk))

        self._get(f"{self.base}/{quote(source, safe=_SAFE_PATH)}", take)
        return digest.hexdigest(), size

    def exists(self, source: str) -> bool:
        """Whether ``source`` can be downloaded: a GET of its first byte, closed once the head arrives
        (an empty file answers 416). False for a 404 or 410; other statuses raise as :meth:`api_json`."""
        try:
            self._get(f"{self.base}/{quote(source, safe=_SAFE_PATH)}", None, headers={"Range": "bytes=0-0"})
        except HTTPStatusError as exc:
            if exc.status in (404, 410):
                return False
            if exc.status != 416:
                raise
        return True

    def _get(
        self,
        url: str,
        on_chunk: Callable[[bytes], None] | None,
        *,
        headers: dict[str, str] | None = None,
        within: str = "",
    ) -> None:
        """One GET of ``url`` (redirects followed, credentials only to the origin; with ``within``, only
        to URLs that start with it), its body to ``on_chunk`` (None: only the head is read), with the time
        bounds of a download. Every error is a :class:`SyncdError` without a credential in it."""
        watch = _Watch(self.timeout, self.stop, url)
        _Watch.current.watch = watch
        try:
            with _Response(self, url, headers or {}, watch, within=within) as resp:
                if on_chunk is None:
                    return
                if resp.status_code != 200:
                    what = f"HTTP {resp.status_code} to a request without Range"
                    raise _failure(what, watch, retryable=False)
                watch.body()
                for chunk in resp.iter_raw():
                    on_chunk(chunk)
                    watch.payload(len(chunk))
        except SyncdError as exc:
            self._scrub(exc)
            raise
        except Exception as exc:
            raise _translate(exc, watch) from None
        finally:
            _Watch.current.watch = None

    def _download(self, asset: Asset, url: str, sink: Sink, progress: Callable[[int], None]) -> None:
        digest = hashlib.sha256()
        received = 0
        validator = self._usable(sink.validator)
        for chunk in sink.kept():
            digest.update(chunk)
            received += len(chunk)
        if received and received == asset.size and digest.hexdigest() == asset.sha256:
            return  # a complete download that was not yet published (crash before the rename)
        if received and (received >= asset.size or validator is None):
            digest, received = hashlib.sha256(), 0  # start over (the sink restarts on the response)
        headers = {}
        if received and validator is not None:
            headers = {"Range": f"bytes={received}-", "If-Range": validator}
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
        watch = _Watch(self.timeout, self.stop, url)
        _Watch.current.watch = watch
        note = ""
        try:
            with _Response(self, url, headers, watch) as resp:
                if received and resp.status_code == 200:
                    digest, received = hashlib.sha256(), 0  # Range ignored or file changed: start over
                elif resp.status_code == 206 and not _continues(resp, received, asset.size):
                    raise _failure(
                        f"server answered a range request for bytes {received}- with a different range "
                        f"{_grammar(resp.headers.get('content-range'), _RANGE)}",
                        watch,
                        retryable=False,
                    )
                note = _check_headers(asset, watch, resp, full=received == 0)
                if received == 0:
                    sink.restart(self._usable(_validator(resp)))
                watch.body()
                for chunk in resp.iter_raw():
                    received += len(chunk)
                    if received > asset.size:
                        raise VerifyError(
                            f"server sent more than the {asset.size} bytes in the manifest{note}",
                            url=redact(url),
                            expected=str(asset.size),
                            actual=f">{asset.size}",
                        )
                    digest.update(chunk)
                    _local(sink.write, chunk, url)
                    _local(progress, len(chunk), url)
                    watch.payload(len(chunk))
        except SyncdError:
            raise
        except Exception as exc:
            raise _translate(exc, watch) from None
        finally:
            _Watch.current.watch = None
        if received != asset.size:
            raise _failure(f"download ended after {received} of {asset.size} bytes{note}", watch)
        actual = digest.hexdigest()
        if actual != asset.sha256:
            raise VerifyError(
                f"sha256 mismatch: expected {asset.sha256}, got {actual}{note}{watch.after()}",
                url=redact(url),
                expected=asset.sha256,
                actual=actual,
            )

    def _send(self, url: str, headers: dict[str, str]) -> httpx.Response:
        headers = {"Accept-Encoding": "identity", "User-Agent": "syncd", **headers}
        if self._auth and origin(url) == self.origin:
            headers["Authorization"] = self._auth
        request = httpx.Request("GET", url, headers=headers, extensions={"timeout": self._timeouts})
        return self._transport.handle_request(request)

    def _usable(self, validator: str | None) -> str | None:
        """``validator`` if it may be sent back in ``If-Range`` and stored: printable ASCII, bounded, and
        not an echo of a credential; else None."""
        if validator is None or len(validator) > MAX_VALIDATOR or not _PRINTABLE.fullmatch(validator):
            return None
        if any(s in validator for s in self._secrets):
            return None
        return validator

    def scrub(self, exc: SyncdError) -> None:
        """Replace any credential in ``exc``'s message, for errors raised about this fetcher's answers
        elsewhere (:mod:`syncd.storage`)."""
        self._scrub(exc)

    def _scrub(self, exc: SyncdError) -> None:
        """Replace any credential in ``exc``'s message (a last line of defence; none should get there)."""
        text = str(exc)
        if not any(s in text for s in self._secrets):
            return
        for s in self._secrets:
            text = text.replace(s, "[redacted]")
        exc.args = (text,)
        if isinstance(exc, VerifyError):
            exc.actual = "[redacted]" if any(s in exc.actual for s in self._secrets) else exc.actual


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


# time bounds ---------------------------------------------------------------------------------------


class _Watch:
    """The bounds on the request this thread is making, checked before and during every socket wait.

    - head: from the start of a request (connect included) until its final response head has arrived,
      at most one ``timeout``, however many ``1xx`` responses or slow header lines the server sends;
    - body: at least ``MIN_SPEED`` bytes/s of payload over each ``timeout`` window; framing (chunk-size
      lines, extensions, trailers) is not payload, so a server sending only framing is cut off too;
    - stop: a set ``stop`` event ends the request at the next check (within ``STOP_SLICE``).
    """

    current = threading.local()  # .watch: the _Watch of the request this thread is making, if any

    def __init__(self, timeout: float, stop: threading.Event | None, url: str) -> None:
        self.timeout = timeout
        self.stop = stop
        self.url = url  # the original URL: every message names it
        self.target = url  # where the current request goes (after redirects)
        self.hops = 0
        self.phase = "connect"
        self.deadline = math.inf
        self.window = 0.0
        self.bytes = 0

    def head(self, target: str) -> None:
        """A request to ``target`` starts now (the first, or one after a redirect)."""
        self.target, self.phase = target, "head"
        self.deadline = time.monotonic() + self.timeout

    def body(self) -> None:
        """The final response head is in; the body starts."""
        self.phase, self.deadline = "body", math.inf
        self.window, self.bytes = time.monotonic(), 0

    def payload(self, n: int) -> None:
        self.bytes += n
        self.check()

    def check(self) -> None:
        """Raise if syncd is stopping, the head is late, or the body too slow."""
        if self.stop is not None and self.stop.is_set():
            raise StopRequested(
                f"stopping: download from {redact(self.url)} interrupted (partial kept for resume)",
                url=redact(self.url),
            )
        now = time.monotonic()
        if now >= self.deadline:
            raise _failure(f"timeout: no complete response head within {self.timeout:g} s", self)
        if self.phase != "body":
            return
        elapsed = now - self.window
        if elapsed < self.timeout:
            return
        if self.bytes < MIN_SPEED * elapsed:
            raise _failure(
                f"download too slow: {self.bytes} bytes in {elapsed:.0f} s "
                f"(less than {MIN_SPEED // 1024} KiB/s)",
                self,
            )
        self.window, self.bytes = now, 0

    def wait(self, timeout: float | None) -> float:
        """How long one socket wait may last: the caller's ``timeout``, cut to the head's deadline, the
        body's speed window and ``STOP_SLICE``."""
        now = time.monotonic()
        limit = min(timeout if timeout is not None else math.inf, self.deadline - now, STOP_SLICE)
        if self.phase == "body":
            limit = min(limit, self.window + self.timeout - now)
        return max(limit, 0.001)

    def bound(self, timeout: float | None) -> float | None:
        """The caller's ``timeout`` for one operation that cannot be sliced (connect, TLS handshake, a
        write), cut to the head's deadline."""
        if math.isinf(self.deadline):
            return timeout
        left = max(self.deadline - time.monotonic(), 0.001)
        return left if timeout is None else min(timeout, left)

    def after(self) -> str:
        """`` (after N redirect(s), to HOST)`` once a redirect was followed, else ``""``."""
        if not self.hops:
            return ""
        return f" (after {self.hops} redirect(s), to {host_of(self.target)})"


def _watching() -> _Watch | None:
    watch: _Watch | None = getattr(_Watch.current, "watch", None)
    return watch


class _Stream(httpcore.NetworkStream):
    """A socket stream whose every wait obeys the thread's :class:`_Watch`."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        watch = _watching()
        if watch is None:
            return self._inner.read(max_bytes, timeout)
        end = time.monotonic() + (timeout if timeout is not None else math.inf)
        while True:
            watch.check()
            left = end - time.monotonic()
            if left <= 0:
                raise httpcore.ReadTimeout("read timed out")
            try:
                return self._inner.read(max_bytes, watch.wait(left))
            except httpcore.ReadTimeout:
                continue  # one slice ended without data: check the bounds, then wait again

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        watch = _watching()
        if watch is not None:
            watch.check()
            timeout = watch.bound(timeout)
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        watch = _watching()
        if watch is not None:
            watch.check()
            timeout = watch.bound(timeout)
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    """httpcore's sync backend, with every stream wrapped in :class:`_Stream`."""

    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        watch = _watching()
        if watch is not None:
            watch.check()
            timeout = watch.bound(timeout)
        return _Stream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.UnsupportedProtocol("unix sockets are not used")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _Body(httpx.SyncByteStream):
    def __init__(self, inner: Iterable[bytes]) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class _Transport(httpx.BaseTransport):
    """httpx's transport on an httpcore pool with :class:`_Backend`. httpcore's exceptions pass through
    unchanged (syncd maps them by type itself)."""

    def __init__(self, ctx: ssl.SSLContext, *, max_connections: int, max_keepalive_connections: int) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=ctx,
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
            network_backend=_Backend(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, Iterable)
        req = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        resp = self._pool.handle_request(req)
        assert isinstance(resp.stream, Iterable)
        return httpx.Response(
            status_code=resp.status,
            headers=resp.headers,
            stream=_Body(resp.stream),
            extensions=resp.extensions,
        )

    def close(self) -> None:
        self._pool.close()


# responses and redirects ----------------------------------------------------------------------------


class _Response:
    """Follow redirects by hand (credentials only to the origin) and close the final response."""

    def __init__(
        self, fetcher: Fetcher, url: str, headers: dict[str, str], watch: _Watch, *, within: str = ""
    ) -> None:
        # An answer of Artifactory's API must come from that API itself: a redirect may not leave
        # ``within`` (its URL prefix), where the same host serves what users uploaded.
        self.within = within
        self.fetcher = fetcher
        self.url = url
        self.headers = headers
        self.watch = watch
        self.resp: httpx.Response | None = None

    def __enter__(self) -> httpx.Response:
        url, seen, watch = self.url, {self.url}, self.watch
        for _ in range(MAX_REDIRECTS + 1):
            watch.head(url)
            resp = self.fetcher._send(url, self.headers)
            if resp.status_code not in _REDIRECTS:
                self.resp = resp
                if resp.status_code not in (200, 206):
                    resp.close()
                    raise HTTPStatusError(
                        f"HTTP {resp.status_code}{_phrase(resp.status_code)} from {redact(self.url)}"
                        f"{watch.after()}",
                        url=redact(self.url),
                        status=resp.status_code,
                        retry_after=_retry_after(resp.headers.get("retry-after")),
                    )
                return resp
            locations = resp.headers.get_list("location")
            resp.close()
            if len(locations) != 1:
                raise _failure(f"redirect with {len(locations)} Location headers", watch, retryable=False)
            url = _next_url(url, locations[0], watch)
            if self.within and not url.startswith(self.within):
                where = "to another host" if origin(url) != self.fetcher.origin else "outside the API's path"
                raise _failure(
                    f"redirected {where} ({host_of(url)}): an answer of Artifactory's API must come from "
                    "the API itself",
                    watch,
                    retryable=False,
                )
            if url in seen:
                raise _failure("redirect loop", watch, retryable=False)
            seen.add(url)
            watch.hops += 1
        raise _failure(f"more than {MAX_REDIRECTS} redirects", watch, retryable=False)

    def __exit__(self, *exc: object) -> None:
        if self.resp is not None:
            self.resp.close()


def _next_url(current: str, location: str, watch: _Watch) -> str:
    """Where a redirect's ``Location`` points, resolved against ``current``, without userinfo (a server
    must not make syncd send credentials it chose); non-ASCII is percent-encoded.

    Raises a non-retryable :class:`FetchError` for a Location that does not parse as an http(s) URL."""
    loc = location.strip()
    if not loc or len(loc) > 8192 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in loc):
        raise _failure("redirect to a Location that does not parse", watch, retryable=False)
    loc = quote(loc, safe=_LOCATION_SAFE)
    try:
        target = urlsplit(urljoin(current, loc))
        scheme = target.scheme.lower()
        port = target.port
        host = target.hostname
        if scheme in ("http", "https") and host:
            netloc = f"[{host}]" if ":" in host else host
            url = urlunsplit((scheme, f"{netloc}:{port}" if port is not None else netloc, *target[2:]))
            httpx.URL(url)  # the client must accept it too (host syntax, IDNA)
    except (ValueError, UnicodeError, httpx.InvalidURL):
        raise _failure("redirect to a Location that does not parse", watch, retryable=False) from None
    if scheme not in ("http", "https"):
        what = shown(scheme, 16) if scheme else "no"
        raise _failure(f"redirect to an unsupported URL scheme ({what})", watch, retryable=False)
    if not host:
        raise _failure("redirect to a URL without a host", watch, retryable=False)
    return url


def _continues(resp: httpx.Response, offset: int, size: int) -> bool:
    """Whether ``resp`` is a 206 that holds exactly bytes ``offset``-end of a ``size``-byte file."""
    if resp.status_code != 206:
        return False
    m = _RANGE.fullmatch(resp.headers.get("content-range", "").strip())
    if m is None:
        return False
    return int(m.group(1)) == offset and int(m.group(2)) == size - 1 and m.group(3) in (str(size), "*")


_RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)", re.ASCII)
_DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_TOKEN = re.compile(r"[A-Za-z0-9._+-]{1,32}", re.ASCII)


def _grammar(value: str | None, pattern: re.Pattern[str]) -> str:
    """``value`` if it matches ``pattern`` (then it is safe to print), else a placeholder."""
    if value is None:
        return "(none)"
    value = value.strip()
    return value if pattern.fullmatch(value) else "(malformed)"


def _validator(resp: httpx.Response) -> str | None:
    """A strong ETag, else Last-Modified: what ``If-Range`` may carry to resume safely."""
    etag: str | None = resp.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    modified: str | None = resp.headers.get("last-modified")
    return modified


def _phrase(status: int) -> str:
    """`` Not Found``: the standard reason phrase (the server's own is never shown), or ``""``."""
    try:
        return " " + http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date, a date without zone taken as UTC),
    bounded to ``0..MAX_RETRY_AFTER``; None when absent or not understood. Never raises."""
    if not value:
        return None
    value = value.strip()
    if _DIGITS.fullmatch(value):
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)  # RFC 2822 "-0000": "no zone information", i.e. UTC
        seconds = (when - datetime.now(UTC)).total_seconds()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def _encoding_note(resp: httpx.Response) -> str:
    """What to add to a size or hash error when the server sent a non-identity ``Content-Encoding``."""
    encoding = resp.headers.get("content-encoding", "identity").strip()
    if encoding.lower() in ("", "identity"):
        return ""
    return (
        f"; the server sent Content-Encoding: {_grammar(encoding, _TOKEN)} although syncd asked for "
        "identity; syncd stores and hashes the body exactly as sent, without decoding it"
    )


def _check_headers(asset: Asset, watch: _Watch, resp: httpx.Response, *, full: bool) -> str:
    """Fail before the body on a checksum or length that contradicts the manifest; return the encoding
    note for later messages. Malformed values are not judged here (the body's hash decides)."""
    note = _encoding_note(resp)
    url = redact(watch.url)
    for claimed in resp.headers.get_list("x-checksum-sha256"):
        claimed = claimed.strip().lower()
        if _SHA256.fullmatch(claimed) and claimed != asset.sha256:
            raise VerifyError(
                f"server's X-Checksum-Sha256 {claimed} differs from the manifest's {asset.sha256}; "
                f"not downloading{watch.after()}",
                url=url,
                expected=asset.sha256,
                actual=claimed,
            )
    length = resp.headers.get("content-length")
    if full and length is not None and _DIGITS.fullmatch(length.strip()) and int(length) != asset.size:
        raise VerifyError(
            f"server's Content-Length {int(length)} differs from the manifest's size {asset.size}; "
            f"not downloading{note}{watch.after()}",
            url=url,
            expected=str(asset.size),
            actual=str(int(length)),
        )
    return note


# errors --------------------------------------------------------------------------------------------


def _failure(what: str, watch: _Watch, *, retryable: bool = True) -> FetchError:
    """A FetchError ``WHAT from ORIGINAL-URL (after redirects, to HOST)``."""
    exc = FetchError(f"{what} from {redact(watch.url)}{watch.after()}", url=redact(watch.url))
    exc.retryable = retryable
    return exc


_PHASES = {
    "connect": "before sending the request",
    "head": "waiting for the response head",
    "body": "reading the body",
}


def _translate(exc: BaseException, watch: _Watch) -> FetchError:
    """An httpx / httpcore / h11 / ssl / OS exception as a FetchError of syncd's own words, by type only:
    their text can hold a header value (h11 quotes the whole offending header) or a URL."""
    phase = _PHASES.get(watch.phase, "")
    tls = _cause(exc, ssl.SSLError)
    if tls is not None:
        reason = getattr(tls, "reason", None)
        detail = (
            f" ({reason})" if isinstance(reason, str) and re.fullmatch(r"[A-Z0-9_]{1,64}", reason) else ""
        )
        return _failure(f"TLS error{detail}", watch)
    if isinstance(exc, httpx.ConnectTimeout | httpcore.ConnectTimeout):
        return _failure("timed out connecting", watch)
    if isinstance(exc, httpx.ConnectError | httpcore.ConnectError):
        return _failure(f"could not connect{_errno(exc)}", watch)
    if isinstance(exc, httpx.WriteTimeout | httpcore.WriteTimeout):
        return _failure("timed out sending the request", watch)
    if isinstance(exc, httpx.TimeoutException | httpcore.TimeoutException):
        return _failure(f"timed out {phase}", watch)
    if isinstance(exc, httpx.LocalProtocolError | httpcore.LocalProtocolError):
        return _failure(
            "could not send the request (a header value HTTP does not allow)", watch, retryable=False
        )
    if isinstance(exc, httpx.RemoteProtocolError | httpcore.RemoteProtocolError):
        return _failure(f"the server broke the HTTP protocol {phase} (malformed or cut off)", watch)
    if isinstance(exc, httpx.NetworkError | httpcore.NetworkError | OSError):
        return _failure(f"connection failed {phase}{_errno(exc)}", watch)
    if isinstance(exc, httpx.UnsupportedProtocol | httpcore.UnsupportedProtocol | httpx.InvalidURL):
        return _failure("URL not usable", watch, retryable=False)
    return _failure(f"unexpected {type(exc).__name__} {phase}", watch, retryable=False)


def _local(call: Callable[[_T], None], arg: _T, url: str) -> None:
    """``call(arg)`` for the sink or the progress callback: their errors are not the network's."""
    try:
        call(arg)
    except SyncdError:
        raise
    except Exception as exc:
        raise _unexpected(exc, url) from None


def _unexpected(exc: BaseException, url: str) -> FetchError:
    err = FetchError(f"unexpected {type(exc).__name__} while downloading {redact(url)}", url=redact(url))
    err.retryable = False
    return err


def _cause(exc: BaseException, kind: type[_E]) -> _E | None:
    """The first ``kind`` in ``exc``'s chain of causes and contexts, if any (bounded walk)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return None
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _errno(exc: BaseException) -> str:
    """`` (ECONNREFUSED)`` from the OSError behind ``exc``, or ``""``."""
    os_error = _cause(exc, OSError)
    if os_error is None or os_error.errno is None:
        return ""
    name = errno.errorcode.get(os_error.errno)
    return f" ({name})" if name else ""


def _auth_header(art: Artifactory) -> str | None:
    if art.token is not None:
        return f"Bearer {art.token.reveal()}"
    if art.username is not None and art.password is not None:
        raw = f"{art.username}:{art.password.reveal()}".encode()
        return "Basic " + base64.b64encode(raw).decode()
    return None


def _secrets(art: Artifactory) -> list[str]:
    """Every form in which a credential could be echoed back: the token, the password, the Basic blob."""
    out = []
    if art.token is not None:
        out.append(art.token.reveal())
    if art.password is not None:
        out.append(art.password.reveal())
        if art.username is not None:
            out.append(base64.b64encode(f"{art.username}:{art.password.reveal()}".encode()).decode())
    return [s for s in out if len(s) >= 4]
