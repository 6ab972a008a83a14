"""The gateway's configuration: one TOML file read into frozen, typed dataclasses.

``model`` holds the dataclasses, ``reader`` the typed table reader that records every
problem, ``sections``/``controllers``/``locks`` the parsers (each driver's keys are its
own: ``drivers/<driver>/settings.py``), ``load`` the entry points.  This package's
interface is re-exported here.  See docs/design/configuration.md.
"""

from drivers.registry import DRIVERS
from gateway.config.load import (
    config_path_from_env,
    known_keys,
    load_config,
    parse_config,
    parse_config_bytes,
)
from gateway.config.model import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_PATH,
    MQTT_MAX_PACKET_BYTES,
    TELEMETRY_INTERVAL_S,
    CommandsConfig,
    Config,
    ControlConfig,
    ControllerConfig,
    EnergizeTo,
    LockConfig,
    MqttConfig,
    SiteConfig,
    StoraAuth,
    StoraConfig,
    StorageConfig,
    TelemetryConfig,
)
from gateway.config.problems import ConfigErrors, MissingFileError, config_problems
from gateway.config.sections import EVENT_SCOPE

__all__ = [
    "CONFIG_ENV_VAR",
    "DEFAULT_CONFIG_PATH",
    "DRIVERS",
    "EVENT_SCOPE",
    "MQTT_MAX_PACKET_BYTES",
    "TELEMETRY_INTERVAL_S",
    "CommandsConfig",
    "Config",
    "ConfigErrors",
    "ControlConfig",
    "ControllerConfig",
    "EnergizeTo",
    "LockConfig",
    "MissingFileError",
    "MqttConfig",
    "SiteConfig",
    "StoraAuth",
    "StoraConfig",
    "StorageConfig",
    "TelemetryConfig",
    "config_path_from_env",
    "config_problems",
    "known_keys",
    "load_config",
    "parse_config",
    "parse_config_bytes",
]
