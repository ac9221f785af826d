"""Search efficiency: epochs spent until the best validation metric reaches a target, ASHA + TPE
(vidtune's sweep: OptunaSearch with a seeded TPESampler, ASHAScheduler on `epoch`) against random
search with full budgets, both through real Ray Tune, over several seeds.

The tuning problem is synthetic so that hundreds of trials take seconds: a trial "trains" for up to
27 epochs and reports a validation accuracy from an analytic learning curve. Its final value peaks
at lr 10^-2.5, weight decay 10^-3 and dropout 0.25 (a smooth bowl in log space, like real lr/wd
sensitivity); bad configurations also learn more slowly, so early epochs rank trials roughly as
late ones do (the premise of ASHA), and every epoch carries seeded noise. Each run stops as soon as
any reported value reaches the target (0.75; chance 0.2, best 0.95; about 3% of random
configurations reach it). Epochs are counted over all
trials in the order Tune receives their results.

    python bench/sweep_efficiency.py [--quick]

The last line is one JSON object: efficiency_ratio = mean random epochs / mean ASHA+TPE epochs.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import finish, parse_args  # noqa: E402

MAX_EPOCHS = 27
TARGET = 0.75  # ~3% of the space reaches it (Monte Carlo over the prior): a typical "good trial" rate
MAX_TRIALS = 400


def quality(lr: float, weight_decay: float, dropout: float) -> float:
    z = ((math.log10(lr) + 2.5) / 1.0) ** 2 + ((math.log10(weight_decay) + 3.0) / 2.0) ** 2 + ((dropout - 0.25) / 0.4) ** 2
    return math.exp(-z)  # (0, 1]


def curve(q: float, epoch: int, noise: float) -> float:
    final = 0.2 + 0.75 * q
    tau = 2.0 + 6.0 * (1.0 - q)  # bad configurations learn slowly too
    return 0.2 + (final - 0.2) * (1.0 - math.exp(-epoch / tau)) + noise


def trainable(config: dict) -> None:
    from ray import tune

    q = quality(config["lr"], config["weight_decay"], config["dropout"])
    rng = np.random.default_rng(abs(hash((config["lr"], config["weight_decay"], config["dropout"]))) % 2**32)
    for epoch in range(1, MAX_EPOCHS + 1):
        tune.report({"epoch": epoch, "val_top1": curve(q, epoch, float(rng.normal(0, 0.01)))})


def run(method: str, seed: int, storage: str) -> tuple[int, int, bool]:
    """(epochs until the target, trials started, reached)."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator
    from ray.tune.search.optuna import OptunaSearch

    space = {"lr": tune.loguniform(1e-5, 1.0), "weight_decay": tune.loguniform(1e-6, 1e-1), "dropout": tune.uniform(0.0, 0.7)}

    class Counter(tune.Callback):
        def __init__(self):
            self.epochs, self.reached_at, self.trials = 0, None, 0

        def on_trial_start(self, iteration, trials, trial, **info):
            self.trials += 1

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.epochs += 1
            if self.reached_at is None and result["val_top1"] >= TARGET:
                self.reached_at = self.epochs

    class StopAtTarget(tune.Stopper):
        def __init__(self, counter):
            self.counter = counter

        def __call__(self, trial_id, result):
            return False

        def stop_all(self):
            return self.counter.reached_at is not None

    counter = Counter()
    if method == "asha_tpe":
        search = OptunaSearch(space=_optuna_space(), metric="val_top1", mode="max",
                              sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=10))
        scheduler = ASHAScheduler(time_attr="epoch", max_t=MAX_EPOCHS, grace_period=1, reduction_factor=3)
        param_space = {}
    else:
        search = BasicVariantGenerator(random_state=seed)  # random sampling of the same space
        scheduler = FIFOScheduler()  # every trial runs its full budget
        param_space = space
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.5}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric="val_top1", mode="max", search_alg=search, scheduler=scheduler,
                                    num_samples=MAX_TRIALS, max_concurrent_trials=4, reuse_actors=True),
        run_config=tune.RunConfig(name=f"{method}-{seed}", storage_path=storage, callbacks=[counter],
                                  stop=StopAtTarget(counter), verbose=0),
    )
    tuner.fit()
    reached = counter.reached_at is not None
    return (counter.reached_at if reached else counter.epochs), counter.trials, reached


def _optuna_space():
    import optuna

    return {"lr": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True),
            "weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-1, log=True),
            "dropout": optuna.distributions.FloatDistribution(0.0, 0.7)}


def main() -> None:
    args = parse_args(__doc__)
    import logging

    import ray

    # Trials the stopper never let start are listed one warning each at the end: noise here.
    logging.getLogger("ray.tune").setLevel(logging.ERROR)
    seeds = [0, 1, 2] if args.quick else [0, 1, 2, 3, 4, 5]
    storage = os.path.join(args.workdir or tempfile.mkdtemp(prefix="vidtune-bench-"), "tune")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # A private local Ray (address="local"): never join a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False,
             log_to_driver=False)
    print(f"target val_top1 {TARGET} (chance 0.2, best 0.95), max {MAX_EPOCHS} epochs a trial; seeds {seeds}; "
          f"load {os.getloadavg()[0]:.2f}")
    out: dict[str, list] = {"asha_tpe": [], "random": []}
    t0 = time.perf_counter()
    for seed in seeds:
        for method in ("asha_tpe", "random"):
            epochs, trials, reached = run(method, seed, storage)
            out[method].append(epochs)
            print(f"seed {seed} {method:8s}: {epochs:5d} epochs, {trials:3d} trials"
                  + ("" if reached else f" (target not reached in {MAX_TRIALS} trials)"))
    ray.shutdown()
    ratio = float(np.mean(out["random"]) / np.mean(out["asha_tpe"]))
    per_seed = [r / a for r, a in zip(out["random"], out["asha_tpe"])]
    print(f"mean epochs to target: ASHA+TPE {np.mean(out['asha_tpe']):.0f}, random {np.mean(out['random']):.0f} "
          f"-> {ratio:.2f}x (per seed {', '.join(f'{x:.1f}' for x in per_seed)}); {time.perf_counter() - t0:.0f} s")
    finish({
        "efficiency_ratio": round(ratio, 2),
        "asha_tpe_epochs": out["asha_tpe"],
        "random_epochs": out["random"],
        "median_seed_ratio": round(float(np.median(per_seed)), 2),
        "target": TARGET,
        "quick": args.quick,
    })


if __name__ == "__main__":
    main()
