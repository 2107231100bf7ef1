"""End-to-end: ``syncd manifest new`` and ``syncd validate --remote`` against a stand-in for Artifactory's
storage API (a real HTTP server on 127.0.0.1) beside the real nginx that serves the same files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from artifactory import StorageApi
from harness import Run, World, manifest_text, on_a_terminal, syncd_command
from servers import FaultServer

pytestmark = pytest.mark.e2e


@pytest.fixture
def api(world: World) -> Iterator[StorageApi]:
    with StorageApi(world.nginx.root, world.nginx.open_url()) as server:
        yield server


@pytest.fixture
def token_file(tmp_path: Path, api: StorageApi) -> Path:
    path = tmp_path / "laptop" / "art.token"
    path.parent.mkdir()
    path.write_text(api.token + "\n")
    path.chmod(0o600)
    return path


def new(
    world: World, api: StorageApi, token_file: Path, *args: str, env: dict[str, str] | None = None
) -> Run:
    return world.run(
        "manifest", "new", "--artifactory", api.url, "--token-file", str(token_file), *args, env=env
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest_new_validates_and_syncs_byte_exact(world: World, api: StorageApi, token_file: Path) -> None:
    """The printed manifest validates, and syncd sync publishes exactly the uploaded bytes at its dests."""
    a = world.asset("weights/model-00001.safetensors", 300_000, seed=1)
    b = world.asset("weights/model-00002.safetensors", 0, seed=2)
    run = new(world, api, token_file, "--dest", "models/llm/", a["source"], b["source"])
    assert run.code == 0, run.err
    assert "2 asset(s)" in run.err
    assert 'dest = "models/llm/model-00001.safetensors"' in run.out
    assert f'sha256 = "{a["sha256"]}"' in run.out and "size = 300000" in run.out
    assert api.token not in run.out + run.err
    world.repo.write("assets/llm.toml", run.out)
    assert world.run("validate", str(world.repo.work_path / "assets")).code == 0
    world.repo.commit("add llm")
    synced = world.sync()
    assert synced.code == 0, synced.err
    for entry, name in ((a, "model-00001.safetensors"), (b, "model-00002.safetensors")):
        assert sha(world.export / "models/llm" / name) == entry["sha256"]
    asked = [auth for p, auth in api.requests]
    assert asked and all(auth == f"Bearer {api.token}" for auth in asked)


def test_default_dest_is_the_source_without_its_repository(
    world: World, api: StorageApi, token_file: Path
) -> None:
    """Without --dest a file lands at its path below the repository key."""
    a = world.asset("data/shard-0.tar", 1000)
    run = new(world, api, token_file, a["source"])
    assert run.code == 0, run.err
    assert 'dest = "data/shard-0.tar"' in run.out


def test_recursive_keeps_the_layout_below_the_folder(world: World, api: StorageApi, token_file: Path) -> None:
    """--recursive lists a nested folder and asks each file's sha256 (the listing has none)."""
    files = {
        f"ds/v2/{p}": world.asset(f"ds/v2/{p}", 100 + i, seed=i)
        for i, p in enumerate(["train/a.tar", "train/deep/b.tar", "val/c.tar", "README"])
    }
    run = new(world, api, token_file, "--recursive", "--dest", "datasets/ds/", f"{world.tag}/ds/v2")
    assert run.code == 0, run.err
    for rel, entry in files.items():
        dest = "datasets/ds/" + rel.removeprefix("ds/v2/")
        assert f'dest = "{dest}"\n' in run.out
        assert f'sha256 = "{entry["sha256"]}"' in run.out
    listed = [p for p in api.api_requests() if "?list" in p]
    assert len(listed) == 1
    infos = [p for p in api.api_requests() if "?" not in p]
    assert len(infos) == 1 + len(files)  # the folder, then each file
    world.repo.write("assets/ds.toml", run.out)
    world.repo.commit("ds")
    assert world.sync().code == 0
    assert sha(world.export / "datasets/ds/train/deep/b.tar") == files["ds/v2/train/deep/b.tar"]["sha256"]


def test_a_folder_needs_recursive(world: World, api: StorageApi, token_file: Path) -> None:
    """A folder given without --recursive is an error naming it; nothing is printed on stdout."""
    world.asset("f/x.bin", 10)
    run = new(world, api, token_file, f"{world.tag}/f")
    assert run.code == 1
    assert f"{world.tag}/f: is a folder; add --recursive" in run.err
    assert run.out == ""


def test_hash_locally_against_plain_nginx(world: World, tmp_path: Path) -> None:
    """--hash-locally against a plain HTTP server streams and hashes each file."""
    a = world.asset("plain/one.bin", 2_000_000, seed=7)
    run = world.run("manifest", "new", "--artifactory", world.nginx.open_url(), "--hash-locally", a["source"])
    assert run.code == 0, run.err
    assert f'sha256 = "{a["sha256"]}"' in run.out and "size = 2000000" in run.out


def test_without_a_storage_api_the_file_is_hashed_here(world: World) -> None:
    """A server without the storage API (404 there, the file downloads): hashed here, with a note."""
    a = world.asset("plain/two.bin", 5000, seed=3)
    run = world.run("manifest", "new", "--artifactory", world.nginx.open_url(), a["source"])
    assert run.code == 0, run.err
    assert f'sha256 = "{a["sha256"]}"' in run.out
    assert "hashed here" in run.err


def test_a_file_without_a_sha256_in_artifactory_is_hashed_here(
    world: World, api: StorageApi, token_file: Path
) -> None:
    """An old artifact whose info has no checksums.sha256 is streamed (through the redirect) and hashed."""
    a = world.asset("old/legacy.bin", 70_000, seed=5)
    api.no_sha256.add(a["source"])
    run = new(world, api, token_file, a["source"])
    assert run.code == 0, run.err
    assert f'sha256 = "{a["sha256"]}"' in run.out
    assert f"note: {a['source']}: hashed here" in run.err


def test_missing_source_is_an_error_and_nothing_is_written(
    world: World, api: StorageApi, token_file: Path, tmp_path: Path
) -> None:
    """A source that does not exist fails the command (exit 1) and -o FILE is not created."""
    a = world.asset("here.bin", 10)
    out = tmp_path / "m.toml"
    run = new(world, api, token_file, "-o", str(out), a["source"], f"{world.tag}/not-there.bin")
    assert run.code == 1
    assert f"{world.tag}/not-there.bin: no such file in Artifactory" in run.err
    assert not out.exists()


def test_output_file_is_never_overwritten_without_force(
    world: World, api: StorageApi, token_file: Path, tmp_path: Path
) -> None:
    """-o FILE writes the manifest; an existing FILE is kept (exit 2) unless --force."""
    a = world.asset("o.bin", 10)
    out = tmp_path / "m.toml"
    assert new(world, api, token_file, "-o", str(out), a["source"]).code == 0
    assert f'sha256 = "{a["sha256"]}"' in out.read_text()
    out.write_text("# mine\n")
    run = new(world, api, token_file, "-o", str(out), a["source"])
    assert run.code == 2 and "--force" in run.err
    assert out.read_text() == "# mine\n"
    assert new(world, api, token_file, "-o", str(out), "--force", a["source"]).code == 0
    assert "[[asset]]" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".m.toml")) == []


def test_dest_without_slash_names_one_file(world: World, api: StorageApi, token_file: Path) -> None:
    """--dest without a trailing '/' and two files: an error that says to end it with '/'."""
    a, b = world.asset("p/1.bin", 10), world.asset("p/2.bin", 10)
    run = new(world, api, token_file, "--dest", "one/name.bin", a["source"], b["source"])
    assert run.code == 1
    assert "end it with '/'" in run.err


def test_token_from_the_environment_and_its_file_rules(
    world: World, api: StorageApi, token_file: Path
) -> None:
    """$SYNCD_ARTIFACTORY_TOKEN_FILE is used; a token file others can read is refused (exit 2), unquoted."""
    a = world.asset("env.bin", 10)
    run = world.run(
        "manifest",
        "new",
        "--artifactory",
        api.url,
        a["source"],
        env={"SYNCD_ARTIFACTORY_TOKEN_FILE": str(token_file)},
    )
    assert run.code == 0, run.err
    token_file.chmod(0o644)
    run = new(world, api, token_file, a["source"])
    assert run.code == 2
    assert "--token-file" in run.err and api.token not in run.err


def test_a_wrong_token_fails_without_echoing_it(world: World, api: StorageApi, tmp_path: Path) -> None:
    """Artifactory's 401 fails the source; the token sent is nowhere in the output."""
    bad = tmp_path / "bad.token"
    bad.write_text("wrong-token-" + "9" * 20)
    bad.chmod(0o600)
    a = world.asset("w.bin", 10)
    run = world.run("manifest", "new", "--artifactory", api.url, "--token-file", str(bad), a["source"])
    assert run.code == 1
    assert "HTTP 401" in run.err
    assert "wrong-token" not in run.out + run.err


def test_a_config_supplies_the_artifactory(world: World, api: StorageApi) -> None:
    """-c CONFIG reuses the config's [artifactory] (its URL and token file)."""
    token = world.config_path.parent / "artifactory.token"
    token.write_text(api.token)
    world.write_config(artifactory={"url": api.url, "token_file": "artifactory.token"})
    a = world.asset("c.bin", 10)
    run = world.run("manifest", "new", "-c", str(world.config_path), a["source"])
    assert run.code == 0, run.err
    assert f'sha256 = "{a["sha256"]}"' in run.out


def test_hostile_storage_answers_fail_that_source(world: World, api: StorageApi, token_file: Path) -> None:
    """A size that is not digits, a bad sha256, a listing with '..': each an error naming the source."""
    a, b = world.asset("h/a.bin", 10), world.asset("h/b.bin", 10)
    api.answers[a["source"]] = (200, b'{"size": "12abc", "checksums": {}}')
    api.answers[b["source"]] = (200, b'{"size": "10", "checksums": {"sha256": "xyz"}}')
    run = new(world, api, token_file, a["source"], b["source"])
    assert run.code == 1
    assert f"{a['source']!r} has no size of digits" in run.err
    assert f"{b['source']!r} has a checksums.sha256 that is not 64 hex digits" in run.err
    api.answers.clear()
    api.answers[f"{world.tag}/h?list"] = (200, b'{"files": [{"uri": "/../../etc/passwd", "folder": false}]}')
    run = new(world, api, token_file, "--recursive", f"{world.tag}/h")
    assert run.code == 1
    assert "which is not a plain path below the folder" in run.err
    api.answers[f"{world.tag}/h?list"] = (200, b"<html>not json</html>")
    run = new(world, api, token_file, "--recursive", f"{world.tag}/h")
    assert run.code == 1 and "is not JSON" in run.err


# validate --remote -------------------------------------------------------------------------------


def remote(world: World, api: StorageApi, token_file: Path, *args: str) -> Run:
    return world.run("validate", "--remote", "--artifactory", api.url, "--token-file", str(token_file), *args)


def test_validate_remote_reports_file_line_for_each_mismatch(
    world: World, api: StorageApi, token_file: Path
) -> None:
    """A wrong sha256, a wrong size and a missing source: one FILE:LINE line each, at the field's line."""
    good = world.asset("v/good.bin", 100, seed=1)
    wrong_sha = world.asset("v/sha.bin", 100, seed=2)
    wrong_size = world.asset("v/size.bin", 100, seed=3)
    path = world.repo.write(
        "assets/v.toml",
        manifest_text(
            {**good, "dest": "v/good.bin"},
            {**wrong_sha, "sha256": "0" * 64, "dest": "v/sha.bin"},
            {**wrong_size, "size": 101, "dest": "v/size.bin"},
            {"source": f"{world.tag}/v/missing.bin", "sha256": "1" * 64, "size": 5, "dest": "v/missing.bin"},
        ),
    )
    run = remote(world, api, token_file, str(path))
    assert run.code == 1, run.out + run.err
    lines = run.out.splitlines()
    text = path.read_text().splitlines()
    for prefix, needle in (
        (f"{path}:", f"asset[1].sha256: the manifest says {'0' * 64}, Artifactory has {wrong_sha['sha256']}"),
        (f"{path}:", "asset[2].size: the manifest says 101 bytes, Artifactory has 100"),
        (f"{path}:", f"asset[3].source: source '{world.tag}/v/missing.bin' does not exist in Artifactory"),
    ):
        hit = [line for line in lines if line.startswith(prefix) and needle in line]
        assert len(hit) == 1, (needle, lines)
        number = int(hit[0][len(prefix) :].split(":", 1)[0])
        field = needle.split(".", 1)[1].split(":", 1)[0]
        assert text[number - 1].startswith(field), (field, text[number - 1])
    assert len(lines) == 3
    assert api.token not in run.out + run.err


def test_validate_remote_passes_a_matching_manifest(world: World, api: StorageApi, token_file: Path) -> None:
    """Every asset matching Artifactory: exit 0, and the count is said."""
    a = world.asset("ok/a.bin", 100)
    path = world.repo.write("assets/ok.toml", manifest_text({**a, "dest": "ok/a.bin"}))
    run = remote(world, api, token_file, str(path))
    assert run.code == 0, run.out + run.err
    assert "1 asset(s) match Artifactory" in run.err


def test_validate_remote_with_base_asks_only_about_changed_assets(
    world: World, api: StorageApi, token_file: Path
) -> None:
    """With --base only new or changed assets are asked about (an old one is not, even if it is gone)."""
    old = world.asset("b/old.bin", 100, seed=1)
    world.repo.write("assets/b.toml", manifest_text({**old, "dest": "b/old.bin"}))
    base = world.repo.commit("base")
    (world.blobs / "b/old.bin").unlink()  # retired from Artifactory: not this PR's business
    new_one = world.asset("b/new.bin", 100, seed=2)
    world.repo.write(
        "assets/b.toml", manifest_text({**old, "dest": "b/old.bin"}, {**new_one, "dest": "b/new.bin"})
    )
    run = remote(world, api, token_file, "--base", base, str(world.repo.work_path / "assets"))
    assert run.code == 0, run.out + run.err
    assert "1 asset(s) match" in run.err
    assert [p for p in api.api_requests()] == [f"/artifactory/api/storage/{new_one['source']}"]


def test_validate_remote_without_a_sha256_or_a_storage_api(
    world: World, api: StorageApi, token_file: Path
) -> None:
    """No checksums.sha256, or no storage API (plain nginx): 'cannot tell its sha256', exit 1."""
    a = world.asset("n/a.bin", 100)
    api.no_sha256.add(a["source"])
    path = world.repo.write("assets/n.toml", manifest_text({**a, "dest": "n/a.bin"}))
    run = remote(world, api, token_file, str(path))
    assert run.code == 1
    assert "Artifactory cannot tell its sha256 (no checksums.sha256)" in run.out
    run = world.run("validate", "--remote", "--artifactory", world.nginx.open_url(), str(path))
    assert run.code == 1
    assert "cannot tell its sha256: the storage API answered 404" in run.out


def test_validate_remote_needs_an_artifactory(world: World, tmp_path: Path) -> None:
    """--remote without --artifactory or -c is a usage error (exit 2); --artifactory without --remote too."""
    path = tmp_path / "m.toml"
    path.write_text(manifest_text({"source": "r/a", "sha256": "a" * 64, "size": 1, "dest": "a"}))
    run = world.run("validate", "--remote", str(path))
    assert run.code == 2 and "--artifactory URL" in run.err
    run = world.run("validate", "--artifactory", "http://127.0.0.1:9", str(path))
    assert run.code == 2


def test_a_redirect_to_another_origin_gets_no_token(
    world: World, api: StorageApi, token_file: Path, fault_server: FaultServer
) -> None:
    """Hashing a file the API has no sha256 for follows Artifactory's redirect to its storage; that other
    origin never sees the token."""
    a = world.asset("r/signed.bin", 4096, seed=9)
    api.no_sha256.add(a["source"])
    api.redirect_base = fault_server.url
    fault_server.route(f"/{a['source']}", body=(world.blobs / "r/signed.bin").read_bytes())
    run = new(world, api, token_file, a["source"])
    assert run.code == 0, run.err
    assert f'sha256 = "{a["sha256"]}"' in run.out
    (request,) = [r for r in fault_server.requests if r[1] == f"/{a['source']}"]
    assert "authorization" not in request[2]
    assert all(auth == f"Bearer {api.token}" for _, auth in api.requests)


def test_hashing_draws_progress_on_a_terminal(world: World) -> None:
    """--hash-locally on a terminal draws a progress line (files and bytes hashed)."""
    a = world.asset("t/big.bin", 3_000_000, seed=4)
    code, drawn = on_a_terminal(
        [
            syncd_command(),
            "manifest",
            "new",
            "--artifactory",
            world.nginx.open_url(),
            "--hash-locally",
            a["source"],
        ]
    )
    assert code == 0, drawn
    assert "hashing 1/1 files" in drawn and a["sha256"] in drawn


def test_an_api_answer_redirected_to_another_host_is_refused(world: World, tmp_path: Path) -> None:
    """Artifactory's API answering with a redirect to another host: that host's JSON is never believed
    (manifest new and validate --remote both fail, naming the redirect), and it never gets the token."""
    token = tmp_path / "t.token"
    token.write_text("tok-" + "5" * 30)
    token.chmod(0o600)
    with FaultServer() as origin, FaultServer() as other:
        planted = json.dumps({"size": "7", "checksums": {"sha256": "c" * 64}}).encode()
        other.route("/api/storage/repo/f.bin", body=planted)
        origin.route("/art/api/storage/repo/f.bin", redirect=f"{other.url}/api/storage/repo/f.bin")
        flags = ["--artifactory", f"{origin.url}/art", "--token-file", str(token)]
        run = world.run("manifest", "new", *flags, "repo/f.bin")
        assert run.code == 1 and run.out == ""
        assert "redirected to another host" in run.err
        path = tmp_path / "m.toml"
        path.write_text(
            manifest_text({"source": "repo/f.bin", "sha256": "c" * 64, "size": 7, "dest": "f.bin"})
        )
        run = world.run("validate", "--remote", *flags, str(path))
        assert run.code == 1 and "redirected to another host" in run.out
        assert all("authorization" not in headers for _, _, headers in other.requests)


def test_the_token_never_shows_in_an_answer_syncd_refuses(
    world: World, api: StorageApi, token_file: Path
) -> None:
    """A listing that echoes the token in a bad entry: the error says so without the token."""
    api.answers[f"{world.tag}/e?list"] = (
        200, json.dumps({"files": [{"uri": f"/../{api.token}", "folder": False}]}).encode()
    )  # fmt: skip
    world.asset("e/x.bin", 10)
    run = new(world, api, token_file, "--recursive", f"{world.tag}/e")
    assert run.code == 1 and "not a plain path" in run.err
    assert api.token not in run.out + run.err and "[redacted]" in run.err


def test_output_must_be_a_manifest_name(
    world: World, api: StorageApi, token_file: Path, tmp_path: Path
) -> None:
    """-o out.txt (or OUT.TOML): refused before anything is asked (syncd would not read it), exit 2."""
    a = world.asset("n.bin", 10)
    for name in ("out.txt", "OUT.TOML"):
        run = new(world, api, token_file, "-o", str(tmp_path / name), a["source"])
        assert run.code == 2 and "ends in exactly '.toml'" in run.err
        assert not (tmp_path / name).exists()
    assert api.requests == []


def test_a_size_the_download_contradicts_is_an_error(world: World, api: StorageApi, token_file: Path) -> None:
    """The API gives a size but no sha256, and the file downloads with another size: an error, not a
    manifest with either number."""
    a = world.asset("s/short.bin", 10)
    api.answers[a["source"]] = (200, b'{"size": "5000", "checksums": {"sha1": "x"}}')
    run = new(world, api, token_file, a["source"])
    assert run.code == 1 and run.out == ""
    assert "the storage API says 5000 bytes, but the download gave 10" in run.err


def test_an_api_answer_redirected_outside_the_api_on_the_same_host_is_refused(
    world: World, tmp_path: Path
) -> None:
    """The same host also serves what users uploaded: a storage API answer redirected out of
    {base}/api/ (to an uploaded JSON file) is refused."""
    with FaultServer() as origin:
        forged = json.dumps({"size": "7", "checksums": {"sha256": "d" * 64}}).encode()
        origin.route("/art/uploads/forged.json", body=forged)
        origin.route("/art/api/storage/repo/f.bin", redirect=f"{origin.url}/art/uploads/forged.json")
        run = world.run("manifest", "new", "--artifactory", f"{origin.url}/art", "repo/f.bin")
        assert run.code == 1 and run.out == ""
        assert "redirected outside the API's path" in run.err
