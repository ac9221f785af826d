"""Plain video classification: cross-entropy (with label smoothing), the standard metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vidtune.config import TrialConfig
from vidtune.metrics import classification_metrics
from vidtune.models import build_model


class ClassifyRecipe:
    name = "classify"

    def build_model(self, cfg: TrialConfig, num_classes: int) -> nn.Module:
        return build_model(cfg.model, num_classes, in_channels=cfg.data.channels, num_frames=cfg.data.num_frames)

    def build_loss(self, cfg: TrialConfig, class_counts: np.ndarray):
        ce = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
            loss = ce(logits.float(), labels)
            return loss, {}

        return loss_fn

    def evaluate(self, logits: np.ndarray, labels: np.ndarray, class_names: list[str]) -> tuple[dict, dict]:
        scalars, details = classification_metrics(logits, labels, class_names)
        return {f"val_{k}": v for k, v in scalars.items()}, details
