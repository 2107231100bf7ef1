"""The ``syncd`` command: parse arguments, run one sub-command, turn errors into exit codes.

Exit codes: 0 success; 1 a failure at run time (an asset failed, a manifest was invalid, git unreachable,
export root missing, lock held); 2 a configuration or usage error; ``status`` also 1 for degraded and 3 for
stale (a Nagios/Icinga check). This is the one place that maps
:class:`~syncd.errors.SyncdError` to messages and exit codes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from syncd import __version__, cli_assets, config, logs
from syncd.errors import ConfigError, LockHeldError, SyncdError

if TYPE_CHECKING:  # the commands import what they use when they run: `syncd --help` stays quick
    from syncd.ledger import Published
    from syncd.reconcile import PassResult
    from syncd.verify import Finding

log = logs.get()


def versions() -> str:
    """What ``syncd --version`` prints: syncd's, Python's, pygit2's and libgit2's versions and the newest
    ledger schema this syncd reads (``install.sh --rollback`` compares it with the ledger's)."""
    import platform
    from importlib.metadata import version

    import pygit2

    from syncd.ledger import SCHEMA_VERSION

    return (
        f"syncd {__version__}\n"
        f"Python {platform.python_version()} ({platform.python_implementation()})\n"
        f"pygit2 {version('pygit2')}\n"
        f"libgit2 {pygit2.LIBGIT2_VERSION}\n"
        f"ledger schema {SCHEMA_VERSION}\n"
    )


class _Version(argparse.Action):
    """``--version``: imports pygit2 only when asked (``syncd --help`` stays quick)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        sys.stdout.write(versions())
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="syncd",
        description="Sync reviewed assets listed in git manifests from Artifactory into an export.",
    )
    p.add_argument(
        "--version",
        action=_Version,
        nargs=0,
        help="print the versions of syncd, Python, pygit2, libgit2 and the ledger schema, then exit",
    )
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
        "--verify-signatures",
        action="store_true",
        help="also check that the commit checked out (HEAD: the merge result) is signed by a trusted key",
    )
    trust = v.add_mutually_exclusive_group()
    trust.add_argument("--allowed-signers", metavar="FILE", type=Path, help="ssh: git's allowed-signers file")
    trust.add_argument("--gpg-keyring", metavar="FILE", type=Path, help="gpg: a keyring of trusted keys")
    v.add_argument(
        "--remote",
        action="store_true",
        help="also ask Artifactory's storage API whether each new or changed asset (all without --base) "
        "exists with the manifest's sha256 and size",
    )
    cli_assets.add_artifactory_flags(v, cfg_help)
    v.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="manifest file, or directory whose *.toml files (at any depth) are checked",
    )
    v.set_defaults(func=cmd_validate)

    m = sub.add_parser("manifest", help="write manifests: syncd manifest new SOURCE...")
    msub = m.add_subparsers(dest="manifest_command", required=True, metavar="COMMAND")
    mn = msub.add_parser(
        "new",
        help="print (or write) a manifest for files in Artifactory, with their sha256 and size",
        description="Ask Artifactory's storage API for each SOURCE (a path under the base URL: "
        "repo/dir/file) and print a manifest that syncd validate accepts, one [[asset]] per file. A file "
        "the API has no sha256 for, a plain HTTP server, and --hash-locally: the file is streamed and "
        "hashed here.",
    )
    cli_assets.add_artifactory_flags(mn, cfg_help)
    mn.add_argument(
        "--dest",
        metavar="DEST",
        help="where the file lands (one file), or a directory prefix ending in '/' under which each "
        "file's path below SOURCE is kept (default: the source without its repository)",
    )
    mn.add_argument("--recursive", action="store_true", help="a SOURCE may be a folder: every file below it")
    mn.add_argument("--hash-locally", action="store_true", help="stream and hash each file here")
    mn.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the manifest to FILE")
    mn.add_argument("--force", action="store_true", help="with -o: overwrite FILE if it exists")
    mn.add_argument("sources", nargs="+", metavar="SOURCE", help="a path under the Artifactory base URL")
    mn.set_defaults(func=cli_assets.cmd_manifest_new)

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

    pv = sub.add_parser(
        "provenance",
        help="who put these files on the export: commit, author, merger, pull request, signer",
        description="For each DEST, what the ledger recorded when syncd published it (read-only, no lock). "
        "Exit 1 when a dest is not known to syncd.",
    )
    pv.add_argument("-c", "--config", help=cfg_help)
    pv.add_argument("--json", action="store_true", help="a JSON list, one object per dest")
    pv.add_argument("dests", nargs="+", metavar="DEST", help="a dest, as the manifests name it")
    pv.set_defaults(func=cmd_provenance)

    vf = sub.add_parser(
        "verify",
        help="re-hash the published files against the ledger (exit 0 clean, 1 findings)",
        description="Re-hash every published file (or those under DEST_PREFIX) and report missing files, "
        "size or sha256 mismatches, changed modes, and files replaced by symlinks or directories. "
        "Read-only and safe beside a running daemon; --repair needs the daemon stopped.",
    )
    vf.add_argument("-c", "--config", help=cfg_help)
    vf.add_argument("--max-rate", type=float, metavar="MB/s", help="read at most this many MB per second")
    vf.add_argument("--json", action="store_true", help="one JSON object with every finding")
    vf.add_argument(
        "--repair",
        action="store_true",
        help="quarantine each bad file in <root>/.syncd-quarantine/<time>/ and restore the reviewed one "
        "(exit 0 when every finding was repaired)",
    )
    vf.add_argument("prefixes", nargs="*", metavar="DEST_PREFIX", help="check only dests under these")
    vf.set_defaults(func=cmd_verify)

    au = sub.add_parser(
        "audit",
        help="print the audit log (every change to the export, every trust decision); --verify its chain",
        description="Print the records of the hash-chained audit log in the state directory (read-only, no "
        "lock); --verify checks the whole chain and names the first broken record (exit 1).",
    )
    au.add_argument("-c", "--config", help=cfg_help)
    au.add_argument(
        "--since", metavar="DATE", help="records at or after DATE (2026-12-01 or an ISO 8601 time)"
    )
    au.add_argument("--dest", metavar="PREFIX", help="records of dests under PREFIX")
    au.add_argument("--json", action="store_true", help="the records as stored: JSON lines (for a SIEM)")
    au.add_argument("--verify", action="store_true", help="check the hash chain; exit 1 when it is broken")
    au.set_defaults(func=cmd_audit)

    pr = sub.add_parser(
        "prune",
        help="list the orphaned files the next pass would remove ([prune]); --confirm removes them now",
        description="One dry-run pass at the branch head (beside a running daemon: at the commit it fetched "
        "last) that lists which published files whose manifest entry is gone pruning would remove, and why "
        "others are kept (within [prune] grace, changed since syncd recorded them, a manifest invalid). "
        "Changes nothing in the export or the ledger. --confirm (the daemon stopped) runs one real pass "
        "that removes them past the max_files, max_fraction and no_assets valves; never a file changed "
        "since syncd recorded it, one still in its grace period, or anything while the head is refused or "
        "cannot be fetched.",
    )
    pr.add_argument("-c", "--config", help=cfg_help)
    pr.add_argument("--dry-run", action="store_true", help="change nothing (the default without --confirm)")
    pr.add_argument("--confirm", action="store_true", help="remove the files now, past the safety valves")
    pr.set_defaults(func=cmd_prune)

    c = sub.add_parser("check-config", help="validate the configuration and report every problem")
    c.add_argument("-c", "--config", help=cfg_help)
    c.set_defaults(func=cmd_check_config)
    return p


def cmd_status(args: argparse.Namespace) -> int:

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
    return _sync(args, "")


def cmd_prune(args: argparse.Namespace) -> int:
    """``syncd prune``: one dry-run pass (fetched, or beside the daemon at its last fetched commit) that
    lists what pruning removes and keeps; ``--confirm``: one real pass (the daemon stopped) with the
    safety valves lifted."""
    args.dry_run = args.dry_run or not args.confirm
    return _sync(args, "list" if args.dry_run else "confirm")


def _sync(args: argparse.Namespace, prune_mode: str) -> int:
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
        if prune_mode == "confirm":
            raise LockHeldError(
                f"{exc}; syncd prune --confirm removes files from the export: stop the daemon first "
                "(systemctl stop syncd), or let its passes prune ([prune] enabled = true)"
            ) from None
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
            prune_mode=prune_mode,
        )
        notifier = None
        if cfg.notify is not None and not args.dry_run:
            from syncd.notify import Announcer

            notifier = Announcer(cfg.notify, lambda: (rec.ledger, rec.repo), export_root=str(cfg.export_root))
            bus.add(notifier)
        try:
            result = rec.run_pass()
            audited = rec.audit is None or rec.audit.healthy  # its records are on disk, fsynced
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
    if prune_mode:
        return _pruned(cfg, result, prune_mode, owner, audited)
    if args.dry_run:
        print(render_plan(result))
        if owner:
            print(shown(f"(not fetched: {owner.split(';')[0]}; planned against the commit it fetched last)"))
    # A dry run's pending downloads are its plan, not a failure (its pass_finished still says ok: false).
    if not audited:
        return 1  # the export may be right, but the audit log does not say so yet (audit_failed)
    return 0 if result.ok or (args.dry_run and result.healthy) else 1


def _pruned(cfg: config.Config, result: PassResult, mode: str, owner: str, audited: bool) -> int:
    """What ``syncd prune`` prints after its pass, and its exit code."""
    from syncd.report import pruning_lines, shown

    pruning = result.pruning
    for line in pruning_lines(pruning) if pruning is not None else []:
        print(shown(line))
    n = pruning.would_remove if pruning is not None else 0
    kept = len(pruning.kept) if pruning is not None else 0
    if owner:
        print(shown(f"(not fetched: {owner.split(';')[0]}; planned against the commit it fetched last)"))
    if mode == "confirm":
        why = "" if result.ok else "; the pass is not in sync (see its pass_finished event and syncd status)"
        print(
            f"syncd prune: {result.pruned} file(s) removed ({n} to remove), {kept} kept{why}", file=sys.stderr
        )
        return 0 if result.ok and result.pruned == n and audited else 1
    off = "" if cfg.prune.enabled else "; [prune] enabled is false: passes remove nothing"
    print(f"syncd prune: {n} file(s) would be removed, {kept} kept{off}", file=sys.stderr)
    return 0


def cmd_provenance(args: argparse.Namespace) -> int:

    from syncd.ledger import Ledger
    from syncd.report import shown

    cfg = config.load(config.config_path(args.config), secrets=False)
    ledger = Ledger.in_state_dir(cfg.state_dir, readonly=True)
    try:
        published = ledger.published()
    finally:
        ledger.close()
    found: list[Published] = []
    unknown: list[str] = []
    for dest in args.dests:
        row = published.get(dest.strip("/"))
        if row is None:
            unknown.append(dest)
        else:
            found.append(row)
    if args.json:
        print(json.dumps([_provenance_json(r) for r in found], indent=2))
    else:
        print("\n\n".join("\n".join(shown(line) for line in _provenance_text(r).split("\n")) for r in found))
    for dest in unknown:
        print(
            shown(f"syncd provenance: {dest}: not a file syncd published (not in the ledger)"),
            file=sys.stderr,
        )
    return 1 if unknown else 0


def _provenance_json(row: Published) -> dict[str, object]:
    from syncd.provenance import Provenance

    return {
        "dest": row.dest,
        "sha256": row.sha256,
        "size": row.size,
        "source": row.source,
        "manifest": row.manifest,
        "commit": row.commit,
        "published_at": row.published_at,
        "how": str(row.how),
        "orphaned_at": row.orphaned_at,
        "damaged": row.damaged,
        "provenance": Provenance.from_json(row.provenance).to_json() if row.provenance else None,
    }


def _provenance_text(row: Published) -> str:
    from syncd.progress import human
    from syncd.provenance import Provenance

    lines = [
        row.dest,
        f"  sha256      {row.sha256}",
        f"  size        {row.size} bytes ({human(row.size)})",
        f"  source      {row.source}",
        f"  manifest    {row.manifest}",
        f"  published   {row.published_at} ({row.how}) at commit {row.commit[:12]}",
    ]
    if row.orphaned_at:
        lines.append(f"  orphaned    {row.orphaned_at} (no manifest lists it any more)")
    if row.damaged:
        lines.append(f"  damaged     {row.damaged} (syncd verify --repair restores it)")
    if not row.provenance:
        lines.append("  provenance  not recorded (published before syncd kept provenance)")
        return "\n".join(lines)
    p = Provenance.from_json(row.provenance)
    if p.unknown:
        lines.append(f"  provenance  unknown: {p.unknown}")
    else:
        lines.append(f"  introduced  {p.introduced_commit} by {p.author} on {p.authored_at}")
        if p.merge_commit == p.introduced_commit and p.pr_number is None:
            lines.append("  merged      committed straight onto the branch")
        elif p.merge_commit == p.introduced_commit:
            lines.append(f"  merged      squash-merged onto the branch by {p.merger} on {p.merged_at}")
        else:
            lines.append(f"  merged      {p.merge_commit} by {p.merger} on {p.merged_at}")
        if p.pr_number is not None:
            lines.append(f"  request     {p.pr_ref} (number {p.pr_number})")
    sig = f"good, signed by {p.signer} ({p.signer_key})" if p.signature == "good" else "not verified (off)"
    lines.append(f"  signature   {sig}")
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    if args.max_rate is not None and args.max_rate <= 0:
        print("syncd verify: --max-rate must be a positive number of MB/s", file=sys.stderr)
        return 2
    cfg = config.load(config.config_path(args.config), secrets=args.repair)
    lock = None
    if args.repair:  # taken before the check, which may take hours: a running daemon is said at once
        from syncd.statedir import StateLock

        lock = StateLock(cfg.state_dir)
        try:
            lock.acquire()
        except LockHeldError as exc:
            raise LockHeldError(
                f"{exc}; --repair writes the export: stop the daemon first (systemctl stop syncd), "
                "then start it again after the repair (syncd verify without --repair runs beside it)"
            ) from None
    try:
        return _verify(args, cfg)
    finally:
        if lock is not None:
            lock.release()


def _verify(args: argparse.Namespace, cfg: config.Config) -> int:
    from datetime import UTC, datetime

    from syncd import verify
    from syncd.ledger import Ledger
    from syncd.publish import Export
    from syncd.report import shown

    ledger = Ledger.in_state_dir(cfg.state_dir, readonly=True)
    try:
        published = ledger.published()
    finally:
        ledger.close()
    export = Export(cfg.export_root, cfg.staging)
    export.open(create_staging=False)  # read-only: no lock, nothing created

    def show(f: verify.Finding) -> None:
        if not args.json:
            print(shown(f"{f.kind:<10}  {f.dest}: {f.detail}"), flush=True)

    try:
        report = verify.run(
            export,
            published,
            args.prefixes,
            max_rate=args.max_rate,
            on_finding=show,
            stream=None if args.json else sys.stderr,
        )
    finally:
        export.close()
    unrepaired = len({f.dest for f in report.findings})
    if args.repair and report.findings and not report.interrupted:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        unrepaired = _repair(cfg, report.findings, stamp)
    if args.json:
        out = {
            "files": report.files,
            "bytes": report.bytes,
            "seconds": round(report.seconds, 3),
            "findings": [f.to_json() for f in report.findings],
            "interrupted": report.interrupted,
        }
        if args.repair:
            out["unrepaired"] = unrepaired
        print(json.dumps(out, indent=2))
    from syncd.progress import human

    rate = report.bytes / report.seconds / 1e6 if report.seconds > 0 else 0.0
    summary = (
        f"syncd verify: {report.files} file(s), {human(report.bytes)} checked in {report.seconds:.1f} s "
        f"({rate:.0f} MB/s): {len(report.findings)} finding(s)"
    )
    if args.repair and report.findings:
        summary += f", {unrepaired} dest(s) not repaired"
    print(summary + (" (interrupted)" if report.interrupted else ""), file=sys.stderr)
    if report.interrupted:
        return 130
    if args.repair:
        return 1 if unrepaired else 0
    return 1 if report.findings else 0


def _repair(cfg: config.Config, findings: list[Finding], stamp: str) -> int:
    """The caller holds the state lock."""
    from syncd import events
    from syncd.reconcile import Reconciler

    rec = Reconciler(cfg, events=events.EventBus([events.LogObserver()]))
    try:
        return rec.repair(findings, stamp)
    finally:
        rec.close()


def cmd_audit(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from syncd import audit
    from syncd.ledger import Ledger
    from syncd.report import escape_unencodable, shown

    cfg = config.load(config.config_path(args.config), secrets=False)
    path = cfg.state_dir / audit.FILE_NAME
    if args.verify:
        anchor = None
        if (cfg.state_dir / "ledger.sqlite3").exists():
            ledger = Ledger.in_state_dir(cfg.state_dir, readonly=True)
            try:
                seq, _, digest = (ledger.get("audit_head") or "").partition(":")
            finally:
                ledger.close()
            anchor = (int(seq), digest) if seq.isdigit() and digest else None
        result = audit.verify(path, anchor)
        if result.ok:
            print(f"syncd audit: {path}: {result.records} record(s), the chain is intact")
            if result.why:
                print(shown(f"syncd audit: note: {result.why}"))
            return 0
        print(shown(f"syncd audit: {path}: BROKEN: {result.why}"))
        return 1
    since = None
    if args.since:
        try:
            since = datetime.fromisoformat(args.since)
        except ValueError:
            print(
                f"syncd audit: --since {args.since!r} is not a date (2026-12-01 or 2026-12-01T08:00Z)",
                file=sys.stderr,
            )
            return 2
        since = since if since.tzinfo else since.replace(tzinfo=UTC)
    escape_unencodable(sys.stdout)
    for entry in audit.select(audit.read(path), since=since, dest_prefix=args.dest):
        if args.json:
            print(json.dumps(entry.record, ensure_ascii=False, separators=(",", ":")))
        else:
            print(audit.render(entry.record))
    return 0


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
    sigs = None
    if args.verify_signatures or args.allowed_signers or args.gpg_keyring:
        from syncd import signatures

        if not args.verify_signatures or not (args.allowed_signers or args.gpg_keyring):
            print(
                "syncd validate: --verify-signatures takes --allowed-signers FILE or --gpg-keyring FILE",
                file=sys.stderr,
            )
            return 2
        mode, trust = ("ssh", args.allowed_signers) if args.allowed_signers else ("gpg", args.gpg_keyring)
        why = signatures.trust_file_problem(mode, trust) or signatures.tool_problem(mode)
        if why:
            print(f"syncd validate: {why}", file=sys.stderr)
            return 2
        sigs = (mode, trust)
    storage = None
    if args.remote:
        from syncd.storage import WORKERS, Storage

        try:
            storage = Storage(cli_assets.fetcher(args, WORKERS))
        except ConfigError as exc:
            return cli_assets.config_problems("syncd validate", exc)
    elif args.artifactory or args.token_file or args.config:
        print("syncd validate: --artifactory, --token-file and -c go with --remote", file=sys.stderr)
        return 2
    try:
        report = validate(args.paths, args.base, sigs, storage)
    finally:
        if storage is not None:
            storage.fetcher.close()
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
    if report.signed:
        print(shown(f"syncd validate: {report.signed}"), file=sys.stderr)
    if report.remote_checked >= 0:
        print(f"syncd validate: {report.remote_checked} asset(s) match Artifactory", file=sys.stderr)
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
    except BrokenPipeError:  # `syncd audit | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


def run() -> None:
    sys.exit(main())
