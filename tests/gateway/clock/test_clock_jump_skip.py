"""The clock-jump tests skip cleanly where libfaketime is missing (issue 12, item 1).

On a fresh machine without libfaketime, ``tests/gateway/clock/test_clock_jump.py`` used to bind its
``$NOTIFY_SOCKET`` stand-in, then skip before the ``try`` whose ``finally`` closed it;
the socket was reclaimed later, during another test, as a ResourceWarning, and with
warnings as errors that other test failed (``978 passed, 3 skipped, 1 error``).

Here that module runs in a pytest of its own, with libfaketime hidden (a small plugin
empties the list of places the module looks in) and ``-W error``: both tests must be
skipped and nothing reported as unraisable, at the end of the session included, where
pytest collects what is left.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devkit.site import ROOT

pytestmark = pytest.mark.timeout(90)

#: The module under test, relative to the repository.
MODULE = "tests/gateway/clock/test_clock_jump.py"
#: Loaded with ``-p``: the module's list of libfaketime paths is emptied once collected,
#: so the test sees a machine without libfaketime whatever this one has installed.
HIDE_LIBFAKETIME = '''
def pytest_collection_modifyitems(items):
    for item in items:
        if hasattr(item.module, "LIBFAKETIME_CANDIDATES"):
            item.module.LIBFAKETIME_CANDIDATES = ()
'''


def test_the_clock_jump_tests_skip_without_leaking_a_socket(tmp_path: Path) -> None:
    plugin_dir = tmp_path / "plugin"
    plugin_dir.mkdir()
    (plugin_dir / "hide_libfaketime.py").write_text(HIDE_LIBFAKETIME)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-p", "hide_libfaketime", "-W", "error", "-rs",
         "--basetemp", str(tmp_path / "inner"), MODULE],
        cwd=ROOT, env={**outer_env(), "PYTHONPATH": str(plugin_dir)},
        capture_output=True, text=True, timeout=80, check=False)
    out = done.stdout + done.stderr
    assert "2 skipped" in out, out
    assert "libfaketime is not installed" in out, out
    assert "Unraisable" not in out, out
    assert "ResourceWarning" not in out, out
    assert done.returncode == 0, out


def outer_env() -> dict[str, str]:
    """This process's environment, less what would change how the inner pytest runs."""
    return {key: value for key, value in os.environ.items()
            if not key.startswith(("PYTEST_", "PYTHONPATH"))}
