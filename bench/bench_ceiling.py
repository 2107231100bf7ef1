#!/usr/bin/env python3
"""The ceiling for one big file on this machine: what the leanest Python downloader does, next to syncd.

``bench_sync.py``'s big target asks syncd for 0.45 x the single-core ``hashlib.sha256`` speed end to end.
This script measures what bounds that here, in one run, against one real nginx on 127.0.0.1 serving a
``--size`` MiB file (default 2048):

- ``hashlib``: sha256 of the file's bytes in memory, 1 MiB at a time (one core, nothing else);
- ``lean, no hash``: 4 connections with hand-written ranged GETs (16 MiB pieces), ``recv_into`` a reused
  buffer, ``pwrite`` at the offset, ``fdatasync``: the transfer and the durable write alone;
- ``lean + sha256``: the same, with a thread hashing the written prefix in order (read back from the page
  cache), as any in-order hash of a multi-connection download must;
- ``syncd Fetcher``: syncd's own segmented download (``syncd.fetch``, 4 segments) into a real staging file,
  published (fdatasync, rename), in this process: no start-up, clone or ledger.

No framing checks, no time bounds, no resume in the lean rows: they are a bound, not a product. Every row
checks the result's sha256. Medians of ``--repeat`` runs (default 3), taken in turns.

    .venv/bin/python bench/bench_ceiling.py [--size MiB] [--repeat N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import queue
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))


MiB = 1 << 20
PIECE = 16 * MiB
BUF = 256 << 10


def ranged_get(port: int, token: str, path: str, start: int, end: int, fd: int, sock: socket.socket) -> None:
    """GET bytes [start, end) on a keep-alive connection into ``fd`` at their offsets (nginx's answer is
    trusted: this is a bound, not a client)."""
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
        f"Range: bytes={start}-{end - 1}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    _, rest = head.split(b"\r\n\r\n", 1)
    off = start
    if rest:
        os.pwrite(fd, rest, off)
        off += len(rest)
    buf = memoryview(bytearray(BUF))
    while off < end:
        n = sock.recv_into(buf, min(BUF, end - off))
        if not n:
            raise EOFError("nginx closed the connection")
        os.pwrite(fd, buf[:n], off)
        off += n


def lean(port: int, token: str, path: str, size: int, out: Path, *, hashed: bool) -> str | None:
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    pieces: queue.Queue[tuple[int, int]] = queue.Queue()
    for a in range(0, size, PIECE):
        pieces.put((a, min(a + PIECE, size)))
    done: dict[int, int] = {}  # start -> end of finished pieces
    cond = threading.Condition()
    digest = hashlib.sha256()
    finished = False

    def worker() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            while True:
                try:
                    a, b = pieces.get_nowait()
                except queue.Empty:
                    return
                ranged_get(port, token, path, a, b, fd, sock)
                with cond:
                    done[a] = b
                    cond.notify()
        finally:
            sock.close()

    def hasher() -> None:
        at = 0
        while at < size:
            with cond:
                while at not in done and not finished:
                    cond.wait()
                if at not in done:
                    return
                end = done.pop(at)
            while at < end:
                data = os.pread(fd, min(MiB, end - at), at)
                digest.update(data)
                at += len(data)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    h = threading.Thread(target=hasher) if hashed else None
    for t in [*threads, *([h] if h else [])]:
        t.start()
    for t in threads:
        t.join()
    with cond:
        finished = True
        cond.notify()
    if h:
        h.join()
    os.fdatasync(fd)
    os.close(fd)
    return digest.hexdigest() if hashed else None


# ``lean`` as a tool of bench_sync.py ----------------------------------------------------------------


def get_whole(sock: socket.socket, host: str, token: str, path: str) -> bytes:
    """One keep-alive GET of a whole file (nginx's Content-Length trusted: a bound, not a client)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("nginx closed the connection")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")
    )
    parts = [body]
    got = len(body)
    while got < length:
        chunk = sock.recv(min(BUF, length - got))
        if not chunk:
            raise EOFError("nginx closed the connection")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def lean_many(entries: list[tuple[str, str, str, int]], out: Path, token: str, workers: int) -> int:
    """Each file over one of ``workers`` keep-alive connections: GET, sha256, write ``REL.part``; then one
    ``syncfs`` for all, the renames, one fsync per directory: the least a durable, verified download of
    many files does in Python (no framing checks, no time bounds, no ledger, no log)."""
    import ctypes
    from urllib.parse import urlsplit

    todo: queue.Queue[tuple[str, str, str, int]] = queue.Queue()
    for e in entries:
        todo.put(e)
    bad: list[str] = []

    def worker() -> None:
        u = urlsplit(entries[0][0])
        sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 80))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                try:
                    url, rel, sha, size = todo.get_nowait()
                except queue.Empty:
                    return
                body = get_whole(sock, u.netloc, token, urlsplit(url).path)
                if len(body) != size or hashlib.sha256(body).hexdigest() != sha:
                    bad.append(rel)
                    continue
                part = out / (rel + ".part")
                part.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, body)
                finally:
                    os.close(fd)
        finally:
            sock.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if bad:
        print(f"lean: {len(bad)} file(s) wrong, e.g. {bad[0]}", file=sys.stderr)
        return 1
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)
    dirs = set()
    for _, rel, _, _ in entries:
        os.rename(out / (rel + ".part"), out / rel)
        dirs.add((out / rel).parent)
    for d in dirs:
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return 0


def lean_main(argv: list[str]) -> int:
    """``bench_ceiling.py lean LIST OUT TOKEN_FILE``: LIST has ``URL REL SHA256 SIZE`` lines. One file of
    at least 64 MiB comes over 4 ranged connections with the in-order sha256 (:func:`lean`); several files
    one per connection (:func:`lean_many`). Exit 1 when a file's size or sha256 is wrong."""
    from urllib.parse import urlsplit

    listing, out, token_file = Path(argv[0]), Path(argv[1]), Path(argv[2])
    token = token_file.read_text().strip()
    entries = []
    for line in listing.read_text().splitlines():
        url, rel, sha, size = line.split()
        entries.append((url, rel, sha, int(size)))
    out.mkdir(parents=True, exist_ok=True)
    if len(entries) == 1 and entries[0][3] >= 64 * MiB:
        url, rel, sha, size = entries[0]
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        port = urlsplit(url).port or 80
        got = lean(
            port, token, urlsplit(url).path, size, target.with_name(target.name + ".part"), hashed=True
        )
        if got != sha:
            print(f"lean: sha256 {got}, expected {sha}", file=sys.stderr)
            return 1
        os.rename(target.with_name(target.name + ".part"), target)
        return 0
    return lean_many(entries, out, token, workers=4)


def fetch_main(argv: list[str]) -> int:
    """``bench_ceiling.py fetch LIST OUT TOKEN_FILE``: the same files through syncd's fetch layer alone, in
    one process: ``syncd.fetch.Fetcher`` (httpx over syncd's transport, every framing check and time
    bound) into ``syncd.publish.Export`` staging files, one flush per group of 128 (as a pass does), the
    checked publish and one fsync per directory. No config, git, plan, ledger, audit record or log event:
    what syncd costs before its records. Exit 1 when a file fails."""
    from concurrent.futures import ThreadPoolExecutor

    from syncd.config import Artifactory, Secret
    from syncd.fetch import Fetcher
    from syncd.manifest import Asset
    from syncd.publish import Export
    from syncd.staging import StagedFile

    listing, out, token_file = Path(argv[0]), Path(argv[1]), Path(argv[2])
    entries = []
    for line in listing.read_text().splitlines():
        url, rel, sha, size = line.split()
        entries.append((url, rel, sha, int(size)))
    base = entries[0][0][: -len(entries[0][1]) - 1]  # the URLs are BASE/REL
    out.mkdir(parents=True, exist_ok=True)
    export = Export(out, out / ".syncd-staging")
    export.open()
    art = Artifactory(
        url=base, token=Secret(token_file.read_text().strip()), username=None, password=None, ca_file=None
    )
    fetcher = Fetcher(art, timeout=60, concurrency=4, segments=4, segment_min_size=64 * MiB)

    def one(entry: tuple[str, str, str, int]) -> StagedFile:
        _, rel, sha, size = entry
        staged = export.stage(rel, sha, size)
        fetcher.download(Asset(rel, sha, size, rel, "bench.toml", 0), staged)
        return staged

    try:
        with ThreadPoolExecutor(4) as pool:
            for i in range(0, len(entries), 128):
                group = list(pool.map(one, entries[i : i + 128]))
                export.flush_group(group)
                for staged in group:
                    staged.publish()
        export.sync_dirs()
    finally:
        fetcher.close()
        export.close()
    return 0


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=2048, help="MiB (default 2048)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp"))
    args = p.parse_args(argv)
    # Imported here: the ``lean`` tool (lean_main) runs on the standard library alone, so that its time
    # holds no imports beyond what any Python script pays.
    from servers import start_nginx
    from syncd.config import Artifactory, Secret
    from syncd.fetch import Fetcher
    from syncd.manifest import Asset
    from syncd.publish import Export

    size = args.size * MiB
    work = Path(tempfile.mkdtemp(prefix="syncd-ceiling-", dir=args.workdir))
    nginx = start_nginx(work / "nginx")
    try:
        src = nginx.root / "big.bin"
        digest = hashlib.sha256()
        block = os.urandom(MiB)
        with open(src, "wb") as fh:
            for i in range(args.size):
                chunk = i.to_bytes(8, "little") + block[8:]
                digest.update(chunk)
                fh.write(chunk)
        want = digest.hexdigest()
        os.sync()  # the source's writeback is not to land in the first run
        data = src.read_bytes()
        times: dict[str, list[float]] = {}

        def timed(name: str, fn: object) -> None:
            os.sync()
            t0 = time.perf_counter()
            got = fn()  # type: ignore[operator]
            times.setdefault(name, []).append(time.perf_counter() - t0)
            if got is not None and got != want:
                raise SystemExit(f"{name}: sha256 {got}, expected {want}")

        def hash_only() -> str:
            h = hashlib.sha256()
            view = memoryview(data)
            for i in range(0, len(view), MiB):
                h.update(view[i : i + MiB])
            return h.hexdigest()

        def with_syncd() -> None:
            root = work / "export"
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir()
            ex = Export(root, root / ".syncd-staging")
            ex.open()
            art = Artifactory(
                url=nginx.bearer_url(), token=Secret(nginx.token), username=None, password=None, ca_file=None
            )
            f = Fetcher(art, timeout=60, concurrency=4, segments=4, segment_min_size=64 * MiB)
            try:
                a = Asset("big.bin", want, size, "big.bin", "m.toml", 0)
                staged = ex.stage(a.dest, a.sha256, a.size)
                f.download(a, staged)
                staged.publish()
            finally:
                f.close()
                ex.close()

        out, path = work / "lean.bin", "/bearer/big.bin"
        for _ in range(args.repeat):
            timed("hashlib", hash_only)
            timed(
                "lean, no hash",
                lambda: lean(nginx.port, nginx.token, path, size, out, hashed=False),
            )
            timed(
                "lean + sha256",
                lambda: lean(nginx.port, nginx.token, path, size, out, hashed=True),
            )
            timed("syncd Fetcher", with_syncd)
        print(f"{args.size} MiB, medians of {args.repeat} (runs in seconds)")
        print(f"{'':16} {'median s':>9} {'MB/s':>8}  runs")
        for name, ts in times.items():
            med = statistics.median(ts)
            runs = ", ".join(f"{t:.2f}" for t in ts)
            print(f"{name:16} {med:9.2f} {size / med / 1e6:8.0f}  {runs}")
        return 0
    finally:
        nginx.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["lean"]:
        sys.exit(lean_main(sys.argv[2:]))
    sys.exit(fetch_main(sys.argv[2:]) if sys.argv[1:2] == ["fetch"] else run())
