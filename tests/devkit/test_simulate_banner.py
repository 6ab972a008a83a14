"""``simulate``'s banner counts in words: "1 lock", never "1 locks" or "lock(s)"."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cli_process import CliProcess

pytestmark = pytest.mark.simulator_only


def test_one_lock_is_one_lock(tmp_path: Path) -> None:
    directory = tmp_path / "sim"
    directory.mkdir(mode=0o700)  # drivers/ports.py: a port in a directory only we write
    port = directory / "ttyLB"
    with CliProcess("simulate", "lockboard", "--port", str(port), "--locks", "1") as sim:
        sim.wait_for(lambda line: line == "Ctrl-C to stop.")
        assert sim.interrupt() == 0
    text = "\n".join(sim.lines)
    assert "simulating a lock board (board 0, 1 lock, latches hold" in text, text
    assert "1 locks" not in text
