"""Sweep insight from MLflow alone: plots, ``trials.parquet`` and ``summary.md`` for a sweep, and
per-trial figures (confusion matrix, per-class table, learning curves).

Everything is rebuilt from what the tracking store holds (the parent run, its trial runs, their
per-epoch metric histories), so the end-of-sweep artifacts and ``vidtune report`` are the same
code and a report can be regenerated long after the Ray results folder is gone. Optuna's plots
need a study: one is rebuilt in memory from the runs (COMPLETE/PRUNED/FAIL, per-epoch values as
intermediate values). Figures are extras: ``publish_sweep_report`` and ``log_trial_artifacts``
print one line and return when something goes wrong instead of failing a sweep.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field

from vidtune.metrics import class_keys
from vidtune.tracking import (
    BEST_RUN,
    METRIC,
    MODE,
    PARENT,
    REASON,
    ROLE,
    STATUS,
    SWEEP_NAME,
    TRIAL_ID,
    TrackingError,
)

PLOTS = ("optimization_history", "parallel_coordinate", "param_importances", "intermediate_values", "timeline")
STATES = {"completed": "COMPLETE", "pruned": "PRUNED", "failed": "FAIL"}


@dataclass
class TrialRecord:
    trial_id: str
    run_id: str
    status: str  # completed / pruned / failed / running
    params: dict[str, str]
    best: float | None
    curve: dict[int, float]  # epoch -> tuned metric
    start_ms: int
    end_ms: int | None
    node: str = ""
    reason: str = ""
    epoch_time_s: float | None = None

    @property
    def epochs(self) -> int:
        return max(self.curve) if self.curve else 0

    @property
    def wall_s(self) -> float | None:
        return None if self.end_ms is None else round((self.end_ms - self.start_ms) / 1000, 1)


@dataclass
class SweepRecord:
    experiment: str
    parent_id: str
    sweep_name: str
    metric: str
    mode: str
    max_epochs: int | None
    space_path: str | None
    start_ms: int
    end_ms: int | None
    best_run_id: str | None = None  # the sweep's own pick (tag vidtune.best_run_id): wins ties
    trials: list[TrialRecord] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.trials)

    def ranked(self) -> list[TrialRecord]:
        """Trials with a value, best first; completed before pruned (a pruned value is low-budget)."""
        sign = -1 if self.mode == "max" else 1
        scored = [t for t in self.trials if t.best is not None and t.status in ("completed", "pruned")]
        return sorted(scored, key=lambda t: (t.status != "completed", sign * t.best, t.run_id != self.best_run_id))


# ----------------------------------------------------------------------------------------------
# Reading a sweep back from MLflow
# ----------------------------------------------------------------------------------------------
def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def find_sweep_run(client, experiment: str, parent_id: str | None = None):
    """The sweep's parent run: ``parent_id``, else the experiment's latest sweep."""
    if parent_id:
        return client.get_run(parent_id)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"no experiment named {experiment!r} in {client.tracking_uri}")
    runs = client.search_runs([exp.experiment_id], f"tags.`{ROLE}` = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise TrackingError(f"experiment {experiment!r}: no sweep run (tag {ROLE}=sweep) in {client.tracking_uri}")
    return runs[0]


def read_sweep(client, experiment: str, parent_id: str | None = None) -> SweepRecord:
    parent = find_sweep_run(client, experiment, parent_id)
    tags, params = parent.data.tags, parent.data.params
    metric = tags.get(METRIC, "val_top1")
    max_epochs = params.get("max_epochs")
    rec = SweepRecord(
        experiment=experiment, parent_id=parent.info.run_id, sweep_name=tags.get(SWEEP_NAME, parent.info.run_name or ""),
        metric=metric, mode=tags.get(MODE, "max"), max_epochs=int(max_epochs) if max_epochs else None,
        space_path=params.get("space"), start_ms=parent.info.start_time, end_ms=parent.info.end_time,
        best_run_id=tags.get(BEST_RUN),
    )
    runs = client.search_runs([parent.info.experiment_id], f"tags.`{PARENT}` = '{parent.info.run_id}'", max_results=5000)
    for run in runs:
        if run.data.tags.get(ROLE) != "trial":
            continue
        history = client.get_metric_history(run.info.run_id, metric)
        curve: dict[int, float] = {}
        for m in sorted(history, key=lambda m: (m.step, m.timestamp)):
            curve.setdefault(int(m.step), float(m.value))  # a replayed epoch keeps its first value
        best = run.data.metrics.get(f"best_{metric}")
        if best is None and curve:
            best = (max if rec.mode == "max" else min)(curve.values())
        rec.trials.append(TrialRecord(
            trial_id=run.data.tags.get(TRIAL_ID, run.info.run_name or run.info.run_id), run_id=run.info.run_id,
            status=run.data.tags.get(STATUS, "running"), params=dict(run.data.params),
            best=best if best is None or math.isfinite(best) else None, curve=curve,
            start_ms=run.info.start_time, end_ms=run.info.end_time, node=run.data.tags.get("vidtune.nodes", ""),
            reason=run.data.tags.get(REASON, ""), epoch_time_s=run.data.metrics.get("epoch_time_s"),
        ))
    rec.trials.sort(key=lambda t: (t.start_ms, t.trial_id))
    if rec.max_epochs is None and rec.trials:
        rec.max_epochs = max(t.epochs for t in rec.trials)
    return rec


# ----------------------------------------------------------------------------------------------
# An Optuna study rebuilt from the runs
# ----------------------------------------------------------------------------------------------
def _space_distributions(path: str | None) -> dict:
    if not path or not os.path.exists(path):
        return {}
    try:
        from vidtune.space import load_space

        return dict(load_space(path).params)
    except Exception:
        return {}  # the space file changed since the sweep: infer from the values instead


def _infer_distribution(values: list[str]):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    try:
        nums = [float(v) for v in values]
    except ValueError:
        return CategoricalDistribution(list(dict.fromkeys(values)))
    lo, hi = min(nums), max(nums)
    if all(v.lstrip("-").isdigit() for v in values):
        return IntDistribution(int(lo), int(hi))
    return FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= 100)


def _to_param(dist, text: str):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        for choice in dist.choices:
            if str(choice) == text:
                return choice
        raise ValueError(f"{text!r} is not among {dist.choices}")
    return int(float(text)) if isinstance(dist, IntDistribution) else float(text)


def to_study(rec: SweepRecord):
    """An in-memory Optuna study holding the sweep's trials in the order they started."""
    import optuna
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if rec.mode == "max" else "minimize", study_name=rec.sweep_name)
    known = _space_distributions(rec.space_path)
    keys = sorted({k for t in rec.trials for k in t.params})
    dists = {}
    for k in keys:
        values = [t.params[k] for t in rec.trials if k in t.params]
        dist = known.get(k)
        if dist is None or not all(_fits(dist, v) for v in values):
            dist = _infer_distribution(values)
        dists[k] = dist
    for t in rec.trials:
        state = getattr(TrialState, STATES.get(t.status, "FAIL"))
        value = t.best if state == TrialState.COMPLETE else None
        if state == TrialState.COMPLETE and value is None:
            state = TrialState.FAIL
        if state == TrialState.PRUNED and t.curve:
            value = t.curve[max(t.curve)]  # Optuna's own convention: the last intermediate value
        params = {k: _to_param(dists[k], t.params[k]) for k in keys if k in t.params}
        study.add_trial(create_trial(
            state=state, value=value, params=params, distributions={k: dists[k] for k in params},
            intermediate_values=dict(t.curve), user_attrs={"trial_id": t.trial_id, "run_id": t.run_id},
        ))
    return study


def _fits(dist, text: str) -> bool:
    try:
        return dist._contains(dist.to_internal_repr(_to_param(dist, text)))
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def _pyplot():
    os.environ.setdefault("MPLBACKEND", "Agg")  # files only, never a window
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "cairo"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_png(ax_or_fig, path: str) -> None:
    plt = _pyplot()
    fig = getattr(ax_or_fig, "figure", None) or ax_or_fig
    if hasattr(ax_or_fig, "flat"):  # an array of axes
        fig = ax_or_fig.flat[0].figure
    fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _html(fig, path: str) -> None:
    # Self-contained (plotly.js inlined): the MLflow UI and air-gapped clusters have no CDN.
    fig.write_html(path, include_plotlyjs=True, full_html=True)


def _lanes(rec: SweepRecord) -> list[tuple[str, TrialRecord]]:
    """Each trial's worker lane: per node, the first slot free when the trial started."""
    out, slots = [], {}
    for t in rec.trials:
        node = (t.node.split(",")[0] or "local")[:8]
        ends = slots.setdefault(node, [])
        end = t.end_ms or rec.end_ms or t.start_ms
        for i, busy_until in enumerate(ends):
            if busy_until <= t.start_ms:
                ends[i] = end
                out.append((f"{node}/{i}", t))
                break
        else:
            ends.append(end)
            out.append((f"{node}/{len(ends) - 1}", t))
    return out


COLOURS = {"completed": "#2a9d8f", "pruned": "#e9c46a", "failed": "#e76f51", "running": "#8d99ae"}


def _timeline(rec: SweepRecord, folder: str) -> None:
    import plotly.graph_objects as go

    lanes = _lanes(rec)
    t0 = min(t.start_ms for _, t in lanes)
    fig = go.Figure()
    for status in COLOURS:
        rows = [(lane, t) for lane, t in lanes if t.status == status]
        if rows:
            fig.add_bar(
                y=[lane for lane, _ in rows], base=[(t.start_ms - t0) / 1000 for _, t in rows],
                x=[((t.end_ms or t.start_ms) - t.start_ms) / 1000 for _, t in rows], orientation="h", name=status,
                marker_color=COLOURS[status], text=[t.trial_id for _, t in rows],
                hovertext=[f"{t.trial_id}: {t.epochs} epochs, {rec.metric} {t.best}" for _, t in rows],
            )
    fig.update_layout(title="Trials over time per worker (node/slot)", xaxis_title="seconds since the first trial",
                      yaxis_title="worker", barmode="overlay")
    _html(fig, os.path.join(folder, "timeline.html"))

    plt = _pyplot()
    fig2, ax = plt.subplots(figsize=(9, 1.5 + 0.5 * len({lane for lane, _ in lanes})))
    names = sorted({lane for lane, _ in lanes})
    for lane, t in lanes:
        start, width = (t.start_ms - t0) / 1000, ((t.end_ms or t.start_ms) - t.start_ms) / 1000
        ax.broken_barh([(start, width)], (names.index(lane) - 0.4, 0.8), color=COLOURS.get(t.status, "grey"))
        ax.text(start + width / 2, names.index(lane), t.trial_id[-5:], ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("seconds since the first trial")
    ax.set_title("Trials over time per worker (green completed, yellow pruned, red failed)")
    _save_png(fig2, os.path.join(folder, "timeline.png"))


def _intermediate(rec: SweepRecord, folder: str) -> None:
    """Learning curves of the tuned metric; an x where ASHA stopped a trial."""
    import plotly.graph_objects as go

    fig = go.Figure()
    plt = _pyplot()
    fig2, ax = plt.subplots(figsize=(9, 5))
    for t in rec.trials:
        if not t.curve:
            continue
        steps = sorted(t.curve)
        values = [t.curve[s] for s in steps]
        fig.add_scatter(x=steps, y=values, mode="lines+markers", name=f"{t.trial_id} ({t.status})",
                        line={"color": COLOURS.get(t.status)})
        ax.plot(steps, values, marker=".", color=COLOURS.get(t.status, "grey"), alpha=0.8)
        if t.status == "pruned":
            fig.add_scatter(x=[steps[-1]], y=[values[-1]], mode="markers", marker={"symbol": "x", "size": 12, "color": "black"},
                            showlegend=False, hovertext=f"{t.trial_id} stopped by ASHA at epoch {steps[-1]}")
            ax.plot([steps[-1]], [values[-1]], marker="x", color="black", markersize=9)
    title = f"{rec.metric} per epoch (x: stopped by ASHA)"
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title=rec.metric)
    _html(fig, os.path.join(folder, "intermediate_values.html"))
    ax.set_xlabel("epoch")
    ax.set_ylabel(rec.metric)
    ax.set_title(title)
    _save_png(fig2, os.path.join(folder, "intermediate_values.png"))


def _optuna_plot(study, name: str, folder: str) -> None:
    import optuna.visualization as ov
    import optuna.visualization.matplotlib as om

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib backend is marked experimental
        _html(getattr(ov, f"plot_{name}")(study), os.path.join(folder, f"{name}.html"))
        _save_png(getattr(om, f"plot_{name}")(study), os.path.join(folder, f"{name}.png"))


def write_plots(rec: SweepRecord, folder: str, log=print) -> dict[str, str]:
    """``plots/<name>.html`` and ``.png`` for each plot; returns ``{name: why skipped}``."""
    os.makedirs(folder, exist_ok=True)
    skipped: dict[str, str] = {}
    if not rec.trials:
        return {name: "no trials" for name in PLOTS}
    study = None
    try:
        study = to_study(rec)
    except Exception as e:
        log(f"report: cannot rebuild an Optuna study ({_first_line(e)})")
    for name in PLOTS:
        try:
            if name == "timeline":
                _timeline(rec, folder)
            elif name == "intermediate_values":
                _intermediate(rec, folder)
            elif study is None:
                raise RuntimeError("no Optuna study")
            elif name == "param_importances" and sum(t.status == "completed" for t in rec.trials) < 2:
                raise RuntimeError("needs at least 2 completed trials")
            else:
                _optuna_plot(study, name, folder)
        except Exception as e:
            skipped[name] = _first_line(e)
            for ext in ("html", "png"):  # never leave one half of a pair
                path = os.path.join(folder, f"{name}.{ext}")
                if os.path.exists(path):
                    os.remove(path)
    return skipped


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def trials_table(rec: SweepRecord):
    """One row per trial: ids, status, params (typed where numeric), best metric, epochs, wall time."""
    import pandas as pd

    rows = []
    keys = sorted({k for t in rec.trials for k in t.params})
    for t in rec.trials:
        row = {"trial_id": t.trial_id, "run_id": t.run_id, "status": t.status, f"best_{rec.metric}": t.best,
               "epochs": t.epochs, "wall_s": t.wall_s,
               "start_time": pd.Timestamp(t.start_ms, unit="ms", tz="UTC"),
               "end_time": pd.Timestamp(t.end_ms, unit="ms", tz="UTC") if t.end_ms else pd.NaT,
               "node": t.node, "failure_reason": t.reason}
        row.update({f"param.{k}": t.params.get(k) for k in keys})
        rows.append(row)
    df = pd.DataFrame(rows)
    for k in keys:  # numeric params as numbers (MLflow stores every param as text)
        col = f"param.{k}"
        converted = pd.to_numeric(df[col], errors="coerce")
        if converted.notna().sum() == df[col].notna().sum():
            df[col] = converted
    return df


def summary_markdown(rec: SweepRecord, skipped: dict[str, str] | None = None) -> str:
    ranked = rec.ranked()
    n = len(rec.trials)
    lines = [f"# Sweep `{rec.sweep_name}`", "",
             f"Experiment `{rec.experiment}`, parent run `{rec.parent_id}`; metric `{rec.metric}` ({rec.mode}).", "",
             f"**{n} trials**: {rec.count('completed')} completed, {rec.count('pruned')} pruned by ASHA, "
             f"{rec.count('failed')} failed" + (f", {rec.count('running')} still running" if rec.count("running") else "") + ".", ""]
    if ranked:
        best = ranked[0]
        lines += ["## Best configuration", "",
                  f"Trial `{best.trial_id}` (run `{best.run_id}`, {best.status}): `{rec.metric}` = {best.best:.4f} "
                  f"after {best.epochs} epochs.", "", "| parameter | value |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in sorted(best.params.items())]
        lines.append("")
    keys = sorted({k for t in rec.trials for k in t.params})
    lines += ["## Top 5", "", "| rank | trial | status | " + f"{rec.metric} | epochs | " + " | ".join(f"`{k}`" for k in keys) + " |",
              "|" + "---|" * (5 + len(keys))]
    for i, t in enumerate(ranked[:5], 1):
        lines.append(f"| {i} | `{t.trial_id}` | {t.status} | {t.best:.4f} | {t.epochs} | "
                     + " | ".join(str(t.params.get(k, "")) for k in keys) + " |")
    lines.append("")
    if rec.max_epochs:
        run_epochs = sum(t.epochs for t in rec.trials)
        full = n * rec.max_epochs
        saved = sum(rec.max_epochs - t.epochs for t in rec.trials if t.status == "pruned")
        epoch_times = [t.epoch_time_s for t in rec.trials if t.epoch_time_s]
        lines += ["## Compute", "",
                  f"Epochs run: {run_epochs}, against {full} for every trial's full budget of {rec.max_epochs}; "
                  f"ASHA saved {saved} epochs ({100 * saved / full:.0f}%)"
                  + (f", about {saved * sorted(epoch_times)[len(epoch_times) // 2]:.1f} s at the median epoch time"
                     if epoch_times else "") + "."]
        walls = [t.wall_s for t in rec.trials if t.wall_s is not None]
        if walls:
            lines.append(f"Trial wall time: {sum(walls):.0f} s in all"
                         + (f"; sweep wall time {(rec.end_ms - rec.start_ms) / 1000:.0f} s." if rec.end_ms else "."))
        lines.append("")
    failed = [t for t in rec.trials if t.status == "failed"]
    if failed:
        lines += ["## Failed trials", ""] + [f"- `{t.trial_id}`: {t.reason or 'unknown'}" for t in failed] + [""]
    if skipped:
        lines += ["## Plots not drawn", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()] + [""]
    return "\n".join(lines)


def write_report(rec: SweepRecord, out: str, log=print) -> dict:
    """``out/plots/*``, ``out/trials.parquet``, ``out/summary.md``; returns what was written."""
    os.makedirs(out, exist_ok=True)
    skipped = write_plots(rec, os.path.join(out, "plots"), log)
    trials_table(rec).to_parquet(os.path.join(out, "trials.parquet"), index=False)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary_markdown(rec, skipped))
    for name, why in skipped.items():
        log(f"report: plots/{name} not drawn ({why})")
    return {"out": out, "trials": len(rec.trials), "skipped": skipped, "parent_run_id": rec.parent_id,
            "plots": sorted(os.listdir(os.path.join(out, "plots")))}


def build_report(uri: str, experiment: str, out: str, parent_id: str | None = None) -> dict:
    """``vidtune report``: the latest sweep of ``experiment`` (or ``parent_id``), from MLflow alone."""
    rec = read_sweep(_client(uri), experiment, parent_id)
    if not rec.trials:
        raise TrackingError(f"experiment {experiment!r}: sweep {rec.sweep_name!r} has no trial runs yet")
    return write_report(rec, out)


def publish_sweep_report(client, experiment: str, parent_id: str, folder: str | None = None) -> bool:
    """Write the sweep's report and upload it to the parent run (``plots/``, ``trials.parquet``,
    ``summary.md``). Never raises: a plotting or upload error costs the figures, not the sweep."""
    tmp = folder or tempfile.mkdtemp(prefix="vidtune-report-")
    try:
        rec = read_sweep(client, experiment, parent_id)
        if not rec.trials:
            return False
        shutil.rmtree(tmp, ignore_errors=True)
        write_report(rec, tmp)
        client.log_artifacts(parent_id, tmp)
        return True
    except Exception as e:
        print(f"sweep report not written ({type(e).__name__}: {_first_line(e)}); `vidtune report --experiment "
              f"{experiment}` rebuilds it from MLflow")
        return False
    finally:
        if folder is None:
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Per-trial figures
# ----------------------------------------------------------------------------------------------
def trial_figures(checkpoint_dir: str, history: dict[str, dict[int, float]], out: str) -> list[str]:
    """From a best checkpoint's ``config.json`` details and the run's metric histories:
    ``confusion_matrix.png``, ``per_class_metrics.csv`` (classifiers), ``per_class_ap.csv``
    (detection), ``learning_curves.png``. Returns the files written."""
    os.makedirs(out, exist_ok=True)
    written = []
    details, names = {}, []
    meta_path = os.path.join(checkpoint_dir, "config.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        details = meta.get("details") or {}
        epoch = meta.get("epoch")
        with open(os.path.join(checkpoint_dir, "labels.json")) as f:
            names = json.load(f)
    plt = _pyplot()
    cm = details.get("confusion_matrix")
    if cm:
        import numpy as np

        cm = np.asarray(cm)
        names = details.get("class_names") or names or [str(i) for i in range(len(cm))]
        size = min(20, 3 + 0.5 * len(names))
        labels = [str(n).replace("$", r"\$") for n in names]  # a class name is text, never mathtext
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(names)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion matrix (validation, best epoch {epoch})")
        if len(names) <= 30:
            for i in range(cm.shape[0]):
                for j in range(cm.shape[1]):
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                            color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
        _save_png(fig, os.path.join(out, "confusion_matrix.png"))
        written.append("confusion_matrix.png")
    if details.get("per_class_acc"):
        import pandas as pd

        support, keys = details.get("support", {}), class_keys(list(details["per_class_acc"]))
        df = pd.DataFrame([{"class": n, "metric_key": keys[n], "accuracy": details["per_class_acc"].get(n), "f1": details.get("per_class_f1", {}).get(n),
                            "support": support.get(n)} for n in details["per_class_acc"]])
        df.to_csv(os.path.join(out, "per_class_metrics.csv"), index=False)
        written.append("per_class_metrics.csv")
    if details.get("per_class_ap"):
        import pandas as pd

        rows, keys = [], class_keys(list(details["per_class_ap"]))
        for n, d in details["per_class_ap"].items():
            row = {"class": n, "metric_key": keys[n], "mean_ap": d.get("mean_ap"), "num_gt": d.get("num_gt"), "num_pred": d.get("num_pred")}
            row.update({f"ap@{t}": v for t, v in (d.get("ap") or {}).items()})
            rows.append(row)
        pd.DataFrame(rows).to_csv(os.path.join(out, "per_class_ap.csv"), index=False)
        written.append("per_class_ap.csv")
    curves = {k: v for k, v in history.items() if v}
    if curves:
        losses = {k: v for k, v in curves.items() if "loss" in k}
        scores = {k: v for k, v in curves.items() if "loss" not in k}
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, group, title in ((axes[0], losses, "losses"), (axes[1], scores, "validation metrics")):
            for k, v in sorted(group.items()):
                steps = sorted(v)
                ax.plot(steps, [v[s] for s in steps], marker=".", label=k)
            ax.set_xlabel("epoch")
            ax.set_title(title)
            if group:
                ax.legend(fontsize=8)
        _save_png(fig, os.path.join(out, "learning_curves.png"))
        written.append("learning_curves.png")
    return written


def _curve_metrics(names) -> list[str]:
    # Scalar curves worth a figure: losses and validation scores, not per-class series or timings.
    return [k for k in names if "/" not in k and (k.endswith("loss") or k.startswith("val_")) and not k.startswith("best_")]


def log_trial_artifacts(client, run_id: str, checkpoint_dir: str | None) -> list[str]:
    """Render a finished trial's figures and upload them to its run. Transport failures propagate
    (the outbox retries the whole end record); any other error prints one line and is dropped."""
    from vidtune.tracking import is_unreachable

    tmp = tempfile.mkdtemp(prefix="vidtune-trial-")
    try:
        run = client.get_run(run_id)
        history = {}
        for k in _curve_metrics(run.data.metrics):
            history[k] = {int(m.step): float(m.value) for m in client.get_metric_history(run_id, k)}
        written = trial_figures(checkpoint_dir or "", history, tmp)
        if written:
            client.log_artifacts(run_id, tmp)
        return written
    except Exception as e:
        if is_unreachable(e):
            raise
        print(f"trial {run_id}: figures not written ({type(e).__name__}: {_first_line(e)})")
        return []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)



def main(argv: list[str] | None = None) -> int:
    """``python -m vidtune.report URI EXPERIMENT PARENT_RUN_ID``: refresh a running sweep's report
    (started by ``ReportRefreshCallback`` in its own process, away from Tune's event loop)."""
    import sys

    uri, experiment, parent_id = (argv if argv is not None else sys.argv[1:])[:3]
    return 0 if publish_sweep_report(_client(uri), experiment, parent_id) else 1


if __name__ == "__main__":
    raise SystemExit(main())
