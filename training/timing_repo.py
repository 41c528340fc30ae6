"""`python -m training timing-repo`: an untrained ResNet18 / ResNet50 pair at 224x224 in a Triton repository.

The digits models read 8x8 images, so serving costs (HTTP, the Python backend) outweigh their compute
and shrink the student's speed-up once served. The bench also serves this ImageNet-sized pair so users
see how much of a ResNet18-vs-ResNet50 speed-up survives serving when compute dominates. Random weights
(nothing is downloaded here) cost exactly what trained ones do; the manifest says they are untrained.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from kdcontract.manifest import Manifest, Preprocessing, write_manifest
from kdcontract.names import STUDENT_KD, TEACHER
from training.check_repo import check_repository
from training.checkpoint import ModelSpec, build_from_spec
from training.export import write_served_model
from training.models import count_macs, count_params
from training.onnx_tools import export_onnx
from training.recipe import IMAGENET_MEAN, IMAGENET_STD
from training.triton_repo import ServingOptions

PAIR = ((STUDENT_KD, "resnet18", "student"), (TEACHER, "resnet50", "teacher"))
STAMP = "timing.json"  # what the repository was written with: a different request rewrites it


def write_timing_repo(repo: Path, image_size: int = 224, opts: ServingOptions | None = None) -> bool:
    """Write the pair into `repo` (cpu flavour) unless an identical one is there; True if written."""
    opts = opts or ServingOptions()
    stamp = json.dumps({"image_size": image_size, "serving": opts.__dict__, "pair": PAIR}, sort_keys=True)
    if (repo / STAMP).is_file() and (repo / STAMP).read_text() == stamp and not check_repository(repo):
        return False
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    entries = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch, role in PAIR:
            torch.manual_seed(0)
            spec = ModelSpec(
                arch=arch,
                num_classes=10,
                small_stem=False,
                image_size=image_size,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                class_names=[str(d) for d in range(10)],
                role=role,
            )
            model = build_from_spec(spec).eval()
            spec.metrics = {"params": float(count_params(model)), "macs": float(count_macs(model, image_size))}
            onnx_path = Path(tmp) / f"{name}.onnx"
            export_onnx(model, image_size, onnx_path)
            entries[name] = write_served_model(
                repo, name, role, spec, onnx_path, "cpu", opts, source=f"untrained {arch} (timing only)"
            )
            print(f"[timing-repo] {name}: {arch} at {image_size}x{image_size}, {spec.metrics['macs'] / 1e9:.2f} GMACs")
    manifest = Manifest(
        flavor="cpu",
        recipe=f"timing-{image_size}",
        dataset="none: untrained weights, for timing only",
        preprocessing=Preprocessing(image_size=image_size, mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        models=entries,
    )
    write_manifest(repo, manifest)
    (repo / STAMP).write_text(stamp)
    return True
