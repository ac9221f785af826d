from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vidtune.config import ConfigError, ModelConfig, TrialConfig
from vidtune.data.manifest import read_manifest
from vidtune.data.synth import profile, synthesize
from vidtune.losses import focal_loss, inverse_sqrt_frequency
from vidtune.models import build_model
from vidtune.recipes import RECIPES, get_recipe
from vidtune.space import load_space
from vidtune.train import fit


# --- losses -------------------------------------------------------------------------------------
def test_focal_loss_is_cross_entropy_at_gamma_zero():
    torch.manual_seed(0)
    logits, labels = torch.randn(16, 5), torch.randint(0, 5, (16,))
    torch.testing.assert_close(focal_loss(logits, labels, gamma=0.0), F.cross_entropy(logits, labels))
    torch.testing.assert_close(
        focal_loss(logits, labels, gamma=0.0, label_smoothing=0.1), F.cross_entropy(logits, labels, label_smoothing=0.1)
    )


def test_focal_loss_matches_a_hand_computation():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 1])
    alpha = torch.tensor([0.5, 2.0, 1.0])
    p = torch.softmax(logits, 1)
    p0, p1 = float(p[0, 0]), float(p[1, 1])
    expected = (0.5 * (1 - p0) ** 2 * -math.log(p0) + 2.0 * (1 - p1) ** 2 * -math.log(p1)) / 2
    assert float(focal_loss(logits, labels, gamma=2.0, alpha=alpha)) == pytest.approx(expected, rel=1e-5)


def test_inverse_sqrt_frequency_weights_rare_classes_up():
    w = inverse_sqrt_frequency(np.array([54, 8, 2]))
    assert float(w.mean()) == pytest.approx(1.0)
    assert w[2] / w[0] == pytest.approx(math.sqrt(54 / 2), rel=1e-5)


# --- models of the reports ----------------------------------------------------------------------
def test_lipcnn_with_the_reports_settings_has_the_reports_parameter_count():
    model = build_model(ModelConfig(arch="lipcnn", widths=[64, 128, 256, 512], kernels=[7, 5, 3, 3], dropout=0.4), 5, in_channels=1)
    assert sum(p.numel() for p in model.parameters()) == 5_215_237  # report 002's count
    drops = [m.p for m in model.head if isinstance(m, torch.nn.Dropout)]
    assert drops == pytest.approx([0.4, 0.2, 0.12])


def test_width_mult_scales_every_conv_width():
    report = ModelConfig(arch="lipcnn", widths=[64, 128, 256, 512], kernels=[7, 5, 3, 3])
    quarter = build_model(ModelConfig(arch="lipcnn", widths=[64, 128, 256, 512], kernels=[7, 5, 3, 3], width_mult=0.25), 5, in_channels=1)
    convs = [m.out_channels for m in quarter.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs == [16, 32, 64, 128] and report.scaled_widths() == [64, 128, 256, 512]
    assert quarter(torch.randn(1, 1, 8, 32, 32)).shape == (1, 5)
    cnn = build_model(ModelConfig(arch="cnn3d", widths=[16, 32, 64], width_mult=0.5), 4)
    assert [m.out_channels for m in cnn.modules() if isinstance(m, torch.nn.Conv3d)] == [8, 16, 32]
    with pytest.raises(ConfigError, match="width_mult"):
        ModelConfig(arch="cnn3d", width_mult=0)


def test_lipcnn_max_pooling_sees_a_small_blob_that_average_pooling_dilutes():
    avg = build_model(ModelConfig(arch="lipcnn", widths=[4, 4, 4, 4], kernels=[3, 3, 3, 3], head=[8, 8]), 5, in_channels=1)
    mx = build_model(ModelConfig(arch="lipcnn", widths=[4, 4, 4, 4], kernels=[3, 3, 3, 3], head=[8, 8], pool="max"), 5, in_channels=1)
    assert isinstance(avg.features[-1], torch.nn.AdaptiveAvgPool3d) and isinstance(mx.features[-1], torch.nn.AdaptiveMaxPool3d)
    mx.load_state_dict(avg.state_dict())  # same weights: only the pooling differs
    mx.eval(), avg.eval()
    x = torch.zeros(2, 1, 16, 32, 32)
    x[1, :, :, 14:18, 14:18] = 5.0  # a small bright blob in the second clip only
    with torch.no_grad():
        fa, fm = avg.features(x).flatten(1), mx.features(x).flatten(1)
    assert (fm[1] - fm[0]).abs().max() > (fa[1] - fa[0]).abs().max()


def test_slowfast_pathways_and_r50_layout():
    tiny = build_model(ModelConfig(arch="slowfast", widths=[8], depths=[1, 1, 1, 1], speed_ratio=4, channel_ratio=0.25), 14, in_channels=1)
    x = torch.randn(2, 1, 16, 64, 64)  # (B, C, T, H, W)
    assert tiny(x).shape == (2, 14)
    slow_in = tiny.slow_stem[0]
    assert slow_in.kernel_size[0] == 1 and tiny.fast_stem[0].kernel_size[0] == 5  # slow stem: no temporal conv
    r50 = build_model(ModelConfig(arch="slowfast", widths=[64], depths=[3, 4, 6, 3], channel_ratio=0.125), 400)
    assert 33e6 < sum(p.numel() for p in r50.parameters()) < 36e6  # SlowFast-R50 4x16 is ~34.5M


def test_slowfast_needs_four_stages():
    with pytest.raises(ConfigError, match="depths: slowfast needs 4 stage depths"):
        ModelConfig(arch="slowfast", depths=[1, 1])


# --- recipes and their data ---------------------------------------------------------------------
def test_thermal_profile_has_the_reports_imbalance(tmp_path):
    prof = profile("thermal_slowfast")
    assert len(prof.class_names) == 14 and prof.grey
    m = read_manifest(synthesize(str(tmp_path), "thermal_slowfast", videos_per_class=20, seed=0))
    counts = m.class_counts()
    assert counts.argmax() == m.class_names.index("lying_with_risk")
    assert 0.4 < counts.max() / counts.sum() < 0.6
    assert (m.class_counts("val") > 0).all() and (m.class_counts("train") > 0).all()


def test_lipread_profile_is_grey_32_frames(tmp_path):
    m = read_manifest(synthesize(str(tmp_path), "lipread_3dcnn", videos_per_class=2, seed=0))
    assert m.num_classes == 5 and m.column("num_frames").min() >= 32


@pytest.mark.parametrize("name", ["thermal_slowfast", "lipread_3dcnn"])
def test_seed_spaces_start_from_the_reports_configuration(name):
    space = load_space(name)
    assert space.recipe == name and get_recipe(name).synthetic == name
    if name == "thermal_slowfast":
        assert space.tune.metric == "val_mean_class_acc"
        assert space.points[0]["options.loss"] == "ce" and space.points[0]["data.sampler_power"] == 0.0
        assert {"options.focal_gamma", "data.sampler_power", "train.label_smoothing"} <= set(space.params)
    else:
        first = space.points[0]
        assert first["train.optimizer"] == "sgd" and first["train.lr"] == 0.01 and first["train.batch_size"] == 2
        assert space.base.train.schedule == "step" and space.base.train.step_size == 10 and space.base.train.step_gamma == 0.5


def test_focal_recipe_trains_with_class_alpha_and_logs_per_class_accuracy(tmp_path):
    m = read_manifest(synthesize(str(tmp_path / "d"), "thermal_slowfast", videos_per_class=8, seed=1))
    cfg = TrialConfig.from_dict(
        {
            "recipe": "thermal_slowfast",
            "metric": "val_mean_class_acc",
            "data": {"num_segments": 8, "crop_size": 32, "decode_short_side": 40, "channels": 1, "mean": [0.5], "std": [0.25],
                     "hflip": 0.0, "num_workers": 0, "sampler_power": 0.5},
            "model": {"arch": "slowfast", "widths": [4], "depths": [1, 1, 1, 1], "channel_ratio": 0.5},
            "train": {"epochs": 1, "batch_size": 4, "optimizer": "sgd", "lr": 0.01},
            "options": {"loss": "focal", "focal_gamma": 1.5, "class_alpha": True},
        }
    )
    reports = []
    fit(cfg, m, str(tmp_path / "w"), report=lambda mm, d: reports.append(mm))
    metrics = reports[0]
    assert math.isfinite(metrics["train_loss"]) and "val_mean_class_acc" in metrics
    assert {f"val_acc/{n}" for n in m.class_names} | {f"val_f1/{n}" for n in m.class_names} <= set(metrics)


def test_unknown_recipe_option_is_named():
    recipe = RECIPES["thermal_slowfast"]
    with pytest.raises(ConfigError, match="options.gama: unknown key"):
        recipe.options(TrialConfig(options={"gama": 2}))
    with pytest.raises(ConfigError, match="loss: unknown 'hinge'"):
        recipe.options(TrialConfig(options={"loss": "hinge"}))


def test_auto_precision_trains_slowfast_on_cpu_without_nan(tmp_path):
    """torch's CPU bf16 conv3d gives NaN weight gradients for some SlowFast shapes; `auto` avoids it."""
    m = read_manifest(synthesize(str(tmp_path / "d"), "thermal_slowfast", videos_per_class=8, seed=1))
    cfg = TrialConfig.from_dict(
        {
            "recipe": "thermal_slowfast",
            "data": {"num_segments": 8, "crop_size": 32, "decode_short_side": 40, "channels": 1, "mean": [0.5],
                     "std": [0.25], "hflip": 0.0, "num_workers": 0},
            "model": {"arch": "slowfast", "widths": [4], "depths": [1, 1, 1, 1], "channel_ratio": 0.5},
            "train": {"epochs": 1, "batch_size": 4, "optimizer": "sgd", "lr": 0.01, "precision": "auto"},
        }
    )
    summary = fit(cfg, m, str(tmp_path / "w"))
    assert math.isfinite(summary["metrics"]["train_loss"])


# --- anomaly (report 001) -----------------------------------------------------------------------
def test_mil_ranking_loss_by_hand():
    from vidtune.losses import mil_ranking_loss

    scores = torch.tensor([0.9, 0.2, 0.6, 0.1])
    abnormal = torch.tensor([True, False, True, False])
    # margin + mean(normal) - mean(abnormal) = 0.5 + 0.15 - 0.75 < 0 -> 0
    assert float(mil_ranking_loss(scores, abnormal, 0.5)) == 0.0
    assert float(mil_ranking_loss(scores, abnormal, 0.7)) == pytest.approx(0.1)
    assert float(mil_ranking_loss(scores, torch.zeros(4, dtype=torch.bool), 0.5)) == 0.0


def test_vae_loss_by_hand():
    from vidtune.losses import vae_loss

    recon, target = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]])
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    kl = -0.5 * ((1 + 0 - 1 - 1) + (1 + math.log(2.0) - 0 - 2.0))
    assert float(vae_loss(recon, target, mu, logvar, beta=0.1)) == pytest.approx(0.5 + 0.1 * kl, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_roc_auc_matches_scikit_learn(seed):
    from sklearn.metrics import roc_auc_score

    from vidtune.metrics import roc_auc

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300).astype(bool)
    s = np.round(rng.normal(size=300) + y, 1)  # rounding makes ties
    assert roc_auc(s, y) == pytest.approx(roc_auc_score(y, s))
    assert math.isnan(roc_auc(s, np.zeros(300, dtype=bool)))


def test_anomaly_recipe_logs_every_loss_part_and_auc(tmp_path):
    m = read_manifest(synthesize(str(tmp_path / "d"), "anomaly_multitask", videos_per_class=14, seed=0))
    assert m.class_names[0] == "NormalVideos" and m.class_counts().argmax() == 0
    for encoder in ("bilstm", "transformer"):
        cfg = TrialConfig.from_dict(
            {
                "recipe": "anomaly_multitask",
                "metric": "val_f1_macro",
                "data": {"num_segments": 4, "crop_size": 32, "decode_short_side": 40, "hflip": 0.0, "num_workers": 0,
                         "sampler_power": 0.5},
                "model": {"arch": "timm", "backbone": "test_efficientnet", "dropout": 0.3},
                "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "onecycle_div": 10, "accumulate": 2, "clip_grad_norm": 1.0},
                "options": {"encoder": encoder, "hidden": 32, "latent": 8},
            }
        )
        reports = []
        fit(cfg, m, str(tmp_path / encoder), report=lambda mm, d: reports.append(mm))
        got = reports[0]
        for part in ("reg", "focal", "mil", "vae"):
            assert math.isfinite(got[f"train_loss_{part}"]), part
        assert 0.0 <= got["val_auc"] <= 1.0 and "val_f1_macro" in got


def test_anomaly_needs_a_normal_class():
    from vidtune.recipes.anomaly import normal_index

    assert normal_index(["Abuse", "NormalVideos"]) == 1
    with pytest.raises(ConfigError, match="no class name starts with 'normal'"):
        normal_index(["a", "b"])


# --- distillation (report 004) ------------------------------------------------------------------
def test_kd_loss_is_hintons_formula():
    from vidtune.losses import kd_response_loss

    s, t, temp = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 1.5, 1.0]]), 3.0
    p_t = torch.softmax(t / temp, 1)[0]
    p_s = torch.softmax(s / temp, 1)[0]
    expected = temp**2 * float(sum(p_t[i] * math.log(p_t[i] / p_s[i]) for i in range(3)))
    assert float(kd_response_loss(s, t, temp)) == pytest.approx(expected, rel=1e-5)
    assert float(kd_response_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)


def distill_cfg(**options) -> TrialConfig:
    return TrialConfig.from_dict(
        {
            "recipe": "distill_clip_mobilevit",
            "data": {"num_segments": 4, "crop_size": 32, "decode_short_side": 40, "hflip": 0.0, "num_workers": 0},
            "model": {"arch": "timm", "backbone": "test_efficientnet"},
            "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3},
            "options": {"teacher_model": "test_vit", "teacher_size": 64, "embed_dim": 32, **options},
        }
    )


def test_teacher_outputs_are_computed_once_and_reused(tmp_path, monkeypatch):
    from vidtune.recipes.distill import DistillRecipe

    m = read_manifest(synthesize(str(tmp_path / "d"), "distill_clip_mobilevit", videos_per_class=4, seed=0))
    assert m.num_classes == 8
    recipe = DistillRecipe()
    cfg = distill_cfg()
    emb, info = recipe.teacher_embeddings(cfg, m, str(tmp_path / "cache"))
    assert emb.shape == (len(m), 32) and info["computed"] and info["teacher_params"] > 0
    again, info2 = recipe.teacher_embeddings(cfg, m, str(tmp_path / "cache"))
    assert not info2["computed"] and info2["cache"] == info["cache"]
    np.testing.assert_array_equal(emb, again)
    # A different teacher or other sampling settings is another cache entry.
    assert recipe.cache_key(distill_cfg(teacher_size=32), m) != recipe.cache_key(cfg, m)
    assert recipe.cache_key(cfg.with_overrides({"data.crop_size": 24}), m) != recipe.cache_key(cfg, m)

    monkeypatch.setenv("VIDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    reports = []
    fit(cfg, m, str(tmp_path / "w"), report=lambda mm, d: reports.append(mm))
    got = reports[0]
    for key in ("train_loss_feat", "train_loss_resp", "train_loss_task", "student_params", "teacher_params", "student_latency_ms"):
        assert key in got and math.isfinite(got[key]), key
    assert got["teacher_params"] == info["teacher_params"] and got["student_params"] > 0


def test_teacher_path_loads_local_weights(tmp_path):
    import timm

    from vidtune.recipes.distill import DistillOptions, build_teacher

    donor = timm.create_model("test_vit", num_classes=32, img_size=64)
    torch.save(donor.state_dict(), tmp_path / "teacher.pth")
    teacher = build_teacher(DistillOptions(teacher_model="test_vit", teacher_size=64, embed_dim=32, teacher_path=str(tmp_path / "teacher.pth")))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(teacher(x), donor.eval()(x))
