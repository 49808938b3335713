"""serve.heartbeat: when an API server counts as hung, and what one heartbeat round sends and kills.

The peers are real control connections (socket pairs); the test plays the API servers' side and the
clock (``tick(now)``), and records the kills it is asked for instead of sending SIGKILL. The real
thing (a SIGSTOPped API server is SIGKILLed and replaced) is ``tests/test_faults.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from serve.control import Peer
from serve.heartbeat import Heartbeat, Pulse, ping_interval
from tests.control_children import Child


class ApiServerEnd(Child):
    """The API server's end of one control connection: reads the pings, answers them when told."""

    def __init__(self, ident: int) -> None:
        super().__init__("api", ident, pid=4000 + ident)

    def pings(self) -> list[int]:
        """The numbers of the pings that have arrived since the last call."""
        messages = self.told()
        assert all(m["t"] == "ping" for m in messages), messages
        return [m["n"] for m in messages]


@pytest.fixture
def api_servers() -> Iterator[list[ApiServerEnd]]:
    ends = [ApiServerEnd(0), ApiServerEnd(1)]
    yield ends
    for end in ends:
        end.close()


def test_the_ping_interval_is_a_third_of_the_hang_timeout_and_at_least_a_second() -> None:
    assert ping_interval(30.0) == 10.0
    assert ping_interval(6.0) == 2.0
    assert ping_interval(2.0) == 1.0
    assert ping_interval(0.5) == 1.0


def test_a_pong_answers_its_ping_and_every_earlier_one() -> None:
    pulse = Pulse()
    assert pulse.silent_for(100.0) == 0.0
    assert [pulse.ping(t) for t in (0.0, 1.0, 2.0)] == [1, 2, 3]
    assert pulse.silent_for(2.5) == 2.5  # ping 1, sent at 0, is the oldest unanswered
    pulse.pong(2)
    assert pulse.silent_for(2.5) == 0.5  # only ping 3 (sent at 2) waits
    pulse.pong(1)  # late or repeated: changes nothing
    assert pulse.silent_for(2.5) == 0.5
    pulse.pong(3)
    assert pulse.silent_for(2.5) == 0.0


def test_an_api_server_that_stops_answering_is_killed_once_after_the_hang_timeout(
        api_servers: list[ApiServerEnd], caplog: pytest.LogCaptureFixture) -> None:
    """Hang timeout 3 s (a ping a second): API server 0 answers every ping, API server 1 stops answering
    after the ping of t=4 (its first unanswered ping is t=5): it is killed at t=8, once, with one error
    line naming it; API server 0 is never killed and keeps being pinged."""
    answering, stopped = api_servers
    kills: list[tuple[float, Peer]] = []
    now = 0.0
    heartbeat = Heartbeat(lambda: [end.peer for end in api_servers], lambda peer: kills.append((now, peer)), 3.0)
    assert heartbeat.interval == 1.0
    with caplog.at_level(logging.ERROR, logger="serve.heartbeat"):
        for step in range(13):
            now = float(step)
            heartbeat.tick(now)
            for number in answering.pings():
                heartbeat.pong(answering.peer, number)
            for number in stopped.pings():
                if now <= 4.0:
                    heartbeat.pong(stopped.peer, number)
    assert kills == [(8.0, stopped.peer)]
    assert heartbeat.pulses[answering.peer].sent == 13 and not heartbeat.pulses[answering.peer].unanswered
    assert heartbeat.pulses[stopped.peer].sent == 8  # no ping after the kill
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["API server 1 (pid 4001) did not answer a ping for 3.0 s (hang timeout 3 s): it is hung; "
                      "killing it"]


def test_an_api_server_that_left_is_forgotten(api_servers: list[ApiServerEnd]) -> None:
    """A closed API server drops out of the next round (its replacement starts with a clean record); a
    pong from it after that is ignored."""
    connected = list(api_servers)
    kills: list[Peer] = []
    heartbeat = Heartbeat(lambda: [end.peer for end in connected], kills.append, 2.0)
    heartbeat.tick(0.0)
    gone = connected.pop()
    heartbeat.tick(1.0)
    assert set(heartbeat.pulses) == {connected[0].peer}
    heartbeat.pong(gone.peer, 1)
    heartbeat.tick(5.0)
    assert kills == [connected[0].peer]  # it did not answer either
