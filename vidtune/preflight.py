"""Preflight: catch a broken pipeline before a sweep burns a cluster.

Report 002 spent three rounds tuning architectures while a pipeline bug held every model at
exactly chance. Each check below prints one line starting with its name (``manifest``, ``leak``,
``static``, ``inputs``, ``overfit``, ``chance``), says what it measured, and fails loudly:

- manifest: unreadable files left out (named), classes without train or val videos, imbalance;
- leak: the same video in train and val, by path, by identical bytes or by identical decoded frames;
- static: most sampled clips show one picture for every frame (a decoder returning one frame);
- inputs: NaN/inf, constant tensors, or values far outside a normalised range;
- overfit: the recipe's model, loss and optimiser cannot fit one small batch (broken wiring);
- chance: a short pilot of the space's first point does not beat chance on held-out clips
  (labels that do not match the videos: shuffled or misaligned).
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import default_collate

from vidtune.config import TrialConfig
from vidtune.data.dataset import ClipDataset, segment_indices
from vidtune.data.manifest import Manifest
from vidtune.data.video import VideoError, decode_frames
from vidtune.recipes import get_recipe

CHECKS = ("manifest", "leak", "static", "inputs", "overfit", "chance")


@dataclass
class Finding:
    check: str
    ok: bool
    message: str
    level: str = ""  # "" for a pass or a failure, "warn" for a note that does not fail

    def line(self) -> str:
        status = "ok" if self.ok else "FAIL"
        if self.level == "warn":
            status = "warn"
        return f"{self.check}: {status}: {self.message}"


class PreflightError(RuntimeError):
    """Some checks failed; the message lists them on one line."""


# ----------------------------------------------------------------------------------------------
def check_manifest(manifest: Manifest) -> list[Finding]:
    out = [Finding("manifest", True, f"left out {p}: {r}", "warn") for p, r in manifest.skipped]
    train, val = manifest.class_counts("train"), manifest.class_counts("val")
    no_train = [manifest.class_names[i] for i in np.flatnonzero(train == 0)]
    no_val = [manifest.class_names[i] for i in np.flatnonzero(val == 0)]
    present = train[train > 0]
    ratio = float(present.max() / present.min()) if len(present) else float("inf")
    counts = ", ".join(f"{n}={int(t)}/{int(v)}" for n, t, v in zip(manifest.class_names, train, val))
    problems = []
    if no_train:
        problems.append(f"classes with no train videos: {no_train}")
    if no_val:
        problems.append(f"classes with no val videos: {no_val}")
    msg = f"{len(manifest)} videos, {manifest.num_classes} classes, imbalance {ratio:.1f}:1 (train/val: {counts})"
    out.append(Finding("manifest", not problems, "; ".join(problems + [msg])))
    return out


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _thumbnail(path: str, num_frames: int) -> np.ndarray | None:
    """4 frames at 16x16 greyscale, [0, 1]: enough to recognise a copy, cheap to compare."""
    try:
        idx = segment_indices(int(num_frames), 4, 1, train=False)
        frames = decode_frames(path, idx, size=(16, 16)).astype(np.float32).mean(axis=3) / 255.0  # (4, 16, 16)
    except VideoError:
        return None
    return frames.reshape(-1)


def check_leak(manifest: Manifest, tolerance: float = 3.0 / 255) -> list[Finding]:
    train, val = manifest.split("train"), manifest.split("val")
    tp, vp = [str(p) for p in train.column("path")], [str(p) for p in val.column("path")]
    same_path = sorted(set(tp) & set(vp))
    digests_t = {_file_digest(p): p for p in tp if os.path.exists(p)}
    same_bytes = [(digests_t[d], p) for p in vp if os.path.exists(p) and (d := _file_digest(p)) in digests_t and digests_t[d] != p]
    # Decoded content: near-identical thumbnails catch re-encoded or renamed copies.
    thumbs_t = [(_thumbnail(p, n), p) for p, n in zip(tp, train.column("num_frames"))]
    thumbs_v = [(_thumbnail(p, n), p) for p, n in zip(vp, val.column("num_frames"))]
    thumbs_t = [(t, p) for t, p in thumbs_t if t is not None]
    thumbs_v = [(t, p) for t, p in thumbs_v if t is not None]
    same_frames = []
    if thumbs_t and thumbs_v:
        a = np.stack([t for t, _ in thumbs_t])  # (Nt, D)
        b = np.stack([t for t, _ in thumbs_v])  # (Nv, D)
        for j in range(len(b)):
            # Worst of the 4 frames: a copy matches on every frame, a similar scene rarely does.
            diff = np.abs(a - b[j]).reshape(len(a), 4, -1).mean(axis=2).max(axis=1)
            i = int(diff.argmin())
            if diff[i] <= tolerance and thumbs_t[i][1] != thumbs_v[j][1]:
                same_frames.append((thumbs_t[i][1], thumbs_v[j][1]))
    known = {v for _, v in same_bytes}
    same_frames = [(t, v) for t, v in same_frames if v not in known]
    findings = []
    for p in same_path:
        findings.append(Finding("leak", False, f"{p} is in both train and val"))
    for t, v in same_bytes:
        findings.append(Finding("leak", False, f"val {v} has the same bytes as train {t}"))
    for t, v in same_frames:
        findings.append(Finding("leak", False, f"val {v} decodes to the same frames as train {t}"))
    if not findings:
        findings.append(Finding("leak", True, f"no train/val overlap by path, bytes or decoded frames ({len(tp)} train, {len(vp)} val)"))
    return findings


def check_static(manifest: Manifest, cfg: TrialConfig, sample: int = 16, seed: int = 0) -> Finding:
    ds = ClipDataset(manifest, cfg.data, train=False)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(ds), size=min(sample, len(ds)), replace=False)
    static = 0
    for i in rows:
        clip, _, _ = ds[int(i)]  # (C, T, H, W)
        if clip.shape[1] > 1 and float((clip[:, 1:] - clip[:, :-1]).abs().max()) < 1e-3:
            static += 1
    frac = static / max(1, len(rows))
    ok = frac <= 0.5
    msg = f"{static}/{len(rows)} sampled clips have identical frames"
    if not ok:
        msg += " (the decoder may return one frame for every index; try the PyAV backend or re-encode)"
    return Finding("static", ok, msg)


def check_inputs(manifest: Manifest, cfg: TrialConfig, batches: int = 2) -> Finding:
    ds = ClipDataset(manifest.split("train"), cfg.data, train=True, seed=cfg.train.seed)
    n = min(len(ds), batches * cfg.train.batch_size)
    x = torch.stack([ds[i][0] for i in range(n)])  # (N, C, T, H, W)
    problems = []
    if not torch.isfinite(x).all():
        problems.append(f"{int((~torch.isfinite(x)).sum())} NaN/inf values")
    finite = x[torch.isfinite(x)]
    mean, std, lo, hi = float(finite.mean()), float(finite.std()), float(finite.min()), float(finite.max())
    if std < 1e-6:
        problems.append("every value is the same (constant tensors)")
    if max(abs(lo), abs(hi)) > 50 or abs(mean) > 10:
        problems.append("values far outside a normalised range (check data.mean/std: they are in [0, 1] units)")
    return Finding("inputs", not problems, "; ".join(problems + [f"{n} clips: mean {mean:.2f}, std {std:.2f}, range [{lo:.2f}, {hi:.2f}]"]))


def check_overfit(manifest: Manifest, cfg: TrialConfig, steps: int = 40, batch: int = 8) -> Finding:
    from vidtune.train import build_optimizer

    recipe = get_recipe(cfg.recipe)
    torch.manual_seed(cfg.train.seed)
    part = manifest.split("train")
    ds = recipe.make_dataset(part, cfg, train=False)
    rows = np.random.default_rng(0).choice(len(ds), size=min(batch, len(ds)), replace=False)
    items = [ds[int(i)] for i in rows]
    x = torch.stack([it[0] for it in items])
    y = default_collate([it[1] for it in items])  # class ids, or a recipe's target tensors
    model = recipe.build_model(cfg, manifest.num_classes)
    loss_fn = recipe.build_loss(cfg, part.class_counts())
    extras = recipe.prepare(cfg, part, tempfile.gettempdir())
    recipe.setup(loss_fn, {"train": extras, "val": extras}, part)
    extra = {k: v[torch.as_tensor([it[2] for it in items])] for k, v in extras.items()}
    optimizer = build_optimizer(model, cfg)
    model.train()
    losses = []
    part_name = recipe.overfit_part
    for _ in range(steps):
        loss, parts = loss_fn(model(x), y, extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        judged = parts[part_name] if part_name in parts else loss
        losses.append(float(judged.detach()))
    first, last = losses[0], min(losses[-5:])
    ok = math.isfinite(last) and last <= 0.5 * first
    what = f"{part_name} loss" if part_name in parts else "loss"
    msg = f"{what} on one batch of {len(rows)} clips {first:.3f} -> {last:.3f} in {steps} steps (lr {cfg.train.lr:g})"
    if not ok:
        msg += ": the model, loss or optimiser cannot fit it (wiring broken, or lr far off)"
    return Finding("overfit", ok, msg)


def chance_level(metric: str, manifest: Manifest) -> float | None:
    if metric in ("val_top1", "val_mean_class_acc", "val_f1_macro"):
        return 1.0 / manifest.num_classes
    if metric == "val_auc":
        return 0.5
    return None


class _PilotPassed(Exception):
    pass


# The pilot's learner: a small 3D CNN that learns motion classes in a few epochs on CPU. The
# recipe's own model is checked by `overfit`; the pilot asks only whether the clips, as this space
# samples them, carry their labels. Recipe models can be slow starters (report 004's AdamW at 5e-5
# on a randomly initialised MobileViT needs far longer than a pilot), which says nothing of the data.
PILOT_MODEL = {"arch": "cnn3d", "widths": [16, 32, 64], "pool": "max", "dropout": 0.2}
PILOT_TRAIN = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.01, "schedule": "constant", "warmup_pct": 0.0,
               "accumulate": 1, "clip_grad_norm": 0.0, "label_smoothing": 0.0, "precision": "fp32", "ema_decay": 0.0}


def pilot_config(cfg: TrialConfig, epochs: int) -> TrialConfig:
    """``cfg``'s data settings with the pilot's reference learner."""
    overrides = {"recipe": "classify", "options": {}, "model": dict(PILOT_MODEL),
                 "train.epochs": epochs, "train.early_stop_patience": 0, "train.batch_size": min(16, cfg.train.batch_size * cfg.train.accumulate)}
    known = cfg.to_dict()["train"]
    overrides.update({f"train.{k}": v for k, v in PILOT_TRAIN.items() if k in known})
    pilot = cfg.with_overrides(overrides)
    pilot.metric, pilot.mode = "val_mean_class_acc", "max"  # robust to imbalance: a majority guess scores 1/K
    return pilot


def check_chance(manifest: Manifest, cfg: TrialConfig, epochs: int = 15, max_train: int = 240) -> Finding:
    """Train a reference learner briefly on a class-stratified subset of the clips as the space
    samples them; it must beat chance clearly.

    The pilot stops as soon as it clears the bar, so a healthy pipeline costs a few epochs and
    only a broken one runs the whole budget.
    """
    from vidtune.train import fit

    rng = np.random.default_rng(0)
    train = manifest.split("train")
    labels = train.column("label")
    per_class = max(2, max_train // max(1, manifest.num_classes))
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:per_class] for k in range(manifest.num_classes)])
    split = manifest.table.column("split").to_numpy(zero_copy_only=False)
    train_rows = np.flatnonzero(split == "train")[np.sort(keep)]
    rows = np.sort(np.concatenate([train_rows, np.flatnonzero(split == "val")]))
    subset = Manifest(manifest.table.take(rows), manifest.class_names)
    pilot = pilot_config(cfg, epochs)
    metric = pilot.metric
    val_counts = subset.class_counts("val")
    n_val = int(val_counts.sum())
    k = manifest.num_classes
    chance = 1.0 / k
    # Standard deviation of a balanced accuracy at chance: (1/K^2) sum_k p(1-p)/n_k, p = 1/K.
    sigma = math.sqrt(sum(chance * (1 - chance) / max(1, int(n)) for n in val_counts) / k**2)
    margin = max(0.05, 3 * sigma)  # three standard deviations above chance
    best = {"value": 0.0, "epoch": 0}

    def report(metrics: dict, _checkpoint: str) -> None:
        if metrics[metric] > best["value"]:
            best["value"] = metrics[metric]
        best["epoch"] = metrics["epoch"]
        if best["value"] >= chance + margin:
            raise _PilotPassed

    with tempfile.TemporaryDirectory(prefix="vidtune-pilot-") as work:
        try:
            fit(pilot, subset, work, report=report, log=lambda _m: None)
        except _PilotPassed:
            pass
    value = best["value"]
    ok = value >= chance + margin
    steps = best["epoch"] * math.ceil(len(train_rows) / pilot.train.batch_size)
    msg = (f"pilot val mean class acc {value:.2f} vs chance {chance:.2f} (needs {chance + margin:.2f}) "
           f"after {steps} steps on {len(train_rows)} train / {n_val} val clips")
    if ok:
        return Finding("chance", True, msg)
    if sigma > DECISIVE_SIGMA:
        # Too few val clips per class to tell a slow start from a broken pipeline: say so, don't block.
        return Finding("chance", True, msg + f": inconclusive, the val set is too small to tell (+-{sigma:.2f} at chance)", "warn")
    return Finding("chance", False, msg + ": labels may not match the videos (shuffled or misaligned labels)")


DECISIVE_SIGMA = 0.06  # val sets noisier than this cannot fail the chance check, only warn


def run_preflight(cfg: TrialConfig, manifest: Manifest, log=print, pilot: bool = True, pilot_epochs: int = 15) -> list[Finding]:
    """Every check, in order; cheap ones first. Returns all findings (logged as they come)."""
    findings: list[Finding] = []

    def add(items):
        for f in items if isinstance(items, list) else [items]:
            findings.append(f)
            log(f.line())

    add(check_manifest(manifest))
    add(check_leak(manifest))
    add(check_static(manifest, cfg))
    inputs = check_inputs(manifest, cfg)
    add(inputs)
    if not inputs.ok:
        return findings  # training on broken inputs would only repeat the finding
    add(check_overfit(manifest, cfg, batch=get_recipe(cfg.recipe).overfit_batch))
    if pilot and get_recipe(cfg.recipe).pilot_metric is None:
        add(Finding("chance", True, f"pilot skipped ({cfg.recipe} reports no class accuracy to hold against chance)", "warn"))
    elif pilot:
        add(check_chance(manifest, cfg, epochs=pilot_epochs))
    else:
        add(Finding("chance", True, "pilot skipped (smoke test)", "warn"))
    return findings


def failed(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if not f.ok and f.level != "warn"]


def raise_if_failed(findings: list[Finding]) -> None:
    bad = failed(findings)
    if bad:
        names = sorted({f.check for f in bad})
        raise PreflightError(f"preflight failed ({', '.join(names)}): {bad[0].line()}"
                             + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
                             + "; fix the data or pass --skip-preflight")
