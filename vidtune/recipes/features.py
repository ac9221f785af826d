"""Frozen-backbone features, computed once per data set and shared by every trial.

With ``model.freeze_backbone`` (timm per-frame classifiers) the backbone never changes, so running
it in every trial and every epoch only repeats work: its per-frame features of each row's
validation view (fixed indices, centre crop) are computed once, stored as one ``.npy`` file per
split under the cache directory and memory-mapped by the trials, which train only the temporal
head on them. Training then sees no crop or flip augmentation (the usual frozen-feature protocol).

Key: the rows' content, the backbone (name, weights, pooling; the seed when it is randomly
initialised, since fit() seeds before building the model) and the settings that change its input.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from vidtune.config import TrialConfig
from vidtune.data.cache import default_cache_dir, open_clip_cache


def features_key(cfg: TrialConfig, manifest) -> str:
    m, d = cfg.model, cfg.data
    weights = ""
    if m.pretrained_path and os.path.isfile(m.pretrained_path):
        st = os.stat(m.pretrained_path)
        weights = f"{os.path.abspath(m.pretrained_path)}:{st.st_size}:{st.st_mtime_ns}"
    seed = None if (m.pretrained or m.pretrained_path) else cfg.train.seed
    key = [1, manifest.fingerprint(), m.backbone, m.pretrained, weights, seed, m.spatial_grid, m.pool,
           d.num_segments, d.frames_per_segment, d.frame_stride, d.decode_short_side, d.crop_size, d.channels, d.mean, d.std]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]


def backbone_features(cfg: TrialConfig, manifest, cache_dir: str | None = None,
                      log: Callable[[str], None] = print) -> tuple[str, bool]:
    """Path of the ``(N, T, D)`` float32 features of ``manifest``'s rows, computed on first use
    (once, under a lock, when trials start together); and whether this call computed them."""
    from filelock import FileLock

    from vidtune.data.dataset import ClipDataset
    from vidtune.models import build_frame_backbone

    cache_dir = cache_dir or default_cache_dir() or os.path.join(os.path.expanduser("~"), ".cache", "vidtune")
    path = os.path.join(cache_dir, f"features-{features_key(cfg, manifest)}.npy")
    if os.path.exists(path):
        return path, False
    os.makedirs(cache_dir, exist_ok=True)
    with FileLock(path + ".lock"):
        if os.path.exists(path):
            return path, False
        m = cfg.model
        # The same weights as the trial's model: fit() seeds, then builds the backbone first.
        torch.manual_seed(cfg.train.seed)
        backbone = build_frame_backbone(m.backbone, cfg.data.channels, m.pretrained, m.pretrained_path, m.spatial_grid, m.pool)
        backbone.eval()
        clips = open_clip_cache(manifest, cfg.data, cache_dir, build=False)
        ds = ClipDataset(manifest, cfg.data, train=False, cache=clips)
        loader = torch.utils.data.DataLoader(ds, batch_size=16)
        out = None
        with torch.no_grad():
            for batch, _, rows in loader:
                b, c, t, h, w = batch.shape
                feats = backbone(batch.transpose(1, 2).reshape(b * t, c, h, w)).reshape(b, t, -1)  # (B, T, D)
                if out is None:
                    out = np.zeros((len(ds), t, feats.shape[-1]), dtype=np.float32)
                out[rows.numpy()] = feats.numpy()
        tmp = f"{path}.{os.getpid()}.tmp.npy"
        np.save(tmp, out)
        os.replace(tmp, path)  # readers only ever see a whole file
    log(f"backbone features: {out.shape[0]} rows x {out.shape[1]} frames x {out.shape[2]} ({out.nbytes / 2**20:.1f} MB) "
        f"at {path}")
    return path, True


class FeatureDataset(Dataset):
    """Cached frozen-backbone features: ``(features (T, D), label, row)``. Pickles as its file path,
    so loader workers map the file instead of receiving a copy."""

    def __init__(self, path: str, labels: np.ndarray):
        self.path = path
        self.labels = np.asarray(labels).astype(np.int64)
        self._features: np.ndarray | None = None

    def __getstate__(self):
        return {**self.__dict__, "_features": None}

    @property
    def features(self) -> np.ndarray:
        if self._features is None:
            self._features = np.load(self.path, mmap_mode="r")  # (N, T, D)
        return self._features

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Features are fixed: nothing changes between epochs."""

    def __getitem__(self, i: int):
        return torch.from_numpy(np.array(self.features[i])), int(self.labels[i]), i
