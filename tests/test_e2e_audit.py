"""End to end, for an auditor: signed commits over a real sshd, provenance of every published file, the
hash-chained audit log, and ``syncd verify`` (with ``--repair``) against tampering on the export."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import signing
from harness import Run, World
from servers import GitRepo

pytestmark = pytest.mark.e2e


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, signing.SshKey]:
    d = tmp_path / "signing"
    return {name: signing.ssh_key(d, name) for name in ("alice", "mallory", "old")}


def as_person(repo: GitRepo, name: str, email: str) -> dict[str, str]:
    return {
        **repo.env,
        "GIT_AUTHOR_NAME": name,
        "GIT_AUTHOR_EMAIL": email,
        "GIT_COMMITTER_NAME": name,
        "GIT_COMMITTER_EMAIL": email,
    }


def git(repo: GitRepo, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        ["git", *args], cwd=repo.work_path, env=env or repo.env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def commit(
    repo: GitRepo,
    message: str,
    key: signing.SshKey | None = None,
    *,
    who: tuple[str, str] = ("Syncd Test", "syncd-test@example.invalid"),
    push: bool = True,
) -> str:
    """Commit everything (signed with ``key`` as git signs: gpg.format=ssh), push, return the id."""
    env = as_person(repo, *who)
    git(repo, "add", "--all", env=env)
    sign = ["-c", "gpg.format=ssh", "-c", f"user.signingKey={key.public}"] if key else []
    git(repo, *sign, "commit", "-q", "--allow-empty", *(["-S"] if key else []), "-m", message, env=env)
    if push:
        git(repo, "push", "-q", "origin", "HEAD:refs/heads/main")
    return git(repo, "rev-parse", "HEAD")


def signing_config(world: World, keys: dict[str, signing.SshKey], options: str = "") -> Path:
    allowed = signing.allowed_signers(
        world.base / "etc" / "allowed_signers",
        [
            ("alice@bank.example", keys["alice"], options),
            ("old@bank.example", keys["old"], 'valid-before="20200101"'),
        ],
    )
    world.source = {**world.source, "verify_signatures": "ssh", "allowed_signers": str(allowed)}
    world.write_config()
    return allowed


def audit_records(world: World) -> list[dict[str, Any]]:
    path = world.state / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_signed_heads_are_served_and_others_refused_over_ssh(
    ssh_world: World, keys: dict[str, signing.SshKey]
) -> None:
    """Signed by an allowed key → synced. Unsigned, unknown key, expired key, tampered → refused with
    signature_refused naming commit, author and why; the last verified commit is still served, nothing
    of the refused commit lands, and the refusal is in status and in the audit log."""
    world = ssh_world
    signing_config(world, keys)
    a = world.asset("a.bin", 1000, seed=1)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    good = commit(world.repo, "a", keys["alice"])
    run = world.sync()
    assert run.code == 0, run.err
    assert run.one("signature_verified")["signer"] == "alice@bank.example"
    assert (world.export / "a.bin").exists()

    cases: list[tuple[str, signing.SshKey | None, str]] = [
        ("unsigned", None, "unsigned"),
        ("mallory", keys["mallory"], "unknown_key"),
        ("expired", keys["old"], "expired"),
    ]
    for n, (name, key, status) in enumerate(cases):
        b = world.asset(f"{name}.bin", 100, seed=10 + n)
        world.manifest(f"{name}.toml", {**b, "dest": f"{name}.bin"})
        bad = commit(world.repo, f"add {name}", key, who=("Eve", "eve@bank.example"))
        run = world.sync()
        assert run.code == 1, run.err
        refused = run.one("signature_refused")
        assert (refused["commit"], refused["status"]) == (bad, status), refused
        assert refused["author"] == "Eve <eve@bank.example>" and refused["serving_commit"] == good
        assert bad[:12] in refused["error"]
        assert not (world.export / f"{name}.bin").exists()
        assert run.one("pass_finished")["git_problem"] == "signature_refused"
        world.repo.remove(f"assets/{name}.toml")
        git(world.repo, "reset", "-q", "--hard", good)
        git(world.repo, "push", "-q", "--force", "origin", "HEAD:refs/heads/main")

    # A tampered commit: alice's signature kept, the tree changed (a new asset slipped in).
    b = world.asset("slipped.bin", 100, seed=30)
    world.manifest("slipped.toml", {**b, "dest": "slipped.bin"})
    signed = commit(world.repo, "innocent", keys["alice"], push=False)
    raw = git(world.repo, "cat-file", "commit", signed)
    world.repo.remove("assets/slipped.toml")
    git(world.repo, "add", "--all")
    clean_tree = git(world.repo, "write-tree")
    forged_raw = raw.replace(raw.split("\n", 1)[0], f"tree {clean_tree}", 1)  # claims another tree
    forged = subprocess.run(
        ["git", "hash-object", "-t", "commit", "-w", "--stdin", "--literally"],
        cwd=world.repo.work_path, input=forged_raw + "\n", capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    git(world.repo, "push", "-q", "--force", "origin", f"{forged}:refs/heads/main")
    run = world.sync()
    assert run.code == 1 and run.one("signature_refused")["status"] == "bad_signature", run.err
    status = world.run("status", "-c", str(world.config_path))
    assert status.code == 1 and "signature" in status.out and forged[:12] in status.out, status.out
    refusals = [r for r in audit_records(world) if r["event"] == "signature_refused"]
    assert [r["commit"] for r in refusals][-1] == forged and len(refusals) == 4
    assert world.export_files() == ["a.bin"]


def test_nothing_is_served_without_a_verified_commit(world: World, keys: dict[str, signing.SshKey]) -> None:
    """The first pass on an unsigned head plans nothing: no download, no orphan, exit 1, and it says so."""
    signing_config(world, keys)
    a = world.asset("a.bin", 100, seed=1)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    commit(world.repo, "a")
    run = world.sync()
    assert run.code == 1
    refused = run.one("signature_refused")
    assert refused.get("serving_commit") is None and "nothing was planned" in refused["error"]
    assert run.one("pass_finished")["git_problem"] == "no_verified_commit"
    assert world.export_files() == []


@pytest.mark.parametrize("content", ["", "# only a comment\n\n"])
def test_empty_allowed_signers_is_a_config_error(world: World, content: str) -> None:
    allowed = world.base / "etc" / "allowed_signers"
    allowed.write_text(content)
    world.source = {"verify_signatures": "ssh", "allowed_signers": str(allowed)}
    world.write_config()
    run = world.run("check-config", "-c", str(world.config_path))
    assert run.code == 2 and "source.allowed_signers" in run.err, run.err


def test_validate_verifies_the_merge_result(world: World, keys: dict[str, signing.SshKey]) -> None:
    allowed = signing_config(world, keys)
    a = world.asset("a.bin", 100, seed=1)
    world.manifest("a.toml", {**a, "dest": "a.bin"})
    commit(world.repo, "a", keys["alice"], push=False)
    argv = [
        "validate",
        "--verify-signatures",
        "--allowed-signers",
        str(allowed),
        str(world.repo.work_path / "assets"),
    ]
    run = world.run(*argv)
    assert run.code == 0 and "signed by alice@bank.example" in run.err, run.err
    commit(world.repo, "unsigned on top", push=False)
    run = world.run(*argv)
    assert run.code == 1 and "signature refused (unsigned)" in run.out, run.out
    assert world.run("validate", "--verify-signatures", str(world.repo.work_path)).code == 2


def pr_merge(world: World, branch: str, merger: tuple[str, str], message: str) -> str:
    repo = world.repo
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "--no-ff", "-q", "-m", message, branch, env=as_person(repo, *merger))
    return git(repo, "rev-parse", "HEAD")


def test_provenance_names_author_merger_and_request_across_several_commits(world: World) -> None:
    """Between two polls: a direct commit, a GitHub-style PR (two commits by Ada, merged --no-ff by Mo),
    and a GitLab-style MR (Bea, merged by Kim). Each file names its own introducing commit, author,
    merge commit, merger and request number; ``syncd provenance`` shows it and exits 1 for unknown."""
    repo = world.repo
    base = world.asset("base.bin", 10, seed=1)
    world.manifest("base.toml", {**base, "dest": "base.bin"})
    commit(repo, "base")
    assert world.sync().code == 0

    direct = world.asset("direct.bin", 11, seed=2)
    world.manifest("direct.toml", {**direct, "dest": "direct.bin"})
    direct_commit = commit(repo, "straight onto main", who=("Dan", "dan@bank.example"))

    git(repo, "checkout", "-q", "-b", "ada/weights")
    w1, w2 = world.asset("w1.bin", 12, seed=3), world.asset("w2.bin", 13, seed=4)
    world.manifest("weights.toml", {**w1, "dest": "w/1.bin"})
    ada1 = commit(repo, "add w1", who=("Ada", "ada@bank.example"), push=False)
    world.manifest("weights.toml", {**w1, "dest": "w/1.bin"}, {**w2, "dest": "w/2.bin"})
    ada2 = commit(repo, "add w2", who=("Ada", "ada@bank.example"), push=False)
    gh = pr_merge(world, "ada/weights", ("Mo", "mo@bank.example"), "Merge pull request #42 from ada/weights")

    git(repo, "checkout", "-q", "-b", "bea/data")
    d = world.asset("d.bin", 14, seed=5)
    world.manifest("data.toml", {**d, "dest": "data/d.bin"})
    bea = commit(repo, "add data", who=("Bea", "bea@bank.example"), push=False)
    gl = pr_merge(
        world,
        "bea/data",
        ("Kim", "kim@bank.example"),
        "Merge branch 'bea/data' into 'main'\n\nSee merge request ml/assets!7",
    )
    git(repo, "push", "-q", "origin", "HEAD:refs/heads/main")

    run = world.sync()
    assert run.code == 0, run.err
    got = world.run(
        "provenance", "-c", str(world.config_path), "--json", "direct.bin", "w/1.bin", "w/2.bin", "data/d.bin"
    )
    assert got.code == 0, got.err
    rows = {r["dest"]: r["provenance"] for r in json.loads(got.out)}
    expect = {
        "direct.bin": (direct_commit, "Dan", direct_commit, "Dan", None),
        "w/1.bin": (ada1, "Ada", gh, "Mo", 42),
        "w/2.bin": (ada2, "Ada", gh, "Mo", 42),
        "data/d.bin": (bea, "Bea", gl, "Kim", 7),
    }
    for dest, (introduced, author, merge, merger, pr) in expect.items():
        p = rows[dest]
        got = (p["introduced_commit"], p["author_name"], p["merge_commit"], p["merger_name"], p["pr_number"])
        assert got == (introduced, author, merge, merger, pr), dest
    assert rows["data/d.bin"]["pr_ref"] == "ml/assets!7" and rows["w/1.bin"]["pr_ref"] == "#42"
    published = {e["dest"]: e for e in run.named("asset_published")}
    assert published["w/2.bin"]["author"] == "Ada <ada@bank.example>" and published["w/2.bin"]["pr"] == "#42"
    text = world.run("provenance", "-c", str(world.config_path), "w/1.bin", "nope.bin")
    assert text.code == 1 and "nope.bin: not a file syncd published" in text.err
    assert text.out.splitlines()[0] == "w/1.bin" and len(text.out.splitlines()) >= 9, text.out
    assert f"introduced  {ada1} by Ada <ada@bank.example>" in text.out
    assert f"merged      {gh} by Mo <mo@bank.example>" in text.out and "#42" in text.out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def synced_three(world: World) -> dict[str, dict[str, Any]]:
    assets = {f"d/{n}.bin": world.asset(f"{n}.bin", 5000 + n, seed=n) for n in range(3)}
    world.manifest("m.toml", *({**a, "dest": d} for d, a in assets.items()))
    commit(world.repo, "three")
    assert world.sync().code == 0
    return assets


def verify(world: World, *args: str) -> Run:
    return world.run("verify", "-c", str(world.config_path), *args)


def test_verify_finds_in_place_edit_chmod_and_symlink_swap_then_repairs(world: World) -> None:
    """Same-size in-place edit, chmod, symlink swap: verify finds each (exit 1) and changes nothing;
    --repair quarantines the bad ones (kept as evidence), restores the reviewed bytes, and audits it."""
    assets = synced_three(world)
    root = world.export
    p0, p1, p2 = (root / f"d/{n}.bin" for n in range(3))
    assert verify(world).code == 0
    os.chmod(p0, 0o644)
    with open(p0, "r+b") as fh:  # same size, other bytes
        fh.seek(100)
        fh.write(b"X")
    os.chmod(p1, 0o644)  # only the mode
    p2.unlink()
    p2.symlink_to(p1)

    def identities() -> dict[Path, tuple[int, ...]]:  # atime aside: reading is allowed
        return {
            p: (lambda st: (st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))(os.lstat(p))
            for p in (p0, p1, p2)
        }

    before = identities()
    run = verify(world, "--json")
    assert run.code == 1, run.err
    found = {(f["dest"], f["kind"]) for f in json.loads(run.out)["findings"]}
    assert found == {("d/0.bin", "sha256"), ("d/0.bin", "mode"), ("d/1.bin", "mode"), ("d/2.bin", "symlink")}
    assert identities() == before  # read-only
    assert verify(world, "d/1.bin").code == 1 and verify(world, "d/1").code == 0  # prefixes are paths

    run = verify(world, "--repair")
    assert run.code == 0, run.err
    for n in range(3):
        p = root / f"d/{n}.bin"
        assert not p.is_symlink() and sha(p) == assets[f"d/{n}.bin"]["sha256"]
        assert os.stat(p).st_mode & 0o777 == 0o444
    (stamp,) = os.listdir(root / ".syncd-quarantine")
    q = root / ".syncd-quarantine" / stamp / "d"
    assert sorted(os.listdir(q)) == ["0.bin", "2.bin"]
    assert (q / "2.bin").is_symlink() and (q / "0.bin").read_bytes()[100:101] == b"X"
    assert verify(world).code == 0
    events = [r["event"] for r in audit_records(world)]
    assert (events.count("quarantined"), events.count("repaired"), events.count("mode_restored")) == (2, 2, 1)
    assert world.run("audit", "-c", str(world.config_path), "--verify").code == 0
    assert world.sync().code == 0  # the pass agrees with the repaired export


def test_a_pass_catches_an_in_place_edit_by_its_ctime_without_rehashing_others(world: World) -> None:
    """A same-size edit is found by the next pass (its ctime moved): that file alone is re-hashed,
    refused as changed_outside, and stays refused without another hash until it changes again."""
    synced_three(world)
    target = world.export / "d/1.bin"
    os.chmod(target, 0o644)
    with open(target, "r+b") as fh:
        fh.write(b"Z")
    os.chmod(target, 0o444)
    run = world.sync()
    assert run.code == 1
    refused = run.one("asset_refused")
    assert (refused["dest"], refused["cause"]) == ("d/1.bin", "changed_outside"), refused
    assert "syncd verify --repair" in refused["error"] and not run.named("asset_rechecked")
    again = world.sync()
    assert again.code == 1 and again.one("asset_refused")["dest"] == "d/1.bin"
    os.chmod(world.export / "d/2.bin", 0o600)  # a chmod alone: re-hashed, good, 0444 again
    run = world.sync()
    rechecked = run.one("asset_rechecked")
    assert rechecked["dest"] == "d/2.bin" and rechecked["mode_restored"] is True
    assert os.stat(world.export / "d/2.bin").st_mode & 0o777 == 0o444
    assert verify(world, "--repair").code == 0 and world.sync().code == 0


def test_audit_log_chains_every_change_and_catches_edits(world: World) -> None:
    """Published, adopted, refused and replaced each make one record; a second pass adds none; an edited
    or deleted record is named by ``syncd audit --verify`` (exit 1)."""
    a, b = world.asset("a.bin", 100, seed=1), world.asset("b.bin", 200, seed=2)
    (world.export / "b.bin").write_bytes((world.blobs / "b.bin").read_bytes())  # adopted
    (world.export / "c.bin").write_text("foreign")  # refused
    c = world.asset("c.bin", 300, seed=3)
    world.manifest("m.toml", {**a, "dest": "a.bin"}, {**b, "dest": "b.bin"}, {**c, "dest": "c.bin"})
    commit(world.repo, "three")
    assert world.sync().code == 1
    assert world.sync().code == 1  # the same refusal again: no new record
    a2 = world.asset("a2.bin", 150, seed=4)
    world.manifest("m.toml", {**a2, "dest": "a.bin", "replace": True}, {**b, "dest": "b.bin"})
    commit(world.repo, "replace a")
    assert world.sync().code == 0
    records = audit_records(world)
    first_pass = sorted((r["event"], r["dest"]) for r in records[:3])  # in the order things completed
    assert first_pass == [("adopted", "b.bin"), ("published", "a.bin"), ("refused", "c.bin")]
    assert [(r["event"], r["dest"]) for r in records[3:]] == [("replaced", "a.bin")]
    (pub,) = [r for r in records if r["event"] == "published"]
    assert pub["sha256"] == a["sha256"] and pub["author"] == "Syncd Test <syncd-test@example.invalid>"
    first_line = (world.state / "audit.jsonl").read_bytes().split(b"\n")[0]
    assert records[3]["size"] == 150 and records[1]["prev"] == hashlib.sha256(first_line).hexdigest()
    audit = world.run("audit", "-c", str(world.config_path), "--json", "--dest", "a.bin")
    assert [json.loads(line)["event"] for line in audit.out.splitlines()] == ["published", "replaced"]
    assert world.run("audit", "-c", str(world.config_path), "--verify").code == 0

    log = world.state / "audit.jsonl"
    lines = log.read_bytes().split(b"\n")
    log.write_bytes(b"\n".join([lines[0], lines[1].replace(b'"event":"', b'"event":"x'), *lines[2:]]))
    bad = world.run("audit", "-c", str(world.config_path), "--verify")
    assert bad.code == 1 and "record 3" in bad.out + bad.err, bad.out + bad.err
    log.write_bytes(b"\n".join([lines[0], *lines[2:]]))  # a record deleted
    assert world.run("audit", "-c", str(world.config_path), "--verify").code == 1
    log.write_bytes(b"\n".join(lines[:-2]) + b"\n")  # the last record deleted: the ledger's anchor
    bad = world.run("audit", "-c", str(world.config_path), "--verify")
    assert bad.code == 1 and "removed" in bad.out + bad.err, bad.out + bad.err


def test_gpg_signed_heads_are_served_and_an_unknown_key_refused(world: World) -> None:
    """verify_signatures = "gpg" with a binary keyring of trusted keys: a commit signed by a trusted key
    lands; one signed by another key is refused (unknown_key) and its asset does not land; validate
    --gpg-keyring agrees. An armored keyring is a configuration error naming the key."""
    import tempfile

    gdir = Path(tempfile.mkdtemp(prefix="g", dir="/tmp"))  # short: gpg-agent's socket path is limited
    trusted, other = signing.gpg_home(gdir, "Alice <alice@bank.example>"), signing.gpg_home(gdir, "Eve <e@x>")
    try:
        keyring = signing.export_keyring([trusted], world.base / "etc" / "trusted.gpg")
        world.source = {"verify_signatures": "gpg", "gpg_keyring": str(keyring)}
        world.write_config()
        repo = world.repo

        def gpg_commit(key: signing.GpgKey, message: str) -> str:
            env = {**repo.env, "GNUPGHOME": str(key.home)}
            git(repo, "add", "--all", env=env)
            git(
                repo, "-c", f"user.signingKey={key.fingerprint}", "commit", "-q", "-S", "-m", message, env=env
            )
            git(repo, "push", "-q", "origin", "HEAD:refs/heads/main")
            return git(repo, "rev-parse", "HEAD")

        a = world.asset("a.bin", 100, seed=1)
        world.manifest("a.toml", {**a, "dest": "a.bin"})
        gpg_commit(trusted, "a")
        run = world.sync()
        assert run.code == 0, run.err
        assert run.one("signature_verified")["key"] == trusted.fingerprint
        argv = ["validate", "--verify-signatures", "--gpg-keyring", str(keyring), str(repo.work_path)]
        assert world.run(*argv).code == 0
        b = world.asset("b.bin", 100, seed=2)
        world.manifest("b.toml", {**b, "dest": "b.bin"})
        bad = gpg_commit(other, "b")
        run = world.sync()
        refused = run.one("signature_refused")
        assert run.code == 1 and (refused["commit"], refused["status"]) == (bad, "unknown_key")
        assert world.export_files() == ["a.bin"]
        assert world.run(*argv).code == 1
        signing.export_keyring([trusted], keyring, armor=True)
        check = world.run("check-config", "-c", str(world.config_path))
        assert check.code == 2 and "source.gpg_keyring" in check.err, check.err
    finally:
        for key in (trusted, other):
            signing.stop_gpg_agent(key)
        shutil.rmtree(gdir, ignore_errors=True)


@pytest.mark.parametrize("cut", ["last_record", "whole_log", "last_record_then_torn_tail"])
def test_records_cut_from_the_log_stay_detected_after_the_next_pass(world: World, cut: str) -> None:
    """The ledger's anchor catches records removed from the end (or the whole file); the next pass does
    not silently continue the shortened log: it appends audit_log_broken (logged audit_log_tampered), so
    ``syncd audit --verify`` keeps failing. A fake torn tail cannot pass the cut off as a power cut."""
    for n in range(2):
        world.manifest(f"m{n}.toml", {**world.asset(f"{n}.bin", 100, seed=n), "dest": f"{n}.bin"})
        commit(world.repo, f"m{n}")
        assert world.sync().code == 0
    log = world.state / "audit.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2
    if cut == "whole_log":
        log.unlink()
    else:
        log.write_bytes(lines[0] + (b'{"seq":2,"partial' if cut.endswith("torn_tail") else b""))
    check = ["audit", "-c", str(world.config_path), "--verify"]
    run = world.sync()  # a pass with nothing to do
    assert run.code == 0 and run.one("audit_log_tampered")["expected_seq"] == 2, run.err
    after = world.run(*check)
    assert after.code == 1 and "cut short" in after.out, after.out
    records = audit_records(world)
    assert [r["event"] for r in records][-1] == "audit_log_broken"
    assert not world.sync().named("audit_log_tampered")  # said once; the record stays as evidence
    assert world.run(*check).code == 1


def test_a_withdrawn_file_removed_by_hand_is_no_finding_and_never_restored(world: World) -> None:
    synced_three(world)
    world.manifest("keep.toml", {**world.asset("k.bin", 10, seed=9), "dest": "k.bin"})
    world.repo.remove("assets/m.toml")
    commit(world.repo, "withdraw all")
    assert world.sync().named("asset_orphaned")
    (world.export / "d/1.bin").unlink()
    assert verify(world).code == 0
    os.chmod(world.export / "d/0.bin", 0o600)
    assert verify(world, "--repair").code == 1  # an orphan is not restored, not even its mode
    assert not (world.export / "d/1.bin").exists()


def test_a_key_taken_out_of_allowed_signers_stops_vouching_at_the_next_pass(
    world: World, keys: dict[str, signing.SshKey], tmp_path: Path
) -> None:
    """A long-lived engine (the daemon's) remembers verdicts per commit, but only while the trust file is
    unchanged: remove the key and the very next pass refuses the commit it signed."""
    from syncd import config, logs
    from syncd.reconcile import GitProblem, Reconciler

    logs.configure(open(tmp_path / "log.jsonl", "w"), console=False)  # noqa: SIM115
    allowed = signing_config(world, keys)
    world.manifest("a.toml", {**world.asset("a.bin", 100, seed=1), "dest": "a.bin"})
    commit(world.repo, "a", keys["alice"])
    rec = Reconciler(config.load(world.config_path))
    try:
        assert rec.run_pass().ok
        signing.allowed_signers(allowed, [("old@bank.example", keys["old"], "")])
        result = rec.run_pass()
        assert not result.ok and result.git_problem is GitProblem.UNVERIFIED
    finally:
        rec.close()


def test_repair_beside_a_running_syncd_is_refused_at_once(world: World) -> None:
    """--repair needs the state lock before it hashes anything: beside a holder it exits 1 at once,
    naming what to do; the read-only check runs beside it."""
    from syncd.statedir import StateLock

    synced_three(world)
    lock = StateLock(world.state)
    lock.acquire()
    try:
        run = verify(world, "--repair")
        assert run.code == 1 and "stop the daemon first" in run.err, run.err
        assert verify(world).code == 0
    finally:
        lock.release()


def test_output_into_a_closed_pipe_is_no_traceback(world: World) -> None:
    """``syncd audit | head``: the reader went away; syncd ends quietly (141), no traceback."""
    from harness import syncd_command

    synced_three(world)
    r, w = os.pipe()
    os.close(r)  # the reader is gone before syncd writes
    proc = subprocess.run(
        [syncd_command(), "audit", "-c", str(world.config_path)],
        stdout=w,
        stderr=subprocess.PIPE,
        check=False,
    )
    os.close(w)
    assert proc.returncode == 141 and b"Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("value", ["max_rate = 0", 'interval = "10m"', 'intervall = "7d"'])
def test_a_bad_verify_section_is_a_config_error(world: World, value: str) -> None:
    world.write_config()
    world.config_path.write_text(world.config_path.read_text() + f"\n[verify]\n{value}\n")
    run = world.run("check-config", "-c", str(world.config_path))
    assert run.code == 2 and "verify." in run.err and "Traceback" not in run.err, run.err


def test_verify_shows_progress_on_a_terminal_and_none_off_it(world: World) -> None:
    """On a terminal syncd verify redraws files, bytes, rate and ETA; piped, it prints only findings."""
    from harness import on_a_terminal, syncd_command

    synced_three(world)
    code, text = on_a_terminal([syncd_command(), "verify", "-c", str(world.config_path)])
    assert code == 0
    assert "verify 3/3 files" in text and "MB/s" in text and "ETA" in text, text
    assert "3 file(s)" in text and "0 finding(s)" in text
    piped = verify(world)
    assert "verify 3/3" not in piped.err and "0 finding(s)" in piped.err
