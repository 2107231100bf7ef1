#!/usr/bin/env python3
"""Benchmark ``syncd sync`` at the scale of a big export: many small assets in many manifest files.

Default: 100,000 assets of 1 KiB in 1,000 manifest files (100 assets each). One run of this script:

1. writes the files (deterministic bytes) under a temporary directory and serves them from a real nginx on
   127.0.0.1 (``tests/servers.py``'s ``start_nginx``, its bearer-token location);
2. builds a ``file://`` manifest repository (``tests/servers.py``'s ``GitRepo``, ``--per-manifest`` assets per
   file under ``assets/``) and a syncd configuration (``bench_sync.py``'s, concurrency 4) with
   ``[metrics] textfile`` set, so every pass also writes the node_exporter textfile;
3. ``--repeat`` rounds, each of them timing (wall clock here, peak RSS and CPU from GNU ``/usr/bin/time``'s
   ``%M``, as ``bench_sync.py`` does):

   a. **first**: ``syncd sync -c CONFIG`` into an empty export and an empty state directory (clone, parse
      every manifest, download and publish every asset);
   b. **no-change**: ``syncd sync -c CONFIG`` again, no new commit: everything is already published;
   c. **one-changed**: a new commit that adds one asset (a new 1 KiB file) to one manifest file, then
      ``syncd sync -c CONFIG``: one manifest changed, one download;
   d. **status**: ``syncd status --json -c CONFIG`` after those passes;

   and checks, untimed, what each pass did (its ``pass_finished`` event: ``published`` = every asset, 0,
   1) and, after the first pass, every exported file's size and sha256;
4. the metrics: they have no per-asset label (docs/monitoring.md), and ``syncd sync`` writes them only as
   the ``[metrics] textfile`` at the end of each pass (``GET /metrics`` is only served by ``syncd run``'s
   HTTP listener), so their cost is inside the pass figures; separately, ``Metrics.write_textfile()`` is
   timed in a fresh Python (median of 200 writes) and the textfile's size reported;
5. prints the medians beside the targets (no-change pass <= 2 s and <= 150 MiB; one-changed pass <= 1.5 x
   the no-change pass), the date, the commit and the machine's load; ``--json PATH`` writes the same.

``--profile DIR`` adds one more round, not counted in the figures, with each of the three passes run under
``py-spy record --rate 200 --format raw`` (flamegraph.pl's collapsed stacks: one line per stack with its
sample count), written to ``DIR/scale-prof-{first,nochange,onechanged}.txt``.

``--assets 2000`` is a smoke run (well under a minute). The full default run writes 100,000 small files twice
(served and exported: about 800 MB of disk in 4 KiB blocks) and its first pass takes minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import bench_sync  # noqa: E402  (also puts tests/ on sys.path)
from bench_sync import (  # noqa: E402
    TIME_BIN,
    File,
    KiB,
    Sample,
    fresh_dir,
    machine,
    machine_busy_s,
    server_cpu_s,
    syncd_command,
    toml_str,
    verify_output,
)

from servers import GitRepo, Nginx, start_nginx  # noqa: E402

REPO_ROOT = BENCH_DIR.parent
PASSES = ("first", "nochange", "onechanged")
TARGET_NOCHANGE_S = 2.0
TARGET_NOCHANGE_RSS_MIB = 150.0
TARGET_ONECHANGED_RATIO = 1.5
PREFIX = "scale"  # served under nginx root/scale/..., exported at the same dest


# --------------------------------------------------------------------------- data


def file_bytes(block: bytes, i: int) -> bytes:
    """Asset ``i``'s bytes: a shared random block with ``i`` stamped at its start (no two assets equal)."""
    stamp = struct.pack("<QQ", 0x5CA1E, i)
    return (stamp + block[len(stamp) :])[: len(block)] if len(block) > len(stamp) else stamp[: len(block)]


def rel_path(i: int, per_manifest: int) -> str:
    return f"{PREFIX}/m{i // per_manifest:05}/f{i:07}.bin"


def write_asset(root: Path, block: bytes, i: int, rel: str) -> File:
    data = file_bytes(block, i)
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return File(rel, len(data), hashlib.sha256(data).hexdigest())


def asset_table(f: File) -> str:
    return (
        f"[[asset]]\nsource = {toml_str(f.rel)}\nsha256 = {toml_str(f.sha256)}\n"
        f"size = {f.size}\ndest = {toml_str(f.rel)}\n"
    )


CONCURRENCY = 4  # as bench_sync.py and tests/harness.py


def write_config(base: Path, repo: GitRepo, nginx: Nginx, export: Path, state: Path, textfile: Path) -> Path:
    """bench_sync.py's syncd config (concurrency 4, timeout 60s) plus ``[metrics] textfile``."""
    etc = base / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    token = etc / "artifactory.token"
    token.write_text(nginx.token + "\n")
    token.chmod(0o600)
    config = etc / "syncd.conf"
    config.write_text(
        f"""[source]
url = {toml_str(repo.url)}
branch = "main"
path = "assets"

[artifactory]
url = {toml_str(nginx.bearer_url())}
token_file = "artifactory.token"

[export]
root = {toml_str(str(export))}

[download]
concurrency = {CONCURRENCY}
timeout = "60s"

[state]
directory = {toml_str(str(state))}

[metrics]
textfile = {toml_str(str(textfile))}
"""
    )
    return config


@dataclass
class World:
    """The served files, the manifest repo and the config; ``manifests[k]`` = the files of manifest k."""

    base: Path
    nginx: Nginx
    repo: GitRepo
    config: Path
    export: Path
    state: Path
    textfile: Path
    block: bytes
    per_manifest: int
    manifests: list[list[File]] = field(default_factory=list)
    next_index: int = 0  # the next asset number (added assets get numbers above the initial ones)

    @property
    def files(self) -> list[File]:
        return [f for m in self.manifests for f in m]

    def manifest_path(self, k: int) -> str:
        return f"assets/{PREFIX}-{k:05}.toml"

    def write_manifest(self, k: int) -> None:
        self.repo.write(self.manifest_path(k), "\n".join(asset_table(f) for f in self.manifests[k]))

    def change_one_manifest(self, round_no: int) -> str:
        """A new commit that adds one new asset (a new served file) to one manifest file."""
        k = (round_no * 7919) % len(self.manifests)  # a different manifest each round
        i = self.next_index
        self.next_index += 1
        rel = f"{PREFIX}/m{k:05}/added-{i:07}.bin"  # beside the manifest's other files
        self.manifests[k].append(write_asset(self.nginx.root, self.block, i, rel))
        self.write_manifest(k)
        return str(self.repo.commit(f"bench: add {rel} to {self.manifest_path(k)}"))


def build_world(base: Path, nginx: Nginx, assets: int, per_manifest: int, size: int, seed: int) -> World:
    block = random.Random(seed).randbytes(size)  # noqa: S311 - benchmark data, not crypto
    repo = GitRepo(base / "git" / "manifests.git", base / "git" / "manifests-work")
    export, state = base / "export", base / "state"
    textfile = base / "metrics" / "syncd.prom"
    textfile.parent.mkdir(parents=True, exist_ok=True)
    config = write_config(base, repo, nginx, export, state, textfile)
    world = World(base, nginx, repo, config, export, state, textfile, block, per_manifest)
    for i in range(assets):
        if i % per_manifest == 0:
            world.manifests.append([])
        world.manifests[-1].append(write_asset(nginx.root, block, i, rel_path(i, per_manifest)))
    world.next_index = assets
    for k in range(len(world.manifests)):
        world.write_manifest(k)
    repo.commit(f"bench: {assets} assets of {size} B in {len(world.manifests)} manifest files")
    return world


# --------------------------------------------------------------------------- measuring


def measure(argv: list[str], *, log: Path, server_pid: int, ok_codes: tuple[int, ...] = (0,)) -> Sample:
    """``bench_sync.measure`` (wall here; peak RSS and CPU from GNU time's wait4), accepting ``ok_codes``
    (``syncd status`` exits 1 or 3 for a degraded or stale export) and keeping the exit code."""
    env = {k: v for k, v in os.environ.items() if k != "SYNCD_CONFIG"}
    usage_file = log.with_suffix(".rusage")
    have_time = Path(TIME_BIN).exists()
    wrapped = [TIME_BIN, "-o", str(usage_file), "-f", "%M %U %S", *argv] if have_time else argv
    with open(log, "wb") as out:
        busy0, server0 = machine_busy_s(), server_cpu_s(server_pid)
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapped, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        busy, server = machine_busy_s() - busy0, server_cpu_s(server_pid) - server0
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    if rc not in ok_codes:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(argv)} exited with {rc}; log {log}:\n{tail}")
    if have_time:
        rss_text, user, system = usage_file.read_text().split("\n")[-2].split()
        maxrss, cpu = int(rss_text), float(user) + float(system)
    else:
        maxrss, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
    sample = Sample(wall, maxrss, cpu, server, max(0.0, busy - cpu - server))
    sample.extra["rc"] = rc
    return sample


def pass_finished(log: Path) -> dict[str, Any]:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and event.get("event") == "pass_finished":
            return event
    raise RuntimeError(f"no pass_finished event in {log}")


class Runner:
    def __init__(self, world: World, logs: Path, profile_dir: Path | None = None) -> None:
        self.world = world
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.profile_dir = profile_dir

    def argv(self, *args: str, profile: str | None = None) -> list[str]:
        cmd = [syncd_command(), *args, "-c", str(self.world.config)]
        if profile is None:
            return cmd
        assert self.profile_dir is not None
        out = self.profile_dir / f"scale-prof-{profile}.txt"
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        spy = [py_spy, "record", "--rate", "200", "--format", "raw", "--nonblocking", "-o", str(out)]
        return [*spy, "--", *cmd]

    def sync(self, name: str, round_no: int, expect_published: int, profile: bool = False) -> Sample:
        os.sync()  # flush earlier runs' dirty pages, untimed
        log = self.logs / f"{name}-{round_no}.log"
        s = measure(
            self.argv("sync", profile=name if profile else None), log=log, server_pid=self.world.nginx.pid
        )
        event = pass_finished(log)
        s.extra.update(
            pass_s=event.get("duration_s"),
            published=event.get("published"),
            skipped=event.get("skipped"),
            ok=event.get("ok"),
        )
        if event.get("published") != expect_published or not event.get("ok"):
            raise RuntimeError(
                f"{name} pass {round_no}: published {event.get('published')} (expected {expect_published}),"
                f" ok {event.get('ok')}; log {log}"
            )
        return s

    def status(self, round_no: int) -> Sample:
        log = self.logs / f"status-{round_no}.log"
        argv = self.argv("status", "--json")
        s = measure(argv, log=log, server_pid=self.world.nginx.pid, ok_codes=(0, 1, 3))
        text = log.read_text(errors="replace")
        try:  # the JSON object (pretty-printed) on stdout; a warning line may precede it on stderr
            s.extra["state"] = json.loads(text[text.index("{\n") :]).get("state")
        except (ValueError, AttributeError):
            s.extra["state"] = None
        return s

    def round(self, round_no: int, *, profile: bool = False, verify: bool = True) -> dict[str, Sample]:
        w = self.world
        fresh_dir(w.export)
        fresh_dir(w.state)
        out: dict[str, Sample] = {}
        total = sum(len(m) for m in w.manifests)
        out["first"] = self.sync("first", round_no, total, profile)
        say(f"  round {round_no} first      {fmt(out['first'])}")
        if verify:
            t0 = time.perf_counter()
            problems = verify_output(w.export, w.files)
            if problems:
                raise RuntimeError(f"first pass: wrong export ({len(problems)}): {'; '.join(problems[:5])}")
            took = time.perf_counter() - t0
            say(f"  round {round_no} verified {total} exported files byte-exact ({took:.1f}s)")
        out["nochange"] = self.sync("nochange", round_no, 0, profile)
        say(f"  round {round_no} no-change  {fmt(out['nochange'])}")
        w.change_one_manifest(round_no)
        out["onechanged"] = self.sync("onechanged", round_no, 1, profile)
        say(f"  round {round_no} one-change {fmt(out['onechanged'])}")
        if not profile:
            out["status"] = self.status(round_no)
            state = out["status"].extra.get("state")
            say(f"  round {round_no} status     {fmt(out['status'])}  state {state}")
        return out


def time_textfile_write(textfile: Path, n: int = 200) -> dict[str, Any]:
    """``Metrics.write_textfile()`` n times in a fresh Python (the venv's), seeded like a daemon."""
    code = f"""
import json, time, statistics
from pathlib import Path
from syncd.metrics import Metrics
m = Metrics(Path({str(textfile)!r}))
m.seed({{"downloads_ok": 100000, "downloaded_bytes": 102400000}}, "2026-01-01T00:00:00+00:00", "0" * 40)
t = []
for _ in range({n}):
    t0 = time.perf_counter(); m.write_textfile(); t.append(time.perf_counter() - t0)
print(json.dumps({{"median_ms": round(statistics.median(t) * 1e3, 3), "max_ms": round(max(t) * 1e3, 3)}}))
"""
    py = Path(syncd_command()).parent / "python"
    python = str(py if py.exists() else sys.executable)
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-500:]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["textfile_bytes"] = textfile.stat().st_size if textfile.exists() else None
    result["writes"] = n
    return result


# --------------------------------------------------------------------------- reporting


def fmt(s: Sample) -> str:
    extra = f"  pass {s.extra['pass_s']}s" if s.extra.get("pass_s") is not None else ""
    return (
        f"{s.wall:8.2f}s  rss {s.maxrss_kib / KiB:7.1f} MiB  cpu {s.cpu:6.2f}s  nginx {s.server_cpu:5.2f}s  "
        f"other {s.other_cpu:5.2f}s{extra}"
    )


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def head_commit() -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


LABELS = {
    "first": "first pass (empty export+state)",
    "nochange": "no-change pass",
    "onechanged": "one-changed-manifest pass",
    "status": "syncd status --json",
}


def summarize(rounds: list[dict[str, Sample]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in (*PASSES, "status"):
        ss = [r[key] for r in rounds if key in r]
        if not ss:
            continue
        out[key] = {
            "label": LABELS[key],
            "runs_s": [round(s.wall, 3) for s in ss],
            "median_s": round(statistics.median(s.wall for s in ss), 3),
            "median_rss_mib": round(statistics.median(s.maxrss_kib for s in ss) / KiB, 1),
            "max_rss_mib": round(max(s.maxrss_kib for s in ss) / KiB, 1),
            "median_cpu_s": round(statistics.median(s.cpu for s in ss), 2),
            "median_nginx_cpu_s": round(statistics.median(s.server_cpu for s in ss), 2),
            "other_cpu_s": [round(s.other_cpu, 2) for s in ss],
            "pass_s": [s.extra.get("pass_s") for s in ss],
            **({"state": ss[-1].extra.get("state")} if key == "status" else {}),
        }
    return out


def targets(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    nc, oc = summary["nochange"], summary["onechanged"]
    ratio = oc["median_s"] / nc["median_s"] if nc["median_s"] else float("inf")
    return {
        "nochange_s": {
            "value": nc["median_s"],
            "target": f"<= {TARGET_NOCHANGE_S} s",
            "met": nc["median_s"] <= TARGET_NOCHANGE_S,
        },
        "nochange_rss_mib": {
            "value": nc["median_rss_mib"],
            "target": f"<= {TARGET_NOCHANGE_RSS_MIB} MiB",
            "met": nc["median_rss_mib"] <= TARGET_NOCHANGE_RSS_MIB,
        },
        "onechanged_vs_nochange": {
            "value": round(ratio, 2),
            "target": f"<= {TARGET_ONECHANGED_RATIO} x",
            "met": ratio <= TARGET_ONECHANGED_RATIO,
        },
    }


def table(report: dict[str, Any]) -> str:
    s, t = report["results"], report["targets"]
    head = (
        f"{'measure':<34} {'median s':>9} {'RSS MiB':>8} {'CPU s':>7} {'other CPU s':>12}  "
        f"{'target':<24} runs s"
    )
    lines = [
        f"== {report['assets']:,} assets of {report['asset_size']} B in {report['manifests']:,} manifest "
        f"files ({report['per_manifest']} per file), repeat {report['repeat']}",
        head,
        "-" * len(head),
    ]
    marks = {
        "nochange": f"{'ok' if t['nochange_s']['met'] else 'MISS'} <=2s, "
        f"{'ok' if t['nochange_rss_mib']['met'] else 'MISS'} <=150MiB",
        "onechanged": f"{'ok' if t['onechanged_vs_nochange']['met'] else 'MISS'} "
        f"{t['onechanged_vs_nochange']['value']:.2f}x (<=1.5x)",
    }
    for key, r in s.items():
        runs = ", ".join(f"{x:.2f}" for x in r["runs_s"])
        lines.append(
            f"{r['label']:<34} {r['median_s']:>9.2f} {r['median_rss_mib']:>8.1f} {r['median_cpu_s']:>7.2f} "
            f"{max(r['other_cpu_s']):>12.2f}  {marks.get(key, ''):<24} {runs}"
        )
    m = report["metrics_textfile"]
    if "error" in m:
        lines.append(f"metrics textfile write: error {m['error']}")
    else:
        lines.append(
            f"metrics: [metrics] textfile written at the end of every pass above ({m['textfile_bytes']} B, "
            f"no per-asset label); Metrics.write_textfile() alone: median {m['median_ms']} ms over "
            f"{m['writes']} writes"
        )
    return "\n".join(lines)


NOTES = (
    "Wall: fork to exit of the command, median of the rounds; RSS: peak (GNU time %M), median of the rounds; "
    "CPU: user+sys of syncd and its children (git). other CPU s: the most CPU time the rest of the machine "
    "(neither syncd nor nginx) used during a run, from /proc/stat. Each round: empty export and state, first "
    "pass, no-change pass (no new commit), a commit adding one asset to one manifest file and its pass, then "
    "syncd status --json. sync(2) before each pass, untimed; page cache warm."
)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", type=int, default=100_000, help="number of assets (default 100000)")
    p.add_argument("--per-manifest", type=int, default=100, help="assets per manifest file (default 100)")
    p.add_argument("--size", type=int, default=KiB, help="bytes per asset (default 1024)")
    p.add_argument("--repeat", type=int, default=3, help="rounds (median reported; default 3)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where the temporary directory goes")
    p.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    p.add_argument("--no-verify", action="store_true", help="skip the untimed byte-exact check of the export")
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="one more round under py-spy record (rate 200, raw): DIR/scale-prof-PASS.txt",
    )
    p.add_argument("--syncd", metavar="CMD", help="the syncd to time (default: the one next to this Python)")
    args = p.parse_args(argv)
    if args.assets < 1 or args.per_manifest < 1 or args.repeat < 1 or args.size < 1:
        p.error("--assets, --per-manifest, --size and --repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.syncd:
        bench_sync.SYNCD_OVERRIDE[:] = [args.syncd]
    for needed in ("nginx", "git", "htpasswd"):
        if not shutil.which(needed) and not Path(f"/usr/sbin/{needed}").exists():
            say(f"missing tool: {needed}")
            return 2
    if not Path(TIME_BIN).exists():
        say(f"warning: {TIME_BIN} missing (apt-get install time); peak RSS figures are upper bounds")
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="syncd-bench-scale-", dir=args.workdir))
    manifests = -(-args.assets // args.per_manifest)
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": head_commit(),
        "machine": machine(),
        "assets": args.assets,
        "per_manifest": args.per_manifest,
        "manifests": manifests,
        "asset_size": args.size,
        "repeat": args.repeat,
        "notes": NOTES,
    }
    say(f"workdir {work}; {args.assets} assets, {manifests} manifests; repeat {args.repeat}")
    nginx = None
    try:
        nginx = start_nginx(work / "nginx")
        say(f"nginx pid {nginx.pid} on {nginx.base_url}")
        t0 = time.perf_counter()
        world = build_world(work / "world", nginx, args.assets, args.per_manifest, args.size, seed=1)
        took = time.perf_counter() - t0
        say(f"wrote {args.assets} files and {manifests} manifests, committed, in {took:.1f}s")
        runner = Runner(world, work / "logs", args.profile)
        rounds = []
        for round_no in range(1, args.repeat + 1):
            rounds.append(runner.round(round_no, verify=not args.no_verify))
        report["metrics_textfile"] = time_textfile_write(world.textfile)
        report["results"] = summarize(rounds)
        report["targets"] = targets(report["results"])
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            say(f"profiling round (py-spy record --rate 200 --format raw) into {args.profile}")
            prof = runner.round(args.repeat + 1, profile=True, verify=False)
            # wall only: under py-spy, GNU time's %M is not syncd's (py-spy does not always wait for it)
            report["profile_round"] = {
                k: {
                    "wall_s_under_py_spy": round(s.wall, 3),
                    "file": str(args.profile / f"scale-prof-{k}.txt"),
                }
                for k, s in prof.items()
            }
        report["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
        print(table(report), flush=True)
        print(NOTES, flush=True)
        m = report["machine"]
        print(
            f"Date {report['date']}; commit {report['commit']} (checkout {m['source_tree']}); "
            f"{m['nproc']} CPU(s) {m['cpu']}, {m['mem_gib']} GiB RAM, kernel {m['kernel']}, Python "
            f"{m['python']}, {m['nginx']}; {m['syncd']} ({m['syncd_command']}); "
            f"loadavg at start {' '.join(m['loadavg_at_start'])}, "
            f"at end {' '.join(report['loadavg_at_end'])}",
            flush=True,
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n")
            say(f"wrote {args.json}")
    finally:
        if nginx is not None:
            nginx.stop()
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
