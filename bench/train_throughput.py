"""Is training input-bound? Training clips/s with vidtune's real input pipeline (the decoded-clip
cache read through the trial's DataLoader settings) against the same model, optimiser and precision
on batches already in memory: the limit no input pipeline can beat.

The model and settings are the quickstart space's baseline trial (3D CNN, batch 16, bf16 autocast
on CPU), run as a quickstart trial runs: one CPU (1 torch thread), loader in-process
(`num_workers: 0`). Also reported: the same pipeline without the cache.

    python bench/train_throughput.py [--quick]

The last line is one JSON object: input_bound_ratio (+ the clips/s behind it).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import finish, make_set, parse_args, rate  # noqa: E402

from vidtune.data.cache import build_clip_cache  # noqa: E402
from vidtune.data.dataset import ClipDataset  # noqa: E402
from vidtune.data.manifest import read_manifest  # noqa: E402
from vidtune.recipes import get_recipe  # noqa: E402
from vidtune.space import default_space_path, load_space  # noqa: E402
from vidtune.train import auto_num_workers, build_optimizer, resolve_precision  # noqa: E402


def batches(loader):
    epoch = 0
    while True:
        loader.dataset.set_epoch(epoch)
        for clips, labels, _ in loader:
            yield clips, labels
        epoch += 1


def train(cfg, num_classes: int, source, steps: int, warmup: int = 3) -> tuple[int, float]:
    """``steps`` optimiser steps on batches from ``source``; returns (clips, seconds) after warm-up."""
    torch.manual_seed(0)
    model = get_recipe(cfg.recipe).build_model(cfg, num_classes).train()
    opt = build_optimizer(model, cfg)
    amp = resolve_precision(cfg.train.precision, torch.device("cpu"))
    seen, t0 = 0, None
    for step, (clips, labels) in enumerate(source):
        if step == warmup:
            seen, t0 = 0, time.perf_counter()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            out = model(clips)  # (B, K)
        loss = F.cross_entropy(out.float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += labels.shape[0]
        if step + 1 == warmup + steps:
            break
    return seen, time.perf_counter() - t0


def main() -> None:
    args = parse_args(__doc__)
    steps = 30 if args.quick else 90
    space = load_space(default_space_path())
    cfg = space.base
    torch.set_num_threads(1)
    root = args.workdir or tempfile.mkdtemp(prefix="vidtune-bench-")
    manifest = read_manifest(make_set(root, 4 if args.quick else 6, 12 if args.quick else 30, seed=0))
    train_part = manifest.split("train")
    cache = build_clip_cache(manifest, cfg.data, os.path.join(root, "cache", str(os.getpid())), log=lambda _m: None)
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else auto_num_workers(1)
    print(f"quickstart trial: {cfg.model.arch} {cfg.model.widths}, batch {cfg.train.batch_size}, precision "
          f"{cfg.train.precision}, {cfg.data.num_frames} frames at {cfg.data.crop_size}px; 1 thread, {workers} loader "
          f"workers; {steps} timed steps; load {os.getloadavg()[0]:.2f}")

    def loader(ds):
        return torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                                           num_workers=workers)

    # The limit: the batches the pipeline makes, held in memory and replayed.
    held = []
    for clips, labels in batches(loader(ClipDataset(train_part, cfg.data, True, cache=cache))):
        held.append((clips, labels))
        if len(held) == 8:
            break
    # Alternate the two in rounds so a change in the machine's load hits both alike.
    totals = {"memory": [0, 0.0], "cached": [0, 0.0]}
    for _ in range(3):
        for name in totals:
            source = ((held[k % len(held)] for k in range(10**9)) if name == "memory"
                      else batches(loader(ClipDataset(train_part, cfg.data, True, cache=cache))))
            n, sec = train(cfg, manifest.num_classes, source, steps // 3)
            totals[name][0] += n
            totals[name][1] += sec
    plain = train(cfg, manifest.num_classes, batches(loader(ClipDataset(train_part, cfg.data, True))), steps // 3)
    r_mem, r_cached, r_plain = rate(*totals["memory"]), rate(*totals["cached"]), rate(*plain)
    print(f"in memory (the limit):  {r_mem:7.1f} clips/s")
    print(f"cached input pipeline:  {r_cached:7.1f} clips/s  ({r_cached / r_mem:.2f} of the limit)")
    print(f"decoding every epoch:   {r_plain:7.1f} clips/s  ({r_plain / r_mem:.2f} of the limit)")
    finish({
        "input_bound_ratio": round(r_cached / r_mem, 3),
        "uncached_input_bound_ratio": round(r_plain / r_mem, 3),
        "in_memory_clips_per_s": r_mem,
        "cached_train_clips_per_s": r_cached,
        "uncached_train_clips_per_s": r_plain,
        "quick": args.quick,
    })


if __name__ == "__main__":
    main()
