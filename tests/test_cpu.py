"""serve.cpu: usable cores and whether one would idle (pure parsing, plus this machine's real answers)."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from serve.cpu import (Spin, container_quota, cpu_cgroup_dirs, cpus_from_quota, open_loadavg, quota_in,
                       room_to_spin, runnable_others, usable_cpus)


def test_a_cgroup_quota_is_read_as_cores() -> None:
    assert cpus_from_quota("150000 100000\n") == 1.5
    assert cpus_from_quota("max 100000\n") is None
    assert cpus_from_quota("") is None


_MOUNTS = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
33 31 0:30 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_the_cpu_cgroups_of_a_process_are_found_with_their_ancestors() -> None:
    """v1's cpu controller and v2, from the host's view: the container's directory, then the pod's, up to
    the mount (a pod's limit binds its containers); other controllers are left out."""
    cgroups = "3:cpuset:/kubepods/pod1/c1\n2:cpu,cpuacct:/kubepods/pod1/c1\n0::/kubepods/pod1/c1\n"
    assert cpu_cgroup_dirs(_MOUNTS, cgroups) == [
        Path("/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/c1"), Path("/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1"),
        Path("/sys/fs/cgroup/cpu,cpuacct/kubepods"), Path("/sys/fs/cgroup/cpu,cpuacct"),
        Path("/sys/fs/cgroup/unified/kubepods/pod1/c1"), Path("/sys/fs/cgroup/unified/kubepods/pod1"),
        Path("/sys/fs/cgroup/unified/kubepods"), Path("/sys/fs/cgroup/unified")]


def test_a_container_that_sees_only_its_own_cgroup_reads_the_mount_itself() -> None:
    """In a cgroup namespace the process's path is "/" and the mount is its own cgroup; a path outside the
    mount's root (a bind-mounted sub-tree) also means the mount."""
    mounts = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
    assert cpu_cgroup_dirs(mounts, "0::/\n") == [Path("/sys/fs/cgroup")]
    bound = "29 23 0:26 /kubepods/pod1/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert cpu_cgroup_dirs(bound, "0::/elsewhere\n") == [Path("/sys/fs/cgroup")]
    assert cpu_cgroup_dirs(bound, "0::/kubepods/pod1/c1/sub\n") == [Path("/sys/fs/cgroup/sub"), Path("/sys/fs/cgroup")]


def test_a_directory_quota_is_read_from_v2_or_v1_files(tmp_path: Path) -> None:
    v2, v1, none = tmp_path / "v2", tmp_path / "v1", tmp_path / "none"
    for directory in (v2, v1, none):
        directory.mkdir()
    (v2 / "cpu.max").write_text("50000 100000\n")
    (v1 / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (none / "cpu.cfs_quota_us").write_text("-1\n")
    (none / "cpu.cfs_period_us").write_text("100000\n")
    assert (quota_in(v2), quota_in(v1), quota_in(none), quota_in(tmp_path / "missing")) == (0.5, 2.5, None, None)


def _quota_group() -> Path | None:
    """A new cgroup with a CPU quota of half a core under this machine's v1 cpu controller (or v2's root),
    None where this user may not make one."""
    for root, limit in ((Path("/sys/fs/cgroup/cpu"), {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "50000"}),
                        (Path("/sys/fs/cgroup"), {"cpu.max": "50000 100000"})):
        group = root / f"simplenn-test-{uuid.uuid4().hex[:8]}"
        try:
            group.mkdir()
        except OSError:
            continue
        try:
            for name, value in limit.items():
                (group / name).write_text(value)
            (group / "inner").mkdir()
            return group
        except OSError:
            group.rmdir()
    return None


def test_a_process_under_a_quota_below_its_cores_finds_it_and_never_spins() -> None:
    """A real cgroup with a quota of half a core on its parent: a process in the child finds the limit, and
    its spins are off (each would spend the quota that requests need; on a 1.5-core quota the one-connection
    p99 measured 18 ms with spins against 1 ms without)."""
    group = _quota_group()
    if group is None:
        pytest.skip("making a cgroup with a CPU quota needs root and a writable cpu controller")
    try:
        probe = "from serve.cpu import Spin, container_quota; print(container_quota(), Spin(0.0005).seconds)"
        script = f'echo $$ > {group / "inner" / "cgroup.procs"} && exec "$0" -c "$1"'
        out = subprocess.run(["sh", "-c", script, sys.executable, probe], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).resolve().parent.parent).stdout.split()
        assert out == ["0.5", "0.0"]
        if container_quota() is None:  # this test process, outside the group, may spin
            assert Spin(0.0005).seconds == 0.0005
    finally:
        (group / "inner").rmdir()
        group.rmdir()


def test_runnable_others_leaves_out_the_caller() -> None:
    assert runnable_others("0.52 0.40 0.35 3/412 9876\n") == 2


def test_this_machine_has_at_least_one_usable_core_and_an_answer_about_room_to_spin() -> None:
    assert 1 <= usable_cpus(container_quota()) <= len(os.sched_getaffinity(0))
    fd = open_loadavg()
    assert fd is not None
    try:
        for loadavg_fd in (None, fd):  # opened each time, or read again through one descriptor
            assert isinstance(room_to_spin(usable_cpus(container_quota()), loadavg_fd), bool)
            assert room_to_spin(10_000, loadavg_fd) is True  # more cores than anything could keep busy
            assert room_to_spin(-1, loadavg_fd) is False  # fewer than any count of other processes
    finally:
        os.close(fd)


def test_a_spin_returns_events_that_are_there_polls_for_its_time_and_not_at_all_when_off() -> None:
    a, b = socket.socketpair()
    with a, b, selectors.DefaultSelector() as selector:
        selector.register(a, selectors.EVENT_READ)
        spin = Spin(0.05)
        spin.cpus = 10_000  # as on a machine with idle cores
        started = time.monotonic()
        assert spin.until(lambda: selector.select(0)) is None and time.monotonic() - started >= 0.05  # it polled
        b.send(b"x")
        assert [key.fileobj for key, _ in spin.until(lambda: selector.select(0))] == [a]
        spin.cpus = -1  # as on a machine whose cores are all wanted: no poll at all, even with events waiting
        calls: list[int] = []
        assert spin.until(lambda: calls.append(1)) is None and calls == []
        off = Spin(0.0)
        started = time.monotonic()
        assert off.until(lambda: selector.select(0)) is None and time.monotonic() - started < 0.01  # off
