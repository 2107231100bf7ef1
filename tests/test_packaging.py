"""The shipped packaging: a hardened unit that systemd accepts, and an example config that validates."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import SSH_KEY, syncd_command

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "syncd.service"
EXAMPLE = ROOT / "packaging" / "syncd.conf.example"
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")


@needs_analyze
def test_unit_exposure_is_at_most_2() -> None:
    """systemd-analyze security rates the unit 2.0 or lower, and --threshold=20 agrees."""
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"Overall exposure level for syncd\.service: (\d+\.\d+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    assert float(m.group(1)) <= 2.0
    gate = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", str(UNIT)],
        capture_output=True,
        check=False,
    )
    assert gate.returncode == 0


@needs_analyze
def test_unit_verifies_cleanly() -> None:
    """systemd-analyze verify reports nothing but the (not installed here) ExecStart binary."""
    out = subprocess.run(
        ["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, check=False
    )
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert all("/opt/syncd/current/bin/syncd" in line for line in lines), lines


def test_unit_contract() -> None:
    """The unit is Type=notify with a watchdog, reload by SIGHUP, a state directory and credentials."""
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=syncd",
        "User=syncd",
        "LoadCredential=artifactory.token:",
        "ReadWritePaths=/srv/nfs/ml-assets",
        "ProtectSystem=strict",
    ):
        assert line in text, line


def test_example_config_is_valid_but_for_missing_files(tmp_path: Path) -> None:
    """check-config on the example reports only files that do not exist on this machine."""
    out = subprocess.run(
        [syncd_command(), "check-config", "-c", str(EXAMPLE)], capture_output=True, text=True, check=False
    )
    problems = [line for line in out.stderr.splitlines() if line.startswith("at '")]
    assert out.returncode in (0, 2)
    for line in problems:
        assert "no such file" in line or "does not exist" in line, line


def _example_with_files(tmp_path: Path, secrets: dict[str, str]) -> tuple[str, Path]:
    """The example's text with a real known_hosts in place, and a credentials directory (as systemd's
    LoadCredential= provides it) holding the SSH key, the Artifactory token and ``secrets``."""
    creds = tmp_path / "creds"
    creds.mkdir()
    for name, text in {"id_ed25519": SSH_KEY, "artifactory.token": "secret\n", **secrets}.items():
        (creds / name).write_text(text)
        (creds / name).chmod(0o600)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("git.example.com ssh-ed25519 AAAA\n")
    return EXAMPLE.read_text().replace("/etc/syncd/known_hosts", str(known_hosts)), creds


def _check_config(tmp_path: Path, text: str, creds: Path) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "syncd.conf"
    conf.write_text(text)
    return subprocess.run(
        [syncd_command(), "check-config", "-c", str(conf)],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(creds)},
    )


def test_example_config_passes_with_its_files(tmp_path: Path) -> None:
    """With its secret files present (as systemd's LoadCredential= provides them), the example passes."""
    text, creds = _example_with_files(tmp_path, {})
    out = _check_config(tmp_path, text, creds)
    assert out.returncode == 0, out.stderr
    assert "interval_s = 300.0" in out.stdout


def test_sysusers_declares_the_user() -> None:
    """The sysusers file creates the syncd user the unit runs as."""
    text = (ROOT / "packaging" / "syncd.sysusers").read_text()
    assert re.search(r"^u syncd ", text, re.M)


def test_example_notify_block_uncommented_passes(tmp_path: Path) -> None:
    """The commented [notify] block of the example is a working configuration once uncommented (its
    key names are the contract), with its secret files present."""
    secrets = {"smtp.password": "p\n", "webhook.token": "w\n", "webhook.hmac": "h\n"}
    text, creds = _example_with_files(tmp_path, secrets)
    head, block = text.split("# [notify]\n", 1)
    lines = ["[notify]"]
    for line in block.splitlines():
        body = line.removeprefix("# ")
        if body.startswith("[notify") or (" = " in body and not body.startswith(("ca_file", " "))):
            lines.append(body)
    out = _check_config(tmp_path, head + "\n".join(lines) + "\n", creds)
    assert out.returncode == 0, out.stderr + (tmp_path / "syncd.conf").read_text()
    assert "notify = problem, recovery by mail via smtp.bank.example:587 (starttls) to 1 and webhook to " \
        "https://chat.bank.example" in out.stdout  # fmt: skip


def test_example_signature_and_verify_keys_uncommented_pass(tmp_path: Path) -> None:
    """The commented signature keys and [verify] block of the example are valid once uncommented, with a
    real allowed-signers file in place."""
    text, creds = _example_with_files(tmp_path, {})
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'alice@bank.example namespaces="git" {(tmp_path / "k.pub").read_text()}')
    text = text.replace("/etc/syncd/allowed_signers", str(allowed))
    for line in ('# verify_signatures = "ssh"', f'# allowed_signers = "{allowed}"', "# [verify]",
                 '# interval = "7d"', "# max_rate = 100"):  # fmt: skip
        assert line in text, line
        text = text.replace(line, line.removeprefix("# "))
    out = _check_config(tmp_path, text, creds)
    assert out.returncode == 0, out.stderr
    assert (
        f"verify_signatures = ssh ({allowed})" in out.stdout and "verify_interval_s = 604800.0" in out.stdout
    )


def test_version_names_every_component() -> None:
    """``syncd --version`` prints syncd's, Python's, pygit2's and libgit2's versions and the ledger
    schema, one per line, and exits 0."""
    import importlib.metadata
    import platform

    import pygit2

    import syncd
    from syncd.ledger import SCHEMA_VERSION

    out = subprocess.run([syncd_command(), "--version"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"syncd {syncd.__version__}",
        f"Python {platform.python_version()} ({platform.python_implementation()})",
        f"pygit2 {importlib.metadata.version('pygit2')}",
        f"libgit2 {pygit2.LIBGIT2_VERSION}",
        f"ledger schema {SCHEMA_VERSION}",
    ]


def test_ansible_role_and_playbook_pass_ansible_lint_production() -> None:
    """packaging/ansible (the role, the example playbook) passes ansible-lint's production profile."""
    lint = Path(sys.executable).parent / "ansible-lint"
    assert lint.exists(), "ansible-lint is missing (a test dependency)"
    where = ROOT / "packaging" / "ansible"
    env = {**os.environ, "NO_COLOR": "1", "PATH": f"{lint.parent}:{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [str(lint), "--offline", "--nocolor", "--profile", "production", "playbook.yml", "roles/syncd"],
        cwd=where,
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Profile 'production' was required, and it passed" in done.stdout + done.stderr


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.choice(["str", "int", "float", "bool", "list", "map"] if depth < 2 else ["str", "int", "bool"])
    if kind == "str":
        alphabet = "aZ09 _-.\"'\\\n\t\x00\x1f\x7fé€ключ𝄞#=[]{}"
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
    if kind == "int":
        return rng.randint(-(2**62), 2**62)
    if kind == "float":
        return rng.choice([0.5, -0.0, 1e-300, 123456.789, -2.5])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "list":  # TOML arrays may mix types since 1.0; a mapping in one is an inline table
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {_random_key(rng): _random_value(rng, depth + 1) for _ in range(rng.randint(1, 3))}


def _random_key(rng: random.Random) -> str:
    return rng.choice(
        ["url", "interval", "a-b_c", "dotted.key", "space key", 'quo"te', "ключ", "a=b", "x"]
    ) + str(rng.randint(0, 99))


def test_the_role_renders_any_section_values_to_toml_that_reads_back_the_same(tmp_path: Path) -> None:
    """Seeded random section mappings (odd strings, keys that are not bare, nested tables, lists with
    inline tables) rendered by the role's template with ansible, then parsed by tomllib: the same values."""
    import tomllib

    ansible = Path(sys.executable).parent / "ansible"
    assert ansible.exists(), "ansible is missing (ansible-core, a test dependency)"
    rng = random.Random(1213)  # noqa: S311 - test data, not crypto
    sections = ["source", "artifactory", "export", "download", "schedule", "state", "status", "metrics",
                "http", "notify", "verify", "prune"]  # fmt: skip
    want = {s: {_random_key(rng): _random_value(rng) for _ in range(rng.randint(1, 6))} for s in sections}
    (tmp_path / "vars.json").write_text(json.dumps({f"syncd_{s}": v for s, v in want.items()}))
    role = ROOT / "packaging/ansible/roles/syncd"
    out = tmp_path / "syncd.conf"
    done = subprocess.run(
        [str(ansible), "localhost", "-m", "template", "-a", f"src={role}/templates/syncd.conf.j2 dest={out}",
         "-e", f"@{role}/defaults/main.yml", "-e", f"@{tmp_path / 'vars.json'}"],
        capture_output=True, text=True, check=False, timeout=300,
        env={**os.environ, "ANSIBLE_LOCALHOST_WARNING": "False",
             "ANSIBLE_INVENTORY_UNPARSED_WARNING": "False"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert tomllib.loads(out.read_text()) == want
