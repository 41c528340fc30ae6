"""Evaluation: accuracy, calibration, agreement with the teacher, temperature scaling, fusion."""

from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from training.data import iterate_batches
from training.models import calibrated_mean


@torch.no_grad()
def predict_logits(
    model: nn.Module, dataset: Dataset, device: torch.device | str = "cpu", batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits for a whole split (float32, on the CPU) and its labels. Multi-head models give [N, K, C]."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    for images, target in iterate_batches(dataset, batch_size):
        outputs.append(model(images.to(device)).float().cpu())
        labels.append(target)
    model.train(was_training)
    return torch.cat(outputs), torch.cat(labels)


def top_k_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == labels.unsqueeze(-1)).any(dim=-1).float().mean().item()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| * share."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for low, high in pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            gap = (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
            ece += gap * in_bin.float().mean()
    return ece.item()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising validation NLL of softmax(z / T)."""
    log_t = torch.zeros(1, requires_grad=True)  # optimise log T so T stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.exp().clamp(0.05, 20.0).item())


class FusedEnsemble(nn.Module):
    """uint8 images -> the members' fused probabilities: the ensemble as one exportable graph.

    Serving it as one ONNX graph costs one Triton call and one ONNX Runtime run instead of one per
    member plus a fusion step; its rule is `calibrated_mean`, so it is the ensemble training measured.
    """

    def __init__(self, members: list[nn.Module], temperatures: list[float]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.temperatures = list(temperatures)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return calibrated_mean([member(images) for member in self.members], self.temperatures)


def classification_metrics(
    probs: torch.Tensor, labels: torch.Tensor, teacher_pred: torch.Tensor | None, ece_bins: int
) -> dict[str, float]:
    """Top-1/top-5, ECE and teacher agreement from (calibrated) probabilities [N, C]."""
    metrics = {
        "top1": top_k_accuracy(probs, labels, 1),
        "top5": top_k_accuracy(probs, labels, 5),
        "ece": expected_calibration_error(probs, labels, ece_bins),
    }
    if teacher_pred is not None:
        metrics["teacher_agreement"] = (probs.argmax(-1) == teacher_pred).float().mean().item()
    return metrics


def cascade_answers(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cascade's probabilities [N, C] and which images it escalated [N]: the student answers,
    and the teacher where the student's calibrated confidence is below `threshold`."""
    escalated = student_probs.max(dim=-1).values < threshold
    return torch.where(escalated.unsqueeze(-1), teacher_probs, student_probs), escalated


def fit_cascade_threshold(
    student_probs: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor, max_drop: float
) -> float:
    """The lowest confidence threshold (fewest escalations) at which the cascade's top-1 on these
    (validation) images is at most `max_drop` below the teacher's.

    Candidates are midpoints between consecutive student confidences, so a threshold sits between
    images rather than on one; escalating everything (the teacher alone) always qualifies.
    """
    teacher_top1 = top_k_accuracy(teacher_probs, labels, 1)
    confidence = student_probs.max(dim=-1).values.sort().values
    candidates = [0.0, *((confidence[:-1] + confidence[1:]) / 2).tolist(), 1.0 + 1e-6]
    for threshold in candidates:
        answers, _ = cascade_answers(student_probs, teacher_probs, threshold)
        if top_k_accuracy(answers, labels, 1) >= teacher_top1 - max_drop - 1e-9:
            return float(threshold)
    return candidates[-1]
