#!/usr/bin/env python3
"""Benchmark ``syncd sync`` against ``aria2c`` and ``curl`` + ``sha256sum`` on the same files.

One run of this script, for each case:

- ``big``: one 2 GiB file from nginx on loopback;
- ``big-capped``: the same file from a second nginx whose file locations have ``limit_rate`` 50,000,000
  bytes/s (50 MB/s per connection, ``--capped-rate``), like a server or proxy that caps each connection;
- ``many`` (alias ``medium``, its former name): 200 files of 10 MiB;
- ``small``: 2,000 files of 64 KiB;

it

1. writes the files (deterministic bytes) under a temporary directory and serves them from a real nginx on
   127.0.0.1 (``tests/servers.py``'s ``start_nginx``, its bearer-token location; big-capped is served by its
   own nginx started with ``limit_rate=``, whose root is the first one's, so the file is written once);
2. builds a ``file://`` manifest repository (``tests/servers.py``'s ``GitRepo``, one manifest per 100 assets
   under ``assets/``) and a syncd configuration (concurrency 4, like ``tests/harness.py``; each
   ``--syncd-config-extra LINE`` is appended to its ``[download]`` section, e.g. ``'segments = 4'``);
3. times, ``--repeat`` times each and interleaved (syncd, aria2c, curl, syncd, …), from an empty output
   directory (and for syncd an empty state directory):

   a. ``syncd sync -c CONFIG``: the whole job (git clone/fetch, download, verify, fsync, publish, ledger);
   b. ``aria2c -i INPUT`` with a ``checksum=sha-256=…`` per file, ``-j 4``; ``-x 4 -s 4`` (4 connections
      per file) for big and big-capped, ``-x 1 -s 1`` for the many-file cases;
   c. ``xargs -P 4`` running ``curl -sSf -o FILE URL && echo "HEX  FILE" | sha256sum -c --quiet`` per file
      (one connection per file, as a user would run it: a single connection for big and big-capped);
   d. ``lean``: ``bench_ceiling.py lean``, the least a verified, durable download does in Python on this
      machine (raw sockets, sha256, one ``syncfs`` or ``fdatasync``, rename; 4 ranged connections with the
      in-order hash for one big file): no framing checks, time bounds, ledger or log. It is the ceiling a
      Python tool can reach here, printed with every MISS ("why:"), with syncd's start-up time and, for
      many files, its CPU time per file;

4. checks after every run, untimed, that every output file has the right size and sha256 (Python hashlib),
   so that no tool wins by skipping work;
5. prints per case: median wall time, MB/s (10^6 bytes/s of payload), peak RSS, CPU time, the ratio of the
   wall time to aria2c's (< 1 means faster than aria2c) and the CPU time the rest of the machine used during
   the runs (a shared machine makes the figures noisy), then syncd's targets for the case, each PASS or
   MISS; at the end all targets in one table. ``--json PATH`` writes the same data as JSON.

Before the cases it measures single-core ``hashlib.sha256`` throughput (a 1 GiB in-memory buffer hashed in
1 MiB chunks, median of 3): the big target is relative to it, since a single stream that hashes as it
downloads cannot beat the hash.

Targets (syncd; ratio = syncd median wall / aria2c median wall):

===========  ==============================================================================
big          MB/s end to end >= 0.45 x hashlib.sha256 MB/s, and ratio <= 0.5 (aria2c -x4 -s4)
big-capped   ratio <= 1.0 (aria2c -x4 -s4 gets 4 capped connections)
many         ratio <= 0.5
small        ratio <= 0.5
every case   peak RSS < 120 MiB
===========  ==============================================================================

Peak RSS comes from ``wait4`` in GNU ``/usr/bin/time`` (``%M``) wrapped around the command: Linux reports
the largest ``ru_maxrss`` of the child and of every descendant it waited for. For syncd and aria2c that is
the one process; for the curl pipeline it is the largest single process (curl, sha256sum, sh or xargs), not
the sum of the four concurrent pipelines. (``os.wait4`` straight from this script would not do: a child's
``ru_maxrss`` starts at the RSS of the process that forked it.)

Caches: nothing is dropped from the page cache, so the served files are warm (they were just written). Dirty
pages are flushed with sync(2) before each timed run (untimed) so that one run's writeback does not land in
the next run's time. syncd fsyncs every file and directory it publishes as part of its job; aria2c and curl
do not fsync, their output may still be in the page cache when their clock stops.

``--scale F`` multiplies every size and count (minimum 1) for a quick smoke run, e.g. ``--scale 0.01``
(not the cap, and not the 1 GiB hashed for the hashlib figure).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from servers import GitRepo, Nginx, start_nginx  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CONCURRENCY = 4
ASSETS_PER_MANIFEST = 100
TOOLS = ("syncd", "aria2c", "curl", "lean", "fetch")
TRASH_MIN_FILES = 1000  # cases with this many files move each run's output aside (see Runner.cleanup)

RSS_TARGET_MIB = 120.0  # syncd's peak RSS, every case
CAPPED_RATE = 50_000_000  # big-capped: nginx limit_rate, bytes/s per connection (50 MB/s)
HASH_BYTES = GiB  # hashed in memory for the single-core hashlib.sha256 figure
HASH_CHUNK = MiB
HASH_RUNS = 3


@dataclass(frozen=True)
class CaseSpec:
    count: int
    size: int
    description: str
    data: str  # the files: cases with the same data share them (written once)
    split: int  # aria2c -x/-s: connections per file
    ratio_max: float  # target: syncd median wall <= ratio_max x aria2c's
    hash_fraction_min: float | None = None  # target: syncd MB/s >= this x single-core hashlib.sha256 MB/s
    capped: bool = False  # served by the nginx with limit_rate


CASES: dict[str, CaseSpec] = {
    "big": CaseSpec(1, 2 * GiB, "one 2 GiB file", "big", split=4, ratio_max=0.5, hash_fraction_min=0.45),
    "big-capped": CaseSpec(1, 2 * GiB, "one 2 GiB file", "big", split=4, ratio_max=1.0, capped=True),
    "many": CaseSpec(200, 10 * MiB, "200 files of 10 MiB", "many", split=1, ratio_max=0.5),
    "small": CaseSpec(2000, 64 * KiB, "2,000 files of 64 KiB", "small", split=1, ratio_max=0.5),
}
CASE_ALIASES = {"medium": "many"}  # "medium" was the name of "many" before big-capped came

CURL_SNIPPET = 'curl -sSf -H "$BENCH_AUTH" --create-dirs -o "$2" "$1" && echo "$3  $2" | sha256sum -c --quiet'


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class File:
    rel: str  # path under the served root and under every output directory
    size: int
    sha256: str


@dataclass
class Case:
    name: str
    count: int
    size: int
    description: str
    spec: CaseSpec
    files: list[File] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.count * self.size

    @property
    def data(self) -> str:
        return self.spec.data


def scaled_cases(names: list[str], scale: float, capped_rate: int) -> list[Case]:
    out = []
    for name in names:
        spec = CASES[name]
        c, s = max(1, round(spec.count * scale)), max(1, round(spec.size * scale))
        description = spec.description
        if scale != 1:
            description = f"{c} file(s) of {human(s)} (scale {scale:g})"
        if spec.capped:
            description += f", nginx limit_rate {capped_rate} B/s ({capped_rate / 1e6:g} MB/s) per connection"
        out.append(Case(name, c, s, description, spec))
    return out


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return f"{n} B"


def write_files(root: Path, case: Case, seed: int) -> None:
    """Write the case's files: a random 1 MiB block repeated, each MiB stamped with (file, chunk) numbers.

    Fast (memory-speed writes, one sha256 pass) and deterministic; no two chunks of the whole run are equal.
    The files go under ``root/<case.data>/``, so cases with the same data (big, big-capped) share them.
    """
    block = random.Random(seed).randbytes(MiB)  # noqa: S311 - benchmark data, not crypto
    case_id = sum(case.data.encode())
    for i in range(case.count):
        rel = f"{case.data}/d{i // 1000:02}/f{i:05}.bin"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(path, "wb", buffering=0) as fh:
            done, chunk_no = 0, 0
            while done < case.size:
                n = min(MiB, case.size - done)
                stamp = struct.pack("<IIQ", case_id, i, chunk_no)
                data = (stamp + block[len(stamp) : n]) if n > len(stamp) else stamp[:n]
                digest.update(data)
                fh.write(data)
                done += n
                chunk_no += 1
        case.files.append(File(rel, case.size, digest.hexdigest()))


def verify_output(root: Path, files: list[File]) -> list[str]:
    """Problems found in ``root`` (missing file, wrong size, wrong sha256); empty means byte-exact."""
    problems = []
    for f in files:
        path = root / f.rel
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{f.rel}: missing")
            continue
        if size != f.size:
            problems.append(f"{f.rel}: size {size}, expected {f.size}")
            continue
        with open(path, "rb") as fh:
            actual = hashlib.file_digest(fh, "sha256").hexdigest()
        if actual != f.sha256:
            problems.append(f"{f.rel}: sha256 {actual}, expected {f.sha256}")
    return problems


def hashlib_speed() -> dict[str, Any]:
    """Single-core ``hashlib.sha256`` throughput: a HASH_BYTES in-memory buffer hashed in HASH_CHUNK
    pieces, HASH_RUNS times; MB/s (10^6 bytes/s) of the median run, and the other load meanwhile."""
    block = random.Random(99).randbytes(HASH_CHUNK)  # noqa: S311 - benchmark data, not crypto
    buf = memoryview(block * (HASH_BYTES // HASH_CHUNK))  # every page touched now, not while timing
    runs, other = [], []
    try:
        for _ in range(HASH_RUNS):
            busy0, cpu0 = machine_busy_s(), time.process_time()
            t0 = time.perf_counter()
            digest = hashlib.sha256()
            for off in range(0, len(buf), HASH_CHUNK):
                digest.update(buf[off : off + HASH_CHUNK])
            digest.hexdigest()
            runs.append(time.perf_counter() - t0)
            other.append(max(0.0, machine_busy_s() - busy0 - (time.process_time() - cpu0)))
    finally:
        buf.release()
    del buf
    wall = statistics.median(runs)
    return {
        "bytes": HASH_BYTES,
        "chunk": HASH_CHUNK,
        "runs_s": [round(r, 3) for r in runs],
        "median_s": round(wall, 3),
        "mb_per_s": round(HASH_BYTES / wall / 1e6, 1),
        "other_cpu_s": [round(o, 2) for o in other],
    }


# --------------------------------------------------------------------------- syncd world


def toml_str(v: str) -> str:
    return json.dumps(v)


def build_repo(base: Path, case: Case, url_prefix: str) -> GitRepo:
    """A bare manifest repo (file://) with one manifest per 100 assets under assets/."""
    repo = GitRepo(base / "manifests.git", base / "manifests-work")
    for m in range(0, len(case.files), ASSETS_PER_MANIFEST):
        lines = []
        for f in case.files[m : m + ASSETS_PER_MANIFEST]:
            lines += [
                "[[asset]]",
                f"source = {toml_str(url_prefix + f.rel)}",
                f"sha256 = {toml_str(f.sha256)}",
                f"size = {f.size}",
                f"dest = {toml_str(f.rel)}",
                "",
            ]
        repo.write(f"assets/{case.name}-{m // ASSETS_PER_MANIFEST:03}.toml", "\n".join(lines))
    repo.commit(f"bench: {case.description}")
    return repo


def write_config(
    base: Path, repo: GitRepo, nginx: Nginx, export: Path, state: Path, download_extra: list[str]
) -> Path:
    """The syncd config; ``download_extra`` are TOML lines appended to its ``[download]`` section."""
    etc = base / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    token = etc / "artifactory.token"
    token.write_text(nginx.token + "\n")
    token.chmod(0o600)
    config = etc / "syncd.conf"
    text = "\n".join(
        [
            "[source]",
            f"url = {toml_str(repo.url)}",
            'branch = "main"',
            'path = "assets"',
            "",
            "[artifactory]",
            f"url = {toml_str(nginx.bearer_url())}",
            'token_file = "artifactory.token"',
            "",
            "[export]",
            f"root = {toml_str(str(export))}",
            "",
            "[download]",
            f"concurrency = {CONCURRENCY}",
            'timeout = "60s"',
            *download_extra,
            "",
            "[state]",
            f"directory = {toml_str(str(state))}",
            "",
        ]
    )
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(
            f"--syncd-config-extra made the syncd config invalid TOML ({exc}):\n{text}"
        ) from None
    config.write_text(text)
    return config


SYNCD_OVERRIDE: list[str] = []  # set by --syncd
SYNCD_CONFIG_EXTRA: list[str] = []  # set by --syncd-config-extra: lines for [download]


def syncd_command() -> str:
    if SYNCD_OVERRIDE:
        return SYNCD_OVERRIDE[0]
    beside = Path(sys.executable).parent / "syncd"
    if beside.exists():
        return str(beside)
    found = shutil.which("syncd")
    if not found:
        raise SystemExit("syncd is not installed (pip install -e . into this Python's environment)")
    return found


# --------------------------------------------------------------------------- measuring


@dataclass
class Sample:
    wall: float
    maxrss_kib: int
    cpu: float  # user + sys of the child and its waited-for descendants
    server_cpu: float = 0.0  # user + sys of nginx (master and workers) during the run
    other_cpu: float = 0.0  # CPU the rest of the machine used during the run (another workload)
    extra: dict[str, Any] = field(default_factory=dict)


CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent not idle (user, nice, system, irq, softirq, steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _proc_stat(pid: str) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def server_cpu_s(pid: int) -> float:
    """user + sys CPU seconds of ``pid`` and its direct children (nginx: master and workers)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(entry)  # fields[1] is the ppid, [11] utime, [12] stime (stat fields 4, 14, 15)
        if fields and (entry == str(pid) or fields[1] == str(pid)):
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


TIME_BIN = "/usr/bin/time"  # GNU time: forks the command from a ~1 MiB process


def measure(
    argv: list[str],
    *,
    log: Path,
    server_pid: int,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Sample:
    """Run ``argv`` to completion: wall clock here, peak RSS and CPU time from GNU time's wait4.

    GNU ``time`` is the parent because a child's ``ru_maxrss`` starts at the RSS of the process it was forked
    from (checked: ``true`` forked by a 200 MiB Python reports 215 MiB through ``os.wait4``, 1 MiB through
    ``/usr/bin/time``). Without GNU time, ``os.wait4`` is used and the figure is a floor of this script's RSS.

    ``other_cpu`` is the machine's busy CPU time during the run less the tool's and nginx's: near 0 when the
    machine was otherwise quiet, large when another workload shared the cores (the run is then less reliable).
    """
    usage_file = log.with_suffix(".rusage")
    wrapped = [TIME_BIN, "-o", str(usage_file), "-f", "%M %U %S", *argv] if Path(TIME_BIN).exists() else argv
    with open(log, "wb") as out:
        busy0, server0 = machine_busy_s(), server_cpu_s(server_pid)
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy, server = machine_busy_s() - busy0, server_cpu_s(server_pid) - server0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{argv[0]} exited with {proc.returncode}; log {log}:\n{tail}")
    if wrapped is argv:
        maxrss, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    else:
        rss_text, user, system = usage_file.read_text().split("\n")[-2].split()
        maxrss, cpu = int(rss_text), float(user) + float(system)
    return Sample(wall, maxrss, cpu, server, max(0.0, busy - cpu - server))


def fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


class Runner:
    """The three ways to get one case's files, each from an empty output directory."""

    def __init__(
        self, case: Case, nginx: Nginx, base: Path, url_prefix: str, nginx_limit_rate: int | None = None
    ) -> None:
        self.case = case
        self.nginx = nginx
        self.nginx_limit_rate = nginx_limit_rate  # bytes/s per connection, None: no cap
        self.base = base
        self.logs = base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.url_prefix = url_prefix
        self.out = {tool: base / "out" / tool for tool in TOOLS}
        self.state = base / "state"
        repo = build_repo(base / "git", case, url_prefix)
        self.config = write_config(base, repo, nginx, self.out["syncd"], self.state, SYNCD_CONFIG_EXTRA)
        self.split = case.spec.split
        self.aria_input = base / "aria2c.input"
        self.aria_input.write_text(
            "".join(
                f"{self.url(f)}\n  dir={self.out['aria2c'] / Path(f.rel).parent}\n"
                f"  out={Path(f.rel).name}\n  checksum=sha-256={f.sha256}\n"
                for f in case.files
            )
        )
        self.curl_list = base / "curl.list"
        self.curl_list.write_text("".join(f"{self.url(f)} {f.rel} {f.sha256}\n" for f in case.files))
        self.lean_list = base / "lean.list"
        self.lean_list.write_text("".join(f"{self.url(f)} {f.rel} {f.sha256} {f.size}\n" for f in case.files))

    def url(self, f: File) -> str:
        return f"{self.nginx.bearer_url()}/{self.url_prefix}{f.rel}"

    def describe(self, tool: str) -> str:
        if tool == "syncd":
            extra = "".join(f"; {line.strip()}" for line in SYNCD_CONFIG_EXTRA if line.strip())
            return f"syncd sync -c CONFIG (concurrency {CONCURRENCY}{extra})"
        if tool == "aria2c":
            return f"aria2c -j {CONCURRENCY} -x {self.split} -s {self.split} --check-integrity=true"
        if tool == "fetch":
            return (
                "bench_ceiling.py fetch: syncd's fetch layer alone in one process (syncd.fetch into "
                "syncd.publish staging, group flush, checked publish; no config, git, plan, ledger, audit "
                "or log)"
            )
        if tool == "lean":
            return (
                "bench_ceiling.py lean: the least a verified, durable download does in Python (raw sockets, "
                "sha256, syncfs/fdatasync, rename; no checks, bounds, ledger or log): the ceiling"
            )
        return f"xargs -P {CONCURRENCY} curl + sha256sum -c"

    def run(self, tool: str, run_no: int) -> Sample:
        out = self.out[tool]
        fresh_dir(out)
        if tool == "syncd":
            fresh_dir(self.state)
        os.sync()  # flush earlier runs' dirty pages (untimed); the page cache itself stays warm
        log = self.logs / f"{tool}-{run_no}.log"
        sample = getattr(self, f"_{tool}")(log)
        problems = verify_output(out, self.case.files)
        if problems:
            raise RuntimeError(
                f"{tool} run {run_no} left a wrong output ({len(problems)} problem(s)): "
                + "; ".join(problems[:5])
            )
        return sample

    def cleanup(self, tool: str) -> None:
        """Remove a run's output. With many files it is moved aside and removed after the case
        (:meth:`purge`): ext4 without a journal (this machine's ``/``) skips inodes freed in the last
        minute when it allocates new ones (``recently_deleted()``), so thousands of files deleted just
        before a run slow that run's file creates (lean, small: 0.77 s for a first run, 1.44 s after one)."""
        gone = [self.out[tool], *([self.state] if tool == "syncd" else [])]
        for path in gone:
            if self.case.count >= TRASH_MIN_FILES and path.exists():
                trash = self.base / "trash"
                trash.mkdir(exist_ok=True)
                path.rename(trash / f"{path.name}-{len(list(trash.iterdir()))}")
            else:
                shutil.rmtree(path, ignore_errors=True)

    def purge(self) -> None:
        """Remove what :meth:`cleanup` moved aside (after the case's last run)."""
        shutil.rmtree(self.base / "trash", ignore_errors=True)

    def _syncd(self, log: Path) -> Sample:
        env = {k: v for k, v in os.environ.items() if k != "SYNCD_CONFIG"}
        sample = measure(
            [syncd_command(), "sync", "-c", str(self.config)], log=log, server_pid=self.nginx.pid, env=env
        )
        for line in log.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if event.get("event") == "pass_finished":
                sample.extra["pass_s"] = event.get("duration_s")
                sample.extra["published"] = event.get("published")
        return sample

    def _aria2c(self, log: Path) -> Sample:
        argv = [
            "aria2c",
            "--no-conf",
            "-i",
            str(self.aria_input),
            f"-j{CONCURRENCY}",
            f"-x{self.split}",
            f"-s{self.split}",
            "--header",
            f"Authorization: Bearer {self.nginx.token}",
            "--check-integrity=true",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "--file-allocation=none",
            "--console-log-level=warn",
            "--summary-interval=0",
            "--download-result=hide",
        ]
        return measure(argv, log=log, server_pid=self.nginx.pid)

    def _lean(self, log: Path) -> Sample:
        argv = [
            sys.executable,
            str(REPO_ROOT / "bench" / "bench_ceiling.py"),
            "lean",
            str(self.lean_list),
            str(self.out["lean"]),
            str(self.base / "etc" / "artifactory.token"),
        ]
        return measure(argv, log=log, server_pid=self.nginx.pid)

    def _fetch(self, log: Path) -> Sample:
        argv = [
            sys.executable,
            str(REPO_ROOT / "bench" / "bench_ceiling.py"),
            "fetch",
            str(self.lean_list),
            str(self.out["fetch"]),
            str(self.base / "etc" / "artifactory.token"),
        ]
        return measure(argv, log=log, server_pid=self.nginx.pid)

    def _curl(self, log: Path) -> Sample:
        env = {**os.environ, "BENCH_AUTH": f"Authorization: Bearer {self.nginx.token}", "LC_ALL": "C"}
        argv = [
            "xargs",
            "-a",
            str(self.curl_list),
            "-P",
            str(CONCURRENCY),
            "-n",
            "3",
            "sh",
            "-c",
            CURL_SNIPPET,
            "_",
        ]
        return measure(argv, log=log, server_pid=self.nginx.pid, env=env, cwd=self.out["curl"])


# --------------------------------------------------------------------------- reporting


def source_tree() -> str:
    """The commit of this checkout and whether src/ has uncommitted changes (what the default syncd runs)."""
    if SYNCD_OVERRIDE:
        return "not timed: --syncd given"
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head} (src/ with uncommitted changes)" if dirty else head


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass

    def version(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "not found"

    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False).stderr.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_kib / MiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aria2c": version(["aria2c", "--version"]),
        "curl": version(["curl", "--version"]),
        "nginx": nginx_v,
        "syncd": version([syncd_command(), "--version"]),
        "syncd_command": syncd_command(),
        "source_tree": source_tree(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def target_value(t: dict[str, Any]) -> str:
    if t["value"] is None:
        return "n/a"
    return f"{t['value']:.2f}" if t["kind"] == "ratio" else f"{t['value']:.1f}"


def case_targets(
    case: Case, medians: dict[str, float], rows: dict[str, dict[str, Any]], hash_mb_s: float | None
) -> list[dict[str, Any]]:
    """syncd's targets for ``case``: what, the limit, the measured value and PASS / MISS (n/a: not run)."""
    syncd = rows.get("syncd")
    out: list[dict[str, Any]] = []
    if case.spec.hash_fraction_min is not None:
        frac = case.spec.hash_fraction_min
        limit = round(frac * hash_mb_s, 1) if hash_mb_s else None
        value = syncd["mb_per_s"] if syncd else None
        ok = None if limit is None or value is None else value >= limit
        shown = f"{limit:.1f}" if limit is not None else "n/a"
        out.append(
            {
                "target": f"syncd MB/s >= {frac:g} x hashlib.sha256 MB/s (= {shown})",
                "limit": limit,
                "value": value,
                "kind": "MB/s",
                "result": verdict(ok),
            }
        )
    ratio = round(medians["syncd"] / medians["aria2c"], 3) if {"syncd", "aria2c"} <= medians.keys() else None
    split = case.spec.split
    out.append(
        {
            "target": f"syncd wall <= {case.spec.ratio_max:g} x aria2c -x{split} -s{split}",
            "limit": case.spec.ratio_max,
            "value": ratio,
            "kind": "ratio",
            "result": verdict(None if ratio is None else ratio <= case.spec.ratio_max),
        }
    )
    why = ceiling(case, rows, hash_mb_s)
    for t in out:
        if t["result"] == "MISS" and why:
            t["ceiling"] = why
    rss = syncd["peak_rss_mib"] if syncd else None
    out.append(
        {
            "target": f"syncd peak RSS < {RSS_TARGET_MIB:g} MiB",
            "limit": RSS_TARGET_MIB,
            "value": rss,
            "kind": "MiB",
            "result": verdict(None if rss is None else rss < RSS_TARGET_MIB),
        }
    )
    return out


def ceiling(case: Case, rows: dict[str, dict[str, Any]], hash_mb_s: float | None) -> str:
    """What bounded syncd in this run, from this run's figures: the lean tool's time (the least a
    verified, durable download does in Python here), syncd's CPU and its own pass time."""
    syncd, lean, fetch = rows.get("syncd"), rows.get("lean"), rows.get("fetch")
    if syncd is None:
        return ""
    parts = []
    if lean is not None:
        parts.append(
            f"ceiling in this run: lean {lean['median_s']:.2f} s ({lean['mb_per_s']:.0f} MB/s), syncd"
            f" {syncd['median_s'] / lean['median_s']:.2f} x its time"
        )
    if fetch is not None:
        ratio = fetch.get("ratio_to_aria2c")
        vs = f", {ratio:.2f} x aria2c" if ratio is not None else ""
        parts.append(
            f"syncd's fetch layer alone {fetch['median_s']:.2f} s ({fetch['mb_per_s']:.0f} MB/s{vs}, its"
            " start-up included)"
        )
    passes = [x for x in syncd.get("pass_s", []) if isinstance(x, int | float)]
    if passes:
        start = syncd["median_s"] - statistics.median(passes)
        parts.append(
            f"syncd's start-up (imports, config, clone, ledger) {start:.2f} s of its"
            f" {syncd['median_s']:.2f} s, its pass {statistics.median(passes):.2f} s"
        )
    if case.count == 1 and hash_mb_s:
        parts.append(
            f"the in-order sha256 alone takes {case.total / hash_mb_s / 1e6:.2f} s of one of the"
            f" {os.cpu_count()} cores; recv, page-cache writes, the read-back for the hash and nginx share"
            " the rest"
        )
    else:
        per_file = syncd["cpu_s_median"] / case.count * 1000
        parts.append(
            f"syncd {syncd['cpu_s_median']:.2f} CPU s = {per_file:.2f} ms per file, most of it Python"
            " that the GIL serialises: the request and head, the staging file and its checks (the fetch"
            " layer), then the plan and each asset's ledger row, audit record and log event"
        )
    return "; ".join(parts)


def summarize(
    case: Case, runner: Runner, samples: dict[str, list[Sample]], hash_mb_s: float | None, loadavg: list[str]
) -> dict[str, Any]:
    rows = []
    medians = {tool: statistics.median(s.wall for s in ss) for tool, ss in samples.items() if ss}
    for tool, ss in samples.items():
        if not ss:
            continue
        wall = medians[tool]
        row: dict[str, Any] = {
            "tool": tool,
            "command": runner.describe(tool),
            "runs_s": [round(s.wall, 3) for s in ss],
            "median_s": round(wall, 3),
            "mb_per_s": round(case.total / wall / 1e6, 1),
            "peak_rss_mib": round(max(s.maxrss_kib for s in ss) / KiB, 1),
            "cpu_s_median": round(statistics.median(s.cpu for s in ss), 2),
            "nginx_cpu_s_median": round(statistics.median(s.server_cpu for s in ss), 2),
            "other_cpu_s": [round(s.other_cpu, 2) for s in ss],
            "ratio_to_aria2c": round(wall / medians["aria2c"], 2) if "aria2c" in medians else None,
        }
        if tool == "syncd":
            row["pass_s"] = [s.extra.get("pass_s") for s in ss]
        rows.append(row)
    return {
        "case": case.name,
        "description": case.description,
        "files": case.count,
        "file_size": case.size,
        "total_bytes": case.total,
        "nginx_limit_rate": runner.nginx_limit_rate,
        "loadavg_at_start": loadavg,
        "results": rows,
        "targets": case_targets(case, medians, {r["tool"]: r for r in rows}, hash_mb_s),
    }


def table(summary: dict[str, Any]) -> str:
    head = (
        f"{'tool':<8} {'median s':>9} {'MB/s':>8} {'peak RSS MiB':>13} {'CPU s':>7} {'vs aria2c':>10}"
        f" {'other CPU s':>12}  runs s"
    )
    lines = [
        f"== {summary['case']}: {summary['description']} ({human(summary['total_bytes'])} in total;"
        f" load average at start {' '.join(summary['loadavg_at_start'])})",
        head,
        "-" * len(head),
    ]
    for r in summary["results"]:
        ratio = f"{r['ratio_to_aria2c']:.2f}" if r["ratio_to_aria2c"] is not None else "n/a"
        runs = ", ".join(f"{x:.2f}" for x in r["runs_s"])
        other = f"{max(r['other_cpu_s']):.2f}"
        lines.append(
            f"{r['tool']:<8} {r['median_s']:>9.2f} {r['mb_per_s']:>8.1f} {r['peak_rss_mib']:>13.1f} "
            f"{r['cpu_s_median']:>7.2f} {ratio:>10} {other:>12}  {runs}"
        )
    for r in summary["results"]:
        lines.append(f"   {r['tool']}: {r['command']}")
    for t in summary["targets"]:
        value = target_value(t)
        lines.append(f"   target: {t['target']}: {value} {t['result']}")
        if t.get("ceiling"):
            lines.append(f"      why: {t['ceiling']}")
    return "\n".join(lines)


def targets_table(report: dict[str, Any]) -> str:
    h = report.get("hashlib_sha256")
    lines = []
    if h:
        lines.append(
            f"hashlib.sha256, one core: {h['mb_per_s']:.1f} MB/s ({human(h['bytes'])} in {human(h['chunk'])}"
            f" chunks, median of {', '.join(f'{r:.3f}' for r in h['runs_s'])} s; other CPU s"
            f" {max(h['other_cpu_s']):.2f}); big target 0.45 x that = {0.45 * h['mb_per_s']:.1f} MB/s"
        )
    rows = [(c["case"], t) for c in report["cases"] for t in c["targets"]]
    width = max([len(t["target"]) for _, t in rows] + [6])
    lines.append(f"== targets (syncd)\n{'case':<11} {'target':<{width}} {'measured':>9}  result")
    lines.append("-" * (width + 30))
    for name, t in rows:
        value = target_value(t)
        lines.append(f"{name:<11} {t['target']:<{width}} {value:>9}  {t['result']}")
        if t.get("ceiling"):
            lines.append(f"{'':<11}   why: {t['ceiling']}")
    results = [t["result"] for _, t in rows]
    lines.append(
        f"{results.count('PASS')} PASS, {results.count('MISS')} MISS"
        + (f", {results.count('n/a')} n/a (a tool was not run)" if "n/a" in results else "")
    )
    if "MISS" in results:
        lines.append(f"Where a target is missed, the measured ceiling and why: {CEILINGS}")
    return "\n".join(lines)


CEILINGS = "docs/performance.md, section 'Fast at every size' (profiles, and what would move each)"
NOTES = (
    "Wall time: median of the runs, from fork to exit, each run into an empty output directory (syncd: "
    "empty export and state directory, so it clones the manifest repo too); with 1,000 files or more the "
    "outputs of earlier runs are moved aside and deleted after the case, not just before a run (on ext4 "
    "without a journal, inodes freed in the last minute slow the next file creates). "
    "MB/s = payload bytes / median wall / 10^6. Peak RSS: largest ru_maxrss over the runs (GNU time "
    "%M; for curl the largest single "
    "process of the pipeline). CPU s: median user+sys of the tool (nginx not included). vs aria2c = median "
    "wall / aria2c's median wall (< 1: faster than aria2c). other CPU s: the most CPU time, over the runs, "
    "that the rest of the machine (neither the tool nor nginx) used during a run, from /proc/stat; well "
    "above 0 means another workload shared the cores. "
    "Page cache: nothing dropped, served files warm; sync(2) before each run, untimed. syncd fsyncs what "
    "it publishes, aria2c and curl do not. Every output was checked byte-exact (size + sha256), untimed. "
    "big-capped: nginx limit_rate caps each connection (request), so aria2c -x4 -s4 may get 4 times the "
    "cap, curl and a single-stream syncd once."
)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cases",
        default=",".join(CASES),
        help=f"comma-separated: {', '.join(CASES)} (medium = many); default all",
    )
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: syncd, aria2c, curl")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool and case (median reported)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every size and count (smoke: 0.01)")
    p.add_argument(
        "--capped-rate",
        type=int,
        default=CAPPED_RATE,
        metavar="BYTES",
        help=f"big-capped: nginx limit_rate per connection, bytes/s (default {CAPPED_RATE}, 50 MB/s)",
    )
    p.add_argument(
        "--syncd-config-extra",
        action="append",
        default=[],
        metavar="TOML",
        help="a TOML line to append to the [download] section of the syncd config (repeatable; newlines "
        "split one value into lines), e.g. 'segments = 4' 'segment_min_size = \"64MiB\"'",
    )
    p.add_argument("--no-hash", action="store_true", help="skip the hashlib.sha256 measurement (big: n/a)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where the temporary directory goes")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    p.add_argument(
        "--syncd",
        metavar="CMD",
        help="the syncd executable to time (default: the one next to this Python, else on PATH)",
    )
    args = p.parse_args(argv)
    names = [CASE_ALIASES.get(c.strip(), c.strip()) for c in args.cases.split(",") if c.strip()]
    args.case_names = list(dict.fromkeys(names))
    args.tool_names = [t.strip() for t in args.tools.split(",") if t.strip()]
    for c in args.case_names:
        if c not in CASES:
            p.error(f"unknown case {c!r} (choose from {', '.join([*CASES, *CASE_ALIASES])})")
    for t in args.tool_names:
        if t not in TOOLS:
            p.error(f"unknown tool {t!r} (choose from {', '.join(TOOLS)})")
    if args.repeat < 1 or args.scale <= 0 or args.capped_rate < 1:
        p.error("--repeat and --capped-rate must be >= 1 and --scale > 0")
    args.config_extra = [
        line for value in args.syncd_config_extra for line in value.splitlines() if line.strip()
    ]
    for line in args.config_extra:
        if re.match(r"\s*\[", line):
            p.error(f"--syncd-config-extra adds keys to [download], not a table header: {line!r}")
    return args


def compile_syncd() -> None:
    """Bring the byte code of this Python's ``syncd`` package up to date, untimed: with
    ``PYTHONDONTWRITEBYTECODE`` set (as on some build machines) a stale ``.pyc`` would be recompiled in
    every timed run (about 0.1 s per edited module)."""
    spec = importlib.util.find_spec("syncd")
    if spec is None or not spec.submodule_search_locations:
        return
    for where in spec.submodule_search_locations:
        argv = [sys.executable, "-m", "compileall", "-q", where]
        subprocess.run(argv, check=False, stdout=subprocess.DEVNULL)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.syncd:
        SYNCD_OVERRIDE[:] = [args.syncd]
    SYNCD_CONFIG_EXTRA[:] = args.config_extra
    missing = [
        t for t in args.tool_names if t != "syncd" and not shutil.which("aria2c" if t == "aria2c" else "curl")
    ]
    for needed in ("nginx", "git", "xargs", "sha256sum"):
        if not shutil.which(needed) and not Path(f"/usr/sbin/{needed}").exists():
            missing.append(needed)
    if missing:
        say(f"missing tools: {', '.join(missing)}")
        return 2
    tools = [t for t in TOOLS if t in args.tool_names]
    compile_syncd()
    cases = scaled_cases(args.case_names, args.scale, args.capped_rate)
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="syncd-bench-", dir=args.workdir))
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "repeat": args.repeat,
        "scale": args.scale,
        "concurrency": CONCURRENCY,
        "syncd_config_extra": SYNCD_CONFIG_EXTRA,
        "capped_rate": args.capped_rate,
        "rss_target_mib": RSS_TARGET_MIB,
        "notes": NOTES,
        "hashlib_sha256": None,
        "cases": [],
    }
    if not Path(TIME_BIN).exists():
        report["notes"] += (
            f" {TIME_BIN} was missing (Debian package 'time'): peak RSS came from os.wait4 and includes"
            " this script's own RSS at fork time, so it is only an upper bound."
        )
        say(f"warning: {TIME_BIN} missing (apt-get install time); peak RSS figures are upper bounds")
    say(f"workdir {work}; tools {', '.join(tools)}; repeat {args.repeat}; scale {args.scale:g}")
    if SYNCD_CONFIG_EXTRA:
        say(f"syncd [download] extra: {'; '.join(SYNCD_CONFIG_EXTRA)}")
    hash_mb_s = None
    if not args.no_hash:
        say(f"hashing {human(HASH_BYTES)} in memory with hashlib.sha256, {HASH_RUNS} times ...")
        report["hashlib_sha256"] = hashlib_speed()
        hash_mb_s = report["hashlib_sha256"]["mb_per_s"]
        say(f"hashlib.sha256: {hash_mb_s:.1f} MB/s (runs {report['hashlib_sha256']['runs_s']} s)")
    nginx = capped = None
    try:
        nginx = start_nginx(work / "nginx")
        say(f"nginx pid {nginx.pid} on {nginx.base_url}")
        if any(c.spec.capped for c in cases):
            # its own nginx with the cap, serving the same files: its root is a symlink to the first root
            (work / "nginx-capped").mkdir()
            (work / "nginx-capped" / "root").symlink_to(nginx.root, target_is_directory=True)
            capped = start_nginx(work / "nginx-capped", limit_rate=args.capped_rate)
            say(f"nginx (limit_rate {args.capped_rate}) pid {capped.pid} on {capped.base_url}")
        seeds = {name: i for i, name in enumerate(dict.fromkeys(s.data for s in CASES.values()))}
        written: dict[str, list[File]] = {}
        for index, case in enumerate(cases):
            if case.data in written:
                case.files = list(written[case.data])
                say(f"[{case.name}] reusing the {case.data} files")
            else:
                say(f"[{case.name}] writing {case.description} ...")
                t0 = time.perf_counter()
                write_files(nginx.root, case, seeds[case.data])
                written[case.data] = list(case.files)
                say(f"[{case.name}] wrote {human(case.total)} in {time.perf_counter() - t0:.1f}s")
            server = capped if case.spec.capped else nginx
            assert server is not None
            limit = args.capped_rate if case.spec.capped else None
            runner = Runner(case, server, work / "cases" / case.name, url_prefix="", nginx_limit_rate=limit)
            load = loadavg()
            samples: dict[str, list[Sample]] = {t: [] for t in tools}
            for run_no in range(1, args.repeat + 1):
                for tool in tools:
                    s = runner.run(tool, run_no)
                    runner.cleanup(tool)
                    samples[tool].append(s)
                    extra = f", pass {s.extra['pass_s']}s" if "pass_s" in s.extra else ""
                    say(
                        f"[{case.name}] run {run_no} {tool:<6} {s.wall:8.2f}s  "
                        f"{case.total / s.wall / 1e6:8.1f} MB/s  "
                        f"rss {s.maxrss_kib / KiB:7.1f} MiB  cpu {s.cpu:6.2f}s  nginx {s.server_cpu:5.2f}s  "
                        f"other {s.other_cpu:5.2f}s{extra}"
                    )
            runner.purge()
            summary = summarize(case, runner, samples, hash_mb_s, load)
            report["cases"].append(summary)
            print(table(summary) + "\n", flush=True)
            if all(later.data != case.data for later in cases[index + 1 :]):
                shutil.rmtree(nginx.root / case.data, ignore_errors=True)  # free the disk for the next case
        print(targets_table(report) + "\n", flush=True)
        print(report["notes"], flush=True)
        m = report["machine"]
        print(
            f"Machine: {m['nproc']} CPU(s) {m['cpu']}, {m['mem_gib']} GiB RAM, kernel {m['kernel']}; "
            f"{m['syncd']} ({m['syncd_command']}; checkout {m['source_tree']}), {m['aria2c']}, "
            f"{m['curl'].split(' (')[0]}, {m['nginx']}; {report['date']}",
            flush=True,
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            say(f"wrote {args.json}")
    finally:
        if capped is not None:
            capped.stop()
        if nginx is not None:
            nginx.stop()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
