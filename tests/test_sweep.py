"""End-to-end: a real local Ray cluster, a real SQLite MLflow store, real encoded videos."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from vidtune.preflight import PreflightError
from vidtune.sweep import SweepOptions, run_sweep

TINY_SPACE = {
    "name": "tiny",
    "recipe": "classify",
    "fixed": {
        "data": {"num_segments": 4, "crop_size": 32, "decode_short_side": 40, "hflip": 0.0, "num_workers": 0},
        "model": {"arch": "cnn3d", "widths": [8, 16], "pool": "max"},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.005},
    },
    "space": {
        "train.lr": {"type": "float", "low": 1.0e-3, "high": 2.0e-2, "log": True},
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5},
    },
    "tune": {"metric": "val_top1", "mode": "max", "num_samples": 3, "max_concurrent": 2, "seed": 0,
             "asha": {"grace_period": 1, "reduction_factor": 2}},
    "resources": {"workers": 1, "cpus_per_worker": 1},
}


def write_space(tmp_path, **patch) -> str:
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    for key, value in patch.items():
        node = space
        *parents, last = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / f"{space['name']}.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "vidtune", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_sweep_tracks_every_trial_then_promote_and_predict(ray_cluster, tiny_set, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = run_sweep(SweepOptions(space=write_space(tmp_path), data=tiny_set, tracking_uri=uri,
                                     storage=str(tmp_path / "ray"), experiment="tiny-exp", skip_preflight=True))
    assert summary["trials"] == 3 and summary["failed"] == 0
    assert summary["completed"] + summary["pruned"] == 3 and summary["completed"] >= 1

    c = client(uri)
    exp = c.get_experiment_by_name("tiny-exp")
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("vidtune.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("vidtune.role") == "trial"]
    assert len(parents) == 1 and len(trials) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["vidtune.best_run_id"] in {t.info.run_id for t in trials}
    assert parent.data.metrics["best_val_top1"] == pytest.approx(summary["best_value"])

    first_point = {"train.lr": "0.005", "model.dropout": "0.2"}
    assert any({k: t.data.params[k] for k in first_point} == first_point for t in trials)  # baseline evaluated
    for t in trials:
        tags = t.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id and tags["vidtune.trial_id"]
        assert t.info.status == "FINISHED"
        assert set(t.data.params) >= {"train.lr", "model.dropout"}
        history = c.get_metric_history(t.info.run_id, "val_top1")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, len(steps) + 1))  # one value per epoch, nothing logged twice
        for name in ("train_loss", "val_loss", "val_top5", "val_mean_class_acc", "val_f1_macro"):
            assert len(c.get_metric_history(t.info.run_id, name)) == len(steps), name
        # ASHA-stopped trials are pruned, trials that ran their budget are completed.
        assert tags["vidtune.trial_status"] == ("completed" if len(steps) == 2 else "pruned")
        files = {os.path.basename(a.path) for a in c.list_artifacts(t.info.run_id, "checkpoint")}
        assert {"model.pt", "config.json", "labels.json"} <= files

    # No placement group stays reserved after a sweep whose trials Tune stopped.
    from ray.util import placement_group_table

    assert not [pg for pg in placement_group_table().values() if pg["state"] == "CREATED"]

    out = cli("promote", "--experiment", "tiny-exp", "--tracking-uri", uri, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "models:/tiny-exp@champion" in out.stdout
    version = c.get_model_version_by_alias("tiny-exp", "champion")
    assert version.tags["vidtune.run_id"] == parent.data.tags["vidtune.best_run_id"] or version.tags["vidtune.metric"] == "val_top1"
    from vidtune.data.manifest import read_manifest

    videos = list(read_manifest(tiny_set).column("path")[:2])
    out = cli("predict", "--model", "models:/tiny-exp@champion", *videos, "--top-k", "2", "--tracking-uri", uri, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.strip().splitlines()]
    assert [x["video"] for x in lines] == videos
    assert all(len(x["top_k"]) == 2 and x["top_k"][0]["label"] in read_manifest(tiny_set).class_names for x in lines)


def test_failing_trial_is_marked_and_the_sweep_goes_on(ray_cluster, tiny_set, tmp_path):
    # The second point's learning rate blows the weights up: its loss becomes NaN.
    path = write_space(
        tmp_path,
        **{"space/train.lr": {"type": "categorical", "choices": [0.005, 1.0e38]},
           "fixed/train/optimizer": "sgd", "fixed/train/schedule": "constant", "fixed/train/warmup_pct": 0.0,
           "extra_points": [{"train.lr": 1.0e38}], "tune/num_samples": 2, "tune/asha/grace_period": 2},
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = run_sweep(SweepOptions(space=path, data=tiny_set, tracking_uri=uri, storage=str(tmp_path / "ray"),
                                     skip_preflight=True))
    assert summary["failed"] == 1 and summary["completed"] == 1
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("tiny").experiment_id], "tags.`vidtune.role` = 'trial'")
    failed = [r for r in runs if r.data.tags["vidtune.trial_status"] == "failed"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert "training loss became nan" in failed[0].data.tags["vidtune.failure_reason"]
    assert float(failed[0].data.params["train.lr"]) == 1e38


def test_trial_still_at_chance_after_the_grace_period_is_tagged(ray_cluster, tiny_set, tmp_path):
    path = write_space(
        tmp_path,
        **{"space/train.lr": {"type": "categorical", "choices": [0.005, 1.0e-12]}, "fixed/train/schedule": "constant",
           "fixed/train/warmup_pct": 0.0, "extra_points": [{"train.lr": 1.0e-12}], "tune/num_samples": 2},
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_sweep(SweepOptions(space=path, data=tiny_set, tracking_uri=uri, storage=str(tmp_path / "ray"), skip_preflight=True))
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("tiny").experiment_id], "tags.`vidtune.role` = 'trial'")
    frozen = [r for r in runs if float(r.data.params["train.lr"]) == 1e-12]
    assert len(frozen) == 1 and frozen[0].data.tags["vidtune.at_chance"] == "true"
    assert all(r.data.tags.get("vidtune.at_chance") in ("true", "false") for r in runs)


def test_trial_larger_than_the_cluster_is_refused_before_it_starts(ray_cluster, tiny_set, tmp_path):
    path = write_space(tmp_path, **{"resources/workers": 2, "resources/cpus_per_worker": 1})
    with pytest.raises(ValueError, match=r"one trial needs 2 x \(1.0 CPU, 0.0 GPU\) \+ a driver but the cluster has 2.0 CPU"):
        run_sweep(SweepOptions(space=path, data=tiny_set, tracking_uri=f"sqlite:///{tmp_path}/m.db", storage=str(tmp_path / "r"),
                               skip_preflight=True))


def test_multi_worker_trial_runs_ddp_through_ray_train(ray_cluster, tiny_set, tmp_path):
    path = write_space(tmp_path, **{"resources/workers": 2, "resources/cpus_per_worker": 0.5, "tune/num_samples": 1,
                                    "fixed/train/epochs": 1})
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = run_sweep(SweepOptions(space=path, data=tiny_set, tracking_uri=uri, storage=str(tmp_path / "ray"),
                                     skip_preflight=True))
    assert summary["completed"] == 1, summary
    from ray.util import placement_group_table

    # The worker group's placement group is released when the sweep returns (none left reserved).
    assert not [pg for pg in placement_group_table().values() if pg["state"] == "CREATED"]
    c = client(uri)
    run = c.get_run(summary["best_run_id"])
    assert "val_top1" in run.data.metrics
    files = {os.path.basename(a.path) for a in c.list_artifacts(run.info.run_id, "checkpoint")}
    assert "model.pt" in files


def test_launch_script_smoke_test_end_to_end(tiny_set, tmp_path):
    """`python launch/sweep.py --smoke-test` (what `ray submit` runs) in a fresh process and Ray."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, os.path.join(repo, "launch", "sweep.py"), "--space", write_space(tmp_path), "--data", tiny_set,
         "--smoke-test", "--experiment", "smoke"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # Ray forwards trial output asynchronously: find the summary line rather than take the last.
    summary = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith('{"experiment"')))
    assert summary["trials"] == 2 and summary["failed"] == 0
    assert os.path.exists(tmp_path / "mlflow.db")  # the default store, in the working directory
    c = client(f"sqlite:///{tmp_path}/mlflow.db")
    runs = c.search_runs([c.get_experiment_by_name("smoke").experiment_id], "tags.`vidtune.role` = 'trial'")
    assert len(runs) == 2


def test_sweep_refuses_to_start_on_a_broken_pipeline(ray_cluster, tmp_path):
    """Report 002's failure: labels that do not match the videos. Caught before any trial runs."""
    import pyarrow as pa

    from vidtune.data.manifest import Manifest, read_manifest

    from vidtune.data.synth import synthesize

    m = read_manifest(synthesize(str(tmp_path / "d"), "quickstart", num_classes=4, videos_per_class=80, seed=3))
    labels = np.random.default_rng(0).permutation(m.column("label"))
    Manifest(m.table.set_column(1, "label", pa.array(labels, pa.int32())), m.class_names).save(str(tmp_path / "shuffled.parquet"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = write_space(tmp_path, **{"fixed/data/crop_size": 48, "fixed/data/decode_short_side": 56,
                                     "fixed/data/num_segments": 8, "fixed/model/widths": [16, 32, 64]})
    with pytest.raises(PreflightError, match=r"preflight failed \(chance\): chance: FAIL: pilot val mean class acc"):
        run_sweep(SweepOptions(space=space, data=str(tmp_path / "shuffled.parquet"), tracking_uri=uri, storage=str(tmp_path / "ray")))
    assert not os.path.exists(tmp_path / "ray")  # no trial, no sweep folder


ODD_NAMES = ["driver's seat", "lift (arm)", "a,b", "a_b", "R&D", "café", "走路", " walk"]


def test_any_class_name_works_in_a_sweep(ray_cluster, tiny_set, tmp_path):
    # Class names from folders: MLflow refused `val_acc/R&D` and the whole sweep died, runs left RUNNING.
    from vidtune.data.manifest import read_manifest
    from vidtune.metrics import class_keys

    m = read_manifest(tiny_set)
    by_class: dict[int, list[str]] = {}
    for path, label in zip(m.column("path"), m.column("label")):
        by_class.setdefault(int(label), []).append(path)
    data = tmp_path / "data"
    for i, name in enumerate(ODD_NAMES):
        (data / name).mkdir(parents=True)
        for j, path in enumerate(by_class[i % 4][:3]):
            os.symlink(path, data / name / f"v{j}.mp4")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = run_sweep(SweepOptions(space=write_space(tmp_path, **{"tune/num_samples": 1}), data=str(data), tracking_uri=uri,
                                     storage=str(tmp_path / "ray"), experiment="odd", max_epochs=1, skip_preflight=True))
    assert summary["trials"] == 1 and summary["failed"] == 0
    c = client(uri)
    runs = c.search_runs([c.get_experiment_by_name("odd").experiment_id])
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2
    trial = next(r for r in runs if r.data.tags.get("vidtune.role") == "trial")
    keys = class_keys(sorted(ODD_NAMES))
    assert {f"val_acc/{k}" for k in keys.values()} | {f"val_f1/{k}" for k in keys.values()} <= set(trial.data.metrics)
    assert keys["a_b"] == "a_b" and keys["a,b"] != "a_b" and keys["café"] == "café"
    labels = json.loads(open(c.download_artifacts(trial.info.run_id, "checkpoint/labels.json", str(tmp_path))).read())
    assert labels == sorted(ODD_NAMES)  # the real names
    import pandas as pd

    table = pd.read_csv(c.download_artifacts(trial.info.run_id, "per_class_metrics.csv", str(tmp_path)), keep_default_na=False)
    assert list(table["class"]) == sorted(ODD_NAMES) and list(table["metric_key"]) == [keys[n] for n in sorted(ODD_NAMES)]
    assert not os.path.exists(os.path.join(summary["sweep_dir"], "mlflow_deadletter.jsonl"))  # nothing was refused
