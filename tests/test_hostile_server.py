"""syncd sync end to end against a hostile Artifactory: a raw HTTP server (tests/hostile.py) that answers
one asset with a generated behaviour (any status, malformed or duplicated headers, odd redirects, slow or
endless heads, endless 1xx, cut, long, short or wrong bodies, abused chunked framing) and two assets
correctly.

Property, for every behaviour: the pass ends within a bound with exit 0 or 1; the two good assets land
byte-exact; the hostile one lands byte-exact or fails alone with exactly one asset_failed (or
asset_refused) naming its dest; the token appears nowhere (stdout, stderr, any file in the state
directory or the export); every file at a dest has the manifest's sha256; the ledger's published table
agrees with the export; the other host a redirect points to never receives the token.

``SYNCD_SOAK=N`` runs N times more examples.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import secrets
import shutil
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from harness import Run, examples, manifest_text, parse_events, syncd_command, to_toml
from hostile import HostileServer, Reply
from servers import GitRepo, free_port

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TOKEN = "hostile-" + secrets.token_hex(12)
PASS_BOUND = 30.0  # seconds one `syncd sync` may take, whatever the server does
HOSTILE = "h/hostile.bin"
GOOD = ("g/one.bin", "g/two.bin")


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311 (test data, not secrets)


@dataclass
class Stage:
    """The fixed world every example runs in; ``reset()`` empties the export and state between runs."""

    base: Path
    art: HostileServer
    other: HostileServer
    bodies: dict[str, bytes]
    config: Path
    export: Path
    state: Path
    closed_port: int

    def reset(self) -> None:
        for path in (self.export, self.state):
            if path.exists():
                for dirpath, dirnames, _ in os.walk(path):
                    for d in dirnames:
                        os.chmod(os.path.join(dirpath, d), 0o700)
                shutil.rmtree(path)
        self.export.mkdir()
        self.art.reset()
        self.other.reset()

    def sync(self, timeout: float = 90) -> tuple[Run, float]:
        started = time.monotonic()
        proc = subprocess.run(
            [syncd_command(), "sync", "-c", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
            env={k: v for k, v in os.environ.items() if k != "SYNCD_CONFIG"},
        )
        took = time.monotonic() - started
        return Run(proc.returncode, proc.stdout, proc.stderr, parse_events(proc.stderr)), took


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    base = tmp_path_factory.mktemp("hostile")
    bodies = {HOSTILE: blob(40_000, 1), GOOD[0]: blob(30_000, 2), GOOD[1]: blob(70_000, 3)}
    with HostileServer() as art, HostileServer() as other:
        repo = GitRepo(base / "remote" / "manifests.git", base / "work" / "manifests")
        assets = []
        for dest, body in bodies.items():
            art.good(f"/art/{dest}", body)
            assets.append(
                {"source": dest, "sha256": hashlib.sha256(body).hexdigest(), "size": len(body), "dest": dest}
            )
        art.good(f"/good/{HOSTILE}", bodies[HOSTILE])
        other.good(f"/blob/{HOSTILE}", bodies[HOSTILE])
        repo.write("assets/m.toml", manifest_text(*assets))
        repo.commit("three assets")
        etc = base / "etc"
        etc.mkdir()
        (etc / "token").write_text(TOKEN + "\n")
        (etc / "token").chmod(0o600)
        export, state = base / "export", base / "state"
        cfg = {
            "source": {"url": repo.url, "branch": "main", "path": "assets"},
            "artifactory": {"url": f"{art.url}/art", "token_file": "token"},
            "export": {"root": str(export)},
            "download": {
                "concurrency": 3,
                "timeout": "2s",
                "retries": 2,
                "backoff": "0.1s",
                "backoff_max": "0.5s",
            },
            "state": {"directory": str(state)},
        }
        config = etc / "syncd.conf"
        config.write_text(to_toml(cfg))
        yield Stage(base, art, other, bodies, config, export, state, free_port())


# behaviours --------------------------------------------------------------------------------------


def values(stage_ports: tuple[int, int]) -> dict[bytes, st.SearchStrategy[bytes]]:
    """Per header, the values a hostile server might send: valid ones, near misses and garbage."""
    other, closed = stage_ports
    size = 40_000
    sha = hashlib.sha256(blob(size, 1)).hexdigest().encode()
    tok = TOKEN.encode()
    garbage = st.one_of(
        st.sampled_from(
            [b"", b" ", tok, b"Bearer " + tok, "é\u202e".encode(), b"\x1b[31m", b"a\x00b", b"x" * 9000]
        ),
        st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    )
    dates = st.sampled_from(
        [
            b"Wed, 02 Dec 2099 00:00:00 -0000",
            b"Wed, 02 Dec 2020 00:00:00 GMT",
            b"Xyz, 99 Foo 0 99:99:99 +99999",
        ]
    )
    pools: dict[bytes, list[bytes]] = {
        b"Content-Length": [
            str(size).encode(),
            b"0",
            b"1",
            str(size + 1).encode(),
            b"-1",
            b"99999999999999999999",
        ],
        b"Content-Range": [
            f"bytes 0-{size - 1}/{size}".encode(),
            b"bytes 0-99/100",
            b"bytes */40000",
            f"bytes 100-{size - 1}/*".encode(),
        ],
        b"Location": [
            f"/art/{HOSTILE}".encode(),
            f"/good/{HOSTILE}".encode(),
            f"http://127.0.0.1:{other}/blob/{HOSTILE}?sig=".encode() + tok,
            b"http://u:" + tok + f"@127.0.0.1:{other}/blob/{HOSTILE}".encode(),
            f"//127.0.0.1:{other}/blob/{HOSTILE}".encode(),
            b"http://127.0.0.1:99999/x",
            f"http://127.0.0.1:{closed}/x".encode(),
            b"ftp://127.0.0.1/x",
            b"file:///etc/passwd",
            b"http://[::zz/",
            "/ü/x".encode(),
        ],
        b"ETag": [b'"v1"', b'W/"v1"', '"é"'.encode(), b'"' + tok + b'"'],
        b"Last-Modified": [b"Wed, 02 Dec 2020 00:00:00 GMT"],
        b"Content-Encoding": [b"gzip", b"identity", b"br", b"gzip, gzip", b"x-evil"],
        b"Retry-After": [b"0", b"1", b"99999999", b"-1", b"1.5"],
        b"X-Checksum-Sha256": [sha, sha.upper(), b"f" * 64, b"zz" * 32, tok],
        b"Transfer-Encoding": [b"chunked", b"gzip, chunked", b"identity", b"chunked, chunked"],
        b"Date": [],
    }
    out = {}
    for name, pool in pools.items():
        options = [st.sampled_from(pool)] if pool else []
        if name in (b"Date", b"Retry-After", b"Last-Modified"):
            options.append(dates)
        # valid-looking values three times as often as garbage: most answers should get past h11
        out[name] = st.one_of(*options, *options, *options, garbage)
    return out


STATUSES = [b"200"] * 20 + [
    b"206",
    b"301",
    b"302",
    b"303",
    b"307",
    b"308",
    b"304",
    b"404",
    b"416",
    b"429",
    b"500",
    b"503",
    b"999",
    b"100",
    b"101",
    b"2000",
    b"abc",
    b"",
]
REASONS = [b"OK"] * 6 + [b"", TOKEN.encode(), b"\x1b[2J\x1b[31mred", "é\u2028".encode(), b"x" * 300]


@st.composite
def reply(draw: st.DrawFn, ports: tuple[int, int]) -> Reply:
    """One hostile answer."""
    good = blob(40_000, 1)
    pools = values(ports)
    names = st.sampled_from(sorted(pools))
    headers = [(n, draw(pools[n])) for n in draw(st.lists(names, max_size=3))]
    body_kind = draw(st.sampled_from(["good"] * 4 + ["cut", "long", "short", "wrong", "empty", "gzip"]))
    body = {
        "good": good,
        "cut": good,
        "long": good + b"extra" * 100,
        "short": good[:1000],
        "wrong": bytes(len(good)),
        "empty": b"",
        "gzip": gzip.compress(good),
    }[body_kind]
    slow = draw(st.sampled_from(["none"] * 5 + ["head", "body", "trickle", "framing", "endless_1xx"]))
    r = Reply(
        status=draw(st.sampled_from(STATUSES)),
        reason=draw(st.sampled_from(REASONS)),
        headers=headers,
        body=body,
        framing=draw(st.sampled_from(["length", "length", "chunked", "close"])),
        informational=draw(st.integers(0, 3)),
        cut_at=draw(st.integers(0, len(good) - 1)) if body_kind == "cut" else None,
        chunk_size=draw(st.sampled_from([1, 100, 4096, 65536])),
        chunk_ext=draw(st.sampled_from([b"", b";a=b", b";" + b"x" * 500, b"\x00"])),
        trailers=draw(
            st.lists(st.sampled_from([b"X-T: 1", b"bad trailer", b"ETag: " + TOKEN.encode()]), max_size=3)
        ),
    )
    if slow == "head":
        r.headers += [(b"X-Filler", b"1")] * 12
        r.line_delay = 0.3
    elif slow == "body":
        r.chunk_size, r.body_delay = 100, 0.3  # ~330 B/s: under the 1 KiB/s bound
    elif slow == "trickle":
        r.chunk_size, r.body_delay = 4096, 0.2  # ~20 KiB/s: slow but acceptable
    elif slow == "framing":
        r.framing, r.trailers, r.framing_delay = "chunked", [b"X-T: 1"] * 40, 0.2
    elif slow == "endless_1xx":
        r.endless_1xx = True
    if draw(st.integers(0, 19)) == 0:
        r.raw = draw(
            st.sampled_from([b"", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\n", b"\x16\x03\x01\x02\x00"])
        )
    return r


def behaviours(ports: tuple[int, int]) -> st.SearchStrategy[list[Reply]]:
    """What the server answers to the 1st, 2nd, 3rd... request for the hostile asset (last repeats)."""
    later = st.one_of(reply(ports), st.just(Reply(body=blob(40_000, 1))))  # a retry may get a good answer
    return st.tuples(reply(ports), st.lists(later, max_size=2)).map(lambda t: [t[0], *t[1]])


# checks ------------------------------------------------------------------------------------------


def files_under(root: Path) -> Iterator[Path]:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            yield Path(dirpath) / name


def check_pass(stage: Stage, run: Run, took: float) -> None:
    """Every promise of one pass against the hostile server (see the module docstring)."""
    assert took < PASS_BOUND, f"pass took {took:.1f} s\n{run.err[-3000:]}"
    assert run.code in (0, 1), run.err[-3000:]
    for text in (run.out, run.err):
        assert TOKEN not in text
    for path in [*files_under(stage.state), *files_under(stage.export)]:
        with open(path, "rb") as fh:
            assert TOKEN.encode() not in fh.read(), path
    assert all("authorization" not in s.headers for s in stage.other.seen)
    for dest in GOOD:
        assert (stage.export / dest).read_bytes() == stage.bodies[dest], run.err[-3000:]
    landed = (stage.export / HOSTILE).exists()
    failed = [e for e in run.events if e.get("event") in ("asset_failed", "asset_refused")]
    assert all(e.get("dest") == HOSTILE for e in failed), failed
    if landed:
        assert (stage.export / HOSTILE).read_bytes() == stage.bodies[HOSTILE]
        assert failed == [] and run.code == 0, run.err[-3000:]
    else:
        assert len(failed) == 1 and run.code == 1, run.err[-3000:]
    visible = {
        str(p.relative_to(stage.export))
        for p in files_under(stage.export)
        if ".syncd-staging" not in p.parts and not p.name.startswith(".syncd")
    }
    assert visible == set(GOOD) | ({HOSTILE} if landed else set())
    for dest in visible:
        assert (
            hashlib.sha256((stage.export / dest).read_bytes()).hexdigest()
            == hashlib.sha256(stage.bodies[dest]).hexdigest()
        )
    db = sqlite3.connect(f"file:{stage.state / 'ledger.sqlite3'}?mode=ro", uri=True)
    try:
        rows = dict(db.execute("SELECT dest, sha256 FROM published WHERE orphaned_at IS NULL").fetchall())
    finally:
        db.close()
    assert rows == {d: hashlib.sha256(stage.bodies[d]).hexdigest() for d in visible}


# tests -------------------------------------------------------------------------------------------


@settings(
    max_examples=examples(10),
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_hostile_server_keeps_every_promise(stage: Stage, data: st.DataObject) -> None:
    """Whatever the server answers for one asset, the pass ends in bounded time, the other assets land,
    the hostile one lands byte-exact or fails alone, no token leaks, and the ledger agrees with the export."""
    script = data.draw(behaviours((stage.other.port, stage.closed_port)), label="replies")
    stage.reset()
    stage.art.script(f"/art/{HOSTILE}", script)
    run, took = stage.sync()
    check_pass(stage, run, took)
    failed = run.named("asset_failed") + run.named("asset_refused")
    # the outcome's kind, without URLs or numbers: shows in --hypothesis-show-statistics
    kind = " ".join(w for w in str(failed[0].get("error", "")).split()[:4] if w.isalpha()) if failed else ""
    event(f"failed: {kind}" if failed else "landed")


def test_named_hostile_answers(stage: Stage) -> None:
    """The answers the issue names (a zone-less Retry-After date, a redirect to a bad port, a non-ASCII
    validator on resume, endless 1xx, a slow head) each fail or land the one asset and nothing else."""
    scripts = [
        [Reply(status=b"503", headers=[(b"Retry-After", b"Wed, 02 Dec 2099 00:00:00 -0000")])],
        [Reply(status=b"302", headers=[(b"Location", b"http://127.0.0.1:99999/x")])],
        [
            Reply(headers=[(b"ETag", '"é"'.encode())], body=blob(40_000, 1), cut_at=100),
            Reply(body=blob(40_000, 1)),
        ],
        [Reply(endless_1xx=True)],
        [Reply(headers=[(b"X-Filler", b"1")] * 20, line_delay=0.5, body=blob(40_000, 1))],
    ]
    for script in scripts:
        stage.reset()
        stage.art.script(f"/art/{HOSTILE}", script)
        run, took = stage.sync()
        check_pass(stage, run, took)


def test_sigterm_is_prompt_under_a_stalling_server(stage: Stage, tmp_path: Path) -> None:
    """syncd run with a 60 s timeout, one asset stalled in an endless response head: SIGTERM ends the
    daemon within a few seconds (it took 49 s before)."""
    stage.reset()
    stage.art.script(f"/art/{HOSTILE}", [Reply(headers=[(b"X-Filler", b"1")] * 200, line_delay=0.5)])
    config = tmp_path / "syncd.conf"
    text = stage.config.read_text().replace('timeout = "2s"', 'timeout = "60s"')
    config.write_text(text.replace('token_file = "token"', f'token_file = "{stage.config.parent / "token"}"'))
    proc = subprocess.Popen(
        [syncd_command(), "run", "-c", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(s.path == f"/art/{HOSTILE}" for s in stage.art.seen):
            time.sleep(0.1)
        assert any(s.path == f"/art/{HOSTILE}" for s in stage.art.seen)
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert took < 5.0, f"SIGTERM took {took:.1f} s"
    assert TOKEN not in out + err
    events = parse_events(err)
    assert any(e.get("event") == "asset_interrupted" and e.get("dest") == HOSTILE for e in events), err[
        -3000:
    ]
