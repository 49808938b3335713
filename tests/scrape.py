"""Reading the server's /metrics in tests.

An inference worker records a batch's metrics just after it has sent the batch's answers (off their
path), so a scrape made the moment an answer arrives may come a few microseconds early:
:func:`scrape_when` scrapes until the counts a test expects are there, and returns the last scrape
otherwise, for the test's assertions to fail on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample at ``url``/metrics, keyed by (name, sorted labels)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    """One sample's value (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_when(url: str, ready: Callable[[dict[tuple[str, tuple], float]], bool],
                timeout: float = 5.0) -> dict[tuple[str, tuple], float]:
    """Scrape until ``ready(samples)`` holds, for up to ``timeout`` seconds; the last scrape either way."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.01)
