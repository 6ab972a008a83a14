"""gateway/cli/plugins.py: the CLI's plugin point, through which the dev kit adds
``demo``, ``sandbox``, ``simulate`` and ``selftest`` without the product importing it."""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main as cli
from gateway.cli.parser import build_parser, product_command
from gateway.cli.plugins import GROUP, PluginCommand, entry_points, plugin_commands

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("group", [GROUP, "console_scripts", "pytest11"])
def test_the_entry_points_read_are_importlib_metadatas(group: str) -> None:
    """The small reader (kept for the CLI's cold start) finds what importlib.metadata
    finds, distribution by distribution."""
    expected = sorted((ep.name, ep.value) for ep in importlib.metadata.entry_points(group=group))
    assert sorted(entry_points(group)) == expected


def test_the_dev_kit_is_installed_as_a_plugin() -> None:
    assert ("devkit", "devkit.commands:COMMANDS") in entry_points(GROUP)
    names = [c.name for c in plugin_commands(reserved=cli.COMMANDS)]
    assert names == ["demo", "sandbox", "simulate", "selftest"]


def test_help_lists_every_command_where_it_was() -> None:
    """The dev kit's commands are listed where they were when they lived in the product,
    with the same help texts."""
    out = io.StringIO()
    assert cli.main(["--help"], out=out) == 0
    listed = [line.split()[0] for line in out.getvalue().split("COMMAND\n", 1)[1]
              .split("\n\n", 1)[0].splitlines() if line.startswith("    ") and
              not line.startswith("     ")]
    assert listed == ["run", "status", "check-config", "init", "ports", "scan", "locks",
                      "unlock", "lock", "test", "outbox", "clock", "demo", "sandbox",
                      "simulate", "watch", "selftest", "completion"]


def _plugin_dir(tmp_path: Path, entry: str, module: str = "") -> Path:
    """A directory holding one distribution ``fake_plugin`` whose entry point is
    ``entry``, and (optionally) its module ``fake_plugin_mod``."""
    info = tmp_path / "fake_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\nfake = {entry}\n")
    if module:
        (tmp_path / "fake_plugin_mod.py").write_text(module)
    return tmp_path


def test_a_plugin_whose_package_is_not_installed_is_left_out_quietly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """deploy/install.sh installs the agent without the dev kit its metadata names: its
    ``--help`` must not warn about it."""
    path = _plugin_dir(tmp_path, "no_such_module_here:COMMANDS")
    with caplog.at_level(logging.DEBUG, logger="gateway.cli.plugins"):
        assert plugin_commands(path=[str(path)]) == []
    assert "not loaded" not in caplog.text
    assert "CLI plugin fake (no_such_module_here:COMMANDS) is not installed" in caplog.text


def test_a_plugin_missing_one_of_its_own_imports_is_left_out_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _plugin_dir(tmp_path, "fake_plugin_half:COMMANDS")
    (path / "fake_plugin_half.py").write_text("import no_such_dependency_here\n")
    sys.path.insert(0, str(path))
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.cli.plugins"):
            assert plugin_commands(path=[str(path)]) == []
    finally:
        sys.path.remove(str(path))
        sys.modules.pop("fake_plugin_half", None)
    assert ("CLI plugin fake (fake_plugin_half:COMMANDS) not loaded: ModuleNotFoundError"
            in caplog.text)


def test_a_plugin_that_fails_as_it_imports_is_left_out_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Whatever a plugin raises while it loads, the CLI goes on without it."""
    path = _plugin_dir(tmp_path, "fake_plugin_boom:COMMANDS")
    (path / "fake_plugin_boom.py").write_text("raise RuntimeError('boom')\n")
    sys.path.insert(0, str(path))
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.cli.plugins"):
            assert plugin_commands(path=[str(path)]) == []
    finally:
        sys.path.remove(str(path))
        sys.modules.pop("fake_plugin_boom", None)
    assert "not loaded: RuntimeError: boom" in caplog.text


def test_a_plugin_of_the_wrong_shape_is_left_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _plugin_dir(tmp_path, "fake_plugin_mod:COMMANDS", "COMMANDS = ['demo']\n")
    sys.path.insert(0, str(path))
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.cli.plugins"):
            assert plugin_commands(path=[str(path)]) == []
    finally:
        sys.path.remove(str(path))
        sys.modules.pop("fake_plugin_mod", None)
    assert "is not a sequence of PluginCommand" in caplog.text


def test_a_plugin_never_replaces_a_product_command(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    module = ("from gateway.cli.plugins import PluginCommand\n"
              "COMMANDS = (PluginCommand('run', 'not the agent', lambda ctx: 0),\n"
              "            PluginCommand('extra', 'an extra command', lambda ctx: 0))\n")
    path = _plugin_dir(tmp_path, "fake_plugin_mod:COMMANDS", module)
    sys.path.insert(0, str(path))
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.cli.plugins"):
            found = plugin_commands(reserved=cli.COMMANDS, path=[str(path)])
    finally:
        sys.path.remove(str(path))
        sys.modules.pop("fake_plugin_mod", None)
    assert [c.name for c in found] == ["extra"]
    assert isinstance(found[0], PluginCommand)
    assert "command 'run' already exists" in caplog.text


def test_help_loads_neither_importlib_metadata_nor_the_dev_kits_tools() -> None:
    """Cold start: the plugin point costs a directory listing, not importlib.metadata
    (tens of ms on a Pi), and ``--help`` loads only the dev kit's parsers."""
    code = ("import contextlib, io, sys\nfrom gateway.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()): main(['--help'])\n"
            "print(sorted(m for m in sys.modules if m.startswith(('devkit', 'importlib.metadata'"
            "))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    assert done.stdout.strip() == "['devkit', 'devkit.commands', 'devkit.simulate_options']"


def _devkit_loaded_by(argv: list[str]) -> bool:
    code = ("import contextlib, io, sys\nfrom gateway.cli.main import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), "
            "contextlib.redirect_stderr(io.StringIO()):\n"
            f"    main({argv!r})\n"
            "print('devkit' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, cwd=ROOT)
    return done.stdout.strip() == "True"


@pytest.mark.parametrize(("argv", "loads"), [
    (["--config", "/nonexistent/gateway.toml", "run"], False),  # the agent: no dev kit
    (["check-config", "--config", "/nonexistent/gateway.toml"], False),
    (["--debug", "status", "--help"], False),
    (["--help"], True),  # lists the plugins' commands
    (["run", "--help"], False),
    (["demo", "--help"], True),
    (["stauts"], True),  # a misspelling: the error lists every command
    ([], True),
])
def test_a_product_command_leaves_the_plugins_out(argv: list[str], loads: bool) -> None:
    """``run`` keeps no dev-kit parser in the agent's memory for its whole life."""
    assert _devkit_loaded_by(argv) is loads


def test_the_parser_without_plugins_knows_every_product_command() -> None:
    for name in cli.COMMANDS:
        assert product_command(["--config", name, name]) == name
    assert product_command(["--config", "run"]) is None
    parser = build_parser(with_plugins=False)
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert [set(a.choices or ()) for a in subparsers] == [set(cli.COMMANDS)]
