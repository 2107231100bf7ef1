"""Property-based tests (hypothesis): the manifest parser and dest resolution never let input escape.

(a) ``manifest.parse`` on arbitrary bytes and on random TOML built from ``[[asset]]`` tables raises nothing
but :class:`ManifestError`, and every asset it accepts has a dest and source its own checks accept.
(b) Any dest ``check_dest`` accepts stays strictly inside the export root once joined and normalised, and
never lands in syncd's reserved ``.syncd*`` names.
(c) With a symlink planted in a real export directory, ``Export.observe`` never reports a file through it,
and staging + publishing through it raises :class:`PublishError` and writes nothing outside the export.
"""

from __future__ import annotations

import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import event, example, given, note, settings
from hypothesis import strategies as st

from harness import toml_str
from syncd.errors import ManifestError, PublishError
from syncd.manifest import RESERVED_PREFIX, check_dest, check_source, parse
from syncd.publish import Export, State

SHA_NEW = "e" * 64

pytestmark = pytest.mark.unit

SETTINGS = settings(max_examples=200, deadline=None, database=None)
FILE = "assets/fuzz.toml"
SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
ROOT = "/srv/nfs/ml-assets"


# helpers ----------------------------------------------------------------------------------------------


def toml_value(value: object) -> str:
    """Render a str/int/float/bool/list/dict value as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def accepted(check: object, value: str) -> bool:
    """Whether ``check(value)`` accepts it; only ValueError counts as a rejection."""
    try:
        check(value)  # type: ignore[operator]
    except ValueError:
        return False
    return True


# strategies -------------------------------------------------------------------------------------------

TRICKY_COMPONENTS = [
    "",
    ".",
    "..",
    "...",
    ".syncd",
    ".syncd-staging",
    ".syncdx",
    ".SYNCD",
    "syncd",
    "a",
    "b.bin",
    "évil",
    "日本",
    "\x00",
    "\n",
    "\x1b[31m",
    "\x7f",
    "\x85",
    "\\",
    "..\\..",
    "~",
    " ",
    "\u2024\u2024",
    "\uff0e\uff0e",
    "%2e%2e",
    "?",
    "#",
    "https:",
    "C:",
    "x" * 255,
    "x" * 256,
]
component = st.one_of(
    st.sampled_from(TRICKY_COMPONENTS),
    st.text(min_size=1, max_size=10),
    st.text(alphabet="./\\ab\x00é", min_size=1, max_size=6),
)
safe_component = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,11}", fullmatch=True)
unicode_component = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\?#"),
    min_size=1,
    max_size=8,
)
safe_path = st.lists(safe_component, min_size=1, max_size=5).map("/".join)
unicode_path = st.lists(st.one_of(safe_component, unicode_component), min_size=1, max_size=5).map("/".join)
tricky_path = st.lists(st.one_of(component, safe_component), min_size=1, max_size=6).map("/".join)
pathish = st.one_of(
    safe_path,
    unicode_path,
    tricky_path,
    st.lists(component, min_size=1, max_size=4).map(lambda c: "/" + "/".join(c)),
    st.lists(component, min_size=1, max_size=4).map(lambda c: "//" + "/".join(c)),
    st.tuples(st.sampled_from(["https://", "s3:", "file:///", "a:"]), st.text(max_size=10)).map("".join),
    st.text(max_size=30),
)
mostly_valid_path = st.one_of(safe_path, unicode_path, safe_path, pathish)
scalar = st.one_of(
    pathish,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.booleans(),
)
any_value = st.one_of(
    scalar,
    st.lists(st.integers(-5, 5) | st.text(max_size=3), max_size=3),
    st.dictionaries(st.sampled_from(["a", "b", "source"]), st.integers(0, 3), max_size=2),
)
hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
sha_value = st.one_of(
    st.just(SHA),
    st.text(alphabet="0123456789abcdefABCDEFg ", min_size=62, max_size=66),
    any_value,
)
size_value = st.one_of(st.integers(min_value=0, max_value=10**12), any_value)
FIELDS = ["source", "sha256", "size", "dest", "description", "replace", "extra", "Source"]
valid_table = st.fixed_dictionaries(
    {
        "source": safe_path,
        "sha256": st.one_of(st.just(SHA), hex64),
        "size": st.integers(0, 2**40),
        "dest": safe_path,
    },
    optional={"description": st.text(max_size=20), "replace": st.booleans()},
)
mutated_table = st.tuples(valid_table, st.sampled_from(FIELDS), st.one_of(pathish, any_value)).map(
    lambda t: {**t[0], t[1]: t[2]}
)
truncated_table = st.tuples(valid_table, st.sampled_from(FIELDS[:4])).map(
    lambda t: {k: v for k, v in t[0].items() if k != t[1]}
)
fuzzy_table = st.fixed_dictionaries(
    {},
    optional={
        "source": st.one_of(pathish, any_value),
        "sha256": sha_value,
        "size": size_value,
        "dest": st.one_of(pathish, any_value),
        "description": st.one_of(st.text(max_size=20), any_value),
        "replace": st.one_of(st.booleans(), any_value),
        "extra": any_value,
        "Source": any_value,
    },
)
asset_table = st.one_of(valid_table, valid_table, mutated_table, truncated_table, fuzzy_table)
toml_manifest = st.tuples(
    st.lists(asset_table, min_size=1, max_size=4),
    st.dictionaries(st.sampled_from(["version", "assets", "meta"]), any_value, max_size=1),
    st.sampled_from(["", "", "", "", "", "garbage = = 1\n", "[[asset]\n", "asset = 1\n", "[asset]\nx = 1\n"]),
    st.booleans(),
).map(
    lambda t: (
        ("".join(f"{k} = {toml_value(v)}\n" for k, v in t[1].items()) if t[3] else "")
        + "".join(
            "[[asset]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items()) + "\n"
            for table in t[0]
        )
        + t[2]
    )
)
VALID_MANIFEST = (
    f'[[asset]]\nsource = "ml/a.tar"\nsha256 = "{SHA}"\nsize = 10\ndest = "data/a.tar"\n\n'
    f'[[asset]]\nsource = "ml/b.tar"\nsha256 = "{SHA}"\nsize = 0\ndest = "data/b.tar"\nreplace = true\n'
).encode()


def _check_parse(data: bytes) -> None:
    """parse() raises only ManifestError; what it accepts passes every field rule."""
    try:
        assets = parse(FILE, data)
    except ManifestError as exc:
        event("rejected")
        assert exc.file == FILE
        assert exc.problems
        assert all(p.startswith(FILE + ":") for p in exc.problems), exc.problems
        return
    event(f"accepted {len(assets)} asset(s)")
    assert assets
    assert [a.index for a in assets] == list(range(len(assets)))
    assert len({a.dest for a in assets}) == len(assets)
    for a in assets:
        assert a.manifest == FILE
        assert check_dest(a.dest) == a.dest
        assert check_source(a.source) == a.source
        assert re.fullmatch(r"[0-9a-f]{64}", a.sha256)
        assert type(a.size) is int and a.size >= 0
        assert type(a.replace) is bool and type(a.description) is str


# (a) the parser ---------------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=2000))
def test_parse_arbitrary_bytes_raises_only_manifest_error(data: bytes) -> None:
    """parse() on arbitrary bytes returns valid assets or raises ManifestError, nothing else."""
    _check_parse(data)


@SETTINGS
@given(st.text(max_size=500))
def test_parse_arbitrary_text_raises_only_manifest_error(text: str) -> None:
    """parse() on arbitrary UTF-8 text returns valid assets or raises ManifestError, nothing else."""
    _check_parse(text.encode())


@SETTINGS
@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID_MANIFEST)), st.integers(0, 4), st.binary(max_size=6)), max_size=3
    )
)
def test_parse_spliced_valid_manifest_raises_only_manifest_error(edits: list[tuple[int, int, bytes]]) -> None:
    """parse() on a valid manifest with random bytes spliced in or cut out raises only ManifestError."""
    data = VALID_MANIFEST
    for at, cut, insert in edits:
        data = data[:at] + insert + data[at + cut :]
    note(repr(data))
    _check_parse(data)


@SETTINGS
@given(toml_manifest)
def test_parse_random_asset_tables_raises_only_manifest_error(text: str) -> None:
    """parse() on random [[asset]] tables with random values accepts only assets that pass the checks."""
    note(text)
    _check_parse(text.encode())


@SETTINGS
@given(
    st.lists(
        st.tuples(mostly_valid_path, st.one_of(mostly_valid_path, st.sampled_from(["a", "a/b"]))),
        min_size=1,
        max_size=4,
    )
)
def test_parse_accepts_exactly_the_assets_whose_fields_pass(pairs: list[tuple[str, str]]) -> None:
    """A file parses iff every asset's source and dest pass their checks and no dest repeats or lies
    under another (a file dest cannot also be a directory)."""
    text = "".join(
        f"[[asset]]\nsource = {toml_str(s)}\nsha256 = {toml_str(SHA)}\nsize = 1\ndest = {toml_str(d)}\n"
        for s, d in pairs
    )
    dests = [d for _, d in pairs]
    expect_ok = all(accepted(check_source, s) and accepted(check_dest, d) for s, d in pairs)
    expect_ok = expect_ok and len(set(dests)) == len(dests)
    expect_ok = expect_ok and not any(b.startswith(a + "/") for a in dests for b in dests)
    event(f"expect_ok={expect_ok}")
    try:
        assets = parse(FILE, text.encode())
    except ManifestError:
        assert not expect_ok
        return
    assert expect_ok
    assert [(a.source, a.dest) for a in assets] == pairs


# (b) dest resolution ----------------------------------------------------------------------------------


@SETTINGS
@given(pathish)
def test_accepted_dest_stays_strictly_inside_root(dest: str) -> None:
    """Any dest check_dest accepts, joined to the root and normalised, is strictly inside it, not .syncd*."""
    if not accepted(check_dest, dest):
        event("dest rejected")
        return
    event("dest accepted")
    full = os.path.normpath(os.path.join(ROOT, dest))
    assert full.startswith(ROOT + "/")
    assert full != ROOT
    assert not full.startswith(os.path.join(ROOT, RESERVED_PREFIX))
    assert full == ROOT + "/" + dest  # an accepted dest is already normal: nothing to collapse
    assert os.path.commonpath([ROOT, full]) == ROOT


# (c) a real export with a symlink planted in it -------------------------------------------------------


@dataclass
class World:
    """A real export root with symlinks pointing outside it."""

    root: Path
    outside: Path
    export: Export


def snapshot(top: Path) -> dict[str, bytes | str]:
    """Every path below ``top`` with its bytes (files), link target (symlinks) or 'dir'."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(top))
            if p.is_symlink():
                found[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = p.read_bytes()
    return found


def plant(root: Path, outside: Path) -> None:
    """Fill ``root`` with files, directories and symlinks (to ``outside``) for the walk to meet."""
    (root / "evil").symlink_to(outside)
    (root / "d").mkdir()
    (root / "d" / "evil2").symlink_to(outside)
    (root / "d" / "f").write_bytes(b"inside d/f")
    (root / "link-file").symlink_to(outside / "f")
    (root / "real").mkdir()
    (root / "real" / "file.bin").write_bytes(b"inside real/file.bin")
    (root / "dir-at-dest").mkdir()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """An export with evil -> outside-dir, d/evil2 -> outside-dir and link-file -> outside-dir/f."""
    base = tmp_path_factory.mktemp("symlink-world").resolve()
    outside = base / "outside-dir"
    (outside / "sub").mkdir(parents=True)
    (outside / "f").write_bytes(b"outside f")
    (outside / "x").write_bytes(b"outside x")
    (outside / "sub" / "f").write_bytes(b"outside sub/f")
    root = base / "export"
    root.mkdir()
    plant(root, outside)
    export = Export(root, root / ".syncd-staging")
    export.open()
    try:
        yield World(root, outside, export)
    finally:
        export.close()


NAMES = ["evil", "d", "evil2", "f", "x", "sub", "link-file", "real", "file.bin", "dir-at-dest", "new"]
INTERESTING_DESTS = [
    "evil",
    "evil/f",
    "evil/x",
    "evil/sub",
    "evil/sub/f",
    "evil/new",
    "evil/new/deeper",
    "d/evil2",
    "d/evil2/f",
    "d/evil2/sub/f",
    "link-file",
    "link-file/x",
    "d/f",
    "d/f/x",
    "real/file.bin",
    "real/file.bin/x",
    "real/new",
    "dir-at-dest",
    "dir-at-dest/new",
    "new",
    "new/deeper/x",
    "d/new",
    "d/sub/f",
]
export_component = st.one_of(st.sampled_from(NAMES), st.from_regex(r"[a-z.é]{1,6}", fullmatch=True))
export_dest = st.one_of(
    st.sampled_from(INTERESTING_DESTS),
    st.lists(export_component, min_size=1, max_size=4)
    .map("/".join)
    .filter(lambda d: accepted(check_dest, d)),
)
through_symlink_dest = (
    st.tuples(
        st.sampled_from(["evil", "d/evil2", "link-file"]),
        st.lists(export_component, max_size=3),
    )
    .map(lambda t: "/".join([t[0], *t[1]]))
    .filter(lambda d: accepted(check_dest, d))
)


def lexical_state(root: Path, dest: str) -> tuple[State, bool]:
    """What is at ``dest`` walking component by component with lstat; and whether a symlink is on the way."""
    parts = dest.split("/")
    cur = root
    for i, part in enumerate(parts):
        cur = cur / part
        try:
            st_ = os.lstat(cur)
        except FileNotFoundError:
            return State.MISSING, False
        if i < len(parts) - 1:
            if stat.S_ISLNK(st_.st_mode):
                return State.BLOCKED, True
            if not stat.S_ISDIR(st_.st_mode):
                return State.BLOCKED, False
        elif stat.S_ISLNK(st_.st_mode):
            return State.SYMLINK, True
        elif stat.S_ISREG(st_.st_mode):
            return State.FILE, False
        else:
            return State.OTHER, False
    raise AssertionError("unreachable")


@SETTINGS
@given(export_dest)
@example("evil/f")
@example("evil/sub/f")
@example("d/evil2/f")
@example("link-file")
@example("d/f")
@example("real/file.bin")
@example("dir-at-dest")
def test_observe_never_reports_a_file_through_a_symlink(world: World, dest: str) -> None:
    """observe() matches a no-follow lstat walk: a symlink on the path is BLOCKED/SYMLINK, never FILE."""
    before = snapshot(world.root.parent)
    obs = world.export.observe(dest)
    expected, via_symlink = lexical_state(world.root, dest)
    note(f"{dest!r}: observed {obs}, expected {expected}")
    event(f"observed {obs.state.value}")
    assert obs.state is expected
    if via_symlink:
        assert obs.state in (State.BLOCKED, State.SYMLINK)
    if obs.state is State.FILE:
        assert obs.size == os.lstat(world.root / dest).st_size
    assert snapshot(world.root.parent) == before  # looking creates nothing


@SETTINGS
@given(through_symlink_dest, st.booleans())
@example("evil/f", False)
@example("evil/f", True)
@example("evil/new/deeper", False)
@example("d/evil2/sub/f", True)
@example("link-file", True)
@example("link-file/x", False)
@example("evil", True)
def test_publish_through_a_symlink_is_refused_and_writes_nothing_outside(
    world: World, dest: str, replace: bool
) -> None:
    """Staging + publishing a dest through a symlink raises PublishError; nothing lands outside."""
    before = snapshot(world.root.parent)
    staged = world.export.stage(dest, SHA_NEW, len(b"payload that must not escape"))
    try:
        staged.write(b"payload that must not escape")
        with pytest.raises(PublishError):
            staged.publish(replace=replace)
    finally:
        staged.discard()
    assert snapshot(world.root.parent) == before
    assert os.listdir(world.root / ".syncd-staging") == [".syncd-staging.lock"]


@SETTINGS
@given(export_dest, st.booleans())
@example("new/deeper/x", False)
@example("d/f", True)
@example("d/f", False)
@example("evil/x", True)
@example("dir-at-dest", True)
@example("real/file.bin/x", True)
def test_publish_lands_inside_root_or_is_refused(world: World, dest: str, replace: bool) -> None:
    """With symlinks planted, publish puts the bytes at root/dest or refuses; outside is untouched."""
    outside_before = snapshot(world.outside)
    with tempfile.TemporaryDirectory(dir=world.root.parent, prefix="fresh-") as tmp:
        root = Path(tmp).resolve() / "export"
        root.mkdir()
        plant(root, world.outside)
        expected, via_symlink = lexical_state(root, dest)
        export = Export(root, root / ".syncd-staging")
        export.open()
        try:
            staged = export.stage(dest, SHA_NEW, len(b"new bytes"))
            try:
                staged.write(b"new bytes")
                staged.publish(replace=replace)
                published = True
            except PublishError:
                published = False
            finally:
                staged.discard()
            event(f"published={published}, via symlink={via_symlink}")
            note(f"{dest!r}: lexical {expected}, via symlink {via_symlink}, published {published}")
            if published:
                assert not via_symlink
                assert expected is State.MISSING or (expected is State.FILE and replace)
                p = root / dest
                assert not any(q.is_symlink() for q in [p, *p.parents] if q != root and root in q.parents)
                assert p.read_bytes() == b"new bytes"
                assert stat.S_IMODE(os.lstat(p).st_mode) == 0o444
                assert export.observe(dest).state is State.FILE
            else:
                assert via_symlink or expected in (State.BLOCKED, State.OTHER, State.FILE)
            assert os.listdir(root / ".syncd-staging") == [".syncd-staging.lock"]
        finally:
            export.close()
    assert snapshot(world.outside) == outside_before
