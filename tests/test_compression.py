"""The pruning stop rule judges a step on the same validation images as its source, with its uncertainty."""

import pytest
import torch

from training.compression import paired_drop
from training.report import compression_markdown


def outcomes(n: int, lost: int, gained: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source right on all but `gained` images; the pruned model wrong on `lost` of those, right on the rest."""
    source = torch.ones(n, dtype=torch.bool)
    source[:gained] = False
    pruned = source.clone()
    pruned[:gained] = True
    pruned[gained : gained + lost] = False
    return source, pruned


def test_paired_drop_counts_only_discordant_images_with_a_one_sided_bound():
    judged = paired_drop(*outcomes(270, lost=3, gained=0))
    assert (judged["lost"], judged["gained"]) == (3, 0)
    assert judged["drop"] == pytest.approx(3 / 270)
    # sqrt(3 - 9/270) / 270 = 0.006379; 1.645 of it below 1.111%: 0.062%
    assert judged["drop_lower"] == pytest.approx(3 / 270 - 1.645 * 0.0063794, abs=1e-6)
    assert judged["drop_lower"] < 0.01  # three images are not evidence of a 1-point loss: kept

    ten = paired_drop(*outcomes(270, lost=10, gained=0))
    assert ten["drop_lower"] == pytest.approx(10 / 270 - 1.645 * 0.0114932, abs=1e-6)
    assert ten["drop_lower"] > 0.01  # ten images are: rejected

    mixed = paired_drop(*outcomes(270, lost=6, gained=5))
    assert mixed["drop"] == pytest.approx(1 / 270) and mixed["drop_lower"] < 0  # churn without a net loss
    assert paired_drop(*outcomes(270, lost=0, gained=0)) == {"lost": 0, "gained": 0, "drop": 0.0, "drop_lower": 0.0}


def test_a_compression_that_kept_nothing_says_so():
    step = {
        "step": 1,
        "channel_share_removed": 0.1,
        "macs": 27_000_000,
        "macs_share": 0.78,
        "params": 9_000_000,
        "recovery_epochs": 3,
        "val_top1": 0.95,
        "val_drop": 0.04,
        "val_drop_lower_95": 0.02,
        "val_images_lost": 11,
        "val_images_gained": 0,
        "kept": False,
    }
    text = "\n".join(compression_markdown({"source": "student_kd", "kept_step": 0, "steps": [step]}, {}))
    assert "No step was kept" in text and "no `student_pruned` is exported" in text
    assert "| 1 | 10% |" in text and "| 11 / 0 |" in text and "| no |" in text
