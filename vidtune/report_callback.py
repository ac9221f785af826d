"""Refresh the sweep's report on the parent run while trials finish.

The figures take seconds of CPU (plotly, matplotlib, Optuna importances): drawing them in the
sweep process would stall Tune's event loop and share pyplot's global state with the per-trial
figures, so each refresh runs ``python -m vidtune.report`` in a child process, one at a time, at
most every ``VIDTUNE_REPORT_EVERY_S`` seconds (default 120; negative turns refreshing off). The
final report is written by ``run_sweep`` after the last trial, once this child has finished.
"""

from __future__ import annotations

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
