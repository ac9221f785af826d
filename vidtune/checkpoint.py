"""Checkpoint folders: what a trial's best epoch leaves behind and ``predict`` loads.

A checkpoint folder holds ``model.pt`` (a state dict, loadable with ``weights_only=True``),
``config.json`` (the resolved trial config, the recipe, the epoch and its metrics) and
``labels.json`` (the class names, in label order). ``state.pt`` (optimiser, scheduler, scaler,
early-stopping state) is added to the rolling "last" checkpoint used for resuming.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

FORMAT = "vidtune-checkpoint/1"


class CheckpointError(ValueError):
    """A folder or file that is not a usable vidtune checkpoint; names the path."""


def save_checkpoint(
    directory: str,
    model_state: dict,
    config: dict,
    class_names: list[str],
    info: dict | None = None,
    train_state: dict | None = None,
) -> str:
    """Write atomically: readers (the tracker, a resuming trial) never see a half-written folder."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ckpt-", dir=parent)
    torch.save(model_state, os.path.join(tmp, "model.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"format": FORMAT, "config": config, **(info or {})}, f, indent=1, default=float)
    with open(os.path.join(tmp, "labels.json"), "w") as f:
        json.dump(list(class_names), f)
    if train_state is not None:
        torch.save(train_state, os.path.join(tmp, "state.pt"))
    if os.path.exists(directory):
        old = f"{directory}.old-{os.getpid()}"
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
    return directory


def load_checkpoint(directory: str, with_train_state: bool = False) -> dict:
    """``{"model": state_dict, "config": dict, "class_names": list, "info": dict[, "train_state"]}``."""
    meta_path = os.path.join(directory, "config.json")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a checkpoint folder")
    if not os.path.exists(meta_path):
        raise CheckpointError(f"{directory}: not a vidtune checkpoint (no config.json)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        with open(os.path.join(directory, "labels.json")) as f:
            class_names = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory}: not a vidtune checkpoint ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{directory}: not a vidtune checkpoint (format {meta.get('format')!r}, expected {FORMAT!r})")
    try:
        # weights_only: a checkpoint from elsewhere cannot run code when loaded.
        model = torch.load(os.path.join(directory, "model.pt"), map_location="cpu", weights_only=True)
        train_state = (
            torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)
            if with_train_state and os.path.exists(os.path.join(directory, "state.pt"))
            else None
        )
    except Exception as e:
        raise CheckpointError(f"{directory}: unreadable weights ({str(e).splitlines()[0][:200]})") from None
    info = {k: v for k, v in meta.items() if k not in ("format", "config")}
    out = {"model": model, "config": meta["config"], "class_names": class_names, "info": info}
    if with_train_state:
        out["train_state"] = train_state
    return out


def resumable_dir(work_dir: str) -> str | None:
    """A trial's own ``last/`` when it holds training state to resume from, else None. Written
    before every report on the shared storage, it is never older than what Ray or MLflow saw."""
    last = os.path.join(work_dir, "last")
    return last if os.path.exists(os.path.join(last, "state.pt")) else None
