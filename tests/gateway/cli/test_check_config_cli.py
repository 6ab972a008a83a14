"""``stora-gateway check-config [--online]`` as an installer runs it (issue 12, items 2, 3).

Through the real CLI: a subprocess for the acceptance cases, ``main([...])`` for the
rest.  Offline, every problem of a file comes back in one run; online, the credential
and the timeline source are tried against the sandbox (a real HTTP server), with the
ways they fail told apart.  Also here: the shipped example config and the shipped docs,
checked against what the loader knows, so a new key without an example or a reference
fails.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from devkit.sandbox import Sandbox
from devkit.testing import AgentToml, TomlValue
from gateway.cli.main import main
from gateway.config import known_keys
from tests.support.cli_process import run_cli
from tests.support.config import RAW_KEY_B64, VALID_TOML, write_config

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "deploy" / "gateway.example.toml"
CLIENT_ID, SECRET = "client-1", "s3cr3t"
SOURCE = "tsrc_yourapp"


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- offline

THREE_MISTAKES = (
    VALID_TOML.replace('timeline_source_id = "tsrc_1"', 'timeline_source_id = "src_1"')
    .replace("address = 3", "address = 300")
    .replace('energize_to = "lock"', 'energize_to = "open"')
)
THREE_KEYS = ["stora.timeline_source_id", "controllers[0].address", "locks[1].energize_to"]


def test_three_mistakes_are_three_lines_in_one_run(tmp_path: Path) -> None:
    path = write_config(tmp_path, THREE_MISTAKES)
    done = run_cli("check-config", "--config", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert [line.split(": ")[2] for line in lines] == THREE_KEYS, done.stderr
    assert all(line.startswith(f"stora-gateway: {path}: ") for line in lines)
    assert "must be a Stora timeline source id starting with 'tsrc_'" in lines[0]
    assert "Traceback" not in done.stderr


def test_three_mistakes_are_listed_in_json(tmp_path: Path) -> None:
    path = write_config(tmp_path, THREE_MISTAKES)
    done = run_cli("check-config", "--json", "--config", str(path))
    assert done.returncode == 2
    doc = json.loads(done.stdout)
    assert doc["ok"] is False
    assert [e["key"] for e in doc["errors"]] == THREE_KEYS
    assert all(e["file"] == str(path) for e in doc["errors"])
    # The first problem stays at the top, for scripts written before the list.
    assert (doc["key"], doc["reason"]) == (THREE_KEYS[0], doc["errors"][0]["reason"])


def test_a_timeline_source_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    """Issue 12: a config Stora refuses (every event dead-lettered) passed check-config."""
    path = write_config(tmp_path, VALID_TOML.replace('timeline_source_id = "tsrc_1"',
                                                     'timeline_source_id = "src_1"'))
    done = run_cli("check-config", "--config", str(path))
    assert done.returncode == 2
    assert done.stderr == (f"stora-gateway: {path}: stora.timeline_source_id: must be a Stora "
                           "timeline source id starting with 'tsrc_', found string 'src_1'\n")


def test_a_valid_config_says_ok_with_plurals(tmp_path: Path) -> None:
    status, out, err = cli("check-config", "--config", str(write_config(tmp_path)))
    assert (status, err) == (0, "")
    assert out.endswith("OK — site site_123, 2 controllers, 3 locks\n")


# --------------------------------------------------------------------------- the example


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The shipped example, copied with placeholder files for the secrets it names."""
    config = tmp_path / "gateway.toml"
    shutil.copy(EXAMPLE, config)
    data = tomllib.loads(config.read_text())
    named = [data["mqtt"]["password_file"], data["stora"]["token_file"]]
    for name in named:
        secret = tmp_path / name
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_text("placeholder\n")
        secret.chmod(0o600)
    return config


def test_the_shipped_example_passes_check_config(example: Path) -> None:
    done = run_cli("check-config", "--config", str(example))
    assert done.returncode == 0, done.stderr
    assert "OK — site site_EXAMPLE, 1 controller, 2 locks" in done.stdout


def _blocks(text: str) -> list[tuple[str, dict[str, str]]]:
    """(section, {key: value}) for each table of a commented TOML file, commented-out
    tables and keys included."""
    blocks: list[tuple[str, dict[str, str]]] = [("", {})]
    for raw in text.splitlines():
        line = raw.strip().removeprefix("#").strip()
        header = re.fullmatch(r"\[\[?([a-z_.]+)\]\]?", line)
        if header:
            blocks.append((header.group(1), {}))
            continue
        key = re.match(r"([a-z_][a-z0-9_]*)\s*=\s*(.*)", line)
        if key:
            blocks[-1][1].setdefault(key.group(1), key.group(2))
    return blocks


def test_the_example_shows_every_key_the_loader_knows() -> None:
    """Derived from the loader: a key added to it without an example here fails."""
    blocks = _blocks(EXAMPLE.read_text())
    shown: dict[str, set[str]] = {}
    for table, keys in blocks:
        driver = keys.get("driver", "").strip('"')
        section = f"controllers.{driver}" if table == "controllers" else table
        shown.setdefault(section, set()).update(keys)
    for section, keys in known_keys().items():
        missing = sorted(keys - shown.get(section, set()))
        assert not missing, f"deploy/gateway.example.toml lacks [{section}] {missing}"


def test_the_configuration_reference_documents_every_key() -> None:
    """docs/configuration.md has a table row per key, in the section of its table."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    for section, keys in known_keys().items():
        table, _, driver = section.partition(".")
        heading = f"## `[[{table}]]`" if table in ("controllers", "locks") else \
            f"## `[{table}]`"
        assert heading in doc, heading
        part = doc.split(heading, 1)[1].split("\n## ", 1)[0]
        for key in keys:
            assert f"| `{key}` |" in part, f"docs/configuration.md: {section}.{key}"
        if driver:
            specific = part.split(f"### `{driver}`", 1)
            assert len(specific) == 2, f"docs/configuration.md lacks ### `{driver}`"


#: The shipped docs must stand on their own (issue 12): none of them may send a reader to
#: the development tree's files, which do not ship.  Every text a user reads: the
#: READMEs and references, and all of deploy/ (its README, the example config, the
#: install script's messages, the unit's and the brokers' comments), found by listing
#: so that a file added there is checked too.
SHIPPED_DOCS = sorted({"README.md", "hardware.md",
                       *(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")),
                       *(p.relative_to(ROOT).as_posix() for p in (ROOT / "deploy").rglob("*")
                         if p.is_file() and "__pycache__" not in p.parts)})
#: What only the development tree has: its files, and the contract and fault matrix in
#: them, however a sentence names them.
NOT_SHIPPED = (r"\.\./shared", r"contract\.md", r"stora-api\.md", r"fault[ -]matrix",
               r"\bcontract( §|'s\b)", r"\bthe contract\b")


def test_shipped_docs_include_deploy() -> None:
    assert {"deploy/README.md", "deploy/install.sh", "deploy/gateway.example.toml",
            "deploy/systemd/stora-gateway.service", "deploy/mosquitto/acl",
            "deploy/mosquitto/site-broker.conf", "docs/configuration.md"} <= set(SHIPPED_DOCS)


@pytest.mark.parametrize("name", SHIPPED_DOCS)
def test_shipped_docs_refer_to_nothing_that_does_not_ship(name: str) -> None:
    text = (ROOT / name).read_text()
    for pattern in NOT_SHIPPED:
        found = re.search(pattern, text, re.IGNORECASE)
        assert found is None, f"{name} refers to {found.group()!r}, which does not ship"
    for target in re.findall(r"\]\(([^)#]+)", text):
        if "://" not in target:
            assert ((ROOT / name).parent / target).exists(), f"{name}: broken link {target}"


# --------------------------------------------------------------------------- online


def online_config(directory: Path, sandbox: Sandbox, *, secret: str = SECRET,
                  source: str = SOURCE, auth: str = "client_credentials") -> Path:
    """A config whose [stora] points at ``sandbox``, with its secret file."""
    secret_file = directory / "client-secret"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    credential: dict[str, TomlValue] = (
        {"client_id": CLIENT_ID, "client_secret_file": secret_file.name}
        if auth == "client_credentials" else {"token_file": secret_file.name})
    return AgentToml(
        directory,
        site={"id": "site_online", "app_name": "YourApp"},
        mqtt=None,
        commands={"trusted_keys": {"relay-2026": RAW_KEY_B64}},
        stora={"auth": auth, "base_url": sandbox.api_url, "token_url": sandbox.token_url,
               **credential, "timeline_source_id": source},
    ).write()


@pytest.fixture
def sandbox_options() -> dict[str, Any]:
    # The wanted source on the second page of the list: the check must follow pages.
    others = [f"tsrc_other{i:03d}" for i in range(120)]
    return {"clients": {CLIENT_ID: SECRET}, "static_tokens": {"static-token"},
            "timeline_sources": [*others, SOURCE]}


def test_online_ok_against_the_sandbox(tmp_path: Path, sandbox: Sandbox) -> None:
    done = run_cli("check-config", "--online", "--config", str(online_config(tmp_path, sandbox)))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"online credential\s+ok\s+.*issued a token for client 'client-1'",
                        lines[1]), lines
    assert re.fullmatch(rf"online source\s+ok\s+{SOURCE} .* is a timeline source of this "
                        "operator", lines[2]), lines
    paths = [r.path for r in sandbox.requests]
    # The configured scope lacks timeline_source:read: a second token adds it.
    assert paths.count("/oauth2/token") == 2
    assert paths.count("/2025-09/timeline/sources") == 2  # two pages of 100
    assert sandbox.events() == []  # nothing posted


def test_online_says_the_credential_is_refused(tmp_path: Path, sandbox: Sandbox) -> None:
    path = online_config(tmp_path, sandbox, secret="wrong-secret")
    done = run_cli("check-config", "--online", "--config", str(path))
    assert done.returncode == 1
    assert re.search(r"online credential\s+FAILED\s+refused credential: token endpoint "
                     r"refused the client credentials: invalid_client", done.stdout)
    assert re.search(r"online source\s+skipped\s+no token", done.stdout)
    assert done.stderr.startswith("stora-gateway: the online check failed: credential: "
                                  "refused credential")
    assert len(done.stderr.splitlines()) == 1
    assert "wrong-secret" not in done.stdout + done.stderr


def test_online_says_the_source_is_unknown(tmp_path: Path, sandbox: Sandbox) -> None:
    path = online_config(tmp_path, sandbox, source="tsrc_someone_else")
    done = run_cli("check-config", "--online", "--config", str(path))
    assert done.returncode == 1
    assert re.search(r"online source\s+FAILED\s+unknown source: Stora lists no timeline "
                     r"source tsrc_someone_else for this credential \(121 listed\)",
                     done.stdout)
    assert "the online check failed: source: unknown source" in done.stderr


def test_online_says_the_network_failed(tmp_path: Path, sandbox: Sandbox) -> None:
    path = online_config(tmp_path, sandbox)
    path.write_text(path.read_text().replace(sandbox.url, "http://127.0.0.1:9"))
    status, out, err = cli("check-config", "--online", "--json", "--config", str(path))
    assert status == 1
    doc = json.loads(out)
    assert doc["ok"] is False
    checks = doc["online"]["checks"]
    assert checks[0]["status"] == "failed"
    assert checks[0]["detail"].startswith("network or server: token endpoint unreachable")
    assert checks[1]["status"] == "skipped"
    assert err.startswith("stora-gateway: the online check failed: credential: network")


def test_online_static_token_refused_is_a_refused_credential(tmp_path: Path,
                                                             sandbox: Sandbox) -> None:
    path = online_config(tmp_path, sandbox, secret="not-the-token", auth="static")
    status, out, _ = cli("check-config", "--online", "--json", "--config", str(path))
    assert status == 1
    checks = json.loads(out)["online"]["checks"]
    assert [c["status"] for c in checks] == ["ok", "failed"]
    assert checks[1]["detail"].startswith("refused credential: Stora answered HTTP 401 "
                                          "invalid_token")


def test_online_broker_mode_only_proves_the_relay_answers(tmp_path: Path,
                                                          sandbox: Sandbox) -> None:
    path = online_config(tmp_path, sandbox, secret="relay-credential", auth="broker")
    status, out, _ = cli("check-config", "--online", "--json", "--config", str(path))
    assert status == 0
    checks = json.loads(out)["online"]["checks"]
    assert [c["status"] for c in checks] == ["ok", "skipped"]
    assert "answers (HTTP 404)" in checks[1]["detail"]
    assert [r.path for r in sandbox.requests] == ["/2025-09"]


def test_online_is_not_tried_on_an_invalid_config(tmp_path: Path, sandbox: Sandbox) -> None:
    path = online_config(tmp_path, sandbox, source="src_bad")
    status, _, err = cli("check-config", "--online", "--config", str(path))
    assert status == 2
    assert "stora.timeline_source_id" in err
    assert sandbox.requests == []


def test_the_sandbox_lists_sources_with_scope_and_pages() -> None:
    """GET /timeline/sources as stora-api §3.4 and §5 describe it: the read scope is
    required, pages are 1-based, ``limit`` is 1–100."""
    import httpx

    with Sandbox(clients={CLIENT_ID: SECRET}, timeline_sources=["tsrc_a", "tsrc_b"]) as box, \
            httpx.Client() as http:
        def token(scope: str) -> str:
            answer = http.post(box.token_url, json={
                "grant_type": "client_credentials", "client_id": CLIENT_ID,
                "client_secret": SECRET, "scope": scope})
            return str(answer.json()["access_token"])

        url = f"{box.api_url}/timeline/sources"
        narrow = {"Authorization": f"Bearer {token('public.timeline_event:write')}"}
        assert http.get(url, headers=narrow).status_code == 403
        wide = {"Authorization": f"Bearer {token('public.timeline_source:read')}"}
        page = http.get(url, params={"limit": 1, "page": 2}, headers=wide).json()
        assert [s["id"] for s in page["timeline_sources"]] == ["tsrc_b"]
        assert page["meta"]["pagination"] == {
            "count": 2, "page": 2, "pages": 2, "limit": 1, "next": None, "prev": 1, "last": 2}
        assert http.get(url, params={"limit": 101}, headers=wide).status_code == 422
        assert http.get(url, params={"page": 0}, headers=wide).status_code == 422
        assert http.get(url).status_code == 401
