"""Each seed recipe's --smoke-test sweep, through real Ray and MLflow, logs the contract metrics.

The default suite shrinks the heavy parts (SlowFast width, the lip reader's channels, the CLIP
teacher) so it runs on 2 CPU cores; ``-m slow`` runs the shipped space files unchanged.
"""

from __future__ import annotations

import pytest
import yaml

from vidtune.space import default_space_path
from vidtune.sweep import SweepOptions, run_sweep

BASE = ["train_loss", "val_loss", "val_top1", "val_top5", "val_mean_class_acc", "val_f1_macro"]
CONTRACT = {
    "thermal_slowfast": BASE,
    "lipread_3dcnn": BASE,
    "anomaly_multitask": BASE + ["val_auc", "train_loss_reg", "train_loss_focal", "train_loss_mil", "train_loss_vae"],
    "distill_clip_mobilevit": BASE + ["train_loss_feat", "train_loss_resp", "train_loss_task", "student_params",
                                      "teacher_params", "student_latency_ms"],
}
SHRINK = {
    "thermal_slowfast": {"model": {"widths": [4]}, "data": {"num_segments": 8, "crop_size": 32, "decode_short_side": 40}},
    "lipread_3dcnn": {"model": {"widths": [4, 8, 8, 16], "head": [16, 8]}, "data": {"frames_per_segment": 16, "crop_size": 32,
                                                                                   "decode_short_side": 40}},
    "anomaly_multitask": {"model": {"backbone": "test_efficientnet"}, "options": {"hidden": 32, "latent": 8},
                          "data": {"num_segments": 4, "crop_size": 32, "decode_short_side": 40}},
    "distill_clip_mobilevit": {"model": {"backbone": "test_efficientnet"}, "options": {"teacher_model": "test_vit",
                               "teacher_size": 64, "embed_dim": 32}, "data": {"num_segments": 4, "crop_size": 32,
                                                                              "decode_short_side": 40}},
}


def smoke(recipe: str, tmp_path, shrink: bool, shrink_values: dict | None = None, contract: list | None = None):
    """The recipe's shipped space (shrunk with ``shrink_values``, default ``SHRINK[recipe]``) as a
    --smoke-test sweep; asserts 2 trials, each logging ``contract`` every epoch. Returns
    ``(client, trial_runs)`` for recipe-specific checks."""
    with open(default_space_path(recipe)) as f:
        raw = yaml.safe_load(f)
    if shrink:
        for section, values in (shrink_values or SHRINK[recipe]).items():
            raw["fixed"].setdefault(section, {}).update(values)
    raw["fixed"]["data"]["num_workers"] = 0
    raw["resources"]["cpus_per_worker"] = 1  # two trials at once on the 2-CPU test cluster
    path = tmp_path / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(raw))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = run_sweep(SweepOptions(space=str(path), smoke_test=True, tracking_uri=uri, storage=str(tmp_path / "ray"),
                                     data_root=str(tmp_path / "data")))
    assert summary["trials"] == 2 and summary["failed"] == 0, summary

    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name(recipe).experiment_id], "tags.`vidtune.role` = 'trial'")
    assert len(runs) == 2
    for run in runs:
        missing = [m for m in (contract or CONTRACT[recipe]) if m not in run.data.metrics]
        assert not missing, f"{recipe} run lacks {missing}"
        assert [m.step for m in c.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    return c, runs


@pytest.mark.parametrize("recipe", sorted(CONTRACT))
def test_recipe_smoke_sweep_logs_contract_metrics(recipe, ray_cluster, tmp_path):
    smoke(recipe, tmp_path, shrink=True)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(CONTRACT))
def test_shipped_space_smoke_sweep(recipe, ray_cluster, tmp_path):
    smoke(recipe, tmp_path, shrink=False)
