"""Two syncd instances with separate state directories on ONE export (an HA pair set up by mistake, or
``syncd sync -c other.conf`` run by hand): one publishes at a time, the other is refused with a clear
LockHeldError, and nothing partial or unverified is ever visible at a dest, checked by a watcher thread
that keeps reading every dest while both run."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import sqlite3
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from harness import World, parse_events, syncd_command
from servers import FaultServer
from syncd.publish import staging_name

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def second_config(world: World, name: str = "b") -> tuple[Path, Path]:
    """A config like ``world``'s (same export, repo and Artifactory) with its own state directory."""
    state = world.base / f"state-{name}"
    path = world.config_path.with_name(f"syncd-{name}.conf")
    path.write_text(world.config_path.read_text().replace(str(world.state), str(state)))
    return path, state


def ledger(state: Path) -> dict[str, str]:
    """dest → sha256 of the ``published`` rows in the ledger under ``state``."""
    db = sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        return {r[0]: r[1] for r in db.execute("SELECT dest, sha256 FROM published")}
    finally:
        db.close()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Watcher(threading.Thread):
    """Reads every dest over and over; records any file at a dest that is not exactly the manifest's."""

    def __init__(self, export: Path, entries: dict[str, dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.export = export
        self.entries = entries  # grows as commits add assets; read under the GIL
        self.stop = threading.Event()
        self.bad: list[str] = []
        self.complete_reads = 0

    def run(self) -> None:
        deadline = time.monotonic() + 120  # bounded even if stop() is never called
        while not self.stop.is_set() and time.monotonic() < deadline:
            for dest, entry in list(self.entries.items()):
                self.check(dest, entry)
            time.sleep(0.005)

    def check(self, dest: str, entry: dict[str, Any]) -> None:
        try:
            fd = os.open(self.export / dest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return
        except OSError as exc:
            self.bad.append(f"{dest}: cannot open: {exc!r}")
            return
        try:
            st = os.fstat(fd)
            digest, size = hashlib.sha256(), 0
            while chunk := os.read(fd, MiB):
                digest.update(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if (digest.hexdigest(), size) != (entry["sha256"], entry["size"]):
            self.bad.append(f"{dest}: {size} bytes, sha256 {digest.hexdigest()} (want {entry['size']})")
        elif stat.S_IMODE(st.st_mode) != 0o444:
            self.bad.append(f"{dest}: verified bytes but mode {stat.S_IMODE(st.st_mode):o}")
        else:
            self.complete_reads += 1


class Instance:
    """A ``syncd run`` with its JSON log collected from stderr."""

    def __init__(self, config: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self.proc = subprocess.Popen(
            [syncd_command(), "run", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k not in ("SYNCD_CONFIG", "NOTIFY_SOCKET")},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.events.append(json.loads(line))  # every line must be a JSON event

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("event") == event]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        return code


def wait_until(what: str, check: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_daemons_on_one_export_never_expose_a_partial_file(world: World) -> None:
    """Two `syncd run` on one export (separate state dirs, 200 ms interval) through two commits of a few
    MiB each: a watcher reading every dest never sees a partial, unverified or writable file; passes that
    find the export locked fail with LockHeldError only (no asset fails); afterwards every dest is
    byte-exact, staging is empty and both ledgers agree with the export."""
    world.write_config(schedule={"interval": "200ms", "jitter": 0})
    config_b, state_b = second_config(world)
    entries: dict[str, dict[str, Any]] = {}
    first = [
        {**world.asset(f"a{i}.bin", 2 * MiB + i, seed=100 + i), "dest": f"set/a{i}.bin"} for i in range(6)
    ]
    world.manifest("one.toml", *first)
    world.repo.commit("first six")
    entries.update({e["dest"]: e for e in first})

    watcher = Watcher(world.export, entries)
    watcher.start()
    a, b = Instance(world.config_path), Instance(config_b)
    try:
        wait_until(
            "both instances to finish a good pass",
            lambda: all(any(e.get("ok") for e in i.named("pass_finished")) for i in (a, b)),
        )
        second = [
            {**world.asset(f"b{i}.bin", 3 * MiB - i, seed=200 + i), "dest": f"more/b{i}.bin"}
            for i in range(6)
        ]
        world.manifest("two.toml", *second)
        world.repo.commit("six more")
        entries.update({e["dest"]: e for e in second})
        wait_until(
            "every dest of the second commit", lambda: all((world.export / d).exists() for d in entries)
        )
        wait_until(
            "both ledgers to know every dest",
            lambda: all(set(ledger(s)) == set(entries) for s in (world.state, state_b)),
        )
    finally:
        codes = [i.stop() for i in (a, b)]
        watcher.stop.set()
        watcher.join(timeout=30)
    assert codes == [0, 0]
    assert watcher.bad == []
    assert watcher.complete_reads > 0
    for inst in (a, b):
        assert {e.get("error_type") for e in inst.named("pass_failed")} <= {"LockHeldError"}
        for e in inst.named("pass_failed"):
            assert str(world.export) in e["error"] and "another syncd" in e["error"]
        assert inst.named("asset_failed") == [] and inst.named("asset_refused") == []
        assert inst.named("internal_error") == []
    for dest, entry in entries.items():
        p = world.export / dest
        assert sha(p) == entry["sha256"] and p.stat().st_size == entry["size"]
        assert stat.S_IMODE(p.lstat().st_mode) == 0o444 and p.lstat().st_nlink == 1
    for state in (world.state, state_b):
        assert ledger(state) == {d: e["sha256"] for d, e in entries.items()}
    names = set(world.staging_files())
    stems = {staging_name(d) for d in entries}
    assert {n.partition(".")[0] for n in names} <= stems  # at most resumable partials of wanted dests
    assert all(n.endswith((".part", ".meta")) for n in names)


def test_second_sync_is_refused_while_the_export_is_locked(world: World) -> None:
    """While another process holds <export>/.syncd.lock, `syncd sync` with another state directory exits
    1 with one command_failed (LockHeldError naming the export and the holder's pid) and creates nothing
    in the export; a dry run beside it still plans; once released, the sync lands everything."""
    config_b, _ = second_config(world)
    entry = {**world.asset("x.bin", MiB, seed=7), "dest": "x.bin"}
    world.manifest("m.toml", entry)
    world.repo.commit("one")
    fd = os.open(world.export / ".syncd.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, b"4242\n")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = sorted(os.listdir(world.export))
        for config in (world.config_path, config_b):
            run = world.run("sync", "-c", str(config))
            assert run.code == 1, run.err
            ev = run.one("command_failed")
            assert ev["error_type"] == "LockHeldError"
            assert str(world.export) in ev["error"] and "pid 4242" in ev["error"]
            assert run.named("asset_published") == []
        assert sorted(os.listdir(world.export)) == before == [".syncd.lock"]
        dry = world.run("sync", "-c", str(config_b), "--dry-run")
        assert dry.code == 0, dry.err
        assert "download  x.bin" in dry.out
        assert sorted(os.listdir(world.export)) == before
    finally:
        os.close(fd)
    run = world.sync()
    assert run.code == 0, run.err
    assert sha(world.export / "x.bin") == entry["sha256"]
    assert world.staging_files() == []


def test_lock_is_released_after_each_pass(world: World) -> None:
    """Two `syncd sync` runs one after the other with different state directories both succeed: the lock
    is held for a pass, not for ever; the second adopts what the first published."""
    config_b, state_b = second_config(world)
    entry = {**world.asset("y.bin", MiB, seed=8), "dest": "d/y.bin"}
    world.manifest("m.toml", entry)
    world.repo.commit("one")
    assert world.sync().code == 0
    run = world.run("sync", "-c", str(config_b))
    assert run.code == 0, run.err
    assert run.one("asset_adopted")["dest"] == "d/y.bin"
    assert ledger(state_b) == {"d/y.bin": entry["sha256"]}
    raw = parse_events(run.err)
    assert all(e.get("event") != "command_failed" for e in raw)


def test_two_syncs_started_together_during_slow_downloads(world: World, fault_server: FaultServer) -> None:
    """Two `syncd sync` (separate state dirs) started together while downloads drip in slowly (so they
    surely overlap): one publishes, the other exits 1 with one command_failed LockHeldError; the watcher
    never sees a partial file; the refused one's next sync adopts everything."""
    sources = {}
    entries = []
    for i in range(4):
        entry = {**world.asset(f"s{i}.bin", MiB + i, seed=300 + i), "dest": f"slow/s{i}.bin"}
        sources[entry["source"]] = (world.blobs / f"s{i}.bin").read_bytes()
        fault_server.route(f"/art/{entry['source']}", body=sources[entry["source"]], drip=(128 << 10, 0.05))
        entries.append(entry)
    world.extra_config["artifactory"] = {"url": f"{fault_server.url}/art"}
    world.write_config(download={"concurrency": 2, "timeout": "10s"})
    config_b, state_b = second_config(world)
    world.manifest("m.toml", *entries)
    world.repo.commit("slow")
    watcher = Watcher(world.export, {e["dest"]: e for e in entries})
    watcher.start()
    env = {k: v for k, v in os.environ.items() if k != "SYNCD_CONFIG"}
    procs = [
        subprocess.Popen(
            [syncd_command(), "sync", "-c", str(c)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for c in (world.config_path, config_b)
    ]
    try:
        outs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        watcher.stop.set()
        watcher.join(timeout=30)
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outs
    refused = parse_events(outs[codes.index(1)])
    failed = [e for e in refused if e.get("event") == "command_failed"]
    assert len(failed) == 1 and failed[0]["error_type"] == "LockHeldError", refused
    assert [e for e in refused if e.get("event") == "asset_published"] == []
    assert watcher.bad == []
    for e in entries:
        assert sha(world.export / e["dest"]) == e["sha256"]
    assert world.staging_files() == []
    again = world.run("sync", "-c", str((world.config_path, config_b)[codes.index(1)]))
    assert again.code == 0, again.err
    assert len(again.named("asset_adopted")) == 4
    for state in (world.state, state_b):
        assert ledger(state) == {e["dest"]: e["sha256"] for e in entries}


@pytest.mark.parametrize("shared", ["configured", "first_default"])
def test_two_exports_sharing_one_staging_never_expose_a_partial_file(
    world: World, fault_server: FaultServer, shared: str
) -> None:
    """Two `syncd sync` on two exports (own state dirs) sharing one staging directory (one configured
    for both, or the second naming the first's default), the second's server ignoring Range, downloads
    dripping so they overlap: watchers reading every dest of both exports never see a partial or wrong
    file; the second is refused (exit 1, LockHeldError naming staging) or lands after the first; a rerun
    of a refused one lands byte-exact; no dest is linked into both exports."""
    export2 = world.base / "export2"
    export2.mkdir()
    staging = world.base / "stg" if shared == "configured" else world.export / ".syncd-staging"
    entries = []
    for i in range(2):
        entry = {**world.asset(f"s{i}.bin", 3 * MiB + i, seed=400 + i), "dest": f"d/s{i}.bin"}
        body = (world.blobs / f"s{i}.bin").read_bytes()
        fault_server.route(f"/a/{entry['source']}", body=body, drip=(256 << 10, 0.05))
        fault_server.route(f"/b/{entry['source']}", body=body, drip=(128 << 10, 0.05), ranges=False)
        entries.append(entry)
    world.manifest("m.toml", *entries)
    world.repo.commit("shared staging")
    config_b = world.config_path.with_name("syncd-b.conf")
    world.extra_config["artifactory"] = {"url": f"{fault_server.url}/b"}
    world.write_config(
        export={"root": str(export2), "staging": str(staging)},
        state={"directory": str(world.base / "state-b")},
        download={"concurrency": 2, "timeout": "10s"},
    )
    config_b.write_text(world.config_path.read_text())
    world.extra_config["artifactory"] = {"url": f"{fault_server.url}/a"}
    export_a = {"staging": str(staging)} if shared == "configured" else {}
    world.write_config(export=export_a, download={"concurrency": 2, "timeout": "10s"})
    wanted = {e["dest"]: e for e in entries}
    watchers = [Watcher(world.export, wanted), Watcher(export2, wanted)]
    for w in watchers:
        w.start()
    env = {k: v for k, v in os.environ.items() if k != "SYNCD_CONFIG"}
    procs: list[subprocess.Popen[str]] = []
    try:
        for config in (world.config_path, config_b):
            procs.append(
                subprocess.Popen(
                    [syncd_command(), "sync", "-c", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )
            time.sleep(0.4)  # the first is mid-download when the second starts
        outs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for w in watchers:
            w.stop.set()
            w.join(timeout=30)
    assert procs[0].returncode == 0, outs[0]
    assert all(w.bad == [] for w in watchers), [w.bad for w in watchers]
    if procs[1].returncode == 1:
        refused = parse_events(outs[1])
        failed = [e for e in refused if e.get("event") == "command_failed"]
        assert len(failed) == 1 and failed[0]["error_type"] == "LockHeldError", refused
        assert f"staging directory {staging}" in failed[0]["error"] and "pid " in failed[0]["error"]
        assert [e for e in refused if e.get("event") == "asset_published"] == []
        again = world.run("sync", "-c", str(config_b))
        assert again.code == 0, again.err
    else:
        assert procs[1].returncode == 0, outs[1]
    for dest, entry in wanted.items():
        a, b = world.export / dest, export2 / dest
        assert sha(a) == entry["sha256"] and sha(b) == entry["sha256"]
        assert os.stat(a).st_ino != os.stat(b).st_ino
        assert a.stat().st_nlink == 1 and b.stat().st_nlink == 1
        assert stat.S_IMODE(a.stat().st_mode) == stat.S_IMODE(b.stat().st_mode) == 0o444
    assert {n for n in os.listdir(staging) if not n.startswith(".syncd-staging")} == set()


def test_a_pass_by_the_same_process_leaves_the_lock_files_untouched(world: World) -> None:
    """A daemon's second pass with nothing to do rewrites neither <export>/.syncd.lock nor staging's lock
    file: mtime, ctime and bytes stay as the first pass left them."""
    entry = {**world.asset("z.bin", 64 << 10, seed=9), "dest": "z.bin"}
    world.manifest("m.toml", entry)
    world.repo.commit("one")
    world.write_config(schedule={"interval": "300ms", "jitter": 0})
    locks = (world.export / ".syncd.lock", world.export / ".syncd-staging" / ".syncd-staging.lock")
    inst = Instance(world.config_path)
    try:
        wait_until("a first good pass", lambda: any(e.get("ok") for e in inst.named("pass_finished")))
        first = [(p.stat().st_mtime_ns, p.stat().st_ctime_ns, p.read_bytes()) for p in locks]
        wait_until("two more passes", lambda: len(inst.named("pass_finished")) >= 3)
        after = [(p.stat().st_mtime_ns, p.stat().st_ctime_ns, p.read_bytes()) for p in locks]
    finally:
        code = inst.stop()
    assert code == 0
    assert after == first
    assert first[0][2] == f"{inst.proc.pid}\n".encode()
