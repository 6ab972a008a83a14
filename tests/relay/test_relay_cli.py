"""``stora-relay``'s commands (contract §7.1), in process and as a console script."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devkit.relay_process import RelayProcess
from relay.cli.main import main
from relay.config import load_config
from relay.crypto import Keyring, generate_key_text
from relay.db.engine import Database
from relay.operators import Operators, StoraSite
from relay.sites import SiteRegistry
from relay.stora import TokenSet
from tests.support.relay import stored_bytes, write_relay_config

ROOT = Path(__file__).resolve().parents[2]


def run(config: Path, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main([*argv, "--config", str(config)], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_relay_config(tmp_path / "relay")


@contextmanager
def database(config: Path) -> Iterator[Database]:
    """The relay's database, closed after the block."""
    db = Database(load_config(config).database.url)
    try:
        yield db
    finally:
        db.close()


def connect_operator(config: Path, *sites: str) -> str:
    cfg = load_config(config)
    run(config, "db", "upgrade")
    with database(config) as db:
        operators = Operators(db, Keyring.from_file(cfg.secrets.data_key_file))
        tokens = TokenSet("at-1", "rt-1", 7200, "public.site:read", 0)
        return operators.connect(tokens, [StoraSite(s, f"Site {s}") for s in sites])


def test_check_config_and_db_upgrade(config: Path, relay_backend: str) -> None:
    status, out, _ = run(config, "check-config")
    assert status == 0
    assert f": OK (database {relay_backend}, 1 data key(s)" in out
    assert run(config, "db", "upgrade")[1].startswith("applied 0001")
    assert run(config, "db", "upgrade")[1] == "already up to date\n"


def test_a_bad_config_is_one_line_per_problem_and_exit_2(config: Path) -> None:
    config.write_text(config.read_text().replace('app_name = "TestEntry"', "app_nam = 1"))
    status, out, err = run(config, "operators", "list")
    assert status == 2
    assert out == ""
    assert "relay.app_nam: unknown key" in err
    assert "Traceback" not in err


def test_keys_rotate_keeps_old_keys_published_until_retired(config: Path) -> None:
    _, out, _ = run(config, "keys", "rotate", "--json")
    first = json.loads(out)["kid"]
    run(config, "keys", "rotate")
    status, out, _ = run(config, "keys", "list", "--json")
    keys = json.loads(out)
    assert status == 0
    assert next(k["kid"] for k in keys) == first
    assert len(keys) == 2
    status, out, _ = run(config, "keys", "list")
    line = out.splitlines()[-1]
    assert line.startswith("trusted_keys = {")
    assert first in line
    parsed = tomllib.loads(line)["trusted_keys"]  # the gateway's format, as TOML
    assert set(parsed) == {k["kid"] for k in keys}
    status, _, err = run(config, "keys", "retire", keys[1]["kid"])
    assert status == 1
    assert "is the key that signs now: rotate first" in err
    assert run(config, "keys", "retire", first)[0] == 0
    _, out, _ = run(config, "keys", "list")
    assert first not in out.splitlines()[-1]


def test_sites_add_prints_the_credential_once_and_stores_a_digest(config: Path) -> None:
    op = connect_operator(config, "site_a1", "site_b2")
    status, out, err = run(config, "sites", "add", "site_a1", "--operator", op,
                           "--timezone", "Europe/London", "--shared", "unit_gate")
    assert status == 0, err
    credential = next(w for w in out.split() if w.startswith("sgw_"))
    assert 'auth = "broker"' in out
    assert "/stora/2025-09" in out
    assert "trusted_keys" in out
    with database(config) as db:
        assert b"site_a1" in stored_bytes(db)
        assert credential.encode() not in stored_bytes(db)
        registry = SiteRegistry(db)
        found = registry.authenticate(credential)
        assert found is not None
        assert found.site_id == "site_a1"
        assert found.shared_units == ("unit_gate",)
        assert found.timezone == "Europe/London"
        assert registry.authenticate(
            credential[:-1] + ("A" if credential[-1] != "A" else "B")) is None
        status, _, err = run(config, "sites", "add", "site_a1", "--operator", op)
        assert status == 1
        assert "already registered" in err
        _, out, _ = run(config, "sites", "list", "--json")
        assert json.loads(out)[0]["gateway"] == "never seen"
        assert run(config, "sites", "revoke", "site_a1")[0] == 0
        assert registry.authenticate(credential) is None
    _, out, _ = run(config, "operators", "list", "--json")
    assert json.loads(out)[0]["sites"] == ["site_a1", "site_b2"]


@pytest.mark.parametrize(("argv", "message"), [
    (["sites", "add", "site_x", "--operator", "op_nobody"], "no operator 'op_nobody'"),
    (["sites", "add", "site_x", "--operator", "{op}"],
     "Stora did not list site site_x for operator"),
    (["sites", "add", "site_a1", "--operator", "{op}", "--timezone", "Mars/Olympus"],
     "unknown time zone 'Mars/Olympus'"),
    (["sites", "set", "site_nope", "--timezone", "UTC"], "no site 'site_nope'"),
    (["api-keys", "create", "--operator", "{op}", "--name", "tenant app"],
     "role app is not available yet"),
    (["api-keys", "create", "--operator", "{op}", "--name", " ", "--role", "staff"],
     "--name must be"),
    (["api-keys", "revoke", "srk_nope"], "no API key 'srk_nope'"),
])
def test_mistakes_are_one_line_and_exit_1(config: Path, argv: list[str], message: str) -> None:
    op = connect_operator(config, "site_a1")
    status, out, err = run(config, *[a.replace("{op}", op) for a in argv])
    assert status == 1
    assert out == ""
    assert message in err
    assert err.count("\n") == 1


def test_staff_api_keys_are_created_listed_and_revoked(config: Path) -> None:
    op = connect_operator(config, "site_a1")
    status, out, _ = run(config, "api-keys", "create", "--operator", op, "--name", "front desk",
                         "--role", "staff", "--json")
    created = json.loads(out)
    assert status == 0
    assert created["key"].startswith("srk_")
    assert created["role"] == "staff"
    _, out, _ = run(config, "api-keys", "list", "--json")
    listed = json.loads(out)
    assert [k["id"] for k in listed] == [created["id"]]
    assert "key" not in listed[0]
    assert run(config, "api-keys", "revoke", created["id"])[0] == 0
    _, out, _ = run(config, "api-keys", "list", "--json")
    assert json.loads(out)[0]["revoked_at"] is not None


def test_an_admin_key_belongs_to_no_operator(config: Path) -> None:
    op = connect_operator(config, "site_a1")
    status, out, _ = run(config, "api-keys", "create", "--role", "admin", "--name", "support")
    assert status == 0
    assert "(admin) for the staff pages, shown only now:" in out
    status, _, err = run(config, "api-keys", "create", "--role", "admin", "--name", "x",
                         "--operator", op)
    assert (status, err) == (1, "stora-relay: an admin key belongs to no operator (leave "
                                "out --operator)\n")
    status, _, err = run(config, "api-keys", "create", "--role", "staff", "--name", "x")
    assert (status, err) == (1, "stora-relay: a staff key needs --operator\n")
    _, out, _ = run(config, "api-keys", "list")
    assert " -  " in out.splitlines()[1]  # no operator
    assert "admin" in out


def test_only_run_loads_the_web_framework() -> None:
    code = ("import sys, io\nfrom relay.cli.main import main\n"
            "main(['--help'], out=io.StringIO())\n"
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'aiomqtt', 'jinja2')"
            " if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


def test_the_console_script_is_installed(config: Path) -> None:
    script = Path(sys.executable).with_name("stora-relay")
    done = subprocess.run([str(script), "check-config", "--config", str(config)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


def test_a_rotated_data_key_can_be_retired_after_db_reencrypt(config: Path) -> None:
    """Rotate: the new key first, the old one kept; re-encrypt; drop the old line; every
    stored secret still decrypts, and is the same."""
    op = connect_operator(config, "site_a1")
    run(config, "keys", "rotate")
    cfg = load_config(config)
    key_file = cfg.secrets.data_key_file
    old = key_file.read_text().strip()
    with database(config) as db:
        before = Operators(db, Keyring.from_file(key_file)).access_token(op)
    new = generate_key_text()
    key_file.write_text(f"{new}\n{old}\n")
    status, out, _ = run(config, "db", "reencrypt")
    assert status == 0, out
    assert "1 access_token" in out
    assert "1 refresh_token" in out
    assert "1 signing_key" in out
    assert out.rstrip().endswith("0 value(s) still under an older key")
    key_file.write_text(f"{new}\n")  # the old key's line goes
    keyring = Keyring.from_file(key_file)
    assert keyring.kids == (keyring.current_kid,)
    with database(config) as db:
        assert Operators(db, keyring).access_token(op) == before
    assert run(config, "keys", "list")[0] == 0  # the signing key decrypts too (on use)
    status, out, _ = run(config, "sites", "add", "site_a1", "--operator", op)
    assert status == 0, out


def test_db_reencrypt_says_when_a_key_is_missing(config: Path) -> None:
    op = connect_operator(config, "site_a1")
    cfg = load_config(config)
    cfg.secrets.data_key_file.write_text(generate_key_text() + "\n")  # the old key lost
    status, out, err = run(config, "db", "reencrypt")
    assert status == 1
    assert out == ""
    assert "decrypt" in err.lower()
    assert op


def test_run_stops_cleanly_on_sigterm(config: Path, tmp_path: Path,
                                     relay_backend: str) -> None:
    """systemd's stop: a graceful shutdown, the clean-up, exit status 0; and on SQLite a
    second `run` on the same file is refused while the first one runs (PostgreSQL takes
    replicas)."""
    cfg = load_config(config)
    with RelayProcess(config, port=cfg.relay.listen_port, log=tmp_path / "relay.log") as relay:
        if relay_backend == "sqlite":
            second = subprocess.run([str(Path(sys.executable).with_name("stora-relay")),
                                     "run", "--config", str(config)], capture_output=True,
                                    text=True, check=False, timeout=60)
            assert second.returncode == 1
            assert f"another stora-relay process (pid {relay.pid}) is running on" \
                in second.stderr
        assert relay.terminate() == 0
        assert "stora-relay stopped (SIGTERM)" in relay.log_text()


def test_a_database_that_cannot_be_opened_is_one_line_not_a_traceback(
        tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the database's directory should be\n")
    config = write_relay_config(tmp_path / "relay",
                                database=f"sqlite:///{blocked / 'relay.db'}")
    status, out, err = run(config, "operators", "list")
    assert status == 1
    assert out == ""
    assert err.startswith("stora-relay: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert "run with --debug for details" in err
