"""Manifest paths that are not valid UTF-8 (a file's or a directory's name): each is one invalid manifest,
named escaped, in the daemon (first pass, tree diff, removal) and in ``syncd validate``; nothing else
fails."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import World, examples, manifest_text
from servers import GitRepo, Nginx
from syncd import manifest, report


def _not_utf8(name: bytes) -> bool:
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# One path component holding bytes that are not UTF-8 (never '/', NUL, nor a name git refuses).
_BAD = st.binary(min_size=1, max_size=6).filter(lambda b: b"/" not in b and b"\0" not in b and _not_utf8(b))
# The bad bytes name the manifest file itself, or a directory on the way to it.
_WHERE = st.sampled_from(["file", "dir"])


def _bad_path(bad: bytes, where: str) -> bytes:
    """The repository path (bytes, under assets/) of a manifest whose name or directory is ``bad``."""
    return b"assets/" + (bad + b".toml" if where == "file" else bad + b"/m.toml")


def _write(repo: GitRepo, rel: bytes, text: str) -> None:
    path = os.path.join(os.fsencode(repo.work_path), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


def _shown(rel: bytes) -> str:
    """How syncd names ``rel``: decoded as git and os do (surrogateescape), then escaped."""
    return manifest.escape_name(rel.decode("utf-8", "surrogateescape"))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        (b"assets/\xff\xfe.toml", "assets/\\xff\\xfe.toml"),
        (b"assets/dir\xff/m.toml", "assets/dir\\xff/m.toml"),
        (b"assets/caf\xc3\xa9.toml", "assets/caf\u00e9.toml"),  # valid UTF-8 stays as it is
        (b"assets/\xc3.toml", "assets/\\xc3.toml"),  # a cut multi-byte sequence
    ],
)
def test_escape_name_writes_each_undecodable_byte_as_hex(raw: bytes, escaped: str) -> None:
    """escape_name() writes each byte that is not UTF-8 as \\xNN, leaves valid text alone, and gives UTF-8."""
    name = raw.decode("utf-8", "surrogateescape")
    assert manifest.escape_name(name) == escaped
    assert manifest.is_utf8_name(escaped)
    assert manifest.is_utf8_name(name) == (not _not_utf8(raw))
    escaped.encode("utf-8")  # never raises


@pytest.mark.e2e
@settings(
    max_examples=examples(4),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(first=_BAD, first_where=_WHERE, second=_BAD, second_where=_WHERE)
def test_non_utf8_manifest_paths_are_invalid_and_every_other_manifest_syncs(
    tmp_path_factory: pytest.TempPathFactory,
    nginx: Nginx,
    first: bytes,
    first_where: str,
    second: bytes,
    second_where: str,
) -> None:
    """For generated non-UTF-8 file or directory names: no pass fails as a whole; each bad manifest is one
    manifest_invalid naming its escaped path (first pass and tree diff); the good manifests' assets land;
    once the bad files are gone the pass is clean; validate exits 1 naming each escaped path."""
    base = tmp_path_factory.mktemp("names")
    repo = GitRepo(base / "remote" / "m.git", base / "work")
    world = World(base / "world", repo, nginx)
    bad1, bad2 = _bad_path(first, first_where), _bad_path(second, second_where)
    world.manifest("good.toml", {**world.asset("good.bin", 50), "dest": "good.bin"})
    _write(repo, bad1, manifest_text({**world.asset("bad1.bin", 50), "dest": "bad1.bin"}))
    repo.commit("a manifest path that is not UTF-8")

    one = world.sync()
    assert one.code == 1, one.err
    assert not one.named("command_failed") and not one.named("internal_error")
    assert [(e["manifest"], e["problems"]) for e in one.named("manifest_invalid")] == [
        (_shown(bad1), [manifest.name_problem(_shown(bad1))])
    ]
    assert world.export_files() == ["good.bin"]

    # The next commit is read through a tree diff: a second bad path and a good manifest arrive.
    world.manifest("good2.toml", {**world.asset("good2.bin", 50), "dest": "good2.bin"})
    _write(repo, bad2, manifest_text({**world.asset("bad2.bin", 50), "dest": "bad2.bin"}))
    repo.commit("another")
    two = world.sync()
    assert two.code == 1, two.err
    assert not two.named("command_failed") and not two.named("internal_error")
    assert sorted(e["manifest"] for e in two.named("manifest_invalid")) == sorted(
        {_shown(bad1), _shown(bad2)}
    )
    assert world.export_files() == ["good.bin", "good2.bin"]
    dry = world.sync("--dry-run")
    assert dry.code == 1 and not dry.named("internal_error"), dry.err

    check = world.run("validate", str(repo.work_path / "assets"))
    assert check.code == 1
    root = os.fsencode(repo.work_path) + b"/"
    for rel in {bad1, bad2}:
        assert report.shown(manifest.name_problem(_shown(root + rel))) in check.out.splitlines()

    for rel in {bad1, bad2}:
        os.unlink(os.path.join(os.fsencode(repo.work_path), rel))
    repo.commit("renamed away")
    three = world.sync()
    assert three.code == 0, three.err
    assert not three.named("manifest_invalid")


@pytest.mark.integration
def test_validate_names_a_non_utf8_file_given_on_the_command_line(
    world: World, tmp_path: os.PathLike[str]
) -> None:
    """A manifest path with undecodable bytes named directly to validate is a problem (exit 1), escaped."""
    d = os.fsencode(os.path.join(tmp_path, f"v-{uuid.uuid4().hex[:6]}"))
    os.makedirs(d)
    path = os.path.join(d, b"\xe9t\xe9.toml")
    with open(path, "w") as fh:
        fh.write(manifest_text({"source": "s/a", "sha256": "a" * 64, "size": 1, "dest": "a"}))
    run = world.run("validate", os.fsdecode(path))
    assert run.code == 1
    assert run.out.splitlines() == [
        report.shown(manifest.name_problem(manifest.escape_name(os.fsdecode(path))))
    ]


# Lookalike dests: drawn like another path, allowed, warned about; --strict fails ---------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("dest", "says"),
    [
        ("datasets\u2215imagenet\u2215train.tar", "U+2215"),  # DIVISION SLASH
        ("datasets\u2044train.tar", "U+2044"),  # FRACTION SLASH
        ("datasets\uff0ftrain.tar", "U+FF0F"),  # FULLWIDTH SOLIDUS
        ("datasets/train\u2024tar", "U+2024"),  # ONE DOT LEADER
        ("datasets/train\uff0etar", "U+FF0E"),  # FULLWIDTH FULL STOP
        ("datasets/train\u3002tar", "U+3002"),  # IDEOGRAPHIC FULL STOP
        ("datasets/train.tar\u3000", "ends with whitespace U+3000"),
        ("datasets/\u00a0train.tar", "starts with whitespace U+00A0"),
        ("datasets/train.tar ", "ends with whitespace U+0020"),
        ("datasets/train.tar\u0301", "ends with a combining mark U+0301"),
        ("datasets/\uff54rain.tar", "NFKC"),  # fullwidth letter
        ("datasets/\ufb01le.tar", "NFKC"),  # ligature fi
    ],
)
def test_dests_drawn_like_another_path_get_a_warning(dest: str, says: str) -> None:
    """dest_warning() names the confusable character, the edge whitespace or mark, or the NFKC change."""
    assert says in manifest.dest_warning(dest)


@pytest.mark.unit
@pytest.mark.parametrize(
    "dest",
    [
        "datasets/train.tar",
        "caf\u00e9/x.bin",
        "cafe\u0301s/x.bin",
        "\u65e5\u672c/\u30c7\u30fc\u30bf.bin",
        "a b/c d",
    ],
)
def test_plain_dests_get_no_warning(dest: str) -> None:
    """Ordinary dests (NFC or NFD accents, CJK, inner spaces) get no dest warning."""
    assert manifest.dest_warning(dest) == ""


@pytest.mark.integration
def test_lookalike_dest_warns_and_strict_fails(world: World, tmp_path: os.PathLike[str]) -> None:
    """validate prints a warning for a DIVISION SLASH dest and exits 0; with --strict it exits 1."""
    d = os.path.join(tmp_path, f"l-{uuid.uuid4().hex[:6]}")
    os.makedirs(d)
    dest = "datasets\u2215imagenet\u2215train.tar"
    with open(os.path.join(d, "m.toml"), "w") as fh:
        fh.write(manifest_text({"source": "s/a", "sha256": "a" * 64, "size": 1, "dest": dest}))
    plain = world.run("validate", d)
    assert plain.code == 0
    assert [line for line in plain.out.splitlines() if line.startswith("warning:")] == [
        report.shown(f"warning: {d}/m.toml: asset[0].dest: {manifest.dest_warning(dest)}")
    ]
    assert world.run("validate", "--strict", d).code == 1
