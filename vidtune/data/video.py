"""Video probing and decoding: decord first, PyAV for what decord cannot open.

Every decoder returns frames as a ``(T, H, W, 3)`` uint8 numpy array. Readers are opened per call
and dropped at once: decord readers kept alive across samples grow memory without bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

try:  # decord has no wheels for some platforms; PyAV covers them.
    import decord

    decord.bridge.set_bridge("native")
except ImportError:  # pragma: no cover - depends on the platform
    decord = None


class VideoError(RuntimeError):
    """A video that cannot be read; the message starts with its path."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def probe(path: str) -> VideoInfo:
    """Frame count, fps and size of ``path``, checked by decoding its first frame."""
    if not os.path.exists(path):
        raise VideoError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: empty file")
    errors = []
    if decord is not None:
        try:
            vr = decord.VideoReader(path, num_threads=1)
            n = len(vr)
            if n < 1:
                raise ValueError("no frames")
            first = vr[0].asnumpy()
            info = VideoInfo(n, float(vr.get_avg_fps()), int(first.shape[1]), int(first.shape[0]))
            del vr
            return info
        except Exception as e:  # decord raises its own DECORDError and plain RuntimeErrors
            errors.append(f"decord: {_short(e)}")
    try:
        return _probe_pyav(path)
    except Exception as e:
        errors.append(f"pyav: {_short(e)}")
    raise VideoError(f"{path}: cannot decode ({'; '.join(errors)})")


def _probe_pyav(path: str) -> VideoInfo:
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        n = 0
        width = height = 0
        for frame in container.decode(stream):
            if n == 0:
                width, height = frame.width, frame.height
            n += 1
        if n == 0:
            raise ValueError("no frames")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
    return VideoInfo(n, fps, width, height)


def decode_frames(path: str, indices: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Frames ``indices`` of ``path`` as ``(T, H, W, 3)`` uint8, resized to ``size=(H, W)`` if given.

    Indices past the end are clamped to the last frame (container frame counts can overshoot).
    """
    indices = np.asarray(indices, dtype=np.int64)
    errors = []
    if decord is not None:
        try:
            return _decode_decord(path, indices, size)
        except Exception as e:
            errors.append(f"decord: {_short(e)}")
    try:
        return _decode_pyav(path, indices, size)
    except Exception as e:
        errors.append(f"pyav: {_short(e)}")
    raise VideoError(f"{path}: cannot decode ({'; '.join(errors)})")


# Output sizes decord's scaler fails to copy out (decord 0.6 raises "DECORDArrayCopyFromTo: The size
# must exactly match" for some widths, e.g. 72x72 and 48x48): decoded natively and resized here
# instead of falling back to a full PyAV decode.
_DECORD_BAD_SIZES: set[tuple[int, int]] = set()


def _decode_decord(path: str, indices: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size and size not in _DECORD_BAD_SIZES:
        try:
            return _decord_batch(path, indices, size)
        except decord.DECORDError as e:
            if "DECORDArrayCopyFromTo" not in str(e):
                raise
            _DECORD_BAD_SIZES.add(size)
    frames = _decord_batch(path, indices, None)
    return frames if not size or frames.shape[1:3] == tuple(size) else _resize(frames, size)


def _decord_batch(path: str, indices: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    kwargs = {"width": size[1], "height": size[0]} if size else {}
    vr = decord.VideoReader(path, num_threads=1, **kwargs)
    try:
        indices = np.clip(indices, 0, len(vr) - 1)
        return vr.get_batch(indices.tolist()).asnumpy()  # (T, H, W, 3)
    finally:
        del vr


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(T, H, W, 3)`` uint8 -> ``(T, *size, 3)`` uint8, antialiased bilinear."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(frames).permute(0, 3, 1, 2)  # (T, 3, H, W)
    out = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return out.permute(0, 2, 3, 1).contiguous().numpy()


def _decode_pyav(path: str, indices: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    import av

    wanted = set(indices.tolist())
    last = int(indices.max())
    frames: dict[int, np.ndarray] = {}
    latest = None  # stands in for indices past the real end of the stream
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if size:
                frame = frame.reformat(width=size[1], height=size[0])
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
                latest = frames[i]
            elif i == last or latest is None:
                latest = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    if latest is None:
        raise ValueError("no frames decoded")
    return np.stack([frames.get(int(i), latest) for i in indices])


def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """``(H, W)`` with the short side scaled to ``short_side``, aspect kept."""
    if height <= width:
        return short_side, max(short_side, round(width * short_side / height))
    return max(short_side, round(height * short_side / width)), short_side


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:200]
