"""`python -m training bring-back` (`make byo`): a run's teacher handed back as a team would hand over its model.

The run's trained teacher (the digits recipe's small-stem ResNet50) is written out twice, the way the files
a team brings look: its network's `state_dict` (`teacher.pt`, for `teacher.arch: resnet50` with
`small_stem: true`) and an ONNX graph taking float NCHW images normalised outside it (`teacher.onnx`, as
`torch.onnx.export` of the bare network makes it), with the normalisation it was trained with. Beside them,
one recipe per (teacher form, student): the run's own recipe with the teacher brought from that file,
distilling the student named. `make byo` trains each (`--only student_kd`), exports it with its teacher, and
`python -m loadtest byo` measures them side by side (benchmarks/byo/).
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import yaml

from kdcontract.errors import UserError
from training.checkpoint import load_model
from training.onnx_tools import OPSET

FORMS = {"checkpoint": "teacher.pt", "onnx": "teacher.onnx"}
STUDENTS = (("checkpoint", "resnet18"), ("onnx", "resnet18"), ("onnx", "mobilenet_v3_small"))


def write_teacher_files(run: Path, out: Path) -> dict[str, Path]:
    """The run's teacher as a `state_dict` (when its network is a published architecture: width 1) and as a
    float NCHW ONNX graph; returns the paths by form."""
    path = run / "teacher" / "model.pt"
    if not path.is_file():
        raise UserError(f"{path} not found: train the run's teacher first (make models)")
    model, spec, _ = load_model(path)
    if spec.brought or spec.members != 1 or spec.heads:
        raise UserError(f"{path} is not one trained network (brought {spec.brought}, members {spec.members})")
    out.mkdir(parents=True, exist_ok=True)
    network = model.backbone.eval()
    written = {}
    if spec.width == 1.0:
        torch.save(network.state_dict(), out / FORMS["checkpoint"])
        written["checkpoint"] = out / FORMS["checkpoint"]
    else:  # no architecture name builds it, so no checkpoint for a name could bring it back
        print(f"[bring-back] {path} is {spec.arch} at width {spec.width:g}: written as ONNX only", flush=True)
    size = spec.image_size
    graph = io.BytesIO()
    torch.onnx.export(
        network, (torch.zeros(1, 3, size, size),), graph, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, opset_version=OPSET, dynamo=False,
    )  # fmt: skip
    (out / FORMS["onnx"]).write_bytes(graph.getvalue())
    return {**written, "onnx": out / FORMS["onnx"]}


def write_recipes(run: Path, out: Path, files: dict[str, Path]) -> list[Path]:
    """One recipe per (form, student): the run's recipe, its teacher brought from `files[form]`."""
    _, spec, _ = load_model(run / "teacher" / "model.pt")
    base = yaml.safe_load((run / "recipe.yaml").read_text())
    written = []
    for form, student in [(f, s) for f, s in STUDENTS if f in files]:
        tree = yaml.safe_load(yaml.safe_dump(base))
        tree["name"] = f"{base['name']}-{form}-{student}"
        brought = {"path": str(files[form].resolve()), "mean": list(spec.mean), "std": list(spec.std)}
        tree["teacher"] = {"arch": spec.arch, "small_stem": spec.small_stem, "file": brought}
        tree["student"]["arch"] = student
        path = out / f"{form}-{student}.yaml"
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
        written.append(path)
    return written
