"""The Stora client (gateway/stora/): the server's Date, a second source of time for the
clock (trusted answers, TLS or loopback only, the probe and its deadline).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from devkit.testing import FakeClock, returns_within
from gateway.stora.answers import Delivered
from gateway.stora.client import StoraClient, make_http_client
from gateway.stora.http import parse_http_date
from gateway.stora.idempotency import IdempotencyKey
from gateway.stora.ratelimit import RateLimiter
from gateway.stora.tokens import FileTokens
from tests.support.hostile_http import HostileServer, Reply, json_reply
from tests.support.stora_client import (
    CREATED,
    PER_MIN,
    PER_S,
    T0,
    TOKEN_BODY,
    body_for,
    hostile_client,
    make_limiter,
    routes,
)

# -- issue 11: hostile answers ---------------------------------------------------------------------
DATE = "Sun, 06 Nov 1994 08:49:37 GMT"  # RFC 9110's example

DATE_EPOCH = 784_111_777.0


# -- the server's Date, a second source of time for the clock -----------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    (DATE, DATE_EPOCH),
    ("Sunday, 06-Nov-94 08:49:37 GMT", DATE_EPOCH),  # RFC 850, obsolete but valid
    ("Sun, 06 Nov 1994 08:49:37 -0000", None),  # "no zone": not trusted
    ("yesterday", None), ("", None), (None, None), ("Sun, 06 Nov 1994 " + "9" * 80, None),
    ("Mon, 99 Foo 1994 08:49:37 GMT", None),
])
def test_parse_http_date(value: str | None, expected: float | None) -> None:
    assert parse_http_date(value) == expected


def test_every_trusted_answer_reports_its_date(tmp_path: Path, http: httpx.Client) -> None:
    dates: list[float] = []
    token = json_reply(200, TOKEN_BODY, date=DATE)
    with HostileServer(routes(token, json_reply(201, CREATED, date=DATE))) as server:
        client = hostile_client(server, tmp_path, http, on_server_date=dates.append)
        assert isinstance(client.post_event(body_for("a"), IdempotencyKey("a")), Delivered)
    assert dates == [DATE_EPOCH, DATE_EPOCH]  # the token answer, then the event's


@pytest.mark.parametrize("date", [None, "garbage", "Sun, 06 Nov 1994 08:49:37 -0000"])
def test_no_or_bad_date_is_ignored(tmp_path: Path, http: httpx.Client, date: str | None) -> None:
    dates: list[float] = []
    script = routes(json_reply(200, TOKEN_BODY, date=date), json_reply(201, CREATED, date=date))
    with HostileServer(script) as server:
        client = hostile_client(server, tmp_path, http, on_server_date=dates.append)
        assert isinstance(client.post_event(body_for("a"), IdempotencyKey("a")), Delivered)
        assert client.probe_server_time() is None
    assert dates == []


@pytest.mark.parametrize(("url", "trusted"), [
    ("https://public-api.stora.co/2025-09", True),
    ("http://public-api.stora.co/2025-09", False),  # anyone on the path could write it
    ("http://10.0.0.1/2025-09", False),
    ("http://localhost:8080/2025-09", True),
    ("http://[::1]:8080/2025-09", True),
])
def test_dates_are_taken_only_over_tls_or_from_loopback(
        tmp_path: Path, url: str, trusted: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json={"event": {"id": "aevt_1"}}, headers={"Date": DATE})

    dates: list[float] = []
    (tmp_path / "token").write_text("tok-1\n")
    clock = FakeClock(T0)
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        client = StoraClient(url, FileTokens(tmp_path / "token"), make_limiter(clock),
                             http=http, clock=clock, on_server_date=dates.append)
        assert isinstance(client.post_event(body_for("u"), IdempotencyKey("u")), Delivered)
        assert client.probe_server_time() == (DATE_EPOCH if trusted else None)
    assert dates == ([DATE_EPOCH] * 2 if trusted else [])


def test_a_failing_date_hook_does_not_stop_delivery(
        tmp_path: Path, http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    def hook(epoch: float) -> None:
        raise RuntimeError("the clock is broken")

    script = routes(json_reply(200, TOKEN_BODY, date=DATE), json_reply(201, CREATED, date=DATE))
    with HostileServer(script) as server:
        client = hostile_client(server, tmp_path, http, on_server_date=hook)
        for n in range(3):
            outcome = client.post_event(body_for(f"h{n}"), IdempotencyKey(f"h{n}"))
            assert isinstance(outcome, Delivered)
        assert client.probe_server_time() == DATE_EPOCH
    assert sum("server-Date hook failed;" in r.getMessage() for r in caplog.records) == 1


def test_probe_server_time_asks_without_a_token(tmp_path: Path, http: httpx.Client) -> None:
    dates: list[float] = []
    not_found = json_reply(404, '{"error": {"code": "invalid_endpoint"}}', date=DATE)
    with HostileServer(lambda r: not_found) as server:
        client = hostile_client(server, tmp_path, http, on_server_date=dates.append)
        assert client.probe_server_time() == DATE_EPOCH  # any status counts
        (probe,) = server.requests
        assert (probe.method, probe.path) == ("GET", "/2025-09")
        assert "authorization" not in probe.headers
        assert dates == [DATE_EPOCH]
        for _ in range(PER_S - 1):  # the probe takes rate-limit slots like any request
            client.probe_server_time()
        assert client.probe_server_time() is None  # no slot: nothing sent
        assert len(server.requests) == PER_S
    gone = hostile_client(server, tmp_path, http)  # the server is stopped: no answer
    assert gone.probe_server_time() is None


def test_probe_never_raises_when_the_send_time_cannot_be_kept(tmp_path: Path) -> None:
    def full_disk(at: float) -> None:
        raise OSError(28, "No space left on device")

    (tmp_path / "token").write_text("tok-1\n")
    with HostileServer(lambda r: json_reply(404, "{}", date=DATE)) as server:
        client = StoraClient(server.url, FileTokens(tmp_path / "token"),
                             RateLimiter(PER_S, PER_MIN, on_record=full_disk))
        assert client.probe_server_time() is None
        client.close()
    assert server.requests == []


def test_a_dripping_probe_ends_by_its_deadline(tmp_path: Path) -> None:
    with HostileServer(lambda r: Reply(200, b"x" * 100, head_drip_s=0.1)) as server, \
            make_http_client() as http:
        assert hostile_client(server, tmp_path, http).probe_server_time(deadline_s=0.5) is None
        assert server.bytes_dripped < 1.2 / 0.1  # listened less than 1.2 s of 0.1 s drips


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (EC P-256: quick to make)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return tmp / "cert.pem", tmp / "key.pem"


def test_over_tls_dates_count_and_a_stuck_handshake_ends_by_the_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cert, key = self_signed(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # make_http_client trusts it from here
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    (tmp_path / "token").write_text("tok-1\n")
    dates: list[float] = []
    with HostileServer(lambda r: json_reply(404, "{}", date=DATE), context) as server, \
            make_http_client() as http:
        client = StoraClient(server.url + "/2025-09", FileTokens(tmp_path / "token"),
                             RateLimiter(PER_S, PER_MIN), http=http,
                             on_server_date=dates.append)
        assert client.probe_server_time() == DATE_EPOCH
    assert dates == [DATE_EPOCH]
    # Accepts, never speaks TLS; phase timeouts of a minute, so only the 0.5 s deadline can
    # end the probe within the ceiling.
    with socket.socket() as silent, make_http_client(httpx.Timeout(60.0)) as http:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"https://127.0.0.1:{silent.getsockname()[1]}/2025-09"
        client = StoraClient(url, FileTokens(tmp_path / "token"), RateLimiter(PER_S, PER_MIN),
                             http=http)
        assert returns_within(20, lambda: client.probe_server_time(deadline_s=0.5),
                              "a probe of a silent TLS server") is None
