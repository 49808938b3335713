"""serve.cpu: usable cores and whether one would idle (pure parsing, plus this machine's real answers)."""

from __future__ import annotations

import os
import selectors
import socket
import time

from serve.cpu import Spin, cpus_from_quota, open_loadavg, room_to_spin, runnable_others, usable_cpus


def test_a_cgroup_quota_is_read_as_cores() -> None:
    assert cpus_from_quota("150000 100000\n") == 1.5
    assert cpus_from_quota("max 100000\n") is None
    assert cpus_from_quota("") is None


def test_runnable_others_leaves_out_the_caller() -> None:
    assert runnable_others("0.52 0.40 0.35 3/412 9876\n") == 2


def test_this_machine_has_at_least_one_usable_core_and_an_answer_about_room_to_spin() -> None:
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
    fd = open_loadavg()
    assert fd is not None
    try:
        for loadavg_fd in (None, fd):  # opened each time, or read again through one descriptor
            assert isinstance(room_to_spin(usable_cpus(), loadavg_fd), bool)
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
