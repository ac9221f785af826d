"""SlowFast (Feichtenhofer et al. 2019), in-house so it is small enough to test on a CPU.

Two ResNet-3D pathways over the same clip ``(B, C, T, H, W)``: the slow one sees every
``speed_ratio``-th frame (alpha) with full width, the fast one every frame with ``channel_ratio``
(beta) of the width. Time-strided lateral convolutions feed fast into slow after the stem and
after each of the first three stages. ``width=64, depths=(3, 4, 6, 3)`` is the R50 layout;
``width=8, depths=(1, 1, 1, 1)`` trains on a laptop.
"""

from __future__ import annotations

import torch
from torch import nn


def _bn_relu(c: int) -> list[nn.Module]:
    return [nn.BatchNorm3d(c), nn.ReLU(inplace=True)]


class Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, inner: int, stride: int, temporal_kernel: int):
        super().__init__()
        c_out = inner * self.expansion
        self.body = nn.Sequential(
            nn.Conv3d(c_in, inner, (temporal_kernel, 1, 1), padding=(temporal_kernel // 2, 0, 0), bias=False),
            *_bn_relu(inner),
            nn.Conv3d(inner, inner, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
            *_bn_relu(inner),
            nn.Conv3d(inner, c_out, 1, bias=False),
            nn.BatchNorm3d(c_out),
        )
        self.short = (
            nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride=(1, stride, stride), bias=False), nn.BatchNorm3d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.short(x))


def _stage(c_in: int, inner: int, depth: int, stride: int, temporal_kernel: int) -> nn.Sequential:
    blocks = [Bottleneck3d(c_in, inner, stride, temporal_kernel)]
    blocks += [Bottleneck3d(inner * 4, inner, 1, temporal_kernel) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


class SlowFast(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 64,
        depths: tuple[int, ...] = (3, 4, 6, 3),
        speed_ratio: int = 4,
        channel_ratio: float = 0.125,
        dropout: float = 0.5,
        fusion_kernel: int = 5,
    ):
        super().__init__()
        if len(depths) != 4:
            raise ValueError(f"model.depths: SlowFast needs 4 stage depths (got {list(depths)})")
        self.alpha = speed_ratio
        fast_w = max(1, round(width * channel_ratio))

        def stem(c_out: int, kt: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv3d(in_channels, c_out, (kt, 7, 7), stride=(1, 2, 2), padding=(kt // 2, 3, 3), bias=False),
                *_bn_relu(c_out),
                nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
            )

        def lateral(c: int) -> nn.Conv3d:
            return nn.Conv3d(c, 2 * c, (fusion_kernel, 1, 1), stride=(speed_ratio, 1, 1), padding=(fusion_kernel // 2, 0, 0), bias=False)

        self.slow_stem, self.fast_stem = stem(width, 1), stem(fast_w, 5)
        self.laterals = nn.ModuleList([lateral(fast_w)])
        self.slow_stages, self.fast_stages = nn.ModuleList(), nn.ModuleList()
        slow_c, fast_c = width, fast_w
        for i, depth in enumerate(depths):
            stride = 1 if i == 0 else 2
            # As in the paper: the slow pathway uses temporal convolutions only in res4 and res5.
            self.slow_stages.append(_stage(slow_c + 2 * fast_c, width * 2**i, depth, stride, 1 if i < 2 else 3))
            self.fast_stages.append(_stage(fast_c, fast_w * 2**i, depth, stride, 3))
            slow_c, fast_c = width * 2**i * 4, fast_w * 2**i * 4
            if i < 3:
                self.laterals.append(lateral(fast_c))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(slow_c + fast_c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, H, W)
        slow, fast = self.slow_stem(x[:, :, :: self.alpha]), self.fast_stem(x)  # (B, W, T/a, .), (B, W*b, T, .)
        for i, (s_stage, f_stage) in enumerate(zip(self.slow_stages, self.fast_stages)):
            lat = self.laterals[i](fast)
            lat = lat[:, :, : slow.shape[2]] if lat.shape[2] >= slow.shape[2] else nn.functional.interpolate(lat, size=slow.shape[2:])
            slow, fast = s_stage(torch.cat([slow, lat], dim=1)), f_stage(fast)
        pooled = torch.cat([slow.mean(dim=(2, 3, 4)), fast.mean(dim=(2, 3, 4))], dim=1)  # (B, C_slow + C_fast)
        return self.fc(self.dropout(pooled))


class LipCnn3d(nn.Module):
    """Report 002's 3D CNN: four Conv3d-BN-ReLU-pool blocks with 7/5/3/3 spatial kernels, global
    pooling and a three-layer head whose dropout falls off (d, d/2, 0.3 d: 0.4/0.2/0.12)."""

    def __init__(self, in_channels: int, num_classes: int, widths=(64, 128, 256, 512), kernels=(7, 5, 3, 3),
                 head=(256, 128), dropout: float = 0.4, pool: str = "avg"):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, (w, k) in enumerate(zip(widths, kernels)):
            layers += [nn.Conv3d(prev, w, (3, k, k), padding=(1, k // 2, k // 2)), *_bn_relu(w),
                       nn.MaxPool3d((1 if i == 0 else 2, 2, 2))]
            prev = w
        # The report pools by average (its mouth fills the crop); max keeps a small moving part visible.
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool3d(1) if pool == "max" else nn.AdaptiveAvgPool3d(1))
        drops = (dropout, dropout / 2, dropout * 0.3)
        dims = (prev, *head)
        blocks: list[nn.Module] = []
        for j in range(len(head)):
            blocks += [nn.Dropout(drops[j]), nn.Linear(dims[j], dims[j + 1]), nn.ReLU(inplace=True)]
        blocks += [nn.Dropout(drops[len(head)]), nn.Linear(dims[-1], num_classes)]
        self.head = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))  # (B, C) -> (B, K)
