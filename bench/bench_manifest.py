#!/usr/bin/env python3
"""What writing and checking a manifest costs: ``syncd manifest new --recursive`` and ``syncd validate
--remote`` over one folder of ``--files`` files, against what an engineer would otherwise do (download
every file with ``curl`` and ``sha256sum`` it).

One run: the files are served by the stand-in for Artifactory's storage API (tests/artifactory.py, a
real HTTP server on 127.0.0.1; downloads are redirected to a real nginx). ``--repeat`` times alternately:
``syncd manifest new --recursive`` (a listing, then each file's info, 8 at a time), ``syncd validate
--remote`` on its output (each file's info), and ``curl -s … | sha256sum`` per file. Prints medians and
ratios. Wall times of a shared, noisy machine: quote medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from artifactory import StorageApi  # noqa: E402
from servers import make_asset, start_nginx  # noqa: E402


def timed(argv: list[str] | str, **kw: object) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    return time.monotonic() - started, done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--size-kib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    syncd = str(REPO_ROOT / ".venv" / "bin" / "syncd")
    with tempfile.TemporaryDirectory(prefix="syncd-bench-manifest-") as tmp:
        base = Path(tmp)
        nginx = start_nginx(base / "nginx")
        try:
            for i in range(args.files):
                make_asset(
                    nginx.root, f"repo/ds/part-{i // 100:03d}/shard-{i:05d}.bin", args.size_kib << 10, seed=i
                )
            with StorageApi(nginx.root, nginx.open_url()) as api:
                token = base / "token"
                token.write_text(api.token)
                os.chmod(token, 0o600)
                flags = ["--artifactory", api.url, "--token-file", str(token)]
                out = base / "m.toml"
                new_s, validate_s, curl_s = [], [], []
                for _ in range(args.repeat):
                    out.unlink(missing_ok=True)
                    s, done = timed(
                        [syncd, "manifest", "new", *flags, "--recursive", "-o", str(out), "repo/ds"]
                    )
                    assert done.returncode == 0, done.stderr
                    new_s.append(s)
                    s, done = timed([syncd, "validate", "--remote", *flags, str(out)])
                    assert done.returncode == 0, done.stdout + done.stderr
                    validate_s.append(s)
                    url = f"{nginx.open_url()}/repo/ds"
                    script = " ; ".join(
                        f"curl -sf {url}/part-{i // 100:03d}/shard-{i:05d}.bin | sha256sum"
                        for i in range(args.files)
                    )
                    s, done = timed(["sh", "-c", script])
                    assert done.returncode == 0, done.stderr
                    curl_s.append(s)
        finally:
            nginx.stop()
    mib = args.files * args.size_kib / 1024
    print(f"{args.files} files of {args.size_kib} KiB ({mib:.0f} MiB), medians of {args.repeat}:")
    m_new, m_val, m_curl = (statistics.median(x) for x in (new_s, validate_s, curl_s))
    print(f"  syncd manifest new --recursive   {m_new:7.2f} s")
    print(f"  syncd validate --remote          {m_val:7.2f} s")
    print(f"  curl | sha256sum, per file       {m_curl:7.2f} s   (manifest new: {m_new / m_curl:.2f}x of it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
