"""Export to ONNX and the Triton repository: parity, FP16, INT8, versions, check-repo."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import ModelConfig

from kdcontract.errors import UserError
from kdcontract.manifest import read_manifest
from kdcontract.names import FUSED_ENSEMBLE, STUDENT_KD, TEACHER, int8_name
from kdcontract.ort_session import open_session
from kdcontract.versions import loaded_by_config, reject
from tests.conftest import run_training, training_cli
from training.check_repo import check_repository
from training.checkpoint import load_model, save_model
from training.models import build_classifier
from training.onnx_tools import (
    OPSET,
    Parity,
    drop_padding_taps,
    export_onnx,
    graph_key,
    require_parity,
    run_logits,
)
from training.triton_repo import (
    config_text,
    existing_versions,
    parse_config,
    stalling_queue_policy,
    write_model,
)

SERVED = {
    "teacher",
    "student_kd",
    "student_kd_int8",
    "student_plain",
    "variant_0",
    "variant_1",
    "multihead",
    "student_pruned",
    "student_pruned_int8",
    "ensemble_fused",
    "ensemble_fused_int8",
    "ensemble_scheduler",
    "ensemble_fusion",
}


def test_repository_holds_every_model_with_config_labels_and_manifest(tiny_repo, tiny_results):
    manifest = read_manifest(tiny_repo)
    assert set(manifest.models) == SERVED
    assert manifest.preprocessing.image_size == 8 and manifest.flavor == "cpu"
    kd = manifest.models["student_kd"]
    assert kd.role == "student" and kd.input.dtype == "UINT8" and kd.input.shape == [8, 8, 3]
    assert kd.metrics["top1"] == pytest.approx(tiny_results["models"]["student_kd"]["top1"])
    assert kd.temperature == pytest.approx(tiny_results["models"]["student_kd"]["temperature"])
    assert manifest.models["multihead"].output.shape == [2, 10]
    assert manifest.models["ensemble_scheduler"].members == ["variant_0", "variant_1", "ensemble_fusion"]
    assert manifest.models["ensemble_fused"].members == ["variant_0", "variant_1"]
    assert manifest.models["ensemble_fused"].output.name == "probabilities"
    assert (tiny_repo / "student_kd" / "1" / "model.onnx").is_file()
    assert (tiny_repo / "student_kd" / "1" / "model.py").is_file()
    assert (tiny_repo / "student_kd" / "labels.txt").read_text().split() == [str(d) for d in range(10)]
    config = parse_config((tiny_repo / "student_kd" / "config.pbtxt").read_text())
    # Batching on, but no queue policy (it stalls Triton 2.51) and no delay for a lone request.
    assert config.HasField("dynamic_batching") and not stalling_queue_policy(config)
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert list(config.dynamic_batching.preferred_batch_size) == []
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU and config.model_warmup
    assert config.parameters["allow_spinning"].string_value == "0"
    assert check_repository(tiny_repo) == []


def test_export_report_has_parity_fp16_and_int8_measurements(tiny_run, tiny_repo, tiny_results):
    # tiny_repo is the export that writes the report; asking for it makes this test stand alone.
    report = json.loads((tiny_run / "export_report.json").read_text())
    # The ensemble exported as one graph is the ensemble training evaluated.
    assert report["models"]["ensemble_fused"]["test_top1"] == pytest.approx(
        tiny_results["models"]["ensemble"]["top1"], abs=1e-6
    )
    for name in ("teacher", "student_kd", "multihead", "ensemble_fused"):
        assert report["models"][name]["onnx_vs_torch"]["max_abs_diff"] < 1e-3
        assert report["models"][name]["onnx_vs_torch"]["top1_agreement"] == 1.0
        assert report["models"][name]["fp16_vs_fp32"]["top1_agreement"] >= 0.95
    int8 = report["models"]["student_kd_int8"]
    assert int8["agreement_with_fp32"] > 0.85
    assert int8["latency_p50"]["batch_1"]["int8_ms"] > 0
    # The fused ensemble's INT8 graph: its output is probabilities, judged as such (rows sum to 1).
    fused8 = report["models"]["ensemble_fused_int8"]
    assert fused8["fp32_top1"] == pytest.approx(report["models"]["ensemble_fused"]["test_top1"], abs=1e-6)
    assert fused8["agreement_with_fp32"] > 0.85 and 0 <= fused8["int8_ece"] < 0.5
    assert "INT8 static quantisation" in (tiny_run / "export_report.md").read_text()


def test_pruned_student_is_served_with_its_int8_sibling_and_the_cascade_in_the_manifest(
    tiny_run, tiny_repo, tiny_results
):
    manifest = read_manifest(tiny_repo)
    compression = tiny_results["compression"]
    assert compression["kept_step"] >= 1, compression  # tiny steps lose little; the rule itself: test_compression
    pruned = manifest.models["student_pruned"]
    assert pruned.role == "student" and pruned.metrics["top1"] == pytest.approx(
        tiny_results["models"]["student_pruned"]["top1"]
    )
    assert manifest.models["student_pruned_int8"].precision == "int8"
    fused8 = manifest.models["ensemble_fused_int8"]
    assert fused8.role == "ensemble" and fused8.precision == "int8" and fused8.output.name == "probabilities"
    assert fused8.members == manifest.models["ensemble_fused"].members
    assert manifest.cascade.student == "student_kd" and manifest.cascade.teacher == "teacher"
    report = json.loads((tiny_run / "export_report.json").read_text())
    assert report["models"]["student_pruned"]["onnx_vs_torch"]["top1_agreement"] == 1.0
    # The kept pruning step's MACs are the pruned model's.
    kept = compression["steps"][compression["kept_step"] - 1]
    assert tiny_results["models"]["student_pruned"]["macs"] == kept["macs"]
    shares = [s["macs_share"] for s in compression["steps"]]
    assert shares == sorted(shares, reverse=True) and shares[0] < 0.9


def test_accuracy_cost_report_lists_every_served_model_and_the_cascade(tiny_run, tiny_repo, tiny_results):
    pareto = (tiny_run / "pareto.md").read_text()
    report = json.loads((tiny_run / "export_report.json").read_text())
    for name in [n for n, r in report["models"].items() if "latency_ms_batch1" in r] + ["cascade"]:
        assert f"| {name}" in pareto, name
    assert (tiny_run / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results_md = (tiny_run / "results.md").read_text()
    assert results_md.count("## Accuracy vs. cost") == 1 and "## Confidence cascade" in results_md


def test_check_repo_catches_tampered_files_and_mismatched_configs(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    onnx_file = repo / "student_plain" / "1" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    config_path = repo / "teacher" / "config.pbtxt"
    config = parse_config(config_path.read_text())
    config.input[0].dims[:] = [16, 16, 3]
    config_path.write_text(config_text(config))
    stalling_path = repo / "student_kd" / "config.pbtxt"
    stalling = parse_config(stalling_path.read_text())
    stalling.dynamic_batching.default_queue_policy.max_queue_size = 256
    stalling_path.write_text(config_text(stalling))
    problems = check_repository(repo)
    assert any("student_plain/1/model.onnx does not match its sha256" in p for p in problems)
    assert any("teacher: config tensor 'images' is not UINT8 [8, 8, 3]" in p for p in problems)
    assert any("student_kd: dynamic_batching has a queue policy" in p for p in problems)
    proc = run_training("check-repo", str(repo))
    assert proc.returncode == 2 and "problem(s)" in proc.stderr


def test_a_new_export_adds_a_version_and_keeps_the_newest(tmp_path):
    src = tmp_path / "weights.bin"
    for i in range(4):
        src.write_bytes(bytes([i]))
        version, hashes = write_model(tmp_path / "repo", "m", ModelConfig(name="m"), {"model.onnx": src}, ["a"], 2)
        assert version == i + 1 and f"m/{version}/model.onnx" in hashes
    assert existing_versions(tmp_path / "repo" / "m") == [3, 4]
    assert (tmp_path / "repo" / "m" / "4" / "model.onnx").read_bytes() == bytes([3])


def test_a_new_student_graph_waits_beside_the_served_version_until_a_decision_and_the_same_graph_is_kept(
    tiny_run, tiny_repo, tmp_path
):
    """Export into a repository that serves the run already: every unchanged graph is kept (no new version);
    a student retrained (here: its weights nudged) is a candidate beside the served version, with its INT8
    sibling, until a rollout or an operator decides; a second one while it is on trial is refused; `--promote`
    makes one current at once."""
    run, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(tiny_run, run)
    shutil.copytree(tiny_repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
    before = read_manifest(repo)

    def nudge_student() -> None:
        model, spec, meta = load_model(run / STUDENT_KD / "model.pt")
        with torch.no_grad():
            for weight in model.parameters():
                weight.add_(0.01 * torch.randn_like(weight))
        save_model(run / STUDENT_KD / "model.pt", model, spec, meta)

    def export(*extra: str):
        return run_training("export", "--run", str(run), "--repo", str(repo), *extra)

    same = export()
    assert same.returncode == 0, same.stderr[-2000:]
    single = [n for n, e in before.models.items() if not e.members]  # the ensembles are written whole each time
    for name in single:
        kept = f"[export] {name}: served version {before.models[name].version} is this graph, served the same way: kept"
        assert kept in same.stdout
        assert read_manifest(repo).models[name] == before.models[name]
    torch.manual_seed(0)
    nudge_student()
    tried = export()
    assert tried.returncode == 0, tried.stderr[-2000:]
    after = read_manifest(repo)
    for name in (STUDENT_KD, int8_name(STUDENT_KD)):
        served, candidate = after.models[name].version, after.models[name].candidate
        assert served == before.models[name].version and candidate.version == served + 1
        assert loaded_by_config(text_format.Parse((repo / name / "config.pbtxt").read_text(), ModelConfig())) == [
            served,
            candidate.version,
        ]
    assert after.models[TEACHER] == before.models[TEACHER] and after.cascade == before.cascade
    assert after.models[STUDENT_KD].candidate.cascade is not None  # fitted for it, waiting for its promotion
    gate = after.models[STUDENT_KD].candidate.offline_gate  # redistill's offline gate, passed
    test_images = json.loads((run / "results.json").read_text())["split_sizes"]["test"]
    assert gate["passed"] and gate["top1"]["images"] == test_images
    nudge_student()
    refused = export()
    assert refused.returncode == 2 and f"student_kd@{candidate.version} is still on trial" in refused.stderr
    assert read_manifest(repo) == after
    reject(repo, STUDENT_KD, after.models[STUDENT_KD].candidate.version)
    model, spec, meta = load_model(run / STUDENT_KD / "model.pt")
    with torch.no_grad():  # a student that answers the next class for every image: surely worse than the served
        model.backbone.fc.weight.copy_(model.backbone.fc.weight.roll(1, dims=0))
        model.backbone.fc.bias.copy_(model.backbone.fc.bias.roll(1, dims=0))
    save_model(run / STUDENT_KD / "model.pt", model, spec, meta)
    broken = export()
    assert broken.returncode == 2 and "student_kd is not exported as a candidate: top-1" in broken.stderr
    assert "surely worse by more than 2 points" in broken.stderr
    assert read_manifest(repo).models[STUDENT_KD].candidate is None
    promoted = export("--promote")  # the operator's override: no gate, current at once
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    now = read_manifest(repo).models[STUDENT_KD]
    assert now.candidate is None and now.version > after.models[STUDENT_KD].candidate.version
    served_otherwise = export("--instances", "2")  # the same graphs served another way: new current versions
    assert served_otherwise.returncode == 0, served_otherwise.stderr[-2000:]
    last = read_manifest(repo).models
    assert last[TEACHER].version == before.models[TEACHER].version + 1
    assert last[STUDENT_KD].version == now.version + 1 and last[STUDENT_KD].candidate is None
    assert "count: 2" in (repo / TEACHER / "config.pbtxt").read_text()


def test_a_version_appears_whole_under_its_number_and_a_dead_export_leaves_nothing_triton_loads(tmp_path):
    model_dir = tmp_path / "repo" / "m"
    # An export killed while copying version 1: its half-written files under the staging name.
    (model_dir / ".incoming-1").mkdir(parents=True)
    (model_dir / ".incoming-1" / "model.onnx").write_bytes(b"half")
    assert existing_versions(model_dir) == []  # nothing with a version number for Triton to load
    src = tmp_path / "weights.bin"
    src.write_bytes(b"complete graph")
    version, _ = write_model(tmp_path / "repo", "m", ModelConfig(name="m"), {"model.onnx": src}, ["a"], 2)
    assert version == 1 and (model_dir / "1" / "model.onnx").read_bytes() == b"complete graph"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt"]


def test_a_graph_is_kept_only_for_the_same_weights_and_constants(tmp_path):
    model = build_classifier("resnet18", 10, small_stem=True, width=0.25, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    path = tmp_path / "m.onnx"
    key = graph_key(model, 8, "logits")
    assert export_onnx(model, 8, path, key=key) is False
    first = path.stat().st_mtime_ns
    assert export_onnx(model, 8, path, key=graph_key(model, 8, "logits")) is True
    assert path.stat().st_mtime_ns == first
    # One weight changed, a baked-in constant changed, another input size: each a new graph.
    with torch.no_grad():
        model.backbone.fc.bias[0] += 1
    assert graph_key(model, 8, "logits") != key
    assert graph_key(model, 8, "logits", (1.5,)) != graph_key(model, 8, "logits", (1.4,))
    assert graph_key(model, 16, "logits") != graph_key(model, 8, "logits")
    assert export_onnx(model, 8, path, key=graph_key(model, 8, "logits")) is False


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad", "trimmed"),
    [
        (1, 3, 1, 1, 1),  # a 3x3 conv on a 1x1 map reads its centre tap only
        (2, 3, 2, 1, 2),  # stride 2 from 2x2 to 1x1: the first row and column read padding
        (2, 5, 1, 2, 3),
        (3, 5, 1, 2, 5),  # every tap reads a pixel somewhere: unchanged
        (8, 3, 1, 1, 3),
    ],
)
def test_padding_only_kernel_taps_are_sliced_out_and_the_function_is_the_same(size, kernel, stride, pad, trimmed):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 3, kernel, kernel)).astype(np.float32)
    out = (size + 2 * pad - kernel) // stride + 1
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node(
                "Conv", ["x", "w"], ["y"], kernel_shape=[kernel] * 2, pads=[pad] * 4, strides=[stride] * 2
            )
        ],
        "conv",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, size, size])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4, out, out])],
        [onnx.numpy_helper.from_array(weight, "w")],
        # The exporter records weights' shapes as well; they must follow the sliced weights.
        value_info=[onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, list(weight.shape))],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)])
    x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert drop_padding_taps(model) == (trimmed != kernel)
    (conv,) = model.graph.node
    assert onnx.numpy_helper.to_array(model.graph.initializer[0]).shape[2:] == (trimmed, trimmed)
    assert list(onnx.helper.get_attribute_value(conv.attribute[0])) == [trimmed] * 2
    onnx.checker.check_model(model, full_check=True)
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert after.shape == before.shape
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_exported_digits_resnet_keeps_only_the_taps_its_1x1_maps_read(tmp_path):
    torch.manual_seed(0)
    model = build_classifier("resnet18", 10, small_stem=True, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    export_onnx(model, 8, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx"))
    kernels = sorted(
        tuple(onnx.helper.get_attribute_value(a)) for n in graph.graph.node if n.op_type == "Conv"
        for a in n.attribute if a.name == "kernel_shape"
    )  # fmt: skip
    # layer4 works on 1x1 maps: its first conv keeps 2x2 taps, the other three 3x3 convs one tap.
    assert kernels.count((1, 1)) == 3 + 3 and kernels.count((2, 2)) == 1
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = model(torch.from_numpy(images)).numpy()
    np.testing.assert_allclose(run_logits(open_session(tmp_path / "m.onnx"), images), expected, rtol=1e-4, atol=1e-4)


def test_parity_gate_refuses_an_export_that_drifts():
    require_parity("ok", Parity(1e-5, 1.0, 10), 1e-3, 0.999)
    with pytest.raises(UserError, match="export refused"):
        require_parity("drifted", Parity(0.5, 1.0, 10), 1e-3, 0.999)
    with pytest.raises(UserError, match="export refused"):
        require_parity("flipped", Parity(1e-5, 0.9, 10), 1e-3, 0.999)


def test_export_without_a_trained_run_is_a_one_line_error(tmp_path, capsys):
    proc = training_cli(capsys, "export", "--run", str(tmp_path / "nothing"), "--repo", str(tmp_path / "repo"))
    assert proc.returncode == 2 and "train first" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_flavour_configs_use_onnxruntime_with_tensorrt_fp16(tiny_run, tmp_path):
    # A copy of the run: export writes its report, graphs and chart into the run, which other tests read.
    # Its graphs come along: the same weights make the same graph, so they are kept, not exported again.
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoint.pt", "export_report.*"))
    repo = tmp_path / "gpu"
    proc = run_training("export", "--run", str(run), "--repo", str(repo), "--flavor", "gpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((run / "export_report.json").read_text())["models"]
    assert all(report[name]["graph_kept"] for name in (STUDENT_KD, TEACHER, FUSED_ENSEMBLE)), report
    config = (repo / "student_kd" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and '"tensorrt"' in config and '"FP16"' in config
    assert "KIND_GPU" in config and not (repo / "student_kd" / "1" / "model.py").exists()
    assert "student_kd_int8" not in read_manifest(repo).models
    assert check_repository(repo) == []
    np.testing.assert_array_equal(
        np.frombuffer((repo / "student_kd" / "1" / "model.onnx").read_bytes()[:64], np.uint8),
        np.frombuffer((run / "onnx" / "student_kd.onnx").read_bytes()[:64], np.uint8),
    )
