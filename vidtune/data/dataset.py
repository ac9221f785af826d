"""Clip datasets: segment-based frame sampling, per-clip transforms, class-balanced sampling.

A clip is ``num_segments x frames_per_segment`` frames: the video (or its ``[start, end]`` part)
is cut into equal segments and a run of frames is taken from each, at a random offset in training
and centred in validation. Clips come out as ``(C, T, H, W)`` float tensors, normalised.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from vidtune.config import DataConfig
from vidtune.data.cache import ClipCache, manifest_row_keys
from vidtune.data.manifest import Manifest
from vidtune.data.video import VideoError, decode_frames, scaled_size

MAX_BAD_VIDEOS = 10  # a few unreadable files are skipped; more means the data set is broken


def segment_indices(
    num_frames: int,
    num_segments: int,
    frames_per_segment: int,
    stride: int = 1,
    train: bool = False,
    rng: np.random.Generator | None = None,
    start: int = 0,
    end: int | None = None,
) -> np.ndarray:
    """Frame indices ``(num_segments * frames_per_segment,)`` into ``[start, end)``."""
    end = num_frames if end is None else min(end, num_frames)
    start = max(0, min(start, end - 1))
    length = max(1, end - start)
    span = (frames_per_segment - 1) * stride + 1  # frames one segment's run covers
    seg_len = length / num_segments
    room = max(0.0, seg_len - span)
    if train:
        rng = rng or np.random.default_rng()
        offsets = rng.uniform(0, room, size=num_segments) if room > 0 else np.zeros(num_segments)
    else:
        offsets = np.full(num_segments, room / 2)
    firsts = start + np.arange(num_segments) * seg_len + offsets  # (S,)
    idx = np.floor(firsts)[:, None] + np.arange(frames_per_segment)[None, :] * stride  # (S, F)
    return np.clip(idx.reshape(-1), start, end - 1).astype(np.int64)


def normalize(clip: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """uint8 ``(C, T, H, W)`` -> float, greyscale if asked, scaled by mean/std."""
    return normalize_batch(clip[None], cfg)[0]


def normalize_batch(clips: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """``normalize`` for a uint8 batch ``(B, C, T, H, W)`` on any device: the loader ships uint8
    (a quarter of the bytes) and the accelerator does the float work. Float input (frozen-backbone
    features) is already what the model takes and passes through."""
    if clips.dtype != torch.uint8:
        return clips
    x = clips.float()
    if cfg.channels == 1 and x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    c = x.shape[1]
    mean = torch.tensor(cfg.mean[:c] if len(cfg.mean) >= c else cfg.mean * c, dtype=torch.float64)
    std = torch.tensor(cfg.std[:c] if len(cfg.std) >= c else cfg.std * c, dtype=torch.float64)
    # One fused pass: (x / 255 - mean) / std = x * scale + shift.
    scale = (1.0 / (255.0 * std)).float().to(x.device).view(1, -1, 1, 1, 1)
    shift = (-mean / std).float().to(x.device).view(1, -1, 1, 1, 1)
    return torch.addcmul(shift, x, scale)


def augment_batch(clips: torch.Tensor, cfg: DataConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The training augmentation that runs on the device, for a batch ``(B, C, T, H, W)`` the loader
    left unflipped (``normalise=False``): each clip is mirrored with probability ``cfg.hflip``.
    Float input (frozen-backbone features) is not pixels and passes through."""
    if cfg.hflip <= 0 or clips.dtype != torch.uint8 or clips.dim() != 5:
        return clips
    flip = torch.rand(clips.shape[0], device=clips.device, generator=generator) < cfg.hflip
    return torch.where(flip.view(-1, 1, 1, 1, 1), clips.flip(-1), clips)


def random_resized_crop(
    clip: torch.Tensor, size: int, scale_min: float, rng: np.random.Generator, ratio=(3 / 4, 4 / 3)
) -> torch.Tensor:
    """The same random box for every frame of ``(C, T, H, W)`` uint8, resized to ``size x size``."""
    _, _, h, w = clip.shape
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:  # fall back to the largest centred square
        ch = cw = min(h, w)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
    box = clip[:, :, y0 : y0 + ch, x0 : x0 + cw]
    frames = box.transpose(0, 1)  # (T, C, ch, cw)
    # uint8 in, uint8 out (torch's vectorised path, ~5x the float one): the loader's main cost.
    out = F.interpolate(frames, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out.transpose(0, 1)  # (C, T, size, size)


def center_crop(clip: torch.Tensor, size: int) -> torch.Tensor:
    _, _, h, w = clip.shape
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return clip[:, :, y0 : y0 + size, x0 : x0 + size]


def load_clip(path: str, indices: np.ndarray, width: int, height: int, cfg: DataConfig, train: bool,
              rng: np.random.Generator | None = None, normalise: bool = True) -> torch.Tensor:
    """Frames ``indices`` of ``path`` as a normalised ``(C, T, H, W)`` clip: the training view
    (random resized crop, flip) or the validation view (centre crop). ``predict`` uses the latter."""
    size = scaled_size(width, height, cfg.decode_short_side)
    frames = decode_frames(path, indices, size=size)  # (T, H, W, 3)
    return transform_clip(frames, cfg, train, rng, normalise)


def transform_clip(frames: np.ndarray, cfg: DataConfig, train: bool, rng: np.random.Generator | None = None,
                   normalise: bool = True) -> torch.Tensor:
    """Decoded frames ``(T, H, W, 3)`` uint8 -> the training or validation view ``(C, T, H, W)``;
    uint8 and unflipped when not ``normalise`` (the device normalises and flips the batch:
    ``normalize_batch(augment_batch(...))``)."""
    clip = torch.from_numpy(frames).permute(3, 0, 1, 2)  # (C, T, H, W) uint8
    if train:
        rng = rng or np.random.default_rng()
        clip = random_resized_crop(clip, cfg.crop_size, cfg.scale_min, rng)
        if rng.uniform() < cfg.hflip and normalise:
            clip = clip.flip(-1)
    else:
        clip = center_crop(clip, cfg.crop_size)
    return normalize(clip, cfg) if normalise else clip.contiguous()


class ClipDataset(Dataset):
    """One clip per manifest row: ``(clip (C, T, H, W), label, row)``. ``train`` picks random
    offsets, crops and flips; each sample's randomness comes from ``(seed, epoch, index)`` so runs
    repeat exactly. ``row`` indexes per-row recipe targets (e.g. cached teacher outputs).

    With ``cache`` (vidtune.data.cache), rows found there are read from the memory-mapped decoded
    frames instead of the video: the same clip for the same randomness. ``normalise=False`` yields
    uint8 clips for ``normalize_batch`` on the training device."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, train: bool, seed: int = 0,
                 cache: ClipCache | None = None, normalise: bool = True):
        self.cfg = cfg
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.cache = cache
        self.normalise = normalise
        self.keys = manifest_row_keys(manifest) if cache is not None else None
        self.paths = manifest.column("path")
        self.labels = manifest.column("label").astype(np.int64)
        self.num_frames = manifest.column("num_frames").astype(np.int64)
        self.fps = manifest.column("fps").astype(np.float64)
        self.sizes = np.stack([manifest.column("height"), manifest.column("width")], axis=1)
        self.starts = manifest.column("start")
        self.ends = manifest.column("end")
        self.bad: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def frame_range(self, i: int) -> tuple[int, int]:
        start, end, fps = self.starts[i], self.ends[i], self.fps[i]
        first = int(round(start * fps)) if start is not None and not np.isnan(start) and fps > 0 else 0
        last = int(round(end * fps)) if end is not None and not np.isnan(end) and fps > 0 else int(self.num_frames[i])
        return first, max(first + 1, last)

    def indices(self, i: int, rng: np.random.Generator) -> np.ndarray:
        first, last = self.frame_range(i)
        c = self.cfg
        return segment_indices(
            int(self.num_frames[i]), c.num_segments, c.frames_per_segment, c.frame_stride, self.train, rng, first, last
        )

    def load(self, i: int, rng: np.random.Generator) -> torch.Tensor:
        """Decoded, augmented, normalised clip ``(C, T, H, W)`` of row ``i``."""
        indices = self.indices(i, rng)
        if self.cache is not None:
            if self.train:
                frames = self.cache.train_frames(self.keys[i], indices)  # (T, H, W, 3) uint8
                if frames is not None:
                    return transform_clip(frames, self.cfg, True, rng, self.normalise)
            else:
                clip = self.cache.val_clip(self.keys[i], indices, self.cfg.crop_size)  # (T, crop, crop, 3)
                if clip is not None:
                    return transform_clip(clip, self.cfg, False, rng, self.normalise)
        return load_clip(str(self.paths[i]), indices, int(self.sizes[i, 1]), int(self.sizes[i, 0]),
                         self.cfg, self.train, rng, self.normalise)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i, int(self.train)])
        first_error = None
        for _ in range(MAX_BAD_VIDEOS):
            try:
                return self.load(i, rng), int(self.labels[i]), i  # i: the row actually read
            except VideoError as e:
                # Skip a bad file for another of the same class, a bounded number of times.
                self.bad[str(self.paths[i])] = str(e)
                first_error = first_error or e
                if len(self.bad) >= MAX_BAD_VIDEOS:
                    break
                same = [j for j in np.flatnonzero(self.labels == self.labels[i]) if str(self.paths[j]) not in self.bad]
                if not same:
                    break
                i = int(rng.choice(same))
        raise RuntimeError(
            f"{len(self.bad)} unreadable videos, giving up; first: {first_error}. "
            "Re-index the data with `vidtune data index` to leave them out."
        ) from first_error


def class_balanced_weights(labels: np.ndarray, power: float) -> np.ndarray:
    """Per-sample weights ``freq(label) ** -power`` (0: plain, 0.5: sqrt, 1: balanced)."""
    counts = np.bincount(labels)
    return (counts[labels].astype(np.float64)) ** (-power)


class WeightedDistributedSampler(Sampler[int]):
    """Weighted sampling with replacement, identical on every rank, each rank taking its share."""

    def __init__(self, weights: np.ndarray, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples = int(math.ceil(num_samples / world_size))
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        draws = torch.multinomial(self.weights, self.num_samples * self.world_size, replacement=True, generator=g)
        return iter(draws[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples
