from __future__ import annotations

import glob
import os

import optuna
import pytest

from vidtune.config import ConfigError, TrialConfig
from vidtune.space import SPACES_DIR, load_space, parse_space

GOOD = {
    "name": "t",
    "recipe": "classify",
    "fixed": {"train": {"lr": 0.01, "epochs": 3}, "model": {"dropout": 0.1}},
    "space": {
        "train.lr": {"type": "float", "low": "1e-4", "high": 0.1, "log": True},
        "model.dropout": {"type": "float", "low": 0.0, "high": 0.5, "step": 0.1},
        "train.batch_size": {"type": "categorical", "choices": [8, 16]},
        "data.num_segments": {"type": "int", "low": 4, "high": 8, "step": 2},
    },
    "tune": {"metric": "val_mean_class_acc", "num_samples": 4},
}


def test_every_shipped_space_parses():
    files = glob.glob(os.path.join(SPACES_DIR, "*.yaml"))
    assert any(f.endswith("quickstart.yaml") for f in files)
    for f in files:
        space = load_space(f)
        assert space.points and set(space.points[0]) == set(space.params)


def test_space_becomes_optuna_distributions_and_baseline_first_point():
    s = parse_space(GOOD)
    assert isinstance(s.params["train.lr"], optuna.distributions.FloatDistribution) and s.params["train.lr"].log
    assert isinstance(s.params["train.batch_size"], optuna.distributions.CategoricalDistribution)
    assert isinstance(s.params["data.num_segments"], optuna.distributions.IntDistribution)
    assert s.points == [{"train.lr": 0.01, "model.dropout": 0.1, "train.batch_size": 16, "data.num_segments": 8}]
    assert s.base.metric == "val_mean_class_acc" and s.base.train.epochs == 3
    cfg = s.trial_config({"train.lr": 0.05, "model.dropout": 0.3})
    assert isinstance(cfg, TrialConfig) and cfg.train.lr == 0.05 and cfg.model.dropout == 0.3


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"spaces": {}}, r"spaces: unknown key"),
        ({"recipe": "nope"}, r"recipe: unknown 'nope'"),
        ({"fixed": {"train": {"lrr": 1}}}, r"fixed.train.lrr: unknown key"),
        ({"fixed": {"train": {"lr": -1}}}, r"fixed.train.lr: must be > 0"),
        ({"space": {"train.lr": {"type": "float", "low": 1, "high": 0.1}}}, r"space.train.lr: low \(1.0\) must be below high"),
        ({"space": {"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, r"space.train.lr: .*log"),
        ({"space": {"train.lr": {"type": "gauss"}}}, r"space.train.lr.type: unknown 'gauss'"),
        ({"space": {"train.nothing": {"type": "float", "low": 0, "high": 1}}}, r"space.train.nothing: not a trial config key"),
        ({"space": {"train.lr": {"type": "float", "low": 0.5, "high": 1}}}, r"fixed.train.lr: the baseline value 0.01 is outside"),
        ({"tune": {"mode": "up"}}, r"tune.mode: must be 'max' or 'min'"),
        ({"space": {}}, r"space: no parameters"),
    ],
)
def test_bad_spaces_name_the_key(patch, message):
    raw = {**GOOD, **patch}
    with pytest.raises(ConfigError, match=message):
        parse_space(raw)


def test_all_problems_reported_at_once():
    raw = {**GOOD, "fixed": {"train": {"lrr": 1, "epochs": 0}}, "tune": {"num_samples": 0}}
    with pytest.raises(ConfigError) as e:
        parse_space(raw)
    assert len(e.value.problems) >= 2


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nspace:\n  train.lr: {type: float, low: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ malformed YAML"):
        load_space(str(bad))
    with pytest.raises(FileNotFoundError, match="nowhere.yaml: no such space file"):
        load_space(str(tmp_path / "nowhere.yaml"))
