"""A served model's versions: the current one, and a candidate on trial beside it until a rollout promotes or
rejects it. These are repository edits (the manifest, and the config's `version_policy`, which tells Triton
which version directories to load); training adds a candidate, the rollout controller ends its trial.

Triton loads exactly the versions a config lists (`version_policy { specific { versions: [...] } }`): the
current version alone, or the current and the candidate. Promotion moves "current" in the manifest and
leaves the config as it is, so the version it replaced stays loaded (a warm fallback) until the next
candidate's export lists [current, new]. Rejection writes the manifest first (no gateway routes to the
candidate from its next poll, and none waits for it to be READY), then the config without the candidate:
Triton unloads it.

Needs Triton's config schema (`tritonclient`), installed with both the `train` and `serve` extras.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from kdcontract.errors import UserError
from kdcontract.manifest import CandidateVersion, Cascade, Manifest, ModelEntry, read_manifest, write_manifest
from kdcontract.names import INT8_SUFFIX, VERSION_MARK

CONFIG = "config.pbtxt"


def load_only(config: pb.ModelConfig, versions: list[int]) -> None:
    """Triton loads exactly `versions` of this model (and unloads any other it has loaded)."""
    config.ClearField("version_policy")
    config.version_policy.specific.versions.extend(sorted(set(versions)))


def config_loading(path: Path, versions: list[int]) -> str:
    """The text of the config at `path` made to load exactly `versions` (not written)."""
    config = text_format.Parse(Path(path).read_text(), pb.ModelConfig())
    load_only(config, versions)
    return text_format.MessageToString(config)


STAGING_PREFIX = ".incoming-"  # a name Triton ignores ("fails to convert to integral number" for a version)


def replace_file(path: Path, text: str) -> None:
    """`path` written whole or not at all (staged under a name Triton ignores, then renamed over the old one):
    a Triton polling the repository, or a gateway, reads the old file or the new one, never half."""
    staged = path.with_name(f"{STAGING_PREFIX}{path.name}")
    staged.write_text(text)
    os.replace(staged, path)


def loaded_by_config(config: pb.ModelConfig) -> list[int] | None:
    """The versions a `specific` policy names; None for another policy (latest / all)."""
    if config.version_policy.WhichOneof("policy_choice") != "specific":
        return None
    return sorted(config.version_policy.specific.versions)


def split_versioned(name: str) -> tuple[str, int]:
    """`student_kd@4` -> ("student_kd", 4); a name without a version is a UserError."""
    base, mark, version = name.partition(VERSION_MARK)
    if not mark or not version.isdigit():
        raise UserError(f"{name!r} names no version: give NAME{VERSION_MARK}VERSION")
    return base, int(version)


def _trial(manifest: Manifest, repo: Path, name: str, version: int) -> list[ModelEntry]:
    """`name` and its INT8 sibling, each with `version`'s candidate on trial (the sibling is quantized from the
    candidate's weights at the same export, and shares its fate)."""
    entry = manifest.models.get(name)
    if entry is None or entry.candidate is None or entry.candidate.version != version:
        on_trial = entry.candidate.version if entry is not None and entry.candidate is not None else None
        raise UserError(
            f"{repo}: {name} version {version} is not on trial"
            + (f" (its candidate is version {on_trial})" if on_trial else f" ({name} has no candidate)")
        )
    sibling = manifest.models.get(name + INT8_SUFFIX)
    return [entry] + ([sibling] if sibling is not None and sibling.candidate is not None else [])


def on_trial(
    current: ModelEntry, new: ModelEntry, offline_gate: dict | None = None, cascade: Cascade | None = None
) -> ModelEntry:
    """`current` with `new` (a version just written beside it, with the config that loads both) as its candidate."""
    model_wide = {p: d for p, d in new.files.items() if _is_model_file(current.name, p)}
    in_version = {p: d for p, d in new.files.items() if p not in model_wide}
    candidate = CandidateVersion(
        version=new.version,
        temperature=new.temperature,
        metrics=new.metrics,
        files=in_version,
        source=new.source,
        offline_gate=offline_gate or {},
        cascade=cascade,
        drift_reference=new.drift_reference,
    )
    return current.model_copy(update={"files": {**current.files, **model_wide}, "candidate": candidate})


def check_no_trial(entry: ModelEntry) -> None:
    """A model has one candidate at a time: a rollout may be judging the one on trial."""
    if entry.candidate is not None:
        on_trial = f"{entry.name}{VERSION_MARK}{entry.candidate.version}"
        raise UserError(
            f"{on_trial} is still on trial: end its trial first "
            f"(python -m training versions promote|reject {on_trial} --repo REPO)"
        )


def promote(repo: Path, name: str, version: int) -> list[str]:
    """The candidate becomes the current version (and its refitted cascade the cascade); what moved."""
    repo = Path(repo)
    manifest = read_manifest(repo)
    moved = []
    for entry in _trial(manifest, repo, name, version):
        candidate = entry.candidate
        kept = {path: digest for path, digest in entry.files.items() if _is_model_file(entry.name, path)}
        if candidate.cascade is not None:
            manifest.cascade = candidate.cascade
        manifest.models[entry.name] = entry.model_copy(
            update={
                "version": candidate.version,
                "temperature": candidate.temperature,
                "metrics": candidate.metrics,
                "files": {**kept, **candidate.files},
                "source": candidate.source,
                "drift_reference": candidate.drift_reference,
                "candidate": None,
            }
        )
        moved.append(f"{entry.name} version {entry.version} -> {candidate.version}")
    write_manifest(repo, manifest)
    return moved


def reject(repo: Path, name: str, version: int) -> list[str]:
    """The candidate leaves the manifest, then its config: Triton unloads it; what was unloaded."""
    repo = Path(repo)
    manifest = read_manifest(repo)
    configs = {}
    rejected = []
    for entry in _trial(manifest, repo, name, version):
        path = repo / entry.name / CONFIG
        configs[path] = config_loading(path, [entry.version])
        files = {**entry.files, f"{entry.name}/{CONFIG}": hashlib.sha256(configs[path].encode()).hexdigest()}
        manifest.models[entry.name] = entry.model_copy(update={"candidate": None, "files": files})
        rejected.append(f"{entry.name} version {entry.candidate.version}")
    write_manifest(repo, manifest)  # first: no gateway waits for the candidate once Triton drops it
    for path, text in configs.items():
        replace_file(path, text)
    return rejected


def _is_model_file(name: str, path: str) -> bool:
    """A model-wide file (its config, labels), not one of a version directory's."""
    parts = Path(path).parts
    return len(parts) == 2 and parts[0] == name
