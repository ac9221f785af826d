"""Temporal action detection (report 003, AdaTAD-style): a frozen per-frame timm backbone whose
blocks carry trainable temporal adapters, snippet features, a 1D temporal feature pyramid and
ActionFormer's per-location heads.

Shapes: a clip is ``(B, C, N, H, W)`` with ``N = T * F`` frames (``T`` snippets of ``F`` frames,
``data.num_segments`` and ``data.frames_per_segment``). The backbone sees ``(B*N, C, H, W)``; the
snippet features are ``(B, T, D)``, centred over the window; pyramid level ``l`` has ``ceil(T / 2^l)`` locations, each a
point at the centre of its ``2^l`` snippets. Outputs are per location over all levels ``L``:
class logits ``(B, L, K)`` and non-negative distances to the start and end ``(B, L, 2)`` in units
of the level's stride.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vidtune.config import ConfigError


class TemporalAdapter(nn.Module):
    """AdaTAD's temporal-informative adapter: a bottleneck (down, depthwise temporal conv over the
    clip's frames, up) added to a block's output. ``up`` starts at zero, so a new adapter leaves
    the (pretrained) backbone's output unchanged at the first step.

    Works on token blocks ``(B*N, L, D)`` (ViTs) and conv blocks ``(B*N, C, H, W)``; ``num_frames``
    (``N``) is set by the owning model before each forward.
    """

    def __init__(self, dim: int, ratio: float, kernel: int, tokens: bool):
        super().__init__()
        hidden = max(4, round(dim * ratio))
        self.tokens = tokens
        self.down = nn.Linear(dim, hidden) if tokens else nn.Conv2d(dim, hidden, 1)
        self.tconv = nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=hidden)
        self.up = nn.Linear(hidden, dim) if tokens else nn.Conv2d(hidden, dim, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.num_frames = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        t = self.num_frames
        if self.tokens:
            n, length, r = h.shape
            b = n // t
            z = h.reshape(b, t, length, r).permute(0, 2, 3, 1).reshape(b * length, r, t)  # (B*L, r, N)
            z = self.tconv(z).reshape(b, length, r, t).permute(0, 3, 1, 2).reshape(n, length, r)  # (B*N, L, r)
        else:
            n, r, hh, ww = h.shape
            b = n // t
            z = h.reshape(b, t, r, hh, ww).permute(0, 3, 4, 2, 1).reshape(b * hh * ww, r, t)  # (B*H*W, r, N)
            z = self.tconv(z).reshape(b, hh, ww, r, t).permute(0, 4, 3, 1, 2).reshape(n, r, hh, ww)  # (B*N, r, H, W)
        return x + self.up(F.gelu(h + z))


class AdaptedBlock(nn.Module):
    """A backbone block followed by its adapter; optionally recomputed in the backward pass
    (activation checkpointing: the report's memory saver for 768-frame clips)."""

    def __init__(self, block: nn.Module, adapter: TemporalAdapter, grad_checkpointing: bool = False):
        super().__init__()
        self.block = block
        self.adapter = adapter
        self.grad_checkpointing = grad_checkpointing

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.block(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._run, x, use_reentrant=False)
        return self._run(x)


def find_blocks(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(container, child name)`` of every block of a timm model: ViT-like ``blocks``,
    EfficientNet's stages of ``blocks``, ConvNeXt-like ``stages[i].blocks``, ResNet's ``layer1..4``."""
    seqs = (nn.Sequential, nn.ModuleList)

    def children(seq: nn.Module) -> list[tuple[nn.Module, str]]:
        return [(seq, name) for name, _ in seq.named_children()]

    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, seqs):
        out = []
        for name, child in blocks.named_children():
            out += children(child) if isinstance(child, seqs) else [(blocks, name)]
        return out
    stages = getattr(model, "stages", None)
    if isinstance(stages, seqs):
        out = []
        for stage in stages:
            inner = getattr(stage, "blocks", stage)
            if isinstance(inner, seqs):
                out += children(inner)
        return out
    if all(isinstance(getattr(model, f"layer{i}", None), seqs) for i in range(1, 5)):
        return [pair for i in range(1, 5) for pair in children(getattr(model, f"layer{i}"))]
    return []


def create_timm_backbone(name: str, in_channels: int, img_size: int, pretrained: bool = False,
                         pretrained_path: str = "") -> nn.Module:
    """A timm model without classifier, average-pooled: ``(N, C, H, W) -> (N, D)``. ViTs are built
    for ``img_size`` (timm resamples pretrained position embeddings); mean-pooled tokens, as
    AdaTAD pools VideoMAE's, carry the picture better than a random ViT's class token."""
    import timm

    from vidtune.models import _check_weights_file

    kwargs: dict = {"num_classes": 0, "in_chans": in_channels, "global_pool": "avg"}
    if pretrained_path:
        _check_weights_file(pretrained_path)
        kwargs["pretrained_cfg_overlay"] = {"file": os.path.abspath(pretrained_path)}
    use_pretrained = pretrained or bool(pretrained_path)
    try:
        try:
            return timm.create_model(name, pretrained=use_pretrained, img_size=img_size, **kwargs)
        except TypeError:  # CNNs take no img_size
            return timm.create_model(name, pretrained=use_pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"model.backbone: unknown timm model {name!r} (see timm.list_models())") from None
        raise


class AdaptedBackbone(nn.Module):
    """A timm backbone, frozen unless ``trainable``, with a :class:`TemporalAdapter` after every block."""

    def __init__(self, name: str, in_channels: int, img_size: int, adapter_ratio: float, adapter_kernel: int,
                 trainable: bool = False, grad_checkpointing: bool = False, pretrained: bool = False,
                 pretrained_path: str = ""):
        super().__init__()
        self.net = create_timm_backbone(name, in_channels, img_size, pretrained, pretrained_path)
        self.net.requires_grad_(trainable)
        self.trainable = trainable
        self.num_features = self.net.num_features
        blocks = find_blocks(self.net)
        if not blocks:
            raise ConfigError(f"model.backbone: {name!r} has no blocks to put adapters in; use a ViT (vit_*, deit_*), "
                              "ResNet, ConvNeXt or EfficientNet")
        # One dry run tells each block's output layout and width.
        shapes: dict[int, tuple] = {}
        hooks = [getattr(c, n).register_forward_hook(lambda m, i, o, k=k: shapes.__setitem__(k, tuple(o.shape)))
                 for k, (c, n) in enumerate(blocks)]
        with torch.no_grad():
            self.net.eval()(torch.zeros(1, in_channels, img_size, img_size))
        for h in hooks:
            h.remove()
        self.adapters: list[TemporalAdapter] = []
        for k, (container, child) in enumerate(blocks):
            shape = shapes.get(k)
            if shape is None or len(shape) not in (3, 4):
                raise ConfigError(f"model.backbone: {name!r} block {k} gives {shape}; adapters need (N, L, D) or (N, C, H, W)")
            adapter = TemporalAdapter(shape[-1] if len(shape) == 3 else shape[1], adapter_ratio, adapter_kernel, tokens=len(shape) == 3)
            setattr(container, child, AdaptedBlock(getattr(container, child), adapter, grad_checkpointing))
            self.adapters.append(adapter)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            # A frozen backbone keeps its normalisation statistics too (AdaTAD's norm_eval).
            for m in self.net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, frames: torch.Tensor, num_frames: int) -> torch.Tensor:  # (B*N, C, H, W) -> (B*N, D)
        for a in self.adapters:
            a.num_frames = num_frames
        return self.net(frames)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of ``(B, C, T)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


def _conv_block(dim_in: int, dim: int, stride: int = 1, norm: bool = True) -> nn.Sequential:
    norm_layer = ChannelNorm(dim) if norm else nn.Identity()
    return nn.Sequential(nn.Conv1d(dim_in, dim, 3, stride=stride, padding=1), norm_layer, nn.ReLU(inplace=True))


class TemporalPyramid(nn.Module):
    """ActionFormer's neck, small: embedding convs, then ``levels`` levels, each halving time
    (strided conv) and mixing it with one transformer layer when ``attention`` is on.

    The first conv has no norm: a LayerNorm over channels would scale a quiet background snippet's
    centred features (near zero) up to the loudness of an action's."""

    def __init__(self, in_dim: int, dim: int, levels: int, attention: bool, dropout: float):
        super().__init__()
        self.embed = nn.Sequential(_conv_block(in_dim, dim, norm=False), _conv_block(dim, dim))
        self.down = nn.ModuleList([_conv_block(dim, dim, stride=2) for _ in range(levels - 1)])
        heads = max(1, dim // 32)
        self.mix = nn.ModuleList(
            [nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True) for _ in range(levels)]
            if attention else []
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B, D_in, T) -> [(B, dim, T_l)]
        x = self.embed(x)
        feats = []
        for level in range(len(self.down) + 1):
            if level:
                x = self.down[level - 1](x)
            if self.mix:
                x = self.mix[level](x.transpose(1, 2)).transpose(1, 2)
            feats.append(x)
        return feats


class TemporalActionDetector(nn.Module):
    """Adapted backbone -> snippet features -> pyramid -> shared classification and regression heads."""

    def __init__(self, backbone: AdaptedBackbone, num_classes: int, num_snippets: int, frames_per_snippet: int,
                 dim: int = 128, levels: int = 4, attention: bool = True, dropout: float = 0.0, prior: float = 0.01,
                 center_features: bool = True):
        super().__init__()
        if num_snippets < 2 ** (levels - 1):
            raise ConfigError(f"data.num_segments: {num_snippets} snippets are too few for {levels} pyramid levels "
                              f"(needs >= {2 ** (levels - 1)}; lower options.pyramid_levels)")
        self.backbone = backbone
        self.num_snippets, self.frames_per_snippet, self.levels = num_snippets, frames_per_snippet, levels
        self.center_features = center_features
        self.pyramid = TemporalPyramid(backbone.num_features, dim, levels, attention, dropout)
        self.cls_head = nn.Sequential(_conv_block(dim, dim), _conv_block(dim, dim), nn.Conv1d(dim, num_classes, 3, padding=1))
        self.reg_head = nn.Sequential(_conv_block(dim, dim), _conv_block(dim, dim), nn.Conv1d(dim, 2, 3, padding=1))
        # Focal-loss prior: every location starts as background with probability 1 - prior.
        nn.init.constant_(self.cls_head[-1].bias, -math.log((1 - prior) / prior))
        self.scales = nn.Parameter(torch.ones(levels))
        self.register_buffer("points", self.make_points(num_snippets, levels), persistent=False)

    @staticmethod
    def make_points(num_snippets: int, levels: int) -> torch.Tensor:
        """``(L, 4)``: centre (in snippets), stride, and the range ``[lo, hi)`` of the larger distance
        (to start or end) a location on this level regresses: ActionFormer's (0, 4), (4, 8),
        (8, 16)... snippets; the last level takes everything longer."""
        rows = []
        for level in range(levels):
            stride = 2**level
            n = math.ceil(num_snippets / stride)
            lo = 0.0 if level == 0 else float(2 ** (level + 1))
            hi = float("inf") if level == levels - 1 else float(2 ** (level + 2))
            centres = (torch.arange(n, dtype=torch.float32) + 0.5) * stride
            rows.append(torch.stack([centres, torch.full((n,), float(stride)), torch.full((n,), lo), torch.full((n,), hi)], 1))
        return torch.cat(rows)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, c, n, h, w = x.shape
        t, f = self.num_snippets, self.frames_per_snippet
        if n != t * f:
            raise ValueError(f"expected {t} snippets x {f} frames, got a clip of {n} frames")
        frames = x.transpose(1, 2).reshape(b * n, c, h, w)  # (B*N, C, H, W)
        feats = self.backbone(frames, n).reshape(b, t, f, -1).mean(dim=2)  # (B, T, D) snippet features
        if self.center_features:
            # A frozen backbone's features are dominated by the scene, which hardly changes within a
            # window (measured on the synthetic set: 10x more spread between videos than over time);
            # the window's mean feature is subtracted so the heads see what changes.
            feats = feats - feats.mean(dim=1, keepdim=True)
        levels = self.pyramid(feats.transpose(1, 2))  # [(B, dim, T_l)]
        logits = torch.cat([self.cls_head(z) for z in levels], dim=2).transpose(1, 2)  # (B, L, K)
        offsets = torch.cat([F.relu(self.scales[i] * self.reg_head(z)) for i, z in enumerate(levels)], dim=2).transpose(1, 2)  # (B, L, 2)
        return {"cls_logits": logits, "offsets": offsets, "points": self.points}


@torch.no_grad()
def decode_candidates(outputs: dict[str, torch.Tensor], top_k: int, min_score: float = 1e-3,
                      min_length: float = 0.05) -> torch.Tensor:
    """Best ``top_k`` (location, class) pairs per clip before NMS: ``(B, M, 4)`` rows
    ``[start, end, score, class]`` with start/end as fractions of the clip's window; rows
    under ``min_score`` or shorter than ``min_length`` snippets have score 0 and class -1."""
    probs = torch.sigmoid(outputs["cls_logits"].float())  # (B, L, K)
    points = outputs["points"].float()  # (L, 4)
    offsets = outputs["offsets"].float()  # (B, L, 2)
    b, num_loc, k = probs.shape
    num_snippets = float((points[:, 1] == 1).sum())
    m = min(top_k, num_loc * k)
    scores, idx = probs.reshape(b, -1).topk(m, dim=1)  # (B, M)
    loc, cls = idx // k, idx % k
    pts = points[loc]  # (B, M, 4)
    off = offsets.gather(1, loc.unsqueeze(-1).expand(-1, -1, 2))  # (B, M, 2)
    start = (pts[..., 0] - off[..., 0] * pts[..., 1]).clamp(0, num_snippets)
    end = (pts[..., 0] + off[..., 1] * pts[..., 1]).clamp(0, num_snippets)
    keep = (scores >= min_score) & (end - start >= min_length)
    scores = torch.where(keep, scores, torch.zeros_like(scores))
    cls = torch.where(keep, cls, torch.full_like(cls, -1))
    return torch.stack([start / num_snippets, end / num_snippets, scores, cls.float()], dim=-1)
