"""Where counts come from, behind one interface (`CountSource.read() -> Counts`), so the gates and the
rollout controller never know: this process's registry (`GET /v1/experiment` on one replica), the
/metrics text of the replicas (the controller, no Prometheus needed), or Prometheus' query API (the
controller, summed over every replica Prometheus scrapes)."""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.experiments.counts import LATENCY_FILTER, SERIES, Counts, Sample, counts_from_samples, minus


class CountSource(Protocol):
    def read(self) -> Counts:
        """The counts now, summed over whatever this source covers."""
        ...


def registry_counts(registry: CollectorRegistry) -> Counts:
    return counts_from_samples((s.name, s.labels, s.value) for family in registry.collect() for s in family.samples)


def scraped_counts(texts: Iterable[str]) -> Counts:
    """Summed over the /metrics texts of several replicas."""
    return counts_from_samples(
        (s.name, s.labels, s.value)
        for text in texts
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )


def fetch_metrics(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # an operator-given URL
        return resp.read().decode()


def prometheus_counts(base_url: str, timeout_s: float = 5.0) -> Counts:
    """Summed by Prometheus over every replica it scrapes (`sum by`), one query a series."""
    samples: list[Sample] = []
    for name, (_, keys) in SERIES.items():
        matchers = ",".join(f'{k}="{v}"' for k, v in LATENCY_FILTER.items()) + ',arm!=""' if "le" in keys else ""
        query = f"sum by ({','.join(keys)}) ({name}{{{matchers}}})"
        url = f"{base_url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # an operator-given URL
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {query!r}: {body}")
        for result in body["data"]["result"]:
            labels = dict(result["metric"]) | LATENCY_FILTER if "le" in keys else dict(result["metric"])
            samples.append((name, labels, float(result["value"][1])))
    return counts_from_samples(samples)


@dataclass(frozen=True)
class RegistryCounts:
    """This process's own series."""

    registry: CollectorRegistry

    def read(self) -> Counts:
        return registry_counts(self.registry)


@dataclass(frozen=True)
class ReplicaCounts:
    """Summed over the replicas' /metrics, fetched one after another."""

    metrics_urls: tuple[str, ...]
    timeout_s: float = 5.0

    def read(self) -> Counts:
        return scraped_counts(fetch_metrics(url, self.timeout_s) for url in self.metrics_urls)


@dataclass(frozen=True)
class PrometheusCounts:
    """Summed by Prometheus over every replica it scrapes."""

    base_url: str
    timeout_s: float = 5.0

    def read(self) -> Counts:
        return prometheus_counts(self.base_url, self.timeout_s)


class LocalStep:
    """This replica's counts since it took up the experiment's current step (a new file, a new weight):
    what `GET /v1/experiment` judges when asked one replica. The controller judges the sum over every
    replica since the step's baseline instead."""

    def __init__(self, source: CountSource) -> None:
        self.source = source
        self.identity: str | None = None
        self.baseline: Counts = {}
        self.started = time.time()

    def restart(self, identity: str) -> None:
        if identity != self.identity:
            self.identity, self.baseline, self.started = identity, self.source.read(), time.time()

    def counts(self) -> Counts:
        return minus(self.source.read(), self.baseline)

    def age_s(self) -> float:
        return time.time() - self.started
