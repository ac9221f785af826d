"""What caching the frozen teacher saves: a distillation student's training step with the CLIP
ViT-B/32 teacher run live on every batch (as a trainer without a cache does) against the same step
reading the teacher's embeddings from vidtune's per-data-set cache.

Settings: the distill_clip_mobilevit space's baseline (MobileViT-XXS student on 8 frames at 64 px,
teacher at 224 px), one CPU thread as a trial gets, on batches already in memory so only the
teacher's share differs. `--quick` uses batch 4 instead of the space's 16.

    python bench/distill_cache.py [--quick]

The last line is one JSON object: cached_teacher_speedup (+ the step times and the one-off cost of
building the cache).
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
from _common import finish, make_set, parse_args  # noqa: E402

from vidtune.data.dataset import ClipDataset  # noqa: E402
from vidtune.data.manifest import read_manifest  # noqa: E402
from vidtune.recipes import get_recipe  # noqa: E402
from vidtune.recipes.distill import build_teacher  # noqa: E402
from vidtune.space import default_space_path, load_space  # noqa: E402
from vidtune.train import build_optimizer  # noqa: E402


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(1)
    space = load_space(default_space_path("distill_clip_mobilevit"))
    batch = 4 if args.quick else space.base.train.batch_size
    cfg = space.base.with_overrides({"train.batch_size": batch})
    recipe = get_recipe(cfg.recipe)
    o = recipe.options(cfg)
    root = args.workdir or tempfile.mkdtemp(prefix="vidtune-bench-")
    manifest = read_manifest(make_set(root, 8, 3 if args.quick else 13, seed=0, recipe="distill_clip_mobilevit"))
    train_part = manifest.split("train")
    steps = 2 if args.quick else 4
    print(f"student {cfg.model.backbone}, teacher {o.teacher_model} at {o.teacher_size}px, batch {batch} x "
          f"{cfg.data.num_frames} frames, 1 thread, {steps} timed steps each; load {os.getloadavg()[0]:.2f}")

    # The per-data-set cache, as the sweep builds it before the trials (timed: its one-off cost).
    t0 = time.perf_counter()
    emb, info = recipe.teacher_embeddings(cfg, train_part, os.path.join(root, "cache", str(os.getpid())))
    cache_s = time.perf_counter() - t0
    cached = torch.from_numpy(emb)  # (N, E)
    print(f"teacher cache: {len(emb)} clips in {cache_s:.1f} s (once per data set, shared by every trial)")

    torch.manual_seed(0)
    model = recipe.build_model(cfg, manifest.num_classes).train()
    opt = build_optimizer(model, cfg)
    loss_fn = recipe.build_loss(cfg, train_part.class_counts())
    recipe.set_prototypes(loss_fn, cached, train_part.column("label"), manifest.num_classes)
    teacher = build_teacher(o)
    ds = ClipDataset(train_part, cfg.data, train=True)
    rows = np.arange(batch) % len(ds)
    clips = torch.stack([ds[int(i)][0] for i in rows])  # (B, C, T, H, W)
    labels = torch.as_tensor(train_part.column("label")[rows].astype(np.int64))

    def live_teacher(x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
        frames = F.interpolate(frames, size=(o.teacher_size, o.teacher_size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            return teacher(frames).reshape(b, t, -1).mean(dim=1)  # (B, E)

    def step(teacher_emb_fn) -> float:
        t = time.perf_counter()
        extra = {"teacher": teacher_emb_fn()}
        loss, _ = loss_fn(model(clips), labels, extra)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t

    def cached_fn():
        return cached[torch.as_tensor(rows)]

    def live_fn():
        return live_teacher(clips)

    step(cached_fn), step(live_fn)  # warm-up
    # Alternate the two so a change in the (shared) machine's load hits both alike.
    times = {"cached": [], "live": []}
    for _ in range(steps):
        times["cached"].append(step(cached_fn))
        times["live"].append(step(live_fn))
    cached_s, live_s = float(np.median(times["cached"])), float(np.median(times["live"]))
    print(f"student step, cached teacher outputs: {cached_s * 1000:8.1f} ms")
    print(f"student step, live teacher:           {live_s * 1000:8.1f} ms  ({live_s / cached_s:.1f}x)")
    finish({
        "cached_teacher_speedup": round(live_s / cached_s, 2),
        "step_ms_cached_teacher": round(cached_s * 1000, 1),
        "step_ms_live_teacher": round(live_s * 1000, 1),
        "teacher_cache_build_s": round(cache_s, 1),
        "batch_size": batch,
        "quick": args.quick,
    })


if __name__ == "__main__":
    main()
