"""docs/partner-review.md stays true to the code it describes.

The scope table is exactly what the relay asks for (``relay.config.DEFAULT_SCOPES``, in
order) with the reasons the connect page shows (``relay.scopes.SCOPE_REASONS``); every
Timeline Event wording the gateway can write (``gateway.outbox.timeline.KINDS``) is
listed; every image the page links exists (``scripts/partner-review-screenshots`` makes
them), and the script is there to make them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.outbox.timeline import KINDS
from relay.config import DEFAULT_SCOPES
from relay.scopes import SCOPE_REASONS

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "partner-review.md"
SCRIPT = ROOT / "scripts" / "partner-review-screenshots"
SCREENSHOTS = ("1-connect-page", "2-stora-consent", "3-connected", "4-denied")
_ROW = re.compile(r"^\| `(public\.[^`]+)` \| (.+?) \|$")


def scope_rows(text: str) -> list[tuple[str, str]]:
    """``(scope, why)`` of each row of the doc's scope table, in order."""
    return [(m.group(1), m.group(2)) for m in map(_ROW.match, text.splitlines()) if m]


def test_the_scope_table_is_the_relays_own() -> None:
    assert scope_rows(DOC.read_text()) == [(s, SCOPE_REASONS[s]) for s in DEFAULT_SCOPES]


def test_every_timeline_event_wording_is_listed() -> None:
    text = DOC.read_text()
    for wording in KINDS.values():
        assert f"`{wording.format(app='{app_name}')}`" in text, wording


def test_the_screenshots_exist() -> None:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", DOC.read_text())
    assert links == [f"partner-review/{name}.png" for name in SCREENSHOTS]
    for link in links:
        image = DOC.parent / link
        assert image.is_file(), f"{image} is missing: run scripts/partner-review-screenshots"
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{image} is not a PNG"


def test_the_screenshot_script_runs_the_browser_test_and_is_shellcheck_clean() -> None:
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} should be executable"
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text
    assert "STORA_RELAY_SCREENSHOTS=docs/partner-review" in text
    assert "tests/relay/test_relay_browser.py" in text
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    checked = subprocess.run([shellcheck, "-x", str(SCRIPT)], cwd=ROOT, capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout
