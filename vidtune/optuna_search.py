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


WARM_FROM = "vidtune.warm_start_from"  # user attribute of a trial copied from an earlier sweep's study


class HonestOptunaSearch(OptunaSearch):
    """``warm_start_prefix``: with a persistent ``storage``, the finished trials (COMPLETE and
    PRUNED) of earlier studies whose names start with it are copied into this sweep's new study
    before the first suggestion, so TPE starts from what earlier sweeps of the space learnt. Only
    trials whose parameters all lie in the current space are taken; copies are not copied again."""

    def __init__(self, *args, time_attr: str = "epoch", finished_key: str = "vidtune_finished",
                 warm_start_prefix: str | None = None, **kwargs):
        self._time_attr, self._finished_key = time_attr, finished_key
        self._reported: dict[str, set[int]] = {}
        self._warm_start_prefix = warm_start_prefix
        self.warm_started = 0
        super().__init__(*args, **kwargs)

    def _setup_study(self, mode):
        super()._setup_study(mode)
        if self._storage is not None and getattr(self, "_warm_start_prefix", None) and isinstance(self._space, dict):
            try:
                self.warm_started = warm_start(self._ot_study, self._storage, self._warm_start_prefix, self._space)
            except Exception as e:  # an unreadable old study costs the warm start, not the sweep
                logger.warning("optuna: no warm start from %s* (%s)", self._warm_start_prefix, e)
            if self.warm_started:
                print(f"optuna: warm start with {self.warm_started} finished trials of earlier "
                      f"'{self._warm_start_prefix}*' studies")

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


def warm_start(study: optuna.Study, storage, prefix: str, space: dict) -> int:
    """Copy earlier studies' finished trials that fit ``space`` into ``study``; returns how many."""
    from optuna.trial import create_trial

    # A study that already ran trials (the same sweep again) keeps what it has; the starting points
    # enqueued by Ray (WAITING) do not count.
    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        return 0
    copied = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        name = summary.study_name
        if name == study.study_name or not name.startswith(prefix) or summary.directions != study.directions:
            continue
        for t in optuna.load_study(study_name=name, storage=storage).get_trials(
                deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if t.user_attrs.get(WARM_FROM) or set(t.params) != set(space) or not all(
                    _fits(space[k], v) for k, v in t.params.items()):
                continue
            copied.append(create_trial(
                state=t.state, value=t.value, params=t.params, distributions={k: space[k] for k in t.params},
                intermediate_values=t.intermediate_values, user_attrs={**t.user_attrs, WARM_FROM: name},
            ))
    if copied:
        study.add_trials(copied)
    return len(copied)


def _fits(dist, value) -> bool:
    try:
        return bool(dist._contains(dist.to_internal_repr(value)))
    except Exception:
        return False


def load_study(storage: str, study_name: str) -> optuna.Study:
    """A sweep's persisted study (``--optuna-storage``); its name is the sweep's name."""
    return optuna.load_study(study_name=study_name, storage=storage)
