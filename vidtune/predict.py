"""Inference with a promoted (or any) vidtune checkpoint: top-k labels per video."""

from __future__ import annotations

import numpy as np
import torch

from vidtune.checkpoint import load_checkpoint
from vidtune.config import TrialConfig
from vidtune.data.dataset import load_clip, segment_indices
from vidtune.data.video import probe
from vidtune.recipes import get_recipe


class Predictor:
    """Loads a checkpoint folder once; ``predict(path)`` returns ``[(label, score), ...]``."""

    def __init__(self, checkpoint_dir: str, device: str = "cpu"):
        ckpt = load_checkpoint(checkpoint_dir)
        self.cfg = TrialConfig.from_dict(ckpt["config"])
        self.class_names = ckpt["class_names"]
        self.model = get_recipe(self.cfg.recipe).build_model(self.cfg, len(self.class_names))
        self.model.load_state_dict(ckpt["model"])
        self.model.eval().to(device)
        self.device = device

    def clip(self, path: str) -> torch.Tensor:
        """The validation view of a video: centred segments, centre crop, ``(C, T, H, W)``."""
        info = probe(path)
        d = self.cfg.data
        idx = segment_indices(info.num_frames, d.num_segments, d.frames_per_segment, d.frame_stride, train=False)
        return load_clip(path, idx, info.width, info.height, d, train=False)

    @torch.no_grad()
    def predict(self, path: str, top_k: int = 5) -> list[tuple[str, float]]:
        logits = self.model(self.clip(path).unsqueeze(0).to(self.device)).float()
        probs = torch.softmax(logits, dim=1)[0].cpu().numpy()
        order = np.argsort(-probs)[: max(1, min(top_k, len(probs)))]
        return [(self.class_names[i], float(probs[i])) for i in order]
