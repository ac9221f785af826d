"""Trial configuration: small dataclasses that validate themselves.

A trial's configuration is ``TrialConfig(data, model, train)``. A space file's ``fixed:``
section is a partial ``TrialConfig`` dict (the recipe's baseline); its ``space:`` section names
dotted paths into it (``train.lr``). ``from_dict`` rejects unknown keys with their full path and
collects every problem before raising once, so a user fixes a file in one pass.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """Bad user configuration; the message names the key path and the value at fault.

    ``problems`` keeps each finding separately so callers can prefix them with where they were
    found (a file, a section) before showing them together.
    """

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

    def prefixed(self, prefix: str) -> ConfigError:
        return ConfigError([f"{prefix}{p}" for p in self.problems])


@dataclass
class DataConfig:
    """How clips are sampled and transformed. Layout of a clip tensor: ``(C, T, H, W)``."""

    num_segments: int = 8  # the video is split into this many equal segments...
    frames_per_segment: int = 1  # ...and this many consecutive frames are taken from each
    frame_stride: int = 1  # step between consecutive frames inside a segment
    decode_short_side: int = 72  # frames are decoded with this short side, then cropped
    crop_size: int = 64
    channels: int = 3  # 1 = greyscale (thermal, lip reading)
    scale_min: float = 0.5  # random-resized-crop area range is [scale_min, 1]
    hflip: float = 0.5  # probability; set 0 where left/right carries the label
    mean: list = field(default_factory=lambda: [0.45, 0.45, 0.45])
    std: list = field(default_factory=lambda: [0.225, 0.225, 0.225])
    num_workers: int = -1  # DataLoader workers per trial process; -1 = chosen from the CPUs given
    sampler_power: float = 0.0  # class-balanced sampling: weight ~ freq^-p (0 plain, 0.5 sqrt, 1 balanced)
    cache: bool = True  # decode once into the shared clip cache (<storage>/cache) and read from it
    cache_max_frames: int = 128  # frames cached per training video; longer ones keep this many, evenly spaced
    device_transforms: str = "auto"  # flip + normalise on the training device: auto (on CUDA) | on | off

    def __post_init__(self) -> None:
        problems = []
        for name in ("num_segments", "frames_per_segment", "frame_stride", "crop_size", "decode_short_side",
                     "cache_max_frames"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if self.channels not in (1, 3):
            problems.append(f"channels: must be 1 or 3 (got {self.channels})")
        if self.decode_short_side < self.crop_size:
            problems.append(
                f"decode_short_side: must be >= crop_size ({self.crop_size}) (got {self.decode_short_side})"
            )
        if not 0.0 < self.scale_min <= 1.0:
            problems.append(f"scale_min: must be in (0, 1] (got {self.scale_min})")
        if not 0.0 <= self.hflip <= 1.0:
            problems.append(f"hflip: must be a probability in [0, 1] (got {self.hflip})")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, 3):
                problems.append(f"{name}: must have 1 or 3 values (got {getattr(self, name)})")
        if any(s <= 0 for s in self.std):
            problems.append(f"std: must be positive (got {self.std})")
        if self.sampler_power < 0:
            problems.append(f"sampler_power: must be >= 0 (got {self.sampler_power})")
        if self.device_transforms not in ("auto", "on", "off"):
            problems.append(f"device_transforms: unknown {self.device_transforms!r}; choose one of ['auto', 'on', 'off']")
        _raise_if(problems)

    @property
    def num_frames(self) -> int:
        return self.num_segments * self.frames_per_segment


@dataclass
class ModelConfig:
    """Which network. ``arch``: ``cnn3d`` (small in-house 3D CNN), ``timm`` (2D backbone per
    frame + temporal head), ``torchvision`` (a ``torchvision.models.video`` model by name),
    ``slowfast`` (in-house SlowFast; ``widths[0]`` is its width) or ``lipcnn`` (report 002's 3D CNN)."""

    arch: str = "cnn3d"
    backbone: str = ""  # timm or torchvision model name
    temporal_head: str = "avg"  # timm only: avg | attention
    spatial_grid: int = 1  # timm only: pool each frame's features to grid x grid (1: global), keeps position
    widths: list = field(default_factory=lambda: [16, 32, 64])  # cnn3d stage widths
    # Scales every entry of ``widths`` (cnn3d, lipcnn, slowfast): model capacity as one searchable
    # number (report 002 went from a 290K to a 5.2M-parameter 3D CNN by hand).
    width_mult: float = 1.0
    pool: str = "avg"  # cnn3d, lipcnn and timm global pooling: avg | max (max keeps small moving objects visible)
    depths: list = field(default_factory=lambda: [1, 1, 1, 1])  # slowfast blocks per stage ([3, 4, 6, 3] = R50)
    speed_ratio: int = 4  # slowfast alpha: the slow pathway sees every alpha-th frame
    channel_ratio: float = 0.125  # slowfast beta: fast pathway width / slow pathway width
    kernels: list = field(default_factory=lambda: [7, 5, 3, 3])  # lipcnn spatial kernel per block
    head: list = field(default_factory=lambda: [256, 128])  # lipcnn hidden head layers
    dropout: float = 0.2
    pretrained: bool = False  # hub weights (needs network access)
    pretrained_path: str = ""  # local weights file, for offline use
    # timm only: a frozen backbone; its per-frame features (validation view) are computed once per
    # data set and cached, and trials train only the temporal head on them
    freeze_backbone: bool = False

    ARCHES = ("cnn3d", "timm", "torchvision", "slowfast", "lipcnn")
    HEADS = ("avg", "attention")

    def __post_init__(self) -> None:
        problems = []
        if self.arch not in self.ARCHES:
            problems.append(f"arch: unknown {self.arch!r}; choose one of {list(self.ARCHES)}")
        if self.arch in ("timm", "torchvision") and not self.backbone:
            problems.append(f"backbone: required when arch is {self.arch!r}")
        if self.temporal_head not in self.HEADS:
            problems.append(f"temporal_head: unknown {self.temporal_head!r}; choose one of {list(self.HEADS)}")
        if self.freeze_backbone and self.arch != "timm":
            problems.append(f"freeze_backbone: only for arch 'timm' (got arch {self.arch!r})")
        if not 1 <= self.spatial_grid <= 4:
            problems.append(f"spatial_grid: must be 1..4 (got {self.spatial_grid})")
        if self.pool not in ("avg", "max"):
            problems.append(f"pool: unknown {self.pool!r}; choose one of ['avg', 'max']")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout: must be in [0, 1) (got {self.dropout})")
        if self.speed_ratio < 1 or not 0 < self.channel_ratio <= 1:
            problems.append(f"speed_ratio must be >= 1 and channel_ratio in (0, 1] (got {self.speed_ratio}, {self.channel_ratio})")
        if self.arch == "slowfast" and len(self.depths) != 4:
            problems.append(f"depths: slowfast needs 4 stage depths (got {self.depths})")
        if self.arch == "lipcnn" and len(self.kernels) != len(self.widths):
            problems.append(f"kernels: one per entry of widths ({len(self.widths)}) (got {self.kernels})")
        if not 0 < self.width_mult <= 8:
            problems.append(f"width_mult: must be in (0, 8] (got {self.width_mult})")
        if not self.widths or any(int(w) < 1 for w in self.widths):
            problems.append(f"widths: must be a non-empty list of positive ints (got {self.widths})")
        _raise_if(problems)

    def scaled_widths(self) -> list[int]:
        """``widths`` times ``width_mult``, rounded, at least 1 channel each."""
        return [max(1, round(int(w) * self.width_mult)) for w in self.widths]


@dataclass
class TrainConfig:
    """The optimisation loop. ``precision``: auto (bf16 on CPU, fp16 on CUDA), fp32, bf16, fp16."""

    epochs: int = 10
    batch_size: int = 16  # per worker
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3  # peak learning rate (OneCycle max_lr)
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    schedule: str = "onecycle"  # onecycle | cosine | constant | step
    step_size: int = 10  # step schedule: epochs between decays
    step_gamma: float = 0.5  # step schedule: decay factor
    warmup_pct: float = 0.1  # fraction of steps spent warming up (onecycle, cosine)
    onecycle_div: float = 25.0  # onecycle: the starting lr is lr / onecycle_div
    label_smoothing: float = 0.0
    precision: str = "auto"
    accumulate: int = 1  # optimiser step every N batches
    clip_grad_norm: float = 0.0  # 0 = off
    early_stop_patience: int = 0  # epochs without improvement before stopping; 0 = off
    ema_decay: float = 0.0  # validate and keep the best checkpoint with an EMA of the weights; 0 = off
    seed: int = 0

    OPTIMIZERS = ("adamw", "sgd")
    SCHEDULES = ("onecycle", "cosine", "constant", "step")
    PRECISIONS = ("auto", "fp32", "bf16", "fp16")

    def __post_init__(self) -> None:
        problems = []
        for name in ("epochs", "batch_size", "accumulate"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if self.optimizer not in self.OPTIMIZERS:
            problems.append(f"optimizer: unknown {self.optimizer!r}; choose one of {list(self.OPTIMIZERS)}")
        if self.schedule not in self.SCHEDULES:
            problems.append(f"schedule: unknown {self.schedule!r}; choose one of {list(self.SCHEDULES)}")
        if self.precision not in self.PRECISIONS:
            problems.append(f"precision: unknown {self.precision!r}; choose one of {list(self.PRECISIONS)}")
        if self.lr <= 0:
            problems.append(f"lr: must be > 0 (got {self.lr})")
        if self.weight_decay < 0:
            problems.append(f"weight_decay: must be >= 0 (got {self.weight_decay})")
        if not 0.0 <= self.warmup_pct < 1.0:
            problems.append(f"warmup_pct: must be in [0, 1) (got {self.warmup_pct})")
        if self.step_size < 1:
            problems.append(f"step_size: must be >= 1 epoch (got {self.step_size})")
        if self.step_gamma <= 0:
            problems.append(f"step_gamma: must be > 0 (got {self.step_gamma})")
        if self.onecycle_div < 1:
            problems.append(f"onecycle_div: must be >= 1, the start lr is lr / onecycle_div (got {self.onecycle_div})")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing: must be in [0, 1) (got {self.label_smoothing})")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay: must be in [0, 1) (0 = off) (got {self.ema_decay})")
        if self.clip_grad_norm < 0 or self.early_stop_patience < 0:
            problems.append("clip_grad_norm and early_stop_patience: must be >= 0")
        _raise_if(problems)


@dataclass
class TrialConfig:
    """Everything one trial needs besides its data. ``metric``/``mode`` come from the space's tuning
    settings and drive early stopping and best-checkpoint selection."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: str = "classify"
    options: dict = field(default_factory=dict)  # the recipe's own knobs (loss weights, gamma...)
    metric: str = "val_top1"
    mode: str = "max"

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode: must be 'max' or 'min' (got {self.mode!r})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "") -> TrialConfig:
        return from_dict(cls, data or {}, where)

    def with_overrides(self, overrides: dict[str, Any]) -> TrialConfig:
        """A copy with dotted-path values replaced (``{"train.lr": 0.01}``), re-validated."""
        raw = self.to_dict()
        for path, value in overrides.items():
            set_path(raw, path, value)
        return TrialConfig.from_dict(raw)


def get_path(tree: dict, path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(path)
        node = node[part]
    return node


def set_path(tree: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise ConfigError(problems)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Convert YAML scalars to the field's type (YAML reads ``1e-3`` as a string)."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false (got {value!r})")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{path}: expected an integer (got {value!r})")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number (got {value!r})")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string (got {value!r})")
        return value
    if hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping (got {value!r})")
        return dict(value)
    if hint is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list (got {value!r})")
        return list(value)
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, naming every unknown key and bad value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping (got {data!r})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    prefix = f"{where}." if where else ""
    for key, value in data.items():
        if key not in fields:
            problems.append(f"{prefix}{key}: unknown key; known keys: {sorted(fields)}")
            continue
        hint = hints[key]
        try:
            if dataclasses.is_dataclass(hint):
                kwargs[key] = from_dict(hint, value, f"{prefix}{key}")
            else:
                kwargs[key] = _coerce(value, hint, f"{prefix}{key}")
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems)
    try:
        return cls(**copy.deepcopy(kwargs))
    except ConfigError as e:
        raise e.prefixed(prefix) from None
