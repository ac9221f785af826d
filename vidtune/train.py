"""The training loop, usable alone (``fit``) and under Ray Train (``train_loop_per_worker``).

``fit`` reads top to bottom: data, model, optimiser and schedule, resume, then per epoch a
mixed-precision train pass with gradient accumulation and clipping, a validation pass whose
predictions are gathered from every rank, the best-epoch checkpoint, early stopping, and one
``report(metrics, checkpoint_dir)`` call. It knows nothing of Ray or MLflow: callers pass
``report``. Under Ray Train the process group is already up and ``fit`` wraps the model in DDP.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset

from vidtune.checkpoint import load_checkpoint, save_checkpoint
from vidtune.config import TrialConfig
from vidtune.data.cache import open_clip_cache
from vidtune.data.dataset import WeightedDistributedSampler, augment_batch, class_balanced_weights, normalize_batch
from vidtune.data.manifest import DataError, Manifest, read_manifest
from vidtune.ema import WeightEma
from vidtune.recipes import get_recipe

Report = Callable[[dict, str], None]  # (metrics, rolling checkpoint folder) -> None


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the trial cannot recover."""


HISTORY = "history.jsonl"  # in a trial's work dir: one line of metrics per epoch
FAILED_MARK = "failed.txt"  # in a trial's work dir: the trial's own error, not worth a retry


class TrialFailed(RuntimeError):
    """A trial's own error, raised again on a restart instead of training again."""

    @staticmethod
    def raise_if_marked(work_dir: str) -> None:
        mark = os.path.join(work_dir, FAILED_MARK)
        if os.path.exists(mark):
            with open(mark) as f:
                raise TrialFailed(f.read())


@contextlib.contextmanager
def remember_failure(work_dir: str, store=None):
    """Write errors that would only repeat (NaN loss, bad config or data, a missing metric) to
    ``work_dir``: Ray restarts a failed worker group or trial, which is right when a process or
    node died and wasted when the trial itself is broken."""
    from vidtune.config import ConfigError

    try:
        yield
    except (NonFiniteLossError, ConfigError, DataError, KeyError, ValueError) as e:
        os.makedirs(work_dir, exist_ok=True)
        with open(os.path.join(work_dir, FAILED_MARK), "w") as f:
            f.write(f"{type(e).__name__}: {e}")
        if store is not None:  # a cloud --storage: the mark must reach a restart on any node
            store.push(os.path.join(work_dir, FAILED_MARK))
        raise


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = fp32)."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # CPU: fp32. bf16 autocast is faster on CPUs with AVX512-BF16/AMX, but torch 2.14's CPU conv3d
    # returns NaN weight gradients in bf16 for some small shapes (seen: SlowFast's slow pathway,
    # T=2, 4x4, 16 channels), so it is opt-in per space (`precision: bf16`) where a recipe was checked.
    return None


def build_optimizer(model: torch.nn.Module, cfg: TrialConfig) -> torch.optim.Optimizer:
    # A recipe may give its parts their own learning rates (e.g. adapters vs. detection head).
    groups = get_recipe(cfg.recipe).param_groups(model, cfg)
    if groups is None:
        # Norm weights and biases are not decayed: decaying them only hurts small-data training.
        decay, no_decay = [], []
        for p in model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrialConfig, total_steps: int):
    """The lr schedule, stepped once per optimiser step. For any total of one or more steps every
    step's lr is positive and one of them runs at the peak (each group's own ``lr``)."""
    t = cfg.train
    total_steps = max(1, total_steps)
    if t.schedule == "onecycle":
        # The peak falls on a whole step: torch's OneCycleLR divides by zero when its warm-up ends
        # exactly on step 0 (warmup_pct x total == 1, e.g. 10 steps at 0.1) or one step short of
        # the end, and with a handful of steps it never reaches the peak at all.
        peak_step = min(max(0, round(t.warmup_pct * total_steps) - 1), total_steps - 1)
        if 1 <= peak_step <= total_steps - 2:
            return torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
                pct_start=(peak_step + 1) / total_steps, div_factor=t.onecycle_div,
            )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _onecycle_factor(peak_step, total_steps, t.onecycle_div, step))
    if t.schedule == "step":
        # Decays every `step_size` epochs; the scheduler steps per optimiser step.
        per_epoch = max(1, total_steps // max(1, t.epochs))
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_size * per_epoch, gamma=t.step_gamma)
    warmup = int(t.warmup_pct * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _onecycle_factor(peak_step: int, total_steps: int, div: float, step: int) -> float:
    """OneCycleLR's curve (cosine up from 1/div to the peak, cosine down to 1/(div * 1e4)) for the
    totals it cannot take: no warm-up step, or no step left after the peak."""
    def cos_between(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2.0 * (math.cos(math.pi * min(1.0, pct)) + 1.0)

    if step <= peak_step:
        return cos_between(1.0 / div, 1.0, step / peak_step if peak_step else 1.0)
    anneal = total_steps - 1 - peak_step
    return cos_between(1.0, 1.0 / (div * 1e4), (step - peak_step) / anneal if anneal else 1.0)


def auto_num_workers(num_cpus: int | None) -> int:
    # One CPU: decoding in the training process beats a worker it would have to share the core with.
    cpus = num_cpus or os.cpu_count() or 1
    return 0 if cpus <= 1 else min(8, cpus - 1)


def _is_better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def fit(
    cfg: TrialConfig,
    manifest: Manifest,
    work_dir: str,
    report: Report | None = None,
    resume_dir: str | None = None,
    device: torch.device | None = None,
    num_cpus: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``cfg`` on ``manifest``'s train split, validating on its val split every epoch.

    Writes ``work_dir/best`` (the best epoch by ``cfg.metric``) and ``work_dir/last`` (everything
    needed to resume). Returns a summary: best value and epoch, epochs run, why it stopped.
    """
    recipe = get_recipe(cfg.recipe)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = device or torch.device("cpu")
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    np.random.seed(cfg.train.seed + rank)

    # --- Data: each rank reads its share of train and val; samplers reshuffle every epoch.
    train_part, val_part = manifest.split("train"), manifest.split("val")
    if len(train_part) == 0 or len(val_part) == 0:
        raise DataError(f"the data has {len(train_part)} train and {len(val_part)} val videos; both splits are needed")
    class_names = manifest.class_names
    # Decoded clips shared by every trial (built before the sweep; on first use otherwise). Without
    # $VIDTUNE_CACHE_DIR (fit() called alone) or with data.cache off, clips are decoded every epoch.
    clip_cache = open_clip_cache(manifest, cfg.data, log=log if rank == 0 else (lambda _m: None))
    # On CUDA the loader ships uint8 clips and the device normalises them.
    on_device = cfg.data.device_transforms == "on" or (cfg.data.device_transforms == "auto" and device.type == "cuda")
    # The device's flips: their own stream, seeded per rank, so a run repeats exactly.
    flips = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank) if on_device else None
    train_ds = recipe.make_dataset(train_part, cfg, train=True, cache=clip_cache, normalise=not on_device)
    val_ds = recipe.make_dataset(val_part, cfg, train=False, cache=clip_cache, normalise=not on_device)
    if cfg.data.sampler_power > 0:
        weights = class_balanced_weights(train_ds.labels, cfg.data.sampler_power)
        sampler = WeightedDistributedSampler(weights, len(train_ds), rank, world, cfg.train.seed)
    else:
        sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    workers = cfg.data.num_workers if cfg.data.num_workers >= 0 else auto_num_workers(num_cpus)
    loader_kwargs = dict(
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        # Forked loader workers inside Ray actors inherit threads and locks; forkserver is safe.
        multiprocessing_context="forkserver" if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
    )
    per_rank = math.ceil(len(train_ds) / world)
    train_loader = DataLoader(
        train_ds, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=per_rank > cfg.train.batch_size, **loader_kwargs
    )
    val_loader = DataLoader(Subset(val_ds, range(rank, len(val_ds), world)), batch_size=cfg.train.batch_size, **loader_kwargs)

    # --- Model, loss, optimiser, schedule, mixed precision.
    model = recipe.build_model(cfg, len(class_names)).to(device)
    core = model
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = recipe.build_loss(cfg, train_part.class_counts())  # (outputs, labels, extra) -> (loss, parts)
    # Per-row targets a recipe computes once per data set (e.g. a frozen teacher's outputs).
    extras = {name: recipe.prepare(cfg, part, work_dir) for name, part in (("train", train_part), ("val", val_part))}
    recipe.setup(loss_fn, extras, train_part)
    static = recipe.static_metrics(model, cfg)
    optimizer = build_optimizer(core, cfg)
    # Validation and the best checkpoint use the weights' moving average when train.ema_decay > 0.
    ema = WeightEma(core, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.accumulate)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch * cfg.train.epochs)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # --- Resume: weights, optimiser, schedule and early-stopping state from the last checkpoint.
    start_epoch, best, best_epoch, stale = 1, None, 0, 0
    if resume_dir:
        ckpt = load_checkpoint(resume_dir, with_train_state=True)
        core.load_state_dict(ckpt["model"])
        state = ckpt["train_state"] or {}
        if state:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            if ema is not None and state.get("ema"):
                ema.load_state_dict(state["ema"])
            start_epoch, best, best_epoch, stale = state["epoch"] + 1, state["best"], state["best_epoch"], state["stale"]
        log(f"resumed from {resume_dir} at epoch {start_epoch}")
        last_metrics = dict((ckpt.get("info") or {}).get("metrics") or {})
        patience = cfg.train.early_stop_patience
        done = start_epoch > cfg.train.epochs or bool(patience and stale >= patience)  # under this config
        if done and last_metrics.get("vidtune_finished") and report is not None:
            # The trial had finished when its sweep died, before the sweep recorded it: say so
            # again (flagged, so its epochs are not logged twice) instead of returning silently.
            report({**last_metrics, "vidtune_replayed": 1}, resume_dir)
            return {"best": best, "best_epoch": best_epoch, "epochs": state.get("epoch", 0), "stop_reason": "replayed",
                    "best_dir": os.path.join(work_dir, "best"), "metrics": last_metrics}

    best_dir, last_dir = os.path.join(work_dir, "best"), os.path.join(work_dir, "last")
    resolved = cfg.to_dict()
    metrics: dict = {}
    stop_reason = "max_epochs"
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)

        # --- Train pass. DDP syncs gradients only on the batch that steps the optimiser.
        model.train()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        part_sums: dict[str, torch.Tensor] = {}
        seen = 0
        optimizer.zero_grad(set_to_none=True)
        for step, (clips, labels, rows) in enumerate(train_loader):
            clips = clips.to(device, non_blocking=True)  # (B, C, T, H, W)
            if on_device:
                clips = normalize_batch(augment_batch(clips, cfg.data, flips), cfg.data)
            labels = labels.to(device, non_blocking=True)
            extra = {k: v[rows].to(device, non_blocking=True) for k, v in extras["train"].items()}
            stepping = (step + 1) % cfg.train.accumulate == 0 or step + 1 == len(train_loader)
            sync = contextlib.nullcontext() if stepping or not distributed else model.no_sync()
            with sync:
                with autocast():
                    outputs = model(clips)
                loss, parts = loss_fn(outputs, labels, extra)
                scaler.scale(loss / cfg.train.accumulate).backward()
            if stepping:
                if cfg.train.clip_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.train.clip_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                if ema is not None:
                    ema.update(core)
            n = labels.shape[0]
            loss_sum += loss.detach().double() * n
            for k, v in parts.items():
                part_sums[k] = part_sums.get(k, torch.zeros((), device=device, dtype=torch.float64)) + v.detach().double() * n
            seen += n
        totals = torch.stack([loss_sum, torch.tensor(float(seen), device=device, dtype=torch.float64), *part_sums.values()])
        if distributed:
            dist.all_reduce(totals)
        train_loss = float(totals[0] / totals[1])
        if not math.isfinite(train_loss):
            # Every rank sees the same reduced value, so all of them stop together.
            raise NonFiniteLossError(f"training loss became {train_loss} at epoch {epoch} (lr {cfg.train.lr:g})")
        metrics = {"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"], **static}
        metrics.update({f"train_loss_{k}": float(v / totals[1]) for k, v in zip(part_sums, totals[2:])})

        # --- Validation pass over every rank's share, gathered so all ranks compute the same metrics.
        model.eval()
        collected: dict[str, list] = {}
        labs = []
        val_sum = torch.zeros(2, device=device, dtype=torch.float64)  # (loss * n, n)
        with torch.no_grad(), ema.applied(core) if ema is not None else contextlib.nullcontext():
            for clips, labels, rows in val_loader:
                labels = labels.to(device, non_blocking=True)
                extra = {k: v[rows].to(device, non_blocking=True) for k, v in extras["val"].items()}
                clips = clips.to(device, non_blocking=True)
                if on_device:
                    clips = normalize_batch(clips, cfg.data)
                with autocast():
                    outputs = model(clips)
                loss, _ = loss_fn(outputs, labels, extra)
                val_sum += torch.stack([loss.double() * labels.shape[0], torch.tensor(float(labels.shape[0]), device=device, dtype=torch.float64)])
                for k, v in recipe.collect(outputs).items():
                    collected.setdefault(k, []).append(v.float().cpu())
                labs.append(labels.cpu())
        gathered_out = {k: torch.cat(v) for k, v in collected.items()}
        targets = torch.cat(labs) if labs else torch.zeros(0, dtype=torch.long)
        if distributed:
            dist.all_reduce(val_sum)
            parts_all: list = [None] * world
            dist.all_gather_object(parts_all, (gathered_out, targets))
            gathered_out = {k: torch.cat([p[0][k] for p in parts_all if k in p[0]]) for k in gathered_out}
            targets = torch.cat([p[1] for p in parts_all])
        val_loss = val_sum[0] / val_sum[1].clamp(min=1)
        scalars, details = recipe.evaluate({k: v.numpy() for k, v in gathered_out.items()}, targets.numpy(), class_names)
        metrics["val_loss"] = float(val_loss)
        metrics.update(scalars)
        metrics["epoch_time_s"] = time.perf_counter() - t0

        # --- Best epoch and early stopping on the tuned metric.
        value = metrics.get(cfg.metric)
        if value is None:
            raise KeyError(f"metric {cfg.metric!r} is not reported by recipe {cfg.recipe!r}; it reports {sorted(metrics)}")
        improved = _is_better(value, best, cfg.mode)
        if improved:
            best, best_epoch, stale = value, epoch, 0
        else:
            stale += 1
        if cfg.train.early_stop_patience and stale >= cfg.train.early_stop_patience:
            stop_reason = "early_stop"
        finished = epoch == cfg.train.epochs or stop_reason == "early_stop"
        metrics[f"best_{cfg.metric}"] = best
        metrics["vidtune_finished"] = int(finished)
        if rank == 0:
            info = {"epoch": epoch, "metrics": metrics, "details": details}
            if improved:
                save_checkpoint(best_dir, ema.shadow if ema is not None else core.state_dict(), resolved, class_names, info)
            train_state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best": best,
                "best_epoch": best_epoch,
                "stale": stale,
                **({"ema": ema.state_dict()} if ema is not None else {}),
            }
            save_checkpoint(last_dir, core.state_dict(), resolved, class_names, info, train_state)
            # Every epoch's metrics, kept with the trial: a sweep interrupted between this epoch and
            # its MLflow record backfills the record from here (the trial itself resumes past it).
            with open(os.path.join(work_dir, HISTORY), "a") as f:
                f.write(json.dumps({"t": int(time.time() * 1000), **{k: v for k, v in metrics.items()
                                                                     if isinstance(v, (int, float))}}) + "\n")
            log(
                f"epoch {epoch}/{cfg.train.epochs} train_loss {train_loss:.4f} val_loss {metrics['val_loss']:.4f} "
                f"{cfg.metric} {value:.4f} (best {best:.4f} @ {best_epoch}) {metrics['epoch_time_s']:.1f}s"
            )
        if report is not None:
            report(metrics, last_dir)
        if finished:
            break
    return {
        "best": best,
        "best_epoch": best_epoch,
        "epochs": metrics.get("epoch", start_epoch - 1),
        "stop_reason": stop_reason,
        "best_dir": best_dir,
        "metrics": metrics,
    }


# ----------------------------------------------------------------------------------------------
# Ray Train adapter: the per-worker entry point for multi-worker (DDP) trials.
# ----------------------------------------------------------------------------------------------
def train_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    cfg = TrialConfig.from_dict(loop_config["trial"])
    # Paths are relative to --storage: a rank on another node has its own mirror of a cloud URI.
    store = loop_config["store"]
    work_dir = store.path(loop_config["work_rel"])
    manifest_path, cache_dir = store.fetch_inputs(loop_config["manifest_rel"], loop_config["cache_files"])
    os.environ["VIDTUNE_CACHE_DIR"] = cache_dir
    manifest = read_manifest(manifest_path)
    torch.set_num_threads(max(1, int(loop_config.get("cpus_per_worker", 1))))
    rank0 = ctx.get_world_rank() == 0
    if rank0:
        store.pull_trial(work_dir)  # history and best of earlier attempts, wherever they ran
    else:
        store.pull(os.path.join(work_dir, FAILED_MARK), overwrite=True)

    def report(metrics: dict, checkpoint_dir: str) -> None:
        # Reporting is a barrier for all ranks; only rank 0 hands over its checkpoint.
        if rank0:
            store.push_trial(work_dir)
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if rank0 else None
        ray.train.report(metrics, checkpoint=ckpt)

    TrialFailed.raise_if_marked(work_dir)
    # The node of every rank, once: shows where a trial's DDP workers ran (they may span nodes).
    nodes = [None] * ctx.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    nodes_text = ",".join(sorted(set(nodes)))

    def report_with_nodes(metrics: dict, checkpoint_dir: str) -> None:
        report({**metrics, "vidtune_nodes": nodes_text}, checkpoint_dir)

    checkpoint = ray.train.get_checkpoint()
    with remember_failure(work_dir, store), \
            checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_dir:
        fit(
            cfg,
            manifest,
            work_dir=work_dir,
            report=report_with_nodes,
            # Ray Train records a run's checkpoints as they are reported: its own is the freshest.
            resume_dir=resume_dir,
            device=ray.train.torch.get_device(),
            num_cpus=loop_config.get("cpus_per_worker"),
            log=print if rank0 else (lambda _msg: None),
        )
