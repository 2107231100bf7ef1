"""End to end, under strace: every published file's bytes were flushed (its own fdatasync, or a group's
syncfs that came after its last write) before the link that makes it visible at its dest."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness import World, syncd_command

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (scripts/setup installs it)"),
]

_CALL = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\((.*?)(?:<unfinished \.\.\.>|\)\s+=))(.*)$")


def flush_violations(trace: str) -> tuple[list[str], dict[str, int]]:
    """Links of a /proc/self/fd/N whose file N was written after its last flush (fdatasync(N), or a
    completed syncfs), and a count of the calls seen. Calls split by strace -f into "<unfinished ...>"
    and "<... resumed>" count when they complete (writes: when they start, to be strict)."""
    dirty: set[int] = set()
    started: dict[tuple[str, str], str] = {}  # (pid, call) -> args, for calls not finished yet
    bad: list[str] = []
    seen = {"syncfs": 0, "fdatasync": 0, "link": 0}
    for line in trace.splitlines():
        m = _CALL.match(line)
        if m is None:
            continue
        pid, resumed, name, args = m.group(1), m.group(2), m.group(3), m.group(4)
        if resumed:
            name, args = resumed, started.pop((pid, resumed), "")
            done = True
        else:
            done = "<unfinished ...>" not in line
            if not done:
                started[(pid, name)] = args or ""
        args = args or ""
        if name in ("write", "pwrite64") and args.split(",")[0].strip().isdigit():
            dirty.add(int(args.split(",")[0]))
        elif name == "fdatasync" and done:
            seen["fdatasync"] += 1
            dirty.discard(int(args.split(",")[0].strip()))
        elif name == "syncfs" and done:
            seen["syncfs"] += 1
            dirty.clear()
        elif name == "linkat" and done and "/proc/self/fd/" in args:
            seen["link"] += 1
            fd = int(re.search(r"/proc/self/fd/(\d+)", args).group(1))  # type: ignore[union-attr]
            if fd in dirty:
                bad.append(line)
    return bad, seen


def test_every_file_is_flushed_before_it_becomes_visible(world: World, tmp_path: Path) -> None:
    """120 small files (group commit) and two bigger ones (their own fdatasync): no link of a file
    whose bytes were not flushed after its last write; the group flush is in use."""
    entries = [
        {**world.asset(f"s{i:03d}.bin", 1024 + 97 * i, seed=i), "dest": f"small/s{i:03d}.bin"}
        for i in range(120)
    ]
    entries += [
        {**world.asset(f"b{i}.bin", (5 << 20) + i, seed=500 + i), "dest": f"big/b{i}.bin"} for i in range(2)
    ]
    world.manifest("m.toml", *entries)
    world.repo.commit("add files")
    trace = tmp_path / "trace.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("SYNCD_CONFIG", "NOTIFY_SOCKET")}
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-o",
            str(trace),
            "-e",
            "trace=write,pwrite64,fdatasync,syncfs,linkat",
            syncd_command(),
            "sync",
            "-c",
            str(world.config_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(world.export_files()) == 122
    bad, seen = flush_violations(trace.read_text())
    assert bad == [], bad[:5]
    assert seen["link"] == 122
    assert seen["syncfs"] >= 1
    assert seen["fdatasync"] >= 2


def test_checker_sees_an_unflushed_link() -> None:
    """The strace reader itself: a write after the last flush, then a link, is reported."""
    trace = "\n".join(
        [
            '10 pwrite64(7, "x", 1, 0) = 1',
            "10 syncfs(5) = 0",
            '11 write(7, "y", 1 <unfinished ...>',
            "11 <... write resumed>) = 1",
            '10 linkat(AT_FDCWD, "/proc/self/fd/7", 9, "a", AT_SYMLINK_FOLLOW) = 0',
            '10 pwrite64(8, "x", 1, 0) = 1',
            "10 fdatasync(8 <unfinished ...>",
            "10 <... fdatasync resumed>) = 0",
            '10 linkat(AT_FDCWD, "/proc/self/fd/8", 9, "b", AT_SYMLINK_FOLLOW) = 0',
        ]
    )
    bad, seen = flush_violations(trace)
    assert len(bad) == 1 and "/proc/self/fd/7" in bad[0]
    assert seen == {"syncfs": 1, "fdatasync": 1, "link": 2}
