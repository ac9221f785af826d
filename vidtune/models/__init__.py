"""Video classifiers. Every model maps a clip batch ``(B, C, T, H, W)`` to logits ``(B, K)``.

- ``cnn3d``: a small in-house 3D CNN (fast on CPUs; motion is seen before pooling).
- ``timm``: any timm 2D backbone applied per frame, then a temporal head (``avg`` or
  ``attention``: self-attention over time with learned positions, so order matters).
- ``torchvision``: a ``torchvision.models.video`` model by name (``r3d_18``, ``r2plus1d_18``...).
- ``slowfast``: SlowFast with configurable width/depth (``models/slowfast.py``).
- ``lipcnn``: report 002's four-block 3D CNN with a graduated-dropout head.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from vidtune.config import ConfigError, ModelConfig


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int = 3, num_frames: int = 8) -> nn.Module:
    if cfg.arch == "cnn3d":
        model = Cnn3d(in_channels, num_classes, cfg.scaled_widths(), cfg.dropout, cfg.pool)
        _load_local_weights(model, cfg.pretrained_path)
        return model
    if cfg.arch == "timm":
        return FrameClassifier(cfg, num_classes, in_channels, num_frames)
    if cfg.arch == "torchvision":
        return build_torchvision_video(cfg, num_classes)
    if cfg.arch in ("slowfast", "lipcnn"):
        from vidtune.models.slowfast import LipCnn3d, SlowFast

        if cfg.arch == "slowfast":
            model = SlowFast(in_channels, num_classes, cfg.scaled_widths()[0], tuple(int(d) for d in cfg.depths),
                             cfg.speed_ratio, cfg.channel_ratio, cfg.dropout)
        else:
            model = LipCnn3d(in_channels, num_classes, tuple(cfg.scaled_widths()), tuple(int(k) for k in cfg.kernels),
                             tuple(int(h) for h in cfg.head), cfg.dropout, cfg.pool)
        _load_local_weights(model, cfg.pretrained_path)
        return model
    raise ConfigError(f"model.arch: unknown {cfg.arch!r}; choose one of {list(ModelConfig.ARCHES)}")


class Cnn3d(nn.Module):
    """Conv3d-BN-ReLU stages; the first keeps time and halves space, later ones halve both."""

    def __init__(self, in_channels: int, num_classes: int, widths: list[int], dropout: float, pool: str = "avg"):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, width in enumerate(widths):
            kernel = (3, 5, 5) if i == 0 else (3, 3, 3)
            stride = (1, 2, 2) if i < 2 else (2, 2, 2)
            layers += [
                nn.Conv3d(prev, width, kernel, stride=stride, padding=tuple(k // 2 for k in kernel), bias=False),
                nn.BatchNorm3d(width),
                nn.ReLU(inplace=True),
            ]
            prev = width
        self.features = nn.Sequential(*layers)
        # Max pooling keeps the response of a small moving object that averaging would dilute.
        self.pool = nn.AdaptiveMaxPool3d(1) if pool == "max" else nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)  # (B, C_last)
        return self.fc(self.dropout(x))


class TemporalAttentionHead(nn.Module):
    """Self-attention over frame features with learned positions, then mean over time."""

    def __init__(self, in_dim: int, num_frames: int, dim: int = 256, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        dim = min(dim, in_dim)
        dim -= dim % heads
        self.proj = nn.Linear(in_dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, num_frames, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.block = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        x = self.proj(x)
        t = x.shape[1]
        pos = self.pos if t == self.pos.shape[1] else nn.functional.interpolate(
            self.pos.transpose(1, 2), size=t, mode="linear", align_corners=False
        ).transpose(1, 2)
        return self.block(x + pos).mean(dim=1)  # (B, dim)


class GridPooledBackbone(nn.Module):
    """A timm feature map average-pooled to a ``grid x grid`` layout and flattened.

    Global average pooling keeps *what* is in a frame and drops *where*: a per-frame model then
    cannot tell a left-to-right motion from right-to-left. A small grid keeps coarse position for
    the temporal head at ``grid**2`` times the feature size."""

    def __init__(self, model: nn.Module, grid: int, pool: str = "avg"):
        super().__init__()
        self.model = model
        self.pool = nn.AdaptiveMaxPool2d(grid) if pool == "max" else nn.AdaptiveAvgPool2d(grid)
        self.num_features = model.num_features * grid * grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.model.forward_features(x)  # (N, C, h, w)
        if fmap.ndim != 4:
            raise ConfigError(f"model.spatial_grid: {type(self.model).__name__} has no 2D feature map (got {tuple(fmap.shape)}); use 1")
        return self.pool(fmap).flatten(1)


def build_frame_backbone(name: str, in_channels: int, pretrained: bool = False, pretrained_path: str = "",
                         grid: int = 1, pool: str = "avg") -> nn.Module:
    """A timm 2D model without its classifier: ``(N, C, H, W) -> (N, num_features)``; features are
    globally pooled (``grid`` 1) or pooled to a ``grid x grid`` layout (see GridPooledBackbone),
    by average or max (``pool``: max keeps a small object's features from being averaged away)."""
    import timm

    kwargs = {}
    if pretrained_path:
        _check_weights_file(pretrained_path)
        # timm's own route for local weights: the same filtering and adaptation as hub weights.
        kwargs["pretrained_cfg_overlay"] = {"file": os.path.abspath(pretrained_path)}
    try:
        if grid == 1 and pool != "avg":
            kwargs["global_pool"] = pool
        model = timm.create_model(name, pretrained=pretrained or bool(pretrained_path), num_classes=0, in_chans=in_channels, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"model.backbone: unknown timm model {name!r} (see timm.list_models())") from None
        raise
    return GridPooledBackbone(model, grid, pool) if grid > 1 else model


class FrameClassifier(nn.Module):
    """A timm 2D backbone on every frame, pooled over time by a temporal head.

    With ``freeze_backbone`` the backbone stays in eval mode without gradients, and ``forward``
    also takes its per-frame features ``(B, T, D)`` directly (cached once per data set)."""

    def __init__(self, cfg: ModelConfig, num_classes: int, in_channels: int, num_frames: int):
        super().__init__()
        self.backbone = build_frame_backbone(cfg.backbone, in_channels, cfg.pretrained, cfg.pretrained_path, cfg.spatial_grid, cfg.pool)
        self.frozen = cfg.freeze_backbone
        if self.frozen:
            self.backbone.requires_grad_(False)
        dim = self.backbone.num_features
        if cfg.temporal_head == "attention":
            self.temporal = TemporalAttentionHead(dim, num_frames, dropout=cfg.dropout)
            dim = self.temporal.out_dim
        else:
            self.temporal = None
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(dim, num_classes)

    def train(self, mode: bool = True) -> FrameClassifier:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen means frozen batch-norm statistics too
        return self

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        return self.backbone(frames).reshape(b, t, -1)  # (B, T, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = x if x.ndim == 3 else self.frame_features(x)  # (B, T, D); 3-D input: cached features
        pooled = self.temporal(feats) if self.temporal is not None else feats.mean(dim=1)  # (B, D')
        return self.fc(self.dropout(pooled))


def build_torchvision_video(cfg: ModelConfig, num_classes: int) -> nn.Module:
    import torchvision
    from torchvision.models import video as tv_video

    names = torchvision.models.list_models(module=tv_video)
    if cfg.backbone not in names:
        raise ConfigError(f"model.backbone: unknown torchvision video model {cfg.backbone!r}; choose one of {names}")
    model = torchvision.models.get_model(cfg.backbone, weights="DEFAULT" if cfg.pretrained else None)
    _load_local_weights(model, cfg.pretrained_path)
    # Replace the last Linear (fc / head) with a fresh one for our classes, dropout in front.
    parent, attr, last = _last_linear(model)
    setattr(parent, attr, nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(last.in_features, num_classes)))
    return model


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ConfigError("model.backbone: this torchvision model has no linear classifier to replace")
    path, module = found
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    return parent, path.rsplit(".", 1)[-1], module


def _check_weights_file(path: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.pretrained_path: {path}: no such weights file")


def _load_local_weights(model: nn.Module, path: str) -> None:
    """Load a local state dict; keys whose shapes differ (the classifier) are left as built."""
    if not path:
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file (model.pretrained_path / options.teacher_path)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a loadable weights file ({str(e).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path}: no weights in this file match the model")
    model.load_state_dict(usable, strict=False)
