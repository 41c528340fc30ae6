"""Distillation losses. Each is a plain function of logits (or features) so it can be tested
against independently computed golden values.

Conventions: logits are [N, C]; `temperature` softens both distributions; KL terms are scaled by
T^2 so their gradients keep the same magnitude as the temperature changes (Hinton et al., 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.models import ImageClassifier, stage_channels, stage_module
from training.recipe import DistillConfig


def hinton_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over the batch."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def dkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD.

    TCKD is the KL between binary (target, not-target) distributions; NCKD is the KL between the
    distributions over the non-target classes alone, which classical KD down-weights by the
    teacher's target confidence.
    """
    gt_mask = F.one_hot(target, student_logits.shape[1]).bool()
    p_s = F.softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)

    def binary(p: torch.Tensor) -> torch.Tensor:
        p_target = (p * gt_mask).sum(dim=1, keepdim=True)
        return torch.cat([p_target, 1 - p_target], dim=1).clamp_min(1e-12)

    b_s, b_t = binary(p_s), binary(p_t)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(dim=1).mean() * temperature**2

    # Masking the target logit with a large negative value leaves a softmax over the others.
    masked = -1000.0 * gt_mask
    log_q_s = F.log_softmax(student_logits / temperature + masked, dim=1)
    log_q_t = F.log_softmax(teacher_logits / temperature + masked, dim=1)
    nckd = F.kl_div(log_q_s, log_q_t, reduction="batchmean", log_target=True) * temperature**2
    return alpha * tckd + beta * nckd


def logit_distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, cfg: DistillConfig
) -> torch.Tensor:
    """The configured soft loss (without the hard-label term)."""
    if cfg.loss == "dkd":
        return dkd(
            student_logits,
            teacher_logits,
            target,
            alpha=cfg.dkd_alpha,
            beta=cfg.dkd_beta,
            temperature=cfg.temperature,
        )
    return hinton_kd(student_logits, teacher_logits, cfg.temperature)


class FeatureHint(nn.Module):
    """FitNets hint: a 1x1 conv + BN adapter maps a student stage onto the teacher's, MSE between them.

    Features are captured with forward hooks, so neither network's forward needs changing. The
    adapter is trained with the student and thrown away after training.
    """

    def __init__(self, student: ImageClassifier, teacher: ImageClassifier, stage: str):
        super().__init__()
        s_ch, t_ch = stage_channels(student, stage), stage_channels(teacher, stage)
        self.adapter = nn.Sequential(nn.Conv2d(s_ch, t_ch, kernel_size=1, bias=False), nn.BatchNorm2d(t_ch))
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = [
            stage_module(student, stage).register_forward_hook(self._capture("student")),
            stage_module(teacher, stage).register_forward_hook(self._capture("teacher")),
        ]

    def _capture(self, key: str):
        def hook(_module, _inputs, output: torch.Tensor) -> None:
            self._captured[key] = output

        return hook

    def loss(self) -> torch.Tensor:
        student, teacher = self._captured.pop("student"), self._captured.pop("teacher")
        hinted = self.adapter(student)
        if hinted.shape[-2:] != teacher.shape[-2:]:
            hinted = F.adaptive_avg_pool2d(hinted, teacher.shape[-2:])
        return F.mse_loss(hinted, teacher.detach())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
