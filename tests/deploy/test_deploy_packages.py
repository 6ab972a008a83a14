"""deploy/install.sh builds the agent from every package of ours the agent imports, and
from nothing else of ours (the dev kit and the relay stay out of a site install)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install.sh"
OURS = {"gateway", "drivers", "sitelink", "devkit", "relay"}


def _imported_by(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found & OURS


def _copied_into_the_build() -> set[str]:
    text = INSTALL.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines()
                if line.lstrip().startswith("cp -R") and '"$BUILD/"' in line)
    return set(re.findall(r'"\$SRC/([a-z_]+)"', line))


def test_install_builds_every_package_the_agent_imports() -> None:
    needed = {"gateway", "drivers"}
    while True:  # what they import, and what that imports
        more = set().union(*(_imported_by(p) for p in needed)) - needed
        if not more:
            break
        needed |= more
    copied = _copied_into_the_build()
    assert needed == {"gateway", "drivers", "sitelink"}
    assert needed <= copied
    assert not copied & {"devkit", "relay"}
