"""The sweep: Ray Tune + Optuna (TPE) + ASHA over a space file, every trial tracked in MLflow.

One Tune trial = one driver function (``trial_driver``). A single-worker trial trains in the
driver's own process (a Train worker group would add ~10 s per trial and nothing else); a
multi-worker trial launches a ``TorchTrainer`` whose workers run DDP and report every epoch to
Tune through ``TuneReportCallback``. ASHA reads ``epoch`` (which we report ourselves, so it
survives ``Tuner.restore``). ``MlflowTrialCallback`` runs in this process and is the only MLflow
writer: per-epoch metrics, end states and best checkpoints of every trial, wherever it ran.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

from vidtune.config import TrialConfig
from vidtune.data.manifest import DataError, Manifest, load_data, read_manifest
from vidtune.space import SweepSpace, default_space_path, load_space
from vidtune.storage import StorageError, SweepStorage
from vidtune.tracking import (
    Outbox,
    SweepTracker,
    TrackingError,
    check_tracking,
    numeric_metrics,
    resolve_tracking_uri,
)


@dataclass
class SweepOptions:
    space: str | None = None
    data: str | None = None
    num_samples: int | None = None
    max_epochs: int | None = None
    experiment: str | None = None
    tracking_uri: str | None = None
    storage: str | None = None
    address: str | None = None
    resume: bool = False
    smoke_test: bool = False
    optuna_storage: str | None = None
    skip_preflight: bool = False
    data_root: str = "data"  # where embedded synthetic sets are written (relative to cwd)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def prepare_data(space: SweepSpace, data: str | None, data_root: str, smoke: bool = False) -> Manifest:
    """``--data``, else the space's data, else its synthetic set (written on first use)."""
    if data:
        return load_data(data, progress=True)
    if space.data.path:
        return load_data(space.data.path, progress=True)
    synth = dict(space.data.synthetic or {"recipe": "quickstart"})
    if smoke:
        synth["videos_per_class"] = min(int(synth.get("videos_per_class", 8)), 8)
    return synthetic_manifest(synth, data_root)


def synthetic_manifest(synth: dict, data_root: str) -> Manifest:
    from vidtune.data.synth import synthesize

    recipe = synth.get("recipe", "quickstart")
    classes, per_class, seed = synth.get("classes"), int(synth.get("videos_per_class", 40)), int(synth.get("seed", 0))
    import hashlib

    from vidtune.data.synth import profile

    # The profile's own fingerprint in the name: a set written by an older profile is not reused.
    look = hashlib.sha1(repr(profile(recipe, classes)).encode()).hexdigest()[:6]
    folder = os.path.abspath(os.path.join(data_root, f"{recipe}-c{classes or 'd'}-v{per_class}-s{seed}-{look}"))
    manifest = os.path.join(folder, "manifest.parquet")
    if not os.path.exists(manifest):
        print(f"writing synthetic data set {recipe!r} to {folder}")
        synthesize(folder, recipe, classes, per_class, seed, progress=True)
    return read_manifest(manifest)


# ----------------------------------------------------------------------------------------------
# The per-trial driver (runs inside a Tune trial actor)
# ----------------------------------------------------------------------------------------------
def trial_driver(config: dict, ctx: dict) -> None:
    """One trial. Tune restarts a trial whose process died (from its last checkpoint); an error
    the trial raised itself (NaN loss, bad config, bad data) would only repeat, so it is written
    down (by whichever process raised it, see ``train.remember_failure``) and raised again at
    once on a restart instead of training again."""
    from ray import tune

    from vidtune.train import FAILED_MARK, TrialFailed, remember_failure

    store: SweepStorage = ctx["store"]
    work_dir = store.path(ctx["trials_rel"], tune.get_context().get_trial_id())
    store.pull_trial(work_dir)  # a cloud --storage: what this trial left on another node, or before a restart
    TrialFailed.raise_if_marked(work_dir)
    try:
        with remember_failure(work_dir, store):
            _run_trial(config, ctx, work_dir)
    except Exception:
        store.pull(os.path.join(work_dir, FAILED_MARK), overwrite=True)  # written by a Train worker elsewhere
        TrialFailed.raise_if_marked(work_dir)  # a worker's own error, without Train's wrapping
        raise


def _run_trial(config: dict, ctx: dict, work_dir: str) -> None:
    import ray
    import torch
    from ray import tune

    from vidtune.train import fit, train_loop_per_worker

    trial_id = tune.get_context().get_trial_id()
    cfg = TrialConfig.from_dict(ctx["base"]).with_overrides(config)
    store: SweepStorage = ctx["store"]
    manifest_path, cache_dir = store.fetch_inputs(ctx["manifest_rel"], ctx["cache_files"])
    os.environ["VIDTUNE_CACHE_DIR"] = cache_dir  # frozen-model outputs shared by all trials
    res = ctx["resources"]

    if res["workers"] <= 1:
        cpus = max(1, int(res["cpus_per_worker"]))
        torch.set_num_threads(cpus)
        device = torch.device("cuda") if res["gpus_per_worker"] > 0 and torch.cuda.is_available() else torch.device("cpu")
        node = ray.get_runtime_context().get_node_id()

        def report(metrics: dict, _checkpoint_dir: str) -> None:
            # No Tune checkpoint: the trial's own `last/` (written before every report, on the
            # shared storage, or pushed to a cloud one here) is what a restarted or restored trial
            # resumes from. Tune's copy would cost a copy per epoch, and a restore can name one
            # that `num_to_keep` already deleted.
            store.push_trial(work_dir)
            tune.report({**metrics, "vidtune_nodes": node})

        from vidtune.checkpoint import resumable_dir

        fit(cfg, read_manifest(manifest_path), work_dir, report, resumable_dir(work_dir), device, num_cpus=cpus)
        return

    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": res["gpus_per_worker"]} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "trial": cfg.to_dict(),
            "manifest_rel": ctx["manifest_rel"],
            "work_rel": store.rel(work_dir),
            "store": store,
            "cpus_per_worker": res["cpus_per_worker"],
            "cache_files": ctx["cache_files"],
        },
        scaling_config=ray.train.ScalingConfig(num_workers=res["workers"], use_gpu=use_gpu, resources_per_worker=per_worker),
        # Same (storage_path, name) after a restore: the worker group resumes from its checkpoints.
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=store.for_ray(),
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=ctx["worker_failures"]),
        ),
    )
    trainer.fit()


# ----------------------------------------------------------------------------------------------
# MLflow bookkeeping, in the sweep's own process
# ----------------------------------------------------------------------------------------------
def _tune_callback_base():
    from ray import tune

    return tune.Callback


class MlflowTrialCallback(_tune_callback_base()):
    """Child run per trial: params at start, metrics every epoch (``step=epoch``), and at the end
    its status (``completed``: ran its budget or stopped early by itself; ``pruned``: stopped by
    ASHA; ``failed``: raised, with the reason), its best checkpoint as ``checkpoint/``.

    Every write goes through an ``Outbox``: while the tracking server is unreachable, trials keep
    training and their records wait (in memory and in ``<sweep>/mlflow_outbox.jsonl``)."""

    def __init__(self, tracking_uri: str, experiment: str, parent_id: str, trials_dir: str,
                 metric: str = "", at_chance_below: float | None = None, grace_period: int = 1,
                 tracker: SweepTracker | None = None, store: SweepStorage | None = None):
        self.tracking_uri, self.experiment, self.parent_id, self.trials_dir = tracking_uri, experiment, parent_id, trials_dir
        self.store = store or SweepStorage(os.path.dirname(os.path.dirname(trials_dir)))
        # A trial whose tuned metric is still under this bar at ASHA's grace period is tagged
        # vidtune.at_chance=true: a pipeline problem, not a bad hyperparameter, is the likely cause.
        self.metric, self.at_chance_below, self.grace_period = metric, at_chance_below, grace_period
        self._tracker = tracker
        self._outbox: Outbox | None = None
        self.last: dict[str, dict] = {}
        self.tagged: set[str] = set()

    def __getstate__(self):  # Tune pickles its run config for restores; the client stays behind
        state = dict(self.__dict__)
        state["_tracker"] = None
        state["_outbox"] = None
        return state

    @property
    def tracker(self) -> SweepTracker:
        if self._tracker is None:
            self._tracker = SweepTracker(self.tracking_uri, self.experiment)
            self._tracker.parent_id = self.parent_id
        return self._tracker

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            self._outbox = Outbox(self.tracker, os.path.join(os.path.dirname(self.trials_dir), "mlflow_outbox.jsonl"),
                                  store=self.store)
        return self._outbox

    def on_step_end(self, iteration, trials, **info):
        self.outbox.tick()  # retries buffered writes (at most every few seconds while down)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.outbox.put("start", trial.trial_id, params=trial.config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        if result.get("vidtune_replayed"):
            return  # a finished trial's last epoch, repeated after a restart: already logged
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        tags = {}
        if trial.trial_id not in self.tagged and result.get("vidtune_nodes"):
            tags["vidtune.nodes"] = str(result["vidtune_nodes"])  # Ray node ids the trial's workers ran on
            self.tagged.add(trial.trial_id)
        value = result.get(self.metric)
        if self.at_chance_below is not None and epoch == self.grace_period and value is not None:
            tags["vidtune.at_chance"] = str(value < self.at_chance_below).lower()
        self.outbox.put("epoch", trial.trial_id, params=trial.config, metrics=numeric_metrics(result), step=epoch, tags=tags)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self.last.get(trial.trial_id) or trial.last_result or {}
        status = "completed" if last.get("vidtune_finished") else "pruned"
        self._end(trial, status)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "failed", failure_reason(trial))

    def _end(self, trial, status: str, reason: str | None = None) -> None:
        self.outbox.put("end", trial.trial_id, params=trial.config, status=status, reason=reason,
                        checkpoint_dir=os.path.join(self.trials_dir, trial.trial_id, "best"))


def failure_reason(trial) -> str:
    """One line saying why a trial failed (the innermost exception, not Ray's wrapping)."""
    error = None
    with contextlib.suppress(Exception):
        error = trial.get_pickled_error()
    text = str(error) if error is not None else ""
    if not text and trial.error_file and os.path.exists(trial.error_file):
        with open(trial.error_file) as f:
            text = f.read()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line.split(":", 1)[0] or "Exception" in line.split(":", 1)[0]:
            return line[:1000]
    return (lines[-1] if lines else "unknown error")[:1000]


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
DRIVER_CPU = 0.01  # what a multi-worker trial's driver reserves; it only waits on its workers
WORKER_FAILURES = 2  # restarts of a trial (or of its worker group) after a process or node dies


def _concurrency(space: SweepSpace, cluster: dict) -> int:
    """How many trials the cluster holds at once, so no trial waits forever for its workers."""
    res = space.resources
    per_trial_cpu = res.workers * res.cpus_per_worker + (DRIVER_CPU if res.workers > 1 else 0.0)
    fits = int(cluster.get("CPU", 1) // per_trial_cpu) if per_trial_cpu else 1
    if res.gpus_per_worker > 0:
        fits = min(fits, int(cluster.get("GPU", 0) // (res.workers * res.gpus_per_worker)))
    if fits < 1:
        raise ValueError(
            f"resources: one trial needs {res.workers} x ({res.cpus_per_worker} CPU, {res.gpus_per_worker} GPU)"
            f"{' + a driver' if res.workers > 1 else ''} "
            f"but the cluster has {cluster.get('CPU', 0)} CPU and {cluster.get('GPU', 0)} GPU"
        )
    if space.tune.max_concurrent:
        fits = min(fits, space.tune.max_concurrent)
    return max(1, fits)


def _apply_options(space: SweepSpace, opts: SweepOptions) -> SweepSpace:
    if opts.smoke_test:
        space.tune.num_samples = 2
        epochs = min(2, space.base.train.epochs)
        space.base = space.base.with_overrides({"train.epochs": epochs})
        space.tune.asha.max_t = epochs
    if opts.num_samples:
        space.tune.num_samples = opts.num_samples
    if opts.max_epochs:
        space.base = space.base.with_overrides({"train.epochs": opts.max_epochs})
        space.tune.asha.max_t = opts.max_epochs
    return space


def _probe_paths(paths: list[str], store: SweepStorage | None = None) -> list[str]:
    missing = [p for p in paths if not os.path.exists(p)]
    if store is not None:
        try:
            store.check()
        except StorageError as e:
            missing.append(str(e))
    return missing


def check_shared_storage(store: SweepStorage, sweep_dir: str, video: str | None) -> int:
    """On a multi-node cluster, refuse a ``--storage`` folder (or data) that some node cannot see.

    Trials on any node write checkpoints under ``storage`` and the sweep reads them back, so it
    must be one shared folder (NFS, EFS, Lustre...) or a cloud URI. A marker file written in the
    folder must show up on every alive node (a URI must be writable from every node: credentials
    and network reach); returns the number of nodes checked."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return len(nodes)
    marker = None
    if store.uri is None:
        marker = os.path.join(sweep_dir, f".probe-{uuid.uuid4().hex[:8]}")
        with open(marker, "w") as f:
            f.write("vidtune storage probe\n")
    probe = ray.remote(num_cpus=0)(_probe_paths)
    paths = ([marker] if marker else []) + ([video] if video else [])
    try:
        refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(paths, store if store.uri else None) for n in nodes}
        missing = dict(zip(refs, ray.get(list(refs.values()), timeout=120)))
    finally:
        if marker:
            os.remove(marker)
    where = {n["NodeID"]: f"{n.get('NodeManagerAddress', '?')} ({n['NodeID'][:8]})" for n in nodes}
    blind = [where[node] for node, gone in missing.items() if marker in gone]
    if blind:
        raise StorageError(
            f"--storage {store.local}: not shared; {len(blind)} of {len(nodes)} nodes cannot see it "
            f"({', '.join(blind)}). On a multi-node cluster pass a folder every node mounts (NFS, EFS, Lustre) "
            "or a cloud URI (s3://...)"
        )
    cut_off = [(where[node], err) for node, gone in missing.items() for err in gone if err.startswith("--storage ")]
    if cut_off:
        raise StorageError(f"{cut_off[0][1]} (on {len(cut_off)} of {len(nodes)} nodes: {', '.join(w for w, _ in cut_off)})")
    no_data = [where[node] for node, gone in missing.items() if video in gone]
    if no_data:
        raise StorageError(f"data: {video} is not readable on {', '.join(no_data)}; every node needs the videos at the same path")
    return len(nodes)


def run_sweep(opts: SweepOptions) -> dict:
    """Run (or resume) a sweep; returns a summary with the best trial's run id and value."""
    # A failing HTTP call to the tracking server should fail in seconds, not MLflow's default
    # minutes of retries: the outbox retries on its own schedule without blocking the sweep.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    space = _apply_options(load_space(opts.space or default_space_path()), opts)
    tracking_uri = resolve_tracking_uri(opts.tracking_uri)
    check_tracking(tracking_uri)  # before any data work or trial
    experiment = opts.experiment or space.name
    store = SweepStorage(opts.storage)
    store.check()  # a cloud URI this machine cannot write fails here, before any data work
    storage = store.local  # this node's folder: the storage itself, or its mirror of a cloud URI

    manifest = prepare_data(space, opts.data, opts.data_root, opts.smoke_test)
    _describe_data(manifest)
    if manifest.skipped:
        print(f"left out {len(manifest.skipped)} unreadable videos; first: {manifest.skipped[0][0]}: {manifest.skipped[0][1]}")
    if not opts.skip_preflight and not opts.resume:
        from vidtune.preflight import raise_if_failed, run_preflight

        print("preflight (skip with --skip-preflight):")
        # A smoke test checks plumbing on a handful of videos: too few for the chance pilot.
        raise_if_failed(run_preflight(space.base, manifest, log=lambda line: print(f"  {line}"), pilot=not opts.smoke_test))

    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    if opts.resume:
        found = store.list_dirs(f"{space.name}-")
        sweep_name = found[-1] if found else ""
        if not sweep_name or not tune.Tuner.can_restore(store.location(sweep_name)):
            raise FileNotFoundError(f"--resume: no sweep of {space.name!r} to resume under {store.spec}")
        sweep_dir = store.path(sweep_name)
        for name in ("manifest.parquet", "mlflow_outbox.jsonl"):  # from wherever the sweep ran (a cloud --storage)
            store.pull(os.path.join(sweep_dir, name))
    else:
        sweep_name = f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        sweep_dir = os.path.join(storage, sweep_name)
    os.makedirs(sweep_dir, exist_ok=True)
    manifest_path = manifest.save(os.path.join(sweep_dir, "manifest.parquet")) if not opts.resume else os.path.join(sweep_dir, "manifest.parquet")
    store.push(manifest_path)
    trials_dir = os.path.join(sweep_dir, "trials")
    cache_dir = os.path.join(storage, "cache")  # beside every sweep: reused across sweeps of the same data

    # What does not change across trials is computed once here, not once per trial.
    from vidtune.recipes import get_recipe

    clip_cache_mb = 0.0
    if space.base.data.cache and "://" not in cache_dir:
        from vidtune.data.cache import build_clip_cache

        # Decoded clips for the baseline's sampling; trials that search the decode size or the
        # sampling build theirs on first use (once, under the cache's lock).
        clip_cache_mb = round(build_clip_cache(manifest, space.base.data, cache_dir).num_bytes / 2**20, 1)
        print(f"clip cache: {clip_cache_mb} MB of decoded clips under {cache_dir} (`data.cache: false` turns it off)")
    warmed = get_recipe(space.recipe).warm_cache(space.base, manifest, cache_dir)
    cache_files = []
    if warmed:
        print(f"cache: {warmed.get('cache')} ({'computed' if warmed.get('computed') else 'reused'})")
        if store.uri:
            for path in warmed.get("files") or [warmed["cache"]]:
                store.push(path)  # trials on other nodes fetch it instead of computing it again
                cache_files.append(store.rel(path))

    if not ray.is_initialized():
        # Faster Train reports (the controller polls workers; 2 s by default) for multi-worker trials.
        env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")}
        # No --address: a private local Ray, never whatever `ray start` left on this machine (Ray's
        # own default would join it). `--address auto` or RAY_ADDRESS joins a running cluster.
        address = opts.address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True, configure_logging=False)
    nodes = check_shared_storage(store, sweep_dir, str(manifest.column("path")[0]) if len(manifest) else None)
    if nodes > 1:
        print(f"storage {store.spec}: " + (f"reachable from all {nodes} nodes" if store.uri else f"shared by all {nodes} nodes"))
    concurrency = _concurrency(space, ray.cluster_resources())

    tracker = SweepTracker(tracking_uri, experiment)
    parent_id = tracker.start_sweep(
        sweep_name, space.tune.metric, space.tune.mode,
        {"space": space.path, "recipe": space.recipe, "num_samples": space.tune.num_samples,
         "max_epochs": space.base.train.epochs, "data_fingerprint": manifest.fingerprint(),
         "clip_cache_mb": clip_cache_mb,
         "num_classes": manifest.num_classes, "concurrency": concurrency},
        resume=opts.resume,
    )
    from vidtune.preflight import chance_level

    chance = chance_level(space.tune.metric, manifest)
    n_val = max(1, int(manifest.class_counts("val").sum()))
    at_chance_below = None if chance is None else chance + max(0.05, 3 * math.sqrt(chance * (1 - chance) / n_val))
    callback = MlflowTrialCallback(tracking_uri, experiment, parent_id, trials_dir, space.tune.metric, at_chance_below,
                                   min(space.tune.asha.grace_period, space.tune.asha.max_t or space.base.train.epochs),
                                   tracker=tracker, store=store)
    if opts.resume and len(callback.outbox):
        print(f"delivering {len(callback.outbox)} MLflow records kept from the interrupted sweep")
        callback.outbox.flush(force=True)
    # From here MLflow writes go out from a background thread: Tune's loop only queues them.
    callback.outbox.start()
    ctx = {
        "base": space.base.to_dict(),
        "store": store,
        "manifest_rel": store.rel(manifest_path),
        "trials_rel": store.rel(trials_dir),
        "cache_files": cache_files,
        "resources": vars(space.resources),
        "worker_failures": WORKER_FAILURES,
    }
    res = space.resources
    if res.workers <= 1:
        trial_resources = {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker}
    else:
        # The driver only waits on its worker group: a near-zero request avoids the deadlock where
        # drivers hold every CPU and no worker can start.
        trial_resources = {"cpu": DRIVER_CPU}
        if res.driver_resource:
            trial_resources[res.driver_resource] = DRIVER_CPU
    trainable = tune.with_resources(tune.with_parameters(trial_driver, ctx=ctx), trial_resources)

    # Keeping one checkpoint per trial forces a state snapshot on every report; Tune then warns on
    # every epoch of every trial, burying the progress table.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    t0 = time.time()
    if opts.resume:
        tuner = tune.Tuner.restore(store.location(sweep_name), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        startup = space.tune.tpe_startup_trials or max(1, space.tune.num_samples // 3)
        # With the space given here, Tune's set_search_properties skips the searcher: it needs
        # metric and mode too (TuneConfig still needs them for the scheduler).
        from vidtune.optuna_search import HonestOptunaSearch

        # ASHA-stopped trials are told to Optuna as PRUNED (Ray's OptunaSearch says COMPLETE).
        searcher = HonestOptunaSearch(
            space=space.params,
            metric=space.tune.metric,
            mode=space.tune.mode,
            points_to_evaluate=space.points,
            sampler=optuna.samplers.TPESampler(seed=space.tune.seed, n_startup_trials=startup),
            storage=optuna.storages.RDBStorage(opts.optuna_storage) if opts.optuna_storage else None,
            study_name=sweep_name,
            warm_start_prefix=f"{space.name}-",  # earlier sweeps of this space in --optuna-storage
        )
        max_t = space.tune.asha.max_t or space.base.train.epochs
        scheduler = ASHAScheduler(
            time_attr="epoch",
            max_t=max_t,
            grace_period=min(space.tune.asha.grace_period, max_t),
            reduction_factor=space.tune.asha.reduction_factor,
        )
        from vidtune.report_callback import ProgressCallback, ReportRefreshCallback

        refresher = ReportRefreshCallback(tracking_uri, experiment, parent_id)  # parent run's plots, as trials finish
        progress = ProgressCallback(space.tune.metric, space.tune.mode, space.tune.num_samples, concurrency)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.tune.metric,
                mode=space.tune.mode,
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=space.tune.num_samples,
                max_concurrent_trials=concurrency,
                # A new trial in a fresh actor re-imports torch, timm and torchvision (~3-6 s on 2
                # cores); reusing finished trials' actors skips it. fit() sets its own seeds/state.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=sweep_name,
                storage_path=store.for_ray(),
                callbacks=[callback, refresher, progress],
                # A trial whose process dies (node lost, OOM-killed) restarts from its last
                # checkpoint; an error of the trial itself is not retried (see trial_driver).
                failure_config=tune.FailureConfig(max_failures=WORKER_FAILURES),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                verbose=1,
            ),
        )
    pgs_before = _live_placement_groups()
    results = tuner.fit()
    wall = time.time() - t0
    released = _release_placement_groups(pgs_before)
    if released:
        print(f"released {released} placement groups left reserved by finished trials")

    # Everything the trials reported reaches MLflow before the sweep is closed; a server still
    # down keeps the records in the outbox file for `--resume` to deliver.
    if not callback.outbox.drain(float(os.environ.get("VIDTUNE_MLFLOW_DRAIN_S", "300"))):
        store.push(callback.outbox.path)  # for a --resume from another machine
        raise TrackingError(
            f"{tracking_uri}: tracking server unreachable at the end of the sweep; {len(callback.outbox)} records are "
            f"kept in {callback.outbox.path}; run the same command with --resume once it is back to deliver them"
        )
    if callback.outbox.refused:
        store.push(callback.outbox.deadletter_path)
        print(f"{callback.outbox.refused} records MLflow refused are in {callback.outbox.deadletter_path}")
    closed = _close_open_trial_runs(tracker, parent_id, results, trials_dir, store)
    if closed:
        print(f"closed {closed} trial runs left open by an interrupted sweep")
    best_run, best_value = tracker.end_sweep(space.tune.metric, space.tune.mode)
    from vidtune.report import publish_sweep_report

    publish_sweep_report(tracker.client, experiment, parent_id)  # plots/, trials.parquet, summary.md; never raises
    counts = {"completed": 0, "pruned": 0, "failed": 0}
    for run in tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000):
        status = run.data.tags.get("vidtune.trial_status")
        if status in counts:
            counts[status] += 1
    summary = {
        "experiment": experiment,
        "experiment_id": tracker.experiment_id,
        "sweep": sweep_name,
        "sweep_dir": store.location(sweep_name),
        "parent_run_id": parent_id,
        "tracking_uri": tracking_uri,
        "metric": space.tune.metric,
        "best_run_id": best_run,
        "best_value": best_value,
        "trials": len(results),
        "wall_s": round(wall, 1),
        **counts,
    }
    errors = [r.error for r in results if r.error is not None]
    if errors:
        summary["failure_reasons"] = sorted({str(e).strip().splitlines()[-1][:200] for e in errors})
    return summary


def _close_open_trial_runs(tracker: SweepTracker, parent_id: str, results, trials_dir: str, store: SweepStorage) -> int:
    """End trial runs still RUNNING once Tune is done (the sweep process was killed between a
    trial's end and its MLflow record), with the status Tune's own record gives; and give a run to
    a trial Tune knows but MLflow never heard of (its records died in the outbox file of a driver
    machine that is gone): its epochs come from the trial's own history in the storage.

    A trial that started just before the sweep process died, after Tune's last snapshot of the
    experiment, is unknown to the restored sweep (which samples a new trial in its place): its run
    is tagged ``vidtune.orphaned`` and moved to MLflow's deleted runs (restorable), so the
    experiment holds exactly one run per trial of the sweep."""
    trials = {t.trial_id: t for t in getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []}
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000)
    known = {run.data.tags.get("vidtune.trial_id", "") for run in runs}
    to_close = [(run.info.run_id, run.data.tags.get("vidtune.trial_id", "")) for run in runs if run.info.status == "RUNNING"]
    to_close += [(tracker.start_trial(tid, trial.config), tid) for tid, trial in trials.items() if tid not in known]
    for run_id, trial_id in to_close:
        trial = trials.get(trial_id)
        if trial is None and trials:
            tracker.client.set_tag(run_id, "vidtune.orphaned", "true")
            tracker.end_trial(run_id, "failed", "orphaned: the sweep process died before Ray Tune recorded this "
                              "trial; the resumed sweep ran a new trial in its place")
            tracker.client.delete_run(run_id)
            print(f"trial run {run_id} ({trial_id}) orphaned by the interrupted sweep: moved to deleted runs")
            continue
        last = (trial.last_result if trial is not None else None) or {}
        if trial is not None and trial.status == "ERROR":
            status, reason = "failed", failure_reason(trial)
        else:
            status, reason = ("completed" if last.get("vidtune_finished") else "pruned"), None
        store.pull_finished_trial(os.path.join(trials_dir, trial_id))
        tracker.end_trial(run_id, status, reason, os.path.join(trials_dir, trial_id, "best"))
    return len(to_close)


def _live_placement_groups() -> set[str]:
    from ray.util import placement_group_table

    return {pid for pid, pg in placement_group_table().items() if pg["state"] in ("CREATED", "PENDING", "RESCHEDULING")}


def _release_placement_groups(before: set[str], wait_s: float = 20.0) -> int:
    """Train V2 frees a finished worker group's placement group asynchronously, and has been seen
    to leave one reserved for good (its CPUs then starve every later trial). Once the sweep is over,
    wait briefly for Ray to release what the sweep's trials created, then remove what remains."""
    import ray
    from ray.util import placement_group_table
    from ray.util.placement_group import PlacementGroup

    deadline = time.time() + wait_s
    while True:
        left = _live_placement_groups() - before
        if not left or time.time() > deadline:
            break
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(Exception):
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pid))))
    return len([pid for pid in left if placement_group_table().get(pid, {}).get("state") == "REMOVED"])


def _describe_data(manifest: Manifest) -> None:
    train, val = manifest.class_counts("train"), manifest.class_counts("val")
    if train.sum() == 0 or val.sum() == 0:
        raise DataError(f"data: {int(train.sum())} train and {int(val.sum())} val videos; both splits are needed")
    ratio = train.max() / max(1, train[train > 0].min()) if (train > 0).any() else math.inf
    print(f"data: {manifest.num_classes} classes, {int(train.sum())} train / {int(val.sum())} val videos, imbalance {ratio:.1f}:1")
