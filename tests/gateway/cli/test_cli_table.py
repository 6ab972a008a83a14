"""The CLI's one lazy seam, its command table (gateway/cli/shell.py; issue 13).

Parsing imports only the parser; what runs a command is named in
:data:`~gateway.cli.shell.COMMAND_TABLE` and imported when that command runs.  These
tests keep the table whole (every command has a handler that loads, and nothing else is
in it) and the seam real (``--help`` loads no command module and no heavy library).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli.parser import COMMANDS
from gateway.cli.shell import (
    COMMAND_TABLE,
    ONLINE_CHECKS,
    SITE_ACCESS,
    command_handler,
    load,
)

ROOT = Path(__file__).resolve().parents[3]
#: Modules that only the table may bring in (what --help must not load).
COMMAND_MODULES = sorted({target.partition(":")[0] for target in COMMAND_TABLE.values()}
                         | {t.partition(":")[0] for t in (SITE_ACCESS, ONLINE_CHECKS)})
HEAVY = ("paho", "pymodbus", "serial", "httpx", "cryptography", "apscheduler")


def test_the_table_names_exactly_the_product_s_commands() -> None:
    assert set(COMMAND_TABLE) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMAND_TABLE))
def test_every_command_s_handler_loads(name: str) -> None:
    handler = command_handler(name)
    assert callable(handler)
    assert handler.__module__ == COMMAND_TABLE[name].partition(":")[0]


@pytest.mark.parametrize("target", [SITE_ACCESS, ONLINE_CHECKS])
def test_the_other_targets_load(target: str) -> None:
    assert callable(load(target))


def test_a_target_that_is_not_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="not callable"):
        load("gateway.cli.shell:COMMAND_TABLE")
    assert command_handler("no-such-command") is None


def test_help_loads_no_command_module_and_no_heavy_library() -> None:
    """In a fresh interpreter: ``--help`` parses and prints, loading only the parser."""
    probe = (
        "import json, sys\n"
        "from gateway.cli.main import main\n"
        "try:\n"
        "    main(['--help'], out=open('/dev/null', 'w'))\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=60)
    loaded = set(json.loads(done.stdout.splitlines()[-1]))
    assert "gateway.cli.parser" in loaded  # the probe really ran the CLI
    assert [m for m in COMMAND_MODULES if m in loaded] == []
    assert [m for m in HEAVY if m in loaded] == []
