"""Unit: the pure parts of ``syncd manifest new`` and ``validate --remote`` (dests, TOML rendering, the
storage API's answers, line numbers, what --base leaves to ask)."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import examples
from syncd import manifest, remote
from syncd.authoring import Entry, check, dest_for, render, toml_string
from syncd.errors import FetchError
from syncd.manifest import Asset
from syncd.storage import Info, parse_info, parse_listing

pytestmark = pytest.mark.unit

SHA = "ab" * 32


@pytest.mark.parametrize(
    ("source", "top", "dest", "expected"),
    [
        ("ml/ds/a.tar", "ml/ds/a.tar", None, "ds/a.tar"),  # no --dest: below the repository key
        ("ml/a.tar", "ml/a.tar", "models/x.bin", "models/x.bin"),  # a path names the one file
        ("ml/ds/a.tar", "ml/ds/a.tar", "data/", "data/a.tar"),  # a prefix takes the file's name
        ("ml/ds/v2/sub/a.tar", "ml/ds/v2", "data/v2/", "data/v2/sub/a.tar"),  # layout below the folder
        ("ml/ds/v2/sub/a.tar", "ml/ds/v2", None, "ds/v2/sub/a.tar"),
        ("single", "single", None, "single"),  # a source with no repository part stays as it is
    ],
)
def test_dest_for(source: str, top: str, dest: str | None, expected: str) -> None:
    """Where a file lands, for each form of --dest."""
    assert dest_for(source, top, dest) == expected


_part = st.text(
    st.characters(
        codec="utf-8", exclude_categories=("Cc", "Cf", "Cs", "Zl", "Zp"), exclude_characters="/\\?#"
    ),
    min_size=1,
    max_size=12,
).filter(lambda p: p not in (".", "..") and not p.startswith(".syncd"))
_path = st.lists(_part, min_size=1, max_size=4).map("/".join)


@given(
    st.lists(
        st.tuples(_path, _path, st.integers(0, 2**63 - 1)), min_size=1, max_size=8, unique_by=lambda t: t[1]
    )
)
@settings(max_examples=examples(200), deadline=None)
def test_rendered_manifests_parse_back_to_the_same_assets(rows: list[tuple[str, str, int]]) -> None:
    """Whatever the paths (quotes, backslashes, non-ASCII), the rendered text parses to the same entries."""
    entries = [Entry(src, SHA, size, dest) for src, dest, size in rows if _valid(src, dest)]
    if not entries:
        return
    if manifest.conflicts([Asset(e.source, e.sha256, e.size, e.dest, "m", 0) for e in entries]):
        return  # 'a' and 'a/b' as dests: refused by check(), tested below
    text = render(entries)
    assert check("m.toml", text) == []
    got = {(a.source, a.sha256, a.size, a.dest) for a in manifest.parse("m.toml", text.encode())}
    assert got == {(e.source, e.sha256, e.size, e.dest) for e in entries}


def _valid(source: str, dest: str) -> bool:
    try:
        manifest.check_source(source)
        manifest.check_dest(dest)
    except ValueError:
        return False
    return True


@given(st.text(max_size=40))
@settings(max_examples=examples(300), deadline=None)
def test_toml_string_round_trips_any_text(text: str) -> None:
    """Any string (controls, DEL, quotes, surrogate-free unicode) is a TOML string that reads back equal."""
    text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    assert tomllib.loads(f"k = {toml_string(text)}")["k"] == text


def test_check_reports_what_validate_would() -> None:
    """A dest validate refuses, and two files at one dest, come back as validate's problem lines."""
    bad = render([Entry("r/a", SHA, 1, ".syncd-staging/x")])
    assert any("asset[0].dest: must not start with '.syncd'" in p for p in check("m.toml", bad))
    twice = render([Entry("r/a", SHA, 1, "same"), Entry("r/b", SHA, 1, "same")])
    assert any("'same' appears more than once" in p for p in check("m.toml", twice))


# the storage API's answers ---------------------------------------------------------------------------


def test_parse_info_reads_jfrogs_fields() -> None:
    """size is a string, checksums.sha256 is lowercased; a folder has children; no sha256 is None."""
    upper = SHA.upper()
    assert parse_info("r/a", {"size": "12", "checksums": {"sha1": "x", "sha256": upper}}) == Info(
        "r/a", size=12, sha256=SHA
    )
    assert parse_info("r/a", {"size": "0", "checksums": {"sha1": "x"}}) == Info("r/a", size=0)
    assert parse_info("r/d", {"children": [{"uri": "/x", "folder": False}]}) == Info("r/d", folder=True)


@pytest.mark.parametrize(
    "data",
    [
        [],
        "x",
        {"size": "-1"},
        {"size": "1e3"},
        {"size": " 12"},
        {"size": True},
        {"size": 1.5},
        {"size": "1" * 21},
        {"size": "1", "checksums": {"sha256": "g" * 64}},
        {"size": "1", "checksums": {"sha256": 5}},
        {"size": "1", "checksums": ["x"]},
        {"size": "5", "children": []},
    ],
)
def test_parse_info_refuses_other_shapes(data: Any) -> None:
    """What JFrog does not document is a FetchError naming the source, never a wrong number."""
    with pytest.raises(FetchError, match="'r/a'"):
        parse_info("r/a", data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["size", "checksums", "sha256", "children", "files", "uri", "folder"])
            | st.text(max_size=5),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@given(json_values)
@settings(max_examples=examples(300), deadline=None)
def test_any_json_is_an_info_or_a_fetch_error(data: Any) -> None:
    """Whatever a server sends, parsing gives a well-formed Info or a FetchError, nothing else."""
    try:
        info = parse_info("r/a", data)
    except FetchError:
        return
    assert info.folder or (info.size >= 0 and (info.sha256 is None or len(info.sha256) == 64))


@given(json_values)
@settings(max_examples=examples(300), deadline=None)
def test_any_listing_is_plain_paths_or_a_fetch_error(data: Any) -> None:
    """A listing gives sources strictly below the folder, with no '..' or empty part, or a FetchError."""
    try:
        sources = parse_listing("r/d", data)
    except FetchError:
        return
    for s in sources:
        assert s.startswith("r/d/")
        assert all(p not in ("", ".", "..") for p in s.split("/"))


def test_parse_listing_skips_folders_and_refuses_escapes() -> None:
    """Folders are left out; an entry with '..' fails the listing."""
    files = [
        {"uri": "/a/b.tar", "folder": False},
        {"uri": "/a", "folder": True},
        {"uri": "/c", "folder": "false"},
    ]
    assert parse_listing("r/d", {"files": files}) == ["r/d/a/b.tar", "r/d/c"]
    with pytest.raises(FetchError, match="not a plain path"):
        parse_listing("r/d", {"files": [{"uri": "/a/../../x", "folder": False}]})


# validate --remote ----------------------------------------------------------------------------------


def test_field_lines_finds_each_table_and_key() -> None:
    """Each [[asset]]'s header line and its keys' lines; comments and blanks in between are skipped."""
    text = b'# c\n[[asset]]\nsource = "a"\nsha256 = "x"\n\n  [[ asset ]]  # two\ndest = "d"\nsize = 3\n'
    assert manifest.field_lines(text) == [{"": 2, "source": 3, "sha256": 4}, {"": 6, "dest": 7, "size": 8}]


def _asset(dest: str, source: str = "r/a", sha: str = SHA, size: int = 1) -> Asset:
    return Asset(source, sha, size, dest, "m.toml", 0)


def test_changed_asks_about_new_and_changed_assets_only() -> None:
    """Without a base every asset; with one, a new dest or a changed source, sha256 or size."""
    same, moved, resized, fresh = _asset("a"), _asset("b", source="r/b2"), _asset("c", size=2), _asset("d")
    base = {"a": _asset("a"), "b": _asset("b", source="r/b"), "c": _asset("c")}
    assets = [same, moved, resized, fresh]
    assert remote.changed(assets, None) == assets
    assert remote.changed(assets, base) == [moved, resized, fresh]
