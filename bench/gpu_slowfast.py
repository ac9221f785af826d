"""GPU only: SlowFast training-step throughput in fp32 against AMP (bf16 where supported, else
fp16 with GradScaler), fed by vidtune's input pipeline (decoded-clip cache, uint8 batches
normalised on the device), and the GPU's utilisation while it trains.

The model is the thermal_slowfast space's SlowFast at R50 depth and width (`widths: [64]`,
`depths: [3, 4, 6, 3]`), 16 frames at 64 px, one channel; without a CUDA device the script says so
and stops.

    python bench/gpu_slowfast.py [--quick]

The last line is one JSON object: fp32_clips_per_s, amp_clips_per_s, amp_speedup, gpu_util_pct
(mean of samples taken while training; needs pynvml), input_only_clips_per_s.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import finish, make_set, parse_args, rate  # noqa: E402


def main() -> None:
    args = parse_args(__doc__)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (run this on a GPU machine)")
        finish({"skipped": "no CUDA device"})
        return
    from vidtune.data.cache import build_clip_cache
    from vidtune.data.dataset import ClipDataset, normalize_batch
    from vidtune.data.manifest import read_manifest
    from vidtune.recipes import get_recipe
    from vidtune.space import default_space_path, load_space
    from vidtune.train import auto_num_workers, build_optimizer

    device = torch.device("cuda")
    space = load_space(default_space_path("thermal_slowfast"))
    cfg = space.base.with_overrides({"model.widths": [64], "model.depths": [3, 4, 6, 3], "train.batch_size": 32})
    steps = 20 if args.quick else 100
    root = args.workdir or tempfile.mkdtemp(prefix="vidtune-bench-")
    manifest = read_manifest(make_set(root, 14, 20 if args.quick else 54, seed=0, recipe="thermal_slowfast"))
    train_part = manifest.split("train")
    cache = build_clip_cache(manifest, cfg.data, os.path.join(root, "cache"), log=print)
    workers = auto_num_workers(os.cpu_count())
    ds = ClipDataset(train_part, cfg.data, True, cache=cache, normalise=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=True, persistent_workers=True,
                                         prefetch_factor=4, multiprocessing_context="forkserver")

    def batches():
        epoch = 0
        while True:
            ds.set_epoch(epoch)
            yield from loader
            epoch += 1

    t0, n = time.perf_counter(), 0
    for k, (clips, _, _) in enumerate(batches()):
        n += clips.shape[0]
        if k == steps:
            break
    input_rate = rate(n, time.perf_counter() - t0)

    util: list[float] = []
    stop = threading.Event()

    def sample():
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            while not stop.is_set():
                util.append(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
                time.sleep(0.2)
        except Exception as e:  # pynvml missing or no permission: utilisation is left out
            print(f"GPU utilisation not sampled: {e}")

    def run(amp_dtype) -> float:
        torch.manual_seed(0)
        model = get_recipe(cfg.recipe).build_model(cfg, manifest.num_classes).to(device).train()
        opt = build_optimizer(model, cfg)
        scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
        seen, start = 0, None
        for k, (clips, labels, _) in enumerate(batches()):
            if k == 3:
                torch.cuda.synchronize()
                seen, start = 0, time.perf_counter()
            clips = normalize_batch(clips.to(device, non_blocking=True), cfg.data)  # (B, C, T, H, W)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = F.cross_entropy(model(clips).float(), labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += labels.shape[0]
            if k == steps + 3:
                break
        torch.cuda.synchronize()
        return rate(seen, time.perf_counter() - start)

    fp32 = run(None)
    amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    amp = run(amp_dtype)
    stop.set()
    sampler.join(timeout=2)
    gpu_util = round(sum(util) / len(util), 1) if util else None
    print(f"SlowFast-R50 shape, batch {cfg.train.batch_size}, {cfg.data.num_frames} frames at {cfg.data.crop_size}px, "
          f"{workers} loader workers: fp32 {fp32} clips/s, {amp_dtype} AMP {amp} clips/s ({amp / fp32:.2f}x); "
          f"input alone {input_rate} clips/s; GPU busy {gpu_util}% during AMP")
    finish({"fp32_clips_per_s": fp32, "amp_clips_per_s": amp, "amp_speedup": round(amp / fp32, 2),
            "gpu_util_pct": gpu_util, "input_only_clips_per_s": input_rate, "amp_dtype": str(amp_dtype),
            "quick": args.quick})


if __name__ == "__main__":
    main()
