"""Clip loading throughput: vidtune's loader (decord, with and without the decoded-clip cache)
against a bare decord loop and a PyAV-decoding loader as PyTorchVideo builds it.

Every loader reads 8-frame training clips (8 segments x 1 frame) of the same synthetic H.264 set,
decoded at short side 72 and cropped to 64 x 64, in this one process (no loader workers), so the
figures compare the work per clip on one core. Also measures resident-memory growth of the
uncached loader over a long read (decord readers kept alive are known to leak; vidtune drops each
reader after its clip).

    python bench/data_throughput.py [--quick]

The last line is one JSON object: decode_clips_per_s, pyav_clips_per_s, loader_clips_per_s,
cached_clips_per_s, cached_vs_decode, loader_vs_pyav, rss_growth_mb_per_1k_clips (+ details).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import finish, make_set, parse_args, rate  # noqa: E402

from vidtune.config import DataConfig  # noqa: E402
from vidtune.data.cache import build_clip_cache  # noqa: E402
from vidtune.data.dataset import ClipDataset  # noqa: E402
from vidtune.data.manifest import read_manifest  # noqa: E402
from vidtune.data.video import scaled_size  # noqa: E402

CFG = DataConfig(num_segments=8, frames_per_segment=1, decode_short_side=72, crop_size=64, hflip=0.5, scale_min=0.5)


def bare_decord(ds: ClipDataset, n: int) -> float:
    """The floor of decoding: open, seek and decode the clip's frames (resized by decord), nothing else."""
    import decord

    rng = np.random.default_rng(0)
    bad_sizes = set()  # decord 0.6 cannot copy out some output sizes (e.g. 72x72): read those natively
    t0 = time.perf_counter()
    for k in range(n):
        i = k % len(ds)
        h, w = scaled_size(int(ds.sizes[i, 1]), int(ds.sizes[i, 0]), CFG.decode_short_side)
        idx = ds.indices(i, rng)
        if (h, w) not in bad_sizes:
            try:
                vr = decord.VideoReader(str(ds.paths[i]), num_threads=1, width=w, height=h)
                vr.get_batch(np.clip(idx, 0, len(vr) - 1).tolist()).asnumpy()
                continue
            except decord.DECORDError:
                bad_sizes.add((h, w))
            finally:
                vr = None
        vr = decord.VideoReader(str(ds.paths[i]), num_threads=1)
        vr.get_batch(np.clip(idx, 0, len(vr) - 1).tolist()).asnumpy()
        del vr
    return time.perf_counter() - t0


def pyav_clip(path: str, rng: np.random.Generator) -> torch.Tensor:
    """PyTorchVideo's recipe: EncodedVideoPyAV decodes every frame of the clip's time span (here the
    whole video) to RGB, then UniformTemporalSubsample, /255, Normalize, ShortSideScale, RandomCrop,
    RandomHorizontalFlip."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2)  # (C, T, H, W)
    idx = torch.linspace(0, video.shape[1] - 1, CFG.num_frames).round().long()
    x = video[:, idx].float() / 255.0
    mean, std = torch.tensor(CFG.mean).view(-1, 1, 1, 1), torch.tensor(CFG.std).view(-1, 1, 1, 1)
    x = (x - mean) / std
    _, t, h, w = x.shape
    size = scaled_size(w, h, CFG.decode_short_side)
    x = F.interpolate(x.transpose(0, 1), size=size, mode="bilinear", align_corners=False).transpose(0, 1)
    y0 = int(rng.integers(0, size[0] - CFG.crop_size + 1))
    x0 = int(rng.integers(0, size[1] - CFG.crop_size + 1))
    x = x[:, :, y0 : y0 + CFG.crop_size, x0 : x0 + CFG.crop_size]
    return x.flip(-1) if rng.uniform() < 0.5 else x


def pyav_loader(ds: ClipDataset, n: int) -> float:
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for k in range(n):
        pyav_clip(str(ds.paths[k % len(ds)]), rng)
    return time.perf_counter() - t0


def read(ds: ClipDataset, n: int, batch_size: int = 8) -> float:
    """``n`` clips through a DataLoader (batches of 8, collation included), epoch after epoch."""
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=0)
    seen, epoch = 0, 0
    t0 = time.perf_counter()
    while seen < n:
        ds.set_epoch(epoch)
        for clips, _, _ in loader:
            seen += clips.shape[0]
            if seen >= n:
                break
        epoch += 1
    return time.perf_counter() - t0


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(1)
    n_decode, n_pyav, n_loader, n_cached, n_warm, n_long = (
        (150, 60, 150, 3000, 150, 1000) if args.quick else (600, 200, 600, 10000, 300, 3000)
    )
    root = args.workdir or tempfile.mkdtemp(prefix="vidtune-bench-")
    manifest = read_manifest(make_set(root, 4 if args.quick else 6, 12 if args.quick else 30, seed=0))
    train = manifest.split("train")
    plain = ClipDataset(train, CFG, train=True, seed=0)
    print(f"{len(train)} training videos, clips of {CFG.num_frames} frames at short side {CFG.decode_short_side}, "
          f"crop {CFG.crop_size}; one process, 1 torch thread; load {os.getloadavg()[0]:.2f}")

    cache_dir = os.path.join(root, "cache", str(os.getpid()))
    t0 = time.perf_counter()
    cache = build_clip_cache(manifest, CFG, cache_dir, log=lambda _m: None)
    build_s = time.perf_counter() - t0
    cached = ClipDataset(train, CFG, train=True, seed=0, cache=cache)

    # Warm the file cache and the libraries, then measure in rounds that alternate the loaders, so
    # a change in the machine's load (it is shared) hits all of them alike.
    bare_decord(plain, 10)
    pyav_loader(plain, 5)
    read(cached, 200)
    rounds = 3
    secs = {"decode": 0.0, "pyav": 0.0, "loader": 0.0, "cached": 0.0}
    for _ in range(rounds):
        secs["decode"] += bare_decord(plain, n_decode // rounds)
        secs["pyav"] += pyav_loader(plain, n_pyav // rounds)
        secs["loader"] += read(plain, n_loader // rounds)
        secs["cached"] += read(cached, n_cached // rounds)
    n_decode, n_pyav, n_loader, n_cached = (n // rounds * rounds for n in (n_decode, n_pyav, n_loader, n_cached))
    decode_s, pyav_s, loader_s, cached_s = secs["decode"], secs["pyav"], secs["loader"], secs["cached"]
    print(f"bare decord loop:           {rate(n_decode, decode_s):8.1f} clips/s")
    print(f"PyAV loader (PyTorchVideo): {rate(n_pyav, pyav_s):8.1f} clips/s")
    print(f"vidtune loader, no cache:   {rate(n_loader, loader_s):8.1f} clips/s")
    print(f"vidtune loader, cached:     {rate(n_cached, cached_s):8.1f} clips/s "
          f"(cache {cache.num_bytes / 2**20:.1f} MB built in {build_s:.1f} s with {os.cpu_count()} threads)")

    # Long read, uncached: decord's readers are opened and dropped per clip; RSS must stay flat.
    read(plain, n_warm)
    before = rss_mb()
    long_s = read(plain, n_long)
    growth = (rss_mb() - before) / n_long * 1000
    print(f"RSS growth of the uncached loader over {n_long} clips: {growth:.2f} MB per 1k clips "
          f"({rate(n_long, long_s)} clips/s)")
    anon_before = rss_mb("RssAnon")
    read(cached, n_long)
    cached_growth = (rss_mb("RssAnon") - anon_before) / n_long * 1000
    print(f"anonymous-memory growth of the cached loader: {cached_growth:.2f} MB per 1k clips "
          "(its mapped shards are page cache, shared by every trial)")

    result = {
        "decode_clips_per_s": rate(n_decode, decode_s),
        "pyav_clips_per_s": rate(n_pyav, pyav_s),
        "loader_clips_per_s": rate(n_loader, loader_s),
        "cached_clips_per_s": rate(n_cached, cached_s),
        "cached_vs_decode": round((n_cached / cached_s) / (n_decode / decode_s), 2),
        "loader_vs_pyav": round((n_loader / loader_s) / (n_pyav / pyav_s), 2),
        "rss_growth_mb_per_1k_clips": round(growth, 2),
        "cached_anon_growth_mb_per_1k_clips": round(cached_growth, 2),
        "cache_mb": round(cache.num_bytes / 2**20, 1),
        "cache_build_s": round(build_s, 1),
        "quick": args.quick,
    }
    finish(result)


if __name__ == "__main__":
    main()
