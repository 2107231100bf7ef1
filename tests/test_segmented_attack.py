"""Attacks on segmented downloads (syncd.fetch.segmented, syncd.segments, StagedFile's ranges).

Every test drives a real staging file (syncd.publish.Export) against a scripted raw-socket server on
127.0.0.1 (``Rig``: one handler per request, free to answer anything) and checks the two promises:
a dest holds exactly the right bytes or nothing, and every error is a clear SyncdError that carries no
credential. After each download the segment threads must be gone.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from syncd import segments
from syncd.config import Artifactory, Secret
from syncd.errors import FetchError, StopRequested, SyncdError, VerifyError
from syncd.fetch import Fetcher
from syncd.manifest import Asset
from syncd.publish import Export
from syncd.staging import staging_name

pytestmark = pytest.mark.integration

MiB = 1 << 20
KiB = 1 << 10
TOKEN = "atk-TOKEN-5f3c9e1d7a2b"
USER, PASSWORD = "bob", "atk-PASSWORD-77aa11"
BASIC = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
SECRETS = (TOKEN, PASSWORD, BASIC)
ETAG = '"e1"'


# --------------------------------------------------------------------------------------------- rig


@dataclass
class Req:
    n: int
    target: str
    headers: dict[str, str]
    port: int

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def range(self, size: int) -> tuple[int, int] | None:
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("range", ""))
        if m is None:
            return None
        a = int(m.group(1))
        b = int(m.group(2)) if m.group(2) else size - 1
        return a, min(b, size - 1)


@dataclass
class Out:
    conn: socket.socket
    stopped: threading.Event
    closed: bool = False

    def send(self, data: bytes | memoryview) -> None:
        try:
            self.conn.sendall(data)
        except OSError:
            self.closed = True

    def wait(self, seconds: float) -> None:
        self.stopped.wait(min(seconds, 20))


Handler = Callable[[Req, Out], bool]  # True: keep the connection alive


class Rig:
    """A raw HTTP/1.1 server on 127.0.0.1 answering each request with ``handler``."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler: Handler = handler or (lambda r, o: False)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.reqs: list[Req] = []
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._loop, daemon=True, name=f"rig-{self.port}")
        self.accepter.start()

    def _loop(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self.lock:
                self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        with conn:
            while not self.stopped.is_set():
                while b"\r\n\r\n" not in buf:
                    if self.stopped.is_set():
                        return
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        continue
                    except OSError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                target = lines[0].split(" ")[1]
                headers = {}
                for ln in lines[1:]:
                    k, _, v = ln.partition(":")
                    headers[k.strip().lower()] = v.strip()
                with self.lock:
                    req = Req(len(self.reqs), target, headers, self.port)
                    self.reqs.append(req)
                out = Out(conn, self.stopped)
                try:
                    keep = self.handler(req, out)
                except Exception:
                    keep = False
                if not keep or out.closed:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_RDWR)
                    return

    def ranged(self) -> list[tuple[int, int]]:
        out = []
        with self.lock:
            reqs = list(self.reqs)
        for r in reqs:
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", r.headers.get("range", ""))
            if m:
                out.append((int(m.group(1)), int(m.group(2)) + 1))
        return out

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()
        self.accepter.join(5)
        with self.lock:
            threads = list(self.threads)
        for t in threads:
            t.join(5)

    def __enter__(self) -> Rig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def reply(
    out: Out,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes | memoryview = b"",
    *,
    length: int | None = -1,
    chunk: int = 64 * KiB,
    delay: float = 0.0,
    cut: int | None = None,
    stall_after: int | None = None,
) -> bool:
    """Send one answer. ``length``: -1 = len(body), None = close-delimited. ``cut``: close after this many
    body bytes; ``stall_after``: stop sending (hold the connection) after this many body bytes."""
    reason = {200: "OK", 206: "Partial Content", 302: "Found", 416: "Range Not Satisfiable"}.get(status, "X")
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if length == -1:
        lines.append(f"Content-Length: {len(body)}")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    if length is None:
        lines.append("Connection: close")
    out.send(("\r\n".join(lines) + "\r\n\r\n").encode())
    view = memoryview(body)
    sent = 0
    while sent < len(view) and not out.closed:
        if cut is not None and sent >= cut:
            return False
        if stall_after is not None and sent >= stall_after:
            out.wait(20)
            return False
        n = chunk
        if cut is not None:
            n = min(n, cut - sent)
        if stall_after is not None:
            n = min(n, stall_after - sent)
        out.send(view[sent : sent + n])
        sent += n
        if delay:
            out.wait(delay)
    if cut is not None and sent >= cut and cut < len(view):
        return False
    if stall_after is not None and stall_after < len(view):
        out.wait(20)
        return False
    return length is not None


def good(
    req: Req, out: Out, data: bytes, *, etag: str | None = ETAG, lm: str | None = None, **kw: object
) -> bool:
    """Serve ``data`` correctly: Range with If-Range, 206/200."""
    hdrs: list[tuple[str, str]] = []
    if etag is not None:
        hdrs.append(("ETag", etag))
    if lm is not None:
        hdrs.append(("Last-Modified", lm))
    r = req.range(len(data))
    ir = req.headers.get("if-range")
    if r is not None and r[0] < len(data) and (ir is None or ir in (etag, lm)):
        a, b = r
        hdrs.append(("Content-Range", f"bytes {a}-{b}/{len(data)}"))
        return reply(out, 206, hdrs, memoryview(data)[a : b + 1], **kw)  # type: ignore[arg-type]
    return reply(out, 200, hdrs, data, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segments, "PIECE", MiB)
    monkeypatch.setattr(segments, "STEAL_MIN", 256 * KiB)


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311


def asset_for(data: bytes, source: str = "w.bin", dest: str = "big/w.bin") -> Asset:
    return Asset(source, hashlib.sha256(data).hexdigest(), len(data), dest, "assets/m.toml", 0)


def fetcher(url: str, *, basic: bool = False, timeout: float = 2, segs: int = 4, **kw: object) -> Fetcher:
    art = Artifactory(
        url=url,
        token=None if basic else Secret(TOKEN),
        username=USER if basic else None,
        password=Secret(PASSWORD) if basic else None,
        ca_file=None,
    )
    return Fetcher(art, timeout=timeout, concurrency=1, segments=segs, segment_min_size=MiB, **kw)  # type: ignore[arg-type]


def seg_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("syncd-seg")]


def clean_error(exc: BaseException) -> None:
    """The error is syncd's own and names no credential."""
    assert isinstance(exc, SyncdError), repr(exc)
    text = str(exc) + repr(exc.args) + str(getattr(exc, "actual", "")) + str(getattr(exc, "url", ""))
    for s in SECRETS:
        assert s not in text, text
        assert s.lower() not in text.lower(), text
    assert "Traceback" not in text


def attempt(ex: Export, f: Fetcher, a: Asset) -> bytes:
    """One attempt as syncd.reconcile makes it: keep on a retryable fault, else discard; publish."""
    staged = ex.stage(a.dest, a.sha256, a.size)
    try:
        try:
            f.download(a, staged)
        finally:
            assert not seg_threads(), seg_threads()
    except FetchError as exc:
        clean_error(exc)
        if exc.retryable:
            staged.keep()
        else:
            staged.discard()
        raise
    except BaseException:
        staged.discard()
        raise
    try:
        staged.publish()
    except BaseException:
        staged.discard()
        raise
    return (ex.root / a.dest).read_bytes()


def dest_ok(ex: Export, a: Asset, data: bytes) -> None:
    """Promise 1: the dest holds exactly ``data`` or nothing."""
    p = ex.root / a.dest
    if p.exists():
        assert p.read_bytes() == data


def kept_view(ex: Export, a: Asset) -> list[tuple[int, int]] | None:
    """What the next attempt will trust from staging (the rule of staging._resume), or None."""
    meta = ex.staging / f"{staging_name(a.dest)}.meta"
    part = ex.staging / f"{staging_name(a.dest)}.part"
    if not meta.exists() or not part.exists():
        return None
    info = json.loads(meta.read_text())
    length = min(part.stat().st_size, a.size)
    raw = info.get("ranges")
    rs = segments.extents_ok(raw, length) if isinstance(raw, list) else None
    if rs is None:
        rs = [(0, length)] if length else []
    return rs


def kept_is_true(ex: Export, a: Asset, data: bytes) -> list[tuple[int, int]]:
    """Every byte staging claims to hold is the right byte."""
    rs = kept_view(ex, a) or []
    part = (ex.staging / f"{staging_name(a.dest)}.part").read_bytes() if rs else b""
    for x, y in rs:
        assert part[x:y] == data[x:y], f"staging claims {x}-{y} but holds other bytes there (kept {rs})"
    return rs


def no_secret_on_disk(ex: Export) -> None:
    for p in ex.staging.iterdir():
        if p.is_file():
            raw = p.read_bytes()
            for s in SECRETS:
                assert s.encode() not in raw, p


def write_state(ex: Export, a: Asset, part: bytes, meta: object, *, size: int | None = None) -> None:
    stem = staging_name(a.dest)
    (ex.staging / f"{stem}.part").write_bytes(part)
    if size is not None:
        os.truncate(ex.staging / f"{stem}.part", size)
    text = meta if isinstance(meta, str) else json.dumps(meta)
    (ex.staging / f"{stem}.meta").write_text(text)


# ======================================================================= hostile local state (.meta)


def test_resume_with_validator_but_no_kept_ranges_still_records_ranges(staged_export: Export) -> None:
    """BUG HUNT: a segmented attempt that got the probe's head but no body byte leaves .meta with
    {validator, ranges: []}. The next attempt resumes with that validator from offset 0 and never calls
    begin_ranges, so StagedFile._ranged stays False and every checkpoint/keep writes .meta WITHOUT
    "ranges" while the .part has holes: the attempt after that trusts the holes as a contiguous prefix."""
    data = blob(4 * MiB, 1)
    a = asset_for(data)
    phase = {"n": 1}

    def handler(req: Req, out: Out) -> bool:
        if phase["n"] == 1:  # 206 head, then the connection dies before any body byte
            return good(req, out, data, cut=0)
        if phase["n"] == 2:  # piece 0 is slow (stalls after 64 KiB), the others are fast
            r = req.range(len(data))
            if r and r[0] == 0:
                return good(req, out, data, stall_after=64 * KiB)
            return good(req, out, data)
        return good(req, out, data)

    with Rig(handler) as rig:
        with pytest.raises(FetchError) as e1:
            attempt(staged_export, fetcher(rig.url), a)
        assert e1.value.retryable
        meta1 = json.loads((staged_export.staging / f"{staging_name(a.dest)}.meta").read_text())
        assert meta1.get("validator") == ETAG and meta1.get("ranges") == []

        phase["n"] = 2
        stop = threading.Event()
        threading.Timer(1.0, stop.set).start()
        with pytest.raises(StopRequested):
            attempt(staged_export, fetcher(rig.url, stop=stop), a)
        meta2 = json.loads((staged_export.staging / f"{staging_name(a.dest)}.meta").read_text())
        part = staged_export.staging / f"{staging_name(a.dest)}.part"
        kept_is_true(staged_export, a, data)  # the promise behind resume: what is claimed is really there
        assert "ranges" in meta2, (meta2, part.stat().st_size)

        phase["n"] = 3
        assert attempt(staged_export, fetcher(rig.url), a) == data


@pytest.mark.parametrize(
    "ranges",
    [
        [[0, MiB], [MiB // 2, 2 * MiB]],  # overlapping
        [[0, MiB], [3 * MiB, 9 * MiB]],  # beyond the file
        [[0.0, 1048576.0]],  # wrong types
        [[0, MiB], "x"],
    ],
    ids=["overlap", "beyond-size", "floats", "junk-item"],
)
def test_untrusted_ranges_in_meta_are_not_taken_as_a_prefix(
    staged_export: Export, ranges: list[object]
) -> None:
    """BUG HUNT: ranges that extents_ok rejects ("the partial is then not trusted") are replaced in
    staging._resume by [(0, file length)]: a sparse segmented .part (the right first MiB, zeros after) is
    then taken as fully downloaded, and the download fails with a misleading sha256 mismatch (a
    non-retryable VerifyError blaming the server) instead of fetching what is missing."""
    data = blob(4 * MiB, 2)
    a = asset_for(data)
    write_state(
        staged_export,
        a,
        data[:MiB],
        {"dest": a.dest, "sha256": a.sha256, "validator": ETAG, "ranges": ranges},
        size=len(data),
    )
    with Rig(lambda r, o: good(r, o, data)) as rig:
        got = attempt(staged_export, fetcher(rig.url), a)
    assert got == data


def test_partial_truncated_below_its_ranges_is_not_trusted_as_a_prefix(staged_export: Export) -> None:
    """BUG HUNT (same root cause): a segmented partial recorded as [[0,1MiB],[3MiB,4MiB]] whose .part is
    now only 2 MiB long (right first MiB, then a hole) is taken as a 2 MiB prefix."""
    data = blob(4 * MiB, 3)
    a = asset_for(data)
    meta = {"dest": a.dest, "sha256": a.sha256, "validator": ETAG, "ranges": [[0, MiB], [3 * MiB, 4 * MiB]]}
    write_state(staged_export, a, data[:MiB], meta, size=2 * MiB)
    with Rig(lambda r, o: good(r, o, data)) as rig:
        assert attempt(staged_export, fetcher(rig.url), a) == data


def test_meta_ranges_claiming_wrong_bytes_never_publish(staged_export: Export) -> None:
    """Valid ranges whose bytes are not the file's (zeros): the in-order hash catches it; nothing wrong
    is published, and the next attempt starts clean."""
    data = blob(4 * MiB, 4)
    a = asset_for(data)
    meta = {"dest": a.dest, "sha256": a.sha256, "validator": ETAG, "ranges": [[0, MiB], [2 * MiB, 3 * MiB]]}
    write_state(staged_export, a, data[:MiB], meta, size=3 * MiB)  # [2,3) MiB are zeros
    with Rig(lambda r, o: good(r, o, data)) as rig:
        with pytest.raises(VerifyError):
            attempt(staged_export, fetcher(rig.url), a)
        assert not (staged_export.root / a.dest).exists()
        assert attempt(staged_export, fetcher(rig.url), a) == data


def test_meta_claiming_the_whole_file_with_a_longer_part(staged_export: Export) -> None:
    """ranges [[0,size]] with a .part longer than the file: not published wrong; next attempt clean."""
    data = blob(3 * MiB, 5)
    a = asset_for(data)
    meta = {"dest": a.dest, "sha256": a.sha256, "validator": ETAG, "ranges": [[0, len(data)]]}
    write_state(staged_export, a, data + b"TRAILING", meta)
    with Rig(lambda r, o: good(r, o, data)) as rig:
        with contextlib.suppress(SyncdError):
            attempt(staged_export, fetcher(rig.url), a)
        dest_ok(staged_export, a, data)
        if not (staged_export.root / a.dest).exists():
            assert attempt(staged_export, fetcher(rig.url), a) == data


def test_meta_deeply_nested_json_does_not_wedge_the_asset(staged_export: Export) -> None:
    """A .meta of 60,000 '[' (within _META_MAX): json.loads raises RecursionError, which _resume does
    not catch (only OSError, ValueError): Export.stage raises a non-syncd error and the bad .meta
    stays, so the asset fails on every pass."""
    data = blob(2 * MiB, 6)
    a = asset_for(data)
    write_state(staged_export, a, b"x" * 100, "[" * 60000)
    with Rig(lambda r, o: good(r, o, data)) as rig:
        assert attempt(staged_export, fetcher(rig.url), a) == data


def test_meta_huge_list_of_tiny_ranges(staged_export: Export) -> None:
    """~3000 one-byte kept ranges (the .part holds the right bytes there; a 48 KB .meta): every gap
    becomes its own piece and its own ranged request (no coalescing of small gaps), ~3000 requests for
    a 2 MiB file (~20 s here). Bounded by a stop at 8 s."""
    data = blob(2 * MiB, 7)
    a = asset_for(data)
    ranges = [[k * 600, k * 600 + 1] for k in range(3000)]
    part = bytearray(len(data))
    for x, y in ranges:
        part[x:y] = data[x:y]
    meta = {"dest": a.dest, "sha256": a.sha256, "validator": ETAG, "ranges": ranges}
    write_state(staged_export, a, bytes(part), meta)
    stop = threading.Event()
    timer = threading.Timer(6.0, stop.set)  # keeps the test under 10 s
    with Rig(lambda r, o: good(r, o, data)) as rig:
        timer.start()
        try:
            assert attempt(staged_export, fetcher(rig.url, stop=stop), a) == data, len(rig.reqs)
        finally:
            timer.cancel()


def test_meta_validator_echoing_a_credential_is_never_sent(staged_export: Export) -> None:
    """A .meta whose validator holds the token: never sent in If-Range, kept bytes dropped."""
    data = blob(2 * MiB, 8)
    a = asset_for(data)
    meta = {"dest": a.dest, "sha256": a.sha256, "validator": f'"{TOKEN}"', "ranges": [[0, MiB]]}
    write_state(staged_export, a, data[:MiB], meta)
    with Rig(lambda r, o: good(r, o, data)) as rig:
        assert attempt(staged_export, fetcher(rig.url), a) == data
        assert all(TOKEN not in r.headers.get("if-range", "") for r in rig.reqs)


# ============================================================================ hostile probe answers


@pytest.mark.parametrize(
    "cr",
    [
        "bytes 1-1048576/{size}",
        "bytes 0-1048575/{bigger}",
        "bytes 0-1048575/*",
        "bytes=0-1048575/{size}",
        "bytes 0-1048575/{size}, bytes 0-1048575/{size}",
        "bytes 0-99999999999999999999/{size}",
        "bytes 0-1048575/99999999999999999999",
        "",
        "bytes 1048575-0/{size}",
    ],
)
def test_probe_with_hostile_content_range(staged_export: Export, cr: str) -> None:
    data = blob(3 * MiB, 10)
    a = asset_for(data)

    def handler(req: Req, out: Out) -> bool:
        if req.n == 0:
            hdr = cr.format(size=len(data), bigger=len(data) + 1)
            hs = [("ETag", ETAG)] + ([("Content-Range", hdr)] if hdr else [])
            return reply(out, 206, hs, data[:MiB])
        return good(req, out, data)

    with Rig(handler) as rig:
        try:
            got = attempt(staged_export, fetcher(rig.url), a)
            assert got == data
        except SyncdError as exc:
            clean_error(exc)
    dest_ok(staged_export, a, data)


# ===================================================================== hostile answers to segments


def _later(req: Req, data: bytes) -> bool:
    r = req.range(len(data))
    return r is not None and r[0] >= 2 * MiB


OTHER = blob(4 * MiB, 99)


@pytest.mark.parametrize(
    "kind",
    [
        "200-same",
        "200-new-version",
        "206-other-etag",
        "206-weak-etag",
        "206-no-validator-wrong-bytes",
        "206-other-range",
        "206-other-total",
        "416",
        "206-more-bytes-close-delimited",
        "206-more-bytes-chunked",
        "206-content-length-too-big",
        "206-short-body",
        "503",
        "404",
        "302-loop",
    ],
)
def test_hostile_answer_to_a_later_segment(staged_export: Export, kind: str) -> None:
    data = blob(4 * MiB, 11)
    a = asset_for(data)

    def handler(req: Req, out: Out) -> bool:
        if not _later(req, data):
            return good(req, out, data)
        r = req.range(len(data))
        assert r is not None
        x, y = r
        size = len(data)
        cr = ("Content-Range", f"bytes {x}-{y}/{size}")
        if kind == "200-same":
            return reply(out, 200, [("ETag", ETAG)], data)
        if kind == "200-new-version":
            return reply(out, 200, [("ETag", '"e2"')], OTHER)
        if kind == "206-other-etag":
            return reply(out, 206, [("ETag", '"e2"'), cr], OTHER[x : y + 1])
        if kind == "206-weak-etag":
            return reply(out, 206, [("ETag", 'W/"e1"'), cr], OTHER[x : y + 1])
        if kind == "206-no-validator-wrong-bytes":
            return reply(out, 206, [cr], OTHER[x : y + 1])
        if kind == "206-other-range":
            return reply(
                out,
                206,
                [("ETag", ETAG), ("Content-Range", f"bytes {x + 1}-{y}/{size}")],
                data[x + 1 : y + 1],
            )
        if kind == "206-other-total":
            return reply(
                out, 206, [("ETag", ETAG), ("Content-Range", f"bytes {x}-{y}/{size + 7}")], data[x : y + 1]
            )
        if kind == "416":
            return reply(out, 416, [("Content-Range", f"bytes */{size}")], b"")
        if kind == "206-more-bytes-close-delimited":
            return reply(out, 206, [("ETag", ETAG), cr], data[x : y + 1] + OTHER[:100_000], length=None)
        if kind == "206-more-bytes-chunked":
            body = data[x : y + 1] + OTHER[:100_000]
            out.send(
                f"HTTP/1.1 206 Partial Content\r\nETag: {ETAG}\r\nContent-Range: bytes {x}-{y}/{size}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            for i in range(0, len(body), 65536):
                piece = body[i : i + 65536]
                out.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            out.send(b"0\r\n\r\n")
            return False
        if kind == "206-content-length-too-big":
            return reply(out, 206, [("ETag", ETAG), cr], data[x : y + 1] + OTHER[:1000])
        if kind == "206-short-body":
            return reply(out, 206, [("ETag", ETAG), cr], data[x : y + 1], length=y - x + 1, cut=1000)
        if kind == "503":
            return reply(out, 503, [("Retry-After", "1")], b"busy")
        if kind == "404":
            return reply(out, 404, [], b"gone")
        if kind == "302-loop":
            return reply(out, 302, [("Location", f"{req.target}")], b"")
        raise AssertionError(kind)

    with Rig(handler) as rig:
        try:
            got = attempt(staged_export, fetcher(rig.url), a)
            assert got == data
        except SyncdError as exc:
            clean_error(exc)
        n = len(rig.reqs)
    dest_ok(staged_export, a, data)
    assert n < 40, n  # bounded, whatever the server does
    if (staged_export.staging / f"{staging_name(a.dest)}.meta").exists():
        kept_is_true(staged_export, a, data)


def test_server_ignoring_if_range_with_new_version_never_splices(staged_export: Export) -> None:
    """Later segments come from another version with the SAME ETag (a broken cache): only the hash can
    tell; nothing is published."""
    data = blob(4 * MiB, 12)
    a = asset_for(data)

    def handler(req: Req, out: Out) -> bool:
        return good(req, out, OTHER if _later(req, data) else data)

    with Rig(handler) as rig:
        with pytest.raises(VerifyError) as e:
            attempt(staged_export, fetcher(rig.url), a)
        clean_error(e.value)
    assert not (staged_export.root / a.dest).exists()


def test_weak_etag_only_falls_back_to_one_stream(staged_export: Export) -> None:
    data = blob(3 * MiB, 13)
    a = asset_for(data)
    with Rig(lambda r, o: good(r, o, data, etag='W/"w1"')) as rig:
        assert attempt(staged_export, fetcher(rig.url), a) == data
        ranged = [r for r in rig.reqs if "range" in r.headers]
    assert len(ranged) == 1


@pytest.mark.parametrize("basic", [False, True])
@pytest.mark.parametrize("where", ["etag", "last-modified"])
def test_validator_echoing_the_credential(staged_export: Export, basic: bool, where: str) -> None:
    """The server puts the credential into its validator: it is never stored, sent back or shown."""
    data = blob(3 * MiB, 14)
    a = asset_for(data)
    secret = BASIC if basic else TOKEN

    def handler(req: Req, out: Out) -> bool:
        if where == "etag":
            return good(req, out, data, etag=f'"{secret}"')
        return good(req, out, data, etag=None, lm=f"Mon, 01 Jan 2024 00:00:00 GMT {secret}")

    with Rig(handler) as rig:
        assert attempt(staged_export, fetcher(rig.url, basic=basic), a) == data
        assert all(secret not in r.headers.get("if-range", "") for r in rig.reqs)
    no_secret_on_disk(staged_export)


def test_validator_echo_and_stop_leave_no_credential_in_meta(staged_export: Export) -> None:
    data = blob(4 * MiB, 15)
    a = asset_for(data)
    stop = threading.Event()
    with Rig(lambda r, o: good(r, o, data, etag=f'"{TOKEN}"', delay=0.05)) as rig:
        threading.Timer(0.5, stop.set).start()
        with contextlib.suppress(StopRequested):
            attempt(staged_export, fetcher(rig.url, stop=stop), a)
    no_secret_on_disk(staged_export)


# ======================================================================================= redirects


def test_segment_redirected_to_another_host_gets_no_credentials(staged_export: Export) -> None:
    """The probe is answered by the origin; later segments are redirected to another host, which must
    never see Authorization (token or basic)."""
    data = blob(4 * MiB, 16)
    a = asset_for(data)
    with Rig(lambda r, o: good(r, o, data)) as storage:

        def origin(req: Req, out: Out) -> bool:
            if req.n == 0:
                return good(req, out, data)
            return reply(out, 302, [("Location", f"http://{USER}:x@127.0.0.1:{storage.port}/blob?sig=S")])

        for basic in (False, True):
            with Rig(origin) as art:
                if (staged_export.root / a.dest).exists():
                    (staged_export.root / a.dest).unlink()
                assert attempt(staged_export, fetcher(art.url, basic=basic), a) == data
        assert storage.reqs
        assert all("authorization" not in r.headers for r in storage.reqs)


def test_probe_redirect_then_storage_redirects_back_and_forth(staged_export: Export) -> None:
    """Storage bounces later segments to a third host that loops: bounded, clean error or exact bytes,
    credentials only to the origin."""
    data = blob(4 * MiB, 17)
    a = asset_for(data)
    with Rig() as third, Rig() as storage, Rig() as art:
        third.handler = lambda r, o: reply(o, 302, [("Location", f"{third.url}/loop{r.n % 3}")])
        storage.handler = lambda r, o: (
            good(r, o, data) if r.n == 0 else reply(o, 302, [("Location", f"{third.url}/loop0")])
        )
        art.handler = lambda r, o: reply(o, 302, [("Location", f"{storage.url}/blob?sig=S")])
        try:
            assert attempt(staged_export, fetcher(art.url), a) == data
        except SyncdError as exc:
            clean_error(exc)
        for rig in (storage, third):
            assert all("authorization" not in r.headers for r in rig.reqs)
        assert len(third.reqs) < 100
    dest_ok(staged_export, a, data)


def test_expired_signed_url_mid_download_resolves_again_without_leaking(staged_export: Export) -> None:
    data = blob(4 * MiB, 18)
    a = asset_for(data)
    with Rig() as storage, Rig() as art:
        storage.handler = lambda r, o: (
            reply(o, 403, [], b"expired") if "sig=1" in r.target and r.n >= 2 else good(r, o, data)
        )
        art.handler = lambda r, o: reply(o, 302, [("Location", f"{storage.url}/blob?sig={r.n + 1}")])
        assert attempt(staged_export, fetcher(art.url), a) == data
        assert all("authorization" not in r.headers for r in storage.reqs)
        assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in art.reqs)


# ======================================================================================== stalls, cuts


def test_one_segment_stalled_once_does_not_hold_the_download(staged_export: Export) -> None:
    """The first request for piece 2 sends its head and then nothing, forever: the download finishes
    within about one timeout (others steal its rest; it is asked again)."""
    data = blob(4 * MiB, 19)
    a = asset_for(data)
    stalled = threading.Event()

    def handler(req: Req, out: Out) -> bool:
        r = req.range(len(data))
        if r and r[0] == 2 * MiB and not stalled.is_set():
            stalled.set()
            return good(req, out, data, stall_after=0)
        return good(req, out, data)

    with Rig(handler) as rig:
        t0 = time.monotonic()
        assert attempt(staged_export, fetcher(rig.url, timeout=1), a) == data
        took = time.monotonic() - t0
    assert stalled.is_set()
    assert took < 4, took


def test_head_stalled_forever_on_the_probe(staged_export: Export) -> None:
    """The probe's head never comes: bounded by the timeout, clean retryable error."""
    data = blob(3 * MiB, 20)
    a = asset_for(data)

    def handler(req: Req, out: Out) -> bool:
        out.wait(20)
        return False

    with Rig(handler) as rig:
        t0 = time.monotonic()
        with pytest.raises(FetchError) as e:
            attempt(staged_export, fetcher(rig.url, timeout=1), a)
        took = time.monotonic() - t0
    assert e.value.retryable
    assert took < 9, took


def test_segment_that_always_stalls_fails_in_bounded_time(staged_export: Export) -> None:
    """Every request that starts at 2 MiB stalls after its head: the attempt ends (retryable) within a
    few timeouts, and what is kept is true."""
    data = blob(4 * MiB, 21)
    a = asset_for(data)

    def handler(req: Req, out: Out) -> bool:
        r = req.range(len(data))
        if r and r[0] == 2 * MiB:
            return good(req, out, data, stall_after=0)
        return good(req, out, data)

    with Rig(handler) as rig:
        t0 = time.monotonic()
        with pytest.raises(FetchError) as e:
            attempt(staged_export, fetcher(rig.url, timeout=1), a)
        took = time.monotonic() - t0
    assert e.value.retryable, e.value
    assert took < 9, took
    rs = kept_is_true(staged_export, a, data)
    assert sum(y - x for x, y in rs) >= 2 * MiB, rs  # the healthy pieces were kept


def test_cut_on_every_segment_is_bounded_and_resumes_to_the_end(staged_export: Export) -> None:
    """Every answer is cut after 200 KiB: each attempt ends after a bounded number of requests, keeps
    true ranges, and attempts in a row finish the file without asking for kept bytes again."""
    data = blob(4 * MiB, 22)
    a = asset_for(data)
    with Rig(lambda r, o: good(r, o, data, cut=200 * KiB)) as rig:
        got = None
        for i in range(60):  # noqa: B007 (i is checked after the loop)
            before = len(rig.reqs)
            kept = kept_view(staged_export, a) or []
            try:
                got = attempt(staged_export, fetcher(rig.url), a)
                break
            except FetchError as exc:
                assert exc.retryable, exc
                assert len(rig.reqs) - before <= 16, len(rig.reqs) - before
                kept_is_true(staged_export, a, data)
            finally:
                for r in rig.reqs[before:]:  # a resume never asks for bytes it holds
                    x, y = r.range(len(data)) or (0, len(data) - 1)
                    assert all(y + 1 <= kx or x >= ky for kx, ky in kept), (x, y, kept)
        assert got == data, i
        assert i < 40, i


def test_stop_mid_download_keeps_true_ranges_and_resumes_only_the_rest(staged_export: Export) -> None:
    data = blob(6 * MiB, 23)
    a = asset_for(data)
    stop = threading.Event()
    with Rig(lambda r, o: good(r, o, data, delay=0.05)) as rig:
        threading.Timer(0.6, stop.set).start()
        t0 = time.monotonic()
        with pytest.raises(StopRequested):
            attempt(staged_export, fetcher(rig.url, stop=stop), a)
        assert time.monotonic() - t0 < 3
        rs = kept_is_true(staged_export, a, data)
        assert rs and sum(y - x for x, y in rs) < len(data)
        before = len(rig.reqs)
        assert attempt(staged_export, fetcher(rig.url), a) == data
        for r in rig.reqs[before:]:
            x, y = r.range(len(data)) or (0, len(data) - 1)
            for kx, ky in rs:
                assert y + 1 <= kx or x >= ky, (x, y, rs)


def test_stop_while_probe_is_in_flight_and_others_wait(staged_export: Export) -> None:
    data = blob(4 * MiB, 24)
    a = asset_for(data)
    stop = threading.Event()

    def handler(req: Req, out: Out) -> bool:
        out.wait(20)
        return False

    with Rig(handler) as rig:
        threading.Timer(0.3, stop.set).start()
        t0 = time.monotonic()
        with pytest.raises(StopRequested):
            attempt(staged_export, fetcher(rig.url, stop=stop, timeout=30), a)
        assert time.monotonic() - t0 < 3


def test_disk_error_mid_segment_is_a_clear_error(
    staged_export: Export, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pwrite failing (EIO) in one worker: syncd's own error, no thread left, nothing published."""
    data = blob(4 * MiB, 25)
    a = asset_for(data)
    real = os.pwrite
    calls = {"n": 0}

    def flaky(fd: int, buf: object, off: int) -> int:
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(5, "Input/output error")
        return real(fd, buf, off)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", flaky)
    with Rig(lambda r, o: good(r, o, data)) as rig, pytest.raises(SyncdError) as e:
        attempt(staged_export, fetcher(rig.url), a)
    clean_error(e.value)
    assert not (staged_export.root / a.dest).exists()


# ============================================================================================ memory


def test_memory_stays_bounded(staged_export: Export, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 48 MiB file over 4 segments with many out-of-order pieces: peak Python memory stays small."""
    monkeypatch.setattr(segments, "PIECE", 4 * MiB)
    data = blob(48 * MiB, 26)
    a = asset_for(data)
    with Rig(lambda r, o: good(r, o, data, chunk=256 * KiB)) as rig:
        f = fetcher(rig.url)
        staged = staged_export.stage(a.dest, a.sha256, a.size)
        tracemalloc.start()
        try:
            f.download(a, staged)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        staged.publish()
    assert (staged_export.root / a.dest).read_bytes() == data
    assert peak < 24 * MiB, peak / MiB


def test_complete_partial_is_published_without_a_request(staged_export: Export) -> None:
    """Idempotence: a staged file whose ranges hold the whole (right) file needs no request."""
    data = blob(3 * MiB, 27)
    a = asset_for(data)
    write_state(
        staged_export,
        a,
        data,
        {"dest": a.dest, "sha256": a.sha256, "validator": ETAG, "ranges": [[0, len(data)]]},
    )
    with Rig(lambda r, o: good(r, o, data)) as rig:
        assert attempt(staged_export, fetcher(rig.url), a) == data
        assert rig.reqs == []


def test_one_slow_connection_does_not_hold_the_rest_of_the_file_hostage(staged_export: Export) -> None:
    """One slow (not stalled) connection: the piece at 2 MiB drips at 8 KiB/s, above MIN_SPEED, so it
    never times out; the others are fast. Idle workers split its rest, then take over what is left once
    it is SLOW_FACTOR times slower than the fastest connection: the file completes well before the stop
    at 8 s (waiting for the drip would take about a minute)."""
    data = blob(4 * MiB, 28)
    a = asset_for(data)

    def handler(req: Req, out: Out) -> bool:
        r = req.range(len(data))
        if r and r[0] == 2 * MiB:
            return good(req, out, data, chunk=8 * KiB, delay=1.0)
        return good(req, out, data)

    stop = threading.Event()
    timer = threading.Timer(8.0, stop.set)
    with Rig(handler) as rig:
        timer.start()
        try:
            assert attempt(staged_export, fetcher(rig.url, timeout=2, stop=stop), a) == data
        finally:
            timer.cancel()
