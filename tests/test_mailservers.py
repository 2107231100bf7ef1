"""Prove that the SMTP and webhook test servers (tests/mailservers.py, tests/webhookserver.py) work,
using only standard-library clients."""

from __future__ import annotations

import http.client
import json
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailservers import HangingSmtp, SmtpServer
from servers import TestCA, make_test_ca
from webhookserver import WebhookReceiver

pytestmark = pytest.mark.integration

USERS = {"alice": "s3cret"}


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(Path(tmp_path_factory.mktemp("mail-ca")))


@pytest.fixture(scope="module")
def client_ctx(ca: TestCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert))


def _message(subject: str = "sync finished", to: str = "ops@example.test") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "syncd@example.test"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("3 datasets synced.\n.leading dot survives\n")
    return msg


# --------------------------------------------------------------------------- SMTP


def test_plain_send_is_recorded() -> None:
    with SmtpServer() as server, smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
        client.send_message(_message(), to_addrs=["ops@example.test", "dev@example.test"])
        (got,) = server.wait_for(1)
        assert got.mail_from == "syncd@example.test"
        assert got.rcpt_tos == ["ops@example.test", "dev@example.test"]
        assert got.message["Subject"] == "sync finished"
        assert got.message.get_content() == "3 datasets synced.\n.leading dot survives\n"
        assert b"\r\n.leading dot" in got.data  # dot-unstuffed
        assert (got.auth_user, got.tls) == (None, False)
        server.clear()
        assert server.messages == []


def test_starttls_and_auth(ca: TestCA, client_ctx: ssl.SSLContext) -> None:
    with SmtpServer(starttls=ca, auth=USERS) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert not client.has_extn("auth")  # only after STARTTLS
            code, _ = client.mail("syncd@example.test")
            assert code == 530  # STARTTLS is required
            client.starttls(context=client_ctx)
            client.ehlo()
            assert set(client.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
            code, _ = client.mail("syncd@example.test")
            assert code == 530  # AUTH is required
            client.rset()
            client.login("alice", "s3cret")  # smtplib prefers PLAIN
            client.send_message(_message("plain"))
        with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
            client.starttls(context=client_ctx)
            client.ehlo()
            client.user, client.password = "alice", "s3cret"
            client.auth("LOGIN", client.auth_login)
            client.send_message(_message("login"))
        got = server.wait_for(2)
        assert [(r.message["Subject"], r.auth_user, r.tls) for r in got] == [
            ("plain", "alice", True),
            ("login", "alice", True),
        ]


def test_wrong_password_is_535(ca: TestCA, client_ctx: ssl.SSLContext) -> None:
    with SmtpServer(starttls=ca, auth=USERS) as server:
        for user, password in (("alice", "wrong"), ("mallory", "s3cret")):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
                client.starttls(context=client_ctx)
                with pytest.raises(smtplib.SMTPAuthenticationError) as err:
                    client.login(user, password)
                assert err.value.smtp_code == 535
        assert server.messages == []


def test_untrusted_certificate_fails(ca: TestCA) -> None:
    with (
        SmtpServer(starttls=ca) as server,
        smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        client.starttls(context=ssl.create_default_context())  # the system CAs don't know ours


def test_plain_auth_when_allowed() -> None:
    with (
        SmtpServer(auth=USERS, auth_require_tls=False) as server,
        smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client,
    ):
        client.login("alice", "s3cret")
        client.send_message(_message())
        (got,) = server.wait_for(1)
        assert (got.auth_user, got.tls) == ("alice", False)


def test_implicit_tls_with_auth(ca: TestCA, client_ctx: ssl.SSLContext) -> None:
    with (
        SmtpServer(implicit_tls=ca, auth=USERS) as server,
        smtplib.SMTP_SSL("127.0.0.1", server.port, timeout=5, context=client_ctx) as client,
    ):
        client.login("alice", "s3cret")
        client.send_message(_message())
        (got,) = server.wait_for(1)
        assert (got.auth_user, got.tls) == ("alice", True)


def test_reject_rcpt_and_data() -> None:
    with SmtpServer(reject=550) as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.send_message(_message())
            assert refused.value.recipients["ops@example.test"][0] == 550
        server.reject = None  # recovers at run time
        with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
            client.send_message(_message())
        assert len(server.wait_for(1)) == 1
    with (
        SmtpServer(reject=451, reject_at="data") as server,
        smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client,
    ):
        with pytest.raises(smtplib.SMTPDataError) as data_err:
            client.send_message(_message())
        assert data_err.value.smtp_code == 451
        assert server.messages == []


def test_wait_for_reports_what_arrived() -> None:
    with SmtpServer() as server:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=5) as client:
            client.send_message(_message("only one"))
        with pytest.raises(AssertionError, match=r"got 1: .*only one"):
            server.wait_for(2, timeout=0.3)


def test_hanging_smtp_times_out() -> None:
    with HangingSmtp() as hang:
        start = time.monotonic()
        # smtplib turns the socket timeout into SMTPServerDisconnected("... timed out")
        with pytest.raises((smtplib.SMTPServerDisconnected, TimeoutError), match="timed out"):
            smtplib.SMTP("127.0.0.1", hang.port, timeout=1)
        assert 0.9 <= time.monotonic() - start < 2.5
        assert hang.connections == 1


def test_greet_then_hang_times_out_after_ehlo() -> None:
    with (
        HangingSmtp(mode="greet_then_hang") as hang,
        smtplib.SMTP("127.0.0.1", hang.port, timeout=1) as client,
    ):
        assert client.ehlo()[0] == 250
        start = time.monotonic()
        with pytest.raises((smtplib.SMTPServerDisconnected, TimeoutError), match="timed out"):
            client.sendmail("syncd@example.test", ["ops@example.test"], b"Subject: x\r\n\r\nx\r\n")
        assert 0.9 <= time.monotonic() - start < 2.5
        assert hang.connections == 1


# --------------------------------------------------------------------------- webhooks


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _post(url: str, payload: object, context: ssl.SSLContext | None = None) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(  # noqa: S310 - loopback only
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "X-Syncd-Event": "sync.done"},
        method="POST",
    )
    opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=context))
    try:
        with opener.open(req, timeout=5) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        with err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}


def test_webhook_records_post() -> None:
    with WebhookReceiver() as hook:
        status, _ = _post(hook.url("/hook?x=1"), {"event": "sync.done", "n": 3})
        assert status == 200
        (hit,) = hook.wait_for(1)
        assert (hit.method, hit.path) == ("POST", "/hook?x=1")
        assert hit.json() == {"event": "sync.done", "n": 3}
        assert hit.headers["content-type"] == "application/json"
        assert hit.headers["x-syncd-event"] == "sync.done"
        hook.status = 503  # settable at run time
        assert _post(hook.url(), {})[0] == 503
        assert len(hook.wait_for(2)) == 2
        hook.clear()
        assert hook.hits == []


def test_webhook_redirect_is_307() -> None:
    with WebhookReceiver(redirect_to="http://127.0.0.1:9/elsewhere") as hook:
        status, headers = _post(hook.url(), {"a": 1})
        assert status == 307
        assert headers["location"] == "http://127.0.0.1:9/elsewhere"
        assert len(hook.wait_for(1)) == 1


def test_webhook_delay_makes_client_time_out() -> None:
    with WebhookReceiver(delay=5) as hook:
        conn = http.client.HTTPConnection("127.0.0.1", hook.port, timeout=0.5)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.request("POST", "/hook", body=b"{}", headers={"Content-Type": "application/json"})
            conn.getresponse()
        conn.close()
        assert time.monotonic() - start < 2
        assert len(hook.wait_for(1)) == 1  # recorded before the delay
        start = time.monotonic()
    assert time.monotonic() - start < 2  # stop() wakes the delayed answer


def test_webhook_tls(ca: TestCA, client_ctx: ssl.SSLContext) -> None:
    with WebhookReceiver(tls=ca) as hook:
        assert hook.url().startswith("https://127.0.0.1:")
        assert _post(hook.url(), {"tls": True}, client_ctx)[0] == 200
        assert hook.wait_for(1)[0].json() == {"tls": True}
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            _post(hook.url(), {}, ssl.create_default_context())
        assert len(hook.hits) == 1
