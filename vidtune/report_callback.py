"""Refresh the sweep's report on the parent run while trials finish.

The figures take seconds of CPU (plotly, matplotlib, Optuna importances): drawing them in the
sweep process would stall Tune's event loop and share pyplot's global state with the per-trial
figures, so each refresh runs ``python -m vidtune.report`` in a child process, one at a time, at
most every ``VIDTUNE_REPORT_EVERY_S`` seconds (default 120; negative turns refreshing off). The
final report is written by ``run_sweep`` after the last trial, once this child has finished.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

from ray import tune


class ReportRefreshCallback(tune.Callback):
    def __init__(self, tracking_uri: str, experiment: str, parent_id: str, every_s: float | None = None):
        self.tracking_uri, self.experiment, self.parent_id = tracking_uri, experiment, parent_id
        self.every_s = float(os.environ.get("VIDTUNE_REPORT_EVERY_S", "120")) if every_s is None else every_s
        self.refreshes = 0  # children that exited 0
        self._proc: subprocess.Popen | None = None
        self._dirty = False
        self._last = time.time()

    def __getstate__(self):  # Tune pickles its run config for restores; a child process stays behind
        state = dict(self.__dict__)
        state["_proc"] = None
        return state

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._dirty = True

    def on_trial_error(self, iteration, trials, trial, **info):
        self._dirty = True

    def on_step_end(self, iteration, trials, **info):
        self.poll()

    def on_experiment_end(self, trials, **info):
        self.wait()

    def poll(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                return  # the previous refresh is still drawing
            self.refreshes += self._proc.returncode == 0
            self._proc = None
        if self.every_s < 0 or not self._dirty or time.time() - self._last < self.every_s:
            return
        self._dirty, self._last = False, time.time()
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "vidtune.report", self.tracking_uri, self.experiment, self.parent_id])
        except OSError as e:
            print(f"sweep report not refreshed ({e})")

    def wait(self, timeout_s: float = 300.0) -> None:
        """Let a running refresh finish (the final report must not be overwritten by a stale one)."""
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout=timeout_s)
            self.refreshes += self._proc.returncode == 0
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


class ProgressCallback(tune.Callback):
    """A progress line when a trial ends and at most every ``VIDTUNE_PROGRESS_EVERY_S`` seconds
    (default 30) otherwise: trials finished (completed / pruned by ASHA / failed) and running, the
    best value so far and an ETA (mean trial time so far x waves of trials left). Tune's own table
    lists trials but cannot tell a pruned trial from a completed one."""

    def __init__(self, metric: str, mode: str, num_samples: int, concurrency: int, every_s: float | None = None):
        self.metric, self.mode, self.num_samples, self.concurrency = metric, mode, num_samples, max(1, concurrency)
        self.every_s = float(os.environ.get("VIDTUNE_PROGRESS_EVERY_S", "30")) if every_s is None else every_s
        self.started: dict[str, float] = {}
        self.ended: dict[str, str] = {}
        self.durations: list[float] = []
        self.last: dict[str, dict] = {}
        self.best: tuple[float, str] | None = None
        self._printed = time.time()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started.setdefault(trial.trial_id, time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.last[trial.trial_id] = result
        value = result.get(f"best_{self.metric}", result.get(self.metric))
        if isinstance(value, (int, float)) and math.isfinite(value) and (
                self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])):
            self.best = (float(value), trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = self.last.get(trial.trial_id) or trial.last_result or {}
        self._end(trial.trial_id, "completed" if last.get("vidtune_finished") else "pruned")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial.trial_id, "failed")

    def on_step_end(self, iteration, trials, **info):
        if self.every_s >= 0 and time.time() - self._printed >= self.every_s and self.started:
            print(self.line())

    def _end(self, trial_id: str, status: str) -> None:
        if trial_id in self.ended:
            return
        self.ended[trial_id] = status
        self.durations.append(time.time() - self.started.get(trial_id, time.time()))
        print(self.line())

    def line(self) -> str:
        self._printed = time.time()
        counts = {s: sum(v == s for v in self.ended.values()) for s in ("completed", "pruned", "failed")}
        running = len(set(self.started) - set(self.ended))
        text = (f"progress: {len(self.ended)}/{self.num_samples} trials finished ({counts['completed']} completed, "
                f"{counts['pruned']} pruned, {counts['failed']} failed), {running} running")
        if self.best is not None:
            text += f"; best {self.metric} {self.best[0]:.4f} (trial {self.best[1]})"
        left = self.num_samples - len(self.ended)
        if left > 0 and self.durations:
            eta = -(-left // self.concurrency) * sum(self.durations) / len(self.durations)
            text += f"; ETA ~{eta / 60:.1f} min" if eta >= 90 else f"; ETA ~{eta:.0f} s"
        return text
