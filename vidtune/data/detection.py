"""Untrimmed videos with annotated segments, for temporal action detection.

A detection manifest has one row per annotated segment (``path, label, start, end`` in seconds);
rows of the same path are one video. An item is a window of a video sampled as
``data.num_segments`` snippets of ``data.frames_per_segment`` frames: the whole video
(``window_frames`` 0, ActivityNet style), or a window of ``window_frames`` frames, random in
training (AdaTAD's random truncation) and sliding with overlap in validation.

Items keep the ``(clip, target, row)`` contract of :class:`ClipDataset`; ``target`` is a float
tensor ``(1 + G, 3)``: row 0 is ``[video index, window start s, window length s]``, rows
``1..G`` are the video's segments ``[start s, end s, class]`` in video time, padded with class -1
(``G`` = the most segments of any video in the set, so batches stack).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from vidtune.config import DataConfig
from vidtune.data.dataset import MAX_BAD_VIDEOS, load_clip, segment_indices
from vidtune.data.manifest import DataError, Manifest
from vidtune.data.video import VideoError


@dataclass
class Video:
    path: str
    num_frames: int
    fps: float
    width: int
    height: int
    segments: np.ndarray  # (G, 3): start s, end s, class

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def group_videos(manifest: Manifest) -> list[Video]:
    """The manifest's rows grouped by path (in order of first appearance), segments checked."""
    cols = {c: manifest.column(c) for c in ("path", "label", "num_frames", "fps", "width", "height", "start", "end")}
    by_path: dict[str, Video] = {}
    segments: dict[str, list] = {}
    for i, path in enumerate(cols["path"]):
        path = str(path)
        start, end, fps = cols["start"][i], cols["end"][i], float(cols["fps"][i])
        if start is None or end is None or np.isnan(start) or np.isnan(end):
            raise DataError(f"{path}: row {i} has no start/end; detection needs each action's times "
                            "(CSV columns path,label,start,end in seconds)")
        if fps <= 0:
            raise DataError(f"{path}: unknown frame rate; re-encode the video or index it again")
        if path not in by_path:
            by_path[path] = Video(path, int(cols["num_frames"][i]), fps, int(cols["width"][i]), int(cols["height"][i]),
                                  np.zeros((0, 3)))
            segments[path] = []
        video = by_path[path]
        if not end > start:
            raise DataError(f"{path}: segment {start:g}-{end:g} s (row {i}) does not end after it starts")
        if start >= video.duration:
            raise DataError(f"{path}: segment {start:g}-{end:g} s (row {i}) starts after the video ends ({video.duration:.2f} s)")
        # Annotations a little past the last frame (rounding) are clipped to the video.
        segments[path].append((float(start), min(float(end), video.duration), int(cols["label"][i])))
    for path, video in by_path.items():
        video.segments = np.asarray(sorted(segments[path]), dtype=np.float64).reshape(-1, 3)
    return list(by_path.values())


def window_starts(num_frames: int, window: int, overlap: float) -> list[tuple[int, int]]:
    """Sliding windows ``[first, last)`` covering every frame; the last one ends at the video's end."""
    if window <= 0 or num_frames <= window:
        return [(0, num_frames)]
    step = max(1, round(window * (1.0 - overlap)))
    firsts = list(range(0, num_frames - window + 1, step))
    if firsts[-1] != num_frames - window:
        firsts.append(num_frames - window)
    return [(f, f + window) for f in firsts]


class DetectionDataset(Dataset):
    """Windows of untrimmed videos with their segments: ``(clip (C, T*F, H, W), target, item)``."""

    def __init__(self, manifest: Manifest, cfg: DataConfig, train: bool, seed: int = 0, window_frames: int = 0,
                 window_overlap: float = 0.5, normalise: bool = True):
        self.cfg, self.train, self.seed, self.epoch = cfg, train, seed, 0
        self.normalise = normalise  # False: uint8 clips, normalised on the training device
        self.window_frames = window_frames
        self.videos = group_videos(manifest)
        self.max_segments = max([len(v.segments) for v in self.videos] + [1])
        if train:
            # One item per video; its window is drawn anew every epoch.
            self.items = [(v, 0, video.num_frames) for v, video in enumerate(self.videos)]
        else:
            self.items = [(v, a, b) for v, video in enumerate(self.videos)
                          for a, b in window_starts(video.num_frames, window_frames, window_overlap)]
        # A per-item class for class-balanced sampling: the video's first action.
        self.labels = np.array([int(self.videos[v].segments[0, 2]) for v, _, _ in self.items], dtype=np.int64)
        self.bad: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def window(self, i: int, rng: np.random.Generator) -> tuple[int, int]:
        v, first, last = self.items[i]
        n, w = self.videos[v].num_frames, self.window_frames
        if self.train and 0 < w < n:
            first = int(rng.integers(0, n - w + 1))
            last = first + w
        return first, last

    def target(self, i: int, first: int, last: int) -> torch.Tensor:
        v = self.items[i][0]
        video = self.videos[v]
        out = torch.full((1 + self.max_segments, 3), -1.0, dtype=torch.float64)
        out[0] = torch.tensor([v, first / video.fps, (last - first) / video.fps])
        out[1 : 1 + len(video.segments)] = torch.from_numpy(video.segments)
        return out.float()

    def load(self, i: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        video = self.videos[self.items[i][0]]
        first, last = self.window(i, rng)
        c = self.cfg
        idx = segment_indices(video.num_frames, c.num_segments, c.frames_per_segment, c.frame_stride, self.train, rng, first, last)
        clip = load_clip(video.path, idx, video.width, video.height, c, self.train, rng, self.normalise)  # (C, T*F, H, W)
        return clip, self.target(i, first, last)

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i, int(self.train)])
        first_error = None
        for _ in range(MAX_BAD_VIDEOS):
            try:
                clip, target = self.load(i, rng)
                return clip, target, i
            except VideoError as e:
                path = self.videos[self.items[i][0]].path
                self.bad[path] = str(e)
                first_error = first_error or e
                # Validation scores every video it was given: a substitute would skew the mAP.
                good = [j for j in range(len(self.items)) if self.videos[self.items[j][0]].path not in self.bad]
                if not self.train or not good or len(self.bad) >= MAX_BAD_VIDEOS:
                    break
                i = int(rng.choice(good))
        raise RuntimeError(
            f"{len(self.bad)} unreadable videos; first: {first_error}. Re-index the data with `vidtune data index` "
            "to leave them out."
        ) from first_error

