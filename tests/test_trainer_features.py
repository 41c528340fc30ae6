"""Trainer features KD recipes use: accumulation, clipping, the OOM batch finder, a temperature schedule,
unlabelled transfer images; and the pieces of compression and the cascade that need no served model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.utils.data import ConcatDataset

import training.trainer as trainer
from training.checkpoint import ModelSpec, load_model, save_model
from training.data import UNLABELLED, InMemoryImages, SplitData, holds_unlabelled, load_data
from training.evaluate import cascade_answers, fit_cascade_threshold, predict_logits, top_k_accuracy
from training.models import ImageClassifier, build_classifier, count_macs
from training.recipe import AugmentConfig, DataConfig, DistillConfig, TrainConfig
from training.runtime import Runtime
from training.trainer import FitJob, _objective, fit, temperature_at

CPU = Runtime(device=torch.device("cpu"))


def linear_model(seed: int = 0) -> ImageClassifier:
    """No BatchNorm and no randomness in the forward: micro-batches add up exactly to a batch."""
    torch.manual_seed(seed)
    return ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 10)), (0.5,) * 3, (0.25,) * 3)


@pytest.fixture(scope="module")
def digits() -> SplitData:
    data = load_data(DataConfig(dataset="digits", image_size=8))
    data.train = data.train.subset(range(256))  # 4 batches of 64, no partial batch
    return data


def run(data: SplitData, tmp: Path, model: nn.Module | None = None, **train) -> tuple[nn.Module, list[dict]]:
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.1, "momentum": 0.0,
                         "warmup_epochs": 0, "precision": "fp32", **train})  # fmt: skip
    job = FitJob("t", model or linear_model(), cfg, AugmentConfig(), seed=0, out_dir=tmp, resume=False)
    result = fit(job, data, CPU)
    return result, [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]


def test_accumulated_micro_batches_equal_one_large_batch(digits, tmp_path):
    whole, _ = run(digits, tmp_path / "a", batch_size=64)
    accumulated, history = run(digits, tmp_path / "b", batch_size=16, accumulate_steps=4)
    for a, b in zip(whole.model.parameters(), accumulated.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert history[0]["accumulate_steps"] == 4
    different, _ = run(digits, tmp_path / "c", batch_size=16)  # 16 steps of 16 images: not the same
    assert not torch.allclose(next(whole.model.parameters()), next(different.model.parameters()), atol=1e-4)


def test_gradient_norm_clipping_bounds_each_update(digits, tmp_path):
    start = [p.detach().clone() for p in linear_model().parameters()]
    clipped, history = run(digits, tmp_path / "a", clip_grad_norm=1e-3)
    moved = torch.cat([(p - s).flatten() for p, s in zip(clipped.model.parameters(), start, strict=True)]).norm()
    steps, lr = 4, 0.1
    assert moved <= steps * lr * 1e-3 * 1.001
    assert history[0]["grad_norm_max"] > 1e-3  # the gradient was larger: the clip did the bounding
    free, _ = run(digits, tmp_path / "b")
    moved_free = torch.cat([(p - s).flatten() for p, s in zip(free.model.parameters(), start, strict=True)]).norm()
    assert moved_free > 100 * moved


def test_batch_finder_halves_on_out_of_memory_and_keeps_the_effective_batch(digits, tmp_path, monkeypatch):
    probed = []
    real_probe = trainer._probe_step

    def probe_with_16_images_of_memory(model, teacher, images, precision):
        probed.append(len(images))
        if len(images) > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        real_probe(model, teacher, images, precision)

    monkeypatch.setattr(trainer, "_probe_step", probe_with_16_images_of_memory)
    result, history = run(digits, tmp_path / "a", batch_size=64, find_batch_size="on")
    assert probed == [64, 32, 16]
    assert (result.batch_size, result.accumulate_steps) == (16, 4)
    assert (history[0]["batch_size"], history[0]["accumulate_steps"]) == (16, 4)
    # The probe leaves no trace: the run equals one configured as 16 x 4 from the start.
    planned, _ = run(digits, tmp_path / "b", batch_size=16, accumulate_steps=4)
    for a, b in zip(result.model.parameters(), planned.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_batch_finder_gives_up_with_a_clear_error_at_one_image(digits, tmp_path, monkeypatch):
    def never_fits(*_args):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(trainer, "_probe_step", never_fits)
    with pytest.raises(trainer.UserError, match="one image does not fit"):
        run(digits, tmp_path, batch_size=4, find_batch_size="on")


def test_temperature_schedule_is_linear_from_start_to_end():
    cfg = DistillConfig(temperature=4.0, temperature_end=1.0)
    assert temperature_at(cfg, 0, 11) == 4.0
    assert temperature_at(cfg, 5, 11) == pytest.approx(2.5)
    assert temperature_at(cfg, 10, 11) == 1.0
    assert temperature_at(DistillConfig(temperature=3.0), 7, 11) == 3.0


def test_weight_average_is_the_exponential_mean_of_every_step_and_what_the_run_returns(digits, tmp_path, monkeypatch):
    steps: list[list[torch.Tensor]] = []
    update = trainer.AveragedModel.update_parameters

    def record(self, model):
        steps.append([p.detach().clone() for p in model.parameters()])
        return update(self, model)

    monkeypatch.setattr(trainer.AveragedModel, "update_parameters", record)
    decay = 0.5
    averaged, history = run(digits, tmp_path / "a", epochs=2, ema_decay=decay)
    assert len(steps) == 8  # 2 epochs of 4 optimizer steps
    expected = steps[0]  # the first update copies the weights
    for weights in steps[1:]:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights, strict=True)]
    for got, want in zip(averaged.model.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want)
    last = steps[-1]
    assert not torch.allclose(next(averaged.model.parameters()), last[0])  # not the last step's weights
    # Validation judged the average, and the checkpoint carries it for a resumed run.
    val_logits, val_labels = predict_logits(averaged.model, digits.val, torch.device("cpu"))
    assert history[-1]["val_top1"] == pytest.approx(top_k_accuracy(val_logits, val_labels, 1), abs=1e-5)
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert int(state["ema"]["n_averaged"]) == 8


def test_unlabelled_images_learn_from_the_teacher_alone():
    torch.manual_seed(0)
    logits, teacher = torch.randn(6, 10), torch.randn(6, 10)
    job = FitJob("t", linear_model(), TrainConfig(), AugmentConfig(), seed=0, out_dir=Path("."))
    distill = DistillConfig(alpha=0.5, temperature=2.0)
    none = torch.full((6,), UNLABELLED)
    soft_only = _objective(logits, none, teacher, job, distill)
    assert torch.isfinite(soft_only)
    kl = torch.nn.functional.kl_div(
        (logits / 2).log_softmax(1), (teacher / 2).log_softmax(1), reduction="batchmean", log_target=True
    )
    torch.testing.assert_close(soft_only, kl * 4)
    # Labels where known: the hard term covers exactly the labelled rows.
    mixed = torch.tensor([1, 2, UNLABELLED, UNLABELLED, 3, UNLABELLED])
    ce = torch.nn.functional.cross_entropy(logits[mixed >= 0], mixed[mixed >= 0])
    torch.testing.assert_close(_objective(logits, mixed, teacher, job, distill), 0.5 * kl * 4 + 0.5 * ce)


def test_a_set_known_to_be_labelled_skips_the_label_check_and_gives_the_same_loss():
    torch.manual_seed(0)
    logits, teacher, target = torch.randn(6, 10), torch.randn(6, 10), torch.tensor([1, 2, 3, 4, 5, 6])
    job = FitJob("t", linear_model(), TrainConfig(label_smoothing=0.1), AugmentConfig(), seed=0, out_dir=Path("."))
    for distill, teacher_logits in ((None, None), (DistillConfig(alpha=0.3, temperature=2.0), teacher)):
        checked = _objective(logits, target, teacher_logits, job, distill)
        assert torch.equal(_objective(logits, target, teacher_logits, job, distill, all_labelled=True), checked)
    labelled = InMemoryImages(torch.zeros(4, 8, 8, 3, dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    assert not holds_unlabelled(labelled)
    assert holds_unlabelled(labelled.unlabelled())
    assert holds_unlabelled(ConcatDataset([labelled, labelled.unlabelled()]))
    assert not holds_unlabelled(ConcatDataset([labelled, labelled]))


def test_few_labels_keep_a_stratified_share_and_the_rest_is_unlabelled():
    data = load_data(DataConfig(dataset="digits", image_size=8, labelled_fraction=0.1))
    full = load_data(DataConfig(dataset="digits", image_size=8))
    assert len(data.train) + len(data.transfer) == len(full.train)
    assert abs(len(data.train) - 0.1 * len(full.train)) <= 10
    assert sorted(data.train.labels.unique().tolist()) == list(range(10))
    assert (data.transfer.labels == UNLABELLED).all()
    torch.testing.assert_close(data.test.images, full.test.images)  # same test split as `digits`


def test_pruned_checkpoint_reloads_with_its_narrower_layers(tmp_path):
    model = build_classifier("resnet18", 10, small_stem=True, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    macs = count_macs(model, 8)
    pruner = tp.pruner.BasePruner(
        model,
        torch.zeros(1, 8, 8, 3, dtype=torch.uint8),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.3,
        ignored_layers=[model.backbone.fc],
        round_to=8,
    )
    pruner.step()
    assert count_macs(model, 8) < 0.6 * macs
    spec = ModelSpec("resnet18", 10, True, 8, (0.5,) * 3, (0.25,) * 3, [str(i) for i in range(10)], pruned=True)
    save_model(tmp_path / "model.pt", model, spec, {})
    loaded, _, _ = load_model(tmp_path / "model.pt")
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    torch.testing.assert_close(loaded(images), model(images))
    assert count_macs(loaded, 8) == count_macs(model, 8)


def test_cascade_threshold_is_the_lowest_that_keeps_accuracy_near_the_teacher():
    labels = torch.zeros(10, dtype=torch.long)
    # Student: right on its 6 confident images, wrong on its 4 unsure ones; the teacher is right on all.
    confidence = torch.tensor([0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.7, 0.65, 0.6, 0.55])
    right = torch.tensor([True] * 6 + [False] * 4)
    student = torch.zeros(10, 2)
    student[:, 0] = torch.where(right, confidence, 1 - confidence)
    student[:, 1] = 1 - student[:, 0]
    teacher = torch.tensor([[0.9, 0.1]] * 10)
    threshold = fit_cascade_threshold(student, teacher, labels, max_drop=0.0)
    answers, escalated = cascade_answers(student, teacher, threshold)
    assert escalated.tolist() == [False] * 6 + [True] * 4  # exactly the four unsure images
    assert top_k_accuracy(answers, labels, 1) == 1.0
    # Allowing a 20-point drop, two escalations fewer are enough.
    _, fewer = cascade_answers(student, teacher, fit_cascade_threshold(student, teacher, labels, max_drop=0.2))
    assert int(fewer.sum()) == 2


def test_concat_keeps_client_forms_and_lets_a_plain_set_stand_in_for_its_own():
    images = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    with_forms = InMemoryImages(images, torch.tensor([0, 1, 2]), torch.zeros(3, 2, 8, 8, 3, dtype=torch.uint8))
    plain = InMemoryImages(images[:2], torch.full((2,), UNLABELLED))
    both = with_forms.concat(plain)
    assert both.client_forms.shape == (5, 2, 8, 8, 3)
    torch.testing.assert_close(both.client_forms[3, 1], images[0])
    assert both.labels.tolist() == [0, 1, 2, UNLABELLED, UNLABELLED]


def test_transfer_folder_images_are_prepared_like_the_data_and_bad_files_are_named(tmp_path):
    from PIL import Image, ImageOps

    from kdcontract.digits import digits_gray
    from kdcontract.imageprep import prepare
    from training.data import load_transfer_folder

    data = load_data(DataConfig(dataset="digits", image_size=8))
    (tmp_path / "a" / "b").mkdir(parents=True)
    sent = [ImageOps.invert(Image.fromarray(digits_gray()[0][i]).resize((64, 64))) for i in range(3)]
    for i, picture in enumerate(sent):  # dark ink on paper, in nested folders, as photos would come
        picture.save(tmp_path / ("a/b" if i else "a") / f"{i}.png")
    transfer = load_transfer_folder(str(tmp_path), data.preprocessing)
    assert transfer.images.shape == (3, 8, 8, 3) and (transfer.labels == UNLABELLED).all()
    expected = prepare(sent[0], data.preprocessing)
    assert (transfer.images[0].numpy() == expected).all()
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(trainer.UserError, match=r"broken\.png"):
        load_transfer_folder(str(tmp_path), data.preprocessing)


def test_the_teacher_cache_answers_each_distinct_image_once_with_the_teachers_own_logits():
    """`distill.cache_teacher`: the same logits as the teacher, the teacher run only on images it has not seen."""
    from training.trainer import TeacherCache

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 3, 10))
    calls = []
    teacher.register_forward_hook(lambda _m, inputs, _o: calls.append(len(inputs[0])))
    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    cache = TeacherCache(lambda x: teacher(x.float()))
    first = cache(images[:4])
    again = cache(images[[3, 1, 4, 5, 0]])  # three seen, two new
    assert calls == [4, 2] and (cache.hits, cache.misses) == (3, 6)
    expected = teacher(images.float())
    torch.testing.assert_close(first, expected[:4])
    torch.testing.assert_close(again, expected[[3, 1, 4, 5, 0]])
