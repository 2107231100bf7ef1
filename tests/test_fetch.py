"""syncd.fetch against real local HTTP servers (FaultServer for what nginx cannot do)."""

from __future__ import annotations

import gzip
import hashlib
import math
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import World, examples
from hostile import HostileServer, Reply
from servers import FaultServer, Nginx, free_port, make_asset
from syncd.config import Artifactory, Secret
from syncd.errors import FetchError, HTTPStatusError, StopRequested, VerifyError
from syncd.fetch import Fetcher
from syncd.fetch.answers import MAX_RETRY_AFTER, next_url, retry_after
from syncd.fetch.wire import Watch, origin, redact, shown, translate
from syncd.manifest import Asset

pytestmark = pytest.mark.integration

TOKEN = "tok-3f2a1b0c9d8e"
BODY = bytes(range(256)) * 400


def asset(data: bytes = BODY, source: str = "repo/file.bin", **kw: object) -> Asset:
    fields: dict[str, object] = {
        "source": source,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "dest": "d/file.bin",
        "manifest": "assets/m.toml",
        "index": 0,
    }
    fields.update(kw)
    return Asset(**fields)  # type: ignore[arg-type]


def fetcher(url: str, token: str | None = TOKEN) -> Fetcher:
    art = Artifactory(
        url=url, token=Secret(token) if token else None, username=None, password=None, ca_file=None
    )
    return Fetcher(art, timeout=5, concurrency=2)


class MemorySink:
    """A Sink in memory: what fetch.Fetcher.download writes, with optional kept bytes for resume."""

    def __init__(self, kept: bytes = b"", validator: str | None = None) -> None:
        self.data = bytearray(kept)
        self.validator = validator
        self.restarts = 0

    def kept(self) -> Iterator[bytes]:
        if self.data:
            yield bytes(self.data)

    def write(self, data: bytes) -> None:
        self.data += data

    def restart(self, validator: str | None) -> None:
        self.data.clear()
        self.validator = validator
        self.restarts += 1


def download(f: Fetcher, a: Asset, sink: MemorySink | None = None) -> bytes:
    sink = sink or MemorySink()
    f.download(a, sink)
    return bytes(sink.data)


def test_redirect_to_other_origin_gets_no_credentials() -> None:
    """A redirect to a signed URL on another host is followed without the Authorization header."""
    with FaultServer() as art, FaultServer() as storage:
        storage.route("/blob/xyz", body=BODY)
        art.route("/artifactory/repo/file.bin", redirect=f"{storage.url}/blob/xyz?sig=SECRETSIG")
        got = download(fetcher(f"{art.url}/artifactory"), asset())
    assert got == BODY
    assert art.requests[0][2]["authorization"] == f"Bearer {TOKEN}"
    assert storage.requests and all("authorization" not in h for _, _, h in storage.requests)


def test_same_origin_redirect_keeps_credentials() -> None:
    """A redirect within the Artifactory origin still carries the token."""
    with FaultServer() as art:
        art.route("/artifactory/repo/file.bin", redirect="/artifactory/real/file.bin")
        art.route("/artifactory/real/file.bin", body=BODY)
        assert download(fetcher(f"{art.url}/artifactory"), asset()) == BODY
        assert [h.get("authorization") for _, _, h in art.requests] == [f"Bearer {TOKEN}"] * 2


def test_wrong_checksum_header_fails_before_body() -> None:
    """An X-Checksum-Sha256 that contradicts the manifest fails fast, writing nothing."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", body=BODY, headers={"X-Checksum-Sha256": "f" * 64})
        sink = MemorySink()
        with pytest.raises(VerifyError, match="X-Checksum-Sha256"):
            fetcher(f"{art.url}/a").download(asset(), sink)
    assert sink.data == b""


def test_matching_checksum_header_is_accepted() -> None:
    """An X-Checksum-Sha256 equal to the manifest's sha256 (any case) downloads normally."""
    with FaultServer() as art:
        digest = hashlib.sha256(BODY).hexdigest().upper()
        art.route("/a/repo/file.bin", body=BODY, headers={"X-Checksum-Sha256": digest})
        assert download(fetcher(f"{art.url}/a"), asset()) == BODY


def test_oversize_body_is_cut_off() -> None:
    """Without a Content-Length, a body longer than the manifest size is aborted past size."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", body=BODY + b"extra" * 10_000, send_length=False)
        sink = MemorySink()
        with pytest.raises(VerifyError, match="more than"):
            fetcher(f"{art.url}/a").download(asset(), sink)
    assert len(sink.data) <= len(BODY)


def test_short_body_fails() -> None:
    """A body that ends before size bytes fails the asset."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", body=BODY[:1000], send_length=False)
        with pytest.raises(FetchError, match="ended after 1000"):
            download(fetcher(f"{art.url}/a"), asset())


def test_wrong_bytes_fail_sha256() -> None:
    """Bytes of the right length but wrong content fail with a sha256 mismatch naming both hashes."""
    bad = bytes(len(BODY))
    with FaultServer() as art:
        art.route("/a/repo/file.bin", body=bad)
        with pytest.raises(VerifyError) as info:
            download(fetcher(f"{art.url}/a"), asset())
    assert info.value.expected == hashlib.sha256(BODY).hexdigest()
    assert info.value.actual == hashlib.sha256(bad).hexdigest()


def test_server_error_status_is_retryable() -> None:
    """A 503 is an HTTPStatusError marked retryable; a 403 is not."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", status=503, body=b"busy")
        art.route("/a/repo/other.bin", status=403, body=b"no")
        f = fetcher(f"{art.url}/a")
        with pytest.raises(HTTPStatusError) as e503:
            download(f, asset())
        with pytest.raises(HTTPStatusError) as e403:
            download(f, asset(source="repo/other.bin"))
    assert e503.value.status == 503 and e503.value.retryable
    assert e403.value.status == 403 and not e403.value.retryable


def test_redirect_loop_is_bounded() -> None:
    """A redirect loop stops after a bounded number of hops with a clear error."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", redirect="/a/repo/file.bin")
        with pytest.raises(FetchError, match="redirect loop from http") as info:
            download(fetcher(f"{art.url}/a"), asset())
    assert not info.value.retryable


def test_source_path_is_percent_encoded(nginx: Nginx) -> None:
    """A source with spaces and unicode is fetched from its percent-encoded URL on nginx."""
    sha, size = make_asset(nginx.root, "enc/my file ü.bin", 5000, seed=3)
    a = asset(b"", source="enc/my file ü.bin", sha256=sha, size=size)
    got = download(fetcher(nginx.bearer_url(), nginx.token), a)
    assert hashlib.sha256(got).hexdigest() == sha


def test_signed_query_is_redacted() -> None:
    """Messages never show a URL's query string (signed URLs carry credentials there)."""
    assert redact("https://s3.example/b/k?X-Amz-Signature=abc#f") == "https://s3.example/b/k"
    assert origin("https://H.example/x") == ("https", "h.example", 443)
    assert origin("http://h:8081/x") == ("http", "h", 8081)


def test_redirect_without_credentials_end_to_end(world: World, fault_server: FaultServer) -> None:
    """syncd sync follows Artifactory's redirect to another host, which never sees the token."""
    a = world.asset("r.bin", 7000, seed=9)
    with FaultServer() as storage:
        storage.route("/bucket/r.bin", body=(world.blobs / "r.bin").read_bytes())
        fault_server.route(f"/artifactory/{a['source']}", redirect=f"{storage.url}/bucket/r.bin?sig=x")
        world.write_config(artifactory={"url": f"{fault_server.url}/artifactory"})
        world.manifest("m.toml", {**a, "dest": "r.bin"})
        world.repo.commit("redirected")
        run = world.sync()
        assert run.code == 0, run.err
        assert fault_server.requests[0][2]["authorization"] == f"Bearer {world.nginx.token}"
        assert storage.requests and all("authorization" not in h for _, _, h in storage.requests)
    assert (world.export / "r.bin").read_bytes() == (world.blobs / "r.bin").read_bytes()


# resume -------------------------------------------------------------------------------------------


def test_resume_with_range_from_nginx(nginx: Nginx) -> None:
    """Kept bytes are re-hashed and the rest comes from a Range request (206) to nginx."""
    sha, size = make_asset(nginx.root, "resume/r.bin", 300_000, seed=5)
    data = (nginx.root / "resume/r.bin").read_bytes()
    a = asset(b"", source="resume/r.bin", sha256=sha, size=size)
    first = MemorySink()
    download(fetcher(nginx.bearer_url(), nginx.token), a, first)
    etag = first.validator
    assert etag and etag.startswith('"')
    before = nginx.access_log.read_text()
    sink = MemorySink(kept=data[:100_000], validator=etag)
    assert download(fetcher(nginx.bearer_url(), nginx.token), a, sink) == data
    assert sink.restarts == 0
    log = nginx.access_log.read_text()[len(before) :]
    assert "206 bytes=100000-" in log


def test_resume_with_changed_validator_starts_over(nginx: Nginx) -> None:
    """If-Range with a stale ETag gets the whole file (200): the kept bytes are dropped."""
    sha, size = make_asset(nginx.root, "resume/v.bin", 50_000, seed=6)
    data = (nginx.root / "resume/v.bin").read_bytes()
    a = asset(b"", source="resume/v.bin", sha256=sha, size=size)
    sink = MemorySink(kept=b"x" * 20_000, validator='"stale-etag"')
    assert download(fetcher(nginx.bearer_url(), nginx.token), a, sink) == data
    assert sink.restarts == 1


def test_server_ignoring_range_starts_over() -> None:
    """A server that answers a Range request with 200 restarts the file from byte 0."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", body=BODY, ranges=False)
        sink = MemorySink(kept=BODY[:5000], validator='"v1"')
        assert download(fetcher(f"{art.url}/a"), asset(), sink) == BODY
        assert sink.restarts == 1
        assert art.requests[0][2]["range"] == "bytes=5000-"


def test_wrong_kept_bytes_fail_verification() -> None:
    """Kept bytes that were corrupted make the final sha256 fail (never published)."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", body=BODY, headers={"ETag": '"v1"'})
        sink = MemorySink(kept=b"\0" * 5000, validator='"v1"')
        with pytest.raises(VerifyError, match="sha256 mismatch"):
            download(fetcher(f"{art.url}/a"), asset(), sink)


def test_complete_kept_file_needs_no_request() -> None:
    """A complete, correct partial (crash before the rename) is verified without any request."""
    with FaultServer() as art:
        assert download(fetcher(f"{art.url}/a"), asset(), MemorySink(kept=BODY)) == BODY
        assert art.requests == []


def test_cut_connection_is_retryable() -> None:
    """A body cut mid-way is a retryable FetchError; the bytes so far stay in the sink."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", body=BODY, cut_at=40_000, cut_times=1, headers={"ETag": '"v1"'})
        sink = MemorySink()
        with pytest.raises(FetchError) as info:
            download(fetcher(f"{art.url}/a"), asset(), sink)
        assert info.value.retryable
        assert len(sink.data) == 40_000
        assert download(fetcher(f"{art.url}/a"), asset(), sink) == BODY
        assert art.requests[1][2]["range"] == "bytes=40000-"


def test_slow_drip_is_cut_off() -> None:
    """A server that trickles bytes below 1 KiB/s for a whole timeout window is abandoned."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", body=BODY, drip=(100, 0.2))
        art_cfg = Artifactory(url=f"{art.url}/a", token=None, username=None, password=None, ca_file=None)
        f = Fetcher(art_cfg, timeout=1.0, concurrency=1)
        with pytest.raises(FetchError, match="too slow") as info:
            f.download(asset(), MemorySink())
        assert info.value.retryable


def test_retry_after_is_parsed() -> None:
    """A 503 carries the server's Retry-After (seconds) on the error."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", body=BODY, faults=[(503, {"Retry-After": "7"})])
        with pytest.raises(HTTPStatusError) as info:
            download(fetcher(f"{art.url}/a"), asset())
        assert info.value.retry_after == 7.0 and info.value.retryable


def test_resume_answered_416_starts_over() -> None:
    """A 416 to a resume (the kept bytes exceed the server's file) restarts from zero in the same call."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", body=BODY, faults=[(416, {"Content-Range": f"bytes */{len(BODY)}"})])
        sink = MemorySink(kept=BODY[:5000], validator='"v1"')
        assert download(fetcher(f"{art.url}/a"), asset(), sink) == BODY
        assert [h.get("range") for _, _, h in art.requests] == ["bytes=5000-", None]


# hostile answers (HostileServer sends raw bytes) ----------------------------------------------------


def raw_fetcher(url: str, token: str | None = TOKEN, timeout: float = 5, **kw: Any) -> Fetcher:
    art = Artifactory(
        url=url, token=Secret(token) if token else None, username=None, password=None, ca_file=None
    )
    return Fetcher(art, timeout=timeout, concurrency=2, **kw)


def fails(f: Fetcher, a: Asset, sink: MemorySink | None = None) -> FetchError:
    """The FetchError that downloading ``a`` raises (and nothing else may escape)."""
    with pytest.raises(FetchError) as info:
        f.download(a, sink or MemorySink())
    assert TOKEN not in str(info.value)
    return info.value


def test_token_with_newline_never_reaches_the_message() -> None:
    """A header value HTTP refuses (a token with a newline): our own message, not h11's, which quotes it."""
    with HostileServer() as srv:
        srv.good("/a/repo/file.bin", BODY)
        err = fails(raw_fetcher(f"{srv.url}/a", token="tok\nsecret-half"), asset())
    assert "secret-half" not in str(err) and "tok" not in str(err).replace("/a/repo", "")
    assert "header value" in str(err) and f"{srv.url}/a/repo/file.bin" in str(err)
    assert not err.retryable


def test_reason_phrase_and_headers_are_never_echoed() -> None:
    """A reason phrase or header values echoing the token appear nowhere: the standard phrase is shown."""
    evil = f"Bearer {TOKEN}\x1b[31m".encode()
    with HostileServer() as srv:
        srv.script(
            "/a/repo/file.bin",
            [Reply(status=b"404", reason=evil, headers=[(b"Retry-After", evil), (b"ETag", evil)])],
        )
        err = fails(raw_fetcher(f"{srv.url}/a"), asset())
    assert isinstance(err, HTTPStatusError) and err.status == 404
    assert str(err) == f"HTTP 404 Not Found from {srv.url}/a/repo/file.bin"


def test_echoed_checksum_and_length_are_shown_only_when_well_formed() -> None:
    """A malformed X-Checksum-Sha256 is not judged or quoted; a well-formed wrong one fails, quoted."""
    with HostileServer() as srv:
        srv.script("/a/x.bin", [Reply(headers=[(b"X-Checksum-Sha256", TOKEN.encode())], body=BODY)])
        srv.script("/a/y.bin", [Reply(headers=[(b"X-Checksum-Sha256", b"ab" * 32)], body=BODY)])
        assert download(raw_fetcher(f"{srv.url}/a"), asset(source="x.bin")) == BODY
        err = fails(raw_fetcher(f"{srv.url}/a"), asset(source="y.bin"))
    assert isinstance(err, VerifyError) and "ab" * 32 in str(err)


def test_redirect_with_userinfo_and_query_leaks_nothing() -> None:
    """A Location carrying userinfo and a query (echoing the token) is followed without the userinfo;
    the other host gets no credentials, and an error after it names the original URL and host only."""
    with HostileServer() as srv, HostileServer() as other:
        other.good("/blob", BODY)
        loc = f"http://u:{TOKEN}@127.0.0.1:{other.port}/blob?sig={TOKEN}".encode()
        srv.script("/a/repo/file.bin", [Reply(status=b"302", reason=b"Found", headers=[(b"Location", loc)])])
        assert download(raw_fetcher(f"{srv.url}/a"), asset()) == BODY
        assert other.seen and all("authorization" not in s.headers for s in other.seen)
        other.script("/blob", [Reply(status=b"500", reason=TOKEN.encode())])
        err = fails(raw_fetcher(f"{srv.url}/a"), asset())
    assert str(err) == (
        f"HTTP 500 Internal Server Error from {srv.url}/a/repo/file.bin "
        f"(after 1 redirect(s), to 127.0.0.1:{other.port})"
    )


@pytest.mark.parametrize(
    ("location", "says"),
    [
        (b"http://127.0.0.1:99999/x", "does not parse"),
        (b"http://127.0.0.1:-1/x", "does not parse"),
        (b"ftp://127.0.0.1/x", "unsupported URL scheme ('ftp')"),
        (b"file:///etc/passwd", "unsupported URL scheme ('file')"),
        (b"http://[::zz/x", "does not parse"),
        (b"http://:8080/x", "without a host"),
        (b"", "does not parse"),
    ],
)
def test_bad_redirect_is_not_retryable(location: bytes, says: str) -> None:
    """A redirect to a bad port, a non-HTTP scheme or an unparsable URL: a clear, non-retryable error
    naming the original URL."""
    with HostileServer() as srv:
        srv.script("/a/repo/file.bin", [Reply(status=b"301", headers=[(b"Location", location)])])
        err = fails(raw_fetcher(f"{srv.url}/a"), asset())
    assert says in str(err) and f"from {srv.url}/a/repo/file.bin" in str(err)
    assert not err.retryable


def test_two_location_headers_are_refused() -> None:
    """A redirect with two Location headers is refused, not guessed at."""
    with HostileServer() as srv:
        srv.good("/b", BODY)
        two = [(b"Location", b"/b"), (b"Location", b"/c")]
        srv.script("/a/repo/file.bin", [Reply(status=b"307", headers=two)])
        err = fails(raw_fetcher(f"{srv.url}/a"), asset())
    assert "2 Location headers" in str(err) and not err.retryable


def test_non_ascii_validator_is_not_kept() -> None:
    """An ETag that is not printable ASCII is not recorded, so no resume is tried with it."""
    with HostileServer() as srv:
        srv.script("/a/repo/file.bin", [Reply(headers=[(b"ETag", '"é\x01"'.encode())], body=BODY)])
        sink = MemorySink()
        assert download(raw_fetcher(f"{srv.url}/a"), asset(), sink) == BODY
    assert sink.validator is None


def test_kept_bytes_without_usable_validator_start_over() -> None:
    """Kept bytes with a validator that cannot be sent (non-ASCII) or none: the download starts over
    (no Range without If-Range) instead of raising UnicodeEncodeError."""
    for validator in ('"ü"', None, "x" * 500):
        with HostileServer() as srv:
            srv.good("/a/repo/file.bin", BODY)
            sink = MemorySink(kept=BODY[:5000], validator=validator)
            assert download(raw_fetcher(f"{srv.url}/a"), asset(), sink) == BODY
            assert sink.restarts == 1
            assert "range" not in srv.seen[0].headers and "if-range" not in srv.seen[0].headers


def test_wrong_content_range_is_not_spliced() -> None:
    """A 206 for another range than asked is refused (non-retryable), never written after the kept bytes."""
    with HostileServer() as srv:
        srv.script(
            "/a/repo/file.bin",
            [Reply(status=b"206", headers=[(b"Content-Range", b"bytes 0-99/102400")], body=BODY[:100])],
        )
        sink = MemorySink(kept=BODY[:5000], validator='"v"')
        err = fails(raw_fetcher(f"{srv.url}/a"), asset(), sink)
    assert "different range bytes 0-99/102400" in str(err) and not err.retryable
    assert bytes(sink.data) == BODY[:5000]


def test_gzip_encoding_is_stored_as_sent() -> None:
    """A body with Content-Encoding: gzip is stored and hashed as sent: an artifact that is itself a .gz
    lands; decoded content would mismatch, and the error says why."""
    packed = gzip.compress(BODY)
    with HostileServer() as srv:
        srv.script("/a/f.gz", [Reply(headers=[(b"Content-Encoding", b"gzip")], body=packed)])
        srv.script("/a/f.bin", [Reply(headers=[(b"Content-Encoding", b"gzip")], body=packed)])
        srv.script(
            "/a/g.bin", [Reply(headers=[(b"Content-Encoding", b"gzip")], body=packed, framing="close")]
        )
        f = raw_fetcher(f"{srv.url}/a")
        assert download(f, asset(packed, source="f.gz")) == packed
        length = fails(f, asset(source="f.bin"))
        short = fails(f, asset(source="g.bin"))
    for err in (length, short):
        assert "Content-Encoding: gzip" in str(err) and "without decoding" in str(err)


def test_slow_head_is_bounded() -> None:
    """Header lines sent one every 0.3 s, endless 100 Continue, or 1xx then silence: each response head
    is bounded by one timeout (1 s here), however the server spreads it."""
    many = [(f"X-Line-{i}".encode(), b"v") for i in range(40)]
    replies = {
        "slow": Reply(headers=many, line_delay=0.3, body=BODY),
        "endless": Reply(endless_1xx=True),
        "informational": Reply(informational=3, line_delay=5.0, body=BODY),
    }
    with HostileServer() as srv:
        for name, reply in replies.items():
            srv.script(f"/a/{name}", [reply])
            started = time.monotonic()
            err = fails(raw_fetcher(f"{srv.url}/a", timeout=1), asset(source=name))
            took = time.monotonic() - started
            assert "no complete response head within 1 s" in str(err) or "timed out" in str(err), err
            assert took < 2.5, (name, took)


def test_framing_without_payload_is_too_slow() -> None:
    """A chunked body that sends only framing (slow trailers, or 1-byte chunks with long extensions) trips
    the payload speed bound within a timeout window."""
    trailers = [f"X-T{i}: v".encode() for i in range(100)]
    replies = {
        "trailers": Reply(framing="chunked", body=b"", trailers=trailers, framing_delay=0.2),
        "extensions": Reply(
            framing="chunked", body=BODY, chunk_size=1, chunk_ext=b";x=" + b"y" * 200, framing_delay=0.1
        ),
    }
    with HostileServer() as srv:
        for name, reply in replies.items():
            srv.script(f"/a/{name}", [reply])
            started = time.monotonic()
            err = fails(raw_fetcher(f"{srv.url}/a", timeout=1), asset(source=name))
            took = time.monotonic() - started
            assert "too slow" in str(err) or "ended after" in str(err), err
            assert took < 2.5, (name, took)


def test_stop_ends_a_stalled_request_promptly() -> None:
    """With a long timeout, a stop request ends a download stalled in its head or body within about a
    second, as StopRequested (a retryable FetchError: the partial is kept)."""
    replies = {
        "head": Reply(headers=[(b"X-A", b"1")] * 50, line_delay=1.0),
        "body": Reply(body=BODY, chunk_size=10, body_delay=2.0),
    }
    with HostileServer() as srv:
        for name, reply in replies.items():
            srv.script(f"/a/{name}", [reply])
            stop = threading.Event()
            timer = threading.Timer(0.5, stop.set)
            timer.start()
            started = time.monotonic()
            with pytest.raises(StopRequested) as info:
                raw_fetcher(f"{srv.url}/a", timeout=60, stop=stop).download(asset(source=name), MemorySink())
            timer.join()
            assert time.monotonic() - started < 2.5
            assert info.value.retryable


def test_garbage_responses_become_fetch_errors() -> None:
    """Raw garbage, bad status lines, conflicting lengths and unknown transfer codings: FetchError only."""
    garbage = [
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: \xc2\xb2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
        b"",
    ]
    with HostileServer() as srv:
        for i, raw in enumerate(garbage):
            srv.script(f"/a/{i}", [Reply(raw=raw)])
            err = fails(raw_fetcher(f"{srv.url}/a"), asset(source=str(i)))
            assert f"{srv.url}/a/{i}" in str(err)


# pure parts ---------------------------------------------------------------------------------------

_DATES = st.builds(
    "{}{}, {} {} {} {}:{}:{} {}".format,
    st.sampled_from(["", "Wed", "Xyz", "  "]),
    st.sampled_from(["", " "]),
    st.integers(-5, 99).map(str),
    st.sampled_from(["Dec", "Jan", "Foo", ""]),
    st.one_of(st.integers(0, 10_000), st.integers(-(10**12), 10**12)).map(str),
    st.integers(-1, 99).map(str),
    st.integers(0, 99).map(str),
    st.integers(0, 99).map(str),
    st.sampled_from(["-0000", "+0000", "GMT", "UTC", "+2359", "-9999", "EST", "XYZ", "", "+99999"]),
)


@pytest.mark.unit
@settings(max_examples=examples(300), deadline=None, database=None)
@given(st.one_of(st.none(), st.text(max_size=60), _DATES, st.from_regex(r"\A[0-9]{1,40}\Z")))
def test_retry_after_never_raises(value: str | None) -> None:
    """Retry-After of any text is None or a finite number of seconds in 0..1 day."""
    got = retry_after(value)
    assert got is None or (math.isfinite(got) and 0 <= got <= MAX_RETRY_AFTER)


@pytest.mark.unit
def test_retry_after_date_without_zone_is_utc() -> None:
    """An RFC 2822 date with '-0000' (no zone information) is read as UTC, not a TypeError."""
    assert retry_after("Wed, 02 Dec 2099 00:00:00 -0000") == MAX_RETRY_AFTER
    assert retry_after("Wed, 02 Dec 2020 00:00:00 -0000") == 0.0
    assert retry_after("7") == 7.0 and retry_after("²") is None and retry_after("99999999") == MAX_RETRY_AFTER


_LOCATIONS = st.one_of(
    st.text(max_size=40),
    st.builds(
        "{}{}{}{}{}".format,
        st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "//", "", "javascript:", "http:"]),
        st.sampled_from(["", "u:p@", f"x:{TOKEN}@", "@"]),
        st.sampled_from(["127.0.0.1", "[::1]", "[::zz", "", "exa mple", "ü.example", "h\x00"]),
        st.sampled_from(["", ":0", ":80", ":99999", ":-1", ":x", ":"]),
        st.sampled_from(["", "/", "/p?sig=s", "/ü/%zz#f", "/a b"]),
    ),
)


@pytest.mark.unit
@settings(max_examples=examples(300), deadline=None, database=None)
@given(_LOCATIONS)
def test_next_url_is_safe_or_refused(location: str) -> None:
    """Any Location is either refused (non-retryable FetchError) or an http(s) URL without userinfo that
    httpx and origin() accept."""
    watch = Watch(1.0, None, "http://127.0.0.1:1/a/b")
    try:
        url = next_url("http://127.0.0.1:1/a/b", location, watch)
    except FetchError as exc:
        assert not exc.retryable and "from http://127.0.0.1:1/a/b" in str(exc)
        return
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.hostname and "@" not in parts.netloc
    httpx.URL(url)
    origin(url)


@pytest.mark.unit
def test_untrusted_text_is_escaped_and_bounded() -> None:
    """shown() prints ASCII only, control characters escaped, at most 64 characters of the text."""
    assert shown("a\x1b[31mé\n") == "'a\\x1b[31m\\xe9\\n'"
    assert shown("x" * 100) == repr("x" * 64) + "..."


@pytest.mark.unit
def test_only_safe_validators_are_kept() -> None:
    """A validator is kept only if printable ASCII, bounded, and not an echo of the token."""
    f = raw_fetcher("http://127.0.0.1:1/a")
    assert f._usable('"abc"') == '"abc"'
    assert f._usable("Wed, 02 Dec 2026 00:00:00 GMT")
    for bad in ('"é"', '"a\x01"', "x" * 500, f'"{TOKEN}"', "", None):
        assert f._usable(bad) is None


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    outer.__cause__ = inner
    return outer


@pytest.mark.unit
@pytest.mark.parametrize(
    ("exc", "says", "retryable"),
    [
        (httpcore.LocalProtocolError(f"Illegal header value b'Bearer {TOKEN}\\n'"), "header value", False),
        (httpx.LocalProtocolError(f"Illegal header value {TOKEN}"), "header value", False),
        (httpcore.RemoteProtocolError(f"malformed {TOKEN}"), "broke the HTTP protocol", True),
        (httpcore.ReadTimeout(TOKEN), "timed out waiting for the response head", True),
        (httpcore.WriteTimeout(TOKEN), "timed out sending the request", True),
        (httpcore.ConnectTimeout(TOKEN), "timed out connecting", True),
        (_chained(httpcore.ConnectError(TOKEN), ConnectionRefusedError(111, TOKEN)), "(ECONNREFUSED)", True),
        (_chained(httpcore.ConnectError(TOKEN), ssl.SSLError(1, TOKEN)), "TLS error", True),
        (httpcore.ReadError(TOKEN), "connection failed", True),
        (OSError(104, TOKEN), "(ECONNRESET)", True),
        (ValueError(TOKEN), "unexpected ValueError", False),
        (UnicodeEncodeError("ascii", TOKEN, 0, 1, TOKEN), "unexpected UnicodeEncodeError", False),
        (KeyError(TOKEN), "unexpected KeyError", False),
    ],
)
def test_library_errors_get_our_own_words(exc: BaseException, says: str, retryable: bool) -> None:
    """Each library exception becomes a FetchError by type: our words, the original URL, never its text."""
    watch = Watch(1.0, None, "http://h:1/a/b?sig=s")
    watch.head("http://h:1/a/b?sig=s")
    err = translate(exc, watch)
    assert says in str(err) and str(err).endswith("from http://h:1/a/b") and TOKEN not in str(err)
    assert err.retryable is retryable


@pytest.mark.integration
def test_connection_refused_is_named() -> None:
    """A refused connection says so (ECONNREFUSED) with the URL, and is retryable."""
    port = free_port()
    err = fails(raw_fetcher(f"http://127.0.0.1:{port}/a"), asset())
    assert str(err) == f"could not connect (ECONNREFUSED) from http://127.0.0.1:{port}/a/repo/file.bin"
    assert err.retryable


def _tls_server(tmp: Path) -> tuple[socket.socket, Path, ssl.SSLContext]:
    """A listening socket, a self-signed cert for 127.0.0.1 (its own CA file) and a server context."""
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    return sock, cert, ctx


def test_tls_download_with_pauses_longer_than_a_slice(tmp_path: Path) -> None:
    """Over TLS (ca_file), a body with a 1.5 s pause (longer than one 1 s socket wait) still lands: the
    sliced waits resume cleanly inside a TLS record stream; a plain-HTTP answer to TLS is a TLS error."""
    sock, cert, ctx = _tls_server(tmp_path)
    port = sock.getsockname()[1]

    def serve() -> None:
        conn, _ = sock.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)
            tls.sendall(f'HTTP/1.1 200 OK\r\nContent-Length: {len(BODY)}\r\nETag: "t"\r\n\r\n'.encode())
            tls.sendall(BODY[:5000])
            time.sleep(1.5)
            tls.sendall(BODY[5000:])
        conn, _ = sock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        art = Artifactory(url=f"https://127.0.0.1:{port}/a", token=Secret(TOKEN), username=None,
                          password=None, ca_file=cert)  # fmt: skip
        f = Fetcher(art, timeout=5, concurrency=1)
        assert download(f, asset()) == BODY
        f.close()
        # A fresh client: the pooled connection of the first one may still look open after the server
        # closed it, and a request on it fails as a cut-off head instead of reaching the second server.
        f = Fetcher(art, timeout=5, concurrency=1)
        err = fails(f, asset())
        assert str(err).startswith("TLS error") and err.retryable
        f.close()
    finally:
        thread.join(timeout=10)
        sock.close()
