"""Import contracts of the dev kit (style.md, "Layers you can see from the folder list"):

* nothing in ``gateway/`` or ``drivers/`` imports ``devkit`` (the demo, the sandbox, the
  simulators, the test-site builders), at module level or inside a function, nor names it
  to ``importlib.import_module`` / ``__import__``; the CLI finds the dev kit's commands
  through its plugin point (gateway/cli/plugins.py);
* ``drivers/`` never imports ``gateway``;
* the product reads no test-only environment variable (``STORA_GATEWAY_TEST_…``): tests
  break the agent through the hooks the dev kit gives (devkit/faults.py, devkit/agent.py).

Checked on the source with :mod:`ast`, so an import that only runs in one branch counts.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("gateway", "drivers")


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, name: str | None = None) -> Iterator[tuple[int, str]]:
    """``(line, module)`` of every import in ``path`` (the module ``name``, by default
    from its place under the repository), wherever it is: ``import a.b``, ``from a
    import b`` (relative ones resolved), ``importlib.import_module("a")`` and
    ``__import__("a")`` with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name or _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield node.lineno, module
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant) \
                    and isinstance(first.value, str):
                yield node.lineno, first.value


def violations(packages: tuple[str, ...], forbidden: str) -> list[str]:
    """``file:line imports module`` for each import of ``forbidden`` (or a submodule)."""
    found = []
    for package in packages:
        for path in _modules(package):
            for line, module in imported(path):
                if module == forbidden or module.startswith(forbidden + "."):
                    found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return found


def test_the_product_never_imports_the_dev_kit() -> None:
    assert violations(PRODUCT, "devkit") == []


def test_drivers_never_import_the_gateway() -> None:
    assert violations(("drivers",), "gateway") == []


@pytest.mark.parametrize(("source", "expected"), [
    ("import devkit.demo\n", "devkit.demo"),
    ("from devkit import sandbox\n", "devkit"),
    ("def f():\n    from devkit.sims.modbus import ModbusSimBus\n", "devkit.sims.modbus"),
    ("import importlib\nimportlib.import_module('devkit.commands')\n", "devkit.commands"),
    ("__import__('devkit')\n", "devkit"),
    ("from ..units import x\n", "gateway.units"),
    ("from . import y\n", "gateway.x"),
])
def test_every_form_of_import_is_seen(tmp_path: Path, source: str, expected: str) -> None:
    """The checker itself: each way of importing is seen, relative imports resolved (as
    if the file were gateway/x/y.py)."""
    path = tmp_path / "y.py"
    path.write_text(source)
    assert expected in [m for _, m in imported(path, "gateway.x.y")]


def test_the_product_reads_no_test_only_environment_variable() -> None:
    found = [f"{path.relative_to(ROOT)}:{node.lineno}"
             for package in PRODUCT for path in _modules(package)
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and "STORA_GATEWAY_TEST" in node.value]
    assert found == []


def test_the_simulators_and_their_plumbing_live_in_the_dev_kit() -> None:
    """No simulator, pty plumbing or dev tool is left in the product's folders."""
    left = [str(p.relative_to(ROOT)) for package in PRODUCT for p in _modules(package)
            if p.name in ("sim.py", "simbase.py", "pty.py", "demo.py", "demo_broker.py",
                          "sandbox.py", "simulate.py", "simulate_options.py", "selftest.py")]
    assert left == []
