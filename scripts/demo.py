"""A self-contained syncd demo: a local git repo of manifests, a local HTTP server standing in for
Artifactory (bearer token required), and an export directory, all under ./demo-out.

Run it through ``scripts/demo`` (which installs what it needs first).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKEN = "demo-token-not-a-secret"
OUT = Path(__file__).resolve().parent.parent / "demo-out"
GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "ML Engineer",
    "GIT_AUTHOR_EMAIL": "ml@example.com",
    "GIT_COMMITTER_NAME": "Platform Admin",
    "GIT_COMMITTER_EMAIL": "admin@example.com",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_CONFIG_NOSYSTEM": "1",
}


class Artifactory(SimpleHTTPRequestHandler):
    """Serves files only with the right bearer token, like Artifactory's download API."""

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_error(401, "token required")
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True)


def blob(root: Path, name: str, size: int) -> tuple[str, int]:
    data = (hashlib.sha256(name.encode()).digest() * (size // 32 + 1))[:size]
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), size


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    blobs, export, etc = OUT / "artifactory", OUT / "export", OUT / "etc"
    for d in (blobs, export, etc):
        d.mkdir(parents=True)

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Artifactory, directory=str(blobs)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/artifactory"

    step("1. Uploads to 'Artifactory' (a local HTTP server that requires a bearer token)")
    shards = [blob(blobs / "artifactory", f"ml-datasets/demo/v1/train-{i:03}.tar", 2_000_000)
              for i in range(3)]
    weights = blob(blobs / "artifactory", "ml-models/demo-bert/v1/model.safetensors", 5_000_000)
    print(f"   {url}/ml-datasets/demo/v1/train-00[0-2].tar, .../ml-models/demo-bert/v1/model.safetensors")

    step("2. A merged pull request adds manifests to the git repo")
    bare, work = OUT / "manifests.git", OUT / "manifests-work"
    git("init", "-q", "--bare", "-b", "main", str(bare), cwd=OUT)
    git("clone", "-q", str(bare), str(work), cwd=OUT)
    (work / "assets" / "datasets").mkdir(parents=True)
    (work / "assets" / "models").mkdir(parents=True)
    tables = [
        f'[[asset]]\nsource = "ml-datasets/demo/v1/train-{i:03}.tar"\nsha256 = "{sha}"\n'
        f'size = {size}\ndest = "datasets/demo/v1/train-{i:03}.tar"\n'
        for i, (sha, size) in enumerate(shards)
    ]
    (work / "assets/datasets/demo-v1.toml").write_text("\n".join(tables))
    (work / "assets/models/demo-bert.toml").write_text(
        '[[asset]]\nsource = "ml-models/demo-bert/v1/model.safetensors"\n'
        f'sha256 = "{weights[0]}"\nsize = {weights[1]}\n'
        'dest = "models/demo-bert/v1/model.safetensors"\ndescription = "demo weights"\n'
    )
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", "Add demo dataset and model", cwd=work)
    git("push", "-q", "origin", "HEAD:main", cwd=work)
    syncd = str(Path(sys.executable).parent / "syncd")
    subprocess.run([syncd, "validate", str(work / "assets")], check=True)

    step("3. The configuration (/etc/syncd/syncd.conf in production)")
    token = etc / "artifactory.token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    conf = etc / "syncd.conf"
    conf.write_text(
        f'[source]\nurl = "{bare.as_uri()}"\nbranch = "main"\npath = "assets"\n\n'
        f'[artifactory]\nurl = "{url}"\ntoken_file = "artifactory.token"\n\n'
        f'[export]\nroot = "{export}"\n\n[download]\nconcurrency = 4\ntimeout = "30s"\n\n'
        f'[state]\ndirectory = "{OUT / "state"}"\n'
    )
    print(conf.read_text())
    subprocess.run([syncd, "check-config", "-c", str(conf)], check=True)

    step("4. syncd sync --dry-run: what would happen")
    subprocess.run([syncd, "sync", "-c", str(conf), "--dry-run"], check=True,
                   stderr=subprocess.DEVNULL)

    step("5. syncd sync: the log (one JSON event per line)")
    first = subprocess.run([syncd, "sync", "-c", str(conf)], check=False)

    step("6. What landed in the export (read-only, byte-exact)")
    for path in sorted(p for p in export.rglob("*") if p.is_file() and ".syncd" not in str(p)):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        print(f"   {oct(path.stat().st_mode & 0o777)}  {digest[:16]}…  {path.relative_to(export)}")

    step("7. A second pass changes nothing (idempotent)")
    second = subprocess.run([syncd, "sync", "-c", str(conf)], check=False)
    server.shutdown()

    step("8. syncd status: in sync? (exit 0 ok, 1 degraded, 3 stale; --json for monitoring)")
    status = subprocess.run([syncd, "status", "-c", str(conf)], check=False)
    print(f"\nexit codes: first pass {first.returncode}, second pass {second.returncode}, "
          f"status {status.returncode}; everything is under {OUT}")
    return first.returncode or second.returncode or status.returncode


if __name__ == "__main__":
    sys.exit(main())
