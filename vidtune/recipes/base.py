"""What every recipe provides. Subclasses override the parts that differ from classification."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from vidtune.config import ConfigError, TrialConfig, from_dict
from vidtune.data.dataset import ClipDataset
from vidtune.metrics import class_keys, classification_metrics
from vidtune.models import build_model


PER_CLASS_METRICS_MAX = 32  # above this, per-class numbers stay in the checkpoint's config.json


@dataclass
class NoOptions:
    pass


class Recipe:
    """Plain video classification; the base of the seed recipes.

    ``Options`` is the dataclass of the recipe's own knobs, found in a trial config under
    ``options`` (space keys ``options.<name>``). ``synthetic`` names the recipe's synthetic profile.
    """

    name = "classify"
    # The loss part preflight's one-batch overfit must drive down (None: the total). A multi-task
    # total can rise while the model fits: a part may regress to a target that moves with the model.
    overfit_part: str | None = None
    Options: type = NoOptions
    synthetic = "quickstart"
    frozen_features = False  # trains on cached backbone features with model.freeze_backbone
    pilot_metric: str | None = "val_mean_class_acc"  # preflight's chance pilot; None: the recipe has none
    overfit_batch = 8  # items in preflight's one-batch overfit check

    def options(self, cfg: TrialConfig):
        return from_dict(self.Options, cfg.options, "options")

    def default_options(self, given: dict) -> dict:
        """``given`` completed with the defaults (so every knob has a baseline value)."""
        return asdict(from_dict(self.Options, given or {}, "options"))

    def build_model(self, cfg: TrialConfig, num_classes: int) -> nn.Module:
        return build_model(cfg.model, num_classes, in_channels=cfg.data.channels, num_frames=cfg.data.num_frames)

    def make_dataset(self, manifest, cfg: TrialConfig, train: bool, cache=None, normalise: bool = True):
        """The dataset of ``manifest``'s rows; items are ``(clip (C, T, H, W), label, row)`` and the
        label may be any tensor the recipe's loss and ``evaluate`` read (it is batched by stacking)."""
        if cfg.model.freeze_backbone:
            from vidtune.recipes.features import FeatureDataset, backbone_features

            self._check_frozen(cfg)
            return FeatureDataset(backbone_features(cfg, manifest)[0], manifest.column("label"))
        return ClipDataset(manifest, cfg.data, train=train, seed=cfg.train.seed, cache=cache, normalise=normalise)

    def _check_frozen(self, cfg: TrialConfig) -> None:
        if not self.frozen_features:
            raise ConfigError(f"model.freeze_backbone: recipe {self.name!r} does not train on frozen features; "
                              "the classify recipes with arch 'timm' do")

    def param_groups(self, model: nn.Module, cfg: TrialConfig) -> list[dict] | None:
        """Optimiser parameter groups (with their own ``lr`` / ``weight_decay``); None: one lr for all."""
        return None

    def prepare(self, cfg: TrialConfig, manifest, work_dir: str) -> dict[str, torch.Tensor]:
        """Per-row tensors ``(N, ...)`` for ``manifest``'s rows, computed once before training and
        handed to the loss as ``extra`` for each batch's rows. None by default."""
        return {}

    def setup(self, loss_fn, extras: dict[str, dict[str, torch.Tensor]], train_manifest) -> None:
        """Called once after ``prepare``, before training (e.g. to fit a head on cached outputs)."""

    def warm_cache(self, cfg: TrialConfig, manifest, cache_dir: str) -> dict:
        """Compute what every trial would otherwise compute again, once, before the sweep starts."""
        if cfg.model.freeze_backbone:
            from vidtune.recipes.features import backbone_features

            self._check_frozen(cfg)
            # Per split: trials ask for their train and val rows separately (the key is the rows').
            done = [backbone_features(cfg, manifest.split(s), cache_dir) for s in ("train", "val")]
            return {"cache": os.path.dirname(done[0][0]), "files": [p for p, _ in done], "computed": any(c for _, c in done)}
        return {}

    def static_metrics(self, model: nn.Module, cfg: TrialConfig) -> dict[str, float]:
        """Metrics fixed for a trial (sizes, latency), reported with every epoch."""
        return {}

    def build_loss(self, cfg: TrialConfig, class_counts: np.ndarray):
        """``loss_fn(outputs, labels, extra) -> (loss, {part_name: value})``; parts are logged as
        ``train_loss_<part>``."""
        ce = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)

        def loss_fn(logits: torch.Tensor, labels: torch.Tensor, extra: dict | None = None) -> tuple[torch.Tensor, dict]:
            return ce(logits.float(), labels), {}

        return loss_fn

    def collect(self, outputs) -> dict[str, torch.Tensor]:
        """Per-sample validation outputs to gather across ranks (``logits`` at least)."""
        return {"logits": outputs}

    def evaluate(self, collected: dict[str, np.ndarray], labels: np.ndarray, class_names: list[str]) -> tuple[dict, dict]:
        scalars, details = classification_metrics(collected["logits"], labels, class_names)
        out = {f"val_{k}": v for k, v in scalars.items()}
        if len(class_names) <= PER_CLASS_METRICS_MAX:
            # Per-class accuracy and F1 as metrics, so the MLflow UI charts the rare classes too;
            # keys MLflow accepts whatever the names (the real ones stay in labels.json).
            keys = class_keys(class_names)
            out.update({f"val_acc/{keys[name]}": v for name, v in details["per_class_acc"].items()})
            out.update({f"val_f1/{keys[name]}": v for name, v in details["per_class_f1"].items()})
        return out, details
