"""Shared by the benchmarks: arguments, a synthetic data set, the machine, the final JSON line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def parse_args(doc: str, extra=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller run (under 2 minutes on 2 cores)")
    p.add_argument("--workdir", default=None, help="where to write data and caches (default: a temporary folder)")
    if extra:
        extra(p)
    return p.parse_args()


def make_set(root: str, classes: int, per_class: int, seed: int = 0, recipe: str = "quickstart") -> str:
    """A synthetic set of real H.264 MP4s (vidtune.data.synth); its manifest path. Reused if present."""
    from vidtune.data.synth import synthesize

    folder = os.path.join(root, f"{recipe}-c{classes}-v{per_class}-s{seed}")
    manifest = os.path.join(folder, "manifest.parquet")
    if not os.path.exists(manifest):
        t0 = time.perf_counter()
        synthesize(folder, recipe, classes if recipe == "quickstart" else None, per_class, seed)
        print(f"data: wrote {folder} in {time.perf_counter() - t0:.1f} s")
    return manifest


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": sys.version.split()[0], "torch": torch.__version__}


def finish(result: dict) -> None:
    """The last line of every benchmark: one JSON object."""
    result = {**result, "machine": machine()}
    print(json.dumps(result), flush=True)


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1) if seconds > 0 else float("inf")
