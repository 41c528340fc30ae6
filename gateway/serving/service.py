"""What a classification does, independent of HTTP: resolve the model, call Triton, fuse, rank."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.errors import GatewayError, Unavailable, UnknownModel, echo
from gateway.serving.admission import ANYONE, AdmissionControl
from gateway.settings import GatewaySettings
from gateway.telemetry import tracing
from gateway.telemetry.metrics import GatewayMetrics
from gateway.triton.client import TritonClient
from kdcontract.fusion import fuse, fuse_heads, softmax
from kdcontract.manifest import Manifest, ModelEntry
from kdcontract.names import (
    AUTO,
    CASCADE,
    ENSEMBLE,
    GATEWAY_NAMES,
    NOT_CALLABLE_ROLES,
    STUDENT_KD,
    TEACHER,
    callable_names,
    candidate_names,
    model_aliases,
    served_entry,
)

# The app's state namespace (starlette's `State` on the FastAPI app): the classifier, the experiment, the
# pools and stores a request uses. Any here, so the serving core imports no web framework.
ReplicaState = Any


@dataclass
class Outcome:
    model: str
    version: int | None
    probabilities: np.ndarray  # [N, C]
    inference_ms: float
    fusion_ms: float
    degraded: bool = False
    members: list[str] = field(default_factory=list)
    answered_by: list[str] | None = None  # cascade: the model that answered each image


class Classifier:
    def __init__(
        self,
        manifest: Manifest,
        triton: TritonClient,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        admission: AdmissionControl,
    ):
        self.manifest, self.triton, self.settings, self.metrics = manifest, triton, settings, metrics
        self.admission = admission
        self.variants = [m.name for m in manifest.by_role("variant")]
        self.aliases = model_aliases(manifest)
        self.class_names = next(iter(manifest.models.values())).class_names
        self.preprocessing = manifest.preprocessing

    def resolve(self, name: str) -> str:
        """An alias or served model name -> what to run (a manifest model or the gateway ensemble)."""
        if name in self.aliases:
            return self.aliases[name]
        entry = served_entry(self.manifest, name)
        if entry is None or entry.role in NOT_CALLABLE_ROLES:
            known = ", ".join(callable_names(self.manifest))
            raise UnknownModel(f"unknown model {echo(name)}; choose one of: {known}, {AUTO}")
        return name

    def entry(self, target: str) -> ModelEntry:
        """The manifest entry a resolved target runs: a model's current version, or `NAME@VERSION`'s."""
        entry = served_entry(self.manifest, target)
        if entry is None:
            raise UnknownModel(f"{echo(target)} is not served by this manifest")
        return entry

    def pinned(self, target: str) -> tuple[str, int]:
        """The Triton model and version a resolved target calls."""
        entry = self.entry(target)
        return entry.name, entry.version

    def check_share(self, name: str, caller: str, arms: Iterable[str]) -> None:
        """Refuse `caller` before its body is read when it already holds its share of what `name` calls
        (`auto`: of what the experiment's `arms` may call)."""
        targets = self.routed_models(arms) if name == AUTO else self.triton_models(self.resolve(name))
        self.admission.check_share(targets, caller)

    def admit(self, target: str, images: int, caller: str) -> AbstractContextManager[None]:
        """Hold `images` against every Triton model `target` may call, or raise Overloaded (admission control,
        shared fairly between callers)."""
        return self.admission.admit(self.triton_models(target), images, caller)

    def triton_models(self, target: str) -> list[str]:
        if target == ENSEMBLE:
            return self.variants
        if target == CASCADE:
            return [self.manifest.cascade.student, self.manifest.cascade.teacher]
        return [target]

    def routed_models(self, arms: Iterable[str] | None = None) -> list[str]:
        """Every Triton model some route depends on (for /readyz): the A/B arms (the running
        experiment's, else the start-up settings'), the student, the teacher, the variants and both
        versions of a model with a candidate (`NAME@VERSION`, as `pinned` reads them)."""
        arms = self.settings.ab_weights if arms is None else arms
        needed = {self.aliases.get(a, a) for a in arms if a in self.aliases or served_entry(self.manifest, a)}
        needed |= {STUDENT_KD, TEACHER} & set(self.manifest.models)
        needed |= set(candidate_names(self.manifest))
        needed |= set(self.variants)
        if CASCADE in needed:
            needed |= set(self.triton_models(CASCADE))
        return sorted(needed - set(GATEWAY_NAMES))

    async def classify(self, target: str, images: np.ndarray, caller: str = ANYONE) -> Outcome:
        """`target`'s answer for `images`; `caller` (an API key id): a large request goes to Triton in slices
        while other callers' small requests share the model (`gateway.serving.admission`)."""
        if target == ENSEMBLE:
            return await self._ensemble(images, caller)
        if target == CASCADE:
            with tracing.span("cascade", images=len(images)):
                return await self._cascade(images, caller)
        entry = self.entry(target)
        start = time.perf_counter()
        output = "probabilities" if entry.role == "ensemble" else "logits"
        # Pinned to the manifest's version: weights and the temperature they were calibrated with go
        # together, so a Triton serving another version is a 503, never a mis-calibrated answer.
        sliced = self.admission.slice_for(target, caller)
        raw = await self.triton.infer(entry.name, images, output=output, version=entry.version, slice_images=sliced)
        inference_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        probabilities = self._calibrated(entry, raw)
        fusion_ms = (time.perf_counter() - start) * 1000
        return Outcome(target, entry.version, probabilities, inference_ms, fusion_ms, members=list(entry.members))

    def _calibrated(self, entry: ModelEntry, raw: np.ndarray) -> np.ndarray:
        if entry.role == "ensemble":
            return raw.astype(np.float64)  # Triton's ensemble already fused calibrated probabilities
        if raw.ndim == 3:  # K-head model: the heads are fused like ensemble members
            with self.metrics.fusion_seconds.labels("heads").time():
                return fuse_heads(raw, entry.temperature)
        return softmax(raw, entry.temperature)

    async def _ensemble(self, images: np.ndarray, caller: str) -> Outcome:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(
                self.triton.infer(
                    n, images, version=self.manifest.models[n].version, slice_images=self.admission.slice_for(n, caller)
                )
                for n in self.variants
            ),
            return_exceptions=True,
        )
        inference_ms = (time.perf_counter() - start) * 1000
        answered = [(n, r) for n, r in zip(self.variants, results, strict=True) if isinstance(r, np.ndarray)]
        failures = [r for r in results if not isinstance(r, np.ndarray)]
        for failure in failures:
            if not isinstance(failure, GatewayError):
                raise failure
        quorum = min(self.settings.ensemble_quorum, len(self.variants))
        if len(answered) < quorum:
            raise Unavailable(
                f"ensemble below quorum: {len(answered)} of {len(self.variants)} members answered, {quorum} needed",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        degraded = len(answered) < len(self.variants)
        if degraded:
            self.metrics.degraded.inc()
        start = time.perf_counter()
        names = [n for n, _ in answered]
        weights = [self.settings.fusion_weights.get(n, 1.0) for n in names]
        with tracing.span("fusion", method=self.settings.fusion, members=len(names)):
            probabilities = fuse(
                [r for _, r in answered],
                [self.manifest.models[n].temperature for n in names],
                self.settings.fusion,
                weights,
            )
        fusion_s = time.perf_counter() - start
        self.metrics.child(self.metrics.fusion_seconds, self.settings.fusion).observe(fusion_s)
        return Outcome(ENSEMBLE, None, probabilities, inference_ms, fusion_s * 1000, degraded, names)

    async def _cascade(self, images: np.ndarray, caller: str) -> Outcome:
        """The student answers every image; those below the threshold are asked of the teacher.

        If the teacher fails, the student's answers stand and the response says `degraded`: a
        cascade is never less available than its student.
        """
        cascade = self.manifest.cascade
        first = await self.classify(cascade.student, images, caller)
        probabilities = first.probabilities
        unsure = probabilities.max(axis=-1) < cascade.threshold
        answered_by = [cascade.student] * len(images)
        inference_ms, degraded = first.inference_ms, False
        if unsure.any():
            escalated = int(unsure.sum())
            try:
                second = await self.classify(cascade.teacher, images[unsure], caller)
            except GatewayError:
                self.metrics.cascade_escalations.labels("failed").inc(escalated)
                degraded = True
            else:
                self.metrics.cascade_escalations.labels("answered").inc(escalated)
                probabilities = probabilities.copy()
                probabilities[unsure] = second.probabilities
                for i in np.flatnonzero(unsure):
                    answered_by[i] = cascade.teacher
                inference_ms += second.inference_ms
        members = sorted(set(answered_by), key=[cascade.student, cascade.teacher].index)
        return Outcome(
            CASCADE, None, probabilities, inference_ms, first.fusion_ms, degraded, members, answered_by=answered_by
        )

    def top_k(self, probabilities: np.ndarray, k: int) -> list[list[dict]]:
        k = min(k, probabilities.shape[-1])
        order = np.argsort(-probabilities, axis=-1)[:, :k]
        return [
            [{"label": self.class_names[i], "index": int(i), "probability": float(row[i])} for i in ranked]
            for row, ranked in zip(probabilities, order, strict=True)
        ]
