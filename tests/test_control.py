"""serve.control's Schedule, in-process: the control hub's timers and the calls queued from other threads."""

from __future__ import annotations

import select
import threading

from serve.control import Schedule


def run(fn) -> None:
    fn()


def test_due_timers_run_earliest_first_then_the_calls_that_woke_the_loop() -> None:
    schedule, ran = Schedule(), []
    try:
        assert schedule.timeout() is None  # no timer: the loop may block until a call wakes it
        schedule.call_later(60, lambda: ran.append("later"))
        assert 59 < schedule.timeout() <= 60
        schedule.call_later(0, lambda: ran.append("second"))
        schedule.call_later(-1, lambda: ran.append("first"))
        assert schedule.timeout() == 0.0
        caller = threading.Thread(target=schedule.call_soon, args=(lambda: ran.append("call"),))
        caller.start()
        caller.join()
        assert select.select([schedule.wake], [], [], 1.0)[0], "a queued call did not wake the loop"
        schedule.woken()
        assert not select.select([schedule.wake], [], [], 0)[0]
        schedule.run_due(run)
        assert ran == ["first", "second", "call"]
        schedule.run_due(run)  # each ran once; the later timer is not due
        assert ran == ["first", "second", "call"] and 59 < schedule.timeout() <= 60
    finally:
        schedule.close()


def test_a_timer_that_a_due_timer_sets_runs_in_the_same_pass_once_due() -> None:
    schedule, ran = Schedule(), []
    try:
        schedule.call_later(0, lambda: schedule.call_later(0, lambda: ran.append("chained")))
        schedule.run_due(run)
        assert ran == ["chained"] and schedule.timeout() is None
    finally:
        schedule.close()
