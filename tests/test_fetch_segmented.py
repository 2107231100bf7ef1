"""Segmented downloads (syncd.fetch.segmented) into real staging files, against a real nginx and, for
what nginx cannot do, FaultServer."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import threading
import time
from pathlib import Path

import pytest

from servers import FaultServer, Nginx, start_nginx
from syncd import segments
from syncd.config import Artifactory, Secret
from syncd.errors import FetchError, StopRequested, VerifyError
from syncd.fetch import Fetcher
from syncd.manifest import Asset
from syncd.publish import Export
from syncd.staging import StagedFile, staging_name

MiB = 1 << 20
TOKEN = "seg-token-0123456789"


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of 1 MiB (splits down to 256 KiB): a few MiB exercise many pieces, stealing and resume."""
    monkeypatch.setattr(segments, "PIECE", MiB)
    monkeypatch.setattr(segments, "STEAL_MIN", 256 << 10)


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311 (test data)


def asset_for(data: bytes, source: str, dest: str = "big/w.bin") -> Asset:
    return Asset(source, hashlib.sha256(data).hexdigest(), len(data), dest, "assets/m.toml", 0)


def fetcher(url: str, token: str | None = TOKEN, *, segments: int = 4, **kw: object) -> Fetcher:
    art = Artifactory(
        url=url, token=Secret(token) if token else None, username=None, password=None, ca_file=None
    )
    return Fetcher(art, timeout=5, concurrency=1, segments=segments, segment_min_size=MiB, **kw)  # type: ignore[arg-type]


def fetch_into(ex: Export, f: Fetcher, a: Asset) -> bytes:
    """Download ``a`` through a real staging file, publish it, and return the bytes at its dest."""
    staged = ex.stage(a.dest, a.sha256, a.size)
    try:
        f.download(a, staged)
    except FetchError as exc:
        if exc.retryable:
            staged.keep()
        else:
            staged.discard()
        raise
    staged.publish()
    return (ex.root / a.dest).read_bytes()


def nginx_lines(nginx: Nginx, path: str, since: int = 0) -> list[str]:
    return [ln for ln in nginx.access_log.read_text()[since:].splitlines() if f" {path} " in ln]


def ranges_of(lines: list[str]) -> list[tuple[int, int]]:
    out = []
    for ln in lines:
        m = re.search(r"bytes=(\d+)-(\d+)", ln)
        assert m, ln
        out.append((int(m.group(1)), int(m.group(2)) + 1))
    return out


# against nginx --------------------------------------------------------------------------------------


def test_segmented_download_is_byte_exact_with_if_range_on_every_segment(
    nginx: Nginx, staged_export: Export
) -> None:
    """A big file comes over several ranged requests (each 206, each but the probe with If-Range), and the
    published bytes are exactly the file's."""
    data = blob(9 * MiB + 12345, 1)
    (nginx.root / "seg").mkdir(exist_ok=True)
    (nginx.root / "seg/a.bin").write_bytes(data)
    since = len(nginx.access_log.read_text())
    got = fetch_into(staged_export, fetcher(nginx.bearer_url(), nginx.token), asset_for(data, "seg/a.bin"))
    assert got == data
    time.sleep(0.1)  # nginx writes its log line after the response
    lines = nginx_lines(nginx, "/bearer/seg/a.bin", since)
    assert len(lines) >= 10
    assert all(" 206 bytes=" in ln for ln in lines), lines
    assert lines[0].endswith(' "-"')  # the probe of a fresh download has no validator yet
    etag = re.search(r'"(.+)"$', lines[1])
    assert etag and etag.group(1).startswith("\\x22")  # nginx logs the ETag's quotes escaped
    assert all(ln.endswith(f' "{etag.group(1)}"') for ln in lines[1:]), lines
    covered = sorted(ranges_of(lines))
    assert covered[0][0] == 0 and max(b for _, b in covered) == len(data)
    # every byte was asked for (stolen halves may overlap a victim's request, never leave a hole)
    at = 0
    for a, b in covered:
        assert a <= at
        at = max(at, b)
    assert at == len(data)


def test_small_file_is_one_stream(nginx: Nginx, staged_export: Export) -> None:
    """Below segment_min_size a file comes as one plain GET."""
    data = blob(MiB - 1, 2)
    (nginx.root / "seg").mkdir(exist_ok=True)
    (nginx.root / "seg/small.bin").write_bytes(data)
    since = len(nginx.access_log.read_text())
    assert (
        fetch_into(staged_export, fetcher(nginx.bearer_url(), nginx.token), asset_for(data, "seg/small.bin"))
        == data
    )
    time.sleep(0.1)
    assert nginx_lines(nginx, "/bearer/seg/small.bin", since) == [
        'GET /bearer/seg/small.bin HTTP/1.1 200 - "-"'
    ]


def test_file_replaced_between_segments_falls_back_and_never_splices(
    tmp_path: Path, staged_export: Export, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nginx answers If-Range with the new file (200) once the file changed mid-download: the segments
    stop, the staged bytes are dropped and one stream asks for the new version, which the manifest's
    size then refuses: nothing of either version is published."""
    monkeypatch.setattr(segments, "PIECE", 2 * MiB)  # 8 pieces, 4 connections: later ones see the swap
    nginx = start_nginx(tmp_path / "slow-nginx", limit_rate=MiB)
    try:
        old, new = blob(16 * MiB, 3), blob(3 * MiB, 4)  # the new version is also shorter
        (nginx.root / "v.bin").write_bytes(old)
        a = asset_for(old, "v.bin")
        f = fetcher(nginx.bearer_url(), nginx.token)
        swapped = threading.Event()

        def swap() -> None:
            part = staged_export.staging / f"{staging_name(a.dest)}.part"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # until a few MiB are in (nginx logs a request at its end)
                with contextlib.suppress(FileNotFoundError):
                    if part.stat().st_blocks * 512 >= MiB:
                        break
                time.sleep(0.02)
            tmp = nginx.root / "v.tmp"
            tmp.write_bytes(new)
            os.utime(tmp, (time.time() + 5, time.time() + 5))  # a different Last-Modified, so another ETag
            os.replace(tmp, nginx.root / "v.bin")
            swapped.set()

        t = threading.Thread(target=swap)
        t.start()
        with pytest.raises(VerifyError, match="Content-Length 3145728 differs"):
            fetch_into(staged_export, f, a)
        t.join()
        assert swapped.is_set()
        time.sleep(0.1)
        lines = nginx_lines(nginx, "/bearer/v.bin")
        assert any(" 200 bytes=" in ln for ln in lines), lines  # If-Range refused: the whole new file
        assert lines[-1].startswith("GET /bearer/v.bin HTTP/1.1 200 - ")  # then one stream
        assert not (staged_export.root / a.dest).exists()
        assert os.listdir(staged_export.staging) in ([], [".syncd-staging.lock"]) or all(
            not n.endswith(".part") for n in os.listdir(staged_export.staging)
        )
    finally:
        nginx.stop()


def test_stop_mid_segments_keeps_written_ranges_and_resume_asks_only_the_rest(
    tmp_path: Path, staged_export: Export, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop mid-download keeps the staged ranges (recorded in .meta); the next attempt asks nginx only
    for the ranges that are missing, and the result is byte-exact."""
    monkeypatch.setattr(segments, "PIECE", 4 * MiB)
    nginx = start_nginx(tmp_path / "slow-nginx", limit_rate=MiB)
    try:
        data = blob(16 * MiB, 5)
        (nginx.root / "r.bin").write_bytes(data)
        a = asset_for(data, "r.bin")
        stop = threading.Event()
        f = fetcher(nginx.bearer_url(), nginx.token, stop=stop)
        threading.Timer(1.5, stop.set).start()
        with pytest.raises(StopRequested):
            fetch_into(staged_export, f, a)
        meta = json.loads((staged_export.staging / f"{staging_name(a.dest)}.meta").read_text())
        kept = [tuple(r) for r in meta["ranges"]]
        assert kept and sum(b - c for c, b in kept) < len(data)
        part = (staged_export.staging / f"{staging_name(a.dest)}.part").read_bytes()
        for c, b in kept:
            assert part[c:b] == data[c:b]
        since = len(nginx.access_log.read_text())
        got = fetch_into(staged_export, fetcher(nginx.bearer_url(), nginx.token), a)
        assert got == data
        time.sleep(0.1)
        asked = ranges_of(nginx_lines(nginx, "/bearer/r.bin", since))
        for c, b in asked:
            for kc, kb in kept:
                assert b <= kc or c >= kb, (asked, kept)
        # (requested ranges may overlap one another: a split piece's request still names its old end)
    finally:
        nginx.stop()


# against FaultServer --------------------------------------------------------------------------------


def test_server_ignoring_range_falls_back_to_one_stream(staged_export: Export) -> None:
    """A 200 to the probe's Range: one plain stream of the whole file."""
    data = blob(3 * MiB, 6)
    with FaultServer() as art:
        art.route("/a/w.bin", body=data, ranges=False)
        assert fetch_into(staged_export, fetcher(f"{art.url}/a"), asset_for(data, "w.bin")) == data
        reqs = art.requests
    assert "range" in reqs[0][2]
    assert [("range" in h) for _, _, h in reqs[1:]] == [False]


def test_no_validator_falls_back_to_one_stream(staged_export: Export) -> None:
    """Without an ETag or Last-Modified, ranges of two versions could be spliced: one stream instead."""
    data = blob(3 * MiB, 7)
    with FaultServer() as art:
        art.route("/a/w.bin", body=data, headers={"ETag": ""})
        assert fetch_into(staged_export, fetcher(f"{art.url}/a"), asset_for(data, "w.bin")) == data
        reqs = art.requests
    assert len(reqs) == 2 and "range" not in reqs[1][2]


def test_validator_changed_between_segments_is_never_spliced(staged_export: Export) -> None:
    """A server that ignores If-Range but answers a later segment with another ETag: syncd notices,
    drops the segments and takes one stream (here the new version, which the manifest names)."""
    old, new = blob(4 * MiB, 8), blob(4 * MiB, 9)
    with FaultServer() as art:
        art.route("/a/w.bin", body=old)
        seen = threading.Event()
        done = threading.Event()

        def swap() -> None:
            while not art.requests and not done.is_set():
                time.sleep(0.001)
            art.route("/a/w.bin", body=new)
            seen.set()

        t = threading.Thread(target=swap)
        t.start()
        try:
            got = fetch_into(staged_export, fetcher(f"{art.url}/a"), asset_for(new, "w.bin"))
        finally:
            done.set()
            t.join()
        assert got == new
        reqs = art.requests
    assert "range" not in reqs[-1][2]  # the fallback stream


def test_cut_segment_is_asked_again_from_where_it_broke(staged_export: Export) -> None:
    """A connection cut mid-segment: another request asks for exactly the rest of that segment."""
    data = blob(4 * MiB, 10)
    with FaultServer() as art:
        art.route("/a/w.bin", body=data, cut_at=300_000, cut_times=1)
        assert fetch_into(staged_export, fetcher(f"{art.url}/a"), asset_for(data, "w.bin")) == data
        asked = [h["range"] for _, _, h in art.requests]
    first = asked[0]
    start = int(first.split("=")[1].split("-")[0])
    assert f"bytes={start + 300_000}-" in " ".join(asked)


def test_signed_url_redirect_is_followed_once_and_segments_go_there_without_credentials(
    staged_export: Export,
) -> None:
    """Artifactory is asked once (with the token); every segment goes to the signed URL, without it."""
    data = blob(5 * MiB, 11)
    with FaultServer() as art, FaultServer() as storage:
        storage.route("/blob/xyz", body=data)
        art.route("/a/w.bin", redirect=f"{storage.url}/blob/xyz?sig=SIG")
        assert fetch_into(staged_export, fetcher(f"{art.url}/a"), asset_for(data, "w.bin")) == data
        assert len(art.requests) == 1
        assert art.requests[0][2]["authorization"] == f"Bearer {TOKEN}"
        hits = storage.requests
    assert len(hits) >= 5
    assert all("authorization" not in h and "range" in h for _, _, h in hits)
    assert all(p == "/blob/xyz?sig=SIG" for _, p, _ in hits)
    assert all("if-range" in h for _, _, h in hits[1:])


def test_segment_longer_than_asked_fails(staged_export: Export) -> None:
    """A 206 whose Content-Range is not the range asked for is not written: one stream instead."""
    data = blob(3 * MiB, 12)
    with FaultServer() as art:
        art.route("/a/w.bin", body=data, headers={"Content-Range": "bytes 0-99/3145728"})
        # FaultServer adds its own Content-Range too; syncd refuses the ambiguous answer and streams
        got = fetch_into(staged_export, fetcher(f"{art.url}/a"), asset_for(data, "w.bin"))
    assert got == data


def test_wrong_total_in_content_range_fails_before_writing(staged_export: Export) -> None:
    """A 206 naming another file size than the manifest's fails the asset, nothing published."""
    data = blob(3 * MiB, 13)
    a = asset_for(data, "w.bin")
    bigger = Asset(a.source, a.sha256, a.size - 1, a.dest, a.manifest, 0)
    with FaultServer() as art:
        art.route("/a/w.bin", body=data)
        with pytest.raises(VerifyError, match="Content-Range says"):
            fetch_into(staged_export, fetcher(f"{art.url}/a"), bigger)
    assert not (staged_export.root / a.dest).exists()


def test_staged_file_written_by_ranges_is_checked_before_publish(staged_export: Export) -> None:
    """The publish still refuses a staging file whose size is not the manifest's (defence in depth)."""
    data = blob(3 * MiB, 14)
    a = asset_for(data, "w.bin")
    with FaultServer() as art:
        art.route("/a/w.bin", body=data)
        staged: StagedFile = staged_export.stage(a.dest, a.sha256, a.size)
        fetcher(f"{art.url}/a").download(a, staged)
    os.ftruncate(staged.fd, a.size + 1)
    with pytest.raises(Exception, match="changed by someone else"):
        staged.publish()
    assert not (staged_export.root / a.dest).exists()
