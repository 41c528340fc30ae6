"""Where counts come from, behind one interface (`CountSource.read_by_instance()`: counts per replica), so
the gates and the rollout controller never know: this process's registry (`GET /v1/experiment` on one replica), the
/metrics text of the replicas (the controller, no Prometheus needed), or Prometheus' query API (the
controller, summed over every replica Prometheus scrapes)."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.experiments.counts import (
    INFERENCE_ROUTES,
    LATENCY_STATUS,
    SERIES,
    Counts,
    Sample,
    counts_from_samples,
    minus,
    total,
)


class CountSource(Protocol):
    def read_by_instance(self) -> dict[str, Counts]:
        """The counts now, per replica (the controller follows each replica's series through restarts)."""
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


@dataclass(frozen=True)
class RegistryCounts:
    """This process's own series."""

    registry: CollectorRegistry

    def read_by_instance(self) -> dict[str, Counts]:
        return {"local": registry_counts(self.registry)}


@dataclass(frozen=True)
class ReplicaCounts:
    """The replicas' /metrics, fetched one after another, each replica by its URL."""

    metrics_urls: tuple[str, ...]
    timeout_s: float = 5.0

    def read_by_instance(self) -> dict[str, Counts]:
        return {url: scraped_counts([fetch_metrics(url, self.timeout_s)]) for url in self.metrics_urls}


# Labels that say what a sample counts, not which replica counted it.
_MEANING = {"__name__", "route", "model", "status", "method"} | {k for _, keys in SERIES.values() for k in keys}


@dataclass(frozen=True)
class PrometheusCounts:
    """Every replica Prometheus scrapes that `selector` names (e.g. `job="kdserve-gateway",namespace="prod"`:
    required, so a staging gateway scraped by the same Prometheus never counts in production's gates), each
    replica by the labels that tell its series apart (instance, pod, ...). The series are read as they are,
    not `sum by`: a replica's restart is seen on its own series."""

    base_url: str
    selector: str
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.selector.strip():
            raise ValueError(
                "a Prometheus count source needs a selector naming the gateways to judge "
                '(e.g. job="kdserve-gateway",namespace="prod")'
            )

    def queries(self) -> list[str]:
        queries = []
        for name, (_, keys) in SERIES.items():
            matchers = [self.selector]
            if "le" in keys:
                # A regular expression inside a PromQL string: its backslashes escaped once more.
                routes = "|".join(re.escape(route).replace("\\", "\\\\") for route in INFERENCE_ROUTES)
                matchers += [f'route=~"{routes}"', f'status="{LATENCY_STATUS}"', 'arm!=""']
            queries.append(f"{name}{{{','.join(matchers)}}}")
        return queries

    def read_by_instance(self) -> dict[str, Counts]:
        samples: dict[str, list[Sample]] = {}
        for query in self.queries():
            url = f"{self.base_url.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:  # an operator-given URL
                body = json.load(resp)
            if body.get("status") != "success":
                raise RuntimeError(f"Prometheus refused {query!r}: {body}")
            for result in body["data"]["result"]:
                labels = dict(result["metric"])
                instance = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in _MEANING)
                samples.setdefault(instance, []).append((labels["__name__"], labels, float(result["value"][1])))
        return {instance: counts_from_samples(found) for instance, found in samples.items()}


class LocalStep:
    """This replica's counts since it took up the experiment's current step (a new file, a new weight):
    what `GET /v1/experiment` judges when asked one replica. The controller judges every replica's
    increases since the step began instead (`counts.StepLedger`)."""

    def __init__(self, source: CountSource) -> None:
        self.source = source  # one process: its series never reset under it
        self.identity: str | None = None
        self.baseline: Counts = {}
        self.started = time.time()

    def restart(self, identity: str) -> None:
        if identity != self.identity:
            self.identity, self.baseline, self.started = identity, total(self.source.read_by_instance()), time.time()

    def counts(self) -> Counts:
        return minus(total(self.source.read_by_instance()), self.baseline)

    def age_s(self) -> float:
        return time.time() - self.started
