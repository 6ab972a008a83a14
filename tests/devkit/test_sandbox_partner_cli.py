"""``stora-gateway sandbox`` with a partner app and the demo operator (devkit/commands.py,
devkit/sandbox/serve.py): the Authorization Code flow against the running command.
"""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from gateway.cli.main import main
from tests.devkit.test_sandbox_partner_helpers import (
    CLIENT_ID,
    CLIENT_SECRET,
    REDIRECT,
    bearer,
    connect,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_command_serves_a_partner_app_and_the_demo_operator(tmp_path: Path) -> None:
    secret = tmp_path / "partner-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli.main", "sandbox", "--port", "0",
         "--partner-client-id", CLIENT_ID, "--partner-client-secret-file", str(secret),
         "--redirect-uri", "https://elsewhere.example/cb", "--redirect-uri", REDIRECT,
         "--partner-token-ttl", "60", "--demo-operator"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        urls: dict[str, str] = {}
        while len(urls) < 5:
            line = proc.stdout.readline()
            assert line, f"sandbox exited early: {proc.communicate()[1]}"
            name, _, value = line.strip().partition(": ")
            urls[name] = value
        assert urls["authorize_url"] == urls["url"] + "/oauth2/authorize"
        with httpx.Client(base_url=urls["url"], timeout=5) as client:
            doc = connect(client, "demo")
            assert doc["expires_in"] == 60
            r = client.get("/2025-09/units", headers=bearer(doc["access_token"]))
            refs = {u["reference_id"] for u in r.json()["units"]}
            assert refs == {"GATE", "A-101", "A-102", "A-103"}
            site = client.get("/2025-09/sites/site_demo",
                              headers=bearer(doc["access_token"])).json()["site"]
            assert site["access_hours"]["sunday"]["status"] == "closed"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_partner_options_go_together(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    status = main(["sandbox", "--partner-client-id", "x"], out=out, err=err)
    assert status == 2
    assert "--redirect-uri" in err.getvalue()
    assert err.getvalue().count("\n") == 1
    secret = tmp_path / "s"
    secret.write_text("y")
    status = main(["sandbox", "--partner-client-id", "x", "--partner-client-secret-file",
                   str(secret), "--redirect-uri", "not a url"], out=out, err=err)
    assert status == 2
    assert "redirect URI" in err.getvalue()
