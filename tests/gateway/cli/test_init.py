"""``stora-gateway init``: from nothing to a config that passes ``check-config`` (issue 12).

Through the real CLI (subprocesses, and a pseudo-terminal for the questions): flags for
each driver, the questions on a terminal, and the refusals (an existing file or link
target, a wrong value, missing flags without a terminal), each with nothing written.
"""

from __future__ import annotations

import base64
import io
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest

from gateway.cli.main import main
from tests.support.cli_process import ROOT, cli_argv, cli_env, run_cli

KEY = base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"=").decode()
RELAY_URL = "https://relay.example.com/stora/2025-09"
#: A question appears within milliseconds; this covers a loaded CI box.
PROMPT_TIMEOUT_S = 20.0

BASE_FLAGS = ["--site-id", "site_init", "--app-name", "YourApp",
              "--relay-key", f"relay-2026={KEY}", "--stora-url", RELAY_URL,
              "--timeline-source-id", "tsrc_init", "--no-input"]
DRIVER_FLAGS = {
    "modbus": ["--driver", "modbus", "--port", "/dev/serial/by-id/usb-FTDI_test-if00-port0",
               "--lock", "unit_a1=A-1", "--lock", "unit_a2=A-2@5", "--lock", "unit_a3=A-3"],
    "lockboard": ["--driver", "lockboard", "--port", "socket://10.0.0.7:4001",
                  "--address", "3", "--lock", "unit_b1=B-1@15"],
    "osdp": ["--driver", "osdp", "--port", "/dev/ttyUSB3", "--lock", "unit_d1=D-1"],
    "zigbee2mqtt": ["--driver", "zigbee2mqtt", "--lock", "unit_z1=Z-1@front/door lock"],
    "tasmota": ["--driver", "tasmota", "--topic", "gate_relay", "--lock", "unit_g1=GATE"],
}


def put_secrets(stdout: str) -> list[Path]:
    """Create each secret file ``init`` says is still missing (mode 0600)."""
    made = []
    for path in re.findall(r"secret file (\S+) does not exist", stdout):
        secret = Path(path)
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text("placeholder\n")
        secret.chmod(0o600)
        made.append(secret)
    return made


@pytest.mark.parametrize("driver", sorted(DRIVER_FLAGS))
def test_init_then_check_config_passes(tmp_path: Path, driver: str) -> None:
    config = tmp_path / "gateway.toml"
    done = run_cli("init", "--config", str(config), *BASE_FLAGS, *DRIVER_FLAGS[driver])
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert f"wrote {config} (mode 0640)" in done.stdout
    assert config.stat().st_mode & 0o777 == 0o640
    secrets = put_secrets(done.stdout)
    # deploy/'s layout: the broker account and the relay credential, and per driver
    # the device link's account or the PD's key, all under secrets/.
    assert {s.parent for s in secrets} == {tmp_path / "secrets"}
    assert tmp_path / "secrets" / "stora-token" in secrets
    checked = run_cli("check-config", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "OK — site site_init, 1 controller" in checked.stdout


def test_init_writes_what_it_was_told(tmp_path: Path) -> None:
    import tomllib

    config = tmp_path / "gateway.toml"
    status = main(["init", "--config", str(config), *BASE_FLAGS, *DRIVER_FLAGS["modbus"],
                   "--broker-host", "10.0.0.2", "--broker-port", "8883", "--broker-user", ""],
                  out=io.StringIO(), err=io.StringIO())
    assert status == 0
    data = tomllib.loads(config.read_text())
    assert data["site"] == {"id": "site_init", "app_name": "YourApp"}
    assert data["mqtt"] == {"host": "10.0.0.2", "port": 8883}
    assert data["commands"]["trusted_keys"] == {"relay-2026": KEY}
    assert data["stora"] == {"base_url": RELAY_URL, "auth": "broker",
                             "token_file": "secrets/stora-token",
                             "timeline_source_id": "tsrc_init"}
    assert [(lock["unit"], lock["reference"], lock["channel"]) for lock in data["locks"]] == [
        ("unit_a1", "A-1", 0), ("unit_a2", "A-2", 5), ("unit_a3", "A-3", 6)]


def test_init_never_overwrites(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("# the site's real config\n")
    done = run_cli("init", "--config", str(config), *BASE_FLAGS, *DRIVER_FLAGS["modbus"])
    assert done.returncode == 2
    assert done.stderr == (f"stora-gateway: {config} already exists; init never overwrites "
                           "a config: move it away or pick another --config\n")
    assert config.read_text() == "# the site's real config\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.toml"]


def test_init_writes_through_deploys_link_but_never_over_its_target(tmp_path: Path) -> None:
    """deploy/install.sh makes /etc/stora-gateway/gateway.toml a link to
    config/gateway.toml before there is a config: init creates the target, and relative
    paths resolve against the link's directory, as the agent resolves them."""
    (tmp_path / "config").mkdir()
    link = tmp_path / "gateway.toml"
    link.symlink_to("config/gateway.toml")
    done = run_cli("init", "--config", str(link), *BASE_FLAGS, *DRIVER_FLAGS["modbus"])
    assert done.returncode == 0, done.stderr
    target = tmp_path / "config" / "gateway.toml"
    assert target.is_file()
    assert link.is_symlink()
    assert f"secret file {tmp_path}/secrets/stora-token does not exist" in done.stdout
    again = run_cli("init", "--config", str(link), *BASE_FLAGS, *DRIVER_FLAGS["modbus"])
    assert again.returncode == 2
    assert "already exists (a link to" in again.stderr


def test_init_refuses_a_wrong_value_and_writes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    flags = [f if f != "tsrc_init" else "src_init" for f in BASE_FLAGS]
    flags = [f if f != "site_init" else "init" for f in flags]
    done = run_cli("init", "--config", str(config), *flags, *DRIVER_FLAGS["modbus"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"stora-gateway: {config}: site.id: must be a Stora site id starting with 'site_', "
        "found string 'init'",
        f"stora-gateway: {config}: stora.timeline_source_id: must be a Stora timeline source "
        "id starting with 'tsrc_', found string 'src_init'",
        f"stora-gateway: nothing was written to {config}",
    ]
    assert list(tmp_path.iterdir()) == []


def test_init_without_a_terminal_names_what_is_missing(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    done = run_cli("init", "--config", str(config), "--site-id", "site_x")
    assert done.returncode == 2
    assert done.stderr == (
        "stora-gateway: init needs --app-name, --driver, --relay-key, --timeline-source-id, "
        "--stora-url, --lock (or run it on a terminal to be asked); nothing was written\n")
    assert not config.exists()


def test_init_refuses_a_malformed_lock(tmp_path: Path) -> None:
    status = main(["init", "--config", str(tmp_path / "g.toml"), *BASE_FLAGS,
                   "--driver", "modbus", "--port", "/dev/ttyUSB0", "--lock", "unit_a1"],
                  out=io.StringIO(), err=(err := io.StringIO()))
    assert status == 2
    assert err.getvalue() == ("stora-gateway: --lock 'unit_a1': expected UNIT=REFERENCE or "
                              "UNIT=REFERENCE@CHANNEL, e.g. unit_abc=A-101@0\n")


class Terminal:
    """The CLI on a pseudo-terminal: wait for each question, then answer it."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(cli_argv(*args), stdin=slave, stderr=slave,
                                     stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=cli_env())
        os.close(slave)
        self.seen = ""

    def expect(self, text: str) -> None:
        """Read the terminal until ``text`` appears (and consume up to it)."""
        deadline = time.monotonic() + PROMPT_TIMEOUT_S
        while text not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {text!r} on the terminal; it shows:\n{self.seen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the process closed the terminal
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the process ended before {text!r}:\n{self.seen}")
                self.seen += chunk.decode("utf-8", "replace")
        self.seen = self.seen[self.seen.index(text) + len(text):]

    def answer(self, question: str, line: str) -> None:
        self.expect(question)
        os.write(self.master, line.encode() + b"\n")

    def finish(self) -> tuple[int, str]:
        """The exit status and stdout."""
        try:
            out, _ = self.proc.communicate(timeout=PROMPT_TIMEOUT_S)
        finally:
            os.close(self.master)
        return self.proc.returncode, out


def test_init_asks_on_a_terminal_and_asks_again_when_wrong(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    term = Terminal("init", "--config", str(config))
    try:
        term.answer("Stora site id", "not-a-site")
        term.expect("a Stora site id starts with 'site_'")
        term.answer("Stora site id", "site_pty")
        term.answer("Your product name", "PtyApp")
        term.answer("Controller driver", "")  # the default: modbus
        term.answer("Serial port", "/dev/serial/by-id/usb-FTDI_pty-if00-port0")
        term.answer("bus address [1]", "")
        term.answer("How many locks", "2")
        term.answer("Lock 1: Stora unit id", "p1")
        term.expect("a Stora unit id starts with 'unit_'")
        term.answer("Lock 1: Stora unit id", "unit_p1")
        term.answer("Lock 1: the label on its door", "P-1")
        term.answer("Lock 1: its channel", "")  # the default: 0
        term.answer("Lock 2: Stora unit id", "unit_p2")
        term.answer("Lock 2: the label on its door", "P-2")
        term.answer("Lock 2: its channel", "3")
        term.answer("The site broker", "")  # deploy/'s socket
        term.answer("The agent's broker account", "-")  # none
        term.answer("The relay's command key", "relay-1=tooshort")
        term.expect("decodes to")
        term.answer("The relay's command key", f"relay-1={KEY}")
        term.answer("The relay's Timeline URL", RELAY_URL)
        term.answer("Timeline source id", "tsrc_pty")
    finally:
        status, out = term.finish()
    assert status == 0, term.seen
    assert f"wrote {config} (mode 0640)" in out
    put_secrets(out)
    checked = run_cli("check-config", "--json", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert '"locks": 2' in checked.stdout
    assert 'channel = 3' in config.read_text()


def test_init_says_at_once_when_it_cannot_write_there(tmp_path: Path) -> None:
    """Before any question: a missing directory is one sentence, exit 2."""
    config = tmp_path / "missing" / "gateway.toml"
    err = io.StringIO()
    assert main(["init", "--config", str(config)], out=io.StringIO(), err=err) == 2
    assert err.getvalue() == (f"stora-gateway: directory {config.parent} does not exist; "
                              "create it first (deploy/install.sh makes "
                              "/etc/stora-gateway/config)\n")


#: An id no account here has: the directory's owner may have no name at all.
NAMELESS_UID = 64_123


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may write in another's directory")
@pytest.mark.parametrize("owner", ["nobody", NAMELESS_UID])
def test_root_never_writes_a_config_into_another_users_directory(
        tmp_path: Path, owner: str | int) -> None:
    """``sudo stora-gateway init`` through deploy/'s link would leave a root:root 0640
    file in the agent's config/, which the agent cannot read: refused, exit 2, with the
    command to run instead, and nothing written."""
    import pwd

    uid = pwd.getpwnam(owner).pw_uid if isinstance(owner, str) else owner
    config_dir = tmp_path / "config"
    config_dir.mkdir(mode=0o750)
    os.chown(config_dir, uid, uid)
    link = tmp_path / "gateway.toml"
    link.symlink_to("config/gateway.toml")
    done = run_cli("init", "--config", str(link), *BASE_FLAGS, *DRIVER_FLAGS["modbus"])
    assert done.returncode == 2
    if isinstance(owner, str):
        assert done.stderr == (
            f"stora-gateway: {config_dir} belongs to user {owner}, not root; a config root "
            "wrote there would be unreadable to its owner: run init as that user instead, "
            f"with the same options: sudo runuser -u {owner} -- stora-gateway init …\n")
    else:
        assert done.stderr == (
            f"stora-gateway: {config_dir} belongs to uid {uid}, not root; a config root "
            "wrote there would be unreadable to its owner: run init as that user instead\n")
    assert done.stdout == ""
    assert list(config_dir.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config", "gateway.toml"]
