"""Text for people: the dry-run plan, and :func:`shown`, which makes text from the repository safe to print.

Manifest file names, TOML keys, dests and sources come from the manifest repository, so anyone who can
open a pull request chooses them. Printed raw, an ESC starts a terminal escape sequence, a CR or LF forges
an extra output line, and a bidi override makes a line read differently than it is. Every line printed
for a human from such text goes through :func:`shown`. (JSON log events are escaped by JSON already.)
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, TextIO

from syncd.plan import Kind, Pruning
from syncd.progress import human

if TYPE_CHECKING:
    from syncd.reconcile import PassResult

MAX_SHOWN = 10_000  # characters of one printed line; a dest is at most 4096 bytes


def shown(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` as one line of printable characters: each non-printable character (controls, line and
    paragraph separators, bidi and zero-width format characters, lone surrogates from undecodable file
    names, non-space blanks) becomes ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``; past ``limit`` characters
    the rest is cut and counted."""
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    line = "".join(out)
    if len(line) > limit:
        line = f"{line[:limit]}... ({len(line) - limit} more characters)"
    return line


def escape_unencodable(stream: TextIO) -> None:
    """Make ``stream`` print characters its encoding cannot hold (an ASCII or Latin-1 locale) as
    backslash escapes instead of failing with a traceback."""
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(errors="backslashreplace")


def count_dry(result: PassResult) -> None:
    """Fill a dry run's counters from its plan (a dry run executes nothing, so nothing else counts)."""
    for a in result.planned:
        if a.kind is Kind.SKIP:
            result.skipped += 1
        elif a.kind is Kind.REFUSE:
            result.refused += 1
        elif a.kind is Kind.ORPHAN:
            result.orphaned += 1
        elif a.kind in (Kind.DOWNLOAD, Kind.VERIFY, Kind.RECHECK):
            result.pending += 1
            result.pending_dests.append(a.dest)


def render_plan(result: PassResult) -> str:
    """The dry-run report: one line per action, then a summary line; every line passed through
    :func:`shown`."""
    lines = [f"invalid   {p}" for problems in result.invalid.values() for p in problems]
    counts: dict[Kind, int] = dict.fromkeys(Kind, 0)
    pending = 0
    for a in result.planned:
        counts[a.kind] += 1
        size = human(a.asset.size) if a.asset else ""
        if a.kind is Kind.DOWNLOAD and a.asset:
            pending += a.asset.size
            lines.append(f"download  {a.dest}  ({size} from {a.asset.source}; {a.reason})")
        elif a.kind is Kind.SKIP:
            lines.append(f"skip      {a.dest}  ({a.reason})")
        elif a.kind is Kind.VERIFY:
            lines.append(f"verify    {a.dest}  ({a.reason}; adopted if its sha256 matches)")
        elif a.kind is Kind.RECHECK:
            lines.append(f"recheck   {a.dest}  ({a.reason}; hashed again, refused if it changed)")
        elif a.kind is Kind.REFUSE:
            lines.append(f"refuse    {a.dest}  ({a.reason})")
        elif a.kind is Kind.DEFER:
            lines.append(f"defer     {a.dest}  ({a.reason})")
        else:
            lines.append(f"orphan    {a.dest}  ({a.reason}; left in place)")
    if result.pruning is not None:
        lines += pruning_lines(result.pruning)
    lines.append(
        f"dry run at commit {result.commit[:12]}: {counts[Kind.DOWNLOAD]} to download "
        f"({human(pending)}), {counts[Kind.VERIFY]} to verify, {counts[Kind.RECHECK]} to recheck, "
        f"{counts[Kind.SKIP]} to skip, "
        f"{counts[Kind.REFUSE]} refused, {counts[Kind.ORPHAN]} orphaned, "
        f"{len(result.invalid)} invalid manifest(s); nothing was changed"
    )
    return "\n".join(shown(line) for line in lines)


def pruning_lines(pruning: Pruning) -> list[str]:
    """One line per file pruning removes (or keeps, and why), then the valve if one tripped."""
    lines = [
        f"{'forget' if r.gone else 'remove'}    {r.dest}  ({human(r.size)}, orphaned since {r.orphaned_at}"
        + ("; already gone, the ledger forgets it)" if r.gone else ")")
        for r in pruning.remove
    ]
    lines += [f"keep      {dest}  ({why})" for dest, why in pruning.kept]
    if pruning.valve:
        lines.append(f"prune refused ({pruning.valve}): {pruning.reason}; nothing would be removed")
    return lines
