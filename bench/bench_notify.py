#!/usr/bin/env python3
"""What announcing costs a pass with many problems: ``syncd sync`` wall time with and without ``[notify]``.

One run: a ``file://`` manifest repository with ``--assets`` assets whose sources do not exist in a real
nginx on 127.0.0.1 (each fails with a 404, retried once), and a real SMTP server (aiosmtpd) for the mail.
For each of ``--repeat`` rounds it runs ``syncd sync`` without and with ``[notify]`` (mail_authors on) on
fresh state directories, twice each (the first pass announces every problem in one digest; the second finds
them all already announced), and prints the medians of the wall times, the size of the mail and how many
mails arrived.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

from mailservers import SmtpServer  # noqa: E402
from servers import GitRepo, start_nginx  # noqa: E402


def config(work: Path, nginx_url: str, state: Path, smtp_port: int | None) -> Path:
    conf = work / f"syncd-{state.name}.conf"
    text = (
        f'[source]\nurl = "{(work / "remote.git").as_uri()}"\npath = "assets"\n\n'
        f'[artifactory]\nurl = "{nginx_url}"\ntoken_file = "token"\n\n'
        f'[export]\nroot = "{work / "export"}"\n\n[download]\nretries = 1\nconcurrency = 8\n\n'
        f'[state]\ndirectory = "{state}"\n'
    )
    if smtp_port is not None:
        text += (
            '\n[notify]\nmail_authors = true\nauthor_domains = ["bench.example"]\n\n[notify.smtp]\n'
            f'host = "127.0.0.1"\nport = {smtp_port}\nsecurity = "none"\nfrom = "syncd@bench.example"\n'
            'to = ["ops@bench.example"]\n'
        )
    conf.write_text(text)
    return conf


def timed(conf: Path) -> float:
    syncd = Path(sys.executable).parent / "syncd"
    started = time.monotonic()
    subprocess.run([str(syncd), "sync", "-c", str(conf)], capture_output=True, check=False)
    return time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assets", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="syncd-notify-") as tmp, SmtpServer() as smtp:
        work = Path(tmp)
        nginx = start_nginx(work / "nginx")
        try:
            repo = GitRepo(work / "remote.git", work / "clone")
            repo.env.update(GIT_AUTHOR_NAME="Ada", GIT_AUTHOR_EMAIL="ada@bench.example")
            tables = [
                f'[[asset]]\nsource = "missing/{i}.bin"\nsha256 = "{i:064x}"\nsize = 10\ndest = "m/{i}.bin"\n'
                for i in range(args.assets)
            ]
            repo.write("assets/many.toml", "\n".join(tables))
            repo.commit("many missing assets")
            (work / "export").mkdir()
            token = work / "token"
            token.write_text(nginx.token)
            token.chmod(0o600)
            times: dict[str, list[float]] = {"off-1": [], "off-2": [], "on-1": [], "on-2": []}
            for r in range(args.repeat):
                for mode, port in (("off", None), ("on", smtp.port)):
                    state = work / f"state-{mode}-{r}"
                    conf = config(work, nginx.bearer_url(), state, port)
                    times[f"{mode}-1"].append(timed(conf))
                    times[f"{mode}-2"].append(timed(conf))
                    shutil.rmtree(state)
        finally:
            nginx.stop()
        sizes = sorted(len(m.data) for m in smtp.messages)
    for key, values in times.items():
        print(f"{key}: median {statistics.median(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})")
    print(f"mails: {len(sizes)} (ops digest and author mail per round), sizes {sizes[:2]}…{sizes[-2:]} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
