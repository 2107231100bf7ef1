"""The ``syncd`` command: parse arguments, run one sub-command, turn errors into exit codes.

Exit codes: 0 success; 1 a failure at run time (an asset failed, a manifest was invalid, git unreachable,
export root missing, lock held); 2 a configuration or usage error; ``status`` also 1 for degraded and 3 for
stale (a Nagios/Icinga check). This is the one place that maps
:class:`~syncd.errors.SyncdError` to messages and exit codes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from syncd import __version__, config, logs
from syncd.errors import ConfigError, LockHeldError, SyncdError

log = logs.get()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="syncd",
        description="Sync reviewed assets listed in git manifests from Artifactory into an export.",
    )
    p.add_argument("--version", action="version", version=f"syncd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cfg_help = f"configuration file (default: $SYNCD_CONFIG or {config.DEFAULT_PATH})"

    s = sub.add_parser("sync", help="run one reconcile pass now, then exit")
    s.add_argument("-c", "--config", help=cfg_help)
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="print what would be downloaded, skipped or refused; change nothing",
    )
    s.set_defaults(func=cmd_sync)

    v = sub.add_parser("validate", help="check manifest files (for a CI check on pull requests)")
    v.add_argument(
        "--base",
        metavar="REV",
        help="also report changes to dests existing at REV that the daemon would refuse",
    )
    v.add_argument(
        "--strict",
        action="store_true",
        help="also fail (exit 1) on warnings, such as dests that differ only by letter case",
    )
    v.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="manifest file, or directory whose *.toml files (at any depth) are checked",
    )
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run as a daemon: a pass every [schedule] interval (for systemd)")
    r.add_argument("-c", "--config", help=cfg_help)
    r.set_defaults(func=cmd_run)

    st = sub.add_parser(
        "status",
        help="is the export in sync? what is wrong? (exit 0 ok, 1 degraded, 2 usage, 3 stale)",
        description="Read the ledger (read-only, no lock: works beside a running daemon) and say whether the "
        "export is in sync; exit 0 ok, 1 degraded, 2 configuration or usage error, 3 stale or never ran.",
    )
    st.add_argument("-c", "--config", help=cfg_help)
    st.add_argument("--json", action="store_true", help="one JSON object (schema: docs/monitoring.md)")
    st.set_defaults(func=cmd_status)

    n = sub.add_parser(
        "notify",
        help="check the [notify] channels: send a test message on each (exit 0 all accepted, 1 not)",
    )
    n.add_argument("-c", "--config", help=cfg_help)
    n.add_argument("--test", action="store_true", required=True, help="send a test message on every channel")
    n.set_defaults(func=cmd_notify)

    c = sub.add_parser("check-config", help="validate the configuration and report every problem")
    c.add_argument("-c", "--config", help=cfg_help)
    c.set_defaults(func=cmd_check_config)
    return p


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from syncd import status

    cfg = config.load(config.config_path(args.config), secrets=False)
    try:
        st = status.read(cfg)
    except Exception as exc:  # status cannot tell: exit 2, never 1 (degraded) or a traceback
        from syncd.errors import internal_error

        why = str(exc) if isinstance(exc, SyncdError) else str(internal_error(exc))
        if args.json:
            print(json.dumps({"state": "unknown", "error": why}, indent=2))
        print(f"syncd status: {why}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(st.to_json(), indent=2))
    else:
        print(status.render(st))
    return st.exit_code


def cmd_sync(args: argparse.Namespace) -> int:
    from syncd import events
    from syncd.errors import frames, internal_error
    from syncd.metrics import Metrics
    from syncd.reconcile import Reconciler
    from syncd.report import render_plan, shown
    from syncd.statedir import StateLock

    path = config.config_path(args.config)
    cfg = config.load(path)
    for warning in cfg.warnings:
        log.warning("config_insecure", config=str(path), warning=warning)
    lock = StateLock(cfg.state_dir)
    owner = ""
    try:
        lock.acquire(readonly=args.dry_run)  # a dry run creates and writes nothing in the state dir
    except LockHeldError as exc:
        if not args.dry_run:
            raise
        # A dry run beside a running daemon: plan against its last fetched commit, touching nothing.
        owner = str(exc)
    try:
        bus = events.EventBus([events.LogObserver(), Metrics(None if args.dry_run else cfg.metrics_textfile)])
        rec = Reconciler(
            cfg,
            dry_run=args.dry_run,
            progress_stream=sys.stderr if sys.stderr.isatty() and not args.dry_run else None,
            fetch=not owner,
            events=bus,
        )
        notifier = None
        if cfg.notify is not None and not args.dry_run:
            from syncd.notify import Announcer

            notifier = Announcer(cfg.notify, lambda: (rec.ledger, rec.repo), export_root=str(cfg.export_root))
            bus.add(notifier)
        try:
            result = rec.run_pass()
            if notifier is not None:
                notifier.flush()  # what this pass announces goes out before syncd sync exits
        except SyncdError as exc:
            if notifier is not None:
                notifier.pass_failed(exc)
                notifier.flush()
            raise
        except Exception as exc:  # a bug: our own words and its frames, never its text (may hold a secret)
            err = internal_error(exc)
            log.error("internal_error", error=str(err), error_type=type(exc).__name__, frames=frames(exc))
            return 1
        finally:
            rec.close()
    finally:
        lock.release()
    if args.dry_run:
        print(render_plan(result))
        if owner:
            print(shown(f"(not fetched: {owner.split(';')[0]}; planned against the commit it fetched last)"))
    # A dry run's pending downloads are its plan, not a failure (its pass_finished still says ok: false).
    return 0 if result.ok or (args.dry_run and result.healthy) else 1


def cmd_notify(args: argparse.Namespace) -> int:
    from syncd.notify import send_test

    cfg = config.load(config.config_path(args.config))
    if cfg.notify is None:
        print(f"{cfg.path}: no [notify] section: nothing to test", file=sys.stderr)
        return 2
    ok = True
    for channel, error in send_test(cfg.notify):
        print(f"{channel}: {'accepted' if not error else 'NOT sent: ' + error}")
        ok = ok and not error
    return 0 if ok else 1


def cmd_run(args: argparse.Namespace) -> int:
    from syncd import daemon

    return daemon.run(config.config_path(args.config))


def cmd_validate(args: argparse.Namespace) -> int:
    from syncd.report import escape_unencodable, shown
    from syncd.validate import validate

    escape_unencodable(sys.stdout)
    report = validate(args.paths, args.base)
    for line in report.problems:
        print(shown(line))
    for line in report.warnings:
        print(shown(f"warning: {line}"))
    warned = f", {len(report.warnings)} warning(s)" if report.warnings else ""
    if report.problems or (args.strict and report.warnings):
        print(
            f"syncd validate: {len(report.problems)} problem(s){warned} in {report.files} file(s)",
            file=sys.stderr,
        )
        return 1
    print(f"syncd validate: {report.files} file(s) OK{warned}", file=sys.stderr)
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    path = config.config_path(args.config)
    try:
        cfg = config.load(path)
    except ConfigError as exc:
        print(f"{exc.path}: invalid configuration", file=sys.stderr)
        for line in exc.problems:
            print(line, file=sys.stderr)
        return 2
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{path}: OK")
    for key, value in config.describe(cfg).items():
        print(f"  {key} = {value}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``syncd`` command; returns the exit code."""
    args = _parser().parse_args(argv)
    logs.configure()
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        log.error("config_invalid", config=exc.path, error=str(exc), problems=exc.problems)
        return exc.exit_code
    except SyncdError as exc:
        log.error("command_failed", command=args.command, error=str(exc), error_type=type(exc).__name__)
        return exc.exit_code
    except KeyboardInterrupt:
        log.warning("interrupted", command=args.command)
        return 130
    return code


def run() -> None:
    sys.exit(main())
