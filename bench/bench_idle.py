#!/usr/bin/env python3
"""Idle cost of ``syncd run``: CPU between passes, and RSS over hundreds of passes.

One run of this script:

1. serves 100 small assets from a real nginx on 127.0.0.1 and a ``file://`` manifest repository
   (``tests/servers.py``), and writes a syncd configuration;
2. **idle CPU**: starts ``syncd run`` with ``[schedule] interval = "1h"``, waits for the first pass to
   finish, then reads the process's CPU time (utime + stime from ``/proc/PID/stat``) over ``--idle`` seconds
   with nothing to do;
3. **RSS over passes**: starts ``syncd run`` with ``interval = "0.2s"`` (jitter 0) and samples ``VmRSS`` from
   ``/proc/PID/status`` after every ``--every`` passes (counted from its ``pass_finished`` events) until
   ``--passes`` passes ran. Each pass fetches git, reads the ledger and lstat()s 100 dests;
4. prints both, and writes JSON with ``--json PATH``.

With ``--notify`` the configuration also has ``[notify]`` (problem, recovery and published) with mail to a
real SMTP server (aiosmtpd, ``tests/mailservers.py``) on 127.0.0.1: every pass then decides what to announce
(nothing, once in sync), which is the cost this measures.

Both daemons are stopped with SIGTERM by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from servers import GitRepo, make_asset, start_nginx  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def setup(work: Path, assets: int) -> tuple[Path, Any]:
    nginx = start_nginx(work / "nginx")
    repo = GitRepo(work / "remote.git", work / "clone")
    tables = []
    for i in range(assets):
        sha, size = make_asset(nginx.root, f"idle/{i}.bin", 4096, seed=i)
        tables.append(
            f'[[asset]]\nsource = "idle/{i}.bin"\nsha256 = "{sha}"\nsize = {size}\ndest = "idle/{i}.bin"\n'
        )
    repo.write("assets/idle.toml", "\n".join(tables))
    repo.commit("idle assets")
    (work / "export").mkdir()
    token = work / "token"
    token.write_text(nginx.token)
    token.chmod(0o600)
    return work, nginx


def write_config(work: Path, nginx: Any, interval: str, jitter: str, smtp_port: int | None = None) -> Path:
    conf = work / "syncd.conf"
    notify = ""
    if smtp_port is not None:
        notify = (
            '\n[notify]\nevents = ["problem", "recovery", "published"]\n\n[notify.smtp]\nhost = "127.0.0.1"\n'
            f'port = {smtp_port}\nsecurity = "none"\nfrom = "syncd@bench.example"\n'
            'to = ["ops@bench.example"]\n'
        )
    conf.write_text(
        f'[source]\nurl = "{(work / "remote.git").as_uri()}"\npath = "assets"\n\n'
        f'[artifactory]\nurl = "{nginx.bearer_url()}"\ntoken_file = "token"\n\n'
        f'[export]\nroot = "{work / "export"}"\n\n[schedule]\ninterval = "{interval}"\n'
        f'jitter = "{jitter}"\n\n[state]\ndirectory = "{work / "state"}"\n' + notify
    )
    return conf


class Run:
    """A ``syncd run`` whose JSON log is read line by line."""

    def __init__(self, conf: Path) -> None:
        syncd = Path(sys.executable).parent / "syncd"
        self.proc = subprocess.Popen(
            [str(syncd), "run", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")},
        )
        self.passes = 0

    def wait_passes(self, n: int, timeout: float = 600) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while self.passes < n:
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                raise RuntimeError(f"syncd run ended or stalled after {self.passes} passes")
            event = json.loads(line)
            if event["event"] == "pass_finished":
                if not event["ok"]:
                    raise RuntimeError(f"a pass failed: {event}")
                self.passes += 1

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    ap.add_argument("--passes", type=int, default=500, help="passes for the RSS measurement")
    ap.add_argument("--every", type=int, default=50, help="sample RSS every N passes")
    ap.add_argument("--assets", type=int, default=100)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--notify", action="store_true", help="with [notify] mail to a local SMTP server")
    args = ap.parse_args()
    smtp = None
    if args.notify:
        from mailservers import SmtpServer

        smtp = SmtpServer()
    port = smtp.port if smtp is not None else None
    with tempfile.TemporaryDirectory(prefix="syncd-idle-") as tmp:
        work, nginx = setup(Path(tmp), args.assets)
        try:
            idle = Run(write_config(work, nginx, "1h", "0", port))
            idle.wait_passes(1)
            time.sleep(1.0)
            before = cpu_seconds(idle.proc.pid)
            time.sleep(args.idle)
            idle_cpu = cpu_seconds(idle.proc.pid) - before
            idle_rss = rss_kib(idle.proc.pid)
            idle.stop()

            busy = Run(write_config(work, nginx, "0.2s", "0", port))
            samples: list[tuple[int, int]] = []
            for target in range(args.every, args.passes + 1, args.every):
                busy.wait_passes(target)
                samples.append((busy.passes, rss_kib(busy.proc.pid)))
            cpu_total = cpu_seconds(busy.proc.pid)
            busy.stop()
        finally:
            nginx.stop()
            if smtp is not None:
                smtp.stop()
    first, last = samples[0][1], samples[-1][1]
    result = {
        "assets": args.assets,
        "idle_seconds": args.idle,
        "idle_cpu_seconds": round(idle_cpu, 3),
        "idle_cpu_percent": round(100 * idle_cpu / args.idle, 3),
        "idle_rss_mib": round(idle_rss / 1024, 1),
        "rss_samples_mib": [(p, round(r / 1024, 1)) for p, r in samples],
        "rss_growth_mib": round((last - first) / 1024, 1),
        "cpu_per_pass_ms": round(1000 * cpu_total / samples[-1][0], 2),
        "notify": args.notify,
        "mails": len(smtp.messages) if smtp is not None else None,
    }
    print(
        f"idle: {result['idle_cpu_seconds']} s CPU in {args.idle:.0f} s ({result['idle_cpu_percent']} %), "
        f"RSS {result['idle_rss_mib']} MiB"
    )
    print("RSS after N passes (MiB): " + ", ".join(f"{p}: {r}" for p, r in result["rss_samples_mib"]))
    print(
        f"RSS growth from pass {samples[0][0]} to {samples[-1][0]}: {result['rss_growth_mib']} MiB; "
        f"CPU per pass ({args.assets} assets, no change): {result['cpu_per_pass_ms']} ms"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
