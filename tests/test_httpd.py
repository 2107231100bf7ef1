"""The HTTP listener against real sockets on loopback: routes, trigger authentication, bounds, shutdown."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client import CONTENT_TYPE_LATEST
from structlog.testing import capture_logs

from syncd.config import Secret
from syncd.errors import ListenError
from syncd.httpd import MAX_BODY, Listener, signature

pytestmark = pytest.mark.integration

SECRET = "It's a Secret to Everybody"
HEALTH = json.dumps({"state": "ok", "synced_commit": "4f2a9c1"}).encode()
METRICS = b"# TYPE syncd_last_pass_success gauge\nsyncd_last_pass_success 1.0\n"


class Calls:
    """The callables handed to a Listener, counting what they were asked."""

    def __init__(self) -> None:
        self.health: tuple[int, bytes] = (200, HEALTH)
        self.when = "now"
        self.triggered = 0
        self.lock = threading.Lock()

    def get_health(self) -> tuple[int, bytes]:
        return self.health

    def get_metrics(self) -> bytes:
        return METRICS

    def trigger(self) -> str:
        with self.lock:
            self.triggered += 1
        return self.when


MakeListener = Callable[..., tuple[Listener, Calls]]


@pytest.fixture
def make() -> Iterator[MakeListener]:
    """Start Listeners on 127.0.0.1 port 0 (with a trigger and SECRET unless told); closed afterwards."""
    started: list[Listener] = []

    def start(**kwargs: Any) -> tuple[Listener, Calls]:
        calls = Calls()
        options: dict[str, Any] = {
            "health": calls.get_health,
            "metrics": calls.get_metrics,
            "trigger": calls.trigger,
            "secret": Secret(SECRET),
            "timeout": 0.5,
        }
        options.update(kwargs)
        listener = Listener(options.pop("address", ("127.0.0.1", 0)), **options)
        listener.start()
        started.append(listener)
        return listener, calls

    yield start
    for listener in started:
        listener.close()


def request(
    listener: Listener, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request with http.client; the status, headers and body of the answer."""
    conn = http.client.HTTPConnection(*listener.bound, timeout=5)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def raw(listener: Listener, data: bytes) -> bytes:
    """Send bytes as they are, then read the answer until the server closes."""
    with socket.create_connection(listener.bound, timeout=5) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def hub_signature(body: bytes, key: str = SECRET) -> str:
    """The signature computed here independently of syncd.httpd."""
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def events(captured: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in captured if e["event"] == name]


@pytest.mark.unit
def test_signature_matches_githubs_documented_test_vector() -> None:
    """The HMAC agrees with the example in GitHub's webhook documentation."""
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert signature(SECRET.encode(), b"Hello, World!") == expected


# --- health and metrics -------------------------------------------------------------------------------


def test_healthz_passes_status_and_body_through(make: MakeListener) -> None:
    """/healthz answers health()'s 200 and then its 503, with its JSON body, as application/json."""
    listener, calls = make()
    status, headers, body = request(listener, "GET", "/healthz")
    assert (status, body, headers["Content-Type"]) == (200, HEALTH, "application/json")
    calls.health = (503, b'{"state": "stale"}')
    status, headers, body = request(listener, "GET", "/healthz")
    assert (status, body, headers["Content-Type"]) == (503, b'{"state": "stale"}', "application/json")


def test_metrics_has_prometheus_content_type_and_logs_nothing(make: MakeListener) -> None:
    """/metrics answers metrics()'s text with Prometheus's content type; scrapes log no event."""
    listener, _ = make()
    with capture_logs() as captured:
        for _ in range(3):
            status, headers, body = request(listener, "GET", "/metrics")
            assert (status, body, headers["Content-Type"]) == (200, METRICS, CONTENT_TYPE_LATEST)
        request(listener, "GET", "/healthz")
    assert captured == []


def test_server_header_does_not_advertise_python(make: MakeListener) -> None:
    """The Server header is 'syncd', with no Python or library version."""
    listener, _ = make()
    _, headers, _ = request(listener, "GET", "/healthz")
    assert headers["Server"] == "syncd"


def test_callback_exception_is_a_500_with_its_type_only(make: MakeListener) -> None:
    """health() raising gives a fixed 500 and one http_error event naming the type, never the text."""

    def broken() -> tuple[int, bytes]:
        raise ValueError("token=hunter2 in a message")

    listener, _ = make(health=broken)
    with capture_logs() as captured:
        status, _, body = request(listener, "GET", "/healthz")
    assert (status, body) == (500, b'{"error": "internal error"}')
    assert captured == [
        {"event": "http_error", "log_level": "error", "path": "/healthz", "error_type": "ValueError"}
    ]
    assert "hunter2" not in repr(captured)


def test_trigger_exception_is_a_500(make: MakeListener) -> None:
    """trigger() raising gives a 500, not a 202."""

    def broken() -> str:
        raise RuntimeError("scheduler gone")

    listener, _ = make(trigger=broken)
    body = b"{}"
    status, _, _ = request(listener, "POST", "/trigger", body, {"X-Hub-Signature-256": hub_signature(body)})
    assert status == 500


# --- routes and methods -------------------------------------------------------------------------------


def test_unknown_path_is_404(make: MakeListener) -> None:
    """Any other path is a 404, whatever the method."""
    listener, _ = make()
    for method, path in [("GET", "/"), ("GET", "/healthz/x"), ("POST", "/metrics2"), ("DELETE", "/x")]:
        assert request(listener, method, path)[0] == 404


def test_wrong_method_is_405_with_allow(make: MakeListener) -> None:
    """Another method on a known path is a 405 naming the allowed one (HEAD included)."""
    listener, calls = make()
    cases = [("POST", "/healthz", "GET"), ("HEAD", "/metrics", "GET"), ("PUT", "/metrics", "GET")]
    cases += [("GET", "/trigger", "POST"), ("DELETE", "/trigger", "POST")]
    for method, path, allow in cases:
        status, headers, _ = request(listener, method, path)
        assert (status, headers["Allow"]) == (405, allow), (method, path)
    assert calls.triggered == 0


@pytest.mark.parametrize("kind", ["no secret", "no trigger"])
def test_no_trigger_route_without_secret_and_trigger(make: MakeListener, kind: str) -> None:
    """/trigger does not exist (404) unless both the trigger callable and the secret are given."""
    listener, calls = make(**({"secret": None} if kind == "no secret" else {"trigger": None}))
    body = b"{}"
    headers = {"X-Hub-Signature-256": hub_signature(body), "X-Gitlab-Token": SECRET}
    assert request(listener, "POST", "/trigger", body, headers)[0] == 404
    assert calls.triggered == 0


def test_malformed_requests_get_fixed_answers_that_echo_nothing(make: MakeListener) -> None:
    """A garbled request line, a huge one or too many headers: a status line and a fixed body, nothing
    of the request quoted back."""
    listener, _ = make()
    marker = b"MARKER-7f3a"
    garbled = raw(listener, b"GET /" + marker + b" HTTP/1.1 extra\r\n\r\n")
    assert status_of(garbled) == 400 and marker not in garbled
    long_line = raw(listener, b"GET /" + marker * 7000 + b" HTTP/1.1\r\n\r\n")
    assert status_of(long_line) == 414 and marker not in long_line
    many = b"".join(b"X-%d: %s\r\n" % (i, marker) for i in range(120))
    headers = raw(listener, b"GET /healthz HTTP/1.1\r\n" + many + b"\r\n")
    assert status_of(headers) == 431 and marker not in headers
    weird = raw(listener, b"BREW /" + marker + b" HTTP/1.1\r\n\r\n")
    assert status_of(weird) == 501 and marker not in weird


# --- trigger authentication ---------------------------------------------------------------------------


def test_trigger_with_good_hmac_starts_a_pass(make: MakeListener) -> None:
    """A right X-Hub-Signature-256 gives 202 {"pass": ...} with trigger()'s answer, one trigger_accepted."""
    listener, calls = make()
    body = b'{"ref": "refs/heads/main"}'
    with capture_logs() as captured:
        status, headers, answer = request(
            listener, "POST", "/trigger", body, {"X-Hub-Signature-256": hub_signature(body)}
        )
    assert (status, json.loads(answer), headers["Content-Type"]) == (202, {"pass": "now"}, "application/json")
    assert calls.triggered == 1
    assert captured == [
        {
            "event": "trigger_accepted",
            "log_level": "info",
            "remote": "127.0.0.1",
            "credential": "hmac-sha256",
            "when": "now",
        }
    ]
    calls.when = "after the running pass"
    status, _, answer = request(
        listener, "POST", "/trigger", body, {"X-Hub-Signature-256": hub_signature(body)}
    )
    assert (status, json.loads(answer)) == (202, {"pass": "after the running pass"})


def test_trigger_with_bad_hmac_is_403(make: MakeListener) -> None:
    """A signature of another body or with another key is a 403 and no pass; the refusal is logged."""
    listener, calls = make()
    body = b'{"ref": "refs/heads/main"}'
    with capture_logs() as captured:
        for wrong in [hub_signature(body + b" "), hub_signature(body, "another secret"), "sha256=", "x"]:
            status, _, answer = request(listener, "POST", "/trigger", body, {"X-Hub-Signature-256": wrong})
            assert (status, answer) == (403, b'{"error": "wrong credential"}')
    assert calls.triggered == 0
    refused = events(captured, "trigger_refused")
    assert len(refused) == 4
    assert refused[0] == {
        "event": "trigger_refused",
        "log_level": "warning",
        "remote": "127.0.0.1",
        "reason": "wrong credential",
        "status": 403,
    }


def test_trigger_with_gitlab_token(make: MakeListener) -> None:
    """X-Gitlab-Token equal to the secret gives 202; any other value 403 and no pass."""
    listener, calls = make()
    assert request(listener, "POST", "/trigger", b"{}", {"X-Gitlab-Token": SECRET})[0] == 202
    assert request(listener, "POST", "/trigger", b"", {"X-Gitlab-Token": SECRET})[0] == 202
    assert calls.triggered == 2
    for wrong in [SECRET[:-1], SECRET + "x", SECRET.upper(), "x"]:
        assert request(listener, "POST", "/trigger", b"{}", {"X-Gitlab-Token": wrong})[0] == 403
    assert calls.triggered == 2


def test_trigger_without_credential_is_401(make: MakeListener) -> None:
    """No credential header: 401, no pass, and the secret's name is never in the answer."""
    listener, calls = make()
    with capture_logs() as captured:
        status, _, answer = request(listener, "POST", "/trigger", b"{}", {"X-Hub-Signature": "sha1=00"})
    assert (status, answer) == (401, b'{"error": "missing credential"}')
    assert calls.triggered == 0
    assert [e["reason"] for e in events(captured, "trigger_refused")] == ["missing credential"]


def test_every_credential_present_must_be_right(make: MakeListener) -> None:
    """A right token with a wrong signature, or the same header twice, is refused."""
    listener, calls = make()
    body = b"{}"
    headers = {"X-Gitlab-Token": SECRET, "X-Hub-Signature-256": hub_signature(b"other")}
    assert request(listener, "POST", "/trigger", body, headers)[0] == 403
    twice = (
        b"POST /trigger HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        + b"X-Gitlab-Token: %s\r\nX-Gitlab-Token: %s\r\n\r\n{}" % (SECRET.encode(), SECRET.encode())
    )
    assert status_of(raw(listener, twice)) == 403
    assert calls.triggered == 0


def test_body_over_limit_is_413_before_it_is_read(make: MakeListener) -> None:
    """A Content-Length over 1 MiB is answered 413 while most of the body is still unsent: the server
    never waits for, or holds, the whole body; no pass."""
    listener, calls = make(timeout=5.0)
    size = 2 * MAX_BODY + 1
    head = b"POST /trigger HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nX-Hub-Signature-256: %s\r\n\r\n" % (
        size,
        hub_signature(b"whatever").encode(),
    )
    with capture_logs() as captured, socket.create_connection(listener.bound, timeout=5) as sock:
        sock.sendall(head + b"x" * 65536)
        started = time.monotonic()
        answer = read_all(sock)
    assert status_of(answer) == 413 and answer.endswith(b'{"error": "body too large"}')
    assert time.monotonic() - started < 2.5  # the 2 s linger at most, not the 5 s timeout
    assert calls.triggered == 0
    assert [e["reason"] for e in events(captured, "trigger_refused")] == ["body too large"]


def test_client_sending_a_whole_large_body_still_reads_the_413(make: MakeListener) -> None:
    """A client that sends all of a 2 MiB body before reading gets the 413, not a reset connection."""
    listener, calls = make()
    body = b"x" * (2 * MAX_BODY)
    status, _, _ = request(listener, "POST", "/trigger", body, {"X-Hub-Signature-256": hub_signature(body)})
    assert status == 413 and calls.triggered == 0


def test_body_at_limit_is_accepted(make: MakeListener) -> None:
    """A body of exactly 1 MiB with a right signature is accepted."""
    listener, calls = make(timeout=5.0)
    body = b"y" * MAX_BODY
    status, _, _ = request(listener, "POST", "/trigger", body, {"X-Hub-Signature-256": hub_signature(body)})
    assert status == 202 and calls.triggered == 1


def test_chunked_body_is_411(make: MakeListener) -> None:
    """A chunked body is refused (411) rather than read without a known length; no pass."""
    listener, calls = make()
    data = (
        b"POST /trigger HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-Gitlab-Token: %s\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n" % SECRET.encode()
    )
    assert status_of(raw(listener, data)) == 411
    assert calls.triggered == 0


@pytest.mark.parametrize("length", [b"-1", b"abc", b"1, 1", b"\xd9\xa3"])
def test_bad_content_length_is_400(make: MakeListener, length: bytes) -> None:
    """A Content-Length that is not one decimal number is a 400; no pass."""
    listener, calls = make()
    data = b"POST /trigger HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\nX-Gitlab-Token: %s\r\n\r\n" % (
        length,
        SECRET.encode(),
    )
    assert status_of(raw(listener, data)) == 400
    assert calls.triggered == 0


def test_trigger_answers_never_echo_the_request(make: MakeListener) -> None:
    """Refusals quote neither the header values nor the body sent."""
    listener, _ = make()
    marker = "MARKER-51c2"
    headers = {"X-Gitlab-Token": marker, "X-Hub-Signature-256": "sha256=" + marker}
    with capture_logs() as captured:
        status, answer_headers, answer = request(listener, "POST", "/trigger", marker.encode(), headers)
    assert status == 403
    assert marker not in answer.decode() + str(answer_headers.items()) + repr(captured)


TOKEN_CHARS = st.characters(codec="latin-1", categories=["L", "N", "P", "S", "Zs"])


@st.composite
def attempts(draw: st.DrawFn) -> tuple[list[str], list[str], bytes]:
    """Zero to two X-Gitlab-Token and X-Hub-Signature-256 values (right, near misses or noise) and a body."""
    body = draw(st.binary(max_size=2048))
    right_sig = hub_signature(body)
    token = st.one_of(
        st.just(SECRET),
        st.text(TOKEN_CHARS, max_size=40),
        st.sampled_from([SECRET[:-1], SECRET + "y", " " + SECRET + "\t", SECRET.lower()]),
    )
    sig = st.one_of(
        st.just(right_sig),
        st.text(TOKEN_CHARS, max_size=80),
        st.sampled_from([right_sig.upper(), right_sig[:-1], hub_signature(body + b"!"), right_sig + " "]),
    )
    return draw(st.lists(token, max_size=2)), draw(st.lists(sig, max_size=2)), body


@pytest.fixture(scope="module")
def shared() -> Iterator[tuple[Listener, Calls]]:
    """One Listener for every hypothesis example."""
    calls = Calls()
    listener = Listener(
        ("127.0.0.1", 0),
        health=calls.get_health,
        metrics=calls.get_metrics,
        trigger=calls.trigger,
        secret=Secret(SECRET),
        timeout=2.0,
    )
    listener.start()
    yield listener, calls
    listener.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(attempt=attempts())
def test_trigger_called_iff_credential_right(shared: tuple[Listener, Calls], attempt: Any) -> None:
    """For any header values and body, trigger() runs exactly when every credential sent is right."""
    tokens, sigs, body = attempt
    listener, calls = shared
    lines = [b"X-Gitlab-Token: " + t.encode("latin-1") for t in tokens]
    lines += [b"X-Hub-Signature-256: " + s.encode("latin-1") for s in sigs]
    head = b"POST /trigger HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body)
    before = calls.triggered
    status = status_of(raw(listener, head + b"".join(line + b"\r\n" for line in lines) + b"\r\n" + body))
    right = (
        bool(tokens or sigs)
        and len(tokens) <= 1
        and len(sigs) <= 1
        and all(t.strip(" \t") == SECRET for t in tokens)
        and all(s.strip(" \t") == hub_signature(body) for s in sigs)
    )
    assert calls.triggered - before == (1 if right else 0)
    assert status == (202 if right else 401 if not (tokens or sigs) else 403)
    event(f"status {status}")


# --- slow clients, load and shutdown ------------------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"GET /healthz HTTP/1.1\r\nHost: loc"])
def test_half_open_client_neither_blocks_others_nor_stays(make: MakeListener, sent: bytes) -> None:
    """A client that sends nothing, or half a request, does not delay another client's answer and is
    disconnected after the timeout."""
    listener, _ = make(timeout=1.0)
    with socket.create_connection(listener.bound, timeout=5) as idle:
        idle.sendall(sent)
        started = time.monotonic()
        assert request(listener, "GET", "/healthz")[0] == 200
        assert time.monotonic() - started < 0.5
        assert idle.recv(100) == b""  # the server closed it
        assert 0.8 < time.monotonic() - started < 2.5


def test_dripping_client_is_cut_off_at_the_deadline(make: MakeListener) -> None:
    """A client sending one header byte every 0.1 s (each read on time) is cut off after one timeout for
    the whole request, not kept as long as it keeps dripping."""
    listener, _ = make(timeout=0.5)
    with socket.create_connection(listener.bound, timeout=5) as sock:
        stop = threading.Event()

        def drip() -> None:
            for byte in b"GET /healthz HTTP/1.1\r\nX-Pad: " + b"a" * 100:
                if stop.wait(0.1):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

        dripper = threading.Thread(target=drip)
        started = time.monotonic()
        dripper.start()
        with contextlib.suppress(ConnectionResetError):  # or reset: the dripper may still be sending
            assert sock.recv(100) == b""
        cut = time.monotonic() - started
        stop.set()
        dripper.join()
    assert 0.4 < cut < 1.5


def test_connections_beyond_the_bound_are_turned_away(make: MakeListener) -> None:
    """With the bound's worth of idle connections open, one more gets a 429 (or a close) at once and the
    server answers again as soon as a slot is free."""
    listener, _ = make(timeout=5.0, max_connections=4)
    idle = [socket.create_connection(listener.bound, timeout=5) for _ in range(4)]
    try:
        time.sleep(0.1)  # let the server accept them all
        started = time.monotonic()
        with socket.create_connection(listener.bound, timeout=5) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            try:
                answer = read_all(extra)
            except ConnectionResetError:
                answer = b""
        assert answer == b"" or status_of(answer) == 429
        assert time.monotonic() - started < 1.0
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 2.0
    while True:  # the idle connections' slots come back once the server sees them closed
        try:
            if request(listener, "GET", "/healthz")[0] == 200:
                break
        except (ConnectionError, http.client.HTTPException):
            pass
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_many_concurrent_requests_all_answered(make: MakeListener) -> None:
    """Sixteen clients at once are all answered."""
    listener, _ = make()
    results: list[int] = []

    def one() -> None:
        results.append(request(listener, "GET", "/metrics")[0])

    threads = [threading.Thread(target=one) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert results == [200] * 16


def test_close_frees_the_port_and_drops_connections(make: MakeListener) -> None:
    """close() drops an idle connection at once, frees the port for a new bind, and may be repeated."""
    listener, _ = make(timeout=5.0)
    address = listener.bound
    with socket.create_connection(address, timeout=5) as idle:
        time.sleep(0.05)
        started = time.monotonic()
        listener.close()
        assert time.monotonic() - started < 1.0
        assert idle.recv(100) == b""
    listener.close()
    again, _ = make(address=address)
    assert again.bound == address
    assert request(again, "GET", "/healthz")[0] == 200


def test_close_before_start_is_a_no_op() -> None:
    """close() on a Listener that never started does nothing."""
    Listener(
        ("127.0.0.1", 0), health=lambda: (200, b""), metrics=lambda: b"", trigger=None, secret=None
    ).close()


def test_port_in_use_is_a_listen_error_naming_the_address(make: MakeListener) -> None:
    """Binding an address already in use raises ListenError in syncd's words, exit code 1."""
    first, _ = make()
    host, port = first.bound
    with pytest.raises(ListenError) as caught:
        make(address=(host, port))
    assert str(caught.value) == f"cannot listen on 127.0.0.1:{port}: address already in use"
    assert caught.value.exit_code == 1
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_address_not_on_this_host_is_a_listen_error(make: MakeListener) -> None:
    """An IP address this host does not have is refused with a ListenError naming it."""
    with pytest.raises(ListenError) as caught:
        make(address=("192.0.2.1", 9847))
    assert str(caught.value) == "cannot listen on 192.0.2.1:9847: no such address on this host"


def test_ipv6_loopback(make: MakeListener) -> None:
    """An IPv6 address such as ::1 is bound (IPv6 only) and served."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener, _ = make(address=("::1", 0))
    except ListenError:
        pytest.skip("::1 is not configured here")
    assert listener.bound[0] == "::1"
    conn = http.client.HTTPConnection("::1", listener.bound[1], timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()
