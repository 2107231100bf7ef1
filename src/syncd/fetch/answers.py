"""Reading an answer: redirects followed by hand (credentials only to the origin), and the response
headers syncd trusts only when they match a strict grammar (ranges, validators, checksums, lengths).

Part of :mod:`syncd.fetch`.
"""

from __future__ import annotations

import email.utils
import http
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import httpx

from syncd.errors import HTTPStatusError, VerifyError
from syncd.fetch.wire import Watch, failure, host_of, origin, redact, shown
from syncd.manifest import Asset

MAX_REDIRECTS = 10
MAX_RETRY_AFTER = 86400.0  # a Retry-After further away than a day is not believed
REDIRECTS = {301, 302, 303, 307, 308}
LOCATION_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))  # keep ASCII, percent-encode the rest
Send = Callable[[str, dict[str, str]], httpx.Response]


class Response:
    """Follow redirects by hand (credentials only to the origin) and close the final response."""

    def __init__(
        self,
        send: Send,
        home: tuple[str, str, int],
        url: str,
        headers: dict[str, str],
        watch: Watch,
        *,
        within: str = "",
    ) -> None:
        # ``send`` makes one request (credentials only to ``home``, the configured origin). An answer of
        # Artifactory's API must come from that API itself: a redirect may not leave ``within`` (its URL
        # prefix), where the same host serves what users uploaded.
        self.within = within
        self.send = send
        self.home = home
        self.url = url
        self.headers = headers
        self.watch = watch
        self.resp: httpx.Response | None = None

    def __enter__(self) -> httpx.Response:
        url, seen, watch = self.url, {self.url}, self.watch
        for _ in range(MAX_REDIRECTS + 1):
            watch.head(url)
            resp = self.send(url, self.headers)
            if resp.status_code not in REDIRECTS:
                self.resp = resp
                if resp.status_code not in (200, 206):
                    resp.close()
                    raise HTTPStatusError(
                        f"HTTP {resp.status_code}{phrase(resp.status_code)} from {redact(self.url)}"
                        f"{watch.after()}",
                        url=redact(self.url),
                        status=resp.status_code,
                        retry_after=retry_after(resp.headers.get("retry-after")),
                    )
                return resp
            locations = resp.headers.get_list("location")
            resp.close()
            if len(locations) != 1:
                raise failure(f"redirect with {len(locations)} Location headers", watch, retryable=False)
            url = next_url(url, locations[0], watch)
            if self.within and not url.startswith(self.within):
                where = "to another host" if origin(url) != self.home else "outside the API's path"
                raise failure(
                    f"redirected {where} ({host_of(url)}): an answer of Artifactory's API must come from "
                    "the API itself",
                    watch,
                    retryable=False,
                )
            if url in seen:
                raise failure("redirect loop", watch, retryable=False)
            seen.add(url)
            watch.hops += 1
        raise failure(f"more than {MAX_REDIRECTS} redirects", watch, retryable=False)

    def __exit__(self, *exc: object) -> None:
        if self.resp is not None:
            self.resp.close()


def next_url(current: str, location: str, watch: Watch) -> str:
    """Where a redirect's ``Location`` points, resolved against ``current``, without userinfo (a server
    must not make syncd send credentials it chose); non-ASCII is percent-encoded.

    Raises a non-retryable :class:`FetchError` for a Location that does not parse as an http(s) URL."""
    loc = location.strip()
    if not loc or len(loc) > 8192 or any(ord(c) < 0x20 or ord(c) == 0x7F for c in loc):
        raise failure("redirect to a Location that does not parse", watch, retryable=False)
    loc = quote(loc, safe=LOCATION_SAFE)
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
        raise failure("redirect to a Location that does not parse", watch, retryable=False) from None
    if scheme not in ("http", "https"):
        what = shown(scheme, 16) if scheme else "no"
        raise failure(f"redirect to an unsupported URL scheme ({what})", watch, retryable=False)
    if not host:
        raise failure("redirect to a URL without a host", watch, retryable=False)
    return url


def continues(resp: httpx.Response, offset: int, size: int) -> bool:
    """Whether ``resp`` is a 206 that holds exactly bytes ``offset``-end of a ``size``-byte file."""
    if resp.status_code != 206:
        return False
    m = RANGE.fullmatch(resp.headers.get("content-range", "").strip())
    if m is None:
        return False
    return int(m.group(1)) == offset and int(m.group(2)) == size - 1 and m.group(3) in (str(size), "*")


RANGE = re.compile(r"bytes ([0-9]{1,20})-([0-9]{1,20})/([0-9]{1,20}|\*)", re.ASCII)
DIGITS = re.compile(r"[0-9]{1,20}", re.ASCII)
SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
TOKEN = re.compile(r"[A-Za-z0-9._+-]{1,32}", re.ASCII)


def grammar(value: str | None, pattern: re.Pattern[str]) -> str:
    """``value`` if it matches ``pattern`` (then it is safe to print), else a placeholder."""
    if value is None:
        return "(none)"
    value = value.strip()
    return value if pattern.fullmatch(value) else "(malformed)"


def validator_of(resp: httpx.Response) -> str | None:
    """A strong ETag, else Last-Modified: what ``If-Range`` may carry to resume safely."""
    etag: str | None = resp.headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    modified: str | None = resp.headers.get("last-modified")
    return modified


def phrase(status: int) -> str:
    """`` Not Found``: the standard reason phrase (the server's own is never shown), or ``""``."""
    try:
        return " " + http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date, a date without zone taken as UTC),
    bounded to ``0..MAX_RETRY_AFTER``; None when absent or not understood. Never raises."""
    if not value:
        return None
    value = value.strip()
    if DIGITS.fullmatch(value):
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


def encoding_note(resp: httpx.Response) -> str:
    """What to add to a size or hash error when the server sent a non-identity ``Content-Encoding``."""
    encoding = resp.headers.get("content-encoding", "identity").strip()
    if encoding.lower() in ("", "identity"):
        return ""
    return (
        f"; the server sent Content-Encoding: {grammar(encoding, TOKEN)} although syncd asked for "
        "identity; syncd stores and hashes the body exactly as sent, without decoding it"
    )


def check_headers(asset: Asset, watch: Watch, resp: httpx.Response, *, full: bool) -> str:
    """Fail before the body on a checksum or length that contradicts the manifest; return the encoding
    note for later messages. Malformed values are not judged here (the body's hash decides)."""
    note = encoding_note(resp)
    url = redact(watch.url)
    for claimed in resp.headers.get_list("x-checksum-sha256"):
        claimed = claimed.strip().lower()
        if SHA256.fullmatch(claimed) and claimed != asset.sha256:
            raise VerifyError(
                f"server's X-Checksum-Sha256 {claimed} differs from the manifest's {asset.sha256}; "
                f"not downloading{watch.after()}",
                url=url,
                expected=asset.sha256,
                actual=claimed,
            )
    length = resp.headers.get("content-length")
    if full and length is not None and DIGITS.fullmatch(length.strip()) and int(length) != asset.size:
        raise VerifyError(
            f"server's Content-Length {int(length)} differs from the manifest's size {asset.size}; "
            f"not downloading{note}{watch.after()}",
            url=url,
            expected=str(asset.size),
            actual=str(int(length)),
        )
    return note
