"""``syncd validate`` judges what the daemon reads: the same files, the same problems, printed safely."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pygit2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import World, examples, manifest_text, toml_str
from servers import GitRepo
from syncd import gitsource, manifest, report, validate
from syncd.manifest import Asset

SHA_A = "a" * 64


def entry(dest: str, **kw: object) -> dict[str, object]:
    return {"source": f"repo/{dest}", "sha256": SHA_A, "size": 10, "dest": dest, **kw}


# the same files as the daemon ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_symlink_manifest_is_invalid_in_validate_and_in_the_daemon(world: World, git_repo: GitRepo) -> None:
    """A manifest that is a symlink in git: validate and the daemon (first pass and after a tree diff)
    report the same problem, and every other manifest still syncs."""
    world.manifest("real.toml", {**world.asset("real.bin", 100), "dest": "real.bin"})
    world.manifest("later.toml", {**world.asset("later.bin", 100), "dest": "later.bin"})
    os.symlink("real.toml", git_repo.work_path / "assets" / "link.toml")
    git_repo.commit("a symlink manifest")
    run = world.run("validate", str(git_repo.work_path / "assets"))
    assert run.code == 1
    assert run.out.splitlines() == [
        manifest.symlink_problem(str(git_repo.work_path / "assets" / "link.toml"))
    ]
    first = world.sync()
    assert first.code == 1
    assert [e["problems"] for e in first.named("manifest_invalid")] == [
        [manifest.symlink_problem("assets/link.toml")]
    ]
    assert world.export_files() == ["later.bin", "real.bin"]
    # A regular manifest turned into a symlink is found by the tree diff of the next pass too.
    (git_repo.work_path / "assets" / "later.toml").unlink()
    os.symlink("real.toml", git_repo.work_path / "assets" / "later.toml")
    git_repo.commit("another")
    second = world.sync()
    assert sorted(e["manifest"] for e in second.named("manifest_invalid")) == [
        "assets/later.toml",
        "assets/link.toml",
    ]
    assert second.named("manifest_invalid")[0]["problems"] == [manifest.symlink_problem("assets/later.toml")]


def _git(cwd: Path, *args: str) -> None:
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "protocol.file.allow=always", *args],
        cwd=cwd,
        env=env,
        check=True,
        capture_output=True,
    )


def _daemon_view(work: Path, prefix: str) -> set[str]:
    repo = pygit2.Repository(str(work))
    tree = repo.head.peel(pygit2.Commit).tree
    return set(gitsource.list_manifests(tree, prefix))


def _validate_view(work: Path, prefix: str) -> tuple[set[str], validate.Report]:
    rep = validate.Report()
    found = validate.collect([work / prefix], rep)
    return {p.relative_to(work).as_posix() for p in found.files + found.links}, rep


_NAME = st.sampled_from(["a.toml", "b.TOML", "c.Toml", "d.toml", "e", "f.txt", "g.toml"])
_KIND = st.sampled_from(["file", "exec", "link-file", "link-dir", "dir"])


@pytest.mark.integration
@settings(
    max_examples=examples(15),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.tuples(st.lists(_NAME, min_size=0, max_size=2), _NAME, _KIND), min_size=1, max_size=8))
def test_validate_lists_exactly_the_manifests_the_daemon_lists(
    tmp_path_factory: pytest.TempPathFactory, layout: list[tuple[list[str], str, str]]
) -> None:
    """For any tree of files, executables, symlinks (to files, to directories) and directories, whatever
    their names' case, validate on the work tree reads exactly the paths the daemon lists from git."""
    work = tmp_path_factory.mktemp("layout")
    top = work / "assets"
    top.mkdir()
    (top / "keep").write_text("")
    for dirs, name, kind in layout:
        parent = top.joinpath(*dirs)
        if any(p.is_file() or p.is_symlink() for p in [parent, *parent.parents] if p != work):
            continue  # a file already holds this name
        parent.mkdir(parents=True, exist_ok=True)
        path = parent / name
        if path.exists() or path.is_symlink():
            continue
        if kind == "dir":
            path.mkdir()
            (path / "x.toml").write_text("")
        elif kind.startswith("link"):
            os.symlink("../keep" if kind == "link-file" else "..", path)
        else:
            path.write_text("")
            if kind == "exec":
                path.chmod(0o755)
    _git(work, "init", "-q")
    _git(work, "add", "--all")
    _git(work, "commit", "-q", "-m", "layout")
    seen, _ = _validate_view(work, "assets")
    assert seen == _daemon_view(work, "assets")


@pytest.mark.integration
def test_submodule_is_skipped_by_both(tmp_path: Path) -> None:
    """A submodule's manifests are not in the repository: the daemon lists none, validate reads none and
    warns that it skipped it."""
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "inner.toml").write_text("")
    _git(sub, "init", "-q")
    _git(sub, "add", "--all")
    _git(sub, "commit", "-q", "-m", "sub")
    work = tmp_path / "work"
    (work / "assets").mkdir(parents=True)
    (work / "assets" / "own.toml").write_text("")
    _git(work, "init", "-q")
    _git(work, "submodule", "add", "-q", str(sub), "assets/vendored.toml")
    _git(work, "add", "--all")
    _git(work, "commit", "-q", "-m", "with a submodule")
    seen, rep = _validate_view(work, "assets")
    assert seen == _daemon_view(work, "assets") == {"assets/own.toml"}
    assert rep.warnings == [
        f"{work}/assets/vendored.toml: is a git submodule or another repository; syncd does not read "
        "its manifests"
    ]


@pytest.mark.e2e
def test_manifest_replaced_by_a_submodule_is_gone_for_the_daemon(
    world: World, git_repo: GitRepo, tmp_path: Path
) -> None:
    """A manifest replaced by a submodule of the same name is deleted for the daemon (the tree diff judges
    by mode): its asset is orphaned, not parsed from stale cache, and nothing is invalid."""
    world.manifest("keep.toml", {**world.asset("keep.bin", 50), "dest": "keep.bin"})
    world.manifest("gone.toml", {**world.asset("gone.bin", 50), "dest": "gone.bin"})
    git_repo.commit("two manifests")
    assert world.sync().code == 0
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "x.toml").write_text("")
    _git(sub, "init", "-q")
    _git(sub, "add", "--all")
    _git(sub, "commit", "-q", "-m", "sub")
    git_repo.git("rm", "-q", "assets/gone.toml")
    git_repo.git("-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "assets/gone.toml")
    git_repo.commit("gone.toml is now a submodule")
    run = world.sync()
    assert run.code == 0, run.err
    assert run.named("manifest_invalid") == []
    assert [e["dest"] for e in run.named("asset_orphaned")] == ["gone.bin"]


@pytest.mark.e2e
def test_directory_without_manifests_fails(world: World, tmp_path: Path) -> None:
    """A directory holding no *.toml file exits 1 naming it (a wrong CI path must not pass every PR);
    a '.TOML' file there is a warning that syncd ignores it."""
    empty = tmp_path / "assets"
    empty.mkdir()
    (empty / "README.md").write_text("x")
    (empty / "upper.TOML").write_text(manifest_text(entry("u.bin")))
    run = world.run("validate", str(empty))
    assert run.code == 1
    assert run.out.splitlines() == [
        f"no manifest files (*.toml) found under {empty}",
        f"warning: {empty}/upper.TOML: ends in '.TOML', not '.toml': syncd ignores it",
    ]
    assert "1 problem(s), 1 warning(s) in 0 file(s)" in run.err


@pytest.mark.e2e
def test_explicit_file_that_is_not_a_manifest_fails(world: World, tmp_path: Path) -> None:
    """A file named on the command line that the daemon would ignore (not *.toml) is a problem."""
    f = tmp_path / "m.yaml"
    f.write_text(manifest_text(entry("a.bin")))
    run = world.run("validate", str(f))
    assert run.code == 1
    assert run.out.splitlines() == [f"{f}: not a manifest: syncd reads only files whose name ends in '.toml'"]


@pytest.mark.e2e
def test_a_file_named_twice_is_read_once(world: World, tmp_path: Path) -> None:
    """Passing a directory and a file inside it checks that file once (no false duplicate dests)."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.toml").write_text(manifest_text(entry("a.bin")))
    run = world.run("validate", str(tmp_path / "m"), str(tmp_path / "m" / "a.toml"))
    assert (run.code, run.out) == (0, ""), run.out
    assert "1 file(s) OK" in run.err


# the size limit -------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_manifest_over_the_size_limit_is_refused_without_parsing(world: World, tmp_path: Path) -> None:
    """A manifest file over MAX_BYTES is one problem naming its size and the limit."""
    (tmp_path / "m").mkdir()
    big = tmp_path / "m" / "big.toml"
    body = manifest_text(entry("a.bin", description="x" * 1000))
    big.write_text(body * (manifest.MAX_BYTES // len(body) + 1))
    size = big.stat().st_size
    run = world.run("validate", str(tmp_path / "m"))
    assert run.code == 1
    assert run.out.splitlines() == [
        f"{big}: is {size:,} bytes; the limit is {manifest.MAX_BYTES:,} bytes (4 MiB) per manifest file "
        "(split it into several files)"
    ]


# lookalikes ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_case_and_normalization_lookalikes_warn_and_strict_fails(world: World, tmp_path: Path) -> None:
    """Dests equal but for case or NFC/NFD are warned about (exit 0), and fail with --strict."""
    (tmp_path / "m").mkdir()
    f = tmp_path / "m" / "a.toml"
    f.write_text(
        manifest_text(entry("Model.bin"), entry("model.bin"), entry("caf\u00e9"), entry("cafe\u0301"))
    )
    run = world.run("validate", str(tmp_path / "m"))
    assert run.code == 0, run.out
    lines = run.out.splitlines()
    # 4 lookalike lines, and NFD 'cafe' + U+0301 also ends with a combining mark (manifest.dest_warning)
    assert len(lines) == 5 and all(line.startswith("warning: ") for line in lines), lines
    assert (
        f"warning: {f}: asset[0].dest: 'Model.bin' and 'model.bin' ({f}: asset[1]) differ only by letter "
        "case or Unicode normalization (NFC/NFD); they are one file on a case-insensitive or normalizing "
        "file system"
    ) in lines
    assert "1 file(s) OK, 5 warning(s)" in run.err
    strict = world.run("validate", "--strict", str(tmp_path / "m"))
    assert strict.code == 1


def _asset(dest: str, index: int) -> Asset:
    return Asset(source="s", sha256=SHA_A, size=1, dest=dest, manifest="m.toml", index=index)


_WORD = st.text(alphabet=st.sampled_from("aAbBeE\u00e9\u00c9\u0301"), min_size=1, max_size=4)


@pytest.mark.unit
@settings(max_examples=examples(300), deadline=None, database=None)
@given(st.lists(_WORD, max_size=12))
def test_lookalikes_are_exactly_the_distinct_dests_with_one_caseless_form(dests: list[str]) -> None:
    """lookalikes() groups exactly the assets whose distinct dests fold (casefold + NFD) to one form."""
    import unicodedata

    assets = [_asset(d, i) for i, d in enumerate(dests)]
    groups = manifest.lookalikes(assets)

    def fold(s: str) -> str:
        return unicodedata.normalize("NFD", unicodedata.normalize("NFD", s).casefold())

    expected = {
        frozenset(a.index for a in assets if fold(a.dest) == fold(b.dest))
        for b in assets
        if len({a.dest for a in assets if fold(a.dest) == fold(b.dest)}) > 1
    }
    assert {frozenset(a.index for a in g) for g in groups} == expected


# printing repository text ------------------------------------------------------------------------------

_BAD = "\x1b\r\n\x00\x07\x85\u2028\u2029\u202e\u2066\u200b\u200f\ufeff\ud800"
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
_ANY_TEXT = st.text(alphabet=st.one_of(st.sampled_from(_BAD), st.characters()), max_size=40)


@pytest.mark.unit
@settings(max_examples=examples(500), deadline=None, database=None)
@given(_ANY_TEXT)
def test_shown_is_one_printable_line(text: str) -> None:
    """shown() of any text is one line of printable characters with no ESC, CR, LF, separators or bidi
    controls, and plain printable text is unchanged."""
    out = report.shown(text)
    assert out.isprintable() and not _UNSAFE.search(out)
    assert len(out.splitlines()) <= 1
    if text.isprintable():
        assert out == text


_NAME_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(_BAD.replace("\x00", "").replace("\ud800", "")),
        st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),  # undecodable bytes of a name
    ),
    max_size=40,
)
_TOML_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(_BAD.replace("\ud800", "")), st.characters(blacklist_categories=("Cs",))
    ),
    max_size=40,
)


@pytest.mark.unit
@settings(
    max_examples=examples(60),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=_NAME_TEXT, key=_TOML_TEXT, dest=_TOML_TEXT)
def test_every_validate_line_from_hostile_names_is_one_safe_line(
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    name: str,
    key: str,
    dest: str,
) -> None:
    """Whatever a manifest's file name, TOML key or dest holds, every line validate prints is one line of
    printable characters (no ESC, CR, LF, U+2028/U+2029 or bidi controls)."""
    from syncd import cli

    d = tmp_path_factory.mktemp("hostile")
    text = f"{toml_str(key)} = 1\n" + manifest_text(entry("x")).replace(
        'dest = "x"', f"dest = {toml_str(dest)}"
    )
    try:
        (d / f"{name}.toml").write_text(text, encoding="utf-8")
    except OSError:
        return  # a name this file system cannot hold (too long)
    capsys.readouterr()
    assert cli.main(["validate", str(d)]) == 1
    out = capsys.readouterr().out
    assert out.endswith("\n")
    for line in out[:-1].split("\n"):
        assert line.isprintable() and not _UNSAFE.search(line), line


@pytest.mark.unit
@settings(max_examples=examples(200), deadline=None, database=None)
@given(dest=_ANY_TEXT, source=_ANY_TEXT, reason=_ANY_TEXT, problem=_ANY_TEXT)
def test_every_dry_run_line_from_hostile_text_is_one_safe_line(
    dest: str, source: str, reason: str, problem: str
) -> None:
    """Whatever a dest, source, reason or invalid-manifest problem holds, render_plan gives one line per
    action (plus the summary) and every line is printable, with no ESC, CR, LF, separators or bidi."""
    from syncd.plan import Action, Kind
    from syncd.reconcile import PassResult

    asset = Asset(source=source, sha256=SHA_A, size=5, dest=dest, manifest=problem, index=0)
    planned = [Action(kind, dest, asset, reason) for kind in Kind]
    result = PassResult(commit="c" * 40, planned=planned, invalid={problem: (problem, reason)}, dry_run=True)
    lines = report.render_plan(result).split("\n")
    assert len(lines) == 2 + len(Kind) + 1
    for line in lines:
        assert line.isprintable() and not _UNSAFE.search(line), line


# refused characters -------------------------------------------------------------------------------------

# bidi embeddings/overrides/isolates and marks, zero-width, BOM, line separators, NEL, ALM, soft hyphen
_INVISIBLE = st.sampled_from(
    list(
        "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u200b\u200c\u200d\ufeff\u2028\u2029\x85\u061c\xad"
    )
)
_PLAIN = st.text(alphabet=st.sampled_from("abc-_.0é日"), min_size=1, max_size=8).filter(
    lambda s: s not in (".", "..")
)


@pytest.mark.unit
@settings(max_examples=examples(300), deadline=None, database=None)
@given(_PLAIN, _INVISIBLE, _PLAIN)
def test_invisible_and_bidi_characters_are_refused_in_dest_and_source(
    before: str, bad: str, after: str
) -> None:
    """A dest or source holding a bidi, zero-width, BOM, soft hyphen or line-separator character anywhere
    is refused, with its code point named; the same path without it is accepted."""
    for check in (manifest.check_dest, manifest.check_source):
        assert check(f"d/{before}{after}") == f"d/{before}{after}"
        with pytest.raises(ValueError) as info:
            check(f"d/{before}{bad}{after}")
        message = str(info.value)
        assert f"U+{ord(bad):04X} at character {2 + len(before)}" in message or (
            bad == "\x85" and message == "must not contain control characters"
        )


@pytest.mark.e2e
def test_manifest_over_the_size_limit_is_invalid_in_the_daemon(world: World, git_repo: GitRepo) -> None:
    """In the daemon a manifest blob over MAX_BYTES is invalid with validate's problem; others sync."""
    world.manifest("ok.toml", {**world.asset("ok.bin", 10), "dest": "ok.bin"})
    body = manifest_text(entry("a.bin", description="x" * 1000))
    text = body * (manifest.MAX_BYTES // len(body) + 1)
    git_repo.write("assets/big.toml", text)
    git_repo.commit("a big manifest")
    run = world.sync()
    assert run.code == 1
    assert [e["problems"] for e in run.named("manifest_invalid")] == [
        [manifest.size_problem("assets/big.toml", len(text))]
    ]
    assert world.export_files() == ["ok.bin"]
