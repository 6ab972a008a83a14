"""README's test command on a fresh machine (issue 12, item 1).

``scripts/test`` checks for the programs listed in ``scripts/system-tools`` before it
builds the venv: as root with apt-get it installs the missing packages (``apt-get
update`` first), otherwise it stops at once with one sentence naming the ``sudo apt-get
install -y …`` to run.  These tests run the real script and its sourced helper with
stand-ins for ``id`` and ``apt-get`` first on ``PATH`` (nothing is installed on this
machine) and a list of programs that exist nowhere, through ``STORA_TEST_TOOLS``.

They also keep the list honest: a test that looks for a program (``shutil.which``, a
subprocess argv, a skip reason naming a Debian package; the dev kit's helpers are
scanned too) fails here unless the program is in the list, so that no test skips in CI
for want of a tool; and README's "Prerequisites" names every package.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "scripts" / "system-tools"
SCRIPTS = [ROOT / "scripts" / name for name in ("test", "demo", "_env.sh", "_tools.sh")]
CI_RUN = ROOT / ".ci" / "run"
#: Programs of Debian's Essential packages (bash, coreutils): on every installation,
#: so never listed.
ESSENTIAL = {"bash", "sh", "rm", "stat", "true", "cat", "env", "id"}
#: Where tests look for a program, by how they name it.
LOOKUPS = (
    re.compile(r"""which\(\s*["']([\w.+-]+)["']"""),
    re.compile(r"""(?:run|Popen|check_call|check_output)\(\s*\[\s*["']([\w.+-]+)["']"""),
)
TOOL_TUPLE = re.compile(r"tools = \(([^)]*)\)")
#: A skip reason's install hint ("Debian: apt-get install faketime") names a package.
APT_HINT = re.compile(r"apt-get install ([a-z0-9][a-z0-9.+-]+)")

pytestmark = pytest.mark.timeout(60)


def listed() -> dict[str, str]:
    """scripts/system-tools as {command: Debian package}."""
    tools = {}
    for line in TOOLS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            command, package, *_ = line.split()
            tools[command] = package
    return tools


def test_every_program_a_test_looks_for_is_listed() -> None:
    tools = listed()
    wanted: dict[str, set[str]] = {}
    hinted: dict[str, set[str]] = {}
    # The dev kit holds the shared test helpers (the broker fixture finds mosquitto).
    paths = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "devkit").rglob("*.py")]
    for path in sorted(paths):
        text = path.read_text()
        name = str(path.relative_to(ROOT))
        for pattern in LOOKUPS:
            for command in pattern.findall(text):
                wanted.setdefault(command, set()).add(name)
        for group in TOOL_TUPLE.findall(text):
            for command in re.findall(r"""["']([\w.+-]+)["']""", group):
                wanted.setdefault(command, set()).add(name)
        for package in APT_HINT.findall(text):
            hinted.setdefault(package, set()).add(name)
    # The scan finds what it should (so an empty result cannot pass by accident).
    assert {"mosquitto", "systemd-analyze", "mkfs.ext4"} <= set(wanted)
    assert "faketime" in hinted
    unlisted = {command: where for command, where in wanted.items()
                if command not in tools and command not in ESSENTIAL}
    assert not unlisted, f"add these to {TOOLS.relative_to(ROOT)}: {unlisted}"
    packages = set(tools.values())
    unknown = {package: where for package, where in hinted.items()
               if package not in packages}
    assert not unknown, f"packages named in skip reasons but not listed: {unknown}"


def test_readme_lists_the_prerequisites_next_to_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    head, _, rest = readme.partition("## Prerequisites")
    assert rest, "README has no 'Prerequisites' section"
    assert "./scripts/test" in head  # the two commands come first
    section = rest.split("\n## ", 1)[0]
    packages = sorted(set(listed().values()))
    for package in packages:
        assert f"`{package}`" in section, f"README's Prerequisites lack {package}"
    install = re.search(r"sudo apt-get install -y ([^\n`]+)", section)
    assert install is not None, section
    assert set(install.group(1).split()) >= {"python3", "python3-venv", *packages}


class Sandbox:
    """Stand-ins for ``id`` (root or not) and ``apt-get`` (logs its arguments; ``install``
    puts the named stand-in programs on PATH, or fails) and a list of programs."""

    def __init__(self, directory: Path, *, uid: int, apt_works: bool = True) -> None:
        self.bin = directory / "bin"
        self.bin.mkdir()
        self.log = directory / "apt.log"
        self.tools = directory / "system-tools"
        self.tools.write_text(
            "# command   package   needed by\n"
            "stora-test-tool-a   stora-test-missing-a   a test\n"
            "stora-test-tool-a2  stora-test-missing-a   the same package again\n"
            "stora-test-tool-b   stora-test-missing-b   another test\n"
            "bash                bash                   present: not asked for\n")
        self._stub("id", f'if [ "$1" = -u ] && [ $# = 1 ]; then echo {uid}; '
                         'else exec /usr/bin/id "$@"; fi')
        installs = (f'for p in "$@"; do case "$p" in stora-test-missing-a) '
                    f'for t in stora-test-tool-a stora-test-tool-a2; do '
                    f'printf "#!/bin/sh\\n" >"{self.bin}/$t"; chmod +x "{self.bin}/$t"; done;; '
                    f'stora-test-missing-b) printf "#!/bin/sh\\n" >"{self.bin}/stora-test-tool-b"; '
                    f'chmod +x "{self.bin}/stora-test-tool-b";; esac; done')
        self._stub("apt-get", f'echo "$*" >>"{self.log}"\n'
                              + (f'[ "$1" = install ] && {{ {installs}; }}\nexit 0'
                                 if apt_works else 'exit 100'))

    def _stub(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)

    def env(self) -> dict[str, str]:
        # PYTHON=false: should scripts/test ever get past the check, _env.sh stops at
        # once ("needs Python 3.11") instead of building a venv and running the suite.
        return {**os.environ, "PATH": f"{self.bin}:/usr/bin:/bin",
                "STORA_TEST_TOOLS": str(self.tools), "PYTHON": "false"}

    def apt_calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


def source_and_ensure(box: Sandbox) -> subprocess.CompletedProcess[str]:
    """``ensure_system_tools`` from scripts/_tools.sh, then a marker: what scripts/test
    would go on to do."""
    script = (f"set -euo pipefail; source {ROOT / 'scripts' / '_tools.sh'}; "
              "ensure_system_tools; echo WENT-ON")
    return subprocess.run(["bash", "-c", script], env=box.env(), capture_output=True,
                          text=True, timeout=30, check=False)


def test_without_root_scripts_test_stops_at_once_naming_the_command(tmp_path: Path) -> None:
    box = Sandbox(tmp_path, uid=1000)
    done = subprocess.run([str(ROOT / "scripts" / "test")], env=box.env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2, done
    assert done.stdout == ""  # before the venv, ruff, mypy or pytest
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].endswith(
        "install them with: sudo apt-get install -y stora-test-missing-a "
        "stora-test-missing-b"), lines[0]
    assert box.apt_calls() == []


def test_as_root_it_updates_then_installs_the_missing_packages_and_goes_on(
        tmp_path: Path) -> None:
    box = Sandbox(tmp_path, uid=0)
    done = source_and_ensure(box)
    assert done.returncode == 0, done.stderr
    assert box.apt_calls() == ["update",
                               "install -y stora-test-missing-a stora-test-missing-b"]
    assert done.stdout.strip().splitlines()[-1] == "WENT-ON"
    # Everything is there now: a second run asks apt-get for nothing.
    again = source_and_ensure(box)
    assert again.stdout.strip() == "WENT-ON"
    assert len(box.apt_calls()) == 2


def test_as_root_a_failing_apt_get_stops_with_one_sentence(tmp_path: Path) -> None:
    box = Sandbox(tmp_path, uid=0, apt_works=False)
    done = source_and_ensure(box)
    assert done.returncode == 2
    assert "WENT-ON" not in done.stdout
    assert done.stderr.strip() == ("scripts/test: apt-get could not install "
                                   "stora-test-missing-a stora-test-missing-b "
                                   "(its error is above)")
    assert box.apt_calls() == ["update"]


def test_a_program_in_sbin_counts_though_path_lacks_sbin(tmp_path: Path) -> None:
    """Debian keeps mosquitto and mkfs.ext4 in /usr/sbin, off a user's PATH."""
    sbin_only = next((entry.name for entry in sorted(Path("/usr/sbin").iterdir())
                      if os.access(entry, os.X_OK) and not Path("/usr/bin", entry.name).exists()
                      and not Path("/bin", entry.name).exists()), None)
    assert sbin_only is not None, "no program only in /usr/sbin on this machine"
    box = Sandbox(tmp_path, uid=1000)
    box.tools.write_text(f"{sbin_only}  some-package  a test\n")
    done = source_and_ensure(box)
    assert (done.returncode, done.stdout.strip()) == (0, "WENT-ON"), done.stderr


def test_ci_runs_exactly_readmes_command() -> None:
    """`.ci/run` adds nothing of its own: what CI proves is what README promises."""
    commands = [line for line in CI_RUN.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert commands[-1] == "exec ./scripts/test"
    assert not any("apt-get" in line for line in commands)


def test_the_scripts_parse_and_are_shellcheck_clean() -> None:
    for script in [*SCRIPTS, CI_RUN]:
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                              timeout=30, check=False)
        assert (done.returncode, done.stderr) == (0, ""), script
    for script in (ROOT / "scripts" / "test", ROOT / "scripts" / "demo", CI_RUN):
        assert os.access(script, os.X_OK), f"{script} should be executable"
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    checked = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS), str(CI_RUN)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60,
                             check=False)
    assert checked.returncode == 0, checked.stdout
