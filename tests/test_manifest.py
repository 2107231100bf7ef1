"""Unit tests for syncd.manifest: parsing and validating manifest files (pure, no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import examples, toml_str
from syncd.errors import ManifestError, SyncdError
from syncd.manifest import Asset, check_dest, check_source, conflicts, parse

pytestmark = pytest.mark.unit

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
SHA2 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
FILE = "assets/team/imagenet.toml"

SEP_MSG = "must not contain empty or '.' path components (no '//', './' or '/' at the end)"
SIZE_MSG = "must be a non-negative whole number of bytes"
SHA_MSG = "must be 64 lowercase hex characters (the output of sha256sum)"
SCHEME_MSG = "must be a path under [artifactory].url, without a scheme or host"
RESERVED_MSG = "must not start with '.syncd' (reserved for syncd's own use)"


def table(**fields: str | None) -> str:
    """One ``[[asset]]`` table; fields are raw TOML values, ``None`` leaves the field out."""
    values: dict[str, str | None] = {
        "source": '"ml-datasets/imagenet/v2/train-000.tar"',
        "sha256": f'"{SHA}"',
        "size": "1048576",
        "dest": '"datasets/imagenet/v2/train-000.tar"',
    }
    values.update(fields)
    body = "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None)
    return "[[asset]]\n" + body


def problems_of(text: str | bytes, file: str = FILE) -> list[str]:
    """The problems ``parse`` reports for ``text`` (fails the test if it parses)."""
    data = text.encode() if isinstance(text, str) else text
    with pytest.raises(ManifestError) as info:
        parse(file, data)
    assert info.value.file == file
    return info.value.problems


# valid files ------------------------------------------------------------------------------------------


def test_single_asset_gives_every_field_with_defaults() -> None:
    """One valid [[asset]] yields one Asset with its fields, defaults, manifest name and index 0."""
    assets = parse(FILE, table().encode())
    assert assets == [
        Asset(
            source="ml-datasets/imagenet/v2/train-000.tar",
            sha256=SHA,
            size=1048576,
            dest="datasets/imagenet/v2/train-000.tar",
            manifest=FILE,
            index=0,
            description="",
            replace=False,
        )
    ]


def test_multiple_assets_keep_order_index_and_optional_fields() -> None:
    """Several [[asset]] tables give Assets in file order, indexed 0..N-1, with optional fields read."""
    text = (
        table()
        + "\n"
        + table(
            source='"ml-models/llama/w.bin"',
            sha256=f'"{SHA2}"',
            size="0",
            dest='"models/llama/w.bin"',
            description='"weights, reviewed"',
            replace="true",
        )
        + table(source='"a"', dest='"b"', replace="false", description='""')
    )
    assets = parse(FILE, text.encode())
    assert [(a.index, a.manifest) for a in assets] == [(0, FILE), (1, FILE), (2, FILE)]
    assert assets[1] == Asset(
        source="ml-models/llama/w.bin",
        sha256=SHA2,
        size=0,
        dest="models/llama/w.bin",
        manifest=FILE,
        index=1,
        description="weights, reviewed",
        replace=True,
    )
    assert (assets[2].source, assets[2].dest, assets[2].replace, assets[2].description) == (
        "a",
        "b",
        False,
        "",
    )


def test_asset_where_names_file_and_index() -> None:
    """Asset.where() reads 'FILE: asset[N]' for use in messages."""
    assets = parse(FILE, (table() + table(dest='"other"')).encode())
    assert assets[1].where() == f"{FILE}: asset[1]"


@pytest.mark.parametrize(
    "dest",
    ["x/.syncd", "x/.syncd-staging/y", "syncd/a", "...", "a/...b", "données/été.bin", "a b/c d", "x" * 255],
)
def test_unusual_but_safe_dests_are_accepted(dest: str) -> None:
    """Dests that stay inside the export and only use .syncd below the first component are accepted."""
    assert parse(FILE, table(dest=toml_str(dest)).encode())[0].dest == dest


# field rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["source", "sha256", "size", "dest"])
def test_missing_required_field_is_named(field: str) -> None:
    """A missing required field is reported as 'FILE: asset[N].field: required field is missing'."""
    assert problems_of(table() + table(**{field: None})) == [
        f"{FILE}: asset[1].{field}: required field is missing"
    ]


def test_unknown_field_is_rejected_with_allowed_list() -> None:
    """An unknown field is an error that lists the allowed fields (a typo must not be ignored)."""
    assert problems_of(table(replaces="true")) == [
        f"{FILE}: asset[0].replaces: unknown field "
        "(allowed: source, sha256, size, dest, description, replace)"
    ]


@pytest.mark.parametrize(
    "value",
    [f'"{SHA.upper()}"', f'"{SHA[:63]}"', f'"{SHA}0"', '"' + "g" * 64 + '"', f'"{SHA[:62]} x"', '""', "1"],
    ids=["uppercase", "short", "long", "non-hex", "space", "empty", "integer"],
)
def test_bad_sha256_is_rejected(value: str) -> None:
    """A sha256 that is not exactly 64 lowercase hex characters is rejected with one clear message."""
    assert problems_of(table(sha256=value)) == [f"{FILE}: asset[0].sha256: {SHA_MSG}"]


@pytest.mark.parametrize(
    "value",
    ["-1", "1.0", "1e3", "true", '"1"', "[1]"],
    ids=["negative", "float", "exp", "bool", "str", "list"],
)
def test_bad_size_is_rejected(value: str) -> None:
    """A size that is negative, a float, a bool, a string or a list is rejected."""
    assert problems_of(table(size=value)) == [f"{FILE}: asset[0].size: {SIZE_MSG}"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("https://x/y", SCHEME_MSG),
        ("s3:bucket/k", SCHEME_MSG),
        ("file:///etc/passwd", SCHEME_MSG),
        ("//host/x", SCHEME_MSG),
        ("/abs/path", "must be a relative path, not an absolute one"),
        ("a/../b", "must not contain '..'"),
        ("..", "must not contain '..'"),
        ("a/b?x=1", "must not contain '?' or '#'"),
        ("a/b#frag", "must not contain '?' or '#'"),
        ("", "must not be empty"),
        ("a//b", SEP_MSG),
        ("./a", SEP_MSG),
        ("a\\b", "must use '/' as separator, not '\\'"),
        ("a\nb", "must not contain control characters"),
    ],
)
def test_bad_source_is_rejected(source: str, message: str) -> None:
    """A source with a scheme, host, absolute path, '..', query, fragment or that is empty is rejected."""
    assert problems_of(table(source=toml_str(source))) == [f"{FILE}: asset[0].source: {message}"]


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ("/srv/x", "must be a relative path, not an absolute one"),
        ("a/../../etc/passwd", "must not contain '..'"),
        ("..", "must not contain '..'"),
        ("a/..", "must not contain '..'"),
        ("", "must not be empty"),
        (".syncd-staging/x", RESERVED_MSG),
        (".syncdfoo", RESERVED_MSG),
        (".syncd", RESERVED_MSG),
        ("a//b", SEP_MSG),
        ("./a", SEP_MSG),
        ("a/./b", SEP_MSG),
        ("a/", SEP_MSG),
        (".", SEP_MSG),
        ("a\\b", "must use '/' as separator, not '\\'"),
        ("..\\x", "must use '/' as separator, not '\\'"),
        ("a\x00b", "must not contain control characters"),
        ("a\nb", "must not contain control characters"),
        ("a\tb", "must not contain control characters"),
        ("a\x1bb", "must not contain control characters"),
        ("a\x7fb", "must not contain control characters"),
        ("x" * 256, "is too long for a file system path"),
        ("/".join(["x" * 200] * 21), "is too long for a file system path"),
    ],
)
def test_bad_dest_is_rejected(dest: str, message: str) -> None:
    """A dest that is absolute, has '..', is empty, reserved, not normalised or has controls is rejected."""
    assert problems_of(table(dest=toml_str(dest))) == [f"{FILE}: asset[0].dest: {message}"]


@pytest.mark.parametrize("char", ["\x85", "\x9b"], ids=["NEL", "CSI"])
def test_c1_control_characters_in_dest_are_rejected(char: str) -> None:
    """A dest with a C1 control character (Unicode category Cc) is rejected like other control chars."""
    assert problems_of(table(dest=toml_str(f"a{char}b"))) == [
        f"{FILE}: asset[0].dest: must not contain control characters"
    ]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("description", "1", "Input should be a valid string"),
        ("replace", '"yes"', "Input should be a valid boolean"),
        ("replace", "1", "Input should be a valid boolean"),
        ("source", "1", "Input should be a valid string"),
        ("dest", "[]", "Input should be a valid string"),
    ],
)
def test_wrong_types_are_rejected_strictly(field: str, value: str, message: str) -> None:
    """Values of the wrong TOML type are rejected, never coerced (strict validation)."""
    assert problems_of(table(**{field: value})) == [f"{FILE}: asset[0].{field}: {message}"]


def test_duplicate_dest_within_one_file_is_rejected() -> None:
    """Two assets of one file with the same dest are reported once, naming both asset numbers."""
    text = table(dest='"x/y"') + table(dest='"z"', source='"other"') + table(dest='"x/y"', source='"b"')
    assert problems_of(text) == [f"{FILE}: asset[0], asset[2].dest: 'x/y' appears more than once"]


def test_all_problems_of_a_file_are_reported_at_once() -> None:
    """Two bad assets give two problem lines; a good asset between them adds none."""
    text = table(size="-5") + table() + table(dest='"/abs"', source='"ok/2"')
    assert problems_of(text) == [
        f"{FILE}: asset[0].size: {SIZE_MSG}",
        f"{FILE}: asset[2].dest: must be a relative path, not an absolute one",
    ]


def test_several_problems_in_one_asset_are_all_reported() -> None:
    """One asset with a missing field, a bad sha256 and an unknown field yields three problems."""
    assert problems_of(table(source=None, sha256='"nope"', colour='"red"')) == [
        f"{FILE}: asset[0].source: required field is missing",
        f"{FILE}: asset[0].sha256: {SHA_MSG}",
        f"{FILE}: asset[0].colour: unknown field (allowed: source, sha256, size, dest, description, replace)",
    ]


def test_manifest_error_str_joins_problems_and_is_a_syncd_error() -> None:
    """ManifestError is a SyncdError (exit 1) whose str() joins the problem lines with '; '."""
    with pytest.raises(ManifestError) as info:
        parse(FILE, (table(size="-1") + table(sha256='"x"', dest='"b"')).encode())
    assert isinstance(info.value, SyncdError)
    assert info.value.exit_code == 1
    assert str(info.value) == f"{FILE}: asset[0].size: {SIZE_MSG}; {FILE}: asset[1].sha256: {SHA_MSG}"


# file-level rules -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[asset]]\nsource = "a"\nsize = = 1\n', f"{FILE}:3: invalid TOML: Invalid value"),
        ('[[asset]]\nsource = "a"\nsource = "b"\n', f"{FILE}:3: invalid TOML: Cannot overwrite a value"),
        ("\n\n\n\n[[asset]\n", f"{FILE}:5: invalid TOML: Expected ']]' at the end of an array declaration"),
        ("asset = 1\n[[asset]]\n", f"{FILE}:2: invalid TOML: Cannot overwrite a value"),
        ('x = "abc', f"{FILE}: invalid TOML: Unterminated string (at end of document)"),
    ],
    ids=["line3", "duplicate-key", "line5", "redeclared", "no-line"],
)
def test_invalid_toml_reports_file_and_line(text: str, expected: str) -> None:
    """Invalid TOML gives one 'FILE:LINE: invalid TOML: ...' problem (no line when TOML gives none)."""
    assert problems_of(text) == [expected]


def test_non_utf8_file_is_rejected_with_byte_offset() -> None:
    """A file that is not UTF-8 is one problem naming the first bad byte's offset."""
    data = b'[[asset]]\nsource = "caf\xe9"\n'
    assert problems_of(data) == [f"{FILE}: not UTF-8 text (byte 23)"]


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_file_without_assets_is_rejected(text: str) -> None:
    """A file with no [[asset]] table is an error, not an empty manifest."""
    assert problems_of(text) == [f"{FILE}: no [[asset]] table"]


def test_unknown_top_level_key_is_rejected_even_with_valid_assets() -> None:
    """A top-level key other than 'asset' is an error even when the assets themselves are valid."""
    assert problems_of("version = 2\n[meta]\nx = 1\n" + table()) == [
        f"{FILE}: version: unknown top-level key (only [[asset]] tables)",
        f"{FILE}: meta: unknown top-level key (only [[asset]] tables)",
    ]


def test_unknown_top_level_key_without_assets_reports_both() -> None:
    """A file with only an unknown key reports the key and the missing [[asset]] table together."""
    assert problems_of("assets = []\n") == [
        f"{FILE}: assets: unknown top-level key (only [[asset]] tables)",
        f"{FILE}: no [[asset]] table",
    ]


@pytest.mark.parametrize(
    "text",
    ["asset = 1\n", 'asset = "x"\n', "asset = [1, 2]\n", '[asset]\nsource = "a"\n', "asset = [{}, 1]\n"],
    ids=["int", "string", "int-list", "single-table", "mixed-list"],
)
def test_asset_that_is_not_an_array_of_tables_is_rejected(text: str) -> None:
    """'asset' must be written as [[asset]] tables; any other shape is one clear problem."""
    assert problems_of(text) == [f"{FILE}: asset: must be written as [[asset]] tables"]


def test_empty_asset_table_reports_every_missing_field() -> None:
    """An empty [[asset]] table reports each of the four required fields as missing."""
    assert problems_of("[[asset]]\n") == [
        f"{FILE}: asset[0].{f}: required field is missing" for f in ("source", "sha256", "size", "dest")
    ]


@pytest.mark.parametrize("data", [b"x = " + b"[" * 5000, b"x = " + b"{a=" * 5000], ids=["arrays", "inline"])
def test_deeply_nested_toml_is_a_manifest_error(data: bytes) -> None:
    """A pathologically nested TOML file is one ManifestError problem, never a RecursionError."""
    assert problems_of(data) == [f"{FILE}: invalid TOML: nested too deeply"]


# conflicts() and the path checks ---------------------------------------------------------------------


def _asset(dest: str, manifest: str, index: int = 0) -> Asset:
    return Asset(source="s", sha256=SHA, size=1, dest=dest, manifest=manifest, index=index)


def test_duplicates_across_files_lists_every_claim() -> None:
    """conflicts() maps each dest claimed more than once to all its claimants, in input order."""
    a, b, c, d = (
        _asset("x", "a.toml"),
        _asset("y", "a.toml", 1),
        _asset("x", "b.toml"),
        _asset("x", "c.toml", 4),
    )
    assert conflicts([a, b, c, d]) == {"x": [a, c, d]}


def test_duplicates_of_unique_dests_is_empty() -> None:
    """conflicts() is empty when every dest is claimed once (and for no assets at all)."""
    assert conflicts([_asset("x", "a.toml"), _asset("y", "a.toml")]) == {}
    assert conflicts([_asset("p", "a.toml"), _asset("pq/r", "a.toml"), _asset("p.d/x", "a.toml")]) == {}
    assert conflicts([]) == {}


def test_file_dest_and_dest_under_it_are_both_conflicts() -> None:
    """'p' and 'p/q/r' (two files) are both conflicts, each listing itself first, then the other."""
    p, q = _asset("p", "a.toml"), _asset("p/q/r", "b.toml", 3)
    assert conflicts([p, q]) == {"p": [p, q], "p/q/r": [q, p]}


def test_overlap_within_one_file_makes_the_file_invalid() -> None:
    """A file dest and a dest under it in one file: both reported, naming FILE asset[N]."""
    text = table(dest='"p"') + table(dest='"p/q"', source='"b"')
    assert problems_of(text) == [
        f"{FILE}: asset[0].dest: 'p' is a file dest but 'p/q' ({FILE}: asset[1]) puts a file under it",
        f"{FILE}: asset[1].dest: 'p/q' needs 'p' to be a directory, but 'p' ({FILE}: asset[0]) "
        "makes it a file",
    ]


_SEGMENT = st.sampled_from(["a", "b", "a.b", "ab", "c"])
_DEST = st.lists(_SEGMENT, min_size=1, max_size=4).map("/".join)


def _collide(x: str, y: str) -> bool:
    return x == y or x.startswith(y + "/") or y.startswith(x + "/")


@settings(max_examples=examples(300), deadline=None, database=None)
@given(st.lists(_DEST, max_size=30))
def test_conflicts_equal_a_brute_force_pairwise_check(dests: list[str]) -> None:
    """For any set of dests, conflicts() names exactly the dests that are equal to or a proper path
    prefix of another asset's dest, each with exactly the assets it collides with."""
    assets = [_asset(d, "m.toml", i) for i, d in enumerate(dests)]
    expected: dict[str, set[int]] = {}
    for a in assets:
        for b in assets:
            if a is not b and _collide(a.dest, b.dest):
                expected.setdefault(a.dest, {a.index}).update({a.index, b.index})
    got = conflicts(assets)
    assert {d: {a.index for a in v} for d, v in got.items()} == expected
    for dest, claims in got.items():
        assert len(claims) == len({id(a) for a in claims})
        own = [a for a in claims if a.dest == dest]
        assert claims[: len(own)] == [a for a in assets if a.dest == dest]


def test_conflicts_of_100k_dests_is_fast() -> None:
    """100,000 dests (deep paths, one overlap) are checked in well under a second."""
    import time

    assets = [_asset(f"d{i % 100}/s{i % 7}/f{i}.bin", "m.toml", i) for i in range(100_000)]
    assets.append(_asset("d5/s3", "n.toml"))
    start = time.monotonic()
    got = conflicts(assets)
    assert time.monotonic() - start < 2.0
    assert len(got) == 1 + sum(1 for a in assets if a.dest.startswith("d5/s3/"))


def test_check_functions_return_the_value_or_raise_value_error() -> None:
    """check_source/check_dest return the accepted value unchanged and raise ValueError otherwise."""
    assert check_source("a/b.tar") == "a/b.tar"
    assert check_dest("a/b.tar") == "a/b.tar"
    with pytest.raises(ValueError, match=r"^must not contain '\.\.'$"):
        check_dest("a/../b")
    with pytest.raises(
        ValueError, match=r"^must be a path under \[artifactory\]\.url, without a scheme or host$"
    ):
        check_source("http://evil/")


# limits -----------------------------------------------------------------------------------------------


def test_file_over_the_byte_limit_is_refused_before_decoding() -> None:
    """A file of MAX_BYTES + 1 bytes (not even TOML) is one problem naming its size and the limit."""
    from syncd.manifest import MAX_BYTES

    assert problems_of(b"\xff" * (MAX_BYTES + 1)) == [
        f"{FILE}: is {MAX_BYTES + 1:,} bytes; the limit is {MAX_BYTES:,} bytes (4 MiB) per manifest file "
        "(split it into several files)"
    ]


def test_file_at_the_byte_limit_is_parsed() -> None:
    """A valid file of exactly MAX_BYTES bytes (padded with a comment) parses."""
    from syncd.manifest import MAX_BYTES

    text = table().encode()
    assert len(parse(FILE, text + b"#" + b"x" * (MAX_BYTES - len(text) - 2) + b"\n")) == 1


def test_file_over_the_asset_limit_is_refused_before_validating_assets() -> None:
    """MAX_ASSETS + 1 [[asset]] tables are one problem (the assets are not validated one by one)."""
    from syncd.manifest import MAX_ASSETS

    text = "[[asset]]\n" * (MAX_ASSETS + 1)
    assert problems_of(text) == [
        f"{FILE}: has {MAX_ASSETS + 1:,} [[asset]] tables; the limit is {MAX_ASSETS:,} per file "
        "(split it into several files)"
    ]
    assert len(problems_of("[[asset]]\n" * MAX_ASSETS)) == MAX_ASSETS * 4  # validated: 4 missing fields


def test_rules_version_is_an_int() -> None:
    """RULES_VERSION is an int (the ledger's manifest cache is keyed on it); 2 since issue 7's rules."""
    from syncd.manifest import RULES_VERSION

    assert isinstance(RULES_VERSION, int) and RULES_VERSION >= 2


def test_conflict_reason_is_precise_and_bounded() -> None:
    """conflict_reason() says duplicate or overlap, names at most 5 other assets and counts the rest."""
    from syncd.manifest import conflict_reason

    a, b = _asset("x", "a.toml", 2), _asset("x", "b.toml")
    assert conflict_reason("x", [a, b]) == (
        "dest is claimed by more than one asset (a.toml: asset[2], b.toml: asset[0]); none is synced"
    )
    p = _asset("p", "a.toml")
    under = [_asset(f"p/{i}", "b.toml", i) for i in range(100_000)]
    got = conflicts([p, *under])
    reason = conflict_reason("p", got["p"])
    assert reason.startswith("dest is a file dest but 'p/0' (b.toml: asset[0]), ")
    assert reason.endswith(" and 99995 more put files under it; none is synced")
    assert len(reason) < 300
    assert conflict_reason("p/7", got["p/7"]) == (
        "dest needs 'p' to be a directory, but 'p' (a.toml: asset[0]) makes it a file; none is synced"
    )
