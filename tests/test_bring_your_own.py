"""Bring your own teacher (issue 37): a teacher trained elsewhere, saved as a torchvision state_dict, a timm
safetensors file and an ONNX graph, distilled into kdserve students (ResNet18, MobileNetV3), exported, served
and classified over HTTP and v2.

The test makes everything it needs: an image folder of the digits rendered as 64 px PNGs (one sub-folder per
class), and a torchvision ResNet18 trained on it with a plain PyTorch loop (as a team's own training would),
normalised with ImageNet's mean and std as torchvision's and timm's weights are. Each teacher form is read
back by kdserve from its file alone; the students are trained by `python -m training all`.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import run_training
from PIL import Image

from gateway.process import GatewayProcess, free_port
from gateway.triton.server import EmbeddedTriton, TritonPorts
from kdcontract.client_forms import ClientForm, render_image
from kdcontract.digits import digits_gray
from kdcontract.errors import UserError
from kdcontract.manifest import read_manifest
from loadtest.clients.measure import metric_value
from training.bring_back import write_recipes, write_teacher_files
from training.checkpoint import load_model
from training.models import build_backbone, build_network
from training.recipe import IMAGENET_MEAN, IMAGENET_STD, load_recipe
from training.teachers import BroughtClassifier, OnnxTeacher, load_teacher

SIZE = 64
EPOCHS = 3
STUDENT_EPOCHS = {"resnet18": 3, "mobilenet_v3_small": 6}  # MobileNetV3 learns slower from ~900 images


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """sklearn's digits as 64 px grey PNGs, dark ink on light paper, one folder per class."""
    root = tmp_path_factory.mktemp("digits64")
    images, labels = digits_gray()
    for i, (digit, label) in enumerate(zip(images, labels, strict=True)):
        (root / str(label)).mkdir(exist_ok=True)
        picture = render_image(digit, ClientForm(size=SIZE, resample="bilinear", dark_on_light=True))
        picture.save(root / str(label) / f"{i:04d}.png")
    return root


def folder_tensors(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted(root.glob("*/*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return torch.from_numpy(images), torch.tensor([int(f.parent.name) for f in files])


@pytest.fixture(scope="module")
def teacher_files(folder, tmp_path_factory) -> dict[str, Path]:
    """A torchvision ResNet18 trained on the folder (every other image: the rest is never seen by it), saved
    the three ways a team would hand it over."""
    out = tmp_path_factory.mktemp("teacher")
    images, labels = folder_tensors(folder)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    model = BroughtClassifier(net, None, IMAGENET_MEAN, IMAGENET_STD)
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    seen = torch.arange(0, len(images), 2)
    for _ in range(EPOCHS):
        model.train()
        for batch in seen[torch.randperm(len(seen))].split(64):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    files = {"torchvision": out / "resnet18.pt", "timm": out / "resnet18.safetensors", "onnx": out / "resnet18.onnx"}
    torch.save(net.state_dict(), files["torchvision"])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(files["timm"]))
    # The ONNX a team exports from its own framework: float NCHW, normalised outside the graph.
    torch.onnx.export(
        net, (torch.zeros(1, 3, SIZE, SIZE),), str(files["onnx"]), input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, dynamo=False,
    )  # fmt: skip
    return files


def held_out_agreement(teacher: torch.nn.Module, other: torch.nn.Module, folder: Path) -> tuple[float, float]:
    """(agreement of `other` with `teacher`, teacher's top-1) on the images the teacher never trained on."""
    images, labels = folder_tensors(folder)
    unseen = torch.arange(1, len(images), 2)
    with torch.no_grad():
        a = torch.cat([teacher(images[b]).argmax(-1) for b in unseen.split(256)])
        b = torch.cat([other(images[c]).argmax(-1) for c in unseen.split(256)])
    return float((a == b).float().mean()), float((a == labels[unseen]).float().mean())


def test_each_form_of_a_brought_teacher_reads_back_as_the_same_network(folder, teacher_files):
    """The torchvision checkpoint, the same weights as timm's ResNet18 from safetensors, and the ONNX graph:
    three readers of one teacher, one set of answers."""
    reference = load_teacher(teacher_files["torchvision"], "resnet18", 10, None)
    for form, arch in (("timm", "timm:resnet18"), ("onnx", None)):
        other = load_teacher(teacher_files[form], arch, 10, None)
        agreement, top1 = held_out_agreement(reference, other, folder)
        assert agreement >= 0.99, (form, agreement)
    assert isinstance(other, OnnxTeacher) and top1 > 0.5  # a teacher worth distilling


def test_what_does_not_fit_is_one_line_naming_both_sides(teacher_files, tmp_path):
    with pytest.raises(UserError, match=r"unknown architecture 'resnet_18'.*closest: .*resnet18"):
        build_backbone("resnet_18", 10)
    with pytest.raises(UserError, match=r"does not fit resnet50: 198 missing \(layer1.0.conv3.weight, .*, ...\)$"):
        load_teacher(teacher_files["torchvision"], "resnet50", 10, None)
    with pytest.raises(UserError, match=r"its head has 10 classes \(fc.weight\), the dataset has 7"):
        load_teacher(teacher_files["torchvision"], "resnet18", 7, None)
    with pytest.raises(UserError, match=r"answers logits float \[n, 10\]; a teacher answers one \[N, 7\] logits"):
        load_teacher(teacher_files["onnx"], None, 7, None)
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is not a PyTorch state_dict"):
        load_teacher(tmp_path / "x.pt", "resnet18", 10, None)


def test_a_teacher_kdserve_trained_comes_back_from_its_files_answering_as_it_did(tiny_run, tmp_path):
    """`training bring-back` (make byo): the run's teacher written as a team would hand it over, and read back
    through the recipes it writes. The tiny run's teacher is a ResNet18 at width 0.5, which no architecture
    name builds: it comes back as ONNX only; a small-stem checkpoint comes back under `small_stem: true`."""
    files = write_teacher_files(tiny_run, tmp_path / "byo")
    assert set(files) == {"onnx"}
    trained, spec, _ = load_model(tiny_run / "teacher" / "model.pt")
    images = torch.from_numpy(np.stack([np.repeat(d[:, :, None], 3, axis=2) for d in digits_gray()[0][:200]]))
    for path in write_recipes(tiny_run, tmp_path / "byo", files):
        brought = load_recipe(str(path)).teacher
        teacher = load_teacher(Path(brought.file.path), brought.arch, spec.num_classes, None, tuple(brought.file.mean),
                               tuple(brought.file.std))  # fmt: skip
        with torch.no_grad():
            np.testing.assert_allclose(teacher(images).numpy(), trained(images).numpy(), rtol=1e-4, atol=1e-4)
    small = build_network("resnet18", 10, small_stem=True)
    torch.save(small.state_dict(), tmp_path / "small.pt")
    assert isinstance(load_teacher(tmp_path / "small.pt", "resnet18", 10, None, small_stem=True), BroughtClassifier)
    with pytest.raises(UserError, match=r"does not fit resnet18: shapes differ: conv1.weight \(64, 3, 3, 3\)"):
        load_teacher(tmp_path / "small.pt", "resnet18", 10, None)


def recipe(tmp_path: Path, folder: Path, teacher: Path, teacher_arch: str, student: str, cascade: bool = False) -> Path:
    body = {
        "name": "byo",
        "data": {"dataset": "imagefolder", "root": str(folder), "image_size": SIZE,
                 "augment": {"crop_padding": 4, "hflip": False}},
        "teacher": {"arch": teacher_arch, "file": {"path": str(teacher)}, "train": {"epochs": 1}},
        "student": {"arch": student, "small_stem": False,
                    "train": {"epochs": STUDENT_EPOCHS[student], "batch_size": 64, "optimizer": "adamw", "lr": 3.0e-3}},
        "distill": {"loss": "hinton", "temperature": 2.0, "alpha": 0.7},
        "ensemble": {"variants": [], "multihead": {"heads": 0}},
        "cascade": {"enabled": cascade},
        "compression": {"enabled": False},
        "evaluation": {"seeds": [0]},
    }  # fmt: skip
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(body))
    return path


@pytest.mark.parametrize(
    ("form", "teacher_arch", "student"),
    [("torchvision", "resnet18", "resnet18"), ("timm", "timm:resnet18", "resnet18"), ("onnx", "resnet18", "resnet18"),
     ("timm", "timm:resnet18", "mobilenet_v3_small"), ("onnx", "resnet18", "mobilenet_v3_small")],
)  # fmt: skip
def test_a_brought_teacher_is_distilled_into_a_student_that_agrees_with_it(
    folder, teacher_files, tmp_path, form, teacher_arch, student
):
    run = tmp_path / "run"
    done = run_training(
        "all", "--recipe", str(recipe(tmp_path, folder, teacher_files[form], teacher_arch, student)),
        "--out", str(run), "--only", "student_kd",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "teacher: brought from" in done.stdout
    results = json.loads((run / "results.json").read_text())
    teacher, kd = results["models"]["teacher"], results["models"]["student_kd"]
    print(f"{form} teacher -> {student}: teacher top-1 {teacher['top1']:.2%}, student {kd['top1']:.2%}, "
          f"agreement {kd['teacher_agreement']:.2%}")  # fmt: skip
    # The bound comes from the teacher: a student should agree with it on at least 80% of what it gets right.
    assert kd["teacher_agreement"] >= 0.8 * teacher["top1"], (kd, teacher)
    assert kd["arch"] == student


def test_a_student_of_a_brought_teacher_is_exported_served_and_answers_over_http_and_v2(
    folder, teacher_files, tmp_path
):
    """The torchvision teacher (served from its own weights) and its MobileNetV3 student exported into a
    repository, Triton and the gateway in front: both answer over HTTP and v2 as they do in-process."""
    run, repo = tmp_path / "run", tmp_path / "repo"
    args = ["--recipe", str(recipe(tmp_path, folder, teacher_files["torchvision"], "resnet18", "mobilenet_v3_small"))]
    done = run_training("all", *args, "--out", str(run), "--only", "student_kd", "--export", str(repo))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(repo)
    assert manifest.models["teacher"].arch == "resnet18" and manifest.models["student_kd"].arch == "mobilenet_v3_small"
    sample, expected = in_process_answers(folder, load_teacher(teacher_files["torchvision"], "resnet18", 10, None), run)
    ports = TritonPorts(free_port(), free_port(), free_port())
    with EmbeddedTriton(repo, ports, log_file=tmp_path / "triton.log") as triton:
        gateway = GatewayProcess(repo, triton.http_url)
        try:
            answers_as_in_process(gateway, sample, expected)
        finally:
            gateway.stop()


def test_with_an_onnx_teacher_the_cascade_the_ab_its_shadow_capture_and_redistill_all_work(
    folder, teacher_files, tmp_path
):
    """The whole product with a teacher brought as a float NCHW ONNX graph: served (behind kdserve's input) as
    the teacher arm, the cascade's fallback and the A/B's control with every request shadowed; what it answered
    is captured, and `training redistill` makes a candidate student from the capture with that teacher."""
    run, repo, capture = tmp_path / "run", tmp_path / "repo", tmp_path / "capture"
    path = recipe(tmp_path, folder, teacher_files["onnx"], "resnet18", "mobilenet_v3_small", cascade=True)
    done = run_training("all", "--recipe", str(path), "--out", str(run), "--only", "student_kd", "--export", str(repo))
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_manifest(repo)
    assert manifest.models["teacher"].arch == "onnx:resnet18.onnx"
    assert manifest.cascade is not None and (manifest.cascade.student, manifest.cascade.teacher) == (
        "student_kd",
        "teacher",
    )
    sample, expected = in_process_answers(folder, load_teacher(teacher_files["onnx"], None, 10, None), run)
    experiment = tmp_path / "experiment.json"
    split = {"control": "teacher", "candidate": "student", "weights": {"student": 0.5, "teacher": 0.5}}
    experiment.write_text(json.dumps({**split, "shadow_fraction": 1.0}))
    env = {"KDSERVE_EXPERIMENT_FILE": str(experiment), "KDSERVE_CAPTURE_FRACTION": "1",
           "KDSERVE_CAPTURE_DIR": str(capture)}  # fmt: skip
    ports = TritonPorts(free_port(), free_port(), free_port())
    with EmbeddedTriton(repo, ports, log_file=tmp_path / "triton.log") as triton:
        gateway = GatewayProcess(repo, triton.http_url, env=env)
        try:
            answers_as_in_process(gateway, sample, expected)
            arms = []
            for i, x in enumerate(sample):  # each client on one arm by its key; the other arm answers in shadow
                headers = {"Content-Type": "image/png", "X-Client-Key": f"client-{i}"}
                resp = gateway.client.post("/v1/classify?model=auto", content=png(x), headers=headers)
                assert resp.status_code == 200, resp.text
                body = resp.json()
                arms.append(body["arm"])
                assert body["predictions"][0]["top_k"][0]["index"] == expected[body["model"]][i]
            assert set(arms) == {"student", "teacher"}
            deadline = time.monotonic() + 20
            while shadowed(gateway) < len(sample) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert shadowed(gateway) == len(sample)
            files = [("images", (f"{i}.png", png(x), "image/png")) for i, x in enumerate(sample)]
            resp = gateway.client.post("/v1/classify", params={"model": "cascade"}, files=files)
            assert resp.status_code == 200, resp.text
            assert {p["answered_by"] for p in resp.json()["predictions"]} <= {"student_kd", "teacher"}
        finally:
            gateway.stop()
    done = run_training("redistill", "--run", str(run), "--capture", str(capture), "--repo", str(repo),
                        "--out", str(tmp_path / "redistilled"), "--set", "student.train.epochs=1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    after = read_manifest(repo)
    assert after.models["student_kd"].candidate is not None and after.models["teacher"] == manifest.models["teacher"]
    report = json.loads((tmp_path / "redistilled" / "redistill.json").read_text())
    assert report["captured_images"] >= 2 * len(sample)


def shadowed(gateway: GatewayProcess) -> float:
    text = gateway.client.get("/metrics").text
    return sum(
        metric_value(text, "kdserve_shadow_requests_total", {"arm": arm, "agreed": agreed})
        for arm in ("student", "teacher")
        for agreed in ("true", "false")
    )


def in_process_answers(folder: Path, teacher: torch.nn.Module, run: Path) -> tuple[torch.Tensor, dict[str, list]]:
    """24 held-out images and what the teacher and the run's student answer on them in-process."""
    images, _ = folder_tensors(folder)
    sample = images[1::2][:24]
    student, _, _ = load_model(run / "student_kd" / "model.pt")
    with torch.no_grad():
        return sample, {
            "teacher": teacher(sample).argmax(-1).tolist(),
            "student_kd": student(sample).argmax(-1).tolist(),
        }


def answers_as_in_process(gateway: GatewayProcess, sample: torch.Tensor, expected: dict[str, list]) -> None:
    """Each model by name over /v1/classify (PNGs) and v2 infer (prepared pixels): the in-process answers."""
    for name, answers in expected.items():
        files = [("images", (f"{i}.png", png(x), "image/png")) for i, x in enumerate(sample)]
        resp = gateway.client.post("/v1/classify", params={"model": name, "top_k": 1}, files=files)
        assert resp.status_code == 200, resp.text
        assert [p["top_k"][0]["index"] for p in resp.json()["predictions"]] == answers
        body = {"inputs": [{"name": "PIXELS", "shape": list(sample.shape), "datatype": "UINT8",
                            "data": sample.flatten().tolist()}]}  # fmt: skip
        v2 = gateway.client.post(f"/v2/models/{name}/infer", json=body)
        assert v2.status_code == 200, v2.text
        probabilities = np.asarray(v2.json()["outputs"][0]["data"]).reshape(len(sample), -1)
        assert probabilities.argmax(-1).tolist() == answers


def png(pixels: torch.Tensor) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(out, format="PNG")
    return out.getvalue()
