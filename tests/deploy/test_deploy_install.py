"""deploy/install.sh against a throw-away root: the layout it makes, the old layout it
moves, and the links a compromised agent user could plant for root to follow.

The script runs for real (as root, which these tests need) with
``STORA_GATEWAY_INSTALL_ROOT`` pointing at a directory that stands in for ``/``, and
stand-ins first on ``PATH`` for what would change the machine itself: user management
(``stora-gateway`` resolves to uid/gid :data:`AGENT_ID`, an id nobody here has),
``runuser``, ``systemctl``, ``modprobe``, and a Python whose ``-m venv`` makes a stub
venv and whose ``-m pip`` does nothing.  ``chown``, ``chmod``, ``install``, ``mv``,
``ln`` are the real ones, on the real file system: a file outside the fake root that a
planted link points to shows whether root followed it.

Issue 11 item 6: root used to ``chown``/``chmod``/``install -d`` inside the agent-owned
``/etc/stora-gateway``; a link planted there (``gateway.toml -> /etc/shadow``) made
root hand the target to the agent at the next upgrade.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install.sh"
#: The agent's uid and gid in these runs: no account on a test machine has it.
AGENT_ID = 64_123

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(os.geteuid() != 0, reason="install.sh runs as root (chown)"),
]

_STUBS = {
    # The agent's user and group exist, with AGENT_ID; anything else asks the real tools.
    "getent": f"""#!/bin/sh
if [ "$1" = group ] && [ "$2" = stora-gateway ]; then echo "stora-gateway:x:{AGENT_ID}:"
else exec /usr/bin/getent "$@"; fi
""",
    "id": f"""#!/bin/sh
if [ "$1" = -u ] && [ "$2" = stora-gateway ]; then echo {AGENT_ID}; else exec /usr/bin/id "$@"; fi
""",
    "groupadd": "#!/bin/sh\necho \"groupadd $*\" >>\"$STUB_LOG\"\n",
    "useradd": "#!/bin/sh\necho \"useradd $*\" >>\"$STUB_LOG\"\n",
    "usermod": "#!/bin/sh\necho \"usermod $*\" >>\"$STUB_LOG\"\n",
    "userdel": "#!/bin/sh\necho \"userdel $*\" >>\"$STUB_LOG\"\n",
    "groupdel": "#!/bin/sh\necho \"groupdel $*\" >>\"$STUB_LOG\"\n",
    "systemctl": "#!/bin/sh\necho \"systemctl $*\" >>\"$STUB_LOG\"\n",
    "modprobe": "#!/bin/sh\necho \"modprobe $*\" >>\"$STUB_LOG\"\n",
    "apt-get": "#!/bin/sh\necho \"apt-get $*\" >>\"$STUB_LOG\"\nexit 1\n",
    # runuser -u USER -- CMD...: run CMD (as root here; the log says who it was for).
    "runuser": "#!/bin/sh\necho \"runuser $*\" >>\"$STUB_LOG\"\nshift 3\nexec \"$@\"\n",
    # python3 and the venv's python: version checks pass, -m venv makes a stub venv
    # (python and stora-gateway), -m pip does nothing.
    "python3": """#!/bin/sh
case "$1" in
  -c) exit 0 ;;
  --version) echo "Python 3.11.2" ;;
  -m)
    case "$2" in
      venv)
        mkdir -p "$3/bin"
        cp "$0" "$3/bin/python"
        cat >"$3/bin/stora-gateway" <<'END'
#!/bin/sh
case "$1" in
  --version) echo "stora-gateway 0.0.0 (stub)" ;;
  check-config) test -f "$3" ;;
esac
END
        chmod 0755 "$3/bin/stora-gateway" ;;
      pip) exit 0 ;;
    esac ;;
esac
""",
}


@dataclass
class Machine:
    """A fake root, the stand-ins on PATH, and a place outside the root."""

    root: Path
    bin: Path
    outside: Path
    log: Path

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "stora-gateway"

    def install(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "STORA_GATEWAY_INSTALL_ROOT": str(self.root),
               "PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
               "PYTHON": str(self.bin / "python3"), "STUB_LOG": str(self.log)}
        return subprocess.run(["bash", str(INSTALL), *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    def stub_calls(self) -> list[str]:
        """What the stand-ins were asked to do, in order."""
        return self.log.read_text().splitlines() if self.log.exists() else []

    def old_layout(self, config: str = "[site]\nid = \"site_1\"\n") -> None:
        """/etc/stora-gateway as the previous install.sh left it: the agent's, with a
        regular gateway.toml and a secrets/ directory of the agent's."""
        self.conf.mkdir(parents=True)
        (self.conf / "secrets").mkdir()
        (self.conf / "gateway.toml").write_text(config)
        (self.conf / "secrets" / "mqtt-password").write_text("pw\n")
        for path, mode in ((self.conf, 0o750), (self.conf / "secrets", 0o700),
                           (self.conf / "gateway.toml", 0o640),
                           (self.conf / "secrets" / "mqtt-password", 0o600)):
            os.chown(path, AGENT_ID, AGENT_ID)
            path.chmod(mode)


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    root, bin_dir, outside = tmp_path / "root", tmp_path / "bin", tmp_path / "outside"
    for directory in (root, bin_dir, outside):
        directory.mkdir()
    for name, text in _STUBS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    # What a planted link aims at: root's, private, like /etc/shadow.
    shadow = outside / "shadow-copy"
    shadow.write_text("root:*:19000:0:99999:7:::\n")
    shadow.chmod(0o600)
    (outside / "cron.d").mkdir(mode=0o755)
    return Machine(root, bin_dir, outside, tmp_path / "stubs.log")


def owner_mode(path: Path) -> tuple[int, int, int]:
    """(uid, gid, permission bits) of ``path`` itself, never of what a link points to."""
    st = path.lstat()
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def untouched(machine: Machine) -> None:
    """The files outside the root are as the fixture made them."""
    assert owner_mode(machine.outside / "shadow-copy") == (0, 0, 0o600)
    assert owner_mode(machine.outside / "cron.d") == (0, 0, 0o755)
    assert (machine.outside / "shadow-copy").read_text().startswith("root:")


def test_a_fresh_install_makes_the_layout(machine: Machine) -> None:
    done = machine.install()
    assert done.returncode == 0, done.stderr
    conf = machine.conf
    assert owner_mode(conf) == (0, AGENT_ID, 0o750)
    assert owner_mode(conf / "secrets") == (0, AGENT_ID, 0o750)
    assert owner_mode(conf / "config") == (AGENT_ID, AGENT_ID, 0o750)
    link = conf / "gateway.toml"
    assert link.is_symlink()
    assert os.readlink(link) == "config/gateway.toml"
    assert link.lstat().st_uid == 0
    unit = machine.root / "etc" / "systemd" / "system" / "stora-gateway.service"
    assert owner_mode(unit)[:2] == (0, 0)
    assert "systemctl --root=" in machine.log.read_text()
    # Again, as after a `git pull`: the same layout, nothing refused.
    again = machine.install()
    assert again.returncode == 0, again.stderr
    assert owner_mode(conf / "config") == (AGENT_ID, AGENT_ID, 0o750)
    assert os.readlink(link) == "config/gateway.toml"


def test_the_installed_docs_stand_on_their_own(machine: Machine) -> None:
    """deploy/README.md is installed in /opt/stora-gateway/deploy: every file it and the
    docs next to it link to is installed beside them, and the next steps name init and
    the example config, never a file that does not ship (issue 12, item 2)."""
    import re

    done = machine.install()
    assert done.returncode == 0, done.stderr
    prefix = machine.root / "opt" / "stora-gateway"
    docs = [prefix / "deploy" / "README.md", prefix / "README.md", *prefix.glob("docs/*.md")]
    assert prefix / "docs" / "configuration.md" in docs
    for doc in docs:
        for target in re.findall(r"\]\(([^)#]+)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).is_file(), f"{doc}: {target} is not installed"
    assert (prefix / "deploy" / "gateway.example.toml").is_file()
    assert "runuser -u stora-gateway -- stora-gateway init --config" in done.stdout
    assert f"{prefix}/deploy/gateway.example.toml" in done.stdout
    assert not re.search(r"contract|fault matrix", done.stdout, re.IGNORECASE)


def test_an_install_of_the_old_layout_is_moved_and_planted_links_are_left_alone(
        machine: Machine) -> None:
    """The previous install.sh gave the agent /etc/stora-gateway.  Links it planted in
    secrets/ and next to the config stay links, pointing where they pointed, and their
    targets keep their owner and mode; the config moves to config/ with its content."""
    machine.old_layout("[site]\nid = \"site_old\"\n")
    conf = machine.conf
    planted = {conf / "secrets" / "evil": machine.outside / "shadow-copy",
               conf / "planted": machine.outside / "shadow-copy",
               conf / "secrets" / "crond": machine.outside / "cron.d"}
    for link, target in planted.items():
        link.symlink_to(target)
        os.lchown(link, AGENT_ID, AGENT_ID)
    (conf / "secrets" / "mqtt-password").chmod(0o644)  # a mistake install.sh fixes
    done = machine.install()
    assert done.returncode == 0, done.stderr
    untouched(machine)
    for link, target in planted.items():
        assert link.is_symlink()
        assert Path(os.readlink(link)) == target
    assert "left alone" in done.stdout
    assert owner_mode(conf) == (0, AGENT_ID, 0o750)
    assert owner_mode(conf / "secrets") == (0, AGENT_ID, 0o750)
    assert owner_mode(conf / "secrets" / "mqtt-password") == (AGENT_ID, AGENT_ID, 0o600)
    moved = conf / "config" / "gateway.toml"
    assert owner_mode(moved) == (AGENT_ID, AGENT_ID, 0o640)
    assert moved.read_text() == "[site]\nid = \"site_old\"\n"
    assert os.readlink(conf / "gateway.toml") == "config/gateway.toml"
    assert (conf / "gateway.toml").read_text() == moved.read_text()


PLANTS = {
    # The old layout, where the agent could rename anything in /etc/stora-gateway.
    "gateway.toml links to a file of root's": ("gateway.toml", "shadow-copy"),
    "secrets/ links to a directory of root's": ("secrets", "cron.d"),
    "config/ links to a directory of root's": ("config", "cron.d"),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_a_planted_link_where_a_file_or_directory_belongs_stops_the_install(
        machine: Machine, plant: str) -> None:
    """install.sh stops with one clear message naming the path, before it changes
    anything: the target outside keeps its owner and mode, /etc/stora-gateway stays as
    it was."""
    name, target = PLANTS[plant]
    machine.old_layout()
    conf = machine.conf
    victim = conf / name
    if victim.is_dir():
        for child in victim.iterdir():
            child.unlink()
        victim.rmdir()
    elif victim.exists():
        victim.unlink()
    victim.symlink_to(machine.outside / target)
    os.lchown(victim, AGENT_ID, AGENT_ID)
    before = owner_mode(conf)
    done = machine.install()
    assert done.returncode == 1, done.stdout
    message = done.stderr.strip()
    assert message.startswith(f"install.sh: {victim} "), message
    assert "symbolic link" in message
    untouched(machine)
    assert owner_mode(conf) == before
    assert victim.is_symlink()
    assert not (machine.root / "opt").exists()  # stopped before installing anything


def test_a_link_to_somewhere_else_named_gateway_toml_stops_the_install(
        machine: Machine) -> None:
    """The new layout's link must point to config/gateway.toml and nowhere else."""
    assert machine.install().returncode == 0
    link = machine.conf / "gateway.toml"
    link.unlink()
    link.symlink_to(machine.outside / "shadow-copy")
    done = machine.install()
    assert done.returncode == 1
    assert (f"{link} is a symbolic link to {machine.outside / 'shadow-copy'}, not "
            "config/gateway.toml") in done.stderr
    untouched(machine)


# ====================================================================== --uninstall
# Issue 12 item 8.  The agent's user writes config/ and its state directory; links it
# planted there must be removed as links, never followed, when root uninstalls.

INSTALLED = ("etc/systemd/system/stora-gateway.service",
             "etc/modules-load.d/stora-gateway.conf", "opt/stora-gateway")


def installed_site(machine: Machine) -> Path:
    """A fresh install, a config and a secret, a state database as the agent leaves it,
    and links the agent's user planted in its own directories.  Returns the state dir."""
    assert machine.install().returncode == 0
    conf = machine.conf
    (conf / "config" / "gateway.toml").write_text("[site]\nid = \"site_1\"\n")
    secret = conf / "secrets" / "mqtt-password"
    secret.write_text("pw\n")
    os.chown(secret, AGENT_ID, AGENT_ID)
    secret.chmod(0o600)
    state = machine.root / "var" / "lib" / "stora-gateway"
    state.mkdir(parents=True)
    (state / "gateway.db").write_bytes(b"SQLite format 3\x00")
    for link, target in ((conf / "config" / "evil", "shadow-copy"),
                         (conf / "config" / "crond", "cron.d"),
                         (state / "evil", "shadow-copy"), (state / "crond", "cron.d")):
        link.symlink_to(machine.outside / target)
        os.lchown(link, AGENT_ID, AGENT_ID)
    for path in (state, state / "gateway.db"):
        os.chown(path, AGENT_ID, AGENT_ID)
    return state


def test_uninstall_removes_the_install_and_keeps_config_secrets_and_state(
        machine: Machine) -> None:
    state = installed_site(machine)
    bin_link = machine.root / "usr" / "local" / "bin" / "stora-gateway"
    assert bin_link.is_symlink()
    done = machine.install("--uninstall")
    assert done.returncode == 0, done.stderr
    for path in INSTALLED:
        assert not (machine.root / path).exists(), path
    assert not bin_link.is_symlink()
    assert f"systemctl --root={machine.root} disable stora-gateway.service" in \
        machine.stub_calls()
    # Kept as they were, and said so.
    conf = machine.conf
    assert (conf / "config" / "gateway.toml").read_text() == "[site]\nid = \"site_1\"\n"
    assert (conf / "secrets" / "mqtt-password").read_text() == "pw\n"
    assert owner_mode(conf / "secrets" / "mqtt-password") == (AGENT_ID, AGENT_ID, 0o600)
    assert (state / "gateway.db").exists()
    assert f"{conf}: the config and the secrets" in done.stdout
    assert f"{state}: the state database" in done.stdout
    assert "--uninstall --purge" in done.stdout
    untouched(machine)
    assert not any(call.startswith(("userdel", "groupdel")) for call in machine.stub_calls())
    # Installing again picks the kept config up.
    again = machine.install()
    assert again.returncode == 0, again.stderr
    assert (conf / "gateway.toml").read_text() == "[site]\nid = \"site_1\"\n"


def test_uninstall_purge_removes_links_not_their_targets(machine: Machine) -> None:
    state = installed_site(machine)
    done = machine.install("--uninstall", "--purge")
    assert done.returncode == 0, done.stderr
    assert not machine.conf.exists()
    assert not state.exists()
    for path in INSTALLED:
        assert not (machine.root / path).exists(), path
    untouched(machine)
    calls = machine.stub_calls()
    assert "userdel stora-gateway" in calls
    assert "groupdel stora-gateway" in calls
    assert "Kept" not in done.stdout


@pytest.mark.parametrize("plant", ["var/lib/stora-gateway", "opt/stora-gateway",
                                   "etc/systemd/system/stora-gateway.service"])
def test_uninstall_stops_at_a_link_where_a_directory_or_file_belongs(
        machine: Machine, plant: str) -> None:
    """Only root can put these links there; all the same, uninstall refuses to follow
    one, before it stops or removes anything."""
    assert machine.install().returncode == 0
    victim = machine.root / plant
    if victim.is_dir():
        shutil.rmtree(victim)
    else:
        victim.unlink(missing_ok=True)
    victim.parent.mkdir(parents=True, exist_ok=True)
    target = machine.outside / ("shadow-copy" if plant.endswith(".service") else "cron.d")
    victim.symlink_to(target)
    (machine.outside / "cron.d" / "job").write_text("* * * * * root true\n")
    calls = machine.stub_calls()
    done = machine.install("--uninstall", "--purge")
    assert done.returncode == 1, done.stdout
    assert done.stderr.startswith(f"install.sh: {victim} is a symbolic link"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    untouched(machine)
    assert (machine.outside / "cron.d" / "job").exists()
    assert victim.is_symlink()
    assert machine.conf.is_dir()  # nothing removed
    assert machine.stub_calls() == calls  # nothing stopped or disabled


def test_uninstall_leaves_a_cli_link_it_did_not_make(machine: Machine) -> None:
    assert machine.install().returncode == 0
    bin_link = machine.root / "usr" / "local" / "bin" / "stora-gateway"
    bin_link.unlink()
    bin_link.symlink_to(machine.outside / "shadow-copy")
    done = machine.install("--uninstall")
    assert done.returncode == 0, done.stderr
    assert bin_link.is_symlink()
    assert f"{bin_link} (not the link this script made)" in done.stdout
    untouched(machine)


def test_purge_without_uninstall_is_bad_usage(machine: Machine) -> None:
    done = machine.install("--purge")
    assert done.returncode == 2
    assert done.stderr.splitlines()[0] == "install.sh: --purge goes with --uninstall"
    assert not (machine.root / "opt").exists()
