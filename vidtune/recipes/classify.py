"""Video classification with the imbalance tools the seed reports asked for.

Loss: cross-entropy (label smoothing from ``train.label_smoothing``) or focal loss with
``focal_gamma`` and, optionally, per-class alpha from 1/sqrt(class frequency). Class-balanced
sampling strength is ``data.sampler_power``. All three are searchable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vidtune.config import ConfigError, TrialConfig
from vidtune.losses import focal_loss, inverse_sqrt_frequency
from vidtune.recipes.base import Recipe


@dataclass
class ClassifyOptions:
    loss: str = "ce"  # ce | focal
    focal_gamma: float = 2.0
    class_alpha: bool = False  # focal: weight each class by 1/sqrt(its training frequency)

    def __post_init__(self) -> None:
        if self.loss not in ("ce", "focal"):
            raise ConfigError(f"loss: unknown {self.loss!r}; choose one of ['ce', 'focal']")
        if self.focal_gamma < 0:
            raise ConfigError(f"focal_gamma: must be >= 0 (got {self.focal_gamma})")


class ClassifyRecipe(Recipe):
    name = "classify"
    Options = ClassifyOptions
    frozen_features = True

    def build_loss(self, cfg: TrialConfig, class_counts: np.ndarray):
        opts = self.options(cfg)
        if opts.loss == "ce":
            ce = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
            return lambda logits, labels, extra=None: (ce(logits.float(), labels), {})
        alpha = inverse_sqrt_frequency(class_counts) if opts.class_alpha else None

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor, extra: dict | None = None):
            return focal_loss(logits, labels, opts.focal_gamma, alpha, cfg.train.label_smoothing), {}

        return loss_fn


class ThermalSlowFastRecipe(ClassifyRecipe):
    """Report 000: single-channel thermal clips, 14 imbalanced classes, SlowFast."""

    name = "thermal_slowfast"
    synthetic = "thermal_slowfast"


class LipreadRecipe(ClassifyRecipe):
    """Report 002: greyscale 32-frame mouth clips, 5 words, a four-block 3D CNN."""

    name = "lipread_3dcnn"
    synthetic = "lipread_3dcnn"
