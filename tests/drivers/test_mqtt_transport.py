"""The one MQTT transport (drivers/mqtt/), tested directly: the full-jitter backoff with
an injected random source; PahoClient's unix-socket connect (bounded, no leaked socket)
and packet cap (to the byte); MqttTransport against a real Mosquitto (connect, subscribe
after every reconnect, ``kill -9`` and restart, clean shutdown, TLS and password file);
the tools' client (gateway/link/site_client.py) reconnecting by the same policy; and
:func:`gateway.link.wire.fast_path_supported`.

Waits are on events and conditions; their timeouts are ceilings for a stuck test, never
speed targets (those live in ``bench/``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt import __version__ as paho_version
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from devkit.broker_client import Client
from devkit.mosquitto import Broker
from devkit.testing import returns_within, wait_for
from devkit.tls_files import make_tls_files
from drivers.mqtt.backoff import MAX_EXPONENT, Backoff, full_jitter_delay
from drivers.mqtt.client import PahoClient
from drivers.mqtt.settings import BrokerSettings, read_secret_file
from drivers.mqtt.tls import client_tls_context
from drivers.mqtt.transport import MqttTransport
from gateway.config import MqttConfig
from gateway.link import wire
from gateway.link.site_client import BrokerAccount, SiteClient
from tests.support.fake_broker import encode_varint

#: A ceiling for anything a test waits on: far above what a loaded CI box needs.
CEILING_S = 10.0


def open_fds() -> set[str]:
    """This process's open descriptors, by number."""
    return set(os.listdir("/proc/self/fd"))


class Recorder:
    """A random source that returns ``value`` and counts its calls (thread-safe)."""

    def __init__(self, value: float = 0.0) -> None:
        self.value = value
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.calls += 1
        return self.value


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize("r", [0.0, 0.25, 0.999_999])
def test_full_jitter_delay_is_the_random_fraction_of_the_capped_ceiling(r: float) -> None:
    delays = [full_jitter_delay(n, 0.5, 30.0, lambda: r) for n in range(10)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert delays == pytest.approx([r * c for c in ceilings])
    assert all(0.0 <= d < c or d == c == 0.0 for d, c in zip(delays, ceilings, strict=True))


def test_full_jitter_delay_grows_to_the_cap_and_never_overflows() -> None:
    def top() -> float:
        return 0.5  # the same fraction every time, so the ceilings compare

    series = [full_jitter_delay(n, 0.001, 60.0, top) for n in range(20)]
    assert series == sorted(series)  # non-decreasing
    assert series[0] == pytest.approx(0.0005)
    assert series[-1] == pytest.approx(30.0)  # half the cap: the cap won
    # An attempt count far past any real outage: no OverflowError, still the cap.
    assert full_jitter_delay(10**9, 1.0, 60.0, top) == pytest.approx(30.0)
    assert full_jitter_delay(MAX_EXPONENT + 5, 1.0, 60.0, top) == pytest.approx(30.0)
    # A negative count is the first attempt, not a fraction of it.
    assert full_jitter_delay(-3, 2.0, 60.0, top) == pytest.approx(1.0)


def test_full_jitter_delay_asks_the_random_source_once_and_spreads_a_herd() -> None:
    fractions = iter([0.1, 0.9])
    calls: list[float] = []

    def rng() -> float:
        calls.append(value := next(fractions))
        return value

    assert full_jitter_delay(2, 1.0, 60.0, rng) == pytest.approx(0.4)
    assert full_jitter_delay(2, 1.0, 60.0, rng) == pytest.approx(3.6)
    assert calls == [0.1, 0.9]  # one draw per delay: two clients, two different waits


def test_backoff_doubles_its_ceiling_until_the_cap_and_reset_starts_again() -> None:
    rng = Recorder(1.0)  # the ceiling itself: the series shows through
    backoff = Backoff(0.5, 4.0, rng)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert [backoff.next_delay() for _ in range(2)] == [0.5, 1.0]
    assert rng.calls == 8


def test_backoff_scales_each_ceiling_by_the_injected_random_source() -> None:
    fractions = iter([0.5, 0.0, 0.25, 0.75])
    backoff = Backoff(1.0, 60.0, lambda: next(fractions))
    assert [backoff.next_delay() for _ in range(4)] == pytest.approx([0.5, 0.0, 1.0, 6.0])


# --------------------------------------------------------------------------- PahoClient


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for unix sockets (a socket path is limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="mqt-") as name:
        yield Path(name)


def _unix_client() -> PahoClient:
    client = PahoClient(CallbackAPIVersion.VERSION2, "t", transport="unix")
    client.connect_timeout = 0.2
    return client


def test_a_unix_connect_to_a_missing_socket_closes_its_socket(socket_dir: Path) -> None:
    client = _unix_client()
    before = open_fds()
    with pytest.raises(OSError):
        client.connect(str(socket_dir / "absent.sock"), 1883)
    assert open_fds() == before  # paho 2.2's own connect leaves one open per attempt


def test_a_unix_connect_to_a_wedged_broker_is_bounded_and_closes_its_socket(
        socket_dir: Path) -> None:
    """A listener whose accept queue is full (a frozen broker): paho's own connect
    would block for ever; this one gives up within ``connect_timeout``."""
    path = socket_dir / "wedged.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(0)
    fillers: list[socket.socket] = []
    try:
        for _ in range(8):  # fill the backlog: then a blocking connect waits
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            filler.setblocking(False)
            try:
                filler.connect(str(path))
            except BlockingIOError:
                filler.close()
                break
            fillers.append(filler)
        client = _unix_client()
        before = open_fds()
        with pytest.raises(OSError):
            returns_within(CEILING_S, lambda: client.connect(str(path), 1883), "connect")
        assert open_fds() == before
    finally:
        listener.close()  # also frees a connect that hung (the broken case)
        for filler in fillers:
            filler.close()


class _OnePacketBroker:
    """Accepts one client: CONNACK, then one QoS 0 PUBLISH of ``size`` bytes in all."""

    TOPIC = b"t"

    def __init__(self, size: int) -> None:
        # 0x30 | varint(remaining) | topic length | topic | payload
        remaining = next(r for r in range(size, 0, -1)
                         if 1 + len(encode_varint(r)) + r == size)
        payload = bytes(remaining - 2 - len(self.TOPIC))
        self.packet = (b"\x30" + encode_varint(remaining)
                       + len(self.TOPIC).to_bytes(2, "big") + self.TOPIC + payload)
        assert len(self.packet) == size
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn, contextlib.suppress(OSError):  # a reset when the client hangs up
            conn.recv(4096)  # the CONNECT
            conn.sendall(b"\x20\x02\x00\x00" + self.packet)
            conn.recv(4096)  # until the client hangs up (or the test ends)

    def close(self) -> None:
        self.server.close()
        self.thread.join(CEILING_S)


def _receive_one(size: int, cap: int) -> tuple[list[bytes], int | None, MQTTErrorCode]:
    """Connect a client capped at ``cap`` to a broker sending one ``size``-byte packet;
    loop until the message arrives or the connection ends."""
    broker = _OnePacketBroker(size)
    got: list[bytes] = []
    client = PahoClient(callback_api_version=CallbackAPIVersion.VERSION2, client_id="c",
                        protocol=paho.MQTTv311, max_packet_bytes=cap)
    client.on_message = lambda _c, _u, msg: got.append(bytes(msg.payload))
    rc = MQTTErrorCode.MQTT_ERR_SUCCESS
    try:
        client.connect("127.0.0.1", broker.port, keepalive=30)
        for _ in range(int(CEILING_S / 0.05)):
            rc = client.loop(timeout=0.05)
            if got or rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
    finally:
        client.disconnect()
        client._reset_sockets()  # the socket pair too (unclosed-socket warnings)
        broker.close()
    return got, client.oversize, rc


def test_a_packet_of_exactly_the_cap_is_delivered() -> None:
    got, oversize, rc = _receive_one(1000, cap=1000)
    assert rc == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert [len(p) for p in got] == [1000 - 6]
    assert oversize is None


def test_a_packet_one_byte_over_the_cap_ends_the_connection_undelivered() -> None:
    got, oversize, rc = _receive_one(1001, cap=1000)
    assert got == []
    assert oversize == 1001  # its declared size, known before its body was read
    assert rc == MQTTErrorCode.MQTT_ERR_CONN_LOST


def test_without_a_cap_a_large_packet_is_delivered() -> None:
    got, oversize, _ = _receive_one(100_000, cap=0)
    assert [len(p) for p in got] == [100_000 - 1 - 3 - 3]  # three varint bytes here
    assert oversize is None


# --------------------------------------------------------------------------- MqttTransport


class Sink:
    """What a transport delivered and reported, with waits on a condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.messages: list[tuple[str, bytes, bool]] = []
        self.ups = 0
        self.downs = 0
        self.subscription_calls = 0

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        with self.cond:
            self.messages.append((topic, payload, retained))
            self.cond.notify_all()

    def on_up(self) -> None:
        with self.cond:
            self.ups += 1
            self.cond.notify_all()

    def on_down(self) -> None:
        with self.cond:
            self.downs += 1
            self.cond.notify_all()

    def subscriptions(self) -> list[tuple[str, int]]:
        with self.cond:
            self.subscription_calls += 1
        return [("site/#", 0)]

    def wait(self, check: Callable[[], bool], what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(check, CEILING_S), f"{what}: {vars(self)}"


def make_transport(settings: BrokerSettings, sink: Sink,
                   rng: Callable[[], float] = lambda: 0.0) -> MqttTransport:
    return MqttTransport(settings, name="test", subscriptions=sink.subscriptions,
                         on_message=sink.on_message, on_up=sink.on_up, on_down=sink.on_down,
                         rng=rng)


def _publish_until_received(broker: Broker, sink: Sink, payload: bytes) -> None:
    with Client(broker) as peer:
        peer.publish("site/a", payload, qos=0)
        sink.wait(lambda: ("site/a", payload, False) in sink.messages, "message")


def test_the_transport_connects_subscribes_and_delivers(broker: Broker) -> None:
    sink = Sink()
    transport = make_transport(BrokerSettings(broker.host, broker.port, "gw-t1"), sink)
    transport.start()
    try:
        assert transport.wait_connected(CEILING_S), transport.last_error
        assert sink.ups == 1
        assert sink.subscription_calls == 1
        _publish_until_received(broker, sink, b"hello")
        with Client(broker) as peer:
            peer.subscribe("cmd/#")
            assert transport.publish("cmd/x", b"go") == MQTTErrorCode.MQTT_ERR_SUCCESS
            assert peer.expect("cmd/x")[0].payload == b"go"
    finally:
        transport.close()


def test_the_transport_resubscribes_after_the_broker_is_killed_and_restarted(
        broker: Broker) -> None:
    """``kill -9``, no persistence: the restarted broker has forgotten the subscription.
    The transport reconnects after a full-jitter delay (drawn from the injected source)
    and subscribes again before it says it is connected."""
    sink = Sink()
    rng = Recorder(0.0)
    transport = make_transport(BrokerSettings(broker.host, broker.port, "gw-t2"), sink, rng)
    transport.start()
    try:
        assert transport.wait_connected(CEILING_S), transport.last_error
        assert rng.calls == 0
        broker.kill()
        sink.wait(lambda: sink.downs == 1, "lost")
        # While down, a command is refused, never kept for a later connection.
        assert transport.publish("cmd/x", b"late") == MQTTErrorCode.MQTT_ERR_NO_CONN
        broker.start()
        sink.wait(lambda: sink.ups == 2, "reconnected")
        assert transport.connected
        assert sink.subscription_calls == 2
        assert rng.calls >= 1  # each wait before a reconnect is the policy's
        _publish_until_received(broker, sink, b"after restart")
    finally:
        transport.close()


def test_only_the_link_thread_writes_to_the_socket(broker: Broker,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A controller publishes from its own thread; paho must not write the packet there
    (two writers could interleave their bytes): the link thread writes it."""
    sink = Sink()
    transport = make_transport(BrokerSettings(broker.host, broker.port, "gw-tw"), sink)
    writers: list[str] = []
    real_write = transport._paho.loop_write

    def loop_write() -> MQTTErrorCode:
        writers.append(threading.current_thread().name)
        return real_write()

    monkeypatch.setattr(transport._paho, "loop_write", loop_write)
    transport.start()
    try:
        assert transport.wait_connected(CEILING_S), transport.last_error
        with Client(broker) as peer:
            peer.subscribe("cmd/#")
            writers.clear()
            assert transport.publish("cmd/x", b"go") == MQTTErrorCode.MQTT_ERR_SUCCESS
            assert peer.expect("cmd/x")[0].payload == b"go"
        assert transport.thread is not None
        assert writers
        assert set(writers) == {transport.thread.name}
    finally:
        transport.close()


def test_a_drop_is_one_failure_with_its_first_reason(broker: Broker) -> None:
    """The broker dies: one failure is counted, with the disconnect's reason, not a
    second "connection lost" on top (the waits before reconnecting are long here)."""
    sink = Sink()
    settings = BrokerSettings(broker.host, broker.port, "gw-t3", backoff_initial_s=600.0,
                              backoff_max_s=600.0)
    transport = make_transport(settings, sink, rng=lambda: 1.0)
    transport.start()
    try:
        assert transport.wait_connected(CEILING_S), transport.last_error
        broker.kill()
        sink.wait(lambda: sink.downs == 1, "lost")
        assert transport.failures == 1
        assert (transport.last_error or "").startswith("disconnected:"), transport.last_error
    finally:
        transport.close()


def test_the_transport_shuts_down_cleanly(broker: Broker) -> None:
    before = open_fds()
    sink = Sink()
    transport = make_transport(BrokerSettings(broker.host, broker.port, "gw-t3"), sink)
    transport.start()
    assert transport.wait_connected(CEILING_S), transport.last_error
    thread = transport.thread
    assert thread is not None
    assert thread.is_alive()
    transport.close()
    transport.close()  # idempotent
    assert not thread.is_alive()
    assert not transport.connected
    assert open_fds() == before  # the MQTT socket and paho's wake-up pair
    # A DISCONNECT, not a dropped socket: the broker says so.
    wait_for(lambda: "Client gw-t3 disconnected" in broker.log_text(), CEILING_S,
             broker.log_text)
    assert "Client gw-t3 closed its connection" not in broker.log_text()


def test_the_transport_shuts_down_while_the_broker_is_away(broker: Broker) -> None:
    """Closing during the backoff wait (a long one here) ends the thread at once."""
    sink = Sink()
    settings = BrokerSettings(broker.host, broker.port, "gw-t4", backoff_initial_s=3600.0,
                              backoff_max_s=3600.0)
    transport = make_transport(settings, sink, Recorder(1.0))
    transport.start()
    assert transport.wait_connected(CEILING_S), transport.last_error
    broker.kill()
    sink.wait(lambda: sink.downs == 1, "lost")
    returns_within(CEILING_S, transport.close, "close during a one-hour backoff")
    assert transport.thread is not None
    assert not transport.thread.is_alive()


def test_the_transport_uses_the_tls_context_and_the_password_from_its_file(
        tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "tls")
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")  # as `echo s3cret > file` writes it
    with Broker(tmp_path / "broker", tls=tls, users={"gw-link": "s3cret"}) as broker:
        settings = BrokerSettings("localhost", broker.port, "gw-link", username="gw-link",
                                  password=read_secret_file(secret),
                                  tls=client_tls_context(tls.ca))
        sink = Sink()
        transport = make_transport(settings, sink)
        transport.start()
        try:
            assert transport.wait_connected(CEILING_S), transport.last_error
        finally:
            transport.close()
        assert "u'gw-link'" in broker.log_text()


def test_the_transport_checks_the_broker_s_hostname(tmp_path: Path) -> None:
    """The certificate names ``localhost``: by IP address the hostname check fails, so the
    context really is the one in the settings."""
    tls = make_tls_files(tmp_path / "tls")
    with Broker(tmp_path / "broker", tls=tls) as broker:
        before = open_fds()
        settings = BrokerSettings(broker.host, broker.port, "gw-tls",
                                  tls=client_tls_context(tls.ca), connect_timeout_s=2.0)
        transport = make_transport(settings, Sink(), Recorder(0.5))
        transport.start()
        try:
            wait_for(lambda: transport.failures >= 2, CEILING_S,
                     lambda: f"failures: {transport.failures} {transport.last_error}")
            assert not transport.connected
            assert "cannot connect" in (transport.last_error or "")
            assert "certificate" in (transport.last_error or "").lower()
        finally:
            transport.close()
        assert open_fds() == before  # no TLS socket of a failed handshake left open


def test_the_transport_reports_a_wrong_password_and_keeps_trying(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Broker(tmp_path / "broker", users={"gw-link": "right"}) as broker:
        settings = BrokerSettings(broker.host, broker.port, "gw-link", username="gw-link",
                                  password="wrong")
        rng = Recorder(0.01)
        transport = make_transport(settings, Sink(), rng)
        transport.start()
        try:
            wait_for(lambda: rng.calls >= 2, CEILING_S, "two reconnect delays")
            assert not transport.connected
            assert "refused" in (transport.last_error or "")
            # A wrong password is visible at the default log level.
            assert any(r.levelno == logging.WARNING and "refused" in r.getMessage()
                       for r in caplog.records)
            assert "wrong" not in repr(settings)
        finally:
            transport.close()


# --------------------------------------------------------------------------- tools' client


def test_the_tools_client_reconnects_by_the_one_policy_and_resubscribes(
        broker: Broker) -> None:
    """``watch``'s client after ``kill -9`` and a restart: the wait before each reconnect
    is drawn from the injected random source (full jitter, drivers.mqtt.backoff, not
    paho's fixed delays), the subscriptions are made again, and ``close`` leaves no
    thread and no descriptor."""
    before = open_fds()
    events: list[tuple[bool, str | None]] = []
    got: list[bytes] = []
    cond = threading.Condition()

    def on_connection(connected: bool, reason: str | None) -> None:
        with cond:
            events.append((connected, reason))
            cond.notify_all()

    def on_message(topic: str, payload: bytes, retained: bool) -> None:
        with cond:
            got.append(payload)
            cond.notify_all()

    rng = Recorder(0.0)
    mqtt = MqttConfig(host=broker.host, port=broker.port, topic_prefix="stora-gw",
                      client_id="gw", username="", password_file=None, tls=False,
                      ca_file=None, cert_file=None, key_file=None, keepalive_s=30)
    client = SiteClient(mqtt, BrokerAccount(None), client_name="stora-watch",
                        subscriptions=["site/#"], on_message=on_message,
                        on_connection=on_connection, rng=rng)
    client.start(timeout=CEILING_S)
    try:
        assert events == [(True, None)]
        broker.kill()
        broker.start()
        with cond:
            assert cond.wait_for(lambda: (True, "reconnected") in events, CEILING_S), events
        assert rng.calls >= 1
        assert events[1][0] is False  # the loss was reported first
        with Client(broker) as peer:
            peer.publish("site/a", b"after restart", qos=1)
            with cond:
                assert cond.wait_for(lambda: b"after restart" in got, CEILING_S), got
    finally:
        client.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("stora-watch-")]
    assert open_fds() == before


# --------------------------------------------------------------------------- fast path


def test_the_fast_path_is_on_for_the_installed_paho() -> None:
    assert wire.fast_path_supported(paho_version, paho.Client) is True
    assert wire.FAST_PATH is True


@pytest.mark.parametrize("version", ["1.6.1", "3.0.0", "", "dev"])
def test_the_fast_path_is_off_for_another_paho_release(version: str) -> None:
    assert wire.fast_path_supported(version, paho.Client) is False


@pytest.mark.parametrize("member", ["_sock_recv", "_packet_read", "_handle_publish"])
def test_the_fast_path_is_off_when_a_private_method_it_overrides_is_gone(
        monkeypatch: pytest.MonkeyPatch, member: str) -> None:
    monkeypatch.delattr(paho.Client, member)
    assert wire.fast_path_supported(paho_version, paho.Client) is False


def test_the_fast_path_is_off_when_paho_no_longer_keeps_an_in_packet(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``_in_packet`` is set per instance: a paho whose ``__init__`` no longer names it."""

    monkeypatch.setattr(paho.Client, "__init__", lambda self, *args, **kwargs: None)
    assert wire.fast_path_supported(paho_version, paho.Client) is False
