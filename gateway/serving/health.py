"""Whether this replica can serve every route now: draining, Triton's readiness and the routed models'."""

from __future__ import annotations

import asyncio

from gateway.serving.service import Classifier, ReplicaState


async def not_ready(state: ReplicaState) -> tuple[str | None, list[str]]:
    """Why this gateway cannot serve every route now (None when it can), and the models not READY:
    draining, Triton not ready, or a model some route needs not loaded (`/readyz`, `/v2/health/ready`)."""
    classifier: Classifier = state.classifier
    if getattr(state, "draining", False):
        return "draining: shutting down", []
    if not await classifier.triton.server_ready():
        return "triton not ready", []
    needed = classifier.routed_models(state.experiment.weights)
    versions = {n: classifier.manifest.models[n].version for n in needed}
    ready = await asyncio.gather(*(classifier.triton.model_ready(n, v) for n, v in versions.items()))
    missing = [n for n, r in zip(needed, ready, strict=True) if not r]
    return ("models not ready", missing) if missing else (None, [])
