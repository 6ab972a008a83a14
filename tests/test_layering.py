"""Import contract of the protocol package (issue 13, style.md "Layers you can see"):

``sitelink/`` is shared by the gateway and the relay and is pure protocol, so it imports
nothing of ours (``gateway``, ``drivers``, ``devkit``, ``relay``, ``tests``, ``bench``)
and of third-party packages only ``cryptography``: the standard library, itself and
that.  Checked on the source with :mod:`ast` (tests/test_layering_devkit.py's reader),
so an import inside a function or under ``TYPE_CHECKING`` counts too.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.test_layering_devkit import imported

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = "sitelink"
#: What sitelink may import besides the standard library.
ALLOWED: frozenset[str] = frozenset({PROTOCOL, "cryptography"})


def foreign_imports(paths: list[Path], *, name_of: dict[Path, str] | None = None) -> list[str]:
    """``file:line imports module`` for every import outside :data:`ALLOWED` and the
    standard library."""
    found = []
    for path in paths:
        for line, module in imported(path, (name_of or {}).get(path)):
            top = module.partition(".")[0]
            if top not in ALLOWED and top not in sys.stdlib_module_names:
                found.append(f"{path.name}:{line} imports {module}")
    return found


def test_sitelink_imports_only_the_standard_library_and_cryptography() -> None:
    paths = sorted((ROOT / PROTOCOL).rglob("*.py"))
    assert len(paths) >= 8  # the checker really looked at the package
    assert foreign_imports(paths) == []


@pytest.mark.parametrize(("source", "refused"), [
    ("import gateway.errors\n", True),
    ("from drivers.base import LockState\n", True),
    ("def f():\n    from devkit import sandbox\n", True),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from relay import app\n", True),
    ("import jwt\n", True),
    ("import importlib\nimportlib.import_module('httpx')\n", True),
    ("from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey\n", False),
    ("import json, base64\nfrom collections.abc import Mapping\n", False),
    ("from sitelink.codes import Reason\nfrom . import jws\n", False),
])
def test_the_contract_refuses_what_it_should(tmp_path: Path, source: str,
                                             refused: bool) -> None:
    """The contract itself: a module of ours or another third-party package is refused,
    wherever the import sits; the standard library, cryptography and sitelink pass."""
    path = tmp_path / "bad.py"
    path.write_text(source)
    assert bool(foreign_imports([path], name_of={path: "sitelink.bad"})) is refused
