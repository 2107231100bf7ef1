"""Mail and webhooks end to end: ``syncd sync`` and ``syncd run`` (subprocesses) against a real SMTP
server (aiosmtpd, with STARTTLS, AUTH and a test CA) and a real HTTP receiver, on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import World, syncd_command
from mailservers import HangingSmtp, Received, SmtpServer
from servers import TestCA, free_port, make_test_ca, nonblocking_accept
from webhookserver import WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

PASSWORD = "smtp-Pa55-word-never-shown"
TOKEN = "hook-token-never-shown"
HMAC_KEY = "hmac-key-never-shown"
HOOK_PATH = "/hooks/path-SECRET-never-shown"
HOST = socket.gethostname().split(".")[0]
SECRETS = (PASSWORD, TOKEN, HMAC_KEY, "path-SECRET")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(Path(tmp_path_factory.mktemp("notify-ca")))


@pytest.fixture
def smtp(ca: TestCA) -> Iterator[SmtpServer]:
    with SmtpServer(starttls=ca, auth={"syncd": PASSWORD}) as server:
        yield server


def _secret(world: World, name: str, value: str) -> str:
    path = world.config_path.parent / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return name


def mail_config(world: World, server: SmtpServer, ca: TestCA, **notify: Any) -> dict[str, Any]:
    return {
        "notify": {"events": ["problem", "recovery"], **notify},
        "notify.smtp": {
            "host": "127.0.0.1",
            "port": server.port,
            "security": "starttls",
            "username": "syncd",
            "password_file": _secret(world, "smtp.password", PASSWORD),
            "from": "syncd <syncd@nfs01.bank.example>",
            "to": ["ml-platform-ops@bank.example"],
            "timeout": "5s",
            "ca_file": str(ca.cert),
        },
    }


def _no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def _mail_text(m: Received) -> str:
    return m.message.get_content()


def test_one_mail_per_problem_then_one_recovery_and_nothing_after(
    world: World, smtp: SmtpServer, ca: TestCA
) -> None:
    """A missing source fails pass after pass: one mail (STARTTLS, AUTH) naming the dest, source,
    manifest, commit, author, error and what to do; every `syncd sync` is a new process, so nothing is
    re-sent after a restart; the fix gives one recovery mail; then silence."""
    world.write_config(**mail_config(world, smtp, ca))
    good = world.asset("good.bin", 1000)
    missing = {"source": f"{world.tag}/later.bin", "sha256": "a" * 64, "size": 10}
    world.manifest("team.toml", {**good, "dest": "d/good.bin"}, {**missing, "dest": "d/later.bin"})
    commit = world.repo.commit("add two assets")
    runs = [world.sync() for _ in range(3)]
    assert [r.code for r in runs] == [1, 1, 1]
    (m,) = smtp.wait_for(1)
    time.sleep(0.5)
    assert len(smtp.messages) == 1
    assert m.tls and m.auth_user == "syncd" and m.rcpt_tos == ["ml-platform-ops@bank.example"]
    h = m.message
    assert h["Subject"] == f"[syncd {HOST}] 1 new problem: d/later.bin: http 404"
    assert h["Auto-Submitted"] == "auto-generated" and h["Message-ID"] and h["Date"]
    assert h["From"] == "syncd <syncd@nfs01.bank.example>"
    text = _mail_text(m)
    for want in (
        "dest: d/later.bin",
        f"source: {world.tag}/later.bin",
        "manifest: assets/team.toml",
        f"commit: {commit[:12]}",
        "author: Syncd Test <syncd-test@example.invalid>",
        "error: ",
        "what to do: Artifactory has no file at the source",
        "syncd status",
        "journalctl -u syncd",
    ):
        assert want in text, (want, text)
    assert runs[0].one("notification_sent")["new"] == 1
    assert not runs[1].named("notification_sent") and not runs[2].named("notification_sent")
    # the fix: the file is uploaded under the manifest's sha256
    sha = world.asset("later.bin", 10)
    world.manifest("team.toml", {**good, "dest": "d/good.bin"}, {**sha, "dest": "d/later.bin"})
    world.repo.commit("fix the sha256")
    assert world.sync().code == 0
    recovered = smtp.wait_for(2)[1]
    assert recovered.message["Subject"] == f"[syncd {HOST}] 1 recovered: d/later.bin: http 404"
    assert world.sync().code == 0 and world.sync().code == 0
    time.sleep(0.5)
    assert len(smtp.messages) == 2
    _no_secrets(*(r.err for r in runs), *(x.data.decode() for x in smtp.messages))


def test_a_reminder_after_repeat_and_min_failures(world: World, smtp: SmtpServer, ca: TestCA) -> None:
    """min_failures = 2: nothing after the first failed pass, one mail after the second; repeat = 2s:
    a reminder once that has passed, and no more before it passes again."""
    world.write_config(**mail_config(world, smtp, ca, min_failures=2, repeat="2s"))
    missing = {"source": f"{world.tag}/nope.bin", "sha256": "b" * 64, "size": 10}
    world.manifest("m.toml", {**missing, "dest": "x/nope.bin"})
    world.repo.commit("a missing asset")
    assert world.sync().code == 1
    time.sleep(0.3)
    assert smtp.messages == []
    assert world.sync().code == 1
    (first,) = smtp.wait_for(1)
    assert "1 new problem" in first.message["Subject"]
    assert world.sync().code == 1
    time.sleep(0.3)
    assert len(smtp.messages) == 1
    time.sleep(2.1)
    assert world.sync().code == 1
    second = smtp.wait_for(2)[1]
    assert "1 problem still open: x/nope.bin" in second.message["Subject"]
    assert "Still open (1):" in _mail_text(second)


def test_a_digest_of_what_landed_and_mail_to_authors_inside_author_domains(
    world: World, smtp: SmtpServer, ca: TestCA
) -> None:
    """events = ["published"]: one digest per pass listing each file; with mail_authors, the author of
    the commit that added an asset gets one mail for the pass, and only inside author_domains."""
    world.write_config(
        **mail_config(
            world,
            smtp,
            ca,
            events=["problem", "published"],
            mail_authors=True,
            author_domains=["bank.example"],
        )
    )
    a, b, c = (world.asset(f"{n}.bin", 100 + i, seed=i) for i, n in enumerate("abc"))
    env = {"GIT_AUTHOR_NAME": "Ada Lovelace", "GIT_AUTHOR_EMAIL": "ada@ml.bank.example"}
    world.manifest("ada.toml", {**a, "dest": "ada/a.bin"}, {**b, "dest": "ada/b.bin"})
    world.repo.git("add", "--all")
    subprocess.run(["git", "commit", "-q", "-m", "ada's assets"], cwd=world.repo.work_path,
                   env={**world.repo.env, **env}, check=True)  # fmt: skip
    world.manifest("eve.toml", {**c, "dest": "eve/c.bin"})
    world.repo.git("add", "--all")
    subprocess.run(["git", "commit", "-q", "-m", "eve's asset"], cwd=world.repo.work_path,
                   env={**world.repo.env, "GIT_AUTHOR_NAME": "Eve", "GIT_AUTHOR_EMAIL": "eve@evil.example"},
                   check=True)  # fmt: skip
    world.repo.git("push", "--quiet", "origin", "HEAD:refs/heads/main")
    run = world.sync()
    assert run.code == 0, run.err
    got = smtp.wait_for(2)
    time.sleep(0.5)
    assert len(smtp.messages) == 2
    by = {tuple(m.rcpt_tos): m for m in smtp.messages}
    ops, ada = by[("ml-platform-ops@bank.example",)], by[("ada@ml.bank.example",)]
    assert ops.message["Subject"].startswith(f"[syncd {HOST}] 3 files published: ada/a.bin, ada/b.bin, …")
    text = _mail_text(ops)
    assert "* ada/a.bin (100 B, commit" in text and "by Ada Lovelace <ada@ml.bank.example>" in text
    assert "by Eve <eve@evil.example>" in text
    assert "eve" not in _mail_text(ada) and "ada/b.bin" in _mail_text(ada)
    assert not any("eve@evil.example" in m.rcpt_tos for m in got)
    assert world.sync().code == 0
    time.sleep(0.5)
    assert len(smtp.messages) == 2  # nothing new landed: no digest


def test_webhook_body_signature_token_and_no_credential_on_a_redirect(world: World) -> None:
    """The webhook gets one JSON POST per pass with the documented fields, a Bearer token and an HMAC of
    the exact body; a redirect is not followed (the other server never sees the token), is logged once
    as notify_failed, and the message is sent once the URL answers again."""
    with WebhookReceiver() as hook, WebhookReceiver() as elsewhere:
        world.write_config(
            notify={"events": ["problem", "recovery", "published"]},
            **{
                "notify.webhook": {
                    "url": hook.url(HOOK_PATH),
                    "token_file": _secret(world, "hook.token", TOKEN),
                    "hmac_secret_file": _secret(world, "hook.hmac", HMAC_KEY),
                    "timeout": "5s",
                }
            },
        )
        good = world.asset("ok.bin", 500)
        world.manifest("m.toml", {**good, "dest": "w/ok.bin"})
        world.manifest("bad.toml", {"source": "x", "dest": "../escape", "sha256": "z", "size": -1})
        world.repo.commit("one good, one invalid manifest")
        hook.redirect_to = elsewhere.url("/catch")
        first = world.sync()
        assert first.code == 1
        (failed,) = first.named("notify_failed")
        assert "redirect" in failed["error"] and failed["channel"] == f"webhook http://127.0.0.1:{hook.port}"
        assert elsewhere.hits == []
        hook.redirect_to = None
        hook.clear()
        second = world.sync()
        (hit,) = hook.wait_for(1)
        assert hit.method == "POST" and hit.path == HOOK_PATH
        assert hit.headers["authorization"] == f"Bearer {TOKEN}"
        want = "sha256=" + hmac.new(HMAC_KEY.encode(), hit.body, hashlib.sha256).hexdigest()
        assert hit.headers["x-syncd-signature"] == want
        body = json.loads(hit.body)
        assert body["host"] == HOST and body["kind"] == "problem" and body["schema"] == 1
        (problem,) = body["problems"]
        assert problem["kind"] == "manifest_invalid" and problem["manifest"] == "assets/bad.toml"
        assert problem["author"] == "Syncd Test <syncd-test@example.invalid>" and problem["todo"]
        (landed,) = body["published"]
        assert landed["dest"] == "w/ok.bin" and landed["bytes"] == 500 and landed["sha256"] == good["sha256"]
        assert body["recovered"] == []
        assert second.one("notification_sent")["published"] == 1
        _no_secrets(first.err, second.err)


def test_smtp_down_or_hanging_never_holds_a_pass_and_the_mail_goes_out_later(
    world: World, ca: TestCA
) -> None:
    """SMTP hanging (accepts, never greets) and then down: the pass publishes, exits 0 within the mail
    timeout, logs notify_failed; once a server listens, the next pass sends the waiting digest."""
    port = free_port()
    good = world.asset("g.bin", 2000)
    world.manifest("m.toml", {**good, "dest": "g.bin"})
    world.repo.commit("one asset")

    def config(p: int) -> None:
        world.write_config(
            notify={"events": ["problem", "recovery", "published"]},
            **{
                "notify.smtp": {
                    "host": "127.0.0.1", "port": p, "security": "none", "from": "syncd@nfs01.bank.example",
                    "to": ["ops@bank.example"], "timeout": "2s",
                }
            },
        )  # fmt: skip

    with HangingSmtp() as tarpit:
        config(tarpit.port)
        started = time.monotonic()
        hung = world.sync()
        took = time.monotonic() - started
    assert hung.code == 0 and (world.export / "g.bin").exists()
    assert took < 20, took
    (failed,) = hung.named("notify_failed")
    assert "timed out" in failed["error"] or "closed" in failed["error"]
    config(port)
    down = world.sync()
    assert down.code == 0 and "connection refused" in down.one("notify_failed")["error"]
    with SmtpServer(port=port) as server:
        up = world.sync()
        (m,) = server.wait_for(1)
        assert up.code == 0 and "1 file published: g.bin" in m.message["Subject"]
        assert world.sync().code == 0
        time.sleep(0.3)
        assert len(server.messages) == 1


def test_notify_test_says_per_channel_whether_it_was_accepted(
    world: World, smtp: SmtpServer, ca: TestCA
) -> None:
    """`syncd notify --test`: exit 0 and "accepted" when every channel took the test message; exit 1
    naming why when one did not; never a secret in its output."""
    with WebhookReceiver() as hook:
        cfg = mail_config(world, smtp, ca)
        cfg["notify.webhook"] = {"url": hook.url(HOOK_PATH), "token_file": _secret(world, "t", TOKEN)}
        world.write_config(**cfg)
        ok = world.run("notify", "--test", "-c", str(world.config_path))
        assert ok.code == 0, ok.err
        assert f"mail via 127.0.0.1:{smtp.port}: accepted" in ok.out
        assert f"webhook http://127.0.0.1:{hook.port}: accepted" in ok.out
        (m,) = smtp.wait_for(1)
        assert m.message["Subject"] == f"[syncd {HOST}] test message"
        assert json.loads(hook.wait_for(1)[0].body)["kind"] == "test"
        hook.status = 500
        cfg["notify.smtp"]["password_file"] = _secret(world, "wrong", "not-the-password")
        world.write_config(**cfg)
        bad = world.run("notify", "--test", "-c", str(world.config_path))
        assert bad.code == 1
        assert "NOT sent: mail to 127.0.0.1" in bad.out and "refused the user name or password" in bad.out
        assert f"webhook http://127.0.0.1:{hook.port}: NOT sent: webhook at" in bad.out and "500" in bad.out
        _no_secrets(ok.out, ok.err, bad.out, bad.err)


def test_the_daemon_mails_one_problem_once_over_many_passes(
    world: World, smtp: SmtpServer, ca: TestCA
) -> None:
    """`syncd run` with a 0.3 s interval and a failing asset: one mail over many passes."""
    world.write_config(schedule={"interval": "300ms", "jitter": "0s"}, **mail_config(world, smtp, ca))
    world.manifest(
        "m.toml", {"source": f"{world.tag}/gone.bin", "sha256": "c" * 64, "size": 5, "dest": "gone"}
    )
    world.repo.commit("a missing asset")
    proc = subprocess.Popen([syncd_command(), "run", "-c", str(world.config_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        smtp.wait_for(1)
        time.sleep(3)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert len(smtp.messages) == 1
    assert err.count('"pass_finished"') >= 5 and '"asset_deferred"' in err  # backoff: still open, no recovery
    _no_secrets(err)


def test_a_reload_adds_a_channel_which_hears_of_open_problems_once(
    world: World, smtp: SmtpServer, ca: TestCA
) -> None:
    """Each channel keeps its own state: a daemon posting to a webhook is reloaded (SIGHUP) with mail
    added; the mail channel is told of the open problem once, the webhook is not told again."""
    import signal

    with WebhookReceiver() as hook:
        schedule = {"interval": "300ms", "jitter": "0s"}
        webhook = {"notify.webhook": {"url": hook.url("/h"), "timeout": "5s"}}
        world.write_config(schedule=schedule, notify={"events": ["problem", "recovery"]}, **webhook)
        gone = {"source": f"{world.tag}/gone.bin", "sha256": "d" * 64, "size": 5, "dest": "gone"}
        world.manifest("m.toml", gone)
        world.repo.commit("a missing asset")
        proc = subprocess.Popen([syncd_command(), "run", "-c", str(world.config_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            hook.wait_for(1)
            cfg = mail_config(world, smtp, ca)
            world.write_config(schedule=schedule, **cfg, **webhook)
            proc.send_signal(signal.SIGHUP)
            (m,) = smtp.wait_for(1)
            time.sleep(2)
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and '"config_reloaded"' in err
    assert "1 new problem: gone: http 404" in m.message["Subject"]
    assert len(hook.hits) == 1 and len(smtp.messages) == 1


class SlowSmtp:
    """A real (minimal) SMTP server on 127.0.0.1 that waits ``delay`` s before every reply: each step is
    within a client's timeout, the whole session is not. Records the messages it accepted."""

    def __init__(self, delay: float) -> None:
        import socketserver
        import threading

        self.delay = delay
        self.accepted: list[bytes] = []
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def reply(self, text: str) -> None:
                time.sleep(outer.delay)
                self.wfile.write(text.encode() + b"\r\n")

            def handle(self) -> None:
                try:
                    self.reply("220 slow.example ESMTP")
                    while line := self.rfile.readline():
                        verb = line[:4].upper()
                        if verb in (b"EHLO", b"HELO"):
                            self.reply("250 slow.example")
                        elif verb == b"DATA":
                            self.reply("354 go on")
                            data = b""
                            while (chunk := self.rfile.readline()) and chunk != b".\r\n":
                                data += chunk
                            self.reply("250 accepted")
                            outer.accepted.append(data)
                        elif verb == b"QUIT":
                            self.reply("221 bye")
                            return
                        else:
                            self.reply("250 ok")
                except OSError:
                    return

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        nonblocking_accept(self.server)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_relay_slow_at_every_step_is_cut_at_the_timeout_and_never_delivers_late(world: World) -> None:
    """Every reply 0.7 s late, timeout 1 s: the session is cut at the deadline (the socket shut down), so
    the mail counted as failed is never accepted afterwards; once the relay is quick, it goes out once."""
    slow = SlowSmtp(delay=0.7)
    try:
        world.write_config(
            notify={"events": ["problem"]},
            **{"notify.smtp": {"host": "127.0.0.1", "port": slow.port, "security": "none",
                               "from": "syncd@nfs01.bank.example", "to": ["ops@bank.example"],
                               "timeout": "1s"}},
        )  # fmt: skip
        world.manifest(
            "m.toml", {"source": f"{world.tag}/no.bin", "sha256": "e" * 64, "size": 5, "dest": "no"}
        )
        world.repo.commit("a missing asset")
        run = world.sync()
        assert run.code == 1
        assert "timed out" in run.one("notify_failed")["error"]
        time.sleep(3)  # long enough for a session that was not really cut to finish
        assert slow.accepted == []
        slow.delay = 0.0
        again = world.sync()
        assert again.one("notification_sent")["new"] == 1 and len(slow.accepted) == 1
        assert world.sync().named("notification_sent") == [] and len(slow.accepted) == 1
    finally:
        slow.stop()


def test_the_daemon_records_a_send_at_once_not_at_the_next_pass(
    world: World, smtp: SmtpServer, ca: TestCA
) -> None:
    """With a 1 h interval, the first pass's mail is recorded (notification_sent) right after the relay
    accepted it, so a crash before the next pass cannot send it again."""
    world.write_config(schedule={"interval": "1h", "jitter": "0s"}, **mail_config(world, smtp, ca))
    world.manifest(
        "m.toml", {"source": f"{world.tag}/gone.bin", "sha256": "f" * 64, "size": 5, "dest": "gone"}
    )
    world.repo.commit("a missing asset")
    proc = subprocess.Popen([syncd_command(), "run", "-c", str(world.config_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen.append(line)
            if '"notification_sent"' in line:
                break
        assert smtp.messages
    finally:
        proc.kill()  # a crash: no graceful stop, no flush
        proc.communicate(timeout=30)
    assert sum('"pass_finished"' in line for line in seen) == 1
    assert any('"notification_sent"' in line for line in seen)
    restarted = world.sync()
    assert restarted.named("notification_sent") == [] and len(smtp.messages) == 1


UNTRUSTED = "NOT sent: mail to 127.0.0.1:{port} failed: the server's TLS certificate"


@pytest.mark.parametrize(
    ("server", "security", "trust", "expected"),
    [
        ("implicit", "tls", True, "accepted"),
        ("implicit", "tls", False, UNTRUSTED + " is not trusted"),
        ("starttls", "starttls", False, UNTRUSTED),
        ("plain", "starttls", True, "NOT sent: mail server 127.0.0.1:{port} does not offer STARTTLS; "
         "not sending in the clear"),
        ("implicit", "starttls", True, "NOT sent: mail to 127.0.0.1:{port} failed:"),
    ],
    ids=["implicit-tls", "untrusted-implicit", "untrusted-starttls", "no-starttls-offered", "wrong-security"],
)  # fmt: skip
def test_mail_tls_is_verified_and_never_downgraded(
    world: World, ca: TestCA, server: str, security: str, trust: bool, expected: str
) -> None:
    """Implicit TLS works with the CA trusted; an untrusted certificate is refused (STARTTLS or implicit),
    and a server that does not offer STARTTLS is never used in the clear."""
    kwargs: dict[str, Any] = {"auth": {"syncd": PASSWORD}}
    if server == "implicit":
        kwargs["implicit_tls"] = ca
    elif server == "starttls":
        kwargs["starttls"] = ca
    else:
        kwargs["auth_require_tls"] = False
    with SmtpServer(**kwargs) as smtp:
        smtp_cfg: dict[str, Any] = {
            "host": "127.0.0.1", "port": smtp.port, "security": security, "username": "syncd",
            "password_file": _secret(world, "smtp.password", PASSWORD), "from": "syncd@nfs01.bank.example",
            "to": ["ops@bank.example"], "timeout": "3s",
        }  # fmt: skip
        if trust:
            smtp_cfg["ca_file"] = str(ca.cert)
        world.write_config(notify={}, **{"notify.smtp": smtp_cfg})
        run = world.run("notify", "--test", "-c", str(world.config_path))
        assert f"mail via 127.0.0.1:{smtp.port}: " + expected.format(port=smtp.port) in run.out, run.out
        assert run.code == (0 if expected == "accepted" else 1)
        assert len(smtp.messages) == (1 if expected == "accepted" else 0)
        _no_secrets(run.out, run.err)


class RawHttp:
    """A real TCP server on 127.0.0.1 that answers every connection with ``answer(conn)``: for answers
    no well-behaved HTTP server gives (a body of many GiB, a status line dripped a byte at a time)."""

    def __init__(self, answer: Any) -> None:
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stopped = threading.Event()

        def serve() -> None:
            while not self.stopped.is_set():
                try:
                    conn, _ = self.sock.accept()
                except OSError:
                    return
                self.connections += 1
                threading.Thread(target=self._one, args=(conn, answer), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def _one(self, conn: socket.socket, answer: Any) -> None:
        with conn:
            try:
                conn.recv(65536)
                answer(conn, self.stopped)
            except OSError:
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()


def _huge(conn: socket.socket, stopped: Any) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6442450944\r\n\r\n")
    chunk = b"\0" * 65536
    end = time.monotonic() + 20
    while not stopped.is_set() and time.monotonic() < end:
        conn.sendall(chunk)


def _drip(conn: socket.socket, stopped: Any) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
        if stopped.wait(0.9):
            return
        conn.sendall(bytes([byte]))


@pytest.mark.parametrize(("answer", "accepted"), [(_huge, True), (_drip, False)], ids=["6-GiB-body", "drip"])
def test_a_hostile_webhook_answer_costs_neither_memory_nor_time(
    world: World, answer: Any, accepted: bool
) -> None:
    """A 200 with a 6 GiB body is accepted from its status line (the body is never read); a status line
    dripped a byte every 0.9 s (each read within the timeout) is cut at the 2 s deadline."""
    server = RawHttp(answer)
    try:
        world.write_config(
            notify={"events": ["problem"]},
            **{"notify.webhook": {"url": f"http://127.0.0.1:{server.port}{HOOK_PATH}", "timeout": "2s"}},
        )
        world.manifest(
            "m.toml", {"source": f"{world.tag}/no.bin", "sha256": "9" * 64, "size": 5, "dest": "no"}
        )
        world.repo.commit("a missing asset")
        started = time.monotonic()
        run = world.sync()
        took = time.monotonic() - started
    finally:
        server.stop()
    assert run.code == 1 and took < 15, took
    if accepted:
        assert run.one("notification_sent")["new"] == 1 and not run.named("notify_failed")
    else:
        assert "timed out" in run.one("notify_failed")["error"] and not run.named("notification_sent")
    _no_secrets(run.err)


def test_damaged_notify_rows_are_dropped_and_the_next_problem_is_still_announced(
    world: World, smtp: SmtpServer, ca: TestCA
) -> None:
    """Hand-edited or damaged rows in the ledger's notify tables (a JSON list for an object, a word for a
    count, wrong field types) are dropped; they never silence the channel."""
    import sqlite3

    world.write_config(**mail_config(world, smtp, ca, events=["problem", "recovery", "published"]))
    world.manifest("m.toml", {"source": f"{world.tag}/a.bin", "sha256": "8" * 64, "size": 5, "dest": "a"})
    world.repo.commit("first")
    assert world.sync().code == 1
    smtp.wait_for(1)
    db = sqlite3.connect(world.state / "ledger.sqlite3")
    with db:
        db.execute("UPDATE notify_open SET alert = '[]'")
        db.execute("INSERT INTO notify_open VALUES ('k2', 'x', 'many', '{}')")
        db.execute("UPDATE notify_sent SET alert = '[1, 2]'")
        db.execute("INSERT INTO notify_outbox VALUES ('mail', 'k', '[1]', 'x')")
        db.execute("""INSERT INTO notify_outbox VALUES ('mail', 'k3', '{"dest": 1, "bytes": "x"}', 'x')""")
    db.close()
    good = world.asset("b.bin", 50)
    world.manifest("m.toml", {"source": f"{world.tag}/a.bin", "sha256": "8" * 64, "size": 5, "dest": "a"},
                   {**good, "dest": "b"}, {"source": f"{world.tag}/c.bin", "sha256": "7" * 64, "size": 5,
                                           "dest": "c"})  # fmt: skip
    world.repo.commit("second")
    run = world.sync()
    assert not run.named("notify_failed") and run.one("notification_sent")["new"] >= 1
    m = smtp.wait_for(2)[1]
    assert "c: http 404" in m.message["Subject"] and "1 file published: b" in m.message["Subject"]


def test_a_missing_export_is_announced_once_and_its_recovery_when_mounted_again(
    world: World, smtp: SmtpServer, ca: TestCA
) -> None:
    """The export root gone (the NFS mount down): `syncd sync` fails the pass and mails "export: missing"
    once; the asset problems it could not judge are neither re-announced nor recovered; back: one
    recovery."""
    world.write_config(**mail_config(world, smtp, ca))
    good = world.asset("g.bin", 100)
    world.manifest("m.toml", {**good, "dest": "g.bin"})
    world.repo.commit("one asset")
    assert world.sync().code == 0
    moved = world.base / "unmounted"
    world.export.rename(moved)
    runs = [world.sync() for _ in range(2)]
    assert [r.code for r in runs] == [1, 1]
    (m,) = smtp.wait_for(1)
    assert m.message["Subject"] == f"[syncd {HOST}] 1 new problem: export: missing"
    assert "what to do: mount the export" in _mail_text(m)
    moved.rename(world.export)
    assert world.sync().code == 0
    assert smtp.wait_for(2)[1].message["Subject"] == f"[syncd {HOST}] 1 recovered: export: missing"


def test_a_rewritten_branch_is_announced_once(world: World, smtp: SmtpServer, ca: TestCA) -> None:
    """A force-push that rewrites the branch (not followed): one mail naming it and what to do."""
    world.write_config(**mail_config(world, smtp, ca))
    good = world.asset("g.bin", 100)
    world.manifest("m.toml", {**good, "dest": "g.bin"})
    first = world.repo.commit("one asset")
    world.repo.commit("two")
    assert world.sync().code == 0
    world.repo.git("checkout", "--quiet", "--orphan", "rewritten")
    world.manifest("m.toml", {**good, "dest": "g.bin"})
    world.repo.git("add", "--all")
    world.repo.git("commit", "--quiet", "-m", "history rewritten")
    world.repo.git("push", "--quiet", "--force", "origin", "HEAD:refs/heads/main")
    assert [world.sync().code for _ in range(2)] == [1, 1]
    (m,) = smtp.wait_for(1)
    assert (
        m.message["Subject"] == f"[syncd {HOST}] 1 new problem: git: branch history rewritten, not followed"
    )
    assert "allow_force_push" in _mail_text(m) and first[:12] not in m.message["Subject"]


def test_the_author_named_is_the_pull_requests_own_commit_not_the_merge(
    world: World, smtp: SmtpServer, ca: TestCA
) -> None:
    """A manifest entry added on a branch by Ada and merged (--no-ff) by Mo: the published digest names
    Ada and her commit; an unrelated later edit of the same file does not change who added the entry."""
    world.write_config(**mail_config(world, smtp, ca, events=["published"]))
    a, b = world.asset("a.bin", 10), world.asset("b.bin", 20, seed=1)
    world.manifest("m.toml", {**b, "dest": "b.bin"})
    world.repo.commit("base")
    repo = world.repo

    def git_as(name: str, email: str, *args: str) -> None:
        env = {**repo.env, "GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email,
               "GIT_COMMITTER_NAME": name, "GIT_COMMITTER_EMAIL": email}  # fmt: skip
        subprocess.run(["git", *args], cwd=repo.work_path, env=env, check=True, capture_output=True)

    repo.git("checkout", "--quiet", "-b", "pr")
    world.manifest("m.toml", {**b, "dest": "b.bin"}, {**a, "dest": "a.bin"})
    git_as("Ada", "ada@bank.example", "commit", "-qam", "add a.bin")
    ada = repo.head()
    repo.git("checkout", "--quiet", "main")
    world.repo.write("README.md", "an unrelated change on main\n")
    git_as("Eve", "eve@bank.example", "add", "--all")
    git_as("Eve", "eve@bank.example", "commit", "-qm", "meanwhile on main")
    git_as("Mo", "mo@bank.example", "merge", "--no-ff", "-q", "-m", "Merge pull request #7 from ada/pr", "pr")
    repo.git("push", "--quiet", "origin", "HEAD:refs/heads/main")
    assert world.sync().code == 0
    (m,) = smtp.wait_for(1)
    text = _mail_text(m)
    assert f"* a.bin (10 B, commit {repo.head()[:12]}, added in {ada[:12]} by Ada <ada@bank.example>)" in text
    assert "by Syncd Test" in text.split("* b.bin")[1]
    assert not [line for line in text.splitlines() if "Mo <" in line or "Eve" in line]


@pytest.mark.parametrize("trusted", [True, False], ids=["ca_file", "untrusted"])
def test_an_https_webhook_is_verified(world: World, ca: TestCA, trusted: bool) -> None:
    """An https:// webhook is verified against the system store plus ca_file: accepted with the test CA,
    refused (nothing sent) without it."""
    with WebhookReceiver(tls=ca) as hook:
        cfg: dict[str, Any] = {"url": hook.url(HOOK_PATH), "token_file": _secret(world, "t", TOKEN)}
        if trusted:
            cfg["ca_file"] = str(ca.cert)
        world.write_config(notify={}, **{"notify.webhook": cfg})
        run = world.run("notify", "--test", "-c", str(world.config_path))
        origin = f"webhook https://127.0.0.1:{hook.port}"
        if trusted:
            assert run.code == 0 and f"{origin}: accepted" in run.out, run.out
            (hit,) = hook.wait_for(1)
            assert hit.headers["authorization"] == f"Bearer {TOKEN}" and hit.path == HOOK_PATH
            assert hit.headers["host"] == f"127.0.0.1:{hook.port}"
        else:
            assert run.code == 1 and "TLS certificate is not trusted" in run.out, run.out
            assert hook.hits == []
        _no_secrets(run.out, run.err)
