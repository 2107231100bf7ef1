"""Chaos: SIGKILL ``syncd sync`` and ``syncd run`` at random moments, dozens of times, while manifests change
and files are deleted by hand; at no moment is a partial or unverified file at a dest, and a final pass
converges to the exact export.

Seeded and bounded; the defaults take about half a minute. Environment knobs for a longer run:
``SYNCD_CHAOS_SEED`` (1234), ``SYNCD_CHAOS_ASSETS`` (300), ``SYNCD_CHAOS_KILLS`` (30) and
``SYNCD_CHAOS_WALL_S`` (300: the hard wall-clock bound of the whole test; the kill loop stops at 60 % of
it). The seed is printed, and added to the failure, so that a failing schedule can be replayed.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harness import World, syncd_command

pytestmark = pytest.mark.e2e

SEED = int(os.environ.get("SYNCD_CHAOS_SEED", "1234"))
ASSETS = int(os.environ.get("SYNCD_CHAOS_ASSETS", "300"))
KILLS = int(os.environ.get("SYNCD_CHAOS_KILLS", "30"))
WALL_S = float(os.environ.get("SYNCD_CHAOS_WALL_S", "300"))
KNOBS = f"SYNCD_CHAOS_SEED={SEED} SYNCD_CHAOS_ASSETS={ASSETS} SYNCD_CHAOS_KILLS={KILLS}"
MIN_SIZE, MAX_SIZE = 1024, 2 << 20  # files of 1 MiB and more are segmented (segment_min_size below)
PER_MANIFEST = 20  # assets per manifest file
DAEMON_EVERY = 5  # every 5th kill hits a ``syncd run`` instead of a ``syncd sync``


def file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Chaos:
    """The world, what its manifests ever asked for, and the syncd processes started on it."""

    def __init__(self, world: World, rng: random.Random, logs: Path) -> None:
        self.world = world
        self.rng = rng
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.current: dict[str, list[dict[str, Any]]] = {}  # manifest path -> entries at the branch head
        self.ever: dict[str, dict[str, Any]] = {}  # dest -> entry, for every dest ever committed
        self.removed: set[str] = set()  # dests dropped from the manifests (never reused)
        self.pending: list[list[dict[str, Any]]] = []  # manifests not committed yet
        self.verified: dict[str, tuple[int, int, int]] = {}  # dest -> (ino, mtime_ns, size) seen exact
        self.kills = {"sync": 0, "run": 0, "finished": 0}
        self.phases: dict[str, int] = {}  # the last event logged before each kill: where kills landed
        self.commits = 0
        self.deleted: set[str] = set()  # dests removed by hand and not back yet

    # the world ---------------------------------------------------------------------------------
    def make_assets(self, count: int) -> None:
        """``count`` blobs, sizes uniform in 1 KiB..2 MiB, grouped PER_MANIFEST to a manifest."""
        entries = []
        for i in range(count):
            size = self.rng.randint(MIN_SIZE, MAX_SIZE)
            entry = self.world.asset(f"c{i:04d}.bin", size, seed=SEED * 100_003 + i)
            entries.append({**entry, "dest": f"chaos/g{i // PER_MANIFEST:02d}/c{i:04d}.bin"})
        self.pending = [entries[i : i + PER_MANIFEST] for i in range(0, count, PER_MANIFEST)]

    def add_manifest(self) -> None:
        group = self.pending.pop(0)
        name = f"{group[0]['dest'].split('/')[1]}.toml"  # one file per group, never reused
        self.current[name] = group
        self.ever.update({e["dest"]: e for e in group})
        self.world.manifest(name, *group)

    def commit(self) -> None:
        """One random change to the manifests: add a file, remove a file, or drop one entry."""
        choice = self.rng.choices(["add", "remove", "drop"], weights=[5, 2, 3])[0]
        if choice == "add" and self.pending:
            self.add_manifest()
        elif choice == "remove" and len(self.current) > 2:
            name = self.rng.choice(sorted(self.current))
            self.removed |= {e["dest"] for e in self.current.pop(name)}
            self.world.repo.remove(f"assets/{name}")
        else:
            name = self.rng.choice(sorted(self.current))
            entries = self.current[name]
            if len(entries) < 2:
                return
            gone = entries.pop(self.rng.randrange(len(entries)))
            self.removed.add(gone["dest"])
            self.world.manifest(name, *entries)
        self.world.repo.commit(f"chaos {choice}")
        self.commits += 1

    def delete_by_hand(self) -> None:
        """An operator removes a few published files: the next pass must bring them back."""
        present = sorted(d for d in self.wanted() if (self.world.export / d).exists())
        for dest in self.rng.sample(present, min(len(present), self.rng.randint(1, 30))):
            (self.world.export / dest).unlink()
            self.deleted.add(dest)

    def wanted(self) -> dict[str, dict[str, Any]]:
        return {e["dest"]: e for entries in self.current.values() for e in entries}

    # processes ---------------------------------------------------------------------------------
    def spawn(self, command: str, n: int) -> tuple[subprocess.Popen[bytes], Path]:
        log = self.logs / f"{n:03d}-{command}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("SYNCD_CONFIG", "NOTIFY_SOCKET")}
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [syncd_command(), command, "-c", str(self.world.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=fh,
                env=env,
            )
        self.procs.append(proc)
        return proc, log

    def kill_at_random(self, n: int, deadline: float) -> None:
        """Start syncd (every DAEMON_EVERY-th a daemon), let it work a random while, SIGKILL it by PID.

        The moment is drawn from one of three windows so that every phase gets hit: 0-0.5 s after the
        start (interpreter start-up, first clone, fetch); 0-0.5 s after git was fetched (a daemon: 0-2.5 s,
        across passes); or 0-0.1 s after the k-th ``asset_published`` (k in 1..5: between a download, its
        rename and its ledger row)."""
        command = "run" if n % DAEMON_EVERY == DAEMON_EVERY - 1 else "sync"
        proc, log = self.spawn(command, n)
        window = self.rng.choices(["start", "fetched", "published"], weights=[2, 4, 4])[0]
        if command == "run" and window == "published":
            window = "fetched"
        marker, count, pause = {
            "start": (b"", 0, 0.5),
            "fetched": (b'"git_fetched"', 1, 2.5 if command == "run" else 0.5),
            "published": (b'"asset_published"', self.rng.randint(1, 5), 0.1),
        }[window]
        until = min(time.monotonic() + 15, deadline)
        while count and time.monotonic() < until and proc.poll() is None:
            if log.read_bytes().count(marker) >= count:
                break
            time.sleep(0.005)
        time.sleep(self.rng.uniform(0, pause))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            self.kills[command] += 1
            events = re.findall(rb'"event": "(\w+)"', log.read_bytes())
            last = f"{command}:{events[-1].decode() if events else 'start-up'}"
            self.phases[last] = self.phases.get(last, 0) + 1
        else:
            self.kills["finished"] += 1
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)

    # invariants --------------------------------------------------------------------------------
    def check_export(self) -> None:
        """Every file under the export is a dest that was asked for, read-only, byte for byte."""
        export = self.world.export
        for dirpath, dirnames, filenames in os.walk(export):
            dirnames[:] = [d for d in dirnames if d != ".syncd-staging"]
            for name in filenames:
                if dirpath == str(export) and name == ".syncd.lock":
                    continue  # the export lock: syncd's own, not a dest
                path = Path(dirpath, name)
                dest = path.relative_to(export).as_posix()
                assert dest in self.ever, f"{dest} is under the export but was never in a manifest"
                st = path.lstat()
                assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444, (dest, st)
                key = (st.st_ino, st.st_mtime_ns, st.st_size)
                if self.verified.get(dest) != key:
                    entry = self.ever[dest]
                    assert st.st_size == entry["size"], f"partial file at {dest}: {st.st_size} bytes"
                    assert file_sha(path) == entry["sha256"], f"unverified bytes at {dest}"
                    self.verified[dest] = key

    def ledger(self) -> dict[str, tuple[Any, ...]]:
        path = self.world.state / "ledger.sqlite3"
        if not path.exists():
            return {}
        db = sqlite3.connect(path)
        try:
            return {r[0]: r for r in db.execute("SELECT * FROM published")}
        finally:
            db.close()

    def check_ledger(self) -> None:
        """Every row of ``published`` is a file at its dest with that sha256 (it was fsynced first), unless
        the file was deleted by hand and has not come back yet."""
        for dest, row in self.ledger().items():
            path = self.world.export / dest
            if dest in self.deleted and not path.exists():
                continue
            self.deleted.discard(dest)
            assert path.is_file(), f"the ledger says {dest} is published but it is missing"
            assert row[1] == self.ever[dest]["sha256"] and file_sha(path) == row[1], row


@contextmanager
def seed_on_failure() -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        exc.add_note(f"reproduce with {KNOBS}")
        raise


@pytest.mark.timeout(WALL_S)
def test_sigkill_at_random_moments_converges(world: World, tmp_path: Path) -> None:
    """Dozens of SIGKILLs of sync and run at random moments (commits and deletions by hand in between)
    never leave a partial or foreign file at a dest nor a ledger row without its file; a final sync
    converges: every dest exact and 0444, staging empty, the ledger true, a further sync publishes nothing."""
    print(f"syncd chaos: {KNOBS}")
    started = time.monotonic()
    loop_deadline = started + WALL_S * 0.6  # leave time for the final passes and the checks
    logs = tmp_path / "logs"
    logs.mkdir()
    # Files of 1 MiB and more come in segments, the rest through group commit: both paths get killed.
    world.write_config(schedule={"interval": "1s", "jitter": 0}, download={"segment_min_size": "1MiB"})
    chaos = Chaos(world, random.Random(SEED), logs)  # noqa: S311 - a seeded schedule, not crypto
    with seed_on_failure():
        try:
            chaos.make_assets(ASSETS)
            for _ in range(max(1, len(chaos.pending) // 2)):
                chaos.add_manifest()
            world.repo.commit("chaos: initial manifests")
            n = 0
            while chaos.kills["sync"] + chaos.kills["run"] < KILLS and n < 3 * KILLS:
                if time.monotonic() > loop_deadline:
                    print(f"syncd chaos: wall-clock budget reached after {n} processes")
                    break
                chaos.kill_at_random(n, loop_deadline)
                n += 1
                chaos.check_export()
                chaos.check_ledger()
                if chaos.rng.random() < 0.3:
                    chaos.commit()
                if chaos.rng.random() < 0.5:
                    chaos.delete_by_hand()
        finally:
            chaos.stop_all()
        print(
            f"syncd chaos: kills {chaos.kills}, {chaos.commits} commits, {len(chaos.deleted)} files deleted "
            f"by hand still missing, {time.monotonic() - started:.1f}s"
        )
        print(f"syncd chaos: last event before each kill {dict(sorted(chaos.phases.items()))}")

        remaining = max(10.0, WALL_S - (time.monotonic() - started) - 5)
        run = world.sync(timeout=remaining)
        assert run.code == 0, f"final sync failed:\n{run.err[-5000:]}"
        wanted = chaos.wanted()
        for dest, entry in wanted.items():
            path = world.export / dest
            assert file_sha(path) == entry["sha256"], dest
            assert stat.S_IMODE(path.lstat().st_mode) == 0o444, dest
        chaos.check_export()  # nothing but dests ever asked for, each exact (orphans stay)
        assert world.staging_files() == []
        rows = chaos.ledger()
        assert set(wanted) <= set(rows)
        for dest, row in rows.items():
            assert (row[8] is None) == (dest in wanted), f"orphaned_at wrong for {dest}: {row}"
            if dest in wanted:
                assert row[1] == wanted[dest]["sha256"]
        chaos.check_ledger()
        assert not chaos.removed & set(wanted)

        again = world.sync(timeout=60)
        assert again.code == 0, again.err
        assert again.named("asset_published") == [] and again.named("asset_adopted") == []
        assert again.one("pass_finished")["skipped"] == len(wanted)
        print(f"syncd chaos: converged in {time.monotonic() - started:.1f}s")
