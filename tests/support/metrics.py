"""Reading a Prometheus scrape in tests: every sample by name and labels."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for one not there yet (a labelled counter before its first inc)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
        response.raise_for_status()
        assert response.headers["content-type"].startswith("text/plain")
        return parse(response.text)


async def until(url: str, check: Callable[[Samples], bool], timeout: float = 20.0) -> Samples:
    """Scrape until `check` holds (the numbers a worker writes after a reply lag its event)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(url)
        if check(samples) or asyncio.get_running_loop().time() > deadline:
            return samples
        await asyncio.sleep(0.1)
