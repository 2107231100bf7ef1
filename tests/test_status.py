"""``syncd status`` end to end: the installed command against real git and nginx, beside a real daemon;
and the daemon's ``/healthz`` and ``/trigger``."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import Run, World
from servers import free_port
from test_daemon import Daemon

pytestmark = pytest.mark.e2e


@pytest.fixture
def daemon(world: World, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start ``syncd run`` on the world (stopped by PID at the end)."""
    started: list[Daemon] = []

    def start(**env: str) -> Daemon:
        started.append(Daemon(world, tmp_path, env))
        return started[-1]

    yield start
    for d in started:
        d.close()


def status(world: World, *args: str) -> Run:
    return world.run("status", "-c", str(world.config_path), *args)


def as_json(run: Run) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(run.out)
    return data


def snapshot(d: Path) -> dict[str, tuple[int, int, int, int, int]]:
    """Every name under ``d`` with its size, mtime, mode and owner: what 'leaves no trace' compares. The
    mtime of an existing ``-shm`` is left out: it is SQLite's shared-memory index, in which every reader of
    a WAL database (status too) takes its read lock."""
    out = {}
    for p in sorted(d.rglob("*")):
        st = p.lstat()
        mtime = 0 if p.name.endswith("-shm") else st.st_mtime_ns
        out[str(p.relative_to(d))] = (st.st_size, mtime, st.st_mode, st.st_uid, st.st_gid)
    return out


def two_good(world: World) -> str:
    for i in range(2):
        a = world.asset(f"{i}.bin", 3000 + i, seed=i)
        world.manifest(f"m{i}.toml", {**a, "dest": f"w/{i}.bin"})
    return world.repo.commit("two")


def test_never_ran_is_stale_and_creates_nothing(world: World) -> None:
    """Before any pass: exit 3, 'stale: syncd never ran', and no state directory appears."""
    run = status(world)
    assert run.code == 3, run.err
    assert run.out.startswith("stale: syncd never ran: no state directory")
    assert not world.state.exists()
    data = as_json(status(world, "--json"))
    assert data["state"] == "stale" and data["last_pass"] is None and data["synced_commit"] is None
    assert not world.state.exists()


def test_in_sync_is_one_line_and_exit_0(world: World) -> None:
    """After a good pass: one headline with commit, age, count and size; --json has the schema's fields."""
    commit = two_good(world)
    assert world.sync().code == 0
    run = status(world)
    assert run.code == 0, run.out + run.err
    assert run.out.strip() == f"in sync at {commit[:7]} (just now) · 2 assets · 5.9 KiB"
    data = as_json(status(world, "--json"))
    assert data["state"] == "ok"
    assert data["synced_commit"] == data["head_commit"] == commit
    assert data["last_pass"]["ok"] is True and data["last_pass"]["commit"] == commit
    assert data["last_pass"]["finished_at"] == data["last_success_at"]
    assert data["counts"] == {
        "published": 2,
        "pending": 0,
        "failing": 0,
        "refused": 0,
        "orphaned": 0,
        "deferred": 0,
        "invalid_manifests": 0,
    }
    assert data["failing"] == data["invalid_manifests"] == []


def test_a_sick_export_lists_every_problem_with_what_to_do(world: World) -> None:
    """Failing, refused and invalid each get a line naming the dest or file; exit 1; --json lists them
    with dest, source, attempts, error and since; nothing shows the Artifactory token."""
    two_good(world)
    world.manifest(
        "missing.toml", {"source": f"{world.tag}/nope.bin", "sha256": "0" * 64, "size": 9, "dest": "x/m"}
    )
    c = world.asset("c.bin", 500, seed=3)
    (world.export / "f").mkdir()
    (world.export / "f" / "c.bin").write_bytes(b"foreign")
    world.manifest("foreign.toml", {**c, "dest": "f/c.bin"})
    world.repo.write("assets/bad.toml", "[[asset]]\nsource = 1\n")
    commit = world.repo.commit("sick")
    assert world.sync().code == 1
    assert world.sync().code == 1  # attempts count passes
    run = status(world)
    assert run.code == 1
    lines = run.out.splitlines()
    assert lines[0] == f"3 problems at {commit[:7]} (last pass just now) · 2 assets · 5.9 KiB"
    assert any(
        line.startswith("  failing  x/m: 2 attempt(s) since ") and "HTTP 404" in line for line in lines
    )
    assert any(line.startswith("  refused  f/c.bin: a different file is at dest") for line in lines)
    assert any(line.startswith("  invalid  assets/bad.toml: ") and "syncd validate" in line for line in lines)
    assert "  no pass has succeeded yet" in lines
    data = as_json(status(world, "--json"))
    assert data["state"] == "degraded"
    (failing,) = data["failing"]
    assert failing["dest"] == "x/m" and failing["source"] == f"{world.tag}/nope.bin"
    assert failing["attempts"] == 2 and "HTTP 404" in failing["error"] and failing["since"].endswith("+00:00")
    assert [r["dest"] for r in data["refused"]] == ["f/c.bin"]
    assert data["invalid_manifests"][0]["path"] == "assets/bad.toml"
    assert len(data["invalid_manifests"][0]["problems"]) == 4
    assert (data["counts"]["failing"], data["counts"]["refused"], data["counts"]["invalid_manifests"]) == (
        1,
        1,
        1,
    )
    assert world.nginx.token not in run.out + json.dumps(data)


def test_dry_run_with_pending_downloads_is_not_ok(world: World) -> None:
    """A dry run that would download says ok: false (and pending) in pass_finished, but exits 0; it records
    no pass for status."""
    two_good(world)
    run = world.sync("--dry-run")
    assert run.code == 0
    finished = run.one("pass_finished")
    assert finished["ok"] is False and finished["pending"] == 2 and finished["dry_run"] is True
    assert status(world).code == 3  # a dry run is not a pass that happened


def test_status_leaves_no_trace_beside_a_running_daemon(world: World, daemon: Callable[..., Daemon]) -> None:
    """While the daemon holds the lock (and the ledger's -wal/-shm exist), status answers, reports the
    daemon's pid and next poll, and changes nothing in the state directory."""
    two_good(world)
    world.write_config(schedule={"interval": "1h"})
    d = daemon()
    d.wait_event("pass_finished")
    time.sleep(0.3)  # let the pass thread record the schedule
    before = snapshot(world.state)
    assert any(name.endswith("-wal") for name in before)
    run = status(world, "--json")
    assert run.code == 0, run.out + run.err
    data = as_json(run)
    assert data["daemon"]["pid"] == d.proc.pid and data["daemon"]["running"] is True
    assert data["daemon"]["next_poll_at"]
    for _ in range(3):
        assert status(world).code == 0
    assert snapshot(world.state) == before
    assert d.stop() == 0


def _get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=5)


def test_a_stopped_daemon_turns_stale_and_healthz_503(world: World, daemon: Callable[..., Daemon]) -> None:
    """SIGSTOP past [status] stale_after: status exits 3 'stale: no pass finished for …'; after SIGCONT
    (no pass due for an hour) /healthz answers 503 with the status object; before it, 200."""
    two_good(world)
    port = free_port()
    world.write_config(
        schedule={"interval": "1h"}, status={"stale_after": "3s"}, http={"listen": f"127.0.0.1:{port}"}
    )
    d = daemon()
    d.wait_event("pass_finished")
    healthy = _get(f"http://127.0.0.1:{port}/healthz")
    assert healthy.status_code == 200 and healthy.json()["state"] == "ok"
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(3.5)
        run = status(world)
        assert run.code == 3 and run.out.startswith("stale: no pass finished for"), run.out
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    stale = _get(f"http://127.0.0.1:{port}/healthz")
    assert stale.status_code == 503 and stale.json()["state"] == "stale"
    assert stale.headers["content-type"].startswith("application/json")
    assert d.stop() == 0


def test_trigger_starts_a_pass_with_a_good_signature_only(
    world: World, daemon: Callable[..., Daemon]
) -> None:
    """POST /trigger with GitHub's HMAC or GitLab's token starts a pass at once (interval 1h); a wrong one
    is 403 and starts nothing."""
    two_good(world)
    port = free_port()
    secret = world.config_path.parent / "trigger.secret"
    secret.write_text("hook-s3cret\n")
    secret.chmod(0o600)
    world.write_config(
        schedule={"interval": "1h"},
        http={"listen": f"127.0.0.1:{port}", "trigger_secret_file": "trigger.secret"},
    )
    d = daemon()
    d.wait_event("pass_finished")
    url = f"http://127.0.0.1:{port}/trigger"
    body = b'{"ref": "refs/heads/main"}'
    bad = httpx.post(url, content=body, headers={"X-Hub-Signature-256": "sha256=" + "0" * 64}, timeout=5)
    assert bad.status_code == 403
    time.sleep(1)
    assert len(d.named("pass_finished")) == 1
    sig = "sha256=" + hmac.new(b"hook-s3cret", body, hashlib.sha256).hexdigest()
    good = httpx.post(url, content=body, headers={"X-Hub-Signature-256": sig}, timeout=5)
    assert good.status_code == 202, good.text
    d.wait_event("pass_finished", count=2)
    token = httpx.post(url, headers={"X-Gitlab-Token": "hook-s3cret"}, timeout=5)
    assert token.status_code == 202
    d.wait_event("pass_finished", count=3)
    requested = d.named("pass_requested")
    assert [e["by"] for e in requested] == ["POST /trigger", "POST /trigger"]
    assert "hook-s3cret" not in json.dumps(d.events)
    assert d.stop() == 0


def _edit(path: Path, *sql: str) -> None:
    import sqlite3

    db = sqlite3.connect(path)
    with db:
        for statement in sql:
            db.execute(statement)
    db.close()


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        ("empty file", 2),
        ("garbage bytes", 2),
        ("naive finished_at", 0),
        ("summary of the wrong types", 0),
        ("summary not JSON", 0),
    ],
)
def test_a_damaged_ledger_is_a_clear_answer_never_a_traceback(world: World, damage: str, code: int) -> None:
    """status on a damaged ledger says what it can (a time without a zone is UTC, odd summary values count
    as nothing) or exits 2 with our words and, with --json, {"state": "unknown", "error": …}."""
    two_good(world)
    assert world.sync().code == 0
    ledger = world.state / "ledger.sqlite3"
    if damage == "empty file":
        ledger.write_bytes(b"")
    elif damage == "garbage bytes":
        ledger.write_bytes(b"\x00not a database" * 100)
    elif damage == "naive finished_at":
        _edit(ledger, "UPDATE passes SET finished_at = strftime('%Y-%m-%dT%H:%M:%S', 'now')")
    elif damage == "summary of the wrong types":
        _edit(ledger, """UPDATE passes SET summary = '{"state": {"published": "x"}, "pending_dests": 5}'""")
    else:
        _edit(ledger, "UPDATE passes SET summary = '{not json'")
    for args in ((), ("--json",)):
        run = status(world, *args)
        assert "Traceback" not in run.err and run.code == code, (damage, run.out, run.err)
        if args and code == 2:
            assert as_json(run)["state"] == "unknown" and str(ledger) in as_json(run)["error"]
        elif args:
            assert as_json(run)["state"] in ("ok", "degraded")
