"""deploy/'s Mosquitto configs as a test runs them: the shipped text, this test's paths.

Each ``*_broker_conf`` takes the file as it ships and replaces only the lines that name
a place on a real install (socket, port, password and ACL files, certificates, the
cloud's address); every replaced line must exist exactly once, so a renamed setting
fails here rather than being silently tested as something else.  The first lines of the
result stand in for what Debian's main ``/etc/mosquitto/mosquitto.conf`` sets before it
includes ``conf.d/``.  :func:`shipped_broker` wraps one in a :class:`Broker` for its
lifecycle (start, kill, restart, logs).
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from devkit.mosquitto import Broker
from devkit.tls_files import TlsFiles

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
ACL = DEPLOY / "mosquitto" / "acl"
SITE_BROKER_CONF = DEPLOY / "mosquitto" / "site-broker.conf"
CLOUD_BROKER_CONF = DEPLOY / "mosquitto" / "cloud-broker.conf"
#: Where the site broker's socket is on a real install (site-broker.conf).
SHIPPED_SOCKET = "/run/stora-mqtt/mqtt.sock"
#: The setting that binds client ids to accounts; :func:`without_id_binding` removes it.
ID_BINDING = "use_username_as_clientid true"
_BRIDGE_SECTION = "# --- bridge to the cloud broker"


def hashed_passwd(path: Path, users: Mapping[str, str]) -> Path:
    """A Mosquitto password file at ``path`` for ``users`` (name -> password)."""
    path.write_text("".join(f"{user}:{password}\n" for user, password in users.items()))
    path.chmod(0o600)
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    subprocess.run([tool, "-U", str(path)], check=True, capture_output=True)
    return path


def _replace_lines(text: str, replacements: Mapping[str, str], name: str) -> str:
    for old, new in replacements.items():
        assert text.count(f"\n{old}\n") == 1, f"{name} has no line {old!r}"
        text = text.replace(f"\n{old}\n", f"\n{new}\n")
    return text


def _debian_main(directory: Path, log_path: Path) -> str:
    return "\n".join([
        # Started as root, mosquitto would drop to user "mosquitto", who cannot write
        # the test's directory; as anyone else this line is ignored.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        f"persistence_location {directory}/",
        f"log_dest file {log_path}",
        "log_type all",
    ]) + "\n"


def without_id_binding(text: str) -> str:
    """A config as it was before client ids were bound to accounts (the negative
    control of the takeover probes)."""
    lines = [line for line in text.splitlines() if line.strip() != ID_BINDING]
    assert len(lines) < len(text.splitlines()), f"no {ID_BINDING!r} line to remove"
    return "\n".join(lines) + "\n"


def site_broker_conf(*, socket_path: Path, password_file: Path, directory: Path,
                     log_path: Path, text: str | None = None, cloud_port: int | None = None,
                     cloud_ca: Path | None = None, bridge_password: str = "") -> str:
    """deploy/mosquitto/site-broker.conf (or ``text``) with this test's socket and files;
    without ``cloud_port`` the bridge section is left out."""
    text = SITE_BROKER_CONF.read_text() if text is None else text
    replacements = {
        f"listener 0 {SHIPPED_SOCKET}": f"listener 0 {socket_path}",
        "password_file /etc/mosquitto/stora-gateway/passwd": f"password_file {password_file}",
        "acl_file /etc/mosquitto/stora-gateway/acl": f"acl_file {ACL}",
    }
    if cloud_port is None:
        assert text.count(_BRIDGE_SECTION) == 1, "site-broker.conf has no bridge section"
        text = text.split(_BRIDGE_SECTION)[0]
    else:
        replacements |= {
            "address mqtt.example.com:8883": f"address 127.0.0.1:{cloud_port}",
            "bridge_cafile /etc/mosquitto/stora-gateway/cloud-ca.pem":
                f"bridge_cafile {cloud_ca}",
            "remote_password CHANGE-ME": f"remote_password {bridge_password}",
        }
    return _debian_main(directory, log_path) + _replace_lines(text, replacements,
                                                              "site-broker.conf")


def cloud_broker_conf(*, port: int, password_file: Path, tls: TlsFiles, directory: Path,
                      log_path: Path, text: str | None = None) -> str:
    """deploy/mosquitto/cloud-broker.conf (or ``text``) on 127.0.0.1:``port``."""
    text = CLOUD_BROKER_CONF.read_text() if text is None else text
    replacements = {
        "listener 8883": f"listener {port} 127.0.0.1",
        "password_file /etc/mosquitto/stora-cloud/passwd": f"password_file {password_file}",
        "acl_file /etc/mosquitto/stora-cloud/acl": f"acl_file {ACL}",
        "certfile /etc/mosquitto/stora-cloud/cloud-broker.pem": f"certfile {tls.server_cert}",
        "keyfile /etc/mosquitto/stora-cloud/cloud-broker.key": f"keyfile {tls.server_key}",
    }
    return _debian_main(directory, log_path) + _replace_lines(text, replacements,
                                                              "cloud-broker.conf")


def shipped_broker(directory: Path, users: Mapping[str, str], *, cloud: bool = False,
                   tls: TlsFiles | None = None, text: str | None = None,
                   **bridge: object) -> Broker:
    """A :class:`Broker` (not started) running the site broker's config (or, with
    ``cloud``, the cloud broker's) with ``users`` as its accounts.  ``bridge`` passes
    ``cloud_port``, ``cloud_ca`` and ``bridge_password`` on to :func:`site_broker_conf`."""
    broker = Broker(directory, unix_socket=not cloud)
    passwd = hashed_passwd(directory / "passwd", users)
    if cloud:
        assert tls is not None
        conf = cloud_broker_conf(port=broker.port, password_file=passwd, tls=tls,
                                 directory=broker.directory, log_path=broker.log_path,
                                 text=text)
    else:
        assert broker.socket_path is not None
        conf = site_broker_conf(socket_path=broker.socket_path, password_file=passwd,
                                directory=broker.directory, log_path=broker.log_path,
                                text=text, **bridge)  # type: ignore[arg-type]
    broker.conf_path.write_text(conf)
    return broker
