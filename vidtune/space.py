"""Search-space files: one flat YAML per sweep, parsed and checked before any trial starts.

```yaml
name: quickstart            # experiment name unless --experiment
recipe: classify
data: {synthetic: {recipe: quickstart, classes: 6, videos_per_class: 50, seed: 0}}  # or {path: ...}
fixed:                      # the baseline trial config (the report's own recipe)
  train: {lr: 0.003, epochs: 8}
space:                      # dotted paths into `fixed`, Optuna short form
  train.lr: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}
  train.batch_size: {type: categorical, choices: [8, 16]}
tune: {metric: val_top1, mode: max, num_samples: 8, max_concurrent: 2, seed: 0,
       asha: {grace_period: 2, reduction_factor: 2}}
resources: {workers: 1, cpus_per_worker: 1, gpus_per_worker: 0}
```

The baseline's values of the searched keys are the sweep's first point, so the report's own
configuration is always evaluated first. ``extra_points`` adds more starting points.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from vidtune.config import ConfigError, TrialConfig, from_dict, get_path

SPACES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "search_spaces")
TOP_KEYS = ("name", "recipe", "description", "data", "fixed", "space", "extra_points", "tune", "resources")


@dataclass
class AshaSettings:
    max_t: int = 0  # 0 = the trial config's train.epochs
    grace_period: int = 1
    reduction_factor: int = 2

    def __post_init__(self) -> None:
        problems = []
        if self.max_t < 0 or self.grace_period < 1:
            problems.append("max_t must be >= 0 and grace_period >= 1")
        if self.reduction_factor < 2:
            problems.append(f"reduction_factor: must be >= 2 (got {self.reduction_factor})")
        if problems:
            raise ConfigError(problems)


@dataclass
class TuneSettings:
    metric: str = "val_top1"
    mode: str = "max"
    num_samples: int = 8
    max_concurrent: int = 0  # 0 = as many as the resources allow
    seed: int = 0
    tpe_startup_trials: int = 0  # random trials before TPE models the space; 0 = num_samples // 3
    asha: AshaSettings = field(default_factory=AshaSettings)

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in ("max", "min"):
            problems.append(f"mode: must be 'max' or 'min' (got {self.mode!r})")
        if self.num_samples < 1:
            problems.append(f"num_samples: must be >= 1 (got {self.num_samples})")
        if self.max_concurrent < 0:
            problems.append(f"max_concurrent: must be >= 0 (got {self.max_concurrent})")
        if problems:
            raise ConfigError(problems)


@dataclass
class Resources:
    workers: int = 1  # DDP workers per trial; 1 runs the trial in its own process, no worker group
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # A custom Ray resource (e.g. `vidtune_driver`) that only reliable, non-spot nodes carry: a
    # multi-worker trial's driver asks for a sliver of it, so losing a spot node never kills one.
    driver_resource: str = ""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ConfigError(
                f"workers >= 1, cpus_per_worker > 0, gpus_per_worker >= 0 (got {self.workers}, "
                f"{self.cpus_per_worker}, {self.gpus_per_worker})"
            )


@dataclass
class DataSource:
    path: str = ""  # manifest, folder-per-class folder, list file or CSV
    synthetic: dict = field(default_factory=dict)  # arguments of `vidtune data synth`


@dataclass
class SweepSpace:
    name: str
    recipe: str
    path: str
    data: DataSource
    base: TrialConfig  # defaults + fixed, with the tuning metric
    params: dict[str, Any]  # dotted path -> optuna distribution
    points: list[dict[str, Any]]  # starting points, the baseline first
    tune: TuneSettings
    resources: Resources

    def trial_config(self, sampled: dict[str, Any]) -> TrialConfig:
        return self.base.with_overrides(sampled)


def default_space_path(name: str = "quickstart") -> str:
    return os.path.join(SPACES_DIR, f"{name}.yaml")


def load_space(path: str) -> SweepSpace:
    """Parse and check a space file; every problem is reported at once, prefixed by the file."""
    if not os.path.exists(path):
        named = default_space_path(path)
        if os.path.exists(named):  # `--space quickstart` names a shipped space
            path = named
        else:
            raise FileNotFoundError(f"{path}: no such space file (shipped spaces: {shipped_spaces()})")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} malformed YAML ({getattr(e, 'problem', e)})") from None
    try:
        return parse_space(raw, path)
    except ConfigError as e:
        raise e.prefixed(f"{path}: ") from None


def shipped_spaces() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(SPACES_DIR) if f.endswith(".yaml")) if os.path.isdir(SPACES_DIR) else []


def parse_space(raw: Any, path: str = "<space>") -> SweepSpace:
    from vidtune.recipes import RECIPES

    if not isinstance(raw, dict):
        raise ConfigError("expected a mapping at the top level")
    problems: list[str] = []
    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        problems.append(f"{', '.join(unknown)}: unknown key; known keys: {list(TOP_KEYS)}")
    recipe = raw.get("recipe", "classify")
    if recipe not in RECIPES:
        problems.append(f"recipe: unknown {recipe!r}; choose one of {sorted(RECIPES)}")

    def section(cls, key):
        try:
            return from_dict(cls, raw.get(key) or {}, key)
        except ConfigError as e:
            problems.extend(e.problems)
            return None

    tune = section(TuneSettings, "tune")
    resources = section(Resources, "resources")
    data = section(DataSource, "data")
    base = None
    try:
        base = TrialConfig.from_dict(
            {**(raw.get("fixed") or {}), "recipe": recipe, "metric": (tune or TuneSettings()).metric,
             "mode": (tune or TuneSettings()).mode},
            "fixed",
        ) if recipe in RECIPES else None
        if base is not None:
            base.options = RECIPES[recipe].default_options(base.options)
    except ConfigError as e:
        problems.extend(e.problems if not e.problems[0].startswith("options.") else [f"fixed.{p}" for p in e.problems])

    params: dict[str, Any] = {}
    space = raw.get("space") or {}
    if not isinstance(space, dict):
        problems.append("space: expected a mapping of dotted config paths to distributions")
        space = {}
    for key, spec in space.items():
        try:
            params[key] = to_distribution(spec, f"space.{key}")
            if base is not None:
                _check_path(base, key)
        except ConfigError as e:
            problems.extend(e.problems)
    if not params:
        problems.append("space: no parameters to search")
    if problems:
        raise ConfigError(problems)

    points = [_baseline_point(base, params)]
    for i, extra in enumerate(raw.get("extra_points") or []):
        point = {**points[0], **(extra or {})}
        for key, value in point.items():
            if key not in params:
                problems.append(f"extra_points[{i}].{key}: not a searched parameter")
            elif not _contains(params[key], value):
                problems.append(f"extra_points[{i}].{key}: {value!r} is outside {_describe(params[key])}")
        points.append(point)
    if problems:
        raise ConfigError(problems)
    # Each point must also make a valid trial config (catches e.g. crop > decode size).
    for point in points:
        base.with_overrides(point)
    return SweepSpace(
        name=str(raw.get("name") or os.path.splitext(os.path.basename(path))[0]),
        recipe=recipe,
        path=os.path.abspath(path) if os.path.exists(path) else path,
        data=data,
        base=base,
        params=params,
        points=points,
        tune=tune,
        resources=resources,
    )


def to_distribution(spec: Any, where: str):
    """Optuna short form -> ``optuna.distributions`` object (which checks its own bounds)."""
    import optuna.distributions as od

    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{where}: expected {{type: float|int|categorical, ...}} (got {spec!r})")
    kind = spec["type"]
    allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}, "categorical": {"choices"}}
    if kind not in allowed:
        raise ConfigError(f"{where}.type: unknown {kind!r}; choose one of {list(allowed)}")
    extra = sorted(set(spec) - allowed[kind] - {"type"})
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {extra} for type {kind}; allowed: {sorted(allowed[kind])}")
    try:
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}.choices: expected a non-empty list (got {choices!r})")
            return od.CategoricalDistribution(choices)
        for bound in ("low", "high"):
            if bound not in spec:
                raise ConfigError(f"{where}: missing '{bound}'")
        low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
        if low >= high:
            raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
        if kind == "float":
            step = spec.get("step")
            return od.FloatDistribution(float(low), float(high), log=bool(spec.get("log", False)),
                                        step=None if step is None else float(step))
        if int(low) != low or int(high) != high:
            raise ConfigError(f"{where}: int bounds must be integers (got {low}, {high})")
        return od.IntDistribution(int(low), int(high), log=bool(spec.get("log", False)), step=int(spec.get("step", 1)))
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from None


def _number(value: Any, where: str) -> float:
    try:
        return float(value)  # YAML reads 1e-3 (no dot) as a string
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number (got {value!r})") from None


def _check_path(base: TrialConfig, key: str) -> None:
    try:
        get_path(base.to_dict(), key)
    except KeyError:
        raise ConfigError(
            f"space.{key}: not a trial config key (e.g. train.lr, model.dropout, data.sampler_power, "
            f"options.<recipe knob>; this recipe's options: {sorted(base.options)})"
        ) from None


def _baseline_point(base: TrialConfig, params: dict[str, Any]) -> dict[str, Any]:
    point, problems = {}, []
    tree = base.to_dict()
    for key, dist in params.items():
        value = get_path(tree, key)
        if not _contains(dist, value):
            problems.append(f"fixed.{key}: the baseline value {value!r} is outside space.{key} {_describe(dist)}")
        point[key] = value
    if problems:
        raise ConfigError(problems)
    return point


def _contains(dist, value) -> bool:
    import optuna.distributions as od

    if isinstance(dist, od.CategoricalDistribution):
        return value in dist.choices
    try:
        return dist.low <= float(value) <= dist.high
    except (TypeError, ValueError):
        return False


def _describe(dist) -> str:
    import optuna.distributions as od

    if isinstance(dist, od.CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    return f"[{dist.low}, {dist.high}]"
