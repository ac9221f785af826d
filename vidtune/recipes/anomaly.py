"""Report 001: multi-task anomaly detection on surveillance clips (UCF-Crime-like, 14 classes, one
"normal" class holding ~76%).

Total loss = w_reg * L_reg (predict the next time step's frame feature) + w_focal * L_focal
(14-way classification) + w_mil * L_mil (MIL ranking, abnormal clips above normal ones) +
w_vae * L_vae (reconstruction + beta * KL). Each part is logged as ``train_loss_<part>``;
``val_auc`` scores abnormal vs normal clips by their max per-step anomaly score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vidtune.config import ConfigError, TrialConfig
from vidtune.losses import focal_loss, inverse_sqrt_frequency, mil_ranking_loss, vae_loss
from vidtune.metrics import roc_auc
from vidtune.models.anomaly import MultiTaskAnomalyNet
from vidtune.recipes.base import Recipe


@dataclass
class AnomalyOptions:
    w_reg: float = 1.0
    w_focal: float = 0.5
    w_mil: float = 0.3
    w_vae: float = 0.3
    focal_gamma: float = 2.0
    class_alpha: bool = True  # focal alpha from 1/sqrt(class frequency), as in the report
    mil_margin: float = 0.5
    vae_beta: float = 0.01
    encoder: str = "bilstm"  # bilstm | transformer
    hidden: int = 256
    latent: int = 32
    normal_class: str = ""  # the "normal" class; empty = the class whose name starts with "normal"

    def __post_init__(self) -> None:
        problems = []
        if self.encoder not in ("bilstm", "transformer"):
            problems.append(f"encoder: unknown {self.encoder!r}; choose one of ['bilstm', 'transformer']")
        if min(self.w_reg, self.w_focal, self.w_mil, self.w_vae, self.vae_beta, self.mil_margin, self.focal_gamma) < 0:
            problems.append("loss weights, vae_beta, mil_margin and focal_gamma must be >= 0")
        if self.hidden < 4 or self.hidden % 4 or self.latent < 1:
            problems.append(f"hidden must be a positive multiple of 4 and latent >= 1 (got {self.hidden}, {self.latent})")
        if problems:
            raise ConfigError(problems)


def normal_index(class_names: list[str], wanted: str = "") -> int:
    if wanted:
        if wanted not in class_names:
            raise ConfigError(f"options.normal_class: {wanted!r} is not one of the data's classes {class_names}")
        return class_names.index(wanted)
    for i, name in enumerate(class_names):
        if name.lower().startswith("normal"):
            return i
    raise ConfigError(f"options.normal_class: no class name starts with 'normal' in {class_names}; name it")


class AnomalyRecipe(Recipe):
    name = "anomaly_multitask"
    overfit_part = "focal"  # the next-feature target moves with the backbone: the total need not fall
    Options = AnomalyOptions
    synthetic = "anomaly_multitask"

    def build_model(self, cfg: TrialConfig, num_classes: int):
        o = self.options(cfg)
        if cfg.model.arch != "timm":
            raise ConfigError(f"model.arch: anomaly_multitask uses a timm per-frame backbone (arch: timm), got {cfg.model.arch!r}")
        return MultiTaskAnomalyNet(cfg.model.backbone, cfg.data.channels, num_classes, cfg.data.num_frames, o.encoder,
                                   o.hidden, o.latent, cfg.model.dropout, cfg.model.pretrained, cfg.model.pretrained_path,
                                   cfg.model.spatial_grid, cfg.model.pool)

    def prepare(self, cfg: TrialConfig, manifest, work_dir: str) -> dict[str, torch.Tensor]:
        normal = normal_index(manifest.class_names, self.options(cfg).normal_class)
        return {"abnormal": torch.from_numpy(manifest.column("label") != normal)}

    def build_loss(self, cfg: TrialConfig, class_counts: np.ndarray):
        o = self.options(cfg)
        alpha = inverse_sqrt_frequency(class_counts) if o.class_alpha else None

        def loss_fn(out: dict, labels: torch.Tensor, extra: dict | None = None):
            abnormal = extra["abnormal"] if extra else torch.zeros_like(labels, dtype=torch.bool)
            parts = {
                "reg": F.mse_loss(out["reg_pred"].float(), out["reg_target"].float()),
                "focal": focal_loss(out["logits"], labels, o.focal_gamma, alpha, cfg.train.label_smoothing),
                "mil": mil_ranking_loss(out["step_scores"].float().max(dim=1).values, abnormal, o.mil_margin),
                "vae": vae_loss(out["recon"], out["recon_target"], out["mu"].float(), out["logvar"].float(), o.vae_beta),
            }
            total = o.w_reg * parts["reg"] + o.w_focal * parts["focal"] + o.w_mil * parts["mil"] + o.w_vae * parts["vae"]
            return total, parts

        return loss_fn

    def collect(self, outputs: dict) -> dict[str, torch.Tensor]:
        return {"logits": outputs["logits"], "anomaly": outputs["step_scores"].max(dim=1).values}

    def evaluate(self, collected, labels, class_names):
        metrics, details = super().evaluate(collected, labels, class_names)
        normal = normal_index(class_names)  # evaluation follows the data's own naming
        metrics["val_auc"] = roc_auc(collected["anomaly"], np.asarray(labels) != normal)
        return metrics, details
