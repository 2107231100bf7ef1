#!/usr/bin/env python3
"""What checking the export costs: ``syncd verify`` against ``sha256sum -c`` on the same published files.

One run: ``--files`` files of ``--size-mib`` MiB each are served by a real nginx on 127.0.0.1 and published
by ``syncd sync`` from a ``file://`` manifest repository. Then, ``--repeat`` times alternately, with the page
cache warm (a first untimed read of everything): ``syncd verify`` (every published file re-hashed against
the ledger) and ``sha256sum -c`` over a checksum file of the same dests (what an operator would otherwise
run). It prints the medians, their ratio, and the MB/s of each; then one ``syncd verify --max-rate R`` run
and how close its read rate came to R (the limit a GPU cluster's NFS reads are protected by). Wall times of
a shared, noisy machine: quote medians and ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from servers import GitRepo, start_nginx  # noqa: E402


def timed(argv: list[str], **kw: object) -> tuple[float, int]:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, check=False, **kw)  # type: ignore[call-overload]
    return time.monotonic() - started, done.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-rate", type=float, default=200.0, help="MB/s for the --max-rate run")
    args = ap.parse_args()
    syncd = str(Path(sys.executable).parent / "syncd")
    with tempfile.TemporaryDirectory(prefix="syncd-verify-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        nginx = start_nginx(work / "nginx")
        try:
            blobs = nginx.root / "b"
            blobs.mkdir()
            repo = GitRepo(work / "remote.git", work / "clone")
            tables, sums = [], []
            for i in range(args.files):
                data = hashlib.sha256(str(i).encode()).digest() * (args.size_mib * 32768)
                (blobs / f"{i}.bin").write_bytes(data)
                digest = hashlib.sha256(data).hexdigest()
                tables.append(
                    f'[[asset]]\nsource = "b/{i}.bin"\nsha256 = "{digest}"\nsize = {len(data)}\n'
                    f'dest = "w/{i}.bin"\n'
                )
                sums.append(f"{digest}  w/{i}.bin\n")
            repo.write("assets/w.toml", "\n".join(tables))
            repo.commit("weights")
            export = work / "export"
            export.mkdir()
            (work / "token").write_text(nginx.token)
            (work / "token").chmod(0o600)
            conf = work / "syncd.conf"
            conf.write_text(
                f'[source]\nurl = "{(work / "remote.git").as_uri()}"\npath = "assets"\n\n'
                f'[artifactory]\nurl = "{nginx.bearer_url()}"\ntoken_file = "token"\n\n'
                f'[export]\nroot = "{export}"\n\n[state]\ndirectory = "{work / "state"}"\n'
            )
            (work / "state").mkdir(mode=0o700)
            _, code = timed([syncd, "sync", "-c", str(conf)])
            assert code == 0, "syncd sync failed"
        finally:
            nginx.stop()
        (work / "SHA256SUMS").write_text("".join(sums))
        total = args.files * args.size_mib * 1024 * 1024
        subprocess.run(
            ["cat", *(str(p) for p in sorted((export / "w").iterdir()))], stdout=subprocess.DEVNULL
        )
        runs: dict[str, list[float]] = {"syncd verify": [], "sha256sum -c": []}
        for _ in range(args.repeat):
            seconds, code = timed([syncd, "verify", "-c", str(conf)])
            assert code == 0, "syncd verify found something"
            runs["syncd verify"].append(seconds)
            seconds, code = timed(["sha256sum", "--quiet", "-c", str(work / "SHA256SUMS")], cwd=export)
            assert code == 0, "sha256sum -c failed"
            runs["sha256sum -c"].append(seconds)
        limited, code = timed([syncd, "verify", "-c", str(conf), "--max-rate", str(args.max_rate)])
        assert code == 0
        os.sync()
    print(f"{args.files} files x {args.size_mib} MiB = {total / 2**30:.2f} GiB, page cache warm")
    med = {k: statistics.median(v) for k, v in runs.items()}
    for key, values in runs.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"{key:<13} median {med[key]:.2f} s ({total / med[key] / 1e6:.0f} MB/s); runs {shown}")
    print(f"ratio syncd verify / sha256sum -c: {med['syncd verify'] / med['sha256sum -c']:.2f}")
    rate = total / limited / 1e6
    print(
        f"syncd verify --max-rate {args.max_rate:g}: {limited:.2f} s, {rate:.0f} MB/s "
        f"({rate / args.max_rate:.2f}x the limit)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
