"""Learnable synthetic action data sets, written as real H.264 MP4 files with PyAV.

Each class is a motion of a shape over a textured background: direction, rotation, growth,
flicker, orbit. Backgrounds, colours, shapes, start positions, speeds, noise, lengths, frame rates
and frame sizes vary per video, so a model must learn the motion, not a colour. Everything is drawn
from ``numpy.random.default_rng([seed, class, video])``: a seed gives the same frames every time.

Left/right and up/down are labels here: a horizontal flip changes the class, so recipes on these
sets keep ``data.hflip: 0``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np

MOTIONS = (
    "move_right",
    "move_left",
    "move_down",
    "move_up",
    "rotate_cw",
    "rotate_ccw",
    "grow",
    "shrink",
    "flicker",
    "orbit",
    "move_down_right",
    "move_up_left",
    "pulse",
    "still",
)


@dataclass(frozen=True)
class Profile:
    """What a synthetic set looks like: its classes' motions and how often each occurs."""

    motions: tuple[str, ...]
    class_names: tuple[str, ...]
    weights: tuple[float, ...]  # relative video count per class (imbalance)
    grey: bool = False
    frames: tuple[int, int] = (20, 36)
    sizes: tuple[tuple[int, int], ...] = ((96, 72), (112, 84), (128, 96), (96, 96))  # (W, H)
    fps: tuple[int, ...] = (12, 15, 24, 30)
    val_fraction: float = 0.2
    # Probability that the object's hue is its class's own (else random). Per-frame 2D models
    # (timm backbones) see what a frame holds, hardly where: real classes carry such appearance
    # cues (a scene, a held object), and a set of pure motions would hide every other difference.
    hue_cue: float = 0.0
    # Object radius as a fraction of the frame's short side (a range drawn per video).
    object_scale: tuple[float, float] = (0.12, 0.18)
    # Start position's spread around the frame's centre (fraction of the frame); 0.2 places the
    # object anywhere in the middle 40%. Crops centred on a face part (a mouth) hold it near 0.
    centre_spread: float = 0.2


def profile(recipe: str, num_classes: int | None = None) -> Profile:
    """The synthetic profile of a recipe (the classes, imbalance and look of its report's data)."""
    if recipe != "quickstart" and num_classes is not None:
        fixed = _profile(recipe, None)
        if num_classes != len(fixed.class_names):
            raise ValueError(f"--classes: the {recipe} set has its report's {len(fixed.class_names)} classes (got {num_classes})")
        return fixed
    return _profile(recipe, num_classes)


def _profile(recipe: str, num_classes: int | None) -> Profile:
    if recipe == "quickstart":
        n = num_classes or 6
        if not 2 <= n <= len(MOTIONS):
            raise ValueError(f"--classes: quickstart supports 2..{len(MOTIONS)} classes (got {n})")
        motions = MOTIONS[:n]
        return Profile(motions=motions, class_names=motions, weights=(1.0,) * n)
    if recipe == "thermal_slowfast":
        # Report 000: 14 classes, one ~54% of the videos, single-channel, wide 2:3 frames, long clips.
        names = ("lying_with_risk", "standing", "walking", "sitting", "lying_no_risk", "falling", "crawling",
                 "bending", "getting_up", "waving", "turning", "kneeling", "running", "stretching")
        motions = ("still", "move_up", "move_right", "move_down", "shrink", "move_down_right", "move_left",
                   "rotate_cw", "grow", "flicker", "rotate_ccw", "move_up_left", "orbit", "pulse")
        weights = (54, 8, 6, 5, 4, 4, 3, 3, 3, 2, 2, 2, 2, 2)
        return Profile(motions, names, tuple(float(w) for w in weights), grey=True, frames=(40, 64),
                       sizes=((96, 64), (120, 80)), fps=(8, 10, 15))
    if recipe == "lipread_3dcnn":
        # Report 002: 5 words, greyscale, 32-frame mouth crops. A mouth crop is centred on the mouth,
        # which fills much of it: a large object near the centre whose shape changes over time.
        return Profile(("grow", "shrink", "pulse", "flicker", "rotate_cw"), ("hello", "yes", "no", "stop", "go"),
                       (1.0,) * 5, grey=True, frames=(32, 40), sizes=((64, 64), (80, 80)), fps=(25, 30),
                       object_scale=(0.25, 0.35), centre_spread=0.03)
    if recipe == "anomaly_multitask":
        # Report 001 (UCF-Crime): "NormalVideos" dominates (76% there), 13 anomaly classes trail off.
        # The tail is flattened (2-6% a class) so a CPU-sized set still has a few videos of each.
        names = ("NormalVideos", "Abuse", "Arrest", "Arson", "Assault", "Burglary", "Explosion", "Fighting",
                 "RoadAccidents", "Robbery", "Shooting", "Shoplifting", "Stealing", "Vandalism")
        motions = ("still", "move_right", "move_left", "flicker", "pulse", "move_up", "grow", "orbit",
                   "move_down_right", "move_down", "shrink", "move_up_left", "rotate_cw", "rotate_ccw")
        weights = (50, 6, 5, 5, 4, 4, 3, 3, 3, 3, 2.5, 2.5, 2, 2)
        # The object is large and mostly in its class's hue: the report's per-frame backbone would
        # start from ImageNet weights, these trials start from random ones on ~150 videos.
        return Profile(motions, names, tuple(float(w) for w in weights), frames=(24, 40), sizes=((96, 72), (128, 96)),
                       fps=(10, 15, 30), hue_cue=0.9, object_scale=(0.2, 0.3))
    if recipe == "distill_clip_mobilevit":
        # Report 004 (Ego4D experiment): 8 egocentric actions, 8 frames a clip, ~100 clips.
        names = ("walking", "turning", "looking_around", "manipulating", "picking_up", "putting_down", "reaching", "standing")
        motions = ("move_down", "move_left", "orbit", "rotate_cw", "move_up", "move_down_right", "grow", "still")
        # Egocentric: the handled object is close to the camera (large) and what it is (its hue)
        # tells much of the action; a per-frame student from random weights learns that, and little
        # motion, in a CPU-sized budget.
        return Profile(motions, names, (1.0,) * 8, frames=(16, 32), sizes=((112, 84), (128, 96)), fps=(15, 30),
                       hue_cue=0.9, object_scale=(0.2, 0.3))
    if recipe == "adatad_detection":
        # Report 003 (THUMOS-14): untrimmed videos, a few actions each over a background; the
        # videos are long and small (see synth_detection.py). Motions that survive a mirror flip.
        motions = ("grow", "shrink", "flicker", "orbit")
        return Profile(motions, motions, (1.0,) * 4, frames=(96, 160), sizes=((64, 48), (80, 60)), fps=(12, 15, 24))
    raise ValueError(f"--recipe: unknown synthetic recipe {recipe!r}; choose one of {list(RECIPES)}")


RECIPES = ("quickstart", "thermal_slowfast", "lipread_3dcnn", "anomaly_multitask", "distill_clip_mobilevit", "adatad_detection")


def synthesize(
    out_dir: str,
    recipe: str = "quickstart",
    num_classes: int | None = None,
    videos_per_class: int = 40,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = False,
) -> str:
    """Write the set to ``out_dir/<class>/<class>_NNNN.mp4`` and index it; returns the manifest path.

    ``videos_per_class`` is the count of the most frequent class; imbalanced profiles scale the
    others down (never below 2, so every class has a train and a val video).
    """
    from vidtune.data.manifest import build_manifest, write_manifest

    prof = profile(recipe, num_classes)
    if recipe == "adatad_detection":  # untrimmed videos, one manifest row per action
        from vidtune.data.synth_detection import synthesize_detection

        return synthesize_detection(out_dir, prof, videos_per_class, seed, workers, progress)
    if videos_per_class < 2:
        raise ValueError(f"--videos-per-class: must be >= 2 (got {videos_per_class})")
    top = max(prof.weights)
    jobs = []
    rows = []
    for c, (motion, name) in enumerate(zip(prof.motions, prof.class_names)):
        count = max(2, round(videos_per_class * prof.weights[c] / top))
        num_val = max(1, round(count * prof.val_fraction))
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        for i in range(count):
            path = os.path.abspath(os.path.join(out_dir, name, f"{name}_{i:04d}.mp4"))
            jobs.append((path, motion, prof, (seed, c, i)))
            rows.append((path, name, "val" if i >= count - num_val else "train"))
    workers = workers or max(1, min(len(jobs), os.cpu_count() or 1))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for done, _ in enumerate(pool.map(_write_one, jobs, chunksize=4), 1):
                _progress(progress, done, len(jobs))
    else:
        for done, job in enumerate(jobs, 1):
            _write_one(job)
            _progress(progress, done, len(jobs))
    table = build_manifest(
        [r[0] for r in rows], [r[1] for r in rows], splits=[r[2] for r in rows], class_names=list(prof.class_names)
    ).table
    manifest_path = os.path.join(out_dir, "manifest.parquet")
    write_manifest(table, manifest_path)
    return manifest_path


def _progress(enabled: bool, done: int, total: int) -> None:
    if enabled and (done == total or done % 20 == 0):
        print(f"\rsynthesising videos {done}/{total}", end="\n" if done == total else "", flush=True)


def _write_one(job) -> str:
    path, motion, prof, key = job
    rng = np.random.default_rng(key)
    hue = None
    if prof.hue_cue > 0 and rng.uniform() < prof.hue_cue:
        hue = key[1] / len(prof.motions)  # the class's own hue, evenly spread
    frames, fps = render(motion, prof, rng, hue)
    write_video(path, frames, fps)
    return path


def render(motion: str, prof: Profile, rng: np.random.Generator, hue: float | None = None) -> tuple[np.ndarray, int]:
    """Frames ``(T, H, W, 3)`` uint8 of one video showing ``motion``, and its fps; ``hue`` (0..1)
    fixes the object's hue (brightness still contrasts with the background)."""
    from PIL import Image, ImageDraw

    width, height = prof.sizes[rng.integers(len(prof.sizes))]
    num_frames = int(rng.integers(prof.frames[0], prof.frames[1] + 1))
    fps = int(prof.fps[rng.integers(len(prof.fps))])
    # A static, smooth texture: low-resolution noise upsampled, on a random base colour.
    base = rng.uniform(20, 235, size=3)
    coarse = rng.normal(0, 25, size=(height // 16 + 2, width // 16 + 2, 3))
    texture = np.asarray(
        Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR),
        dtype=np.float32,
    )
    background = np.clip(base + texture - 128, 0, 255)
    # The object contrasts with the background so the motion stays visible after greyscale.
    colour = np.where(base > 128, rng.uniform(0, 60, 3), rng.uniform(195, 255, 3))
    if hue is not None:
        import colorsys

        value = 0.35 if base.mean() > 128 else 1.0
        colour = 255 * np.array(colorsys.hsv_to_rgb(hue + rng.normal(0, 0.02), rng.uniform(0.7, 1.0), value))
    shape = rng.choice(["square", "triangle", "bar"])
    radius = min(width, height) * rng.uniform(*prof.object_scale)
    # Start and end positions keep the object inside the frame for the whole video.
    travel = rng.uniform(0.35, 0.55)
    spread = prof.centre_spread
    cx0, cy0 = rng.uniform(0.5 - spread, 0.5 + spread) * width, rng.uniform(0.5 - spread, 0.5 + spread) * height
    angle0 = rng.uniform(0, 2 * math.pi)
    phase = rng.uniform(0, 2 * math.pi)
    noise_sd = rng.uniform(2, 10)

    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        s = t / max(1, num_frames - 1)  # progress through the video, 0..1
        cx, cy, angle, scale, bright = cx0, cy0, angle0, 1.0, 1.0
        if motion == "move_right":
            cx = width * (0.5 - travel / 2 + travel * s)
        elif motion == "move_left":
            cx = width * (0.5 + travel / 2 - travel * s)
        elif motion == "move_down":
            cy = height * (0.5 - travel / 2 + travel * s)
        elif motion == "move_up":
            cy = height * (0.5 + travel / 2 - travel * s)
        elif motion == "rotate_cw":
            angle = angle0 + 1.5 * math.pi * s
        elif motion == "rotate_ccw":
            angle = angle0 - 1.5 * math.pi * s
        elif motion == "grow":
            scale = 0.5 + 1.0 * s
        elif motion == "shrink":
            scale = 1.5 - 1.0 * s
        elif motion == "flicker":
            bright = 0.5 + 0.5 * math.cos(phase + 2 * math.pi * 3 * s)
        elif motion == "move_down_right":
            cx = width * (0.5 - travel / 2 + travel * s)
            cy = height * (0.5 - travel / 2 + travel * s)
        elif motion == "move_up_left":
            cx = width * (0.5 + travel / 2 - travel * s)
            cy = height * (0.5 + travel / 2 - travel * s)
        elif motion == "pulse":
            scale = 1.0 + 0.5 * math.sin(phase + 2 * math.pi * 2 * s)
        elif motion == "still":
            pass
        elif motion == "orbit":
            r = min(width, height) * 0.2
            cx = width / 2 + r * math.cos(phase + 2 * math.pi * s)
            cy = height / 2 + r * math.sin(phase + 2 * math.pi * s)
        else:
            raise ValueError(f"unknown motion {motion!r}")
        img = Image.fromarray(background.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        fill = tuple(int(v) for v in background[int(np.clip(cy, 0, height - 1)), int(np.clip(cx, 0, width - 1))] * (1 - bright) + colour * bright)
        draw.polygon(_polygon(shape, cx, cy, radius * scale, angle), fill=fill)
        frame = np.asarray(img, dtype=np.float32) + rng.normal(0, noise_sd, size=(height, width, 1))
        frames[t] = np.clip(frame, 0, 255).astype(np.uint8)
    if prof.grey:
        frames[:] = frames.mean(axis=3, keepdims=True).astype(np.uint8)
    return frames, fps


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    # Every shape is asymmetric under rotation (a marked tip), so rotation direction is visible.
    if shape == "triangle":
        pts = [(r, 0.0), (-0.6 * r, 0.7 * r), (-0.6 * r, -0.7 * r)]
    elif shape == "bar":
        pts = [(r, 0.15 * r), (r, -0.35 * r), (-r, -0.25 * r), (-r, 0.25 * r)]
    else:
        pts = [(0.7 * r, 0.7 * r), (0.7 * r, -0.7 * r), (-0.7 * r, -0.7 * r), (-0.7 * r, 0.3 * r)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def write_video(path: str, frames: np.ndarray, fps: int, codec: str = "libx264", lossless: bool = False) -> None:
    """Encode ``frames`` ``(T, H, W, 3)`` uint8 to ``path``. ``lossless`` writes x264 at qp 0 in
    RGB, so a decoder must return the written pixels exactly (used by tests)."""
    import av

    t, h, w, _ = frames.shape
    with av.open(path, mode="w") as container:
        if lossless:
            stream = container.add_stream("libx264rgb", rate=fps)
            stream.pix_fmt = "rgb24"
            stream.options = {"qp": "0", "preset": "ultrafast", "threads": "1"}
        else:
            stream = container.add_stream(codec, rate=fps)
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"preset": "veryfast", "crf": "20", "threads": "1"}
        # yuv420p needs even sizes; the synthetic sizes are even, user frames may not be.
        stream.width, stream.height = w - w % 2, h - h % 2
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]), format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
