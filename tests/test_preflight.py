"""Preflight plants each bug in a tiny real data set and must catch it; clean sets must pass."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from vidtune.config import TrialConfig
from vidtune.data.manifest import Manifest, index_source, read_manifest
from vidtune.data.synth import write_video
from vidtune.preflight import (PreflightError, check_chance, check_inputs, check_leak, check_manifest, check_overfit,
                               check_static, raise_if_failed, run_preflight)

CFG = {
    "data": {"num_segments": 8, "crop_size": 48, "decode_short_side": 56, "hflip": 0.0, "num_workers": 0, "scale_min": 0.7},
    "model": {"arch": "cnn3d", "widths": [16, 32, 64], "pool": "max"},
    "train": {"batch_size": 16, "lr": 0.005},
}


def cfg(**overrides) -> TrialConfig:
    return TrialConfig.from_dict(CFG).with_overrides(overrides)


def with_labels(m: Manifest, labels: np.ndarray) -> Manifest:
    table = m.table.set_column(m.table.column_names.index("label"), "label", pa.array(labels, pa.int32()))
    return Manifest(table, m.class_names)


def test_clean_set_passes_every_check(quick_set):
    lines = []
    findings = run_preflight(cfg(), read_manifest(quick_set), log=lines.append)
    assert {f.check for f in findings} == {"manifest", "leak", "static", "inputs", "overfit", "chance"}
    assert all(f.ok for f in findings), lines
    raise_if_failed(findings)
    chance = next(f for f in findings if f.check == "chance")
    assert "pilot val mean class acc" in chance.message and "vs chance 0.25" in chance.message


@pytest.fixture(scope="module")
def larger_set(tmp_path_factory) -> str:
    from vidtune.data.synth import synthesize

    return synthesize(str(tmp_path_factory.mktemp("larger")), "quickstart", num_classes=4, videos_per_class=80, seed=3)


def test_shuffled_labels_are_caught_by_the_chance_pilot(larger_set):
    m = read_manifest(larger_set)  # 16 val clips a class: enough to tell chance apart
    shuffled = with_labels(m, np.random.default_rng(0).permutation(m.column("label")))
    finding = check_chance(shuffled, cfg(), epochs=8)
    assert not finding.ok and finding.line().startswith("chance: FAIL")
    assert "labels may not match the videos" in finding.message


def test_chance_pilot_on_a_tiny_val_set_warns_instead_of_failing(tiny_set):
    m = read_manifest(tiny_set)  # 2 val clips a class
    shuffled = with_labels(m, np.random.default_rng(0).permutation(m.column("label")))
    finding = check_chance(shuffled, cfg(), epochs=2)
    assert finding.ok and finding.level == "warn" and "inconclusive" in finding.message


def test_leaks_by_path_bytes_and_frames(tiny_set, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(os.path.dirname(tiny_set), folder, ignore=shutil.ignore_patterns("*.parquet"))
    m = index_source(str(folder))
    paths, splits = m.column("path"), m.column("split")
    train_paths = [p for p, s in zip(paths, splits) if s == "train"]
    # A renamed byte copy and a re-encoded copy of train videos, filed under val.
    cls = os.path.basename(os.path.dirname(train_paths[0]))
    shutil.copy(train_paths[0], folder / cls / "renamed_copy.mp4")
    from vidtune.data.video import decode_frames, probe

    info = probe(train_paths[1])
    frames = decode_frames(train_paths[1], np.arange(info.num_frames))
    cls1 = os.path.basename(os.path.dirname(train_paths[1]))
    write_video(str(folder / cls1 / "reencoded.mp4"), frames, fps=12, codec="mpeg4")
    m = index_source(str(folder))
    table = m.table
    split = np.array(table.column("split").to_pylist(), dtype=object)
    names = [os.path.basename(p) for p in table.column("path").to_pylist()]
    split[[i for i, n in enumerate(names) if n in ("renamed_copy.mp4", "reencoded.mp4")]] = "val"
    # ...and the same path listed in both splits.
    dup = table.slice(0, 1)
    table = pa.concat_tables([table.set_column(3, "split", pa.array(split.tolist(), pa.string())),
                              dup.set_column(3, "split", pa.array(["val" if dup.column("split")[0].as_py() == "train" else "train"]))])
    findings = check_leak(Manifest(table, m.class_names))
    lines = [f.line() for f in findings]
    assert all(line.startswith("leak: FAIL") for line in lines)
    assert any("is in both train and val" in line for line in lines)
    assert any("renamed_copy.mp4 has the same bytes" in line for line in lines)
    assert any("reencoded.mp4 decodes to the same frames" in line for line in lines)


def test_clean_set_has_no_leak(tiny_set):
    assert all(f.ok for f in check_leak(read_manifest(tiny_set)))


def test_static_clips_are_caught(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            picture = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
            write_video(str(tmp_path / cls / f"{i}.mp4"), np.repeat(picture[None], 16, axis=0), fps=10)
    finding = check_static(index_source(str(tmp_path)), cfg())
    assert not finding.ok and finding.line().startswith("static: FAIL") and "8/8 sampled clips" in finding.message


def test_bad_normalisation_is_caught_by_inputs(tiny_set):
    m = read_manifest(tiny_set)
    assert check_inputs(m, cfg()).ok
    finding = check_inputs(m, cfg(**{"data.std": [0.001, 0.001, 0.001]}))
    assert not finding.ok and "far outside a normalised range" in finding.message


def test_broken_optimisation_is_caught_by_overfit(tiny_set):
    m = read_manifest(tiny_set)
    assert check_overfit(m, cfg()).ok
    finding = check_overfit(m, cfg(**{"train.lr": 1e-9}))
    assert not finding.ok and finding.line().startswith("overfit: FAIL")


def test_manifest_check_names_missing_splits_and_left_out_files(tiny_set):
    m = read_manifest(tiny_set)
    table = m.table.set_column(3, "split", pa.array(["train"] * len(m), pa.string()))
    broken = Manifest(table, m.class_names, skipped=[("/data/x.mp4", "empty file")])
    findings = check_manifest(broken)
    assert findings[0].line() == "manifest: warn: left out /data/x.mp4: empty file"
    assert not findings[-1].ok and "classes with no val videos" in findings[-1].message
    with pytest.raises(PreflightError, match=r"preflight failed \(manifest\)"):
        raise_if_failed(findings)
