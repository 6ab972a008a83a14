"""Helpers of the remote-management tests (tests/gateway/intake/test_mgmt*.py): the site and its
client, signed requests and their answers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from devkit.broker_client import Client
from devkit.signer import CommandSigner
from devkit.site import PREFIX, SimSite


def make_client(site: SimSite) -> Client:
    c = site.client()
    c.subscribe(f"{PREFIX}/mgmt/result")
    return c


def ask(site: SimSite, client: Client, cmd: str, *, signer: CommandSigner | None = None,
        retain: bool = False, **claims: Any) -> str:
    """Send one signed management request; its jti."""
    jti, token = (signer or site.signer).command(cmd, **claims)
    client.publish(f"{PREFIX}/mgmt", token, qos=1, retain=retain)
    return jti


def answer(client: Client, jti: str, timeout: float = 10.0, count: int = 1) -> dict[str, Any]:
    msgs = client.expect(f"{PREFIX}/mgmt/result", timeout, count=count,
                         where=lambda m: json.loads(m.payload).get("jti") == jti)
    return json.loads(msgs[count - 1].payload)  # type: ignore[no-any-return]


def command_result(client: Client, jti: str, timeout: float = 10.0) -> dict[str, Any]:
    msgs = client.expect(f"{PREFIX}/cmd/result", timeout,
                         where=lambda m: json.loads(m.payload).get("jti") == jti)
    return json.loads(msgs[0].payload)  # type: ignore[no-any-return]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
