"""Optuna inside Ray Tune, with Optuna's own bookkeeping.

Ray's ``OptunaSearch`` tells Optuna that a trial ASHA stopped is COMPLETE, with the value of its
last (low-budget) epoch: TPE then ranks a 1-epoch score beside full-budget ones. Here a trial is
COMPLETE only when it ran its budget or early-stopped itself (``vidtune_finished`` == 1 in its last
result, set by ``fit()``); a trial Tune stopped is PRUNED, its per-epoch values kept as Optuna
intermediate values (``step`` = epoch, not Tune's ``training_iteration``, which restarts after a
restore); a trial that raised is FAIL. That is what an Optuna study with a pruner would hold, so
TPE, optuna-dashboard and ``optuna.load_study`` see the sweep as it really went.
"""

from __future__ import annotations

import logging
import math

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class HonestOptunaSearch(OptunaSearch):
    def __init__(self, *args, time_attr: str = "epoch", finished_key: str = "vidtune_finished", **kwargs):
        self._time_attr, self._finished_key = time_attr, finished_key
        self._reported: dict[str, set[int]] = {}
        super().__init__(*args, **kwargs)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if isinstance(self.metric, list) or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        self._report(trial_id, result)

    def _report(self, trial_id: str, result: dict) -> None:
        value = result.get(self.metric)
        if not _finite(value):
            return
        step = int(result.get(self._time_attr, result.get("training_iteration", 0)))
        reported = getattr(self, "_reported", None)
        if reported is None:  # a searcher pickled before this attribute existed
            reported = self._reported = {}
        seen = reported.setdefault(trial_id, set())
        if step in seen:
            return  # a restarted trial replays epochs; Optuna keeps the first value of a step
        seen.add(step)
        self._ot_trials[trial_id].report(float(value), step)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if isinstance(self.metric, list):
            return super().on_trial_complete(trial_id, result, error)
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        result = result or {}
        # Tune hands a trial's final result (the one ASHA stopped it on, or its last epoch) to
        # on_trial_complete only, never to on_trial_result: record it as an intermediate value too.
        self._report(trial_id, result)
        # The trial's outcome is its best epoch (that is the checkpoint it leaves), else its last.
        value = result.get(f"best_{self.metric}", result.get(self.metric))
        if error:
            state, value = TrialState.FAIL, None
        elif result.get(self._finished_key) and _finite(value):
            state, value = TrialState.COMPLETE, float(value)
        elif result.get(self._finished_key):
            state, value = TrialState.FAIL, None  # ran its budget but its metric is NaN/missing
        else:
            # Stopped by the scheduler: Optuna stores its last intermediate value as the value.
            state, value = TrialState.PRUNED, None
        try:
            self._ot_study.tell(ot_trial, value, state=state)
        except Exception as e:  # Optuna refuses e.g. a second tell; the sweep must go on
            logger.warning("optuna: could not record trial %s as %s: %s", trial_id, state.name, e)
        self._completed_trials.add(trial_id)


def load_study(storage: str, study_name: str) -> optuna.Study:
    """A sweep's persisted study (``--optuna-storage``); its name is the sweep's name."""
    return optuna.load_study(study_name=study_name, storage=storage)
