"""The audit log on disk: appends chain, any edit, removal, move or insertion is named by verify, a torn
tail is repaired with evidence, a failed write leaves the file as it was, symlinks are refused."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.audit import (
    FILE_NAME,
    GENESIS,
    MAX_LINE,
    AuditError,
    AuditLog,
    Entry,
    read,
    render,
    select,
    verify,
)

pytestmark = pytest.mark.unit

FIELDS = {"dest": "weights/a.bin", "sha256": "ab" * 32, "size": 1048576, "commit": "4f2a9c1d" * 5}


def sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def write_log(path: Path, n: int, **fields: object) -> tuple[int, str]:
    """A log of ``n`` records written through :class:`AuditLog`; out: its head (the ledger's anchor)."""
    log = AuditLog(path)
    for i in range(n):
        log.append("published", {**fields, "dest": f"d/{i + 1}"})
    log.flush()
    head = log.head
    log.close()
    return head


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def put(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in new))


def chained(n: int, pad: int = 0) -> tuple[bytes, tuple[int, str]]:
    """``n`` chained lines built without AuditLog (fast, for big logs); out: the bytes and the head."""
    out, prev = [], GENESIS
    for seq in range(1, n + 1):
        rec = {"seq": seq, "time": "2026-12-03T14:00:00+00:00", "event": "published", "pad": "x" * pad}
        line = json.dumps({**rec, "prev": prev}, separators=(",", ":")).encode()
        out.append(line + b"\n")
        prev = sha(line)
    return b"".join(out), (n, prev)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / FILE_NAME


def test_append_flush_read_round_trip(path: Path) -> None:
    """What append returns is what read gives back, line by line, in a 0600 file."""
    log = AuditLog(path)
    written = [log.append("published", FIELDS), log.append("removed", {"dest": "x", "flag": True})]
    log.flush()
    log.close()
    assert [(e.line, e.record) for e in read(path)] == [(1, written[0]), (2, written[1])]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_format_key_order_and_chain(path: Path) -> None:
    """seq, time, event, the caller's fields in order, prev last; compact JSON; prev chains line bytes."""
    log = AuditLog(path)
    first = log.append("published", {"z": 1, "a": None, "list": [1, "é"]})
    log.append("published", {})
    log.close()
    one, two = lines(path)
    assert list(first) == ["seq", "time", "event", "z", "a", "list", "prev"]
    assert one == json.dumps(first, ensure_ascii=False, separators=(",", ":")).encode()
    assert json.loads(one)["prev"] == GENESIS and json.loads(two)["prev"] == sha(one)
    assert datetime.fromisoformat(str(first["time"])).utcoffset() == timedelta(0)
    assert len(str(first["time"])) == len("2026-12-03T14:00:00+00:00")


def test_chain_verifies(path: Path) -> None:
    """An untouched log verifies, with and without its anchor; head is the last line's seq and hash."""
    head = write_log(path, 5)
    assert head == (5, sha(lines(path)[-1]))
    assert verify(path) == verify(path, head)
    assert verify(path, head).ok and verify(path, head).records == 5 and verify(path).head == head


def test_missing_log(path: Path) -> None:
    """A missing log is empty (and head does not create it); with a non-zero anchor it is broken."""
    assert AuditLog(path).head == (0, GENESIS) and not path.exists()
    assert list(read(path)) == []
    assert verify(path).ok and verify(path, (0, GENESIS)).records == 0
    v = verify(path, (3, "ab" * 32))
    assert not v.ok and "missing" in v.why and v.broken_seq == 1


def test_editing_any_byte_is_caught(path: Path) -> None:
    """Every single-byte edit anywhere in the file breaks the chain at that record or the next."""
    anchor = write_log(path, 3)
    original = path.read_bytes()
    starts = [0] + [i + 1 for i, b in enumerate(original) if b == ord("\n")]
    for pos in range(len(original)):
        line = sum(1 for s in starts if s <= pos)
        for new in {0x00, ord("\n"), ord("0"), 0xFF, original[pos] ^ 0x01} - {original[pos]}:
            path.write_bytes(original[:pos] + bytes([new]) + original[pos + 1 :])
            v = verify(path, anchor)
            assert not v.ok, (pos, new)
            assert v.broken_line is None or v.broken_line <= line + 1, (pos, new, v)


def test_editing_a_value_names_the_next_record(path: Path) -> None:
    """A still-valid record that was edited is caught by the next record's prev (the last: by the anchor)."""
    anchor = write_log(path, 7)
    old = lines(path)
    put(path, [line.replace(b'"d/6"', b'"d/X"') for line in old])
    v = verify(path, anchor)
    assert (v.broken_line, v.broken_seq, v.records) == (7, 7, 6)
    assert v.why == (
        "record 7 (line 7): prev does not match the sha256 of record 6: "
        "a record before it was edited or removed"
    )
    put(path, [line.replace(b'"d/7"', b'"d/X"') for line in old])
    assert verify(path).ok
    v = verify(path, anchor)
    assert (v.broken_line, v.broken_seq) == (7, 7) and "rewritten" in v.why


@pytest.mark.parametrize(("gone", "line"), [(1, 1), (10, 10), (6, 6)])
def test_removing_a_record_is_named(path: Path, gone: int, line: int) -> None:
    """Removing the first or a middle record is named at the line where it was."""
    anchor = write_log(path, 12)
    put(path, [x for i, x in enumerate(lines(path), 1) if i != gone])
    v = verify(path, anchor)
    assert not v.ok and (v.broken_line, v.broken_seq) == (line, gone)
    assert v.records == gone - 1 and f"record {gone} was removed" in v.why
    assert verify(path) == v


def test_removing_the_last_records_is_caught_only_by_the_anchor(path: Path) -> None:
    """Cutting records off the end leaves a valid chain; the ledger's anchor says what is missing."""
    anchor = write_log(path, 42)
    put(path, lines(path)[:40])
    assert verify(path).ok
    v = verify(path, anchor)
    assert not v.ok and (v.broken_line, v.broken_seq, v.records) == (None, 41, 40)
    assert v.why == (
        "the log ends at record 40, but syncd had written 42 (ledger): the last 2 records were removed"
    )
    assert verify(path, (40, v.head[1])).ok  # an anchor written before the last records is fine


def test_seq_jump_message(path: Path) -> None:
    """The example wording: a removed record in the middle is named by seq."""
    write_log(path, 12)
    put(path, [x for i, x in enumerate(lines(path), 1) if i != 10])
    assert verify(path).why == "seq jumps from 9 to 11 (line 10): record 10 was removed or moved"


def test_swapped_records_are_named(path: Path) -> None:
    """Two records swapped: the first of the two positions is named."""
    anchor = write_log(path, 6)
    old = lines(path)
    old[2], old[4] = old[4], old[2]
    put(path, old)
    v = verify(path, anchor)
    assert (v.broken_line, v.broken_seq) == (3, 3)


def test_duplicated_record_is_named(path: Path) -> None:
    """A record copied right after itself: the copy is named."""
    anchor = write_log(path, 5)
    old = lines(path)
    put(path, [*old[:3], old[2], *old[3:]])
    v = verify(path, anchor)
    assert (v.broken_line, v.broken_seq) == (4, 4) and "duplicated" in v.why


def test_forged_record_is_named(path: Path) -> None:
    """A forged record chained to its predecessor passes itself, but the record it displaced is named;
    renumbering and rechaining the rest is caught by the anchor."""
    anchor = write_log(path, 5)
    old = lines(path)
    forged = json.dumps(
        {"seq": 3, "time": "2026-12-03T14:00:00+00:00", "event": "published", "prev": sha(old[1])},
        separators=(",", ":"),
    ).encode()
    put(path, [*old[:2], forged, *old[2:]])
    v = verify(path, anchor)
    assert (v.broken_line, v.broken_seq) == (4, 4)

    rewritten, prev = [*old[:2], forged], sha(forged)
    for raw in old[2:]:
        rec = json.loads(raw)
        rec["seq"] += 1
        rec["prev"] = prev
        rewritten.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode())
        prev = sha(rewritten[-1])
    put(path, rewritten)
    assert verify(path).ok
    v = verify(path, anchor)
    assert (v.broken_line, v.broken_seq) == (5, 5) and "rewritten" in v.why


def test_not_a_json_object_and_missing_keys(path: Path) -> None:
    """A line that is not a JSON object, or lacks a required key, is named."""
    write_log(path, 3)
    old = lines(path)
    put(path, [old[0], b"[1,2]", old[2]])
    assert verify(path).why == "line 2 is not a JSON object"
    rec = json.loads(old[0])
    del rec["time"]
    put(path, [json.dumps(rec).encode(), *old[1:]])
    v = verify(path)
    assert (v.broken_line, v.broken_seq) == (1, 1) and "'time'" in v.why
    assert next(e.record for e in read(path)) == rec


def test_oversized_line(path: Path) -> None:
    """A line longer than MAX_LINE is judged without being held in memory; read gives it record {}."""
    write_log(path, 2)
    old = lines(path)
    put(path, [old[0], b"x" * (MAX_LINE + 10), old[1]])
    v = verify(path)
    assert (v.broken_line, v.broken_seq) == (2, 2) and "longer than" in v.why
    assert [(e.line, e.record == {}) for e in read(path)] == [(1, False), (2, True), (3, False)]


RESERVED_KEYS = {"seq", "time", "event", "prev"}
values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
records = st.lists(
    st.tuples(
        st.text(max_size=20),
        st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k not in RESERVED_KEYS), values),
    ),
    min_size=1,
    max_size=8,
)


def mutate(data: st.DataObject, old: list[bytes]) -> tuple[list[bytes], int]:
    """One random mutation of ``old``; out: the new lines and the first line number that changed."""
    n = len(old)
    kind = data.draw(st.sampled_from(["edit", "delete", "swap", "duplicate", "forge", "cut"]))
    if kind == "edit" or (kind == "swap" and n < 2):
        i = data.draw(st.integers(0, n - 1))
        j = data.draw(st.integers(0, len(old[i])))  # == len: the newline after the line
        raw = old[i] + b"\n"
        byte = data.draw(st.integers(0, 255).filter(lambda b: b != raw[j]))
        joined = b"\n".join(old[:i]) + (b"\n" if i else b"") + raw[:j] + bytes([byte]) + raw[j + 1 :]
        rest = b"".join(x + b"\n" for x in old[i + 1 :])
        new_bytes = joined + rest
        new = new_bytes.split(b"\n")
        if new_bytes.endswith(b"\n"):
            new.pop()
        else:
            new[-1] = new[-1] + b"\x00TORN"  # marker: written without a final newline below
        return new, i + 1
    if kind == "delete":
        i = data.draw(st.integers(0, n - 1))
        return old[:i] + old[i + 1 :], i + 1
    if kind == "swap":
        i, j = sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True)))
        new = list(old)
        new[i], new[j] = new[j], new[i]
        return new, i + 1
    if kind == "duplicate":
        i = data.draw(st.integers(0, n - 1))
        at = data.draw(st.integers(0, n))
        return [*old[:at], old[i], *old[at:]], at + 1
    if kind == "forge":  # before a real record: one added after the last is a valid append, by design
        at = data.draw(st.integers(0, n - 1))
        prev = sha(old[at - 1]) if at else GENESIS
        fields = data.draw(st.dictionaries(st.sampled_from(["dest", "x"]), st.text(), max_size=2))
        rec = {"seq": at + 1, "time": "2026-12-03T14:00:00+00:00", "event": "published", **fields}
        forged = json.dumps({**rec, "prev": prev}, ensure_ascii=False, separators=(",", ":")).encode()
        return [*old[:at], forged, *old[at:]], at + 1
    k = data.draw(st.integers(1, n))
    return old[: n - k], n - k + 1


@settings(max_examples=50, deadline=None, database=None)
@given(records, st.data())
def test_any_single_mutation_is_caught(
    recs: list[tuple[str, dict[str, object]]], data: st.DataObject
) -> None:
    """Random records (any unicode, control characters, newlines), one random mutation: verify against
    the anchor is not ok, never raises, and names a record no later than the one after the change."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / FILE_NAME
        log = AuditLog(path)
        written = [log.append(event, fields) for event, fields in recs]
        anchor = log.head
        log.close()
        old = lines(path)
        assert len(old) == len(recs)  # every record is one line, whatever its values hold
        assert [e.record for e in read(path)] == written
        assert verify(path, anchor).ok

        new, first = mutate(data, old)
        body = b"".join(x + b"\n" for x in new)
        if new and new[-1].endswith(b"\x00TORN"):
            body = body[: -len(b"\x00TORN\n")]
        path.write_bytes(body)
        v = verify(path, anchor)
        assert not v.ok, (new, v)
        assert v.broken_seq is not None
        if v.broken_line is None:
            assert v.records == first - 1  # only the end was cut off: the anchor's record is missing
        else:
            assert v.broken_seq == v.broken_line <= first + 1
        list(read(path))  # reading a damaged log never raises either


def test_reopened_log_continues_the_chain(path: Path) -> None:
    """A new AuditLog on an existing log continues its seq and prev after close."""
    write_log(path, 3)
    log = AuditLog(path)
    assert log.head == (3, sha(lines(path)[-1]))
    rec = log.append("published", {"dest": "later"})
    log.close()
    assert rec["seq"] == 4 and rec["prev"] == sha(lines(path)[2])
    assert verify(path, (4, sha(lines(path)[3]))).ok


def test_torn_tail_is_repaired_with_evidence(path: Path) -> None:
    """A last line without its newline is dropped at the next append, and a chained
    audit_log_repaired record keeps its length and sha256."""
    anchor = write_log(path, 3)
    torn = b'{"seq":4,"time":"2026-12-03T14:0'
    with path.open("ab") as fh:
        fh.write(torn)
    v = verify(path, anchor)
    assert v.ok and v.records == 3 and "cut off" in v.why
    log = AuditLog(path)
    assert log.head == anchor
    rec = log.append("published", {"dest": "next"})
    log.close()
    repaired = json.loads(lines(path)[3])
    assert repaired["event"] == "audit_log_repaired" and repaired["seq"] == 4
    assert repaired["dropped_bytes"] == len(torn) and repaired["dropped_sha256"] == sha(torn)
    assert repaired["prev"] == anchor[1] and rec["seq"] == 5
    assert verify(path, (5, sha(lines(path)[4]))).ok


def test_torn_only_file_is_repaired(path: Path) -> None:
    """A file holding nothing but a cut-off line starts a fresh chain after the repair record."""
    path.write_bytes(b'{"seq":1,"ti')
    log = AuditLog(path)
    assert log.head == (0, GENESIS)
    rec = log.append("published", {})
    log.close()
    assert rec["seq"] == 2 and [e.record["event"] for e in read(path)] == ["audit_log_repaired", "published"]
    assert verify(path).ok and verify(path).records == 2


def test_last_line_not_a_record_is_refused(path: Path) -> None:
    """syncd does not continue a chain whose last complete line is not a record of its own."""
    write_log(path, 2)
    with path.open("ab") as fh:
        fh.write(b"garbage\n")
    with pytest.raises(AuditError, match=r"last line of audit log .* is not an audit record"):
        AuditLog(path).append("published", {})


def test_symlink_is_refused(tmp_path: Path, path: Path) -> None:
    """A symlink at the log's path is neither written through nor read through."""
    target = tmp_path / "elsewhere"
    write_log(target, 2)
    before = target.read_bytes()
    path.symlink_to(target)
    with pytest.raises(AuditError, match="is a symlink; syncd does not follow it"):
        AuditLog(path).append("published", {})
    with pytest.raises(AuditError, match="is a symlink"):
        _ = AuditLog(path).head
    with pytest.raises(AuditError, match="is a symlink"):
        list(read(path))
    with pytest.raises(AuditError, match="is a symlink"):
        verify(path)
    assert target.read_bytes() == before


def test_fifo_is_refused(path: Path) -> None:
    """Something other than a regular file at the path is refused, without hanging."""
    os.mkfifo(path)
    with pytest.raises(AuditError, match="not a regular file"):
        AuditLog(path).append("published", {})
    with pytest.raises(AuditError, match="not a regular file"):
        list(read(path))


def test_reserved_fields_are_refused(path: Path) -> None:
    """The caller cannot set seq, time, event or prev."""
    with pytest.raises(ValueError, match="'prev'"):
        AuditLog(path).append("published", {"prev": GENESIS})


def test_lone_surrogate_is_written_escaped(path: Path) -> None:
    """A string with no UTF-8 form (an undecodable name) is written with ASCII escapes and reads back."""
    log = AuditLog(path)
    rec = log.append("published", {"dest": "bad\udcff name"})
    log.close()
    assert [e.record for e in read(path)] == [rec] and verify(path).ok


WRITE_UNDER_LIMIT = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from syncd.audit import AuditError, AuditLog

    path, extra = Path(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that write returns EFBIG instead of killing us
    log = AuditLog(path)
    _ = log.head
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + extra, hard))
    try:
        log.append("published", {"dest": "big", "pad": "x" * 4096})
    except AuditError as exc:
        error = str(exc)
    else:
        error = ""
    after_failure = path.read_bytes()
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    retried = log.append("published", {"dest": "big", "pad": "x" * 4096})
    log.close()
    print(json.dumps({"error": error, "after": after_failure.hex(), "seq": retried["seq"]}))
    """
)


@pytest.mark.parametrize("extra", [0, 100], ids=["EFBIG", "short-write"])
def test_failed_write_leaves_the_file_as_it_was(path: Path, extra: int) -> None:
    """A write the file system refuses (RLIMIT_FSIZE: EFBIG, or a short write at the limit) raises
    AuditError and leaves the file byte for byte as it was; the same record appends later."""
    anchor = write_log(path, 3)
    before = path.read_bytes()
    out = subprocess.run(
        [sys.executable, "-c", WRITE_UNDER_LIMIT, str(path), str(extra)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result = json.loads(out.stdout)
    assert result["error"].startswith(f"cannot append to audit log {path}: ")
    assert ("File too large" if extra == 0 else "only 100 of") in result["error"]
    assert bytes.fromhex(result["after"]) == before
    assert result["seq"] == 4 and verify(path, anchor).ok and verify(path).records == 4


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_opening_a_large_log_reads_only_its_tail(path: Path) -> None:
    """Opening a 20 MB log learns its head from the end: far less than the file is read."""
    body, head = chained(100_000, pad=150)
    path.write_bytes(body)
    assert len(body) > 20_000_000
    if not Path("/proc/self/io").exists():
        pytest.skip("no /proc/self/io to count bytes read")
    start = _bytes_read()
    log = AuditLog(path)
    assert log.head == head
    rec = log.append("published", {})
    cost = _bytes_read() - start
    log.close()
    assert cost < 256 * 1024, cost
    assert rec["seq"] == head[0] + 1 and rec["prev"] == head[1]


def test_long_last_line_spanning_blocks(path: Path) -> None:
    """A last record longer than a read block (64 KiB) is still found whole."""
    log = AuditLog(path)
    log.append("published", {"a": "x" * 10})
    log.append("published", {"author": "y" * 200_000})
    log.close()
    assert AuditLog(path).head == (2, sha(lines(path)[1]))


def at(t: str, dest: object = None) -> Entry:
    return Entry(1, {"seq": 1, "time": t, "event": "published", "dest": dest, "prev": GENESIS})


def test_select_since() -> None:
    """since keeps records at or after it, comparing times, not strings (any offset)."""
    entries = [
        at("2026-12-03T13:59:59+00:00"),
        at("2026-12-03T14:00:00+00:00"),
        at("2026-12-03T15:30:00+02:00"),
    ]
    since = datetime(2026, 12, 3, 14, tzinfo=UTC)
    assert [e.record["time"] for e in select(entries, since=since)] == ["2026-12-03T14:00:00+00:00"]
    assert list(select([Entry(3, {}), at("not a time")], since=since)) == []
    with pytest.raises(ValueError, match="aware"):
        list(select(entries, since=datetime(2026, 12, 3)))


def test_select_dest_prefix() -> None:
    """A prefix matches itself and what lies under it, never a sibling that shares its letters."""
    entries = [at("2026-12-03T14:00:00+00:00", d) for d in ("a/b", "a/b/c", "a/bc", "a", None, 5)]

    def picked(prefix: str) -> list[object]:
        return [e.record["dest"] for e in select(entries, dest_prefix=prefix)]

    assert picked("a/b") == ["a/b", "a/b/c"]
    assert picked("a/b/") == ["a/b/c"]
    assert picked("a") == ["a/b", "a/b/c", "a/bc", "a"]
    assert picked("a/bc") == ["a/bc"]


def test_select_on_a_real_log(path: Path) -> None:
    """select streams over read: records just written are after an hour ago, none after tomorrow."""
    write_log(path, 3)
    now = datetime.now(UTC)
    assert len(list(select(read(path), since=now - timedelta(hours=1), dest_prefix="d"))) == 3
    assert list(select(read(path), since=now + timedelta(days=1))) == []


def test_render_line() -> None:
    """The readable line shows the fields present and not empty, shortened, in a fixed order."""
    record = {
        "seq": 7,
        "time": "2026-12-03T14:00:00+00:00",
        "event": "published",
        "dest": "weights/a.bin",
        "sha256": "ab12cd34ef56" + "0" * 52,
        "size": 1048576,
        "source": "",
        "commit": "4f2a9c1d" * 5,
        "author": "Alice <a@x>",
        "merger": "Bob <b@x>",
        "signer": "alice@x",
        "prev": GENESIS,
    }
    assert render(record) == (
        "2026-12-03T14:00:00Z  published  weights/a.bin  sha256 ab12cd34ef56…  1.0 MiB  commit 4f2a9c1d  "
        'author "Alice <a@x>"  merger "Bob <b@x>"  signer alice@x'
    )
    repaired = {"seq": 1, "time": "2026-12-03T14:00:00+00:00", "event": "audit_log_repaired"}
    assert render({**repaired, "dropped_bytes": 12, "prev": GENESIS}) == (
        "2026-12-03T14:00:00Z  audit_log_repaired  dropped_bytes 12"
    )


def test_render_escapes_control_characters() -> None:
    """A hostile dest or author cannot colour the terminal or start a new line."""
    line = render(
        {
            "time": "2026-12-03T14:00:00+00:00",
            "event": "published",
            "dest": "x\x1b[31m\nfake\u202e",
            "author": "a\\b",
        }
    )
    assert line == "2026-12-03T14:00:00Z  published  x\\x1b[31m\\nfake\\u202e  author a\\\\b"
    assert all(c.isprintable() for c in line)


# the observer: events → records, durable before the pass is reported, also to the journal ---------------
def _published(dest: str = "a.bin", **kw: object) -> object:
    from syncd import events as ev

    fields: dict[str, object] = {
        "dest": dest, "source": "repo/a.bin", "sha256": "a" * 64, "bytes": 10, "duration_s": 0.1,
        "mb_per_s": 1.0, "manifest": "m.toml", "commit": "c" * 40, "replaced": False,
        "provenance": {"author_name": "Ada", "author_email": "ada@x", "merger_name": "Mo",
                       "merger_email": "mo@x", "pr_ref": "#7", "signer": "ada@x", "introduced_commit": "d"},
    }  # fmt: skip
    fields.update(kw)
    return ev.AssetPublished(**fields)  # type: ignore[arg-type]


def _finished() -> object:
    from syncd import events as ev

    return ev.PassFinished(
        commit="c" * 40, ok=True, dry_run=False, published=1, adopted=0, skipped=0, refused=0, failed=0,
        orphaned=0, deferred=0, pending=0, invalid_manifests=0, git_error=None, source_error=None, bytes=10,
        duration_s=0.1,
    )  # fmt: skip


def test_records_are_on_disk_before_later_observers_hear_the_pass_ended(tmp_path: Path) -> None:
    """First on the bus: when the log observer sees pass_finished, the pass's records are already in the
    file (and fsynced: the anchor is written only after the flush)."""
    import structlog

    from syncd import events as ev
    from syncd.audit import AuditObserver

    path = tmp_path / FILE_NAME
    anchors: list[tuple[int, str]] = []
    seen_at_finish: list[list[str]] = []

    def later(event: ev.Event) -> None:
        if isinstance(event, ev.PassFinished):
            seen_at_finish.append([json.loads(line)["event"] for line in path.read_text().splitlines()])

    audit = AuditObserver(path, anchor=anchors.append)
    bus = ev.EventBus([later])
    bus.add(audit, first=True)
    with structlog.testing.capture_logs() as logs:
        bus.emit(_published())  # type: ignore[arg-type]
        bus.emit(_finished())  # type: ignore[arg-type]
    assert seen_at_finish == [["published"]]
    assert anchors == [AuditLog(path).head] and anchors[0][0] == 1
    (rec,) = [e for e in logs if e["event"] == "audit_record"]
    from syncd.logs import journal_fields

    fields = journal_fields(rec, "{}")
    assert fields["SYNCD_AUDIT"] == "1" and fields["SYNCD_AUDIT_EVENT"] == "published"
    assert rec["record"] == path.read_text().splitlines()[0]  # the exact stored line: a SIEM can re-hash it
    (entry,) = list(read(path))
    assert entry.record["author"] == "Ada <ada@x>" and entry.record["merger"] == "Mo <mo@x>"
    assert entry.record["pr"] == "#7" and entry.record["signer"] == "ada@x" and entry.record["size"] == 10
    audit.close()


def test_a_failed_write_keeps_the_record_and_writes_it_later(tmp_path: Path) -> None:
    """A record that cannot be written (here: the log's directory is gone) is kept, audit_failed is said
    once, healthy is False; once writable again the record lands, in order, and the chain verifies."""
    import shutil

    import structlog

    from syncd.audit import AuditObserver

    d = tmp_path / "state"
    d.mkdir()
    audit = AuditObserver(d / FILE_NAME)
    shutil.rmtree(d)
    with structlog.testing.capture_logs() as logs:
        audit(_published("a.bin"))  # type: ignore[arg-type]
        audit(_published("b.bin"))  # type: ignore[arg-type]
        audit(_finished())  # type: ignore[arg-type]
    assert not audit.healthy and len(audit.pending) == 2
    assert [e["event"] for e in logs].count("audit_failed") == 1
    d.mkdir()
    audit(_finished())  # type: ignore[arg-type]
    assert audit.healthy
    assert [e.record["dest"] for e in read(d / FILE_NAME)] == ["a.bin", "b.bin"]
    assert verify(d / FILE_NAME).ok
    audit.close()


def test_repeated_refusals_make_one_record(tmp_path: Path) -> None:
    from syncd import events as ev
    from syncd.audit import AuditObserver

    audit = AuditObserver(tmp_path / FILE_NAME)
    refused = ev.SignatureRefused(commit="e" * 40, author="Eve <e@x>", status="unsigned", error="…")
    for _ in range(3):
        audit(refused)
    audit(ev.AssetRefused(dest="c.bin", manifest="m.toml", error="foreign", commit="c" * 40, passes=1))
    audit(ev.AssetRefused(dest="c.bin", manifest="m.toml", error="foreign", commit="c" * 40, passes=2))
    audit(_finished())  # type: ignore[arg-type]
    assert [e.record["event"] for e in read(tmp_path / FILE_NAME)] == ["signature_refused", "refused"]
    audit.close()


@pytest.mark.parametrize("how", ["truncated", "deleted", "replaced", "appended_to"])
def test_a_log_disturbed_while_open_is_not_continued_silently(tmp_path: Path, how: str) -> None:
    """While a writer has the log open, records cut off, the file deleted or replaced, or a forged record
    appended: its next append first writes audit_log_broken, and verify names it from then on."""
    import structlog

    path = tmp_path / FILE_NAME
    log = AuditLog(path)
    for n in range(3):
        log.append("published", {"dest": f"{n}.bin"})
    lines = path.read_bytes().splitlines(keepends=True)
    if how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(len(lines[0]))
    elif how == "deleted":
        path.unlink()
    elif how == "replaced":
        path.unlink()
        path.write_bytes(lines[0])
    else:
        forged = json.loads(lines[2])
        forged.update(seq=4, dest="forged.bin", prev=hashlib.sha256(lines[2].rstrip(b"\n")).hexdigest())
        with open(path, "ab") as fh:
            fh.write(json.dumps(forged, separators=(",", ":")).encode() + b"\n")
    with structlog.testing.capture_logs() as logs:
        log.append("published", {"dest": "next.bin"})
    log.close()
    assert [e["event"] for e in logs] == ["audit_log_tampered"]
    events = [e.record["event"] for e in read(path)]
    assert events[-2:] == ["audit_log_broken", "published"]
    result = verify(path)
    assert not result.ok and "cut short or rewritten" in result.why
