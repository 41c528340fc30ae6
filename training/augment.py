"""Batched augmentation of uint8 NHWC tensors, run on the training device.

Working on whole batches (not per-image PIL transforms) keeps a 2-core CPU busy with training,
and on a GPU it costs nothing. Every random choice comes from the caller's generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.recipe import AugmentConfig


def random_translate(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and take a random crop of the original size per image."""
    b, h, w, _ = images.shape
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1, 1), generator=generator)
    rows = dy + torch.arange(h).view(1, h, 1)
    cols = dx + torch.arange(w).view(1, 1, w)
    return padded[torch.arange(b).view(b, 1, 1), rows, cols]


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(2), images)


def random_cutout(images: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one random `side` x `side` square per image (DeVries & Taylor, 2017)."""
    b, h, w, _ = images.shape
    cy = torch.randint(0, h, (b, 1, 1), generator=generator)
    cx = torch.randint(0, w, (b, 1, 1), generator=generator)
    ys, xs = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    # A side x side window starting side // 2 before the centre: exactly side^2 pixels for any side
    # (clipped at the border), even sides included.
    top, left = cy - side // 2, cx - side // 2
    inside = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
    return images.masked_fill(inside.unsqueeze(-1), 0)


def augment_batch(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    if cfg.crop_padding:
        images = random_translate(images, cfg.crop_padding, generator)
    if cfg.hflip:
        images = random_hflip(images, generator)
    if cfg.cutout:
        images = random_cutout(images, cfg.cutout, generator)
    return images
