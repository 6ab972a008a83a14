"""One builder for the agent's TOML (``gateway.toml``) in tests.

:class:`AgentToml` holds one mapping per table; :meth:`AgentToml.write` renders it and
writes the static token file it names.  A table may also be given as raw TOML lines, for
the tests that hold a fragment of their own (a driver harness's ``[[controllers]]``, an
``[mqtt]`` under test).  :meth:`AgentToml.for_site` starts from the simulated site's
defaults (:mod:`devkit.site`): its site id, its broker, a trusted test key, no Stora.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from devkit.site import NO_STORA_URL, SITE, STORA_TOKEN

__all__ = ["AgentToml", "BrokerAddress", "Table", "TomlValue", "toml_value"]

#: What a key may hold.
TomlValue = (str | bool | int | float | Path | Mapping[str, "TomlValue"]
             | Sequence["TomlValue"])
#: A table: keys and values, or raw TOML lines.
Table = Mapping[str, TomlValue] | str


class BrokerAddress(Protocol):
    """Where the agent finds its broker (a :class:`devkit.mosquitto.Broker`)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...


def toml_value(value: TomlValue) -> str:
    """``value`` in TOML (strings as basic strings, mappings as inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"no TOML for {value!r} in a test config")
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, Mapping):
        inner = ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items())
        return f"{{ {inner} }}"
    return "[" + ", ".join(toml_value(item) for item in value) + "]"


def _table(header: str, body: Table) -> str:
    if isinstance(body, str):
        lines = body if body.endswith("\n") or not body else body + "\n"
    else:
        lines = "".join(f"{key} = {toml_value(value)}\n" for key, value in body.items())
    return f"{header}\n{lines}\n"


@dataclass
class AgentToml:
    """The agent's config for one test, table by table (``None``: the table is left out).

    ``token`` is the text of the static Stora token file written beside the config
    (:attr:`token_file`, mode 0600) when ``[stora] token_file`` names that file;
    ``extra`` is raw TOML appended at the end (whole tables with their headers, such as a
    driver harness's ``[[controllers]]``).
    """

    directory: Path
    site: Table = field(default_factory=lambda: {"id": SITE, "app_name": "TestGate"})
    mqtt: Table | None = field(default_factory=lambda: {"host": "127.0.0.1"})
    commands: Table | None = field(
        default_factory=lambda: {"trusted_keys": {"k": "A" * 43}})
    stora: Table | None = None
    storage: Table | None = None
    control: Table | None = None
    controllers: Sequence[Table] = ()
    locks: Sequence[Table] = ()
    extra: str = ""
    token: str = f"{STORA_TOKEN}\n"

    @property
    def token_file(self) -> Path:
        """Where the static token is written."""
        return self.directory / "token"

    @classmethod
    def for_site(cls, directory: Path, broker: BrokerAddress, public_key: str, *,
                 client_id: str = "agent-under-test", app_name: str = "TestGate",
                 stora_url: str = NO_STORA_URL) -> AgentToml:
        """The simulated site's agent: ``broker``, ``public_key`` trusted as ``test-2026``,
        Stora at ``stora_url`` (none by default) with the static test token, state under
        ``directory / "state"`` and the control socket under ``directory / "run"``."""
        return cls(
            directory,
            site={"id": SITE, "app_name": app_name},
            mqtt={"host": broker.host, "port": broker.port, "client_id": client_id,
                  "keepalive_s": 5},
            commands={"trusted_keys": {"test-2026": public_key}, "clock": "system"},
            stora={"base_url": stora_url, "auth": "static",
                   "token_file": directory / "token", "timeline_source_id": "tsrc_test"},
            storage={"path": directory / "state" / "gateway.db"},
            control={"socket": directory / "run" / "control.sock"},
        )

    def text(self) -> str:
        """The config as TOML."""
        out = [_table("[site]", self.site)]
        for name in ("mqtt", "commands", "stora", "storage", "control"):
            body: Table | None = getattr(self, name)
            if body is not None:
                out.append(_table(f"[{name}]", body))
        out += [_table("[[controllers]]", controller) for controller in self.controllers]
        out += [_table("[[locks]]", lock) for lock in self.locks]
        return "".join(out) + self.extra

    def write(self, name: str = "gateway.toml") -> Path:
        """Write the config (and the token file it names) into :attr:`directory`."""
        if isinstance(self.stora, Mapping) and self.stora.get("token_file") == self.token_file:
            self.token_file.write_text(self.token)
            self.token_file.chmod(0o600)
        path = self.directory / name
        path.write_text(self.text())
        return path
