"""The server and its models as v2 describes them: names, versions, readiness, metadata and configuration."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.errors import UnknownModel, echo
from gateway.serving.service import Classifier
from kdcontract.manifest import Manifest
from kdcontract.names import AUTO, CASCADE, ENSEMBLE, V2_IMAGE_INPUT, V2_OUTPUT, callable_names

SERVER_NAME = "kdserve"


SERVER_VERSION = "0.1.0"


EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]


PLATFORM = "kdserve_gateway"


COMPOSED_VERSION = "1"  # the one version of what the gateway composes (ensemble, cascade, auto)


def model_names(manifest: Manifest) -> list[str]:
    """Every v2 model: the names `/v1/classify` takes, `auto` included."""
    return [*callable_names(manifest), AUTO]


def versions(classifier: Classifier, name: str) -> list[str]:
    """The versions a v2 model has: its served model's manifest version, or one for what is composed."""
    if name == AUTO:
        return [COMPOSED_VERSION]
    target = classifier.resolve(name)  # UnknownModel for anything else
    if target in (ENSEMBLE, CASCADE):
        return [COMPOSED_VERSION]
    return [str(classifier.entry(target).version)]


async def model_ready(classifier: Classifier, name: str, arms: list[str]) -> bool:
    """Every Triton model `name` may call is READY (for `auto`: every model the experiment's `arms` need)."""
    targets = classifier.routed_models(arms) if name == AUTO else classifier.triton_models(classifier.resolve(name))
    states = await asyncio.gather(*(classifier.triton.model_ready(*classifier.pinned(t)) for t in targets))
    return all(states)


def check_version(classifier: Classifier, name: str, version: str | None) -> None:
    known = versions(classifier, name)
    if version is not None and version not in known:
        raise UnknownModel(f"model {echo(name)} has no version {echo(version)}; it serves version {', '.join(known)}")


def metadata(classifier: Classifier, name: str) -> dict[str, Any]:
    classes = len(classifier.class_names)
    return {
        "name": name,
        "versions": versions(classifier, name),
        "platform": PLATFORM,
        "inputs": [{"name": V2_IMAGE_INPUT, "datatype": "BYTES", "shape": [-1, 1]}],
        "outputs": [{"name": V2_OUTPUT, "datatype": "FP32", "shape": [-1, classes]}],
    }


def config(classifier: Classifier, name: str, max_images: int) -> dict[str, Any]:
    """Triton's model configuration (its JSON form), which `perf_analyzer` reads for the batch size."""
    return {
        "name": name,
        "platform": PLATFORM,
        "max_batch_size": max_images,
        "input": [{"name": V2_IMAGE_INPUT, "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [{"name": V2_OUTPUT, "data_type": "TYPE_FP32", "dims": [len(classifier.class_names)]}],
    }


def model_version(outcome_version: int | None) -> str:
    return COMPOSED_VERSION if outcome_version is None else str(outcome_version)
