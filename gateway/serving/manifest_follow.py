"""The gateway follows the repository: a re-exported manifest is taken up once Triton serves it.

Calls pin the manifest's model versions (weights and the temperature fitted for them go together).
When `manifest.json` changes (an export wrote newer versions), the new manifest is read and checked
against the settings, and the gateway switches to it as soon as Triton reports every version it routes
to READY: at once if Triton polls its repository, after Triton's restart if not. Until then the old
manifest keeps serving the versions Triton still has, so a re-export never makes the gateway answer
with one version's weights and another's calibration, and never drops the old one before the new is up.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from gateway.errors import GatewayError
from gateway.files import file_stamp
from gateway.serving.service import Classifier, ReplicaState
from gateway.settings import GatewaySettings
from kdcontract.manifest import MANIFEST_NAME, Manifest, SchemaMismatch, read_manifest
from kdcontract.names import GATEWAY_NAMES, model_aliases, served_entry

log = logging.getLogger("kdserve.gateway")


def check_against_manifest(settings: GatewaySettings, manifest: Manifest) -> None:
    """Settings that name models must name served ones; refused at start-up, never at request time."""
    taken = set(GATEWAY_NAMES) & set(manifest.models)
    if taken:
        raise GatewayError(
            f"the repository serves a model named {sorted(taken)}, a name of what the gateway composes "
            f"({', '.join(GATEWAY_NAMES)}); re-export it with this version (python -m training export)"
        )
    aliases = model_aliases(manifest)
    unknown_arms = {a for a in settings.ab_weights if a not in aliases and served_entry(manifest, a) is None}
    if unknown_arms:
        raise GatewayError(f"ab_weights names arms that are not served: {sorted(unknown_arms)}")
    variants = [m.name for m in manifest.by_role("variant")]
    unknown_members = set(settings.fusion_weights) - set(variants)
    if unknown_members:
        raise GatewayError(f"fusion_weights names models that are not ensemble variants: {sorted(unknown_members)}")
    if variants and settings.ensemble_quorum > len(variants):
        raise GatewayError(f"ensemble_quorum {settings.ensemble_quorum} exceeds the {len(variants)} served variants")


class ManifestFollower:
    def __init__(self, state: ReplicaState, settings: GatewaySettings):
        self.state, self.settings = state, settings
        self.path = Path(settings.repo) / MANIFEST_NAME
        self.seen = file_stamp(self.path)  # the file the gateway started with
        self.waiting_for: Manifest | None = None
        self._checking = asyncio.Lock()  # the poll and requests whose version went away may check at once

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.manifest_poll_s)
            try:
                await self.check()
            except Exception:  # a poll must never kill the follower; the next one tries again
                log.exception("manifest check failed")

    async def check(self) -> str:
        """One poll: 'same', 'refused' (unreadable or inconsistent), 'waiting' (Triton does not serve
        the new versions yet) or 'switched'."""
        async with self._checking:
            return await self._check()

    async def _check(self) -> str:
        metrics = self.state.metrics
        stamp = file_stamp(self.path)
        if stamp == self.seen and self.waiting_for is None:
            return "same"
        if stamp != self.seen:
            self.seen = stamp
            try:
                manifest = read_manifest(self.path.parent)
                check_against_manifest(self.settings, manifest)
            except (OSError, ValueError, SchemaMismatch, GatewayError) as exc:
                log.error("new manifest refused, keeping the one in use: %s", exc)
                metrics.manifest_reloads.labels("refused").inc()
                self.waiting_for = None
                return "refused"
            if manifest == self.state.classifier.manifest:
                self.waiting_for = None
                return "same"
            self.waiting_for = manifest
        current: Classifier = self.state.classifier
        candidate = Classifier(self.waiting_for, current.triton, self.settings, metrics, current.admission)
        needed = candidate.routed_models()
        versions = [candidate.pinned(n)[1] for n in needed]
        ready = await asyncio.gather(*(current.triton.model_ready(*candidate.pinned(n), shared=False) for n in needed))
        if not all(ready):
            metrics.manifest_reloads.labels("waiting").inc()
            return "waiting"
        self.state.classifier = candidate
        self.waiting_for = None
        metrics.manifest_reloads.labels("switched").inc()
        log.warning("switched to the re-exported manifest: %s", dict(zip(needed, versions, strict=True)))
        return "switched"
