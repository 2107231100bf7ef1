"""Parse and validate manifest files (pure: bytes in, assets or a :class:`ManifestError` out).

A manifest is a TOML file with one or more ``[[asset]]`` tables::

    [[asset]]
    source = "ml-datasets/imagenet/v2/train-000.tar"   # path under [artifactory].url
    sha256 = "9f86d0…"                                   # 64 lowercase hex
    size = 1048576                                      # bytes, exact
    dest = "datasets/imagenet/v2/train-000.tar"         # path under [export].root
    description = "…"                                   # optional
    replace = true                                      # optional: allow changing a published dest

Problems read ``FILE:LINE: message`` when TOML gives a line, else ``FILE: asset[N].field: message``.
A file is at most :data:`MAX_BYTES` and :data:`MAX_ASSETS` assets. Across files, :func:`conflicts` finds
dests that cannot all be synced (equal, or one a directory on the other's path) and :func:`lookalikes`
dests that one case-insensitive or normalizing file system would merge. :data:`RULES_VERSION` names
these rules for caches of parses.
"""

from __future__ import annotations

import re
import tomllib
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from syncd.errors import ManifestError

# Bumped whenever parsing or validation rules change, so that parses cached by an older syncd (the
# ledger's manifest cache) are redone under the new rules.
RULES_VERSION = 2
RESERVED_PREFIX = ".syncd"
SUFFIX = ".toml"  # exactly: "a.TOML" is not a manifest (git and the daemon are case-sensitive)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1 controls
_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)$")
# Characters that are invisible or reorder text (Unicode Cf: bidi overrides and isolates, LRM/RLM,
# zero-width space/joiners, BOM, soft hyphen, ...; Zl/Zp: line and paragraph separators): a path holding
# one looks like another path, or reads differently than it is stored.
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Zl", "Zp"})
# A manifest file's limits. tomllib and validation hold the whole file in memory; with no limit a 1M-asset
# file (139 MB) took validate 48 s and 1.2 GB. At the limits (4 MiB, 10,000 assets) validate takes about
# 0.8 s and 68 MB peak RSS (0.2 s and 49 MB of which is starting Python). A bigger dataset is split into
# several files (say one per shard group), which git diffs and people review better too.
MAX_BYTES = 4 * 1024 * 1024
MAX_ASSETS = 10_000


def is_manifest_name(path: str) -> bool:
    """Whether a file at ``path`` is a manifest by its name (the daemon's rule and validate's)."""
    return path.endswith(SUFFIX)


def symlink_problem(file: str) -> str:
    """The problem line for a manifest that is a symbolic link (in git or in a work tree)."""
    return (
        f"{file}: is a symbolic link; a manifest must be a regular file (git stores the link's text, "
        "which is what syncd reads, not the file it points to)"
    )


def is_utf8_name(path: str) -> bool:
    """Whether ``path`` came from bytes that are valid UTF-8: pygit2 and ``os`` decode other bytes as
    lone surrogates (``surrogateescape``), which no UTF-8 writer (the ledger, JSON, a terminal) accepts."""
    return not any("\ud800" <= ch <= "\udfff" for ch in path)


def escape_name(path: str) -> str:
    """``path`` with each undecodable byte written ``\\xNN`` (valid UTF-8, so it can be logged and be a
    key in the ledger's manifest cache); other text unchanged."""
    if is_utf8_name(path):
        return path
    out = []
    for ch in path:
        if "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif "\ud800" <= ch <= "\udfff":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def name_problem(file: str) -> str:
    """The problem line for a manifest whose path is not valid UTF-8 (``file`` as :func:`escape_name`
    gives it)."""
    return (
        f"{file}: file name is not valid UTF-8 (undecodable bytes shown as \\xNN); rename it: syncd "
        "reads no manifest from a path it cannot record"
    )


def size_problem(file: str, size: int) -> str:
    """The problem line for a manifest file larger than :data:`MAX_BYTES`."""
    return (
        f"{file}: is {size:,} bytes; the limit is {MAX_BYTES:,} bytes (4 MiB) per manifest file "
        "(split it into several files)"
    )


def _common_path_checks(value: str) -> list[str]:
    if not value:
        raise ValueError("must not be empty")
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    for i, ch in enumerate(value):
        if unicodedata.category(ch) in _INVISIBLE_CATEGORIES:
            raise ValueError(
                f"must not contain invisible or text-direction characters (U+{ord(ch):04X} at "
                f"character {i}), which make one path look like another"
            )
    if "\\" in value:
        raise ValueError("must use '/' as separator, not '\\'")
    if value.startswith("/"):
        raise ValueError("must be a relative path, not an absolute one")
    parts = value.split("/")
    if ".." in parts:
        raise ValueError("must not contain '..'")
    if any(p in ("", ".") for p in parts):
        raise ValueError("must not contain empty or '.' path components (no '//', './' or '/' at the end)")
    if len(value.encode()) > 4096 or any(len(p.encode()) > 255 for p in parts):
        raise ValueError("is too long for a file system path")
    return parts


def check_source(value: str) -> str:
    """Validate a ``source``: a plain path under the Artifactory URL, never a URL of its own."""
    if _SCHEME.match(value) or value.startswith("//"):
        raise ValueError("must be a path under [artifactory].url, without a scheme or host")
    if "?" in value or "#" in value:
        raise ValueError("must not contain '?' or '#'")
    _common_path_checks(value)
    return value


def check_dest(value: str) -> str:
    """Validate a ``dest``: a relative path inside the export, outside syncd's reserved names."""
    parts = _common_path_checks(value)
    if parts[0].startswith(RESERVED_PREFIX):
        raise ValueError(f"must not start with '{RESERVED_PREFIX}' (reserved for syncd's own use)")
    return value


class _AssetModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    source: Annotated[str, AfterValidator(check_source)]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=2**63 - 1)
    dest: Annotated[str, AfterValidator(check_dest)]
    description: str = ""
    replace: bool = False


@dataclass(frozen=True)
class Asset:
    """One validated asset: what to fetch, what it must hash to, and where it lands."""

    source: str
    sha256: str
    size: int
    dest: str
    manifest: str
    index: int
    description: str = ""
    replace: bool = False

    def where(self) -> str:
        """``FILE: asset[N]``, for messages."""
        return f"{self.manifest}: asset[{self.index}]"


_TABLE_LINE = re.compile(rb"[ \t]*\[\[[ \t]*asset[ \t]*\]\][ \t]*(?:#.*)?")
_KEY_LINE = re.compile(rb"[ \t]*(source|sha256|size|dest)[ \t]*=")


def field_lines(data: bytes) -> list[dict[str, int]]:
    """Where each ``[[asset]]`` table of a manifest is, by a line scan: per table in order, the 1-based
    line of its header (key ``""``) and of its ``source``, ``sha256``, ``size`` and ``dest`` keys.
    A file written another way (inline tables, a multi-line string holding ``[[asset]]``) may give a
    different count of tables than its assets: the caller then names assets as ``asset[N]``."""
    tables: list[dict[str, int]] = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if _TABLE_LINE.fullmatch(line.rstrip(b"\r")):
            tables.append({"": n})
        elif tables and (m := _KEY_LINE.match(line)):
            tables[-1].setdefault(m.group(1).decode(), n)
    return tables


def parse(file: str, data: bytes) -> list[Asset]:
    """Parse one manifest file's bytes; return its assets or raise :class:`ManifestError`.

    A file over :data:`MAX_BYTES` is refused before it is decoded, one over :data:`MAX_ASSETS` assets
    before its assets are validated."""
    if len(data) > MAX_BYTES:
        raise ManifestError(file, [size_problem(file, len(data))])
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(file, [f"{file}: not UTF-8 text (byte {exc.start})"]) from None
    except RecursionError:
        raise ManifestError(file, [f"{file}: invalid TOML: nested too deeply"]) from None
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        m = _TOML_LINE.search(msg)
        if m:
            text = msg[: m.start()].rstrip()
            raise ManifestError(file, [f"{file}:{m.group(1)}: invalid TOML: {text}"]) from None
        raise ManifestError(file, [f"{file}: invalid TOML: {msg}"]) from None
    problems = [
        f"{file}: {key}: unknown top-level key (only [[asset]] tables)" for key in doc if key != "asset"
    ]
    tables = doc.get("asset")
    if tables is None:
        problems.append(f"{file}: no [[asset]] table")
        raise ManifestError(file, problems)
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        problems.append(f"{file}: asset: must be written as [[asset]] tables")
        raise ManifestError(file, problems)
    if len(tables) > MAX_ASSETS:
        problems.append(
            f"{file}: has {len(tables):,} [[asset]] tables; the limit is {MAX_ASSETS:,} per file "
            "(split it into several files)"
        )
        raise ManifestError(file, problems)
    assets = []
    for n, table in enumerate(tables):
        asset, errs = _asset(file, n, table)
        problems += errs
        if asset is not None:
            assets.append(asset)
    for dest, claims in conflicts(assets).items():
        dups = [a for a in claims if a.dest == dest]
        if len(dups) > 1:
            numbers = ", ".join(f"asset[{a.index}]" for a in dups)
            problems.append(f"{file}: {numbers}.dest: {dest!r} appears more than once")
        if len(claims) > len(dups):
            problems += conflict_problems(dest, [a for a in claims if a.dest != dest or a is dups[0]])
    if problems:
        raise ManifestError(file, problems)
    return assets


def _asset(file: str, n: int, table: dict[str, Any]) -> tuple[Asset | None, list[str]]:
    try:
        m = _AssetModel.model_validate(table)
    except ValidationError as exc:
        return None, [_problem(file, n, err) for err in exc.errors(include_url=False)]
    return Asset(
        source=m.source,
        sha256=m.sha256,
        size=m.size,
        dest=m.dest,
        manifest=file,
        index=n,
        description=m.description,
        replace=m.replace,
    ), []


def _problem(file: str, n: int, err: Any) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "?"
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        msg = "required field is missing"
    elif kind == "extra_forbidden":
        msg = "unknown field (allowed: source, sha256, size, dest, description, replace)"
    elif field == "sha256" and kind in ("string_pattern_mismatch", "string_type"):
        msg = "must be 64 lowercase hex characters (the output of sha256sum)"
    elif field == "size" and kind in ("int_type", "greater_than_equal"):
        msg = "must be a non-negative whole number of bytes"
    elif msg.startswith("Value error, "):
        msg = msg.removeprefix("Value error, ")
    return f"{file}: asset[{n}].{field}: {msg}"


def conflicts(assets: Iterable[Asset]) -> dict[str, list[Asset]]:
    """Every dest that cannot be synced because of another asset, with the assets involved.

    In: assets (from one file or many). Out: dest → its own claimants first (input order), then the
    other assets it collides with, ordered by dest. Two assets collide when their dests are equal (a
    duplicate) or when one is a proper path prefix of the other (``p`` and ``p/q``: ``p`` cannot be both
    a file and a directory; which one landed would depend on timing). Both sides are conflicts.
    Cost: one set look-up per path component of each dest (fine for 100k dests)."""
    by_dest: dict[str, list[Asset]] = defaultdict(list)
    for a in assets:
        by_dest[a.dest].append(a)
    others: dict[str, set[str]] = defaultdict(set)
    for dest in by_dest:
        cut = dest.find("/")
        while cut != -1:
            parent = dest[:cut]
            if parent in by_dest:
                others[parent].add(dest)
                others[dest].add(parent)
            cut = dest.find("/", cut + 1)
    found = {d: list(v) for d, v in by_dest.items() if len(v) > 1}
    for dest, collide in others.items():
        found[dest] = by_dest[dest] + [a for o in sorted(collide) for a in by_dest[o]]
    return found


def conflict_problems(dest: str, claims: list[Asset], limit: int = 5) -> list[str]:
    """One problem line per asset whose dest is ``dest``, naming what it collides with (at most
    ``limit`` others, then a count), for :func:`conflicts` results (``syncd validate``)."""
    own = [a for a in claims if a.dest == dest]
    overlaps = _overlaps(repr(dest), dest, claims, limit)
    lines = []
    for a in own:
        same = [o for o in own if o is not a]
        parts = [f"{dest!r} is also the dest of {_where(same, limit)}"] if same else []
        lines.append(f"{a.where()}.dest: " + "; ".join(parts + overlaps))
    return lines


def conflict_reason(dest: str, claims: list[Asset], limit: int = 5) -> str:
    """One bounded sentence for why ``dest`` (a :func:`conflicts` key) is refused, for the daemon's
    ``asset_refused`` event: at most ``limit`` other assets are named, then a count."""
    own = [a for a in claims if a.dest == dest]
    parts = [f"dest is claimed by more than one asset ({_where(own, limit)})"] if len(own) > 1 else []
    return "; ".join(parts + _overlaps("dest", dest, claims, limit)) + "; none is synced"


def _overlaps(subject: str, dest: str, claims: list[Asset], limit: int) -> list[str]:
    """What ``dest`` overlaps among ``claims``: assets under it, and assets that are files on its path."""
    parts = []
    under = [o for o in claims if o.dest.startswith(dest + "/")]
    if under:
        puts = "puts a file under it" if len(under) == 1 else "put files under it"
        parts.append(f"{subject} is a file dest but {_some(under, limit)} {puts}")
    above = [o for o in claims if dest.startswith(o.dest + "/")]
    if above:
        parts.append(
            f"{subject} needs {above[0].dest!r} to be a directory, but {_some(above, limit)} makes it a file"
        )
    return parts


def _where(claims: list[Asset], limit: int) -> str:
    more = len(claims) - limit
    return ", ".join(a.where() for a in claims[:limit]) + (f" and {more} more" if more > 0 else "")


def _some(claims: list[Asset], limit: int) -> str:
    shown = ", ".join(f"{o.dest!r} ({o.where()})" for o in claims[:limit])
    more = len(claims) - limit
    return shown + (f" and {more} more" if more > 0 else "")


def _fold(dest: str) -> str:
    """The canonical caseless form of a dest (Unicode's NFD(casefold(NFD(x)))): equal for names that
    differ only by letter case or by NFC/NFD normalization."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", dest).casefold())


def lookalikes(assets: Iterable[Asset]) -> list[list[Asset]]:
    """Groups of assets whose dests differ but fold to the same name (``Ab``/``ab``, NFC ``é``/NFD
    ``é``): distinct files on Linux, one file on a case-insensitive or normalizing file system (SMB,
    macOS clients). Each group is in input order; groups are ordered by their first dest."""
    groups: dict[str, list[Asset]] = defaultdict(list)
    for a in assets:
        groups[_fold(a.dest)].append(a)
    found = [g for g in groups.values() if len({a.dest for a in g}) > 1]
    return sorted(found, key=lambda g: g[0].dest)


def lookalike_warnings(group: list[Asset], limit: int = 5) -> list[str]:
    """One warning line (without a ``warning:`` prefix) per asset of a :func:`lookalikes` group."""
    lines = []
    for a in group:
        others = [o for o in group if o.dest != a.dest]
        lines.append(
            f"{a.where()}.dest: {a.dest!r} and {_some(others, limit)} differ only by letter case or "
            "Unicode normalization (NFC/NFD); they are one file on a case-insensitive or normalizing "
            "file system"
        )
    return lines


# Characters drawn like '/' or '.' (a dest holding one reads as another path, e.g. "datasets\u2215train"
# as "datasets/train"); NFKC maps some of them, not all, so they are listed.
_CONFUSABLE = frozenset(
    "\u2215\u2044\u29f8\uff0f\u29f5\u2216\uff3c\u2024\uff0e\u3002\u2027\u00b7\u0701\u0702"
)


def _component_warning(part: str) -> str:
    for ch in part:
        if ch in _CONFUSABLE:
            return f"holds U+{ord(ch):04X} ({unicodedata.name(ch, '?')}), which looks like '/' or '.'"
    for where, ch in (("starts", part[0]), ("ends", part[-1])):
        if ch.isspace() or unicodedata.category(ch).startswith("Z"):
            return f"{where} with whitespace U+{ord(ch):04X}"
        if unicodedata.category(ch).startswith("M"):
            return f"{where} with a combining mark U+{ord(ch):04X}"
    if unicodedata.normalize("NFKC", part) != unicodedata.normalize("NFC", part):
        return (
            "changes under Unicode NFKC normalization (a compatibility character: fullwidth, ligature, ...)"
        )
    return ""


def dest_warning(dest: str) -> str:
    """Why ``dest`` may be mistaken for another path, or "": a component that holds a character drawn
    like '/' or '.', that NFKC normalization changes, or that starts or ends with whitespace or a
    combining mark. Such dests are allowed; ``syncd validate`` warns (``--strict`` fails)."""
    for part in dest.split("/"):
        why = _component_warning(part) if part else ""
        if why:
            return f"path component {part!r} {why}; the dest may be mistaken for another path"
    return ""
