"""Export to ONNX and the Triton repository: parity, FP16, INT8, versions, check-repo."""

import json
import shutil

import numpy as np
import pytest

from tests.conftest import run_training
from training.check_repo import check_repository
from training.errors import UserError
from training.manifest import read_manifest
from training.onnx_tools import Parity, require_parity
from training.triton_repo import existing_versions, write_model

SERVED = {
    "teacher",
    "student_kd",
    "student_kd_int8",
    "student_plain",
    "variant_0",
    "variant_1",
    "multihead",
    "ensemble",
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
    assert manifest.models["ensemble"].members == ["variant_0", "variant_1", "ensemble_fusion"]
    assert (tiny_repo / "student_kd" / "1" / "model.onnx").is_file()
    assert (tiny_repo / "student_kd" / "1" / "model.py").is_file()
    assert (tiny_repo / "student_kd" / "labels.txt").read_text().split() == [str(d) for d in range(10)]
    config = (tiny_repo / "student_kd" / "config.pbtxt").read_text()
    for setting in ("dynamic_batching", "max_queue_size", "timeout_action: REJECT", "model_warmup", "KIND_CPU"):
        assert setting in config
    assert check_repository(tiny_repo) == []


def test_export_report_has_parity_fp16_and_int8_measurements(tiny_run):
    report = json.loads((tiny_run / "export_report.json").read_text())
    for name in ("teacher", "student_kd", "multihead"):
        assert report["models"][name]["onnx_vs_torch"]["max_abs_diff"] < 1e-3
        assert report["models"][name]["onnx_vs_torch"]["top1_agreement"] == 1.0
        assert report["models"][name]["fp16_vs_fp32"]["top1_agreement"] >= 0.95
    int8 = report["models"]["student_kd_int8"]
    assert int8["agreement_with_fp32"] > 0.85
    assert int8["latency_p50"]["batch_1"]["int8_ms"] > 0
    assert "INT8 static quantisation" in (tiny_run / "export_report.md").read_text()


def test_check_repo_catches_tampered_files_and_mismatched_configs(tiny_repo, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo)
    onnx_file = repo / "student_plain" / "1" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    config = repo / "teacher" / "config.pbtxt"
    config.write_text(config.read_text().replace("dims: [ 8, 8, 3 ]", "dims: [ 16, 16, 3 ]"))
    problems = check_repository(repo)
    assert any("student_plain/1/model.onnx does not match its sha256" in p for p in problems)
    assert any("teacher: config tensor 'images' is not UINT8 [8, 8, 3]" in p for p in problems)
    proc = run_training("check-repo", str(repo))
    assert proc.returncode == 2 and "problem(s)" in proc.stderr


def test_a_new_export_adds_a_version_and_keeps_the_newest(tmp_path):
    src = tmp_path / "weights.bin"
    for i in range(4):
        src.write_bytes(bytes([i]))
        version, hashes = write_model(tmp_path / "repo", "m", 'name: "m"\n', {"model.onnx": src}, ["a"], 2)
        assert version == i + 1 and f"m/{version}/model.onnx" in hashes
    assert existing_versions(tmp_path / "repo" / "m") == [3, 4]
    assert (tmp_path / "repo" / "m" / "4" / "model.onnx").read_bytes() == bytes([3])


def test_parity_gate_refuses_an_export_that_drifts():
    require_parity("ok", Parity(1e-5, 1.0, 10), 1e-3, 0.999)
    with pytest.raises(UserError, match="export refused"):
        require_parity("drifted", Parity(0.5, 1.0, 10), 1e-3, 0.999)
    with pytest.raises(UserError, match="export refused"):
        require_parity("flipped", Parity(1e-5, 0.9, 10), 1e-3, 0.999)


def test_export_without_a_trained_run_is_a_one_line_error(tmp_path):
    proc = run_training("export", "--run", str(tmp_path / "nothing"), "--repo", str(tmp_path / "repo"))
    assert proc.returncode == 2 and "train first" in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_flavour_configs_use_onnxruntime_with_tensorrt_fp16(tiny_run, tmp_path):
    repo = tmp_path / "gpu"
    proc = run_training("export", "--run", str(tiny_run), "--repo", str(repo), "--flavor", "gpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = (repo / "student_kd" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and '"tensorrt"' in config and '"FP16"' in config
    assert "KIND_GPU" in config and not (repo / "student_kd" / "1" / "model.py").exists()
    assert "student_kd_int8" not in read_manifest(repo).models
    assert check_repository(repo) == []
    np.testing.assert_array_equal(
        np.frombuffer((repo / "student_kd" / "1" / "model.onnx").read_bytes()[:64], np.uint8),
        np.frombuffer((tiny_run / "onnx" / "student_kd.onnx").read_bytes()[:64], np.uint8),
    )
