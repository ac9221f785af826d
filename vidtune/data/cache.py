"""The shared decoded-clip cache: decode once per data set, read by every trial through the page cache.

In a sweep every trial reads the same videos for many epochs; decoding them again each time is most
of an iteration's cost on a CPU. This cache decodes them once, before the trials start, into Arrow
IPC shards that every trial process memory-maps and reads without copying.

Two parts, each in its own folder under the cache directory (``<storage>/cache`` in a sweep):

- ``frames-<key>``: every training row's frames at the decode resolution (uint8 ``(T, H, W, 3)``)
  and the original index of each stored frame. Training clips are sampled from these exactly as
  from the video (same indices, same crops for the same random generator), so a cached run equals
  an uncached one. A row longer than ``data.cache_max_frames`` stores that many evenly spaced
  frames; its clips then use the stored frame nearest each sampled index (an approximation that
  only applies to such long rows). Key: the manifest's content, ``decode_short_side`` and
  ``cache_max_frames`` -- searching the sampling settings reuses it.
- ``clips-<key>``: every other row's (val, test) fixed validation clip, centre-cropped, uint8
  ``(T, crop, crop, 3)``: exactly what the uncached validation view decodes before normalising.
  Key: the manifest's content, the decode size, the sampling settings and the crop size.

A part is built in a temporary folder and renamed into place when complete, under a file lock, so
two trials starting at once build it once and nobody reads half-written shards. Unreadable videos
are left out of the cache (and logged); the dataset then meets them as it would uncached and applies
its bad-video policy; more than ``MAX_BAD_VIDEOS`` stop the build with the first one named.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from vidtune.config import DataConfig
from vidtune.data.video import VideoError, decode_frames, scaled_size

CACHE_ENV = "VIDTUNE_CACHE_DIR"
CACHE_VERSION = 1  # bump when the stored layout or decoding changes
SHARD_BYTES = 512 * 2**20  # a new shard file past this size: bounded files, parallel-friendly copies
MAX_BAD_VIDEOS = 10  # the dataset's own limit (vidtune.data.dataset)

SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the row's identity: path, start, end
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("indices", pa.list_(pa.int32())),  # original frame index of each stored frame
        ("pixels", pa.large_binary()),  # uint8 (T, H, W, 3), C order
    ]
)


def row_key(path: str, start, end) -> str:
    """A manifest row's identity in the cache (the same video trimmed twice is two rows)."""

    def norm(v) -> str:
        return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{float(v):.6f}"

    return f"{path}|{norm(start)}|{norm(end)}"


def manifest_row_keys(manifest) -> list[str]:
    return [row_key(p, s, e) for p, s, e in zip(manifest.column("path"), manifest.column("start"), manifest.column("end"))]


def frames_key(fingerprint: str, cfg: DataConfig) -> str:
    return _hash([CACHE_VERSION, "frames", fingerprint, cfg.decode_short_side, cfg.cache_max_frames])


def clips_key(fingerprint: str, cfg: DataConfig) -> str:
    return _hash([CACHE_VERSION, "clips", fingerprint, cfg.decode_short_side, cfg.num_segments, cfg.frames_per_segment,
                  cfg.frame_stride, cfg.crop_size])


def _hash(parts: list) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def default_cache_dir() -> str | None:
    """``$VIDTUNE_CACHE_DIR`` (set by the sweep for every trial), else None: no cache."""
    return os.environ.get(CACHE_ENV) or None


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
@dataclass
class _Row:
    pixels: np.ndarray  # (T, H, W, 3) uint8, a read-only view into the memory-mapped shard
    indices: np.ndarray  # (T,) original frame indices, ascending
    contiguous: bool  # indices == arange(indices[0], indices[0] + T): every frame of the range


class CachePart:
    """One built part (a folder of shards), memory-mapped. Pickles as its path, so DataLoader
    workers re-map the same files (shared through the page cache) instead of copying them."""

    def __init__(self, folder: str):
        self.folder = folder
        self._rows: dict[str, _Row] | None = None

    def __getstate__(self):
        return {"folder": self.folder, "_rows": None}

    @property
    def meta(self) -> dict:
        with open(os.path.join(self.folder, "meta.json")) as f:
            return json.load(f)

    @property
    def rows(self) -> dict[str, _Row]:
        if self._rows is None:
            self._rows = self._open()
        return self._rows

    def _open(self) -> dict[str, _Row]:
        rows: dict[str, _Row] = {}
        for name in sorted(os.listdir(self.folder)):
            if not name.endswith(".arrow"):
                continue
            reader = pa.ipc.open_file(pa.memory_map(os.path.join(self.folder, name)))
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)  # zero-copy: the arrays point into the mapped file
                keys = batch.column("key").to_pylist()
                heights = batch.column("height").to_numpy()
                widths = batch.column("width").to_numpy()
                idx = batch.column("indices")
                idx_values = idx.values.to_numpy()
                idx_offsets = idx.offsets.to_numpy()
                pix = batch.column("pixels")
                _, off_buf, data_buf = pix.buffers()
                offsets = np.frombuffer(off_buf, dtype=np.int64)[pix.offset : pix.offset + len(pix) + 1]
                data = np.frombuffer(data_buf, dtype=np.uint8)
                for r, key in enumerate(keys):
                    ind = idx_values[idx_offsets[r] : idx_offsets[r + 1]]
                    frames = data[offsets[r] : offsets[r + 1]].reshape(len(ind), int(heights[r]), int(widths[r]), 3)
                    contiguous = bool(len(ind) == 0 or ind[-1] - ind[0] + 1 == len(ind))
                    rows[key] = _Row(frames, ind, contiguous)
        return rows

    def frames(self, key: str, indices: np.ndarray, exact: bool = False) -> np.ndarray | None:
        """Frames ``indices`` of row ``key`` as ``(T, H, W, 3)`` uint8, or None when the row is not
        cached (or, with ``exact``, when it stores only a subset of its frames)."""
        row = self.rows.get(key)
        if row is None or (exact and not row.contiguous):
            return None
        n = len(row.indices)
        if row.contiguous:
            pos = np.clip(np.asarray(indices) - row.indices[0], 0, n - 1)
        else:  # a long row stored as evenly spaced frames: the nearest stored frame
            right = np.clip(np.searchsorted(row.indices, indices), 1, n - 1)
            left = right - 1
            pos = np.where(np.abs(row.indices[left] - indices) <= np.abs(row.indices[right] - indices), left, right)
        return row.pixels[pos]  # fancy indexing copies just these frames

    def clip(self, key: str) -> np.ndarray | None:
        """The stored clip of row ``key``, ``(T, H, W, 3)`` uint8 (a copy), or None."""
        row = self.rows.get(key)
        return None if row is None else np.array(row.pixels)


class ClipCache:
    """What a dataset reads: the training frames part and the validation clips part (either may be
    missing; rows not found are decoded as usual)."""

    def __init__(self, frames: CachePart | None, clips: CachePart | None):
        self.frames_part, self.clips_part = frames, clips

    def train_frames(self, key: str, indices: np.ndarray) -> np.ndarray | None:
        return self.frames_part.frames(key, indices) if self.frames_part else None

    def val_clip(self, key: str, indices: np.ndarray, crop_size: int) -> np.ndarray | None:
        """The centre-cropped validation clip ``(T, crop, crop, 3)``: stored as such for val rows;
        cut from a training row's stored frames when it has all of them (bit-identical then)."""
        if self.clips_part is not None:
            clip = self.clips_part.clip(key)
            if clip is not None:
                return clip
        if self.frames_part is not None:
            frames = self.frames_part.frames(key, indices, exact=True)
            if frames is not None:
                return np.ascontiguousarray(_center_crop_thwc(frames, crop_size))
        return None

    @property
    def num_bytes(self) -> int:
        return sum(p.meta["bytes"] for p in (self.frames_part, self.clips_part) if p is not None)


def _center_crop_thwc(frames: np.ndarray, size: int) -> np.ndarray:
    # The same box as vidtune.data.dataset.center_crop, on (T, H, W, C).
    h, w = frames.shape[1:3]
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return frames[:, y0 : y0 + size, x0 : x0 + size]


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def stored_indices(num_frames: int, first: int, last: int, max_frames: int) -> np.ndarray:
    """Original indices a training row stores: the whole range clip sampling can pick from
    (``segment_indices``' clamping), or ``max_frames`` evenly spaced ones when it is longer."""
    hi = min(last, num_frames)
    lo = max(0, min(first, hi - 1))
    hi = max(hi, lo + 1)
    if hi - lo <= max_frames:
        return np.arange(lo, hi, dtype=np.int64)
    return np.unique(np.round(np.linspace(lo, hi - 1, max_frames)).astype(np.int64))


def build_clip_cache(manifest, cfg: DataConfig, cache_dir: str, workers: int | None = None,
                     log: Callable[[str], None] = print) -> ClipCache:
    """Build (or reuse) both parts for ``manifest`` under ``cache_dir``; safe to call from several
    processes at once (one builds, the others wait and reuse)."""
    from vidtune.data.dataset import ClipDataset

    fingerprint = manifest.fingerprint()
    train = manifest.split("train")
    other = _not_train(manifest)
    parts = []
    for kind, part_manifest, key in (("frames", train, frames_key(fingerprint, cfg)), ("clips", other, clips_key(fingerprint, cfg))):
        if len(part_manifest) == 0:
            parts.append(None)
            continue
        ds = ClipDataset(part_manifest, cfg, train=False)

        def job(i: int, ds=ds, kind=kind) -> tuple[np.ndarray, np.ndarray]:
            h, w = int(ds.sizes[i, 0]), int(ds.sizes[i, 1])
            size = scaled_size(w, h, cfg.decode_short_side)
            if kind == "frames":
                first, last = ds.frame_range(i)
                idx = stored_indices(int(ds.num_frames[i]), first, last, cfg.cache_max_frames)
                return idx, decode_frames(str(ds.paths[i]), idx, size=size)
            idx = ds.indices(i, np.random.default_rng(0))  # the fixed validation indices
            return idx, _center_crop_thwc(decode_frames(str(ds.paths[i]), idx, size=size), cfg.crop_size)

        folder = os.path.join(cache_dir, f"{kind}-{key}")
        keys = manifest_row_keys(part_manifest)
        parts.append(_build_part(folder, kind, keys, job, workers, log))
    return ClipCache(parts[0], parts[1])


def _not_train(manifest):
    import pyarrow.compute as pc

    from vidtune.data.manifest import Manifest

    return Manifest(manifest.table.filter(pc.not_equal(manifest.table.column("split"), "train")), manifest.class_names)


def _build_part(folder: str, kind: str, keys: list[str], job, workers: int | None, log) -> CachePart:
    from filelock import FileLock

    if os.path.exists(os.path.join(folder, "meta.json")):
        return CachePart(folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    # One builder per part; the others block here, then find it built.
    with FileLock(folder + ".lock"):
        if os.path.exists(os.path.join(folder, "meta.json")):
            return CachePart(folder)
        t0 = time.perf_counter()
        tmp = f"{folder}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.makedirs(tmp)
        try:
            meta = _write_shards(tmp, kind, keys, job, workers, log)
            meta["build_s"] = round(time.perf_counter() - t0, 2)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(meta, f, indent=1)
            os.rename(tmp, folder)  # readers only ever see a complete part
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"clip cache: built {kind} for {meta['rows']} rows, {meta['bytes'] / 2**20:.1f} MB in {meta['build_s']:.1f} s "
        f"at {folder}" + (f"; left out {len(meta['bad'])} unreadable: {next(iter(meta['bad']))}" if meta["bad"] else ""))
    return CachePart(folder)


def _write_shards(folder: str, kind: str, keys: list[str], job, workers: int | None, log) -> dict:
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    bad: dict[str, str] = {}
    total = 0
    shard_bytes = 0
    shard = 0
    writer = None
    rows = 0

    def safe(i: int):
        try:
            return job(i)
        except VideoError as e:
            return e

    def in_order(pool):
        # At most a few videos decoded ahead of the writer: memory stays bounded on any data set.
        todo = iter(range(len(keys)))
        pending = deque((i, pool.submit(safe, i)) for i in islice(todo, 4 * workers))
        while pending:
            i, future = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(safe, nxt)))
            yield i, future.result()

    # decord and PyAV release the GIL while decoding: threads scale without copying frames around.
    last_note = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        try:
            for i, result in in_order(pool):
                if time.perf_counter() - last_note > 5.0:  # progress on large sets, a line every 5 s
                    last_note = time.perf_counter()
                    log(f"clip cache: {kind} {i}/{len(keys)} videos decoded")
                if isinstance(result, VideoError):
                    bad[keys[i].split("|", 1)[0]] = str(result)
                    if len(bad) >= MAX_BAD_VIDEOS:
                        raise RuntimeError(
                            f"clip cache: {len(bad)} unreadable videos, giving up; first: {next(iter(bad.values()))}. "
                            "Re-index the data with `vidtune data index` to leave them out."
                        ) from result
                    continue
                idx, frames = result  # (T,), (T, H, W, 3)
                frames = np.ascontiguousarray(frames, dtype=np.uint8)
                if writer is None or shard_bytes >= SHARD_BYTES:
                    if writer is not None:
                        writer.close()
                    writer = pa.ipc.new_file(os.path.join(folder, f"shard-{shard:05d}.arrow"), SCHEMA)
                    shard, shard_bytes = shard + 1, 0
                batch = pa.record_batch(
                    [pa.array([keys[i]]), pa.array([frames.shape[1]], pa.int32()), pa.array([frames.shape[2]], pa.int32()),
                     pa.array([idx.astype(np.int32)], pa.list_(pa.int32())),
                     pa.array([frames.tobytes()], pa.large_binary())],
                    schema=SCHEMA,
                )
                writer.write_batch(batch)
                shard_bytes += frames.nbytes
                total += frames.nbytes
                rows += 1
        finally:
            if writer is not None:
                writer.close()
    return {"kind": kind, "rows": rows, "bytes": total, "shards": shard, "bad": bad, "version": CACHE_VERSION}


def open_clip_cache(manifest, cfg: DataConfig, cache_dir: str | None = None, build: bool = True,
                    log: Callable[[str], None] = print) -> ClipCache | None:
    """The cache for ``manifest`` and ``cfg`` under ``cache_dir`` (default ``$VIDTUNE_CACHE_DIR``),
    built on first use when ``build``; None when ``data.cache`` is off or there is no cache dir."""
    cache_dir = cache_dir or default_cache_dir()
    if not cfg.cache or not cache_dir or "://" in cache_dir:  # memory-mapping needs a file system path
        return None
    if build:
        return build_clip_cache(manifest, cfg, cache_dir, log=log)
    fingerprint = manifest.fingerprint()
    found = []
    for kind, key in (("frames", frames_key(fingerprint, cfg)), ("clips", clips_key(fingerprint, cfg))):
        folder = os.path.join(cache_dir, f"{kind}-{key}")
        found.append(CachePart(folder) if os.path.exists(os.path.join(folder, "meta.json")) else None)
    return ClipCache(*found) if any(found) else None
