"""Unit: :func:`syncd.plan.prune`, the decision of which orphans a pass removes (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import examples
from syncd.ledger import How, Published
from syncd.plan import VALVES, prune
from syncd.publish import Observation, State

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
DAY = 86400.0
IDENT = "11:22:33:292"


def row(
    dest: str, *, orphaned: float | None = 8 * DAY, identity: str = IDENT, size: int = 10, **kw: object
) -> Published:
    """A published row, orphaned ``orphaned`` seconds before NOW (None: still wanted)."""
    since = None if orphaned is None else (NOW - timedelta(seconds=orphaned)).isoformat(timespec="seconds")
    fields: dict[str, object] = {"manifest": "assets/m.toml", "damaged": None, **kw}
    published_at = "2026-11-01T00:00:00+00:00"
    return Published(dest, "a" * 64, size, "r/" + dest, str(fields["manifest"]), "c" * 40, published_at,
                     How.DOWNLOADED, since, identity, fields["damaged"])  # type: ignore[arg-type]  # fmt: skip


def seen(identity: str = IDENT, size: int = 10) -> Observation:
    return Observation(State.FILE, size=size, identity=identity, mode=0o444)


def decide(rows: list[Published], observed: dict[str, Observation] | None = None, **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "grace": 7 * DAY,
        "max_files": 100,
        "max_fraction": 1.0,
        "head_assets": 5,
        **kw,
    }
    obs = observed if observed is not None else {r.dest: seen() for r in rows if r.orphaned_at}
    return prune({r.dest: r for r in rows}, obs, now=NOW, **args)  # type: ignore[arg-type]


def test_an_orphan_past_the_grace_that_is_unchanged_goes() -> None:
    """Orphaned 8 days with a 7-day grace, same identity and size: removed; wanted rows are not considered."""
    p = decide([row("old.bin"), row("wanted.bin", orphaned=None)])
    assert [r.dest for r in p.remove] == ["old.bin"] and p.kept == [] and p.valve == ""


def test_within_the_grace_it_stays_and_says_until_when() -> None:
    """Orphaned 6 days: kept, with the time it becomes removable."""
    p = decide([row("young.bin", orphaned=6 * DAY)])
    assert p.remove == []
    assert p.kept[0][0] == "young.bin" and "removable after 2026-12-04T12:00:00Z" in p.kept[0][1]


@pytest.mark.parametrize(
    ("observation", "why"),
    [
        (seen(identity="99:22:33:292"), "changed since syncd recorded it"),  # another inode
        (seen(identity="11:22:44:292"), "changed since syncd recorded it"),  # new ctime (chmod, rewrite)
        (seen(size=11), "changed since syncd recorded it"),
        (Observation(State.SYMLINK, detail="a symlink is at dest"), "not a regular file"),
        (Observation(State.BLOCKED, detail="ds is a symlink"), "not a regular file"),
        (Observation(State.OTHER), "not a regular file"),
        (Observation(State.UNREADABLE, detail="EACCES"), "not a regular file"),
    ],
)
def test_a_file_not_exactly_as_recorded_stays(observation: Observation, why: str) -> None:
    """Anything but the recorded regular file (identity, size) at dest: kept, never removed."""
    p = decide([row("x.bin")], {"x.bin": observation})
    assert p.remove == [] and why in p.kept[0][1]


def test_without_a_recorded_identity_or_when_damaged_it_stays() -> None:
    """A row from before identities were recorded, or one a re-hash found damaged: kept."""
    p = decide([row("old.bin", identity=""), row("bad.bin", damaged="re-hashed: bad")])
    assert p.remove == [] and [d for d, _ in p.kept] == ["bad.bin", "old.bin"]


def test_a_missing_file_is_forgotten_and_counts_for_no_valve() -> None:
    """Nothing at dest: the row goes (gone), and does not count toward max_files."""
    p = decide([row("gone.bin")], {"gone.bin": Observation(State.MISSING)}, max_files=0)
    assert [(r.dest, r.gone) for r in p.remove] == [("gone.bin", True)] and p.valve == ""


def test_while_any_manifest_is_invalid_no_orphan_goes() -> None:
    """Any manifest invalid at the head may hold any dest (an entry moved into it, say): all are kept."""
    rows = [row("x.bin", manifest="assets/broken.toml"), row("y.bin", manifest="assets/fine.toml")]
    p = decide(rows, invalid=frozenset({"assets/other.toml"}))
    assert p.remove == [] and all("assets/other.toml invalid at the head" in why for _, why in p.kept)


@pytest.mark.parametrize(
    ("kw", "valve"),
    [
        ({"max_files": 2}, "max_files"),
        ({"max_fraction": 0.5}, "max_fraction"),  # 3 of 5 rows
        ({"head_assets": 0}, "no_assets"),
        ({"trusted": False}, "untrusted_head"),
    ],
)
def test_each_valve_removes_nothing_and_confirm_goes_past_it(kw: dict[str, object], valve: str) -> None:
    """A tripped valve: nothing removed, each would-be removal listed as kept by the valve; --confirm
    removes them (never past the grace)."""
    rows = [row("a"), row("b"), row("c"), row("d", orphaned=None), row("e", orphaned=DAY)]
    p = decide(rows, **kw)
    assert p.valve == valve and p.remove == [] and p.would_remove == 3
    assert [(d, why) for d, why in p.kept if why.startswith("safety valve")] == [
        (d, f"safety valve: {valve}") for d in "abc"
    ]
    confirmed = decide(rows, confirm=True, **kw)
    if valve == "untrusted_head":  # an admin's --confirm never prunes against a refused head
        assert confirmed.valve == valve and confirmed.remove == []
    else:
        assert [r.dest for r in confirmed.remove] == ["a", "b", "c"] and confirmed.valve == ""


def test_without_a_fetch_nothing_goes_and_no_valve_trips() -> None:
    """Git unreachable this pass (the head may want a dest again): every orphan stays, even with
    --confirm, and it is not a prune problem of its own."""
    for confirm in (False, True):
        p = decide([row("a"), row("b", orphaned=DAY)], fetched=False, confirm=confirm)
        assert p.remove == [] and p.valve == ""
        assert (
            "a",
            "the branch head could not be fetched this pass (it may want the dest again); kept",
        ) in p.kept


def test_exactly_at_the_limits_nothing_trips() -> None:
    """max_files and max_fraction are limits that may be reached, not exceeded."""
    rows = [row("a"), row("b"), row("c"), row("d", orphaned=None)]
    p = decide(rows, max_files=3, max_fraction=0.75)
    assert len(p.remove) == 3 and p.valve == ""


ages = st.one_of(st.none(), st.floats(0, 30 * DAY))


@given(
    st.lists(st.tuples(ages, st.booleans(), st.booleans()), max_size=30),
    st.integers(0, 40),
    st.floats(0, 1),
    st.booleans(),
)
@settings(max_examples=examples(300), deadline=None)
def test_nothing_removed_is_young_changed_or_wanted(
    spec: list[tuple[float | None, bool, bool]], max_files: int, max_fraction: float, trusted: bool
) -> None:
    """Whatever the rows: every removal is an orphan past the grace whose file is exactly as recorded (or
    gone); with a valve, nothing; without one, the count is within both limits."""
    rows = [row(f"f{i}", orphaned=age) for i, (age, _, _) in enumerate(spec)]
    observed = {
        f"f{i}": Observation(State.MISSING) if missing else seen(identity=IDENT if same else "0:0:0:0")
        for i, (_, same, missing) in enumerate(spec)
    }
    p = decide(rows, observed, max_files=max_files, max_fraction=max_fraction, trusted=trusted)
    by = {r.dest: r for r in rows}
    for r in p.remove:
        i = int(r.dest[1:])
        age, same, missing = spec[i]
        assert age is not None and age >= 7 * DAY and (same or missing)
        assert r.gone == missing and by[r.dest].orphaned_at is not None
    present = sum(1 for r in p.remove if not r.gone)
    if p.valve:
        assert p.valve in VALVES and p.remove == []
    else:
        assert present <= max_files and present <= max_fraction * len(rows)
