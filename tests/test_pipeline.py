"""`python -m training all` end to end on real digits (a tiny version of the recipe)."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from kdcontract.errors import UserError
from tests.conftest import ROOT, TINY_OVERRIDES, override_args, run_training, training_cli
from training import stages as stages_module
from training.checkpoint import load_model
from training.data import load_data
from training.evaluate import predict_logits, top_k_accuracy
from training.pipeline import init_model
from training.recipe import load_recipe
from training.stages import plan_stages

MODEL_NAMES = {
    "teacher",
    "student_plain",
    "student_kd",
    "student_plain_seed1",
    "student_kd_seed1",
    "variant_0",
    "variant_1",
    "multihead",
    "ensemble",
    "cascade",
    "student_pruned",
}


def test_results_json_has_every_model_with_fractions(tiny_results):
    models = tiny_results["models"]
    assert set(models) == MODEL_NAMES
    for name, metrics in models.items():
        assert 0.0 <= metrics["top1"] <= 1.0, name
        assert 0.0 <= metrics["ece"] <= 1.0, name
        assert metrics["params"] > 1e5 and metrics["macs"] > 1e6, name  # narrow ResNet18s: ~0.7 M parameters
    assert models["teacher"].get("teacher_agreement") is None
    assert models["ensemble"]["members"] == ["variant_0", "variant_1"]
    assert tiny_results["seconds"] > 0 and "teacher" in tiny_results["stage_seconds"]
    assert len(tiny_results["seed_study"]["student_kd"]["top1"]) == 2


def test_variants_identical_to_kd_seed_runs_are_reused_not_retrained(tiny_results):
    assert {"variant_0", "variant_1"} <= set(tiny_results["reused_stages"])
    assert tiny_results["models"]["variant_0"]["top1"] == tiny_results["models"]["student_kd"]["top1"]


def test_saved_models_reproduce_the_reported_accuracy(tiny_run, tiny_results):
    model, spec, _ = load_model(tiny_run / "student_kd" / "model.pt")
    assert spec.temperature > 0 and spec.class_names == [str(d) for d in range(10)]
    data = load_data(load_recipe("digits").data)
    logits, labels = predict_logits(model, data.test)
    assert top_k_accuracy(logits, labels, 1) == tiny_results["models"]["student_kd"]["top1"]
    assert (tiny_run / "student_kd" / "metrics.jsonl").read_text().count("\n") == 8  # one line per epoch
    assert "student:" in (tiny_run / "recipe.yaml").read_text()
    stage_config = (tiny_run / "student_kd" / "config.yaml").read_text()
    assert "distill:" in stage_config and "epochs: 8" in stage_config and "width: 0.25" in stage_config
    assert "| student_kd |" in (tiny_run / "results.md").read_text()


def weights_digest(model_file) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(torch.load(model_file, weights_only=True)["state_dict"].items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_rerun_reuses_every_stage_and_changed_settings_retrain(tiny_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    kd_before = weights_digest(out / "student_kd" / "model.pt")
    again = run_training("all", "--out", str(out), *override_args(TINY_OVERRIDES))
    assert again.returncode == 0, again.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["reused_stages"]) == set(results["stage_seconds"]) - {"evaluation"}
    changed = run_training(
        "all",
        "--out",
        str(out),
        *override_args(
            [
                *TINY_OVERRIDES,
                "ensemble.multihead.heads=0",
                "evaluation.seeds=[0]",
                "ensemble.variants=[]",
                "compression.enabled=false",  # its source changes too: re-pruning would prove nothing more
                "distill.temperature=3.0",
            ]
        ),
    )
    assert changed.returncode == 0, changed.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["reused_stages"] == ["teacher", "student_plain"]
    # Retrained for real: its old checkpoint (other settings) was not resumed into the new run.
    assert results["stage_seconds"]["student_kd"] > 0
    assert weights_digest(out / "student_kd" / "model.pt") != kd_before


def test_plan_says_which_stages_are_trained_without_training_any(tiny_run, capsys):
    plan = ["plan", "--out", str(tiny_run), "--exit-code"]
    same = training_cli(capsys, *plan, *override_args(TINY_OVERRIDES))
    assert same.returncode == 0, same.stderr
    assert all(line.endswith("trained (reused)") for line in same.stdout.splitlines())
    assert {line.split()[0] for line in same.stdout.splitlines()} == {
        *json.loads((tiny_run / "results.json").read_text())["stage_seconds"]
    } - {"evaluation"}
    # Another distillation temperature: the KD students and everything downstream of them are to train.
    changed = training_cli(capsys, *plan, *override_args([*TINY_OVERRIDES, "distill.temperature=3.0"]))
    assert changed.returncode == 1, changed.stderr
    status = dict(line.split(maxsplit=1) for line in changed.stdout.splitlines())
    assert status["teacher"] == status["student_plain"] == "trained (reused)"
    assert status["student_kd"] == status["variant_0"] == status["multihead"] == "to train"
    assert status["student_pruned"] == "to train"


def test_only_selects_the_named_stages_and_those_they_learn_from():
    recipe = load_recipe("digits")
    stages = stages_module.check_stage_references(recipe)

    def selected(*only: str) -> tuple[list[str], bool]:
        chosen, prune = stages_module.select_stages(recipe, stages, only)
        return [stage.name for stage in chosen], prune

    assert selected("student_plain") == (["student_plain"], False)  # no teacher: `make demo` serves it first
    assert selected("student_kd") == (["teacher", "student_kd"], False)
    assert selected("student_pruned") == (["teacher", "student_kd"], True)  # its source, and the teacher
    assert selected("variant_1", "student_plain_seed2") == (["teacher", "student_plain_seed2", "variant_1"], False)
    with pytest.raises(UserError, match=r"--only student_plian: not a stage of this recipe; its stages: teacher, "):
        selected("student_plian")


def test_a_trained_student_classifies_real_digits(tiny_results):
    # Four epochs on 1,257 real digits, labels alone: far above the 10% of guessing.
    assert tiny_results["models"]["student_plain"]["top1"] > 0.85


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    # The teacher alone (`--only`): what is resumed is its epoch, the students would only add time.
    settings = [
        *override_args(
            [
                "teacher.arch=resnet18",
                "teacher.width=0.5",
                "teacher.train.epochs=2",
                "data.augment.client_forms=0",  # each of the three processes would render them: ~6 s
            ]
        ),
        *("--only", "teacher"),
    ]
    whole = tmp_path / "whole"
    assert run_training("all", "--out", str(whole), *settings).returncode == 0

    cut = tmp_path / "cut"
    command = [sys.executable, "-m", "training", "all", "--out", str(cut), *settings]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = cut / "teacher" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists():  # epoch 1 is saved: the kill lands in epoch 2
        assert proc.poll() is None and time.monotonic() < deadline, "the teacher never saved a checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "teacher" / "model.pt").exists()
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1

    resumed = run_training("all", "--out", str(cut), *settings)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert weights_digest(cut / "teacher" / "model.pt") == weights_digest(whole / "teacher" / "model.pt")
    epochs = [json.loads(line)["epoch"] for line in (cut / "teacher" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]  # each epoch once: the resumed run did not start over


INIT_DIGEST = """
import hashlib, sys
from training.data import load_data
from training.pipeline import init_model
from training.stages import plan_stages
from training.recipe import load_recipe
for seed in sys.argv[1:]:
    recipe = load_recipe("digits", [f"evaluation.seeds=[{seed}]"])
    model = init_model(plan_stages(recipe)[1], load_data(recipe.data))  # the plain student
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.numpy().tobytes())
    print(digest.hexdigest())
"""


def _init_digests(*seeds_per_process: list[int]) -> list[list[str]]:
    """The plain student's initial weights for each seed, one list of seeds per process (run side by side:
    most of each is importing torch)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", INIT_DIGEST, *map(str, seeds)], stdout=subprocess.PIPE, text=True)
        for seeds in seeds_per_process
    ]
    digests = [proc.communicate(timeout=180)[0].split() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    return digests


def test_initial_weights_come_from_the_stage_seed_in_every_process():
    # torch seeds itself randomly at start-up: two processes must still start a stage from the same weights.
    [first, other], [again] = _init_digests([0, 1], [0])
    assert len(first) == 64
    assert first == again
    assert first != other


def test_a_distilling_stage_starts_from_distill_init_when_it_is_the_same_network(tiny_run, tmp_path):
    recipe = load_recipe(str(tiny_run / "recipe.yaml"), [f"distill.init={tiny_run / 'student_plain' / 'model.pt'}"])
    data = load_data(recipe.data)
    stages = {stage.name: stage for stage in plan_stages(recipe)}
    served, _, _ = load_model(tiny_run / "student_plain" / "model.pt")
    started = init_model(stages["student_kd"], data)
    for name, tensor in served.state_dict().items():
        assert torch.equal(started.state_dict()[name], tensor), name
    fresh = init_model(stages["student_plain"], data)  # no teacher, no start checkpoint
    assert not torch.equal(fresh.state_dict()["backbone.fc.weight"], served.state_dict()["backbone.fc.weight"])
    assert "init" in stages_module._sources(stages["student_kd"], recipe)  # the start is in the stage's fingerprint

    wider = load_recipe(str(tiny_run / "recipe.yaml"), [f"distill.init={tiny_run / 'student_plain' / 'model.pt'}"])
    wider.student.width = 0.5
    with pytest.raises(UserError, match="start it from fresh weights"):
        init_model(next(s for s in plan_stages(wider) if s.name == "student_kd"), data)
