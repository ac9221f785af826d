"""Temporal action detection (report 003): the mAP on hand-made cases with known answers, NMS,
label assignment and decoding by hand, the untrimmed-video data, adapters, EMA, training, and a
smoke sweep through real Ray and MLflow that logs every ``val_map*`` metric of the contract."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from vidtune.config import ConfigError, TrialConfig
from vidtune.data.manifest import DataError, build_manifest, index_source, read_manifest
from vidtune.detection_metrics import (
    average_precision_at_tious,
    detection_map,
    interpolated_ap,
    nms_1d,
    segment_tiou,
)

MAP_KEYS = ["val_map", "val_map_0.3", "val_map_0.4", "val_map_0.5", "val_map_0.6", "val_map_0.7"]


# --- mAP: hand-made cases ------------------------------------------------------------------------
def test_perfect_predictions_score_one():
    gt = np.array([[0, 1.0, 4.0, 0], [0, 6.0, 9.0, 1], [1, 0.5, 2.0, 0], [1, 3.0, 7.5, 1]])
    pred = np.concatenate([gt, np.full((4, 1), 0.9)], axis=1)
    scalars, details = detection_map(gt, pred, ["a", "b"])
    assert scalars == {"map": 1.0, "map_0.3": 1.0, "map_0.4": 1.0, "map_0.5": 1.0, "map_0.6": 1.0, "map_0.7": 1.0}
    assert details["per_class_ap"]["b"]["num_gt"] == 2


def test_a_shifted_segment_counts_up_to_its_tiou():
    # GT [0, 10], prediction [2, 12]: overlap 8, union 12, tIoU 2/3 -> a hit at 0.3..0.6, a miss at 0.7.
    assert segment_tiou(np.array([2.0, 12.0]), np.array([[0.0, 10.0]]))[0] == pytest.approx(2 / 3)
    scalars, _ = detection_map(np.array([[0, 0.0, 10.0, 0]]), np.array([[0, 2.0, 12.0, 0, 0.8]]), ["a"])
    assert [scalars[f"map_{t}"] for t in ("0.3", "0.4", "0.5", "0.6", "0.7")] == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert scalars["map"] == pytest.approx(0.8)


def test_a_duplicate_detection_is_a_false_positive():
    # Two instances; ranked: A (hit), A again (false positive: A is taken), B (hit).
    # precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    gt = np.array([[0, 0.0, 10.0, 0], [0, 20.0, 30.0, 0]])
    pred = np.array([[0, 0.0, 10.0, 0, 0.9], [0, 0.5, 10.0, 0, 0.8], [0, 20.0, 30.0, 0, 0.7]])
    scalars, details = detection_map(gt, pred, ["a"])
    assert scalars["map"] == pytest.approx(5 / 6)
    assert details["per_class_ap"]["a"]["ap"]["0.5"] == pytest.approx(5 / 6)
    # The duplicate ranked last costs nothing: precision is already 1 at full recall.
    pred[1, 4] = 0.1
    assert detection_map(gt, pred, ["a"])[0]["map"] == pytest.approx(1.0)


def test_a_class_with_no_predictions_scores_zero_and_a_class_without_ground_truth_is_left_out():
    gt = np.array([[0, 0.0, 5.0, 0], [0, 10.0, 15.0, 1]])
    pred = np.array([[0, 0.0, 5.0, 0, 0.9], [0, 30.0, 35.0, 2, 0.9]])  # class 2 has no ground truth
    scalars, details = detection_map(gt, pred, ["a", "b", "c"])
    assert scalars["map"] == pytest.approx(0.5)
    assert details["per_class_ap"]["b"]["mean_ap"] == 0.0 and details["per_class_ap"]["b"]["num_pred"] == 0
    assert details["per_class_ap"]["c"]["ap"] is None


def test_a_detection_in_a_video_without_that_class_is_a_false_positive():
    gt = np.array([[0, 0.0, 5.0, 0]])
    pred = np.array([[1, 0.0, 5.0, 0, 0.9], [0, 0.0, 5.0, 0, 0.5]])  # the better-scored one is in video 1
    assert detection_map(gt, pred, ["a"])[0]["map"] == pytest.approx(0.5)


def test_a_match_takes_the_best_free_instance():
    # The first prediction takes instance 1 (tIoU 0.9). The second fits instance 1 best (8/11) but
    # it is taken, so at tIoU 0.5 it takes instance 2 (7/12); at 0.8 neither is in reach.
    gt = np.array([[0, 0.0, 10.0], [0, 4.0, 14.0]])
    pred = np.array([[0, 0.0, 9.0, 0.9], [0, 2.0, 11.0, 0.8]])
    ap = average_precision_at_tious(gt, pred, (0.5, 0.8))
    assert ap[0] == pytest.approx(1.0)
    assert ap[1] == pytest.approx(0.5)  # one hit, then a false positive


def test_interpolated_ap_by_hand():
    # precision 1, 0.5, 2/3 at recall 1/3, 1/3, 2/3: envelope 1 up to 1/3, 2/3 up to 2/3, 0 after.
    assert interpolated_ap(np.array([1.0, 0.5, 2 / 3]), np.array([1 / 3, 1 / 3, 2 / 3])) == pytest.approx(1 / 3 + 2 / 9)


def test_hard_and_soft_nms():
    segs = np.array([[0.0, 10.0], [1.0, 10.0], [20.0, 30.0]])
    scores = np.array([0.9, 0.8, 0.7])
    kept, kept_scores = nms_1d(segs, scores, iou_threshold=0.5)
    np.testing.assert_allclose(kept, [[0, 10], [20, 30]])
    np.testing.assert_allclose(kept_scores, [0.9, 0.7])
    kept, kept_scores = nms_1d(segs, scores, soft=True, sigma=0.5)
    # Soft-NMS keeps the overlap with its score decayed by exp(-0.9^2 / 0.5).
    np.testing.assert_allclose(kept_scores, [0.9, 0.7, 0.8 * math.exp(-(0.9**2) / 0.5)])


# --- targets, decoding, window merging ----------------------------------------------------------
def test_label_assignment_by_hand():
    from vidtune.models.detection import TemporalActionDetector
    from vidtune.recipes.detection import assign_targets

    points = TemporalActionDetector.make_points(8, 2)  # level 0: 8 points (stride 1), level 1: 4 (stride 2)
    assert points.shape == (12, 4) and points[8].tolist() == [1.0, 2.0, 4.0, float("inf")]
    # One 8 s window = 8 snippets; one class-1 segment from 2 s to 5 s (snippets 2..5, centre 3.5).
    targets = torch.tensor([[[0, 0.0, 8.0], [2.0, 5.0, 1], [-1, -1, -1]]])
    onehot, dist, positive = assign_targets(points, targets, 8, 3, radius=1.5)
    # Level 0 points 2.5, 3.5, 4.5 are within 1.5 of the centre and reach at most 2.5 < 4.
    assert positive[0].nonzero().flatten().tolist() == [2, 3, 4]
    assert onehot[0, 3].tolist() == [0.0, 1.0, 0.0] and onehot[0, 0].sum() == 0
    assert dist[0, 2].tolist() == [0.5, 2.5]  # point 2.5: 0.5 after the start, 2.5 before the end


def test_decoding_recovers_a_planted_segment():
    from vidtune.models.detection import TemporalActionDetector, decode_candidates

    points = TemporalActionDetector.make_points(8, 2)
    logits = torch.full((1, 12, 2), -10.0)
    offsets = torch.zeros(1, 12, 2)
    logits[0, 9, 1] = 5.0  # level 1 point at 3.0 (stride 2)
    offsets[0, 9] = torch.tensor([0.5, 1.0])  # 1 snippet before, 2 after -> [2, 5] of 8 snippets
    det = decode_candidates({"cls_logits": logits, "offsets": offsets, "points": points}, top_k=5)
    assert det.shape == (1, 5, 4)
    best = det[0, 0]
    assert best[:2].tolist() == pytest.approx([2 / 8, 5 / 8]) and best[3] == 1
    assert best[2] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item())


def test_windows_are_merged_in_video_time():
    from vidtune.recipes.detection import DetectionOptions, merge_windows

    # Video 3 seen in two windows (0-8 s and 4-12 s) that both find the action at 5-7 s.
    targets = np.full((2, 3, 3), -1.0)
    targets[0, 0], targets[1, 0] = [3, 0.0, 8.0], [3, 4.0, 8.0]
    targets[:, 1] = [5.0, 7.0, 0]
    dets = np.zeros((2, 2, 4))
    dets[:, :, 3] = -1
    dets[0, 0] = [5 / 8, 7 / 8, 0.9, 0]
    dets[1, 0] = [1 / 8, 3 / 8, 0.6, 0]
    preds, gt = merge_windows(dets, targets, 1, DetectionOptions(nms="hard"))
    np.testing.assert_allclose(gt, [[3, 5.0, 7.0, 0]])
    np.testing.assert_allclose(preds, [[3, 5.0, 7.0, 0, 0.9]])


# --- data ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def det_set(tmp_path_factory) -> str:
    """A small adatad_detection set (7 untrimmed videos, 2-3 actions each) as real MP4s."""
    from vidtune.data.synth import synthesize

    return synthesize(str(tmp_path_factory.mktemp("det_set")), "adatad_detection", videos_per_class=4, seed=3)


def test_synthetic_set_has_segments_in_both_splits(det_set):
    from vidtune.data.detection import group_videos

    m = read_manifest(det_set)
    assert m.class_names == ["grow", "shrink", "flicker", "orbit"]
    assert (m.class_counts("train") > 0).all() and (m.class_counts("val") > 0).all()
    videos = group_videos(m)
    assert len(videos) < len(m)  # several segments per video
    for v in videos:
        assert 2 <= len(v.segments) <= 3 and 96 <= v.num_frames <= 160
        segs = v.segments
        assert (segs[:, 1] > segs[:, 0]).all() and (segs[1:, 0] >= segs[:-1, 1] - 1e-6).all()  # ordered, disjoint
        assert segs[-1, 1] <= v.duration + 1e-6
    splits = {}
    for path, split in zip(m.column("path"), m.column("split")):
        assert splits.setdefault(path, split) == split  # a video's segments share its split


def test_annotations_csv_indexes_to_the_same_segments(det_set, tmp_path):
    folder = os.path.dirname(det_set)
    m = read_manifest(det_set)
    again = index_source(os.path.join(folder, "annotations.csv"))
    assert again.class_names == m.class_names  # classes.txt beside the CSV keeps the order
    def key(mm):
        return sorted(zip(mm.column("path"), mm.column("label_name"), np.round(mm.column("start"), 3), mm.column("split")))

    assert key(again) == key(m)
    # Without a split column the rows of one video still land in one split.
    with open(os.path.join(folder, "annotations.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    with open(tmp_path / "nosplit.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "start", "end"])
        for r in rows:
            w.writerow([os.path.join(folder, r["path"]), r["label"], r["start"], r["end"]])
    auto = index_source(str(tmp_path / "nosplit.csv"), val_fraction=0.3)
    seen = {}
    for path, split in zip(auto.column("path"), auto.column("split")):
        assert seen.setdefault(path, split) == split
    assert set(seen.values()) == {"train", "val"}


def det_cfg(**overrides) -> TrialConfig:
    raw = {
        "recipe": "adatad_detection",
        "metric": "val_map",
        "data": {"num_segments": 16, "frames_per_segment": 1, "crop_size": 32, "decode_short_side": 32, "num_workers": 0,
                 "cache": False},
        "model": {"arch": "timm", "backbone": "test_vit", "dropout": 0.0},
        "train": {"epochs": 1, "batch_size": 2, "lr": 1e-3, "schedule": "cosine", "warmup_pct": 0.1},
        "options": {"adapter_lr": 2e-3, "embed_dim": 32, "pyramid_levels": 3},
    }
    cfg = TrialConfig.from_dict(raw)
    return cfg.with_overrides(overrides) if overrides else cfg


def test_items_carry_the_window_and_the_videos_segments(det_set):
    from vidtune.data.detection import DetectionDataset, window_starts

    m = read_manifest(det_set).split("val")
    cfg = det_cfg()
    whole = DetectionDataset(m, cfg.data, train=False)
    clip, target, row = whole[0]
    assert clip.shape == (3, 16, 32, 32) and row == 0
    v = whole.videos[0]
    assert target.shape == (1 + whole.max_segments, 3)
    assert target[0].tolist() == pytest.approx([0, 0.0, v.duration])
    np.testing.assert_allclose(target[1 : 1 + len(v.segments)].numpy(), v.segments, rtol=1e-6)
    # Sliding windows of 64 frames, half overlapping, the last one ending with the video.
    assert window_starts(150, 64, 0.5) == [(0, 64), (32, 96), (64, 128), (86, 150)]
    sliding = DetectionDataset(m, cfg.data, train=False, window_frames=64)
    assert len(sliding) == sum(len(window_starts(vv.num_frames, 64, 0.5)) for vv in sliding.videos)
    # Training draws a random 64-frame window inside the video, a new one each epoch.
    train = DetectionDataset(m, cfg.data, train=True, window_frames=64)
    starts = set()
    for epoch in range(4):
        train.set_epoch(epoch)
        t = train[0][1]
        assert t[0, 2].item() == pytest.approx(64 / v.fps) and 0 <= t[0, 1].item() <= v.duration - 64 / v.fps + 1e-6
        starts.add(round(t[0, 1].item(), 4))
    assert len(starts) > 1


def test_bad_segments_are_named(det_set):
    from vidtune.data.detection import group_videos

    m = read_manifest(det_set)
    path = str(m.column("path")[0])
    info = (int(m.column("num_frames")[0]), float(m.column("fps")[0]))
    no_times = build_manifest([path], ["grow"], class_names=m.class_names)
    with pytest.raises(DataError, match=f"{path}: row 0 has no start/end"):
        group_videos(no_times)
    backwards = build_manifest([path], ["grow"], starts=[3.0], ends=[2.0], class_names=m.class_names)
    with pytest.raises(DataError, match=f"{path}: segment 3-2 s .* does not end after it starts"):
        group_videos(backwards)
    late = build_manifest([path], ["grow"], starts=[info[0] / info[1] + 5], ends=[info[0] / info[1] + 6], class_names=m.class_names)
    with pytest.raises(DataError, match="starts after the video ends"):
        group_videos(late)


# --- model --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["test_vit", "test_resnet", "test_efficientnet"])
def test_adapters_are_the_only_trainable_backbone_weights_and_start_as_identity(name):
    from vidtune.models.detection import AdaptedBackbone, create_timm_backbone

    torch.manual_seed(0)
    plain = create_timm_backbone(name, 3, 32).eval()
    torch.manual_seed(0)
    adapted = AdaptedBackbone(name, 3, 32, adapter_ratio=0.25, adapter_kernel=3).eval()
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert len(adapted.adapters) >= 2
    frames = torch.randn(2 * 4, 3, 32, 32)  # (B*N, C, H, W), 2 clips of 4 frames
    torch.testing.assert_close(adapted(frames, 4), plain(frames))  # zero-initialised up-projections
    # A trained adapter mixes time: changing frame 0 changes frame 1's features.
    for a in adapted.adapters:
        torch.nn.init.normal_(a.up.weight, std=0.1)
    out = adapted(frames, 4)
    moved = frames.clone()
    moved[0] += 1.0
    assert not torch.allclose(adapted(moved, 4)[1], out[1])
    assert torch.allclose(adapted(moved, 4)[4:], out[4:])  # the other clip is untouched


def test_activation_checkpointing_gives_the_same_gradients():
    from vidtune.models.detection import AdaptedBackbone

    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        net = AdaptedBackbone("test_vit", 3, 32, 0.25, 3, grad_checkpointing=ckpt).train()
        for a in net.adapters:
            torch.nn.init.normal_(a.up.weight, std=0.1)
        net(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)), 3).square().mean().backward()
        grads.append(torch.cat([a.down.weight.grad.flatten() for a in net.adapters]))
    torch.testing.assert_close(grads[0], grads[1])


def test_model_shapes_param_groups_and_config_errors():
    from vidtune.recipes import get_recipe
    from vidtune.train import build_optimizer

    recipe = get_recipe("adatad_detection")
    cfg = det_cfg()
    model = recipe.build_model(cfg, 4)
    out = model(torch.randn(2, 3, 16, 32, 32))
    assert out["cls_logits"].shape == (2, 16 + 8 + 4, 4) and out["offsets"].shape == (2, 28, 2)
    assert (out["offsets"] >= 0).all()
    opt = build_optimizer(model, cfg)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"head": 1e-3, "adapter": 2e-3}  # frozen backbone: no group
    assert opt.param_groups[0]["name"] == "head"
    with pytest.raises(ConfigError, match="options.nms: unknown 'fast'"):
        recipe.options(det_cfg(**{"options.nms": "fast"}))
    with pytest.raises(ConfigError, match="model.arch: adatad_detection uses a timm backbone"):
        recipe.build_model(det_cfg(**{"model.arch": "cnn3d"}), 4)
    with pytest.raises(ConfigError, match="data.num_segments: 2 snippets are too few for 3 pyramid levels"):
        recipe.build_model(det_cfg(**{"data.num_segments": 2}), 4)
    with pytest.raises(ConfigError, match="ema_decay: must be in"):
        det_cfg(**{"train.ema_decay": 1.0})


# --- training -----------------------------------------------------------------------------------
def test_ema_average_by_hand():
    from vidtune.ema import WeightEma

    net = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(net.weight, 0.0)
    ema = WeightEma(net, decay=0.5)
    torch.nn.init.constant_(net.weight, 1.0)
    ema.update(net)  # warm-up decay min(0.5, 2/11) = 2/11
    assert ema.shadow["weight"].item() == pytest.approx(9 / 11)
    with ema.applied(net):
        assert net.weight.item() == pytest.approx(9 / 11)
    assert net.weight.item() == 1.0


def test_fit_reports_map_keeps_the_ema_weights_and_resumes(det_set, tmp_path):
    from vidtune.checkpoint import load_checkpoint
    from vidtune.train import fit

    m = read_manifest(det_set)
    cfg = det_cfg(**{"train.ema_decay": 0.99, "train.epochs": 2})
    reports = []
    fit(cfg.with_overrides({"train.epochs": 1}), m, str(tmp_path), report=lambda mm, d: reports.append(mm))
    got = reports[0]
    for key in [*MAP_KEYS, "train_loss_cls", "train_loss_reg", "trainable_params", "adapter_params"]:
        assert key in got and math.isfinite(got[key]), key
    assert 0.0 <= got["val_map"] <= 1.0 and got["adapter_params"] < got["trainable_params"]
    best, last = load_checkpoint(str(tmp_path / "best")), load_checkpoint(str(tmp_path / "last"), with_train_state=True)
    shadow = last["train_state"]["ema"]["shadow"]
    for k, v in best["model"].items():
        torch.testing.assert_close(v, shadow[k])  # the best checkpoint holds the averaged weights
    assert any(not torch.equal(v, last["model"][k]) for k, v in best["model"].items())
    with open(tmp_path / "best" / "config.json") as f:
        per_class = json.load(f)["details"]["per_class_ap"]
    assert set(per_class) == set(m.class_names)
    # Resuming restores the average too (its update count carries on).
    updates = last["train_state"]["ema"]["updates"]
    fit(cfg, m, str(tmp_path), report=lambda mm, d: reports.append(mm), resume_dir=str(tmp_path / "last"))
    assert reports[-1]["epoch"] == 2
    assert load_checkpoint(str(tmp_path / "last"), with_train_state=True)["train_state"]["ema"]["updates"] == 2 * updates


def test_sliding_window_training_and_validation(det_set, tmp_path):
    from vidtune.train import fit

    reports = []
    cfg = det_cfg(**{"options.window_frames": 64, "options.nms": "hard"})
    fit(cfg, read_manifest(det_set), str(tmp_path), report=lambda mm, d: reports.append(mm))
    assert all(math.isfinite(reports[0][k]) for k in MAP_KEYS)
    with open(tmp_path / "best" / "config.json") as f:
        details = json.load(f)["details"]
    # Ground truth is counted once per video however many windows saw it.
    assert details["num_gt"] == int(read_manifest(det_set).class_counts("val").sum())


def test_preflight_overfits_one_detection_batch_and_skips_the_chance_pilot(det_set):
    from vidtune.preflight import run_preflight

    findings = run_preflight(det_cfg(), read_manifest(det_set), log=lambda _l: None, pilot=True)
    by_check = {f.check: f for f in findings}
    assert by_check["overfit"].ok and "one batch of 4 clips" in by_check["overfit"].message, by_check["overfit"].message
    assert by_check["chance"].level == "warn" and "pilot skipped" in by_check["chance"].message


def test_space_file_starts_from_the_reports_configuration():
    from vidtune.space import load_space

    space = load_space("adatad_detection")
    first = space.points[0]
    assert space.recipe == "adatad_detection" and space.tune.metric == "val_map"
    assert first["train.lr"] == 1e-4 and first["options.adapter_lr"] == 2e-4 and first["train.ema_decay"] > 0
    assert space.base.options["backbone_lr"] == 0.0 and space.base.train.schedule == "cosine"


@pytest.mark.slow
def test_a_short_run_learns_to_detect(tmp_path):
    from vidtune.data.synth import synthesize
    from vidtune.train import fit

    # Measured with this setting: val_map 0.55 after 12 epochs; random detections score ~0.09.
    m = read_manifest(synthesize(str(tmp_path / "d"), "adatad_detection", videos_per_class=40, seed=0))
    cfg = det_cfg(**{"train.epochs": 12, "train.ema_decay": 0.999, "train.clip_grad_norm": 1.0, "data.num_segments": 32,
                     "data.crop_size": 48, "data.decode_short_side": 48, "data.scale_min": 0.9, "options.embed_dim": 128,
                     "options.pyramid_levels": 4})
    summary = fit(cfg, m, str(tmp_path / "w"), log=lambda _m: None)
    assert summary["best"] > 0.3, summary


# --- sweep --------------------------------------------------------------------------------------
# A tiny backbone and head; at the report's learning rates (1e-4 / 2e-4) such a small head does not
# halve preflight's one-batch loss in 40 steps, so the shrunk sweep starts ten times higher.
SHRINK = {"model": {"backbone": "test_vit"}, "options": {"embed_dim": 32, "pyramid_levels": 3, "adapter_lr": 2e-3},
          "data": {"num_segments": 16, "crop_size": 32, "decode_short_side": 32}, "train": {"lr": 1e-3}}


def smoke(tmp_path, shrink: bool):
    from test_recipe_sweeps import smoke as recipe_smoke  # the seed recipes' smoke sweep, shared

    c, runs = recipe_smoke("adatad_detection", tmp_path, shrink, SHRINK,
                           [*MAP_KEYS, "train_loss", "val_loss", "train_loss_cls", "train_loss_reg"])
    for run in runs:
        assert [h.step for h in c.get_metric_history(run.info.run_id, "val_map_0.5")] == [1, 2]
        assert all(0.0 <= run.data.metrics[k] <= 1.0 for k in MAP_KEYS)


def test_smoke_sweep_logs_every_map_metric(ray_cluster, tmp_path):
    smoke(tmp_path, shrink=True)


@pytest.mark.slow
def test_shipped_space_smoke_sweep(ray_cluster, tmp_path):
    smoke(tmp_path, shrink=False)


def test_cli_writes_the_synthetic_detection_set(tmp_path):
    from vidtune.cli import main

    assert main(["data", "synth", "--recipe", "adatad_detection", "--out", str(tmp_path), "--videos-per-class", "2"]) == 0
    assert os.path.exists(tmp_path / "annotations.csv") and read_manifest(str(tmp_path / "manifest.parquet")).num_classes == 4
