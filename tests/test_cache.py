"""The shared decoded-clip cache: same clips as decoding, keys, concurrent builds, bad videos."""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from vidtune.config import ConfigError, DataConfig, TrialConfig
from vidtune.data.cache import (
    CACHE_ENV,
    build_clip_cache,
    clips_key,
    frames_key,
    open_clip_cache,
    stored_indices,
)
from vidtune.data.dataset import ClipDataset, augment_batch, normalize_batch
from vidtune.data.manifest import Manifest, read_manifest

CFG = DataConfig(num_segments=4, frames_per_segment=2, frame_stride=2, decode_short_side=40, crop_size=32, hflip=0.5)


@pytest.fixture(scope="module")
def built(tiny_set, tmp_path_factory):
    manifest = read_manifest(tiny_set)
    cache_dir = str(tmp_path_factory.mktemp("clip_cache"))
    return manifest, cache_dir, build_clip_cache(manifest, CFG, cache_dir, log=lambda _m: None)


def _clips(ds: ClipDataset, epochs=(0, 1)) -> list[torch.Tensor]:
    out = []
    for epoch in epochs:
        ds.set_epoch(epoch)
        out += [ds[i][0] for i in range(len(ds))]
    return out


def test_cached_val_clips_equal_decoded_bit_for_bit(built):
    manifest, _, cache = built
    val = manifest.split("val")
    plain = _clips(ClipDataset(val, CFG, train=False))
    cached_ds = ClipDataset(val, CFG, train=False, cache=cache)
    assert all(cached_ds.cache.clips_part.rows.get(k) is not None for k in cached_ds.keys)  # served from the cache
    for a, b in zip(plain, _clips(cached_ds)):
        assert torch.equal(a, b)
    # The uint8 view before normalising is the stored clip itself.
    raw_plain = ClipDataset(val, CFG, train=False, normalise=False)[0][0]
    raw_cached = ClipDataset(val, CFG, train=False, cache=cache, normalise=False)[0][0]
    assert raw_plain.dtype == torch.uint8 and torch.equal(raw_plain, raw_cached)


def test_cached_training_clips_equal_decoded_for_the_same_randomness(built):
    manifest, _, cache = built
    train = manifest.split("train")
    plain = _clips(ClipDataset(train, CFG, train=True, seed=7))
    cached = _clips(ClipDataset(train, CFG, train=True, seed=7, cache=cache))
    assert len(plain) == len(cached) == 2 * len(train)
    for a, b in zip(plain, cached):
        assert torch.equal(a, b)
    # The validation view of training rows (e.g. a teacher's pass) comes from the stored frames too.
    for a, b in zip(_clips(ClipDataset(train, CFG, train=False), (0,)), _clips(ClipDataset(train, CFG, train=False, cache=cache), (0,))):
        assert torch.equal(a, b)


def test_long_rows_store_evenly_spaced_frames_and_sample_the_nearest(built):
    manifest, cache_dir, _ = built
    idx = stored_indices(num_frames=100, first=0, last=100, max_frames=10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 99
    assert list(stored_indices(30, 5, 12, 64)) == list(range(5, 12))
    cfg = dataclasses.replace(CFG, cache_max_frames=4)
    train = manifest.split("train")
    small = build_clip_cache(train, cfg, os.path.join(cache_dir, "capped"), log=lambda _m: None)
    ds = ClipDataset(train, cfg, train=True, cache=small)
    row = small.frames_part.rows[ds.keys[0]]
    assert len(row.indices) == 4 and not row.contiguous
    wanted = np.array([row.indices[1] + 1, row.indices[3]])
    got = small.frames_part.frames(ds.keys[0], wanted)
    assert np.array_equal(got, row.pixels[[1, 3]])
    # Validation views need every frame: a capped row is decoded instead.
    assert small.val_clip(ds.keys[0], wanted, cfg.crop_size) is None
    assert ds[0][0].shape == (3, cfg.num_frames, cfg.crop_size, cfg.crop_size)


def test_key_follows_manifest_content_and_sampling(built):
    manifest, _, _ = built
    fp = manifest.fingerprint()
    assert frames_key(fp, CFG) == frames_key(fp, dataclasses.replace(CFG))
    # Sampling changes only the clips part; the decode size changes both.
    resampled = dataclasses.replace(CFG, num_segments=6)
    assert frames_key(fp, resampled) == frames_key(fp, CFG) and clips_key(fp, resampled) != clips_key(fp, CFG)
    resized = dataclasses.replace(CFG, decode_short_side=48)
    assert frames_key(fp, resized) != frames_key(fp, CFG) and clips_key(fp, resized) != clips_key(fp, CFG)
    assert clips_key(fp, dataclasses.replace(CFG, crop_size=24)) != clips_key(fp, CFG)
    # Normalisation and augmentation settings do not change what is decoded.
    assert clips_key(fp, dataclasses.replace(CFG, mean=[0.5], std=[0.2], hflip=0.0)) == clips_key(fp, CFG)
    labels = manifest.table.column("label").to_numpy()
    relabelled = manifest.table.set_column(1, "label", pa.array(labels[::-1].copy(), pa.int32()))
    changed = Manifest(relabelled, manifest.class_names)
    assert frames_key(changed.fingerprint(), CFG) != frames_key(fp, CFG)


def test_rebuilt_when_settings_change_and_reused_otherwise(built, tmp_path):
    manifest, _, _ = built
    logs: list[str] = []
    build_clip_cache(manifest, CFG, str(tmp_path), log=logs.append)
    assert len(logs) == 2  # frames and clips built
    build_clip_cache(manifest, CFG, str(tmp_path), log=logs.append)
    assert len(logs) == 2  # reused
    build_clip_cache(manifest, dataclasses.replace(CFG, num_segments=6), str(tmp_path), log=logs.append)
    assert len(logs) == 3 and "built clips" in logs[-1]  # only the clips part depends on sampling
    assert sorted(n.split("-")[0] for n in os.listdir(tmp_path) if not n.endswith(".lock")) == ["clips", "clips", "frames"]


def _build_in_process(args):
    manifest_path, cache_dir = args
    cache = build_clip_cache(read_manifest(manifest_path), CFG, cache_dir, workers=1, log=lambda _m: None)
    return cache.num_bytes


def test_two_processes_building_at_once_yield_one_valid_cache(tiny_set, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        sizes = pool.map(_build_in_process, [(tiny_set, str(tmp_path))] * 2)
    assert sizes[0] == sizes[1] > 0
    names = sorted(os.listdir(tmp_path))
    assert not [n for n in names if ".tmp-" in n]  # no half-built folder left behind
    assert len([n for n in names if not n.endswith(".lock")]) == 2
    for n in names:
        if not n.endswith(".lock"):
            meta = json.load(open(tmp_path / n / "meta.json"))
            assert meta["rows"] > 0 and meta["bad"] == {}
    manifest = read_manifest(tiny_set)
    cache = open_clip_cache(manifest, CFG, str(tmp_path), build=False)
    val = manifest.split("val")
    assert torch.equal(ClipDataset(val, CFG, False, cache=cache)[1][0], ClipDataset(val, CFG, False)[1][0])


def test_unreadable_video_is_left_out_and_named_then_too_many_fail(tiny_set, tmp_path):
    manifest = read_manifest(tiny_set)
    train = manifest.split("train")
    paths = train.column("path")
    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(tiny_set), data)
    moved = [str(p).replace(os.path.dirname(tiny_set), str(data)) for p in paths]
    table = train.table.set_column(0, "path", pa.array(moved))
    copy = Manifest(table, manifest.class_names)
    with open(moved[0], "wb") as f:
        f.write(b"not a video")
    logs: list[str] = []
    cache = build_clip_cache(copy, CFG, str(tmp_path / "c1"), log=logs.append)
    assert moved[0] in logs[0] and "unreadable" in logs[0]
    assert moved[0] in cache.frames_part.meta["bad"]
    # The dataset then meets the bad file as it would uncached: skipped for another of its class.
    ds = ClipDataset(copy, CFG, train=True, cache=cache)
    clip, label, row = ds[0]
    assert row != 0 and label == int(copy.column("label")[0]) and moved[0] in ds.bad
    for p in moved[1:11]:
        os.remove(p)
    with pytest.raises(RuntimeError, match=r"clip cache: 10 unreadable videos, giving up; first: .*" + os.path.basename(moved[0])):
        build_clip_cache(copy, CFG, str(tmp_path / "c2"), log=lambda _m: None)
    assert not [n for n in os.listdir(tmp_path / "c2") if ".tmp-" in n]


def test_switch_off_and_no_cache_dir_mean_no_cache(built, monkeypatch):
    manifest, cache_dir, _ = built
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert open_clip_cache(manifest, CFG) is None
    assert open_clip_cache(manifest, dataclasses.replace(CFG, cache=False), cache_dir) is None
    monkeypatch.setenv(CACHE_ENV, cache_dir)
    assert open_clip_cache(manifest, CFG, build=False) is not None
    cfg = TrialConfig.from_dict({"data": {"cache": False, "cache_max_frames": 16}})
    assert cfg.data.cache is False and cfg.data.cache_max_frames == 16
    with pytest.raises(ConfigError, match=r"data.cache: expected true/false \(got 'yes'\)"):
        TrialConfig.from_dict({"data": {"cache": "yes"}})
    with pytest.raises(ConfigError, match=r"data.device_transforms: unknown 'gpu'"):
        TrialConfig.from_dict({"data": {"device_transforms": "gpu"}})


def test_device_normalisation_matches_the_loader_normalisation(built):
    manifest, _, cache = built
    val = manifest.split("val")
    for cfg in (CFG, dataclasses.replace(CFG, channels=1, mean=[0.5], std=[0.25])):
        ref = torch.stack([ClipDataset(val, cfg, False, cache=cache)[i][0] for i in range(3)])
        raw = torch.stack([ClipDataset(val, cfg, False, cache=cache, normalise=False)[i][0] for i in range(3)])
        assert raw.dtype == torch.uint8
        assert torch.allclose(normalize_batch(raw, cfg), ref, atol=1e-6)
    # Training view: the same crops; the device does the flips (all of them at hflip 1, none at 0).
    train = manifest.split("train")
    for p in (1.0, 0.0):
        cfg = dataclasses.replace(CFG, hflip=p)
        ref = torch.stack([ClipDataset(train, cfg, True, cache=cache)[i][0] for i in range(3)])
        raw = torch.stack([ClipDataset(train, cfg, True, cache=cache, normalise=False)[i][0] for i in range(3)])
        assert raw.dtype == torch.uint8 and torch.allclose(normalize_batch(augment_batch(raw, cfg), cfg), ref, atol=1e-6)
    cfg = dataclasses.replace(CFG, hflip=0.5)
    raw = torch.stack([ClipDataset(train, cfg, True, cache=cache, normalise=False)[i][0] for i in range(len(train))])
    out = augment_batch(raw, cfg, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, r.flip(-1))) and not torch.equal(o, r) for o, r in zip(out, raw)]
    kept = [bool(torch.equal(o, r)) for o, r in zip(out, raw)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
    features = torch.randn(2, 8, 4)  # frozen-backbone features are not pixels: untouched
    assert augment_batch(features, cfg) is features


def test_fit_with_and_without_cache_gives_the_same_run(tiny_set, tmp_path, monkeypatch):
    from vidtune.train import fit

    manifest = read_manifest(tiny_set)
    cfg = TrialConfig.from_dict({
        "data": {"num_segments": 4, "decode_short_side": 40, "crop_size": 32, "num_workers": 0},
        "model": {"arch": "cnn3d", "widths": [4, 8]},
        "train": {"epochs": 2, "batch_size": 8, "precision": "fp32"},
    })
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    logs: list[str] = []
    cached = fit(cfg, manifest, str(tmp_path / "a"), log=logs.append)
    assert any("clip cache: built frames" in line for line in logs)
    off = fit(cfg.with_overrides({"data.cache": False}), manifest, str(tmp_path / "b"), log=lambda _m: None)
    monkeypatch.delenv(CACHE_ENV)
    plain = fit(cfg, manifest, str(tmp_path / "c"), log=lambda _m: None)
    for key in ("train_loss", "val_loss", "val_top1"):
        assert cached["metrics"][key] == off["metrics"][key] == plain["metrics"][key]


def test_fit_with_device_transforms_repeats_exactly(tiny_set, tmp_path):
    # device_transforms on (here the device is the CPU): the loader ships uint8 unflipped clips,
    # fit() flips and normalises the batch; the device's flip stream is seeded, so a run repeats.
    from vidtune.train import fit

    manifest = read_manifest(tiny_set)
    cfg = TrialConfig.from_dict({
        "data": {"num_segments": 4, "decode_short_side": 40, "crop_size": 32, "num_workers": 0, "hflip": 0.5,
                 "device_transforms": "on"},
        "model": {"arch": "cnn3d", "widths": [4, 8]},
        "train": {"epochs": 2, "batch_size": 8, "precision": "fp32"},
    })
    a = fit(cfg, manifest, str(tmp_path / "a"), log=lambda _m: None)
    b = fit(cfg, manifest, str(tmp_path / "b"), log=lambda _m: None)
    off = fit(cfg.with_overrides({"data.device_transforms": "off"}), manifest, str(tmp_path / "c"), log=lambda _m: None)
    assert a["metrics"]["train_loss"] == b["metrics"]["train_loss"]
    assert math.isfinite(a["metrics"]["train_loss"]) and a["metrics"]["train_loss"] != off["metrics"]["train_loss"]


def test_loader_workers_map_the_cache_themselves(built):
    # Workers receive the dataset pickled: the cache travels as its folder and is mapped again there.
    manifest, _, cache = built
    val = manifest.split("val")
    ds = ClipDataset(val, CFG, train=False, cache=cache)
    assert cache.clips_part.rows  # opened here...
    assert pickle.loads(pickle.dumps(cache)).clips_part._rows is None  # ...but not shipped
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context="forkserver")
    got = torch.cat([clips for clips, _, _ in loader])
    assert torch.equal(got, torch.stack([ds[i][0] for i in range(len(ds))]))


FROZEN = {
    "data": {"num_segments": 4, "decode_short_side": 40, "crop_size": 32, "num_workers": 0},
    "model": {"arch": "timm", "backbone": "test_efficientnet", "freeze_backbone": True, "temporal_head": "attention"},
    "train": {"epochs": 2, "batch_size": 8, "precision": "fp32", "lr": 0.01},
}


def test_frozen_backbone_features_are_computed_once_and_equal_the_live_backbone(tiny_set, tmp_path):
    from vidtune.models import build_model
    from vidtune.recipes.features import FeatureDataset, backbone_features

    cfg = TrialConfig.from_dict(FROZEN)
    val = read_manifest(tiny_set).split("val")
    logs: list[str] = []
    path, computed = backbone_features(cfg, val, str(tmp_path), log=logs.append)
    assert computed and len(logs) == 1 and "backbone features" in logs[0]
    assert backbone_features(cfg, val, str(tmp_path), log=logs.append) == (path, False)  # reused
    other = cfg.with_overrides({"data.crop_size": 24})
    assert backbone_features(other, val, str(tmp_path), log=logs.append)[0] != path  # input changed: new key

    torch.manual_seed(cfg.train.seed)  # as fit() builds its model
    model = build_model(cfg.model, 4, in_channels=3, num_frames=cfg.data.num_frames)
    model.train()
    assert not model.backbone.training and not any(p.requires_grad for p in model.backbone.parameters())
    ds = FeatureDataset(path, val.column("label"))
    clips = torch.stack([ClipDataset(val, cfg.data, train=False)[i][0] for i in range(3)])  # (3, C, T, H, W)
    feats = torch.stack([ds[i][0] for i in range(3)])  # (3, T, D)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.frame_features(clips), feats, atol=1e-5)
        assert torch.allclose(model(clips), model(feats), atol=1e-5)


def test_fit_on_frozen_features_and_recipes_without_them_refuse(tiny_set, tmp_path, monkeypatch):
    from vidtune.recipes import get_recipe
    from vidtune.train import fit

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    manifest = read_manifest(tiny_set)
    cfg = TrialConfig.from_dict(FROZEN)
    info = get_recipe("classify").warm_cache(cfg, manifest, str(tmp_path / "cache"))
    assert info["computed"]
    logs: list[str] = []
    out = fit(cfg, manifest, str(tmp_path / "run"), log=logs.append)
    assert out["epochs"] == 2 and not any("backbone features" in line for line in logs)  # the warm step's files
    assert len([n for n in os.listdir(tmp_path / "cache") if n.endswith(".npy")]) == 2  # train and val
    with pytest.raises(ConfigError, match=r"model.freeze_backbone: recipe 'distill_clip_mobilevit' does not train"):
        get_recipe("distill_clip_mobilevit").make_dataset(manifest.split("val"), cfg, train=False)
    with pytest.raises(ConfigError, match=r"model.freeze_backbone: only for arch 'timm' \(got arch 'cnn3d'\)"):
        TrialConfig.from_dict({"model": {"freeze_backbone": True}})
