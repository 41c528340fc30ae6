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
    # Live, not ready: Triton's (strict) server readiness is false while any model reloads, as it does when a
    # config changes to load or unload a candidate version (1.2 s measured), though every version the routes
    # need keeps answering. Those versions' own readiness, below, is the precise check.
    if not await classifier.triton.server_live():
        return "triton not live", []
    needed = classifier.routed_models(state.experiment.weights)
    ready = await asyncio.gather(*(classifier.triton.model_ready(*classifier.pinned(n)) for n in needed))
    missing = [n for n, r in zip(needed, ready, strict=True) if not r]
    return ("models not ready", missing) if missing else (None, [])
