"""Report 004: distil a frozen CLIP ViT-B/32 image tower into a MobileViT-XXS video student.

Loss = alpha * L_feat (1 - cos(student 512-d projection, teacher clip embedding)) + beta * L_resp
(Hinton KD on temperature-T softened logits, x T^2) + gamma * L_task (cross-entropy).

The teacher never runs in a trial: its clip embeddings are computed once per data set (mean over
the clip's frames, the validation view) and cached on disk, keyed by the manifest's content, the
teacher and the sampling settings; every trial of a sweep reads the same file. The teacher's
logits are its embeddings' cosine similarity to per-class mean embeddings of the training split
(a nearest-class-mean head needs no text tower and no labels beyond the training set's).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vidtune.config import ConfigError, TrialConfig
from vidtune.losses import feature_distill_loss, kd_response_loss
from vidtune.recipes.base import Recipe

CACHE_ENV = "VIDTUNE_CACHE_DIR"


@dataclass
class DistillOptions:
    alpha: float = 0.5  # feature loss weight
    beta: float = 1.0  # response (KD) loss weight
    gamma: float = 1.0  # task (cross-entropy) loss weight
    temperature: float = 3.0
    teacher_model: str = "vit_base_patch32_clip_224"  # timm name of the CLIP image tower
    teacher_pretrained: bool = False  # hub weights (e.g. ".openai"); needs network access
    teacher_path: str = ""  # local teacher weights, for offline use
    teacher_size: int = 224  # the teacher's input resolution
    embed_dim: int = 512
    teacher_scale: float = 10.0  # sharpness of the teacher's nearest-class-mean logits

    def __post_init__(self) -> None:
        if min(self.alpha, self.beta, self.gamma) < 0 or self.temperature <= 0:
            raise ConfigError(f"alpha, beta, gamma must be >= 0 and temperature > 0 (got {self.alpha}, {self.beta}, "
                              f"{self.gamma}, {self.temperature})")


class DistillStudent(nn.Module):
    """timm backbone per frame -> temporal attention pooling -> 512-d projection and classifier."""

    def __init__(self, backbone: str, num_classes: int, in_channels: int, num_frames: int, embed_dim: int,
                 dropout: float, pretrained: bool = False, pretrained_path: str = "", grid: int = 1, pool: str = "avg"):
        super().__init__()
        from vidtune.models import TemporalAttentionHead, build_frame_backbone

        self.backbone = build_frame_backbone(backbone, in_channels, pretrained, pretrained_path, grid, pool)
        self.temporal = TemporalAttentionHead(self.backbone.num_features, num_frames, dropout=dropout)
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Linear(self.temporal.out_dim, embed_dim)
        self.fc = nn.Linear(self.temporal.out_dim, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, c, t, h, w = x.shape
        feats = self.backbone(x.transpose(1, 2).reshape(b * t, c, h, w)).reshape(b, t, -1)  # (B, T, D)
        pooled = self.dropout(self.temporal(feats))  # (B, D')
        return {"logits": self.fc(pooled), "embedding": self.project(pooled)}  # (B, K), (B, E)


def build_teacher(o: DistillOptions) -> nn.Module:
    import timm

    from vidtune.models import _load_local_weights

    try:
        teacher = timm.create_model(o.teacher_model, pretrained=o.teacher_pretrained, num_classes=o.embed_dim, img_size=o.teacher_size)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"options.teacher_model: unknown timm model {o.teacher_model!r}") from None
        raise
    # A local file is loaded whole (the 512-d projection included), not through timm's hub
    # filtering, which drops a head whose size differs from the hub config's.
    _load_local_weights(teacher, o.teacher_path)
    return teacher.eval().requires_grad_(False)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class DistillRecipe(Recipe):
    name = "distill_clip_mobilevit"
    Options = DistillOptions
    synthetic = "distill_clip_mobilevit"

    def build_model(self, cfg: TrialConfig, num_classes: int) -> nn.Module:
        o = self.options(cfg)
        return DistillStudent(cfg.model.backbone or "mobilevit_xxs", num_classes, cfg.data.channels, cfg.data.num_frames,
                              o.embed_dim, cfg.model.dropout, cfg.model.pretrained, cfg.model.pretrained_path,
                              cfg.model.spatial_grid, cfg.model.pool)

    # -- the teacher cache
    def cache_key(self, cfg: TrialConfig, manifest) -> str:
        o = self.options(cfg)
        weights = ""
        if o.teacher_path and os.path.isfile(o.teacher_path):
            st = os.stat(o.teacher_path)
            weights = f"{os.path.abspath(o.teacher_path)}:{st.st_size}:{st.st_mtime_ns}"
        d = cfg.data
        key = json.dumps([manifest.fingerprint(), o.teacher_model, o.teacher_pretrained, weights, o.teacher_size, o.embed_dim,
                          d.num_segments, d.frames_per_segment, d.frame_stride, d.decode_short_side, d.crop_size, d.channels,
                          d.mean, d.std])
        return hashlib.sha256(key.encode()).hexdigest()[:20]

    def teacher_embeddings(self, cfg: TrialConfig, manifest, cache_dir: str | None = None) -> tuple[np.ndarray, dict]:
        """``(N, E)`` teacher embeddings for every row of ``manifest``, from the cache or computed once."""
        from vidtune.data.dataset import ClipDataset

        cache_dir = cache_dir or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vidtune")
        path = os.path.join(cache_dir, f"teacher-{self.cache_key(cfg, manifest)}.npz")
        if os.path.exists(path):
            with np.load(path) as z:
                return z["embeddings"], {"cache": path, "computed": False, "teacher_params": int(z["teacher_params"])}
        o = self.options(cfg)
        teacher = build_teacher(o)
        ds = ClipDataset(manifest, cfg.data, train=False)
        out = np.zeros((len(ds), o.embed_dim), dtype=np.float32)
        with torch.no_grad():
            for i in range(len(ds)):
                clip, _, _ = ds[i]  # (C, T, H, W)
                frames = clip.transpose(0, 1)  # (T, C, H, W)
                if frames.shape[1] == 1:
                    frames = frames.expand(-1, 3, -1, -1)  # the teacher sees RGB
                frames = F.interpolate(frames, size=(o.teacher_size, o.teacher_size), mode="bilinear", align_corners=False)
                out[i] = teacher(frames).mean(dim=0).numpy()  # (E,) mean over the clip's frames
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, embeddings=out, teacher_params=num_params(teacher))
        os.replace(tmp, path)  # two trials computing at once both write whole files
        return out, {"cache": path, "computed": True, "teacher_params": num_params(teacher)}

    def prepare(self, cfg: TrialConfig, manifest, work_dir: str) -> dict[str, torch.Tensor]:
        emb, info = self.teacher_embeddings(cfg, manifest)
        self._teacher_params = info["teacher_params"]
        return {"teacher": torch.from_numpy(emb)}

    def build_loss(self, cfg: TrialConfig, class_counts: np.ndarray):
        o = self.options(cfg)
        protos: dict[str, torch.Tensor] = {}

        def teacher_logits(teacher_emb: torch.Tensor) -> torch.Tensor:
            return o.teacher_scale * F.normalize(teacher_emb, dim=1) @ protos["p"].to(teacher_emb.device).T  # (B, K)

        def loss_fn(out: dict, labels: torch.Tensor, extra: dict | None = None):
            teacher = extra["teacher"].float()
            if "p" not in protos:
                raise RuntimeError("distillation: class prototypes were not set (setup() was not called)")
            parts = {
                "feat": feature_distill_loss(out["embedding"], teacher),
                "resp": kd_response_loss(out["logits"], teacher_logits(teacher), o.temperature),
                "task": F.cross_entropy(out["logits"].float(), labels, label_smoothing=cfg.train.label_smoothing),
            }
            return o.alpha * parts["feat"] + o.beta * parts["resp"] + o.gamma * parts["task"], parts

        loss_fn.protos = protos  # filled by setup() once the training rows' embeddings are known
        return loss_fn

    def setup(self, loss_fn, extras, train_manifest) -> None:
        self.set_prototypes(loss_fn, extras["train"]["teacher"], train_manifest.column("label"), train_manifest.num_classes)

    def warm_cache(self, cfg: TrialConfig, manifest, cache_dir: str) -> dict:
        _, info = self.teacher_embeddings(cfg, manifest, cache_dir)
        return info

    def set_prototypes(self, loss_fn, train_embeddings: torch.Tensor, train_labels: np.ndarray, num_classes: int) -> None:
        emb = F.normalize(train_embeddings.float(), dim=1)
        labels = torch.as_tensor(np.array(train_labels))
        protos = torch.zeros(num_classes, emb.shape[1])
        for k in range(num_classes):
            if (labels == k).any():
                protos[k] = emb[labels == k].mean(dim=0)
        loss_fn.protos["p"] = F.normalize(protos, dim=1)

    def static_metrics(self, model: nn.Module, cfg: TrialConfig) -> dict[str, float]:
        """Sizes and the student's per-clip latency (batch 1, on the CPU thread budget of the trial)."""
        core = model.module if hasattr(model, "module") else model
        device = next(core.parameters()).device
        x = torch.randn(1, cfg.data.channels, cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size, device=device)
        was_training = core.training
        core.eval()
        with torch.no_grad():
            core(x)
            t0 = time.perf_counter()
            for _ in range(3):
                core(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        core.train(was_training)
        return {"student_params": float(num_params(core)), "teacher_params": float(getattr(self, "_teacher_params", 0)),
                "student_latency_ms": (time.perf_counter() - t0) / 3 * 1000}

    def collect(self, outputs: dict) -> dict[str, torch.Tensor]:
        return {"logits": outputs["logits"]}
