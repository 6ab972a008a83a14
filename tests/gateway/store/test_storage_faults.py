"""Storage failing under a running agent (fault matrix #25): the filesystem turns read-only.

Existing tests cover a read-only filesystem at start
(tests/gateway/outbox/test_outbox_*.py, tests/gateway/store/test_store_*.py) and a full one
while running.  Here the agent is running, with the database open, when its filesystem
goes read-only.

How it is injected: ``mount -o remount,ro`` is refused by the kernel (EBUSY) while any
file on the filesystem is open for writing, as the agent's database is; the test checks
that first.  A filesystem goes read-only under running processes when the kernel itself
does it after a storage error, so the database lives on a small ext4 filesystem in a
loop device mounted ``errors=remount-ro`` (Raspberry Pi OS mounts its root so), and the
error is raised through ext4's ``/sys/fs/ext4/<dev>/trigger_fs_error``: the same code
path a failing SD card takes.  From then on every write there fails with EROFS.

Recovery: ext4 refuses to go read-write again after an error remount while files are
open (``mount -o remount,rw`` succeeds but writes still fail: checked), so the agent's
alarm says a restart is needed after repair.  The repair done here is the one an
operator can do without stopping the agent: ``umount -l``, fsck a copy of the image and
mount it at the same place; the agent picks the repaired file up at its next write.

Needs root, mount(8), losetup/loop devices, mkfs.ext4 and e2fsck; skipped with the
reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devkit.sandbox import Sandbox
from devkit.site import PREFIX, SITE, RunningAgent, make_site
from devkit.testing import wait_for
from gateway.outbox.timeline import external_id_for

FS_SIZE = "16M"


@dataclass
class LoopExt4:
    """An ext4 filesystem in an image file, loop-mounted at ``mount_point``."""

    image: Path
    mount_point: Path

    def device(self) -> str:
        """The block device mounted at ``mount_point`` now (e.g. ``/dev/loop3``)."""
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if fields[1] == str(self.mount_point):
                return fields[0]
        raise AssertionError(f"nothing mounted at {self.mount_point}")

    def fail(self) -> None:
        """Make the kernel hit an ext4 error there: it turns the filesystem read-only."""
        name = Path(self.device()).name
        Path(f"/sys/fs/ext4/{name}/trigger_fs_error").write_text("test: storage fault #25\n")

    def remount(self, mode: str) -> subprocess.CompletedProcess[str]:
        """``mount -o remount,<mode>``; the result, not checked."""
        return subprocess.run(["mount", "-o", f"remount,{mode}", str(self.mount_point)],
                              capture_output=True, text=True, check=False)

    def repair_and_remount(self) -> None:
        """``umount -l`` the failed filesystem, fsck a copy and mount that in its place."""
        run(["umount", "-l", str(self.mount_point)])
        self.repair_and_remount_without_unmount()

    def repair_and_remount_without_unmount(self) -> None:
        """fsck a copy of the image and mount it at ``mount_point`` (already vacated)."""
        repaired = self.image.with_name(self.image.name + ".repaired")
        shutil.copyfile(self.image, repaired)
        fsck = subprocess.run(["e2fsck", "-fy", str(repaired)], capture_output=True,
                              text=True, check=False)
        assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr  # 1: errors fixed
        self.image = repaired
        run(["mount", "-o", "loop,errors=remount-ro", str(repaired), str(self.mount_point)])


def run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr.strip()}"


@pytest.fixture
def state_fs(tmp_path: Path) -> Iterator[LoopExt4]:
    """``tmp_path/state`` (the site's database directory) on a 16 MiB ext4 loop filesystem."""
    tools = ("mount", "umount", "mkfs.ext4", "e2fsck", "losetup")
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in tools):
        pytest.skip(f"needs root and {', '.join(tools)}: read-only-while-running untested")
    state = tmp_path / "state"
    state.mkdir()
    image = tmp_path / "state.img"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True,
                          text=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    done = subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(state)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here: {done.stderr.strip()}")
    fs = LoopExt4(image, state)
    try:
        if not Path(f"/sys/fs/ext4/{Path(fs.device()).name}/trigger_fs_error").exists():
            pytest.skip("this kernel has no ext4 trigger_fs_error to inject the error")
        yield fs
    finally:
        # Lazy: whatever is still mounted there (the failed one, the repaired one).
        while subprocess.run(["umount", "-l", str(state)], capture_output=True,
                             check=False).returncode == 0:
            pass


@pytest.mark.simulator_only
def test_filesystem_turning_read_only_under_the_agent(
        tmp_path: Path, broker: Any, state_fs: LoopExt4, sandbox: Sandbox) -> None:
    from gateway.ops.control import ControlClient

    site = make_site(tmp_path, broker, stora_url=sandbox.api_url)
    try:
        watcher = site.client()

        def command(cmd: str, unit: str, **claims: Any) -> tuple[str, dict[str, Any]]:
            jti, token = site.signer.command(cmd, unit, **claims)
            watcher.publish(f"{PREFIX}/cmd", token, qos=1)
            [msg] = watcher.expect(f"{PREFIX}/cmd/result", 5, where=lambda m: json.loads(
                m.payload)["jti"] == jti)
            return jti, dict(json.loads(msg.payload))

        def alarms(kind: str) -> list[dict[str, Any]]:
            found = [json.loads(m.payload) for m in watcher.messages(f"{PREFIX}/alarm")]
            return [a for a in found if a["kind"] == kind]

        def delivered(jti: str, kind: str) -> bool:
            return sandbox.count_by_external_id().get(
                external_id_for(SITE, jti, kind), 0) == 1

        running = RunningAgent(site.config_path)
        with running as agent:
            runner = running.thread
            j1, r1 = command("unlock", "unit_a101", dur=3)
            j2, r2 = command("unlock", "unit_a102", dur=600)
            assert r1["status"] == r2["status"] == "done"
            assert site.coil("unit_a101")
            assert site.coil("unit_a102")
            wait_for(lambda: delivered(j1, "unlocked") and delivered(j2, "unlocked"), 10)
            stored_before = agent.store.event_count()

            # An operator's remount is refused while the database is open for writing.
            refused = state_fs.remount("ro")
            assert refused.returncode != 0
            assert "busy" in refused.stderr
            state_fs.fail()  # the kernel turns the filesystem read-only under the agent
            refused_at_start = agent.store.events_refused

            # Locks keep working: a lock is driven though it cannot be recorded...
            _, r3 = command("lock", "unit_a102")
            assert r3["status"] == "failed"  # answered honestly: not recorded
            wait_for(lambda: not site.coil("unit_a102"), 5)
            # ...and the relock timer fires, its Timeline Event refused and counted.
            wait_for(lambda: not site.coil("unit_a101"), 6)
            wait_for(lambda: agent.store.events_refused > refused_at_start, 5)
            # An unlock cannot promise at-most-once without its inbox row: refused,
            # the door stays locked.
            _, r4 = command("unlock", "unit_a103", dur=5)
            assert r4["status"] == "failed"
            assert not site.coil("unit_a103")
            for _ in range(3):  # more failures: still one alarm
                command("lock", "unit_a101")
            assert agent.store.read_only

            [ro] = alarms("storage_read_only")  # one, not one per event
            assert "turned read-only" in ro["detail"]
            assert "RESTART THE AGENT" in ro["detail"]
            assert "Timeline Event(s) refused so far" in ro["detail"]
            status = ControlClient(site.socket_path, timeout=5).call("status")
            assert status["outbox"]["events_refused"] == agent.store.events_refused >= 1
            assert runner.is_alive()  # no crash, hence no crash loop
            # Nothing accepted was lost: what was stored before is still readable.
            assert agent.store.event_count() == stored_before

            # ext4 does not leave an error remount under open files: still read-only.
            state_fs.remount("rw")
            _, r5 = command("lock", "unit_a101")
            assert r5["status"] == "failed"
            assert len(alarms("storage_read_only")) == 1  # rate limited

            # Repaired and mounted in place: writes resume without a restart.
            state_fs.repair_and_remount()
            j6, r6 = command("lock", "unit_a103")
            assert r6["status"] == "done"
            assert not agent.store.read_only
            wait_for(lambda: delivered(j6, "locked"), 15)  # stored and delivered
            j7, r7 = command("unlock", "unit_a103", dur=600)
            assert r7["status"] == "done"
            assert site.coil("unit_a103")
            wait_for(lambda: delivered(j7, "unlocked"), 15)
            assert runner.is_alive()
            # Every event accepted before the failure is there, each delivered once.
            counts = sandbox.count_by_external_id()
            assert max(counts.values()) == 1
            assert agent.store.event_count() == stored_before + 2
    finally:
        site.close()



def test_an_empty_filesystem_mounted_in_place_is_not_taken_for_the_database(
        state_fs: LoopExt4, tmp_path: Path) -> None:
    """Only an existing database file is picked up: a fresh one would forget lockouts."""
    from gateway.outbox.timeline import make_event
    from gateway.store import Store, StoreReadOnly

    def event(n: int) -> Any:
        return make_event("locked", app_name="TestGate", site_id=SITE, unit="unit_a101",
                          reference="A-101", external_id=external_id_for(SITE, f"j{n}", "locked"),
                          occurred_at=1_800_000_000.0)

    db = state_fs.mount_point / "gateway.db"
    with Store(db) as store:
        with store.transaction() as tx:
            tx.add_event(event(1))
            tx.set_meta("lockout", "unit_a101")
        state_fs.fail()
        with pytest.raises(StoreReadOnly, match="RESTART THE AGENT"), \
                store.transaction() as tx:
            tx.add_event(event(2))
        assert store.events_refused == 1
        # A blank filesystem appears there: no database file, so the old one stays.
        blank = tmp_path / "blank.img"
        with blank.open("wb") as f:
            f.truncate(16 << 20)
        run(["mkfs.ext4", "-q", "-F", str(blank)])
        run(["umount", "-l", str(state_fs.mount_point)])
        run(["mount", "-o", "loop", str(blank), str(state_fs.mount_point)])
        with pytest.raises(StoreReadOnly), store.transaction() as tx:
            tx.add_event(event(3))
        assert not db.exists()  # nothing created behind the agent's back
        assert store.meta("lockout") == "unit_a101"  # reads still come from the old file
        assert store.read_only
        # The repaired filesystem is mounted instead: writes resume on the old contents.
        run(["umount", "-l", str(state_fs.mount_point)])
        state_fs.repair_and_remount_without_unmount()
        with store.transaction() as tx:
            assert tx.add_event(event(4))
        assert not store.read_only
        assert [e.external_id for e in store.events()] == [
            external_id_for(SITE, f"j{n}", "locked") for n in (1, 4)]
        assert store.meta("lockout") == "unit_a101"
