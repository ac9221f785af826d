"""Report 001's multi-task anomaly network: per-frame timm backbone -> temporal encoder (BiLSTM
or Transformer) -> four heads. Output is a dict so the recipe's loss can read each head."""

from __future__ import annotations

import torch
from torch import nn


class MultiTaskAnomalyNet(nn.Module):
    def __init__(self, backbone: str, in_channels: int, num_classes: int, num_frames: int, encoder: str = "bilstm",
                 hidden: int = 256, latent: int = 32, dropout: float = 0.5, pretrained: bool = False, pretrained_path: str = "",
                 grid: int = 1, pool: str = "avg"):
        super().__init__()
        from vidtune.models import build_frame_backbone

        self.backbone = build_frame_backbone(backbone, in_channels, pretrained, pretrained_path, grid, pool)
        dim = self.backbone.num_features
        self.proj = nn.Linear(dim, hidden)
        self.encoder_kind = encoder
        if encoder == "bilstm":
            self.encoder = nn.LSTM(hidden, hidden // 2, batch_first=True, bidirectional=True)
        else:
            layer = nn.TransformerEncoderLayer(hidden, 4, 2 * hidden, dropout=min(dropout, 0.3), batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2)
            self.pos = nn.Parameter(torch.zeros(1, num_frames, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.regress = nn.Linear(hidden, hidden)  # next time step's (projected) frame feature
        self.classify = nn.Linear(hidden, num_classes)
        self.anomaly = nn.Linear(hidden, 1)  # per time step; a clip's score is its max (MIL)
        self.to_stats = nn.Linear(hidden, 2 * latent)
        self.decode = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b, c, t, h, w = x.shape
        feats = self.backbone(x.transpose(1, 2).reshape(b * t, c, h, w)).reshape(b, t, -1)  # (B, T, D)
        feats = self.proj(feats)  # (B, T, H)
        if self.encoder_kind == "bilstm":
            enc, _ = self.encoder(feats)
        else:
            enc = self.encoder(feats + self.pos[:, :t])
        enc = self.dropout(self.norm(enc))  # (B, T, H)
        pooled = enc.mean(dim=1)  # (B, H)
        mu, logvar = self.to_stats(pooled).chunk(2, dim=1)  # (B, L) each
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return {
            "logits": self.classify(pooled),  # (B, K)
            "step_scores": torch.sigmoid(self.anomaly(enc).squeeze(-1)),  # (B, T)
            "reg_pred": self.regress(enc[:, :-1]),  # (B, T-1, H)
            "reg_target": feats[:, 1:].detach(),  # (B, T-1, H)
            "recon": self.decode(z),  # (B, H)
            "recon_target": feats.mean(dim=1).detach(),  # (B, H)
            "mu": mu,
            "logvar": logvar.clamp(-10, 10),
        }
