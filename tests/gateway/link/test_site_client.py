"""A tool's TLS identity on the site's broker (gateway/link/site_client.py): never the agent's.

``watch`` and ``selftest`` reach the broker with ``[mqtt]``'s transport.  Over TLS they
trust ``[mqtt] ca_file`` and present no client certificate, or their own: a broker with
``use_identity_as_username`` takes the certificate's name for the account, so a tool
presenting the agent's ``cert_file`` would log in as the agent and disconnect it.

Three levels: what a TLS server sees each context present (plain ``ssl``, no broker);
which files are refused, and where the options and environment variables lead; and a
real Mosquitto that maps certificates to accounts, where the agent keeps its one
connection whatever the tool does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devkit.mosquitto import Broker
from devkit.site import SITE, SimSite, make_site
from devkit.tls_files import TlsFiles
from gateway.cli.watch import WATCH_CERT_ENV, WATCH_KEY_ENV
from gateway.config import Config, MqttConfig, load_config
from gateway.link.site_client import (
    ClientCertificate,
    SiteClient,
    SiteLinkError,
    client_certificate,
    tls_context,
)

#: The agent's certificate names it like this; with use_identity_as_username that is
#: its broker account.
AGENT_CN = f"stora-gw-{SITE}"


@dataclasses.dataclass(frozen=True)
class Pki:
    """One CA; the broker's certificate for localhost; the agent's, watch's and an
    impostor's (another key and subject, the agent's common name) client certificates."""

    ca: Path
    server: tuple[Path, Path]
    agent: tuple[Path, Path]
    watch: tuple[Path, Path]
    impostor: tuple[Path, Path]

    def der(self, which: tuple[Path, Path]) -> bytes:
        cert = x509.load_pem_x509_certificate(which[0].read_bytes())
        return cert.public_bytes(serialization.Encoding.DER)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(common: str, org: str | None = None) -> x509.Name:
        extra = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
        return x509.Name([*extra, x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("site CA")).issuer_name(name("site CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(file: str, common: str, server: bool = False,
             org: str | None = None) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(common, org))
                   .issuer_name(ca.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.ExtendedKeyUsage([
                       ExtendedKeyUsageOID.SERVER_AUTH if server
                       else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        cert_path, key_path = directory / f"{file}.pem", directory / f"{file}.key"
        cert_path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path

    return Pki(directory / "ca.pem", leaf("server", "localhost", server=True),
               leaf("agent", AGENT_CN), leaf("watch", "gw-watch"),
               leaf("impostor", AGENT_CN, org="Elsewhere Ltd"))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def tls_mqtt(pki: Pki, port: int = 8883) -> MqttConfig:
    """``[mqtt]`` over TLS to localhost with the agent's client certificate."""
    return MqttConfig(host="localhost", port=port, topic_prefix="stora-gw",
                      client_id="agent", username="", password_file=None, tls=True,
                      ca_file=pki.ca, cert_file=pki.agent[0], key_file=pki.agent[1],
                      keepalive_s=5)


# -- what a TLS server sees ------------------------------------------------------------------
def presented(context: ssl.SSLContext, pki: Pki) -> bytes | None:
    """The client certificate (DER) a TLS server sees ``context`` present, or None."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(*map(str, pki.server))
    server_context.load_verify_locations(cafile=str(pki.ca))
    server_context.verify_mode = ssl.CERT_OPTIONAL
    seen: list[bytes | None] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def serve() -> None:
            conn, _ = listener.accept()
            with server_context.wrap_socket(conn, server_side=True) as tls:
                seen.append(tls.getpeercert(binary_form=True))
                tls.recv(1)  # until the client closes

        server = threading.Thread(target=serve)
        server.start()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as client:
            client.sendall(b"x")
        server.join(10)
    assert len(seen) == 1
    return seen[0]


def test_the_tool_s_context_presents_no_certificate_or_its_own_never_the_agent_s(
        pki: Pki) -> None:
    from gateway.link.tls import broker_tls_context as _tls_context

    mqtt = tls_mqtt(pki)
    assert presented(_tls_context(mqtt), pki) == pki.der(pki.agent)  # the server can tell
    assert presented(tls_context(mqtt, None), pki) is None
    own = ClientCertificate(*pki.watch)
    assert presented(tls_context(mqtt, own), pki) == pki.der(pki.watch)
    # The agent's settings still hold: its CA, and the hostname is checked.
    context = tls_context(mqtt, None)
    assert context.check_hostname is True
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_files_that_cannot_be_loaded_are_one_clear_usage_error(pki: Pki,
                                                               tmp_path: Path) -> None:
    mqtt = tls_mqtt(pki)
    with pytest.raises(SiteLinkError, match="cannot load the client certificate") as caught:
        tls_context(mqtt, ClientCertificate(pki.watch[0], pki.impostor[1]))  # wrong key
    assert caught.value.status == 2
    with pytest.raises(SiteLinkError, match="CA certificate") as caught:
        tls_context(dataclasses.replace(mqtt, ca_file=tmp_path / "missing.pem"), None)
    assert caught.value.status == 2


# -- which files are refused -------------------------------------------------------------------
@pytest.fixture
def site(tmp_path: Path) -> Iterator[SimSite]:
    with Broker(tmp_path / "broker") as broker:
        built = make_site(tmp_path, broker)
    try:
        yield built
    finally:
        built.close()


def tls_config(site: SimSite, pki: Pki, *, tls: bool = True) -> Config:
    """The site's config with ``[mqtt]`` over TLS and the agent's certificate."""
    text = site.config_path.read_text()
    settings = (f'tls = true\nca_file = "{pki.ca}"\ncert_file = "{pki.agent[0]}"\n'
                f'key_file = "{pki.agent[1]}"\n' if tls else "")
    site.config_path.write_text(text.replace("keepalive_s = 5\n",
                                             f"keepalive_s = 5\n{settings}"))
    return load_config(site.config_path)


def choose(config: Config, cert: Any = None, key: Any = None,
           environ: dict[str, str] | None = None) -> ClientCertificate | None:
    return client_certificate(config, None if cert is None else str(cert),
                              None if key is None else str(key), cert_env=WATCH_CERT_ENV,
                              key_env=WATCH_KEY_ENV, environ=environ or {})


def refused(config: Config, cert: Any, key: Any) -> str:
    with pytest.raises(SiteLinkError) as caught:
        choose(config, cert, key)
    assert caught.value.status == 2
    return str(caught.value)


def test_the_agent_s_identity_is_refused_by_any_path(site: SimSite, pki: Pki,
                                                      tmp_path: Path) -> None:
    config = tls_config(site, pki)
    agent_cert, agent_key = pki.agent
    assert "is the agent's [mqtt] cert_file" in refused(config, agent_cert, pki.watch[1])
    assert "is the agent's [mqtt] key_file" in refused(config, pki.watch[0], agent_key)
    linked = tmp_path / "links"
    linked.mkdir()
    (linked / "key").symlink_to(agent_key)
    os.link(agent_cert, linked / "cert")
    assert "is the agent's [mqtt] key_file" in refused(config, pki.watch[0], linked / "key")
    assert "is the agent's [mqtt] cert_file" in refused(config, linked / "cert",
                                                         pki.watch[1])
    # Another key, the agent's name: the broker would still take it for the agent.
    message = refused(config, *pki.impostor)
    assert f"names the agent (CN={AGENT_CN})" in message
    assert "use_identity_as_username" in message
    assert choose(config, *pki.watch) == ClientCertificate(*pki.watch)


def test_options_win_over_the_environment_and_half_a_pair_is_refused(
        site: SimSite, pki: Pki, tmp_path: Path) -> None:
    plain = tls_config(site, pki, tls=False)
    config = tls_config(site, pki)
    assert choose(config) is None  # nothing given: the CA alone
    env = {WATCH_CERT_ENV: str(pki.watch[0]), WATCH_KEY_ENV: str(pki.watch[1])}
    assert choose(config, environ=env) == ClientCertificate(*pki.watch)
    impostor = {WATCH_CERT_ENV: str(pki.impostor[0]), WATCH_KEY_ENV: str(pki.impostor[1])}
    assert choose(config, *pki.watch, environ=impostor) == ClientCertificate(*pki.watch)
    with pytest.raises(SiteLinkError, match="names the agent "):
        choose(config, environ=impostor)
    assert f"give its key (${WATCH_KEY_ENV}) too" in refused(config, pki.watch[0], None)
    assert f"the certificate (${WATCH_CERT_ENV})" in refused(config, None, pki.watch[1])
    open_key = tmp_path / "open.key"
    open_key.write_bytes(pki.watch[1].read_bytes())
    open_key.chmod(0o644)
    assert "chmod 600" in refused(config, pki.watch[0], open_key)
    assert "tls = false" in refused(plain, *pki.watch)


# -- a broker that takes certificates for accounts ------------------------------------------
def test_on_a_broker_that_maps_certificates_to_accounts_the_agent_keeps_its_connection(
        tmp_path: Path, pki: Pki) -> None:
    """use_identity_as_username and ids bound to accounts, certificates required: a tool
    without one is turned away (and told why it may be), one with its own logs in under
    its own name; the agent is never disconnected."""
    from gateway.link.site_client import BrokerAccount

    files = TlsFiles(ca=pki.ca, server_cert=pki.server[0], server_key=pki.server[1],
                     client_cert=pki.agent[0], client_key=pki.agent[1], hostname="localhost")
    drops: list[str | None] = []

    def on_agent_link(connected: bool, reason: str | None) -> None:
        if not connected:
            drops.append(reason)

    def ignore(topic: str, payload: bytes, retained: bool) -> None:
        pass

    with Broker(tmp_path / "broker", tls=files, require_client_cert=True,
                extra_conf=["use_identity_as_username true",
                            "use_username_as_clientid true"]) as broker:
        mqtt = tls_mqtt(pki, broker.port)
        # The agent's stand-in: its certificate, presented as the agent presents it.
        agent = SiteClient(dataclasses.replace(mqtt, cert_file=None, key_file=None),
                           BrokerAccount(None), client_name="agent",
                           subscriptions=[f"stora-gw/{SITE}/cmd"], on_message=ignore,
                           on_connection=on_agent_link, certificate=ClientCertificate(*pki.agent))
        agent.start()
        try:
            bare = SiteClient(mqtt, BrokerAccount(None), client_name="stora-watch",
                              subscriptions=[f"stora-gw/{SITE}/status"], on_message=ignore)
            with pytest.raises(SiteLinkError) as caught:
                bare.start(timeout=5)
            assert "give this tool one of its own, never the agent's" in str(caught.value)
            own = SiteClient(mqtt, BrokerAccount(None), client_name="stora-watch",
                             subscriptions=[f"stora-gw/{SITE}/status"], on_message=ignore,
                             certificate=ClientCertificate(*pki.watch))
            own.start(timeout=5)
            own.close()
            agent.publish(f"stora-gw/{SITE}/status", b"{}")  # still connected, still itself
        finally:
            agent.close()
        log = broker.log_text()
    assert drops == []
    assert "u'gw-watch'" in log
    assert f"u'{AGENT_CN}'" in log


def test_watch_and_selftest_refuse_the_agent_s_certificate_from_the_environment(
        site: SimSite, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the CLI: one line, exit 2, before any connection is tried."""
    import io

    from devkit.selftest import SELFTEST_CERT_ENV, SELFTEST_TLS_KEY_ENV
    from gateway.cli.main import main

    tls_config(site, pki)
    key, out = site.directory / "selftest.pem", io.StringIO()
    assert main(["selftest", "--new-key", str(key)], out=out, err=io.StringIO()) == 0
    entry = out.getvalue().strip().splitlines()[-1]  # trusted, as the installer does
    site.config_path.write_text(site.config_path.read_text().replace(
        "trusted_keys = { ", f"trusted_keys = {{ {entry}, "))
    monkeypatch.setenv(WATCH_CERT_ENV, str(pki.agent[0]))
    monkeypatch.setenv(WATCH_KEY_ENV, str(pki.agent[1]))
    monkeypatch.setenv(SELFTEST_CERT_ENV, str(pki.impostor[0]))
    monkeypatch.setenv(SELFTEST_TLS_KEY_ENV, str(pki.impostor[1]))
    for argv, says in ((["watch"], "is the agent's [mqtt] cert_file"),
                       (["selftest", "A-101", "--key-file", str(key)], "names the agent")):
        err = io.StringIO()
        status = main([*argv, "--config", str(site.config_path)], out=io.StringIO(), err=err)
        assert status == 2, err.getvalue()
        assert says in err.getvalue()
        assert err.getvalue().count("\n") == 1
