"""Unit tests for syncd.plan: desired state + ledger + observed export → actions (pure, no I/O)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import examples
from syncd.ledger import Published
from syncd.manifest import Asset
from syncd.plan import Action, Kind, plan, signature_gate, verify_slice
from syncd.publish import Observation, State

pytestmark = pytest.mark.unit

OLD = "1" * 64
NEW = "2" * 64
COMMIT = "abcdef0123456789abcdef0123456789abcdef01"
MISSING = Observation(State.MISSING)


# The refusal's stable name for each observation, the notifiers' dedup key.
_CAUSES = {State.SYMLINK: "symlink", State.OTHER: "not_a_file", State.BLOCKED: "blocked_path"}


def asset(dest: str = "d/file.bin", sha256: str = OLD, size: int = 100, **kw: object) -> Asset:
    """An Asset from manifest 'm.toml' (index 0 unless given)."""
    fields: dict[str, object] = {"source": f"src/{dest}", "manifest": "m.toml", "index": 0}
    fields.update(kw)
    return Asset(sha256=sha256, size=size, dest=dest, **fields)  # type: ignore[arg-type]


def published(
    dest: str = "d/file.bin", sha256: str = OLD, size: int = 100, manifest: str = "m.toml"
) -> Published:
    """A ledger row for ``dest`` published from ``manifest`` at COMMIT."""
    return Published(
        dest=dest,
        sha256=sha256,
        size=size,
        source=f"src/{dest}",
        manifest=manifest,
        commit=COMMIT,
        published_at="2024-05-01T12:00:00+00:00",
        how="downloaded",
        orphaned_at=None,
    )


def one(a: Asset, known: Published | None, seen: Observation) -> Action:
    """The single action planned for one desired asset."""
    actions = plan({a.dest: a}, {}, {a.dest: known} if known else {}, {a.dest: seen})
    assert len(actions) == 1
    return actions[0]


def test_new_dest_is_downloaded() -> None:
    """Nothing at dest and nothing in the ledger → download, reason 'new'."""
    a = asset()
    assert one(a, None, MISSING) == Action(Kind.DOWNLOAD, a.dest, a, "new", replace=False)


def test_unknown_file_at_dest_is_verified() -> None:
    """A file the ledger does not know is at dest → verify (hash once, adopt if it matches)."""
    a = asset()
    assert one(a, None, Observation(State.FILE, size=100)) == Action(
        Kind.VERIFY, a.dest, a, "a file not published by syncd is at dest"
    )


def test_unknown_file_of_other_size_is_still_verified_not_downloaded() -> None:
    """An unknown file is verified even when its size differs: verify refuses it, it is never overwritten."""
    a = asset()
    assert one(a, None, Observation(State.FILE, size=7)).kind is Kind.VERIFY


def test_published_same_sha_and_size_is_skipped() -> None:
    """Ledger has the same sha256 and a file of the ledger's size is there → skip."""
    a = asset()
    assert one(a, published(), Observation(State.FILE, size=100)) == Action(
        Kind.SKIP, a.dest, a, "already published"
    )


def test_published_file_gone_is_downloaded_again() -> None:
    """Ledger has the same sha256 but the file is missing (deleted by hand) → download, it comes back."""
    a = asset()
    assert one(a, published(), MISSING) == Action(
        Kind.DOWNLOAD, a.dest, a, "published before but missing from the export", replace=False
    )


def test_published_file_with_changed_size_is_refused() -> None:
    """Ledger has the same sha256 but the file's size differs (changed by hand) → refuse, never overwrite."""
    a = asset()
    assert one(a, published(), Observation(State.FILE, size=99)) == Action(
        Kind.REFUSE,
        a.dest,
        a,
        "file at dest was changed outside syncd (size 99, ledger says 100)",
        cause="changed_outside",
    )


@pytest.mark.parametrize("seen", [Observation(State.FILE, size=100), MISSING], ids=["file", "missing"])
def test_changed_sha_without_replace_is_refused(seen: Observation) -> None:
    """A manifest that changes a published dest's sha256 without replace = true is refused."""
    a = asset(sha256=NEW)
    assert one(a, published(), seen) == Action(
        Kind.REFUSE,
        a.dest,
        a,
        f"dest was published with sha256 {OLD} (commit {COMMIT[:12]}); "
        "changing a published file needs replace = true in the manifest",
        cause="sha256_changed",
    )


@pytest.mark.parametrize("seen", [Observation(State.FILE, size=100), MISSING], ids=["file", "missing"])
def test_changed_sha_with_replace_is_downloaded_as_replacement(seen: Observation) -> None:
    """A changed sha256 with replace = true → download with replace=True."""
    a = asset(sha256=NEW, size=5, replace=True)
    assert one(a, published(), seen) == Action(
        Kind.DOWNLOAD, a.dest, a, "replace = true: new content", replace=True
    )


def test_replace_flag_with_unchanged_sha_is_a_plain_skip() -> None:
    """replace = true on an asset whose sha256 did not change does not re-download it."""
    a = asset(replace=True)
    assert one(a, published(), Observation(State.FILE, size=100)).kind is Kind.SKIP


@pytest.mark.parametrize(
    "seen",
    [
        Observation(State.SYMLINK, detail="a symlink is at dest"),
        Observation(State.OTHER, detail="something other than a regular file is at dest"),
        Observation(State.BLOCKED, detail="d is a symlink or not a directory; refused"),
    ],
    ids=["symlink", "other", "blocked"],
)
@pytest.mark.parametrize("known", [None, "same", "changed"], ids=["unknown", "published", "sha-changed"])
def test_symlink_other_or_blocked_dest_is_refused(seen: Observation, known: str | None) -> None:
    """A symlink, non-file or blocked path at dest is refused whatever the ledger says (even with replace)."""
    a = asset(replace=True)
    row = None if known is None else published(sha256=OLD if known == "same" else NEW)
    assert one(a, row, seen) == Action(
        Kind.REFUSE, a.dest, a, f"{seen.detail}; refusing to write there", cause=_CAUSES[seen.state]
    )


def test_conflicting_claims_are_refused_naming_every_manifest() -> None:
    """A dest claimed by two manifests is refused with both FILE: asset[N] named; none is synced."""
    a = asset("shared/x", manifest="teams/a.toml", index=2)
    b = asset("shared/x", sha256=NEW, manifest="teams/b.toml", index=0)
    assert plan({}, {"shared/x": [a, b]}, {}, {}) == [
        Action(
            Kind.REFUSE,
            "shared/x",
            a,
            "dest is claimed by more than one asset (teams/a.toml: asset[2], teams/b.toml: asset[0]); "
            "none is synced",
            cause="conflict",
        )
    ]


def test_overlap_reason_names_the_overlap_and_stays_bounded() -> None:
    """A file dest with thousands of dests under it is refused with a short reason naming the overlap."""
    top = asset("data/p", manifest="a.toml", index=0)
    under = [asset(f"data/p/{i}", manifest="b.toml", index=i) for i in range(5000)]
    (action,) = plan({}, {"data/p": [top, *under]}, {}, {})
    assert action.kind is Kind.REFUSE and action.dest == "data/p"
    assert "is a file dest but" in action.reason and "4995 more put files under it" in action.reason
    assert len(action.reason) < 1000


def test_published_dest_no_longer_desired_is_orphaned() -> None:
    """A ledger dest that no manifest lists any more → orphan (left in place), naming its old manifest."""
    assert plan({}, {}, {"old/f": published("old/f", manifest="gone.toml")}, {}) == [
        Action(Kind.ORPHAN, "old/f", None, "no manifest lists it any more (was gone.toml)")
    ]


def test_conflicted_published_dest_is_not_an_orphan() -> None:
    """A published dest that is now claimed twice is refused as a conflict, not reported as orphaned."""
    a, b = asset("x", manifest="a.toml"), asset("x", manifest="b.toml")
    actions = plan({}, {"x": [a, b]}, {"x": published("x")}, {})
    assert [(act.kind, act.dest) for act in actions] == [(Kind.REFUSE, "x")]


def test_empty_inputs_give_an_empty_plan() -> None:
    """No desired assets, conflicts or ledger rows → no actions."""
    assert plan({}, {}, {}, {}) == []


def test_order_is_desired_sorted_then_conflicts_then_orphans() -> None:
    """Actions come as desired dests in sorted order, then conflicts sorted, then orphans sorted."""
    desired = {d: asset(d) for d in ("z/last", "a/first", "m/middle")}
    observed = {"z/last": MISSING, "a/first": MISSING, "m/middle": Observation(State.FILE, size=100)}
    conflicts = {
        "y/conf": [asset("y/conf", manifest="1.toml"), asset("y/conf", manifest="2.toml")],
        "b/conf": [asset("b/conf", manifest="1.toml"), asset("b/conf", manifest="3.toml")],
    }
    ledger = {d: published(d) for d in ("q/orphan", "c/orphan", "m/middle")}
    actions = plan(desired, conflicts, ledger, observed)
    assert [(a.kind, a.dest) for a in actions] == [
        (Kind.DOWNLOAD, "a/first"),
        (Kind.SKIP, "m/middle"),
        (Kind.DOWNLOAD, "z/last"),
        (Kind.REFUSE, "b/conf"),
        (Kind.REFUSE, "y/conf"),
        (Kind.ORPHAN, "c/orphan"),
        (Kind.ORPHAN, "q/orphan"),
    ]


@pytest.mark.parametrize("known", [None, "same", "changed"], ids=["unknown", "published", "sha-changed"])
def test_uninspectable_dest_is_refused_alone_whatever_the_ledger_says(known: str | None) -> None:
    """An UNREADABLE dest (EACCES/ESTALE/EIO on its directory) is refused with the errno detail; the
    other dests of the plan are planned as usual."""
    bad = asset("locked/x", replace=True)
    good = asset("open/y")
    seen = Observation(State.UNREADABLE, detail="cannot inspect dest: Permission denied (EACCES)")
    row = {} if known is None else {"locked/x": published("locked/x", sha256=OLD if known == "same" else NEW)}
    actions = plan({bad.dest: bad, good.dest: good}, {}, row, {bad.dest: seen, good.dest: MISSING})
    assert actions == [
        Action(Kind.REFUSE, bad.dest, bad, f"{seen.detail}; left alone this pass", cause="unreadable"),
        Action(Kind.DOWNLOAD, good.dest, good, "new"),
    ]


@pytest.mark.parametrize(
    ("dest", "refused"),
    [
        ("stage", True),
        ("stage/x.bin", True),
        ("stage/deep/er/x.bin", True),
        ("stage2/x.bin", False),
        ("stag", False),
        ("other/stage/x.bin", False),
    ],
)
def test_dest_at_or_under_staging_is_refused(dest: str, refused: bool) -> None:
    """With staging inside the export at 'stage', a dest equal to it or below it is refused naming
    export.staging; names that merely share a prefix are planned normally."""
    a = asset(dest)
    actions = plan({dest: a}, {}, {}, {dest: MISSING}, staging="stage")
    if refused:
        assert actions == [
            Action(
                Kind.REFUSE,
                dest,
                a,
                "dest is syncd's staging directory (export.staging = stage) or lies under it; refused",
                cause="in_staging",
            )
        ]
    else:
        assert [x.kind for x in actions] == [Kind.DOWNLOAD]


def test_no_staging_inside_the_export_refuses_nothing() -> None:
    """staging=None (staging outside the export) changes no action."""
    a = asset("stage/x.bin")
    assert plan({a.dest: a}, {}, {}, {a.dest: MISSING}, staging=None)[0].kind is Kind.DOWNLOAD


def test_every_refusal_cause_is_a_documented_stable_name() -> None:
    """The causes the engine gives refusals (plan and reconcile) are exactly plan.REFUSALS, and each is
    listed in docs/notifications.md (they are the notifiers' dedup keys); a recheck's causes are RECHECKS."""
    import re
    from pathlib import Path

    from syncd.plan import RECHECKS, REFUSALS

    root = Path(__file__).resolve().parent.parent
    src = (root / "src/syncd/plan.py").read_text() + (root / "src/syncd/reconcile.py").read_text()
    used = set(re.findall(r'"(\w+)"', "\n".join(re.findall(r"cause=.*|State\.\w+: \"\w+\".*", src))))
    assert used == set(REFUSALS) | set(RECHECKS) and not set(REFUSALS) & set(RECHECKS)
    docs = (root / "docs/notifications.md").read_text()
    assert all(f"`{cause}`" in docs for cause in REFUSALS)


# identities: the per-pass check that a published file is still the one syncd recorded -----------------
ID = "11:1000:2000:444"


def file_seen(identity: str = ID, size: int = 100, mode: int = 0o444) -> Observation:
    return Observation(State.FILE, size=size, identity=identity, mode=mode)


@pytest.mark.parametrize(
    ("recorded", "damaged", "seen", "recheck", "kind"),
    [
        (ID, None, ID, False, Kind.SKIP),  # nothing changed: no re-hash (a pass stays a stat walk)
        ("", None, ID, False, Kind.SKIP),  # recorded before identities (schema 4): trusted, recorded
        (ID, None, "11:1000:2001:444", False, Kind.RECHECK),  # ctime moved: an in-place edit, a chmod
        (ID, None, "12:1000:2000:444", False, Kind.RECHECK),  # another inode: a swapped file
        (ID, None, "11:1000:2000:644", False, Kind.RECHECK),  # mode
        (ID, None, ID, True, Kind.RECHECK),  # the periodic verification's slice
        (ID, "re-hashed: bad", ID, False, Kind.REFUSE),  # found damaged, unchanged since: refused
        (ID, "re-hashed: bad", ID, True, Kind.REFUSE),  # … without hashing it again
        (ID, "re-hashed: bad", "11:1000:2009:444", False, Kind.RECHECK),  # touched since: hash again
    ],
)
def test_identity_decides_between_skip_recheck_and_refuse(
    recorded: str, damaged: str | None, seen: str, recheck: bool, kind: Kind
) -> None:
    a = asset()
    known = dataclasses.replace(published(), identity=recorded, damaged=damaged)
    actions = plan(
        {a.dest: a},
        {},
        {a.dest: known},
        {a.dest: file_seen(seen)},
        recheck=frozenset({a.dest} if recheck else ()),
    )
    assert actions[0].kind is kind
    if kind is Kind.REFUSE:
        assert actions[0].cause == "changed_outside" and "syncd verify --repair" in actions[0].reason


def test_size_change_is_refused_before_any_rehash() -> None:
    """A size change needs no hash: refused as changed_outside whatever the identity says."""
    a = asset()
    known = dataclasses.replace(published(), identity=ID)
    act = one(a, known, file_seen("99:1:2:444", size=101))
    assert (act.kind, act.cause) == (Kind.REFUSE, "changed_outside")


@pytest.mark.parametrize(
    ("head_ok", "last", "last_ok", "served"),
    [
        (True, "b" * 40, False, "a" * 40),  # a good head is served, whatever came before
        (True, None, False, "a" * 40),
        (False, "b" * 40, True, "b" * 40),  # refused: the last verified commit is still served
        (False, "b" * 40, False, None),  # … unless it does not verify either: nothing is planned
        (False, None, False, None),  # first pass, unsigned head: nothing
        (False, "a" * 40, True, None),  # the last one is the head itself: no fallback
    ],
)
def test_signature_gate(head_ok: bool, last: str | None, last_ok: bool, served: str | None) -> None:
    assert signature_gate("a" * 40, head_ok, last, last_ok) == served


@given(
    st.dictionaries(st.text("abc/", min_size=1, max_size=6), st.integers(0, 10**6), max_size=30),
    st.floats(0.001, 1.0),
)
@settings(max_examples=examples(200), deadline=None)
def test_verify_slices_cover_every_file_once_per_round(sizes: dict[str, int], share: float) -> None:
    """Passes of slices, each starting after the last one's cursor, visit every dest within about
    1/share passes and never take more than the share (beyond a first file) per pass."""
    cursor, seen, passes = "", set(), 0
    total = sum(sizes.values())
    while len(seen) < len(sizes) and passes < 10_000:
        picked, new = verify_slice(sizes, cursor, share, cap=float("inf"))
        assert picked and new == picked[-1]
        assert sum(sizes[d] for d in picked[1:]) <= total * share + 1e-6
        seen |= set(picked)
        cursor, passes = new, passes + 1
    assert seen == set(sizes)
    assert verify_slice({}, "", share, 1.0) == ([], None)
