"""What the CLI's help and deploy/README.md say about it matches what the code does
(issue 12 review): every exit status a command can return is in ``gateway/cli/main.py``'s
module docstring, and the rollback steps name the commands that read the state database.
"""

from __future__ import annotations

import re
from pathlib import Path

import gateway.cli.main
from gateway.cli.main import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from gateway.cli.status import EXIT_DEGRADED, EXIT_DOWN
from gateway.cli.technician import EXIT_INTERRUPTED

ROOT = Path(__file__).resolve().parents[3]


def test_the_cli_docstring_lists_every_exit_status() -> None:
    doc = gateway.cli.main.__doc__ or ""
    said = doc.split("Exit status", 1)[1].split("\n\n", 1)[0]
    for code in (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_DEGRADED, EXIT_DOWN,
                 EXIT_INTERRUPTED):
        assert re.search(rf"\b{code}\b", said), f"gateway/cli/main.py's docstring lacks exit {code}"


def test_the_rollback_steps_name_the_commands_that_read_the_database() -> None:
    """``status``, ``watch`` and ``selftest`` read the state database (read-only) since
    issue 12, and ``outbox retry`` writes it when no agent runs: the rollback steps,
    which move the database aside, must not say nothing else reads it."""
    readme = (ROOT / "deploy" / "README.md").read_text()
    rollback = readme.split("## Rolling back to a previous release", 1)[1].split("\n## ", 1)[0]
    assert "nothing else reads it" not in rollback
    for command in ("`status`", "`watch`", "`selftest`", "`outbox retry`"):
        assert command in rollback, command
