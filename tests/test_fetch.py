"""syncd.fetch against real local HTTP servers (FaultServer for what nginx cannot do)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from harness import World
from servers import FaultServer, Nginx, make_asset
from syncd.config import Artifactory, Secret
from syncd.errors import FetchError, HTTPStatusError, VerifyError
from syncd.fetch import Fetcher, origin, redact
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
        with pytest.raises(FetchError, match="redirects"):
            download(fetcher(f"{art.url}/a"), asset())


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
        sink = MemorySink(kept=BODY[:5000])
        assert download(fetcher(f"{art.url}/a"), asset(), sink) == BODY
        assert sink.restarts == 1
        assert art.requests[0][2]["range"] == "bytes=5000-"


def test_wrong_kept_bytes_fail_verification() -> None:
    """Kept bytes that were corrupted make the final sha256 fail (never published)."""
    with FaultServer() as art:
        art.route("/a/repo/file.bin", body=BODY)
        sink = MemorySink(kept=b"\0" * 5000)
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
        art.route("/a/repo/file.bin", body=BODY, cut_at=40_000, cut_times=1)
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
        sink = MemorySink(kept=BODY[:5000])
        assert download(fetcher(f"{art.url}/a"), asset(), sink) == BODY
        assert [h.get("range") for _, _, h in art.requests] == ["bytes=5000-", None]
