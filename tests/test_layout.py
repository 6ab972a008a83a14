"""The layout's guards (issue 13, item 7; style.md "Layers you can see from the folder list").

Checked on the source with :mod:`ast` (the reader of tests/test_layering_devkit.py, which
sees ``import``, ``from … import`` with relative names resolved, ``import_module`` and
``__import__``), so an import inside a function or under ``TYPE_CHECKING`` counts:

* **Layers inside the gateway**, top to bottom: ``cli`` (it runs the agent);
  ``agent`` (the composition root); ``ops``;
  ``intake``, ``units``, ``outbox``; ``store``, ``stora``, ``link``; ``config``,
  ``clock``, ``schedule``, ``term`` and ``outbox/timeline.py`` (the Timeline record
  format: pure, so the store can keep records and the unit side make them); ``errors``
  and the package itself (its version).  A module imports its own component
  and the layers below it, never a layer above; components of one layer do not import
  each other (:data:`SIDEWAYS` lists the one exception and why).
* **Between packages**: the relay never imports the gateway, the drivers or the dev kit
  (``drivers`` → ``gateway``, the product → ``devkit`` and ``sitelink`` → anything of
  ours are in tests/test_layering_devkit.py and tests/test_layering.py).
* **No function-level import of our own modules** in the product and the protocol
  package: a cycle cannot hide there.  The CLI's one lazy seam, its command table
  (gateway/cli), names modules as data for :func:`importlib.import_module`; heavy
  third-party libraries may still be imported inside the functions that need them.
* **No module over** :data:`MAX_LINES` **lines** in the product, the protocol package,
  the dev kit, the benchmarks and the tests.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.test_layering_devkit import _module_name, imported

ROOT = Path(__file__).resolve().parent.parent
OURS = ("gateway", "drivers", "sitelink", "devkit", "relay")
#: The gateway's layers, top first; each entry is a component (a module or package).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("gateway.cli",),
    ("gateway.agent",),
    ("gateway.ops",),
    ("gateway.intake", "gateway.units", "gateway.outbox"),
    ("gateway.store", "gateway.stora", "gateway.link"),
    ("gateway.config", "gateway.clock", "gateway.schedule", "gateway.term",
     "gateway.outbox.timeline"),
    ("gateway.errors", "gateway"),
)
#: Imports between components of one layer that the design allows: ``(importer, imported)``.
SIDEWAYS: frozenset[tuple[str, str]] = frozenset()
#: Over this many lines a module fails (the aim is 500: style.md).
MAX_LINES = 600
#: Where the size limit applies.
SIZED = ("gateway", "drivers", "sitelink", "devkit", "relay", "bench", "tests")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _component(module: str) -> str | None:
    """The component of a ``gateway`` module: the longest name in :data:`LAYERS` it is or
    is under."""
    best = None
    for layer in LAYERS:
        for name in layer:
            if (module == name or module.startswith(name + ".")) and \
                    (best is None or len(name) > len(best)):
                best = name
    return best


def _layer(component: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if component in layer)


def layer_violations(paths: Iterable[Path], *,
                     name_of: dict[Path, str] | None = None) -> list[str]:
    """``module:line imports other (why)`` for every import against the gateway's layers."""
    found = []
    for path in paths:
        name = (name_of or {}).get(path) or _module_name(path)
        mine = _component(name)
        if mine is None:
            continue
        for line, module in imported(path, name):
            theirs = _component(module)
            if theirs is None or theirs == mine:
                continue
            if _layer(theirs) < _layer(mine):
                found.append(f"{name}:{line} imports {module} (a layer above)")
            elif _layer(theirs) == _layer(mine) and (mine, theirs) not in SIDEWAYS:
                found.append(f"{name}:{line} imports {module} (sideways in one layer)")
    return found


def function_level_imports(paths: Iterable[Path]) -> list[str]:
    """``file:line imports module`` for each ``import``/``from … import`` of one of our
    packages inside a function body."""
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(), filename=str(path))
        for func in ast.walk(tree):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = ["." if node.level else (node.module or "")]
                for module in names:
                    if module == "." or module.partition(".")[0] in OURS:
                        found.append(f"{_rel(path)}:{node.lineno} imports {module}")
    return found


def oversized(paths: Iterable[Path], limit: int = MAX_LINES) -> list[str]:
    return [f"{_rel(path)}: {n} lines" for path in paths
            if (n := len(path.read_text().splitlines())) > limit]


def _python(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py")
                  if ".venv" not in p.parts)


def test_the_gateway_keeps_its_layers() -> None:
    paths = _python("gateway")
    assert sum(_component(_module_name(p)) is not None for p in paths) >= 40
    assert layer_violations(paths) == []


def test_the_relay_imports_neither_the_gateway_nor_the_drivers_nor_the_dev_kit() -> None:
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in _python("relay") for line, module in imported(path)
             if module.partition(".")[0] in ("gateway", "drivers", "devkit")]
    assert found == []


def test_the_gateway_and_drivers_never_import_the_relay() -> None:
    """A site install has no relay (deploy/install.sh), and the agent's memory and the
    CLI's start-up must not pay for it."""
    found = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in _python("gateway", "drivers", "sitelink")
             for line, module in imported(path)
             if module.partition(".")[0] == "relay"]
    assert found == []


def test_no_function_level_imports_of_our_modules() -> None:
    paths = _python("gateway", "drivers", "sitelink", "relay")
    assert len(paths) >= 60
    assert function_level_imports(paths) == []


def test_no_module_is_over_the_size_limit() -> None:
    paths = _python(*SIZED)
    assert len(paths) >= 150
    assert oversized(paths) == []


@pytest.mark.parametrize(("module", "source", "refused"), [
    ("gateway.store.rows", "from gateway.units.manager import UnitManager\n", True),
    ("gateway.store.rows", "def f():\n    from gateway.ops import control\n", True),
    ("gateway.units.manager", "from gateway.outbox.drainer import Drainer\n", True),
    ("gateway.intake.mgmt", "import gateway.agent\n", True),
    ("gateway.config.model", "from gateway.link import Message\n", True),
    ("gateway.intake.mgmt", "from ..ops import service\n", True),
    ("gateway.ops.control", "from gateway.store import Store\nfrom . import health\n", False),
    ("gateway.agent", "from gateway.ops.service import Operations\n", False),
    ("gateway.store.rows", "from gateway.errors import GatewayError\nimport gateway\n", False),
    ("gateway.units.manager", "from gateway.units.executor import run\n", False),
])
def test_the_layer_contract_refuses_what_it_should(tmp_path: Path, module: str, source: str,
                                                   refused: bool) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert bool(layer_violations([path], name_of={path: module})) is refused


@pytest.mark.parametrize(("source", "refused"), [
    ("def f():\n    from gateway.store import Store\n", True),
    ("class A:\n    async def f(self):\n        import drivers.base\n", True),
    ("def f():\n    from . import sibling\n", True),
    ("def f():\n    import httpx\n", False),
    ("from gateway.store import Store\n", False),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from gateway import agent\n",
     False),
])
def test_the_function_level_check_refuses_what_it_should(tmp_path: Path, source: str,
                                                          refused: bool) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    assert bool(function_level_imports([path])) is refused


def test_the_size_check_counts_lines(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text("x = 1\n" * 601)
    assert oversized([path]) == ["m.py: 601 lines"]
    path.write_text("x = 1\n" * 600)
    assert oversized([path]) == []
