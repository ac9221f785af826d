"""Report 003: temporal action detection on untrimmed video, AdaTAD-style (THUMOS-14 there).

Model (``models/detection.py``): a frozen timm backbone per frame with a trainable temporal
adapter after every block, snippet features (centred over the window: ``center_features``), a 1D
temporal pyramid and ActionFormer's heads.
Optimiser: AdamW with the adapters at ``options.adapter_lr`` (2e-4 in the report), the neck and
heads at ``train.lr`` (1e-4), the backbone at ``options.backbone_lr`` (0 = frozen, the report);
warmup + cosine, EMA (``train.ema_decay``), AMP and activation checkpointing come from the trainer
and ``options.grad_checkpointing``.

Targets are ActionFormer's: a location on pyramid level ``l`` is positive for the shortest
segment whose centre region (``center_radius`` strides) holds it and whose larger distance to
start or end falls in the level's range; sigmoid focal loss on the classes (``train_loss_cls``),
distance-IoU loss on the start/end distances of positive locations (``train_loss_reg``).

Validation decodes the best candidates of every window, maps them to video time, merges a
video's windows with per-class (soft-)NMS and scores ``val_map`` (mean over tIoU 0.3..0.7) and
``val_map_0.3`` ... ``val_map_0.7`` as the THUMOS-14 evaluation does (``detection_metrics.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from vidtune.config import ConfigError, TrialConfig
from vidtune.detection_metrics import TIOU_THRESHOLDS, detection_map, nms_1d
from vidtune.metrics import class_keys
from vidtune.recipes.base import PER_CLASS_METRICS_MAX, Recipe


@dataclass
class DetectionOptions:
    adapter_lr: float = 2e-4  # the report's adapter learning rate (the head's is train.lr)
    backbone_lr: float = 0.0  # 0 = frozen backbone, as in the report
    adapter_ratio: float = 0.25  # adapter bottleneck width / block width
    adapter_kernel: int = 3  # temporal kernel of the adapter's depthwise conv (frames)
    grad_checkpointing: bool = False  # recompute backbone blocks in backward: memory for time
    embed_dim: int = 128  # width of the pyramid and heads (ActionFormer: 512)
    pyramid_levels: int = 4
    attention: bool = True  # one transformer layer per pyramid level
    center_features: bool = True  # subtract each window's mean snippet feature (static scene out)
    center_radius: float = 1.5  # positives lie within this many strides of a segment's centre
    reg_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    window_frames: int = 0  # 0: the whole video is one window; else train on random windows of this
    # many frames and validate on sliding windows
    window_overlap: float = 0.5  # validation windows overlap by this fraction
    nms: str = "soft"  # soft (Gaussian, ActionFormer's THUMOS setting) | hard
    nms_iou: float = 0.5  # hard NMS: drop overlaps above this tIoU
    nms_sigma: float = 0.5  # soft-NMS: score decay exp(-tIoU^2 / sigma)
    pre_nms_topk: int = 200  # candidates per window before NMS
    max_detections: int = 100  # per video after NMS
    min_score: float = 1e-3

    def __post_init__(self) -> None:
        problems = []
        if self.adapter_lr <= 0 or self.backbone_lr < 0:
            problems.append(f"adapter_lr must be > 0 and backbone_lr >= 0 (got {self.adapter_lr}, {self.backbone_lr})")
        if not 0 < self.adapter_ratio <= 1:
            problems.append(f"adapter_ratio: must be in (0, 1] (got {self.adapter_ratio})")
        if self.adapter_kernel < 1 or self.adapter_kernel % 2 == 0:
            problems.append(f"adapter_kernel: must be an odd number >= 1 (got {self.adapter_kernel})")
        if self.embed_dim < 8 or not 1 <= self.pyramid_levels <= 8:
            problems.append(f"embed_dim must be >= 8 and pyramid_levels 1..8 (got {self.embed_dim}, {self.pyramid_levels})")
        if self.center_radius <= 0 or self.reg_weight < 0 or self.focal_gamma < 0 or not 0 < self.focal_alpha < 1:
            problems.append("center_radius must be > 0, reg_weight and focal_gamma >= 0, focal_alpha in (0, 1)")
        if self.window_frames < 0 or not 0 <= self.window_overlap < 1:
            problems.append(f"window_frames must be >= 0 and window_overlap in [0, 1) (got {self.window_frames}, {self.window_overlap})")
        if self.nms not in ("soft", "hard"):
            problems.append(f"nms: unknown {self.nms!r}; choose one of ['soft', 'hard']")
        if self.nms_sigma <= 0 or not 0 < self.nms_iou <= 1:
            problems.append(f"nms_sigma must be > 0 and nms_iou in (0, 1] (got {self.nms_sigma}, {self.nms_iou})")
        if self.pre_nms_topk < 1 or self.max_detections < 1:
            problems.append(f"pre_nms_topk and max_detections must be >= 1 (got {self.pre_nms_topk}, {self.max_detections})")
        if problems:
            raise ConfigError(problems)


def diou_loss_1d(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Distance-IoU loss of ``(N, 2)`` (start, end) distances from the same points (ActionFormer's
    ``ctr_diou_loss_1d``): ``1 - IoU + (centre offset / enclosing length)^2``, per row."""
    lp, rp = pred[:, 0], pred[:, 1]
    lg, rg = target[:, 0], target[:, 1]
    inter = torch.min(lp, lg) + torch.min(rp, rg)
    union = (lp + rp) + (lg + rg) - inter
    iou = inter / union.clamp(min=eps)
    enclosing = torch.max(lp, lg) + torch.max(rp, rg)
    rho = 0.5 * (rp - lp - rg + lg)
    return 1.0 - iou + (rho / enclosing.clamp(min=eps)) ** 2


def assign_targets(points: torch.Tensor, targets: torch.Tensor, num_snippets: int, num_classes: int,
                   radius: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ActionFormer's label assignment for a batch.

    ``points`` ``(L, 4)`` (centre, stride, lo, hi in snippets); ``targets`` ``(B, 1 + G, 3)`` as
    the dataset gives them. Returns one-hot classes ``(B, L, K)``, start/end distances in strides
    ``(B, L, 2)`` and the positive mask ``(B, L)``.
    """
    window_start, window_len = targets[:, 0, 1:2], targets[:, 0, 2:3].clamp(min=1e-6)  # (B, 1)
    segs = targets[:, 1:]  # (B, G, 3)
    cls = segs[..., 2].long()  # (B, G)
    start = (segs[..., 0] - window_start) / window_len * num_snippets  # (B, G) in snippets of this window
    end = (segs[..., 1] - window_start) / window_len * num_snippets
    s, e = start.clamp(0, num_snippets), end.clamp(0, num_snippets)
    # A segment counts in a window when most of it is inside (ActionFormer's truncation rule).
    valid = (cls >= 0) & (e - s > 0) & (e - s >= 0.5 * (end - start))
    c = points[None, :, 0:1]  # (1, L, 1)
    stride = points[None, :, 1:2]
    lo, hi = points[None, :, 2:3], points[None, :, 3:4]
    left, right = c - s[:, None, :], e[:, None, :] - c  # (B, L, G)
    mid = 0.5 * (s + e)[:, None, :]
    in_centre = torch.minimum(c - torch.maximum(mid - radius * stride, s[:, None, :]),
                              torch.minimum(mid + radius * stride, e[:, None, :]) - c) > 0
    reach = torch.maximum(left, right)
    match = in_centre & (reach >= lo) & (reach < hi) & valid[:, None, :]
    length = torch.where(match, (e - s)[:, None, :].expand_as(match), torch.full_like(left, float("inf")))
    shortest, gidx = length.min(dim=2)  # (B, L)
    positive = torch.isfinite(shortest)
    cls_at = cls.gather(1, gidx).clamp(min=0)  # (B, L)
    onehot = F.one_hot(cls_at, num_classes).float() * positive[..., None]  # (B, L, K)
    dist = torch.stack([left.gather(2, gidx[..., None])[..., 0], right.gather(2, gidx[..., None])[..., 0]], dim=-1)
    return onehot, dist / points[None, :, 1:2], positive


class DetectionRecipe(Recipe):
    name = "adatad_detection"
    Options = DetectionOptions
    synthetic = "adatad_detection"
    pilot_metric = None  # no class accuracy to hold against chance
    overfit_batch = 4  # an item is a whole untrimmed video holding several actions

    def build_model(self, cfg: TrialConfig, num_classes: int) -> nn.Module:
        from vidtune.models.detection import AdaptedBackbone, TemporalActionDetector

        o = self.options(cfg)
        if cfg.model.arch != "timm":
            raise ConfigError(f"model.arch: adatad_detection uses a timm backbone per frame (arch: timm), got {cfg.model.arch!r}")
        backbone = AdaptedBackbone(cfg.model.backbone, cfg.data.channels, cfg.data.crop_size, o.adapter_ratio, o.adapter_kernel,
                                   trainable=o.backbone_lr > 0, grad_checkpointing=o.grad_checkpointing,
                                   pretrained=cfg.model.pretrained, pretrained_path=cfg.model.pretrained_path)
        return TemporalActionDetector(backbone, num_classes, cfg.data.num_segments, cfg.data.frames_per_segment, o.embed_dim,
                                      o.pyramid_levels, o.attention, cfg.model.dropout, center_features=o.center_features)

    def make_dataset(self, manifest, cfg: TrialConfig, train: bool, cache=None, normalise: bool = True):
        from vidtune.data.detection import DetectionDataset

        o = self.options(cfg)
        # The clip cache holds one clip per row; detection reads windows of whole videos instead.
        return DetectionDataset(manifest, cfg.data, train, cfg.train.seed, o.window_frames, o.window_overlap, normalise=normalise)

    def param_groups(self, model: nn.Module, cfg: TrialConfig) -> list[dict]:
        o = self.options(cfg)
        lrs = {"head": cfg.train.lr, "adapter": o.adapter_lr, "backbone": o.backbone_lr}
        parts: dict[tuple[str, bool], list] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            part = "adapter" if ".adapter." in name else "backbone" if name.startswith("backbone.") else "head"
            parts.setdefault((part, p.ndim <= 1), []).append(p)
        # The head's groups first: the trainer logs the first group's lr as `lr`.
        groups = []
        for part in ("head", "adapter", "backbone"):
            for no_decay in (False, True):
                if parts.get((part, no_decay)):
                    groups.append({"params": parts[(part, no_decay)], "lr": lrs[part], "name": part,
                                   "weight_decay": 0.0 if no_decay else cfg.train.weight_decay})
        return groups

    def build_loss(self, cfg: TrialConfig, class_counts: np.ndarray):
        o = self.options(cfg)
        self._opts = o  # collect() and evaluate() decode with the same settings
        num_classes = len(class_counts)
        smoothing = cfg.train.label_smoothing

        def loss_fn(out: dict, targets: torch.Tensor, extra: dict | None = None):
            logits, offsets, points = out["cls_logits"].float(), out["offsets"].float(), out["points"].float()
            num_snippets = int((points[:, 1] == 1).sum())
            onehot, dist, positive = assign_targets(points, targets.float(), num_snippets, num_classes, o.center_radius)
            num_pos = positive.sum().clamp(min=1).float()
            if smoothing > 0:
                onehot = onehot * (1 - smoothing) + smoothing / (num_classes + 1)
            cls = sigmoid_focal_loss(logits, onehot, o.focal_alpha, o.focal_gamma, reduction="sum") / num_pos
            reg = diou_loss_1d(offsets[positive], dist[positive]).sum() / num_pos
            return cls + o.reg_weight * reg, {"cls": cls, "reg": reg}

        return loss_fn

    def collect(self, outputs: dict) -> dict[str, torch.Tensor]:
        from vidtune.models.detection import decode_candidates

        o = getattr(self, "_opts", None) or DetectionOptions()
        return {"detections": decode_candidates(outputs, o.pre_nms_topk, o.min_score)}

    def evaluate(self, collected: dict[str, np.ndarray], labels: np.ndarray, class_names: list[str]) -> tuple[dict, dict]:
        o = getattr(self, "_opts", None) or DetectionOptions()
        preds, gt = merge_windows(collected["detections"], labels, len(class_names), o)
        scalars, details = detection_map(gt, preds, class_names, TIOU_THRESHOLDS)
        out = {f"val_{k}": v for k, v in scalars.items()}
        if len(class_names) <= PER_CLASS_METRICS_MAX:
            # Per-class AP (mean over tIoUs) as metrics, so the MLflow UI charts each action.
            keys = class_keys(class_names)
            out.update({f"val_ap/{keys[n]}": d["mean_ap"] for n, d in details["per_class_ap"].items() if d["ap"] is not None})
        return out, details

    def static_metrics(self, model: nn.Module, cfg: TrialConfig) -> dict[str, float]:
        core = model.module if hasattr(model, "module") else model
        trainable = sum(p.numel() for p in core.parameters() if p.requires_grad)
        adapters = sum(p.numel() for n, p in core.named_parameters() if ".adapter." in n)
        return {"trainable_params": float(trainable), "adapter_params": float(adapters)}


def merge_windows(detections: np.ndarray, targets: np.ndarray, num_classes: int, o: DetectionOptions) -> tuple[np.ndarray, np.ndarray]:
    """Per video: every window's candidates in video seconds, then per-class (soft-)NMS and the
    best ``max_detections``. Returns predictions ``(P, 5)`` ``[video, start, end, class, score]``
    and ground truth ``(G, 4)`` ``[video, start, end, class]``."""
    detections = np.asarray(detections, dtype=np.float64)  # (N, M, 4)
    targets = np.asarray(targets, dtype=np.float64)  # (N, 1 + G, 3)
    preds, gts = [], []
    videos = targets[:, 0, 0] if len(targets) else np.zeros(0)
    for v in np.unique(videos):
        items = np.flatnonzero(videos == v)
        segs = targets[items[0], 1:]
        segs = segs[segs[:, 2] >= 0]
        gts += [[v, s, e, c] for s, e, c in segs]
        cands = []
        for i in items:
            start, length = targets[i, 0, 1], targets[i, 0, 2]
            d = detections[i]
            d = d[d[:, 3] >= 0]
            cands.append(np.stack([start + d[:, 0] * length, start + d[:, 1] * length, d[:, 3], d[:, 2]], axis=1))
        cands = np.concatenate(cands) if cands else np.zeros((0, 4))  # (C, 4): start, end, class, score
        kept = []
        for k in range(num_classes):
            mine = cands[cands[:, 2] == k]
            if not len(mine):
                continue
            segments, scores = nms_1d(mine[:, :2], mine[:, 3], o.nms_iou, soft=o.nms == "soft", sigma=o.nms_sigma,
                                      min_score=o.min_score, max_keep=o.max_detections)
            kept += [[v, s, e, k, sc] for (s, e), sc in zip(segments, scores)]
        kept.sort(key=lambda r: -r[4])
        preds += kept[: o.max_detections]
    return np.asarray(preds, dtype=np.float64).reshape(-1, 5), np.asarray(gts, dtype=np.float64).reshape(-1, 4)
