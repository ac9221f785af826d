"""Shared fixtures: tiny real encoded videos, written once per test session."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory) -> str:
    """A 4-class synthetic set (8 videos a class, 2 of them val) as H.264 MP4s; its manifest path."""
    from vidtune.data.synth import synthesize

    out = tmp_path_factory.mktemp("tiny_set")
    return synthesize(str(out), "quickstart", num_classes=4, videos_per_class=8, seed=1)


@pytest.fixture(scope="session")
def quick_set(tmp_path_factory) -> str:
    """The quickstart profile at a size a short training run learns from (4 directions x 30)."""
    from vidtune.data.synth import synthesize

    out = tmp_path_factory.mktemp("quick_set")
    return synthesize(str(out), "quickstart", num_classes=4, videos_per_class=30, seed=2)


def random_frames(t: int = 12, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """Frames with a moving gradient, so every frame differs from its neighbours."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return np.stack([np.roll(base, shift=3 * i, axis=1) for i in range(t)])


@pytest.fixture
def lossless_video(tmp_path):
    from vidtune.data.synth import write_video

    frames = random_frames()
    path = str(tmp_path / "lossless.mkv")
    write_video(path, frames, fps=10, lossless=True)
    return path, frames


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray for the session (2 CPUs, dashboard on for the state API)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
