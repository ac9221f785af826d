"""What a sweep adds per trial: `vidtune sweep`'s machinery (Ray Tune trial actors, OptunaSearch,
ASHA, per-epoch reports and checkpoints, the MLflow callback writing a SQLite store) against the very
same trainable -- vidtune's fit() on the same configurations -- run back to back in this process.

The sweep runs one trial at a time (max_concurrent 1) on a small quickstart-style space whose
searched keys (lr, weight decay, dropout) do not change the compute, with ASHA's grace period at the
full budget so every trial runs every epoch; the in-process runs then do exactly the same work.
Both read the decoded-clip cache the sweep built. Fixed costs (Ray start, data, cache, MLflow parent
run) are reported apart.

    python bench/trial_overhead.py [--quick]

The last line is one JSON object: overhead_s_per_trial = (Tune wall time - in-process time) / trials.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import finish, make_set, parse_args  # noqa: E402


def main() -> None:
    args = parse_args(__doc__)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    trials, epochs = (4, 2) if args.quick else (8, 3)
    root = args.workdir or tempfile.mkdtemp(prefix="vidtune-bench-")
    manifest_path = make_set(root, 4, 6 if args.quick else 10, seed=0)
    space = {
        "name": "overhead",
        "recipe": "classify",
        "data": {"path": manifest_path},
        "fixed": {
            "data": {"num_segments": 8, "decode_short_side": 72, "crop_size": 64, "hflip": 0.0, "num_workers": 0},
            "model": {"arch": "cnn3d", "widths": [8, 16, 32], "dropout": 0.2},
            "train": {"epochs": epochs, "batch_size": 8, "lr": 0.005, "weight_decay": 0.05, "precision": "fp32"},
        },
        "space": {
            "train.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
            "train.weight_decay": {"type": "float", "low": 1e-4, "high": 0.1, "log": True},
            "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
        },
        "tune": {"metric": "val_top1", "mode": "max", "num_samples": trials, "max_concurrent": 1, "seed": 0,
                 "asha": {"grace_period": epochs, "reduction_factor": 2}},
        "resources": {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0},
    }
    space_path = os.path.join(root, f"overhead-{os.getpid()}.yaml")
    with open(space_path, "w") as f:
        yaml.safe_dump(space, f)
    storage = os.path.join(root, f"ray_results-{os.getpid()}")
    print(f"{trials} trials x {epochs} epochs, one at a time, 1 CPU each; load {os.getloadavg()[0]:.2f}")

    import ray

    t0 = time.perf_counter()
    # A private local Ray (address="local"): never join a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=True, configure_logging=False,
             log_to_driver=False)
    ray_init_s = time.perf_counter() - t0

    from vidtune.sweep import SweepOptions, run_sweep

    t0 = time.perf_counter()
    summary = run_sweep(SweepOptions(space=space_path, tracking_uri=f"sqlite:///{root}/mlflow-{os.getpid()}.db",
                                     storage=storage, skip_preflight=True))
    sweep_call_s = time.perf_counter() - t0
    ray.shutdown()
    tune_s = float(summary["wall_s"])
    assert summary["completed"] == trials, summary

    # The same trainable in this process: fit() on the base config with the sweep's cache.
    import torch

    from vidtune.data.manifest import read_manifest
    from vidtune.space import load_space
    from vidtune.train import fit

    os.environ["VIDTUNE_CACHE_DIR"] = os.path.join(storage, "cache")
    torch.set_num_threads(1)  # what the trial driver gives a 1-CPU trial
    base = load_space(space_path).base
    manifest = read_manifest(manifest_path)
    quiet = lambda _m: None  # noqa: E731
    fit(base, manifest, os.path.join(root, "warm"), log=quiet)  # imports and kernels, as a warm process has
    t0 = time.perf_counter()
    for k in range(trials):
        cfg = base.with_overrides({"train.lr": 1e-3 * (k + 1), "model.dropout": 0.1 * k})
        fit(cfg, manifest, os.path.join(root, f"inproc-{os.getpid()}-{k}"), log=quiet)
    inproc_s = time.perf_counter() - t0

    overhead = (tune_s - inproc_s) / trials
    print(f"sweep: Tune part {tune_s:.1f} s, whole run_sweep call {sweep_call_s:.1f} s, Ray start {ray_init_s:.1f} s")
    print(f"same trainable in-process: {inproc_s:.1f} s ({inproc_s / trials:.1f} s a trial)")
    print(f"overhead per trial: {overhead:.2f} s; fixed per sweep: {sweep_call_s - tune_s + ray_init_s:.1f} s")
    finish({
        "overhead_s_per_trial": round(overhead, 2),
        "tune_wall_s": round(tune_s, 1),
        "inprocess_s": round(inproc_s, 1),
        "fixed_s_per_sweep": round(sweep_call_s - tune_s + ray_init_s, 1),
        "trials": trials,
        "epochs": epochs,
        "quick": args.quick,
    })


if __name__ == "__main__":
    main()
