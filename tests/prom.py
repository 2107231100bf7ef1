"""The real Prometheus consumers from Debian's packages, on 127.0.0.1, for syncd's metrics tests.

Plain Python (no pytest import), like :mod:`servers`: ``prometheus-node-exporter`` with only its textfile
collector, a ``prometheus`` server scraping loopback targets and queried through ``/api/v1/query``, and
``promtool check metrics``. Every process listens on 127.0.0.1 only, runs in its own session, is stopped
by PID (``stop()``, the context manager, and ``atexit`` if a test forgot or failed).

Timings on the development machine (2 cores): node_exporter listens in ~0.05 s; prometheus answers
``/-/ready`` in ~0.1 s on a fresh TSDB, but its first scrape of a target comes ~5 s after start, because
the discovery manager of 2.42 hands targets to the scrape manager at most every 5 s (not configurable in
2.42). A target added to a running server (:meth:`Prometheus.add_target`, file-based discovery) gives its
first sample after ~2.5-6 s.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import ipaddress
import json
import math
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlencode, urlsplit

from servers import _read, _run, _stop_pid, _wait_port_free, free_port

__all__ = [
    "NodeExporter",
    "PromQueryError",
    "Prometheus",
    "Sample",
    "is_number",
    "listening_addresses",
    "promtool_check_metrics",
    "start_node_exporter",
    "start_prometheus",
]

NODE_EXPORTER_BIN = "/usr/bin/prometheus-node-exporter"
PROMETHEUS_BIN = "/usr/bin/prometheus"
PROMTOOL_BIN = "/usr/bin/promtool"
START_TIMEOUT = 60.0  # prometheus replays its WAL before it is ready; a fresh one is ready in ~0.1 s
HTTP_TIMEOUT = 5.0

Sample = tuple[dict[str, str], float]
"""One element of an instant vector: ``(labels including __name__, value)``."""

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# --------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    """The environment for the servers: ours minus any proxy settings (everything here is loopback)."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


def _http_get(port: int, path: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, str]:
    """``GET http://127.0.0.1:PORT/PATH`` with http.client (no proxy, no redirects); ``(status, text)``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", errors="replace")
    finally:
        conn.close()


def _wait_http(
    proc: subprocess.Popen[bytes], port: int, path: str, log: Path, what: str, timeout: float = START_TIMEOUT
) -> None:
    """Wait until ``GET path`` answers 200; raise with the log if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {proc.returncode} before answering {path} on "
                f"127.0.0.1:{port}; log {log}:\n{_read(log)}"
            )
        try:
            status, body = _http_get(port, path, timeout=1.0)
        except OSError as exc:
            last = str(exc)
        else:
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]}"
        time.sleep(0.05)
    _stop_pid(proc.pid, proc, signal.SIGTERM)
    raise RuntimeError(
        f"{what} did not answer {path} on 127.0.0.1:{port} within {timeout}s ({last}); "
        f"log {log}:\n{_read(log)}"
    )


def _launch(
    argv: Callable[[int], list[str]], log: Path, ready_path: str, what: str
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``argv(port)`` on a free port (three tries: a free port can be taken in between) and wait for
    ``ready_path``; return the process and its port."""
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as log_fh:
            proc = subprocess.Popen(
                argv(port),
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=log_fh,
                env=_env(),
                start_new_session=True,
            )
        try:
            _wait_http(proc, port, ready_path, log, what)
        except RuntimeError as exc:
            last_error = exc
            _stop_pid(proc.pid, proc, signal.SIGTERM)
            if "address already in use" not in _read(log)[offset:]:
                raise
            continue
        return proc, port
    raise RuntimeError(f"could not start {what}: {last_error}")


def _split_target(target: str) -> tuple[str, str, str]:
    """``"127.0.0.1:9100"`` or ``"http://127.0.0.1:9847/metrics"`` -> ``(scheme, host:port, path)``.
    Only loopback targets: these tests never scrape another host."""
    parts = urlsplit(target if "://" in target else f"http://{target}")
    if parts.scheme not in ("http", "https") or parts.hostname not in _LOOPBACK or parts.port is None:
        raise ValueError(f"not a loopback scrape target with a port: {target!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"scrape target with a query or fragment: {target!r}")
    return parts.scheme, parts.netloc, parts.path or "/metrics"


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """The TCP ``(address, port)`` pairs that process ``pid`` listens on (from its socket inodes in
    ``/proc/PID/fd`` matched against ``/proc/PID/net/tcp`` and ``tcp6``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
            if m:
                inodes.add(m.group(1))
    found = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A: LISTEN
                    continue
                hexaddr, hexport = cols[1].split(":")
                assert len(hexaddr) == width
                # each 32-bit word is in host (little-endian) byte order
                raw = b"".join(bytes.fromhex(hexaddr[i : i + 8])[::-1] for i in range(0, width, 8))
                addr = ".".join(str(b) for b in raw) if width == 8 else str(ipaddress.IPv6Address(raw))
                found.append((addr, int(hexport, 16)))
    return found


# --------------------------------------------------------------------------- promtool


def promtool_check_metrics(text: str) -> tuple[int, str]:
    """Run ``promtool check metrics`` with ``text`` on stdin; return ``(exit code, output)``.

    promtool 2.42 exits 0 when clean, 3 on lint problems (one per line, e.g. ``foo no help text``,
    ``foo_bytes counter metrics should have "_total" suffix``) and 1 when the text does not parse. It
    writes its findings to stderr; the output returned is stdout and stderr together.
    """
    proc = subprocess.run(
        [PROMTOOL_BIN, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
        check=False,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


# --------------------------------------------------------------------------- node_exporter


@dataclass
class NodeExporter:
    """``prometheus-node-exporter`` on 127.0.0.1 with only the textfile collector, reading
    ``textfile_dir/*.prom`` at every scrape. ``url`` is ``http://127.0.0.1:PORT``; ``target`` is
    ``127.0.0.1:PORT`` (what :func:`start_prometheus` takes)."""

    port: int
    pid: int
    textfile_dir: Path
    workdir: Path
    log: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.url}/metrics"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def scrape(self) -> str:
        """``GET /metrics``: the exposition text (raises unless 200)."""
        status, text = _http_get(self.port, "/metrics")
        if status != 200:
            raise RuntimeError(f"node_exporter /metrics answered {status}: {text[:500]}")
        return text

    def stop(self) -> None:
        """SIGTERM by PID, wait for it and its port (idempotent)."""
        _stop_pid(self.pid, self._proc, signal.SIGTERM)
        _wait_port_free(self.port)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_node_exporter(workdir: Path, textfile_dir: Path) -> NodeExporter:
    """Start node_exporter 1.5 on a free 127.0.0.1 port with every collector off except textfile
    (``--collector.disable-defaults --collector.textfile --collector.textfile.directory=DIR``) and without
    its own go_/process_ metrics (``--web.disable-exporter-metrics``); return once ``/metrics`` answers."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    textfile_dir = Path(textfile_dir).absolute()
    textfile_dir.mkdir(parents=True, exist_ok=True)
    log = workdir / "node_exporter.log"
    proc, port = _launch(
        lambda port: [
            NODE_EXPORTER_BIN,
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.disable-exporter-metrics",
            "--collector.disable-defaults",
            "--collector.textfile",
            f"--collector.textfile.directory={textfile_dir}",
        ],
        log,
        "/metrics",
        "node_exporter",
    )
    server = NodeExporter(
        port=port, pid=proc.pid, textfile_dir=textfile_dir, workdir=workdir, log=log, _proc=proc
    )
    atexit.register(server.stop)
    return server


# --------------------------------------------------------------------------- prometheus


_PROMETHEUS_YML = """\
# written by tests/prom.py: loopback targets only, no rules, no alerting, no remote read/write
global:
  scrape_interval: {interval}
  scrape_timeout: {interval}
scrape_configs:
{jobs}"""

_STATIC_JOB = """\
  - job_name: {job}
    scheme: {scheme}
    metrics_path: {path}
    static_configs:
      - targets: [{target}]
"""

# targets added later (add_target): one JSON file per job, whose labels set job and __metrics_path__
_DYNAMIC_JOB = """\
  - job_name: dynamic
    file_sd_configs:
      - files: [{files}]
        refresh_interval: 1s
"""


class PromQueryError(RuntimeError):
    """The query API answered with an error (bad PromQL, timeout)."""


@dataclass
class Prometheus:
    """A prometheus 2.42 server on 127.0.0.1 scraping loopback targets every ``scrape_interval``.

    ``jobs`` maps job name to target URL for the jobs in ``prometheus.yml`` and those added with
    :meth:`add_target`. ``url`` is ``http://127.0.0.1:PORT``."""

    port: int
    pid: int
    workdir: Path
    config: Path
    log: Path
    scrape_interval: str
    jobs: dict[str, str]
    _sd_dir: Path = field(repr=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- HTTP API

    def api(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """``GET /api/v1/PATH?params``; return ``data`` of a successful answer, raise PromQueryError."""
        query = f"?{urlencode(dict(params))}" if params else ""
        status, text = _http_get(self.port, f"/api/v1/{path}{query}")
        try:
            body = json.loads(text)
        except ValueError:
            raise PromQueryError(f"/api/v1/{path} answered {status}: {text[:500]}") from None
        if status != 200 or body.get("status") != "success":
            raise PromQueryError(f"/api/v1/{path} {params!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, match: Mapping[str, str] | None = None) -> list[Sample]:
        """Evaluate ``expr`` now (``/api/v1/query``): a list of ``(labels, value)``; a scalar result gives
        one sample with empty labels. ``match`` keeps only samples having those label values."""
        data = self.api("query", {"query": expr})
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            samples = [(dict(r["metric"]), float(r["value"][1])) for r in result]
        elif kind == "scalar":
            samples = [({}, float(result[1]))]
        else:
            raise PromQueryError(f"{expr!r} gave a {kind}, not an instant vector or scalar")
        if match:
            samples = [s for s in samples if all(s[0].get(k) == v for k, v in match.items())]
        return samples

    def wait_for(
        self,
        expr: str,
        predicate: Callable[[float], bool] = lambda _value: True,
        timeout: float = 30.0,
        match: Mapping[str, str] | None = None,
    ) -> float:
        """Poll :meth:`query` until a sample's value satisfies ``predicate``; return that value.

        Raise ``TimeoutError`` after ``timeout`` seconds with the last result and the targets' health.
        """
        deadline = time.monotonic() + timeout
        last: list[Sample] = []
        while True:
            last = self.query(expr, match)
            for _labels, value in last:
                if predicate(value):
                    return value
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise TimeoutError(
            f"prometheus: no sample of {expr!r} (match {match!r}) satisfied the predicate within {timeout}s; "
            f"last result {last!r}; targets {self.targets()!r}"
        )

    def targets(self) -> list[dict[str, Any]]:
        """The active targets: ``job``, ``url`` (scrapeUrl), ``health`` (up/down/unknown), ``error``."""
        data = self.api("targets", {"state": "active"})
        return [
            {
                "job": t["labels"].get("job", ""),
                "url": t["scrapeUrl"],
                "health": t["health"],
                "error": t.get("lastError", ""),
            }
            for t in data["activeTargets"]
        ]

    def targets_up(self) -> dict[str, bool]:
        """``{job: True}`` for every active target whose last scrape succeeded (``health == "up"``)."""
        return {t["job"]: t["health"] == "up" for t in self.targets()}

    def wait_targets_up(self, jobs: Sequence[str] | None = None, timeout: float = 30.0) -> None:
        """Wait until the given jobs (default: all in ``jobs``) have been scraped successfully."""
        want = list(jobs) if jobs is not None else list(self.jobs)
        deadline = time.monotonic() + timeout
        while True:
            up = self.targets_up()
            if all(up.get(job) for job in want):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"prometheus: targets {want} not up within {timeout}s: {self.targets()!r}")
            time.sleep(0.1)

    # -- targets added while running (file-based discovery)

    def add_target(self, target: str, job: str | None = None) -> str:
        """Scrape ``target`` (``127.0.0.1:PORT`` or a loopback URL) under ``job`` (default: a fresh unique
        name) from now on; return the job name. First sample after ~2.5-6 s (see the module docstring)."""
        scheme, hostport, path = _split_target(target)
        job = job if job is not None else f"t-{uuid.uuid4().hex[:10]}"
        if job in self.jobs or not re.fullmatch(r"[A-Za-z0-9_.-]+", job):
            raise ValueError(f"job name already used or not a plain name: {job!r}")
        group = [
            {
                "targets": [hostport],
                "labels": {"job": job, "__scheme__": scheme, "__metrics_path__": path},
            }
        ]
        tmp = self._sd_dir / f".{job}.tmp"  # not matched by *.json: the rename is what prometheus sees
        tmp.write_text(json.dumps(group))
        tmp.rename(self._sd_dir / f"{job}.json")
        self.jobs[job] = f"{scheme}://{hostport}{path}"
        return job

    def remove_target(self, job: str) -> None:
        """Stop scraping a job added with :meth:`add_target` (its series go stale)."""
        with contextlib.suppress(FileNotFoundError):
            (self._sd_dir / f"{job}.json").unlink()
        self.jobs.pop(job, None)

    # -- lifecycle

    def stop(self) -> None:
        """SIGTERM by PID (prometheus shuts down in milliseconds), wait for it and its port (idempotent)."""
        _stop_pid(self.pid, self._proc, signal.SIGTERM)
        _wait_port_free(self.port)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_prometheus(
    workdir: Path, targets: Sequence[str] | Mapping[str, str] = (), scrape_interval: str = "1s"
) -> Prometheus:
    """Start prometheus 2.42 on a free 127.0.0.1 port scraping ``targets`` every ``scrape_interval``.

    ``targets`` is a mapping ``{job: target}`` or a list (jobs ``job0``, ``job1``, …); a target is
    ``127.0.0.1:PORT`` (path ``/metrics``) or a loopback URL such as ``http://127.0.0.1:9847/metrics``.
    ``workdir/prometheus.yml`` has one static job per target plus a ``file_sd`` job for
    :meth:`Prometheus.add_target`; the TSDB is ``workdir/data``. Returns once ``/-/ready`` answers 200
    (which is before the first scrape: use :meth:`Prometheus.wait_for` or ``wait_targets_up``)."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if not re.fullmatch(r"\d+(ms|s|m)", scrape_interval):
        raise ValueError(f"not a prometheus duration: {scrape_interval!r}")
    named = dict(targets) if isinstance(targets, Mapping) else {f"job{i}": t for i, t in enumerate(targets)}
    sd_dir = workdir / "file_sd"
    sd_dir.mkdir(exist_ok=True)
    jobs: dict[str, str] = {}
    blocks = []
    for job, target in named.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", job) or job == "dynamic":
            raise ValueError(f"job name not plain or reserved: {job!r}")
        scheme, hostport, path = _split_target(target)
        jobs[job] = f"{scheme}://{hostport}{path}"
        blocks.append(
            _STATIC_JOB.format(
                job=json.dumps(job), scheme=scheme, path=json.dumps(path), target=json.dumps(hostport)
            )
        )
    blocks.append(_DYNAMIC_JOB.format(files=json.dumps(str(sd_dir / "*.json"))))
    config = workdir / "prometheus.yml"
    config.write_text(_PROMETHEUS_YML.format(interval=scrape_interval, jobs="".join(blocks)))
    _run([PROMTOOL_BIN, "check", "config", str(config)], env=_env())
    log = workdir / "prometheus.log"
    proc, port = _launch(
        lambda port: [
            PROMETHEUS_BIN,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            "--storage.tsdb.retention.time=1d",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        log,
        "/-/ready",
        "prometheus",
    )
    server = Prometheus(
        port=port,
        pid=proc.pid,
        workdir=workdir,
        config=config,
        log=log,
        scrape_interval=scrape_interval,
        jobs=jobs,
        _sd_dir=sd_dir,
        _proc=proc,
    )
    atexit.register(server.stop)
    return server


def is_number(value: float) -> bool:
    """A predicate for :meth:`Prometheus.wait_for`: any finite value."""
    return math.isfinite(value)


def samples(text: str) -> dict[str, float]:
    """The samples of a Prometheus text exposition, as ``{'name{labels}': value}`` (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
