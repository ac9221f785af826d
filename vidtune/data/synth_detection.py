"""Synthetic untrimmed videos for temporal action detection (``vidtune data synth --recipe adatad_detection``).

Each video is a static textured background with per-frame noise in which 2-3 actions happen at
random times, for random durations, never overlapping: during an action a shape (random kind,
colour, size and place) appears and performs its class's motion; between actions nothing moves
but the noise. The classes differ only in their motion, and every motion looks like itself when
mirrored, so horizontal flips keep the labels. Written as real H.264 MP4s with a CSV of
``path,label,start,end,split`` rows (seconds; ``vidtune data index`` reads it) and the manifest.
Everything is drawn from ``numpy.random.default_rng([seed, ...])``: a seed gives the same set.
"""

from __future__ import annotations

import csv
import math
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np

DETECTION_MOTIONS = ("grow", "shrink", "flicker", "orbit")
ACTIONS_PER_VIDEO = (2, 3)


def plan_videos(prof, videos_per_class: int, seed: int) -> list[dict]:
    """Length, fps, size and the actions ``[(first frame, end frame, class)]`` of every video;
    each class occurs about ``videos_per_class`` times, in both splits."""
    num_classes = len(prof.class_names)
    mean_actions = sum(ACTIONS_PER_VIDEO) / 2
    num_videos = max(4, math.ceil(videos_per_class * num_classes / mean_actions))
    num_val = max(2, round(num_videos * prof.val_fraction), math.ceil(num_classes / ACTIONS_PER_VIDEO[0]))
    plans = []
    for v in range(num_videos):
        rng = np.random.default_rng([seed, 1, v])
        plans.append({
            "num_frames": int(rng.integers(prof.frames[0], prof.frames[1] + 1)),
            "fps": int(prof.fps[rng.integers(len(prof.fps))]),
            "size": tuple(int(s) for s in prof.sizes[rng.integers(len(prof.sizes))]),
            "num_actions": int(rng.integers(ACTIONS_PER_VIDEO[0], ACTIONS_PER_VIDEO[1] + 1)),
            "split": "val" if v >= num_videos - num_val else "train",
        })
    # Classes dealt from a shuffled, balanced deck per split: every class has train and val actions.
    for split in ("train", "val"):
        members = [p for p in plans if p["split"] == split]
        total = sum(p["num_actions"] for p in members)
        rng = np.random.default_rng([seed, 2, int(split == "val")])
        deck = rng.permutation(np.resize(np.arange(num_classes), total))
        at = 0
        for p in members:
            p["classes"] = [int(c) for c in deck[at : at + p["num_actions"]]]
            at += p["num_actions"]
    for v, p in enumerate(plans):
        rng = np.random.default_rng([seed, 3, v])
        n, k = p["num_frames"], p["num_actions"]
        lengths = np.maximum(8, np.round(rng.uniform(0.12, 0.28, size=k) * n)).astype(int)
        # The frames left over are split into k + 1 random gaps around the actions.
        gaps = rng.dirichlet(np.ones(k + 1)) * max(0, n - int(lengths.sum()))
        actions, at = [], 0.0
        for j in range(k):
            first = int(np.round(at + gaps[j]))
            actions.append((first, min(n, first + int(lengths[j])), p["classes"][j]))
            at = first + lengths[j]
        p["actions"] = actions
    return plans


def render_untrimmed(plan: dict, prof, rng: np.random.Generator) -> np.ndarray:
    """Frames ``(T, H, W, 3)`` uint8 of one planned video."""
    from PIL import Image, ImageDraw

    from vidtune.data.synth import _polygon

    width, height = plan["size"]
    base = rng.uniform(20, 235, size=3)
    coarse = rng.normal(0, 25, size=(height // 16 + 2, width // 16 + 2, 3))
    texture = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR),
                         dtype=np.float32)
    background = np.clip(base + texture - 128, 0, 255)
    noise_sd = rng.uniform(2, 8)
    looks = []
    for _ in plan["actions"]:
        looks.append({
            "colour": np.where(base > 128, rng.uniform(0, 60, 3), rng.uniform(195, 255, 3)),
            "shape": str(rng.choice(["square", "triangle", "bar"])),
            "radius": min(width, height) * rng.uniform(0.14, 0.2),
            "cx": rng.uniform(0.35, 0.65) * width,
            "cy": rng.uniform(0.35, 0.65) * height,
            "angle": rng.uniform(0, 2 * math.pi),
            "phase": rng.uniform(0, 2 * math.pi),
        })
    frames = np.empty((plan["num_frames"], height, width, 3), dtype=np.uint8)
    for t in range(plan["num_frames"]):
        img = Image.fromarray(background.astype(np.uint8))
        for (first, end, cls), look in zip(plan["actions"], looks):
            if not first <= t < end:
                continue
            s = (t - first) / max(1, end - first - 1)  # progress through the action, 0..1
            cx, cy, scale, bright = look["cx"], look["cy"], 1.0, 1.0
            motion = prof.motions[cls]
            if motion == "grow":
                scale = 0.4 + 1.0 * s
            elif motion == "shrink":
                scale = 1.4 - 1.0 * s
            elif motion == "flicker":
                bright = 0.5 + 0.5 * math.cos(look["phase"] + 2 * math.pi * 3 * s)
            elif motion == "orbit":
                r = min(width, height) * 0.2
                cx = width / 2 + r * math.cos(look["phase"] + 2 * math.pi * s)
                cy = height / 2 + r * math.sin(look["phase"] + 2 * math.pi * s)
            else:
                raise ValueError(f"unknown detection motion {motion!r}; choose from {DETECTION_MOTIONS}")
            under = background[int(np.clip(cy, 0, height - 1)), int(np.clip(cx, 0, width - 1))]
            fill = tuple(int(v) for v in under * (1 - bright) + look["colour"] * bright)
            ImageDraw.Draw(img).polygon(_polygon(look["shape"], cx, cy, look["radius"] * scale, look["angle"]), fill=fill)
        frame = np.asarray(img, dtype=np.float32) + rng.normal(0, noise_sd, size=(height, width, 1))
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def _write_one(job) -> str:
    from vidtune.data.synth import write_video

    path, plan, prof, key = job
    write_video(path, render_untrimmed(plan, prof, np.random.default_rng(key)), plan["fps"])
    return path


def synthesize_detection(out_dir: str, prof, videos_per_class: int, seed: int = 0, workers: int | None = None,
                         progress: bool = False) -> str:
    """Write the videos to ``out_dir/videos/``, ``out_dir/annotations.csv`` (+ ``classes.txt``)
    and the manifest (one row per action); returns the manifest's path."""
    from vidtune.data.manifest import build_manifest, write_manifest

    if videos_per_class < 2:
        raise ValueError(f"--videos-per-class: must be >= 2 (got {videos_per_class})")
    plans = plan_videos(prof, videos_per_class, seed)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    jobs, rows = [], []
    for v, plan in enumerate(plans):
        path = os.path.abspath(os.path.join(out_dir, "videos", f"video_{v:04d}.mp4"))
        jobs.append((path, plan, prof, (seed, 4, v)))
        for first, end, cls in plan["actions"]:
            rows.append((path, prof.class_names[cls], first / plan["fps"], end / plan["fps"], plan["split"]))
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    done = 0
    with ProcessPoolExecutor(workers) if workers > 1 else _Inline() as pool:
        for _ in pool.map(_write_one, jobs):
            done += 1
            if progress and (done == len(jobs) or done % 20 == 0):
                print(f"\rsynthesising videos {done}/{len(jobs)}", end="\n" if done == len(jobs) else "", flush=True)
    with open(os.path.join(out_dir, "annotations.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "start", "end", "split"])
        for path, label, start, end, split in rows:
            writer.writerow([os.path.relpath(path, out_dir), label, f"{start:.4f}", f"{end:.4f}", split])
    # classes.txt fixes the class order when the CSV is indexed again (`vidtune data index`).
    with open(os.path.join(out_dir, "classes.txt"), "w", encoding="utf-8") as f:
        f.write("".join(f"{name}\n" for name in prof.class_names))
    table = build_manifest([r[0] for r in rows], [r[1] for r in rows], splits=[r[4] for r in rows],
                           starts=[r[2] for r in rows], ends=[r[3] for r in rows], class_names=list(prof.class_names)).table
    manifest_path = os.path.join(out_dir, "manifest.parquet")
    write_manifest(table, manifest_path)
    return manifest_path


class _Inline:
    """``ProcessPoolExecutor``'s ``map`` in this process (one worker)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, items):
        return map(fn, items)
