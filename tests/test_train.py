from __future__ import annotations

import math
import os

import pytest
import torch

from vidtune.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vidtune.config import TrialConfig
from vidtune.data.manifest import read_manifest
from vidtune.predict import Predictor
from vidtune.train import NonFiniteLossError, build_scheduler, fit, resolve_precision

SMALL = {
    "data": {"num_segments": 4, "crop_size": 48, "decode_short_side": 56, "hflip": 0.0, "num_workers": 0},
    "model": {"arch": "cnn3d", "widths": [8, 16, 32], "pool": "max"},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.005},
}


def small_cfg(**overrides) -> TrialConfig:
    return TrialConfig.from_dict(SMALL).with_overrides(overrides)


def test_fit_reports_every_epoch_and_writes_checkpoints(tiny_set, tmp_path):
    reports = []
    summary = fit(small_cfg(), read_manifest(tiny_set), str(tmp_path), report=lambda m, d: reports.append((m, d)))
    assert [m["epoch"] for m, _ in reports] == [1, 2]
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "val_mean_class_acc", "val_f1_macro", "best_val_top1"):
        assert all(key in m for m, _ in reports), key
    assert [m["vidtune_finished"] for m, _ in reports] == [0, 1]
    assert summary["epochs"] == 2 and summary["stop_reason"] == "max_epochs"
    best = load_checkpoint(os.path.join(tmp_path, "best"))
    assert best["class_names"] == read_manifest(tiny_set).class_names
    assert best["info"]["epoch"] == summary["best_epoch"]
    assert best["info"]["details"]["confusion_matrix"]
    last = load_checkpoint(reports[-1][1], with_train_state=True)
    assert last["train_state"]["epoch"] == 2


def test_resume_continues_from_the_checkpoint(tiny_set, tmp_path):
    m = read_manifest(tiny_set)
    cfg = small_cfg(**{"train.epochs": 3})
    first = []
    with pytest.raises(KeyboardInterrupt):  # a trial killed after its first epoch
        fit(cfg, m, str(tmp_path / "a"), report=lambda mm, d: (first.append(mm), (_ for _ in ()).throw(KeyboardInterrupt)))
    resumed = []
    fit(cfg, m, str(tmp_path / "b"), report=lambda mm, d: resumed.append(mm), resume_dir=str(tmp_path / "a" / "last"))
    assert [r["epoch"] for r in resumed] == [2, 3]
    # Same schedule position: the resumed run's lr at epoch 2 equals an uninterrupted run's.
    straight = []
    fit(cfg, m, str(tmp_path / "c"), report=lambda mm, d: straight.append(mm))
    assert resumed[0]["lr"] == pytest.approx(straight[1]["lr"])


def test_nan_loss_stops_the_trial_with_a_reason(tiny_set, tmp_path):
    cfg = small_cfg(**{"train.optimizer": "sgd", "train.lr": 1e38, "train.schedule": "constant", "train.warmup_pct": 0.0})
    with pytest.raises(NonFiniteLossError, match="training loss became nan at epoch 1"):
        fit(cfg, read_manifest(tiny_set), str(tmp_path))


def test_early_stopping_and_accumulation_and_clipping(tiny_set, tmp_path):
    cfg = small_cfg(**{"train.epochs": 6, "train.early_stop_patience": 1, "train.lr": 1e-7, "train.accumulate": 2,
                       "train.clip_grad_norm": 1.0, "train.schedule": "cosine"})
    summary = fit(cfg, read_manifest(tiny_set), str(tmp_path))
    assert summary["stop_reason"] == "early_stop" and summary["epochs"] < 6


def test_training_learns_the_quickstart_motions(quick_set, tmp_path):
    cfg = TrialConfig.from_dict(
        {
            "data": {"hflip": 0.0, "num_workers": 0, "scale_min": 0.7},
            "model": {"arch": "cnn3d", "widths": [16, 32, 64], "pool": "max"},
            "train": {"epochs": 8, "batch_size": 16, "lr": 0.005},
        }
    )
    summary = fit(cfg, read_manifest(quick_set), str(tmp_path))
    assert summary["best"] >= 0.6  # chance is 1/4; the classes differ only by motion direction


def test_checkpoint_errors_name_the_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a vidtune checkpoint"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text('{"format": "other"}')
    (tmp_path / "labels.json").write_text("[]")
    with pytest.raises(CheckpointError, match="format 'other'"):
        load_checkpoint(str(tmp_path))
    good = save_checkpoint(str(tmp_path / "ok"), {"w": torch.ones(2)}, small_cfg().to_dict(), ["a"])
    (tmp_path / "ok" / "model.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="unreadable weights"):
        load_checkpoint(good)


def test_predictor_loads_a_checkpoint(tiny_set, tmp_path):
    m = read_manifest(tiny_set)
    fit(small_cfg(**{"train.epochs": 1}), m, str(tmp_path))
    predictor = Predictor(str(tmp_path / "best"))
    top = predictor.predict(m.column("path")[0], top_k=3)
    assert len(top) == 3 and all(name in m.class_names for name, _ in top)
    assert abs(sum(s for _, s in predictor.predict(m.column("path")[0], top_k=10)) - 1.0) < 1e-4


def test_precision_and_schedules():
    assert resolve_precision("fp32", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_precision("auto", torch.device("cpu")) is None  # bf16 conv3d grads can be NaN on CPU
    for schedule in ("onecycle", "cosine", "constant"):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = build_scheduler(opt, small_cfg(**{"train.schedule": schedule, "train.lr": 0.1}), total_steps=20)
        lrs = []
        for _ in range(20):
            opt.step()
            sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        assert max(lrs) <= 0.1 + 1e-9
        if schedule != "constant":
            assert lrs[-1] < 0.02


@pytest.mark.parametrize("warmup_pct", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant", "step"])
def test_every_schedule_runs_for_any_step_count(schedule, warmup_pct):
    # 10 steps at warmup 0.1 and 100 at 0 crashed torch's OneCycleLR (ZeroDivisionError), and a
    # 1-step onecycle trial trained at lr / 250000 only.
    for total in (1, 2, 3, 4, 5, 7, 10, 11, 100):
        cfg = small_cfg(**{"train.schedule": schedule, "train.warmup_pct": warmup_pct, "train.lr": 0.1,
                           "train.step_size": 1})
        opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
                                 {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01}])
        sched = build_scheduler(opt, cfg, total_steps=total)
        lrs = []
        for _ in range(total):  # the lr each optimiser step uses, then the loop's scheduler.step()
            lrs.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
        for group, peak in enumerate((0.1, 0.01)):
            seen = [step[group] for step in lrs]
            assert all(math.isfinite(v) and v > 0 for v in seen), (total, seen)
            assert max(seen) == pytest.approx(peak, rel=1e-6), (total, seen)
        peak_step = max(range(total), key=lambda i: lrs[i][0])
        if schedule == "onecycle" and round(warmup_pct * total) >= 2:  # a warm-up of 2+ steps starts low
            assert lrs[0][0] == pytest.approx(0.1 / cfg.train.onecycle_div) and peak_step == round(warmup_pct * total) - 1
        if schedule in ("onecycle", "cosine") and total >= 3 and warmup_pct <= 0.5:
            assert lrs[-1][0] < 0.1  # and it anneals after the peak


def test_schedule_settings_that_cannot_work_are_refused():
    from vidtune.config import ConfigError

    with pytest.raises(ConfigError, match="step_size: must be >= 1"):
        small_cfg(**{"train.step_size": 0})
    with pytest.raises(ConfigError, match="onecycle_div: must be >= 1"):
        small_cfg(**{"train.onecycle_div": 0.0})


def test_dataloader_workers_give_the_same_metrics_as_in_process_decoding(tiny_set, tmp_path):
    m = read_manifest(tiny_set)
    runs = {}
    for workers in (0, 1):
        got = []
        fit(small_cfg(**{"train.epochs": 1, "data.num_workers": workers}), m, str(tmp_path / str(workers)),
            report=lambda mm, d: got.append(mm))
        runs[workers] = got[0]
    # Per-sample randomness is keyed by (seed, epoch, index), not by the process that decodes.
    assert runs[0]["train_loss"] == pytest.approx(runs[1]["train_loss"], rel=1e-4)
    assert runs[0]["val_top1"] == runs[1]["val_top1"]
