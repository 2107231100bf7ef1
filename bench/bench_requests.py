#!/usr/bin/env python3
"""What one small GET costs in Python here, by HTTP layer: raw sockets, syncd's transport, httpx over it.

``bench_sync.py``'s small case asks syncd for 2,000 files of 64 KiB in half aria2c's time. This script
times only the requests, in one process against one real nginx on 127.0.0.1: ``--files`` GETs of
``--size`` KiB over 4 threads with keep-alive, each body hashed with sha256 and nothing written:

- ``raw``: a hand-written GET and ``recv`` on a socket (``bench_ceiling.get_whole``), no checks;
- ``transport``: ``httpx.Request`` handed to syncd's own transport (``syncd.fetch.http11``), as
  ``syncd.fetch`` does (h11 writes the request and parses the head);
- ``httpx + transport``: ``httpx.Client.stream`` over the same transport;
- ``httpx default``: ``httpx.Client.stream`` over httpx's default transport (httpcore).

Medians of ``--repeat`` runs (default 5), taken in turns. The GIL serialises the Python of all four
threads, so the differences are per-request CPU.

    .venv/bin/python bench/bench_requests.py [--files N] [--size KiB] [--repeat N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

THREADS = 4


def in_threads(count: int, make: Callable[[], Callable[[int], None]]) -> float:
    """Seconds for ``count`` calls spread over :data:`THREADS` threads, each with its own ``make()``."""
    todo = iter(range(count))
    lock = threading.Lock()

    def worker() -> None:
        one = make()
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            one(i)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=2000)
    p.add_argument("--size", type=int, default=64, help="KiB (default 64)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    import httpx
    from bench_ceiling import get_whole

    from servers import start_nginx
    from syncd.fetch.http11 import Transport

    work = Path(tempfile.mkdtemp(prefix="syncd-requests-"))
    nginx = start_nginx(work / "nginx")
    try:
        for i in range(args.files):
            (nginx.root / f"f{i}.bin").write_bytes(os.urandom(args.size << 10))
        base = nginx.bearer_url()
        u = urlsplit(base)
        auth = {"Authorization": f"Bearer {nginx.token}"}

        def raw() -> Callable[[int], None]:
            sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 80))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return lambda i: hashlib.sha256(
                get_whole(sock, u.netloc, nginx.token, f"{u.path}/f{i}.bin")
            ).digest()

        transport = Transport(ssl.create_default_context(), max_connections=8, max_keepalive_connections=8)

        def direct() -> Callable[[int], None]:
            def one(i: int) -> None:
                r = transport.handle_request(httpx.Request("GET", f"{base}/f{i}.bin", headers=auth))
                h = hashlib.sha256()
                for chunk in r.stream:  # type: ignore[union-attr]
                    h.update(chunk)
                r.close()

            return one

        def client_of(c: httpx.Client) -> Callable[[], Callable[[int], None]]:
            def make() -> Callable[[int], None]:
                def one(i: int) -> None:
                    with c.stream("GET", f"{base}/f{i}.bin", headers=auth) as r:
                        h = hashlib.sha256()
                        for chunk in r.iter_raw():
                            h.update(chunk)

                return one

            return make

        ours = httpx.Client(
            transport=Transport(ssl.create_default_context(), max_connections=8, max_keepalive_connections=8)
        )
        default = httpx.Client(limits=httpx.Limits(max_connections=8))
        rows: dict[str, Any] = {
            "raw": raw,
            "transport": direct,
            "httpx + transport": client_of(ours),
            "httpx default": client_of(default),
        }
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeat):
            for name, make in rows.items():
                times[name].append(in_threads(args.files, make))
        print(f"{args.files} GETs of {args.size} KiB over {THREADS} threads, medians of {args.repeat}")
        print(f"{'':18} {'median s':>9} {'ms/request':>11}  runs")
        for name, ts in times.items():
            med = statistics.median(ts)
            runs = ", ".join(f"{t:.2f}" for t in ts)
            print(f"{name:18} {med:9.2f} {med / args.files * 1000:11.3f}  {runs}")
        ours.close()
        default.close()
        transport.close()
        return 0
    finally:
        nginx.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
