"""The commands of an asset's life before the daemon: ``syncd manifest new`` (write a manifest from
Artifactory) and the ``--remote`` part of ``syncd validate``.

Like :mod:`syncd.cli` (which registers them), these only turn arguments into calls and results into
lines and exit codes; the work is in :mod:`syncd.authoring` and :mod:`syncd.remote`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from syncd import config
from syncd.errors import ConfigError

if TYPE_CHECKING:
    from syncd.fetch import Fetcher

TIMEOUT = 60.0  # seconds, per request, without a config's [download] timeout


def add_artifactory_flags(p: argparse.ArgumentParser, cfg_help: str) -> None:
    """``--artifactory URL --token-file FILE`` (a laptop, CI) or ``-c CONFIG`` (a syncd config)."""
    p.add_argument("--artifactory", metavar="URL", help="the Artifactory base URL (as [artifactory] url)")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"a file holding an access token (default: ${config.TOKEN_FILE_ENV}); sent only to "
        "--artifactory's origin",
    )
    p.add_argument("-c", "--config", help=cfg_help + "; its [artifactory] is used")


def fetcher(args: argparse.Namespace, workers: int) -> Fetcher:
    """A :class:`Fetcher` for ``--artifactory`` (and ``--token-file``) or ``-c CONFIG``'s
    ``[artifactory]``. Raises :class:`ConfigError` (exit 2) when neither or both are given."""
    from syncd.fetch import Fetcher

    if args.artifactory and args.config:
        raise ConfigError("command line", ["give either --artifactory URL or -c CONFIG, not both"])
    if args.artifactory:
        art, warnings = config.artifactory_from_flags(args.artifactory, args.token_file)
        timeout = TIMEOUT
    elif args.config:
        if args.token_file:
            raise ConfigError("command line", ["--token-file goes with --artifactory; -c CONFIG has its own"])
        cfg = config.load(config.config_path(args.config))
        art, warnings, timeout = cfg.artifactory, list(cfg.warnings), cfg.timeout
    else:
        raise ConfigError(
            "command line",
            ["say which Artifactory: --artifactory URL (with --token-file FILE) or -c CONFIG"],
        )
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return Fetcher(art, timeout=timeout, concurrency=workers)


def config_problems(command: str, exc: ConfigError) -> int:
    """Print a configuration or flag problem for people (these commands run on laptops and in CI, not
    under journald): exit 2."""
    where = "" if exc.path == "command line" else f"{exc.path}: "
    for line in exc.problems:
        print(f"{command}: {where}{line}", file=sys.stderr)
    return 2


def cmd_manifest_new(args: argparse.Namespace) -> int:
    from syncd import authoring
    from syncd.manifest import is_manifest_name as manifest_name
    from syncd.progress import Progress, human
    from syncd.report import escape_unencodable, shown
    from syncd.storage import WORKERS, Storage

    out: Path | None = args.output
    if out is not None and not manifest_name(out.name):
        print(
            f"syncd manifest new: -o {shown(str(out))}: a manifest's name ends in exactly '.toml' "
            "(syncd reads only those)",
            file=sys.stderr,
        )
        return 2
    if out is not None and out.exists() and not args.force:
        print(f"syncd manifest new: {out} exists; give --force to overwrite it", file=sys.stderr)
        return 2
    if args.dest is not None and (why := _dest_problem(args.dest)):
        print(f"syncd manifest new: --dest {shown(args.dest)}: {why}", file=sys.stderr)
        return 2
    escape_unencodable(sys.stdout)
    try:
        fetch = fetcher(args, WORKERS)
    except ConfigError as exc:
        return config_problems("syncd manifest new", exc)
    tty = sys.stderr if sys.stderr.isatty() else None
    progress = Progress(tty, 0, 0, label="hashing") if tty else None
    try:
        entries = authoring.describe(
            Storage(fetch),
            args.sources,
            dest=args.dest,
            recursive=args.recursive,
            hash_locally=args.hash_locally,
            progress=progress,
        )
    except authoring.AuthoringError as exc:
        for line in exc.problems:
            print(shown(f"syncd manifest new: {line}"), file=sys.stderr)
        return 1
    finally:
        fetch.close()
    text = authoring.render(entries)
    problems = authoring.check(str(out) if out else "<stdout>", text)
    if problems:
        for line in problems:
            print(shown(line), file=sys.stderr)
        print("syncd manifest new: the manifest would not validate; nothing written", file=sys.stderr)
        return 1
    for e in entries:
        if e.hashed:
            print(shown(f"note: {e.source}: hashed here (no sha256 from the storage API)"), file=sys.stderr)
    total = human(sum(e.size for e in entries))
    if out is None:
        sys.stdout.write(text)
        print(f"syncd manifest new: {len(entries)} asset(s), {total}", file=sys.stderr)
        return 0
    try:
        authoring.write_new(out, text, force=args.force)
    except FileExistsError:
        print(f"syncd manifest new: {out} exists; give --force to overwrite it", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"syncd manifest new: cannot write {out}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"syncd manifest new: wrote {out}: {len(entries)} asset(s), {total}", file=sys.stderr)
    return 0


def _dest_problem(dest: str) -> str:
    """Why ``--dest`` cannot be a dest, or a dest prefix when it ends in ``/`` ("" when it can)."""
    from syncd import manifest

    try:
        manifest.check_dest(dest + "x" if dest.endswith("/") else dest)
    except ValueError as exc:
        return str(exc)
    return ""
