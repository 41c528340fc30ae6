"""Bad input ends with one line that says what to fix, exit code 2, and no traceback."""

import subprocess
import sys

from tests.conftest import run_training, training_cli


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bad_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nteacher: {arch: resnet99}\nstudent: {arch: resnet18}\n")
    assert_one_line_error(run_training("all", "--recipe", str(bad), "--out", str(tmp_path)), "teacher.arch")


def test_missing_dataset_folder(tmp_path, capsys):
    proc = training_cli(
        capsys,
        "all",
        "--out",
        str(tmp_path),
        "--set",
        "data.dataset=imagefolder",
        "--set",
        "data.augment.client_forms=0",  # the digits recipe's client forms are for digits only
        "--set",
        f"data.root={tmp_path}/missing",
    )
    assert_one_line_error(proc, "does not exist", "data.root")


def test_digit_client_forms_on_another_dataset_are_refused_with_the_fix(tmp_path):
    proc = run_training("all", "--out", str(tmp_path), "--set", "data.dataset=cifar10", "--set", "data.root=/x")
    assert_one_line_error(proc, "client_forms", "digits only", "data.augment.client_forms=0")


def test_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.pt").write_bytes(b"not a checkpoint at all")
    assert_one_line_error(training_cli(capsys, "all", "--out", str(tmp_path)), "corrupt", "teacher/model.pt")


def test_a_misspelt_stage_reference_fails_before_anything_trains(tmp_path):
    for key in ("compression.source", "cascade.student"):
        proc = run_training("all", "--out", str(tmp_path), "--set", f"{key}=student_kdd")
        assert_one_line_error(proc, key, "'student_kdd'", "student_kd")
        assert not (tmp_path / "teacher").exists()  # refused at load, not after the teacher trained


def test_the_load_tools_end_user_errors_with_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "demo", "--repo", str(tmp_path / "missing"), "--once"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line_error(proc, "missing is not a model repository", "python -m training export")
