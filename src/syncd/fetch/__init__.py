"""Downloads from Artifactory with httpx: streamed, hashed while streaming, size-capped, time-bounded.

The only package that imports httpx, h11 and httpcore; every error leaves it as a
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
import hashlib
import json
import re
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from syncd import segments
from syncd.config import Artifactory
from syncd.errors import ConfigError, FetchError, HTTPStatusError, SyncdError, VerifyError
from syncd.fetch.answers import RANGE, Response, check_headers, continues, grammar, validator_of
from syncd.fetch.http11 import Transport
from syncd.fetch.segmented import Segmented
from syncd.fetch.sink import Sink
from syncd.fetch.wire import (
    Watch,
    failure,
    local,
    origin,
    redact,
    translate,
    unexpected,
)
from syncd.manifest import Asset

__all__ = ["Fetcher", "Sink", "trust_context"]

MAX_JSON = 64 << 20  # the largest REST API answer read (a deep listing of ~300,000 files)
MAX_VALIDATOR = 200  # longest ETag / Last-Modified kept for If-Range
_SAFE_PATH = "/-._~!$&'()*+,;=:@"
_PRINTABLE = re.compile(r"[\x20-\x7e]+")


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
        segments: int = 1,
        segment_min_size: int = 64 << 20,
    ) -> None:
        self.timeout = timeout
        self.segments = segments
        self.segment_min_size = segment_min_size
        self.stop = stop
        self.base = art.url
        self.origin = origin(art.url)
        self._auth = _auth_header(art)
        self._secrets = _secrets(art)
        # The transport is used without httpx.Client: the client parses every Location itself (even with
        # follow_redirects off) and raises on a bad one, and keeps cookies a server sets; syncd wants
        # neither.
        self._transport = Transport(
            trust_context(art.ca_file),
            # Each of ``concurrency`` downloads holds at most ``segments`` connections (and a REST call,
            # one); the pool never opens more, and keeps them all alive between ranged requests.
            max_connections=concurrency * max(segments, 2),
            max_keepalive_connections=concurrency * max(segments, 1),
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
            raise unexpected(exc, url) from None

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
        watch = Watch(self.timeout, self.stop, url)
        Watch.current.watch = watch
        try:
            with Response(self._send, self.origin, url, headers or {}, watch, within=within) as resp:
                if on_chunk is None:
                    return
                if resp.status_code != 200:
                    what = f"HTTP {resp.status_code} to a request without Range"
                    raise failure(what, watch, retryable=False)
                watch.body()
                for chunk in resp.iter_raw():
                    on_chunk(chunk)
                    watch.payload(len(chunk))
        except SyncdError as exc:
            self._scrub(exc)
            raise
        except Exception as exc:
            err = translate(exc, watch)  # it names the redirect's host, which the server chose
            self._scrub(err)
            raise err from None
        finally:
            Watch.current.watch = None

    def _download(self, asset: Asset, url: str, sink: Sink, progress: Callable[[int], None]) -> None:
        workers = segments.workers_for(asset.size, self.segments, self.segment_min_size)
        if workers > 1:
            job = Segmented(
                self._send,
                self.origin,
                self._usable,
                timeout=self.timeout,
                stop=self.stop,
                workers=workers,
                asset=asset,
                url=url,
                sink=sink,
                progress=progress,
            )
            if job.run():
                return
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
        watch = Watch(self.timeout, self.stop, url)
        Watch.current.watch = watch
        note = ""
        try:
            with Response(self._send, self.origin, url, headers, watch) as resp:
                if received and resp.status_code == 200:
                    digest, received = hashlib.sha256(), 0  # Range ignored or file changed: start over
                elif resp.status_code == 206 and not continues(resp, received, asset.size):
                    raise failure(
                        f"server answered a range request for bytes {received}- with a different range "
                        f"{grammar(resp.headers.get('content-range'), RANGE)}",
                        watch,
                        retryable=False,
                    )
                note = check_headers(asset, watch, resp, full=received == 0)
                if received == 0:
                    sink.restart(self._usable(validator_of(resp)))
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
                    local(sink.write, chunk, url)
                    local(progress, len(chunk), url)
                    watch.payload(len(chunk))
        except SyncdError:
            raise
        except Exception as exc:
            raise translate(exc, watch) from None
        finally:
            Watch.current.watch = None
        if received != asset.size:
            raise failure(f"download ended after {received} of {asset.size} bytes{note}", watch)
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
        """Replace any credential in ``exc``'s message (a last line of defence; none should get there):
        a credential in any letter case, and any piece of one of :data:`SCRUB_PIECE` characters or more
        (a server can echo a token as a redirect's host, lower-cased, or cut to a length)."""
        text = str(exc)
        scrubbed = scrub(text, self._secrets)
        if scrubbed != text:
            exc.args = (scrubbed,)
        if isinstance(exc, VerifyError):
            exc.actual = scrub(exc.actual, self._secrets)


SCRUB_PIECE = 8  # the shortest piece of a credential that is redacted where it shows


def scrub(text: str, secrets: list[str]) -> str:
    """``text`` with every credential, and every piece of one at least :data:`SCRUB_PIECE` characters
    long, in any letter case, replaced by ``[redacted]``."""
    low = "".join(c.lower() if len(c.lower()) == 1 else c for c in text)  # same length as text
    hidden = [False] * len(text)
    for secret in secrets:
        s = secret.lower()
        n = min(SCRUB_PIECE, len(s))
        for i in range(len(s) - n + 1):
            piece = s[i : i + n]
            at = low.find(piece)
            while at >= 0:
                hidden[at : at + n] = [True] * n
                at = low.find(piece, at + 1)
    if not any(hidden):
        return text
    out, i = [], 0
    while i < len(text):
        if hidden[i]:
            while i < len(text) and hidden[i]:
                i += 1
            out.append("[redacted]")
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


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
