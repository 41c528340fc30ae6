"""The registry of served model names, roles and the aliases clients use: the one place they are spelled.

Training writes models under these names, the gateway resolves requests with them, and the load tools
pick their targets from them. Adding a served model means adding it here (and training it).
"""

from __future__ import annotations

from kdcontract.manifest import Manifest, ModelEntry

# Served models, as training writes them into the repository.
TEACHER = "teacher"
STUDENT_KD = "student_kd"  # the distilled student: the model kdserve exists to serve
STUDENT_PLAIN = "student_plain"  # the same student trained without a teacher, for the comparison
STUDENT_PRUNED = "student_pruned"
MULTIHEAD = "multihead"
VARIANT_PREFIX = "variant_"
INT8_SUFFIX = "_int8"
# Triton-side ensembles of the variants, in order of preference for the alias `ensemble_triton`: members
# and fusion as one graph (one Triton call), then Triton's ensemble scheduler (members, then FUSION_STEP).
FUSED_ENSEMBLE = "ensemble_fused"
SCHEDULER_ENSEMBLE = "ensemble_scheduler"
TRITON_ENSEMBLES = (FUSED_ENSEMBLE, SCHEDULER_ENSEMBLE)
FUSION_STEP = "ensemble_fusion"  # the scheduler's fusion step: served, but not callable by clients
NOT_CALLABLE_ROLES = frozenset({"fusion"})
INT8_SOURCES = (STUDENT_KD, STUDENT_PRUNED)  # models exported with an INT8 sibling (besides the fused ensemble)

# Names clients use besides served model names.
STUDENT = "student"  # -> STUDENT_KD
ENSEMBLE = "ensemble"  # the variants, called concurrently and fused in the gateway
TRITON_ENSEMBLE = "ensemble_triton"  # -> the first of TRITON_ENSEMBLES the repository serves
CASCADE = "cascade"  # the student, and the teacher for images the student is unsure of
AUTO = "auto"  # the A/B experiment's choice of arm
GATEWAY_NAMES = (ENSEMBLE, CASCADE)  # what the gateway composes; no served model may take these names
# The gateway's A/B split unless told otherwise: the teacher keeps a share to be compared with.
DEFAULT_AB_WEIGHTS = {STUDENT: 0.9, TEACHER: 0.1}

# The gateway's tensors in the Open Inference Protocol (v2 REST and gRPC), as clients name them: one
# encoded image per BYTES element, or prepared pixels; calibrated class probabilities out.
V2_IMAGE_INPUT = "IMAGE"
V2_PIXELS_INPUT = "PIXELS"
V2_OUTPUT = "PROBABILITIES"

# What the demo, the served-accuracy check and the soak send, in this order, where the repository has them.
SHOWCASE = (STUDENT, TEACHER, ENSEMBLE, CASCADE, STUDENT_PRUNED)


def variant_name(index: int) -> str:
    return f"{VARIANT_PREFIX}{index}"


def int8_name(name: str) -> str:
    return f"{name}{INT8_SUFFIX}"


VERSION_MARK = "@"  # `student_kd@4`: one version of a served model (its current one or its candidate)


def versioned(name: str, version: int) -> str:
    return f"{name}{VERSION_MARK}{version}"


def served_entry(manifest: Manifest, name: str) -> ModelEntry | None:
    """A served model by its name (its current version) or as `NAME@VERSION` (its current version or its
    candidate: the versions Triton loads), with that version's calibration; None for anything else."""
    base, mark, version = name.partition(VERSION_MARK)
    entry = manifest.models.get(base)
    if entry is None or not mark:
        return entry
    return entry.as_version(int(version)) if version.isdigit() and version == str(int(version)) else None


def candidate_names(manifest: Manifest) -> list[str]:
    """`NAME@VERSION` for both versions of every model that has a candidate on trial."""
    return [
        versioned(n, v)
        for n, m in manifest.models.items()
        if m.candidate is not None and m.role not in NOT_CALLABLE_ROLES
        for v in m.loaded_versions()
    ]


def model_aliases(manifest: Manifest) -> dict[str, str]:
    """The names clients may use besides served model names -> what each one runs (only what the
    repository serves: `make demo` serves the plain student before the teacher and the KD student)."""
    aliases = {alias: name for alias, name in ((STUDENT, STUDENT_KD), (TEACHER, TEACHER)) if name in manifest.models}
    if manifest.by_role("variant"):
        aliases[ENSEMBLE] = ENSEMBLE
    served = [name for name in TRITON_ENSEMBLES if name in manifest.models]
    if served:
        aliases[TRITON_ENSEMBLE] = served[0]
    if manifest.cascade is not None:
        aliases[CASCADE] = CASCADE
    return aliases


def callable_names(manifest: Manifest) -> list[str]:
    """Every name a client may ask for (aliases and served models), sorted; `auto` is the A/B entry."""
    served = {n for n, m in manifest.models.items() if m.role not in NOT_CALLABLE_ROLES}
    return sorted(set(model_aliases(manifest)) | served | set(candidate_names(manifest)))


def available(manifest: Manifest, names: tuple[str, ...] = SHOWCASE) -> list[str]:
    """Those of `names` the repository can answer, in their order."""
    known = set(callable_names(manifest))
    return [name for name in names if name in known]


def trained_entry(manifest: Manifest, name: str) -> ModelEntry | None:
    """The manifest entry whose training-time metrics describe an alias or served model.

    Every ensemble (fused in the gateway or in Triton) applies training's fusion rule, so each reports
    the fused ensemble's test metrics, which the export writes on the Triton-side ensembles' entries.
    """
    target = model_aliases(manifest).get(name, name)
    if VERSION_MARK in target:
        return served_entry(manifest, target)
    if target == ENSEMBLE:
        return next(iter(manifest.by_role("ensemble")), None)
    if target == CASCADE and manifest.cascade is not None:
        student = manifest.models[manifest.cascade.student]
        return student.model_copy(update={"name": CASCADE, "metrics": manifest.cascade.metrics})
    return manifest.models.get(target)


def trained_result_name(served: str) -> str:
    """The name training's results.json gives the model served as `served` (INT8 siblings: their source)."""
    stem = served.removesuffix(INT8_SUFFIX)
    return ENSEMBLE if stem == FUSED_ENSEMBLE else stem
