"""The agent's credentials for its broker: the TLS context of ``[mqtt]`` and the
password file, with errors that name the config key (:class:`~gateway.errors.ConfigError`).

Both build on the drivers' MQTT transport (:mod:`drivers.mqtt.tls`,
:func:`drivers.mqtt.settings.read_secret_file`), so every connection of ours checks a
broker the same way.
"""

from __future__ import annotations

from drivers.mqtt.settings import read_secret_file
from drivers.mqtt.tls import TlsContext, client_tls_context
from gateway.config import MqttConfig
from gateway.errors import ConfigError

__all__ = ["TlsContext", "broker_tls_context", "read_password", "read_secret_file"]


def read_password(cfg: MqttConfig) -> str | None:
    """The broker password from ``cfg.password_file`` without one trailing newline."""
    return read_secret_file(cfg.password_file)


def broker_tls_context(cfg: MqttConfig) -> TlsContext:
    """A client TLS context: the site's CA, TLS ≥ 1.2, hostname checked, optional cert."""
    assert cfg.ca_file is not None  # config.py requires ca_file when tls is on
    try:
        context = client_tls_context(cfg.ca_file)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(str(cfg.ca_file), "mqtt.ca_file",
                          f"cannot load the CA certificate: {exc}") from exc
    if cfg.cert_file is not None and cfg.key_file is not None:
        try:
            context.load_cert_chain(str(cfg.cert_file), str(cfg.key_file))
        except (OSError, ValueError) as exc:
            raise ConfigError(str(cfg.cert_file), "mqtt.cert_file",
                              f"cannot load the client certificate and key: {exc}") from exc
    return context
