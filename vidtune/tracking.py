"""MLflow: the sweep's parent run, one child run per trial, registry promotion.

All writes go through ``MlflowClient`` with explicit run ids, so one process (the sweep driver)
can log every trial without MLflow's global "active run" state, and SQLite sees one writer.
Layout and names are the contract's: tags ``vidtune.role``, ``vidtune.trial_id``,
``vidtune.trial_status``, ``vidtune.failure_reason``; artifact folder ``checkpoint/``.
"""

from __future__ import annotations

import math
import os
import time
import urllib.error
import urllib.request
from typing import Any

ROLE, TRIAL_ID, STATUS, REASON = "vidtune.role", "vidtune.trial_id", "vidtune.trial_status", "vidtune.failure_reason"
SWEEP_NAME, METRIC, MODE, BEST_RUN = "vidtune.sweep_name", "vidtune.metric", "vidtune.mode", "vidtune.best_run_id"
PARENT = "mlflow.parentRunId"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message names the URI."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    Relative paths become absolute: Ray runs trials in other working directories.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    if "://" not in uri:
        return "file://" + os.path.abspath(uri)
    return uri


def sqlite_path(uri: str) -> str:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs/path`` is absolute)."""
    return os.path.abspath(uri[len("sqlite:///") :])


def check_tracking(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any trial starts, when the store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise TrackingError(f"{uri}: tracking server answered HTTP {r.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(f"{uri}: tracking server unreachable ({getattr(e, 'reason', e)})") from None
        return
    if uri.startswith("sqlite:///"):
        folder = os.path.dirname(sqlite_path(uri)) or "."
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise TrackingError(f"{uri}: folder {folder} is missing or not writable")


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# MLflow 3's UI opens an experiment as a GenAI one (traces, "Overview") unless told otherwise.
# The experiment tag is MLflow's own marker of a model-training experiment; the UI of 3.17 follows
# a per-browser switch instead, which a link's ``workflowType`` parameter sets (see ``ui_url``).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_WORKFLOW = "workflowType=machine_learning"


def get_or_create_experiment(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            # A SQLite store's default artifact root is relative to the creating process: pin it.
            location = os.path.join(os.path.dirname(sqlite_path(uri)), "mlartifacts")
        try:
            return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
        except Exception:  # created concurrently by another sweep
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # made by an older vidtune or by hand
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def ui_url(tracking_uri: str, experiment_id: str, ui_base: str = "http://127.0.0.1:5000") -> str:
    """The page of the experiment's runs table in the MLflow UI. A tracking server serves its own
    UI; a local store's UI is ``mlflow ui``'s default address."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else ui_base
    return f"{base}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW}"


def ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """One line telling how to open the sweep in the MLflow UI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {ui_url(tracking_uri, experiment_id)}"
    return (f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}   then open "
            f"{ui_url(tracking_uri, experiment_id)}")


def numeric_metrics(result: dict) -> dict[str, float]:
    """The metrics worth logging from a Tune result: ours, numeric and finite."""
    skip = {"epoch", "vidtune_finished", "vidtune_replayed", "training_iteration", "timestamp", "time_this_iter_s", "time_total_s",
            "time_since_restore", "iterations_since_restore", "pid", "done"}
    out = {}
    for k, v in result.items():
        if k in skip or k.startswith(("time_", "config")) or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


class SweepTracker:
    """The MLflow side of one sweep: parent run, per-trial runs, their metrics and end states."""

    on_refused = None  # (run_id, kind, record, error) -> None; an outbox keeps them in its dead-letter file

    def __init__(self, uri: str, experiment: str):
        self.uri = uri
        self.client = _client(uri)
        self.experiment_id = get_or_create_experiment(uri, experiment)
        self.parent_id: str | None = None
        self.trial_runs: dict[str, str] = {}
        self.closed: set[str] = set()  # trial runs that had ended before a resume

    def _refused(self, run_id: str, refused: list[tuple[str, Any, BaseException]]) -> None:
        for kind, record, error in refused:
            if self.on_refused is not None:
                self.on_refused(run_id, kind, record, error)
            else:
                print(f"MLflow refused {kind} {record.key!r} of run {run_id} ({first_line(error)}); left out")

    # -- the sweep
    def start_sweep(self, sweep_name: str, metric: str, mode: str, params: dict, resume: bool = False) -> str:
        if resume:
            found = self.client.search_runs(
                [self.experiment_id],
                f"tags.`{ROLE}` = 'sweep' and tags.`{SWEEP_NAME}` = '{sweep_name}'",
                max_results=1,
            )
            if found:
                self.parent_id = found[0].info.run_id
                self.client.update_run(self.parent_id, status="RUNNING")
                return self.parent_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=sweep_name,
            tags={ROLE: "sweep", SWEEP_NAME: sweep_name, METRIC: metric, MODE: mode},
        )
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def end_sweep(self, metric: str, mode: str, status: str = "FINISHED") -> tuple[str | None, float | None]:
        """Record the best trial on the parent run; returns ``(run_id, value)``."""
        best = self.best_trial(metric, mode, parent_id=self.parent_id, completed_only=False)
        if best is not None:
            run_id, value = best
            self.client.log_metric(self.parent_id, f"best_{metric}", value)
            self.client.set_tag(self.parent_id, BEST_RUN, run_id)
        self.client.set_terminated(self.parent_id, status=status)
        return best if best else (None, None)

    def best_trial(
        self, metric: str, mode: str, parent_id: str | None = None, completed_only: bool = True
    ) -> tuple[str, float] | None:
        # Completed trials first: a pruned trial's number comes from a smaller budget.
        for statuses in (("completed",), ("completed", "pruned")) if not completed_only else (("completed",),):
            clauses = [f"tags.`{ROLE}` = 'trial'"]
            if parent_id:
                clauses.append(f"tags.`{PARENT}` = '{parent_id}'")
            runs = self.client.search_runs(
                [self.experiment_id],
                " and ".join(clauses),
                order_by=[f"metrics.`best_{metric}` {'DESC' if mode == 'max' else 'ASC'}"],
                max_results=500,
            )
            runs = [r for r in runs if r.data.tags.get(STATUS) in statuses and f"best_{metric}" in r.data.metrics]
            if runs:
                return runs[0].info.run_id, runs[0].data.metrics[f"best_{metric}"]
        return None

    # -- trials
    def start_trial(self, trial_id: str, params: dict) -> str:
        """The trial's run, created once: a resumed or restarted trial continues its own run."""
        if trial_id in self.trial_runs:
            return self.trial_runs[trial_id]
        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`{TRIAL_ID}` = '{trial_id}' and tags.`{PARENT}` = '{self.parent_id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING" and found[0].data.tags.get(STATUS) in ("completed", "pruned", "failed"):
                # Ended before the sweep was interrupted; a restored trial only repeats its end.
                self.closed.add(run_id)
            else:
                self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=trial_id,
                tags={ROLE: "trial", TRIAL_ID: trial_id, PARENT: self.parent_id, STATUS: "running"},
            )
            run_id = run.info.run_id
            self.log_params(run_id, params)
        self.trial_runs[trial_id] = run_id
        return run_id

    def log_epoch(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._refused(run_id, log_salvaging(self.client, run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()]))

    def backfill(self, run_id: str, history_path: str) -> int:
        """Log the epochs of the trial's own history that the run lacks (records lost when a sweep
        process died between a trial's report and its MLflow write); returns how many."""
        import json

        from mlflow.entities import Metric

        if not os.path.exists(history_path):
            return 0
        with open(history_path) as f:
            rows = {}
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    rows[int(row.get("epoch", 0))] = row  # a replayed epoch: the latest line wins
        logged = {m.step for m in self.client.get_metric_history(run_id, "train_loss")}
        missing = [e for e in sorted(rows) if e and e not in logged]
        for epoch in missing:
            row = rows[epoch]
            metrics = numeric_metrics({k: v for k, v in row.items() if k != "t"})
            self._refused(run_id, log_salvaging(self.client, run_id, metrics=[Metric(k, v, int(row["t"]), epoch) for k, v in metrics.items()]))
        return len(missing)

    def end_trial(self, run_id: str, status: str, reason: str | None = None, checkpoint_dir: str | None = None) -> None:
        """Tag the trial's end state, upload its best checkpoint, close its run."""
        if run_id in self.closed:
            return
        if checkpoint_dir:
            self.backfill(run_id, os.path.join(os.path.dirname(checkpoint_dir), "history.jsonl"))
        if checkpoint_dir and os.path.isdir(checkpoint_dir):
            self.client.log_artifacts(run_id, checkpoint_dir, artifact_path="checkpoint")
        from vidtune.report import log_trial_artifacts

        log_trial_artifacts(self.client, run_id, checkpoint_dir)  # figures; errors print a line, never fail the trial
        self.client.set_tag(run_id, STATUS, status)
        if reason:
            self.client.set_tag(run_id, REASON, reason[:5000])
        self.client.set_terminated(run_id, status="FAILED" if status == "failed" else "FINISHED")

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._refused(run_id, log_salvaging(self.client, run_id, params=items[i : i + 100]))


def promote(
    uri: str,
    experiment: str,
    metric: str | None = None,
    model_name: str | None = None,
    alias: str = "champion",
) -> dict:
    """Register the best completed trial's ``checkpoint/`` as a new model version; point ``alias`` at it."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise TrackingError(f"{uri}: no experiment named {experiment!r}")
    sweeps = client.search_runs([exp.experiment_id], f"tags.`{ROLE}` = 'sweep'", order_by=["attributes.start_time DESC"], max_results=1)
    mode = "max"
    if sweeps:
        metric = metric or sweeps[0].data.tags.get(METRIC)
        mode = sweeps[0].data.tags.get(MODE, "max")
    metric = metric or "val_top1"
    if metric.endswith("loss"):
        mode = "min"
    tracker = SweepTracker.__new__(SweepTracker)
    tracker.client, tracker.experiment_id = client, exp.experiment_id
    best = tracker.best_trial(metric, mode)
    if best is None:
        raise TrackingError(f"experiment {experiment!r}: no completed trial with metric best_{metric}")
    run_id, value = best
    run = client.get_run(run_id)
    name = model_name or experiment
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name)
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/checkpoint",
        run_id=run_id,
        tags={"vidtune.run_id": run_id, "vidtune.metric": metric, "vidtune.value": str(value)},
    )
    client.set_registered_model_alias(name, alias, version.version)
    return {"model": name, "version": version.version, "alias": alias, "run_id": run_id, "metric": metric,
            "value": value, "uri": f"models:/{name}@{alias}"}


def download_model(model_uri: str, uri: str | None = None) -> str:
    """A local folder holding the checkpoint behind ``models:/...``, ``runs:/...`` or a path."""
    if os.path.isdir(model_uri):
        return model_uri
    import mlflow.artifacts

    try:
        return mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=resolve_tracking_uri(uri))
    except Exception as e:
        raise TrackingError(f"{model_uri}: cannot fetch the model ({str(e).splitlines()[0][:300]})") from None


# ----------------------------------------------------------------------------------------------
# Writes that survive a tracking-server outage
# ----------------------------------------------------------------------------------------------
# Answers in 4xx that say nothing against the record: sending it again later can succeed.
RETRY_STATUSES = frozenset({401, 403, 408, 429})


def _http_status(error: BaseException) -> int | None:
    from mlflow.exceptions import MlflowException

    # MLflow's client raises MlflowException for its own validation (INVALID_PARAMETER_VALUE: 400),
    # RestException for a server's answer, and MlflowException(INTERNAL_ERROR: 500) for a transport
    # failure after its retries; a SQL store's "database is locked" is TEMPORARILY_UNAVAILABLE (503).
    return error.get_http_status_code() if isinstance(error, MlflowException) else None


def is_unreachable(error: BaseException) -> bool:
    """True when ``error`` means the tracking store could not take the write now (connection
    errors, 5xx): the record is fine and is retried."""
    import requests

    if isinstance(error, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
        return True
    status = _http_status(error)
    return status is not None and (status >= 500 or status in RETRY_STATUSES)


def is_rejection(error: BaseException) -> bool:
    """True when MLflow refused the record itself (a 4xx answer, or its client's own validation):
    sending it again cannot help."""
    status = _http_status(error)
    return status is not None and 400 <= status < 500 and status not in RETRY_STATUSES


def log_salvaging(client, run_id: str, metrics=(), params=(), tags=()) -> list[tuple[str, Any, BaseException]]:
    """``log_batch``; when MLflow refuses the batch, each record alone, so a refused record costs
    only itself. Returns the refused ``(kind, record, error)``; an outage raises."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    try:
        client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        return []
    except Exception as e:
        if not is_rejection(e):
            raise
    refused = []
    for kind, records in (("metric", metrics), ("param", params), ("tag", tags)):
        for record in records:
            try:
                client.log_batch(run_id, **{f"{kind}s": [record]})
            except Exception as e:
                if not is_rejection(e):
                    raise
                refused.append((kind, record, e))
    return refused


def first_line(error: BaseException, limit: int = 240) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


class Outbox:
    """MLflow writes of a sweep, kept in order until the server has taken them.

    Trials never talk to MLflow; the sweep process does, through this queue. When the server is
    unreachable, writes stay queued (and are written to ``path`` so a killed sweep keeps them) and
    are retried with a back-off; nothing blocks training. Each write is idempotent on replay:
    metrics carry the timestamp of their first attempt (MLflow stores an identical metric once),
    runs are found by their trial tag before one is created, tags and ends simply repeat.

    After ``start()``, a background thread delivers: the sweep's event loop only queues, so a
    trial's end (checkpoint upload, figures) never holds up the start of the next trial.

    A record MLflow refuses (a key it does not allow, a value too long, a run deleted meanwhile)
    is named in one printed line, kept in ``mlflow_deadletter.jsonl`` beside ``path``, and the
    rest goes on: of a refused batch only the refused metrics, params or tags are left out."""

    def __init__(self, tracker: SweepTracker, path: str | None = None, retry_every_s: float = 5.0, store=None):
        import threading

        self.tracker = tracker
        self.store = store  # a cloud --storage: a trial's end fetches its best checkpoint first
        self.path = path
        self.retry_every_s = retry_every_s
        self.ops: list[dict] = []
        self.down_since: float | None = None
        self.next_try = 0.0
        self.delivered = 0
        self.refused = 0
        self.deadletter_path = os.path.join(os.path.dirname(path), "mlflow_deadletter.jsonl") if path else None
        tracker.on_refused = self._refused_record
        self._lock = threading.RLock()  # guards ops and the file; never held while talking to MLflow
        self._deliver = threading.Lock()  # one deliverer at a time, in order
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if path and os.path.exists(path):
            import json

            with open(path) as f:
                self.ops = [json.loads(line) for line in f if line.strip()]

    def __len__(self) -> int:
        return len(self.ops)

    def put(self, op: str, trial_id: str, **args) -> None:
        self._raise_background_error()
        with self._lock:
            self.ops.append({"op": op, "trial_id": trial_id, "t": int(time.time() * 1000), **args})
            if self._thread is not None:
                self._append(self.ops[-1])  # a killed sweep keeps what the thread has not delivered yet
        if self._thread is not None:
            self._wake.set()
        else:
            self.flush()

    def tick(self) -> None:
        """From the sweep's loop: retry queued writes, unless the background thread does."""
        if self._thread is None:
            self.flush()

    def start(self) -> None:
        """Deliver from a background thread from now on (``drain`` stops it)."""
        import threading

        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mlflow-outbox", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while self._thread is not None:
            self._wake.wait(timeout=self.retry_every_s)
            self._wake.clear()
            try:
                self.flush()
            except BaseException as e:  # not an outage: the sweep process reports it on its next call
                self._error = e
                return

    def _raise_background_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def flush(self, force: bool = False) -> bool:
        """Deliver queued writes in order; True when none are left."""
        with self._deliver:
            with self._lock:
                if not self.ops:
                    return True
                if not force and time.time() < self.next_try:
                    self._save()
                    return False
            while True:
                with self._lock:
                    if not self.ops:
                        break
                    op = self.ops[0]
                try:
                    self._apply(op)
                except Exception as e:
                    if is_rejection(e):
                        self._dead_letter({"what": f"{op['op']} record", "trial_id": op["trial_id"], "op": op}, e)
                        with self._lock:
                            self.ops.pop(0)
                        continue
                    if not is_unreachable(e):
                        raise
                    if self.down_since is None:
                        self.down_since = time.time()
                        print(f"MLflow {self.tracker.uri} unreachable ({str(e).splitlines()[0][:160]}); "
                              f"trials go on, their records are kept and retried every {self.retry_every_s:g} s")
                    self.next_try = time.time() + self.retry_every_s
                    with self._lock:
                        self._save()
                    return False
                with self._lock:
                    self.ops.pop(0)
                    self.delivered += 1
            if self.down_since is not None:
                print(f"MLflow {self.tracker.uri} reachable again after {time.time() - self.down_since:.0f} s; "
                      "buffered records delivered")
                self.down_since = None
            with self._lock:
                self._save()
            return True

    def drain(self, timeout_s: float) -> bool:
        """Retry until everything is delivered or ``timeout_s`` passes (then the file keeps the rest)."""
        thread, self._thread = self._thread, None
        if thread is not None:  # stop the background deliverer; this thread finishes the job
            self._wake.set()
            thread.join()
        self._raise_background_error()
        deadline = time.time() + timeout_s
        while not self.flush(force=True):
            if time.time() > deadline:
                return False
            time.sleep(min(self.retry_every_s, max(0.1, deadline - time.time())))
        return True

    def _refused_record(self, run_id: str, kind: str, record, error: BaseException) -> None:
        entry = {"what": f"{kind} {record.key!r}", "run_id": run_id, "kind": kind, "key": record.key,
                 "value": record.value}
        if kind == "metric":
            entry.update(step=record.step, timestamp=record.timestamp)
        self._dead_letter(entry, error)

    def _dead_letter(self, entry: dict, error: BaseException) -> None:
        import json

        self.refused += 1
        entry = {**entry, "error": first_line(error, 1000), "t": int(time.time() * 1000)}
        where = "not kept (no outbox file)"
        if self.deadletter_path:
            with open(self.deadletter_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            where = f"kept in {self.deadletter_path}"
        run = entry.get("run_id") or f"trial {entry.get('trial_id')}"
        print(f"MLflow refused {entry['what']} of run {run} ({first_line(error, 200)}); {where}; the sweep goes on")

    def _append(self, op: dict) -> None:
        if self.path:
            import json

            with open(self.path, "a") as f:
                f.write(json.dumps(op) + "\n")

    def _save(self) -> None:
        if not self.path:
            return
        import json

        if not self.ops:
            if os.path.exists(self.path):
                os.remove(self.path)
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            for op in list(self.ops):
                f.write(json.dumps(op) + "\n")
        os.replace(tmp, self.path)

    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric

        tracker = self.tracker
        run_id = tracker.start_trial(op["trial_id"], op.get("params") or {})
        kind = op["op"]
        if kind == "start":
            return
        if kind == "epoch":
            metrics = [Metric(k, v, op["t"], op["step"]) for k, v in op["metrics"].items()]
            tags = op.get("tags") or {}
            from mlflow.entities import RunTag

            tracker._refused(run_id, log_salvaging(tracker.client, run_id, metrics=metrics,
                                                   tags=[RunTag(k, v) for k, v in tags.items()]))
        elif kind == "end":
            if self.store is not None and op.get("checkpoint_dir"):  # in the deliverer, off Tune's loop
                self.store.pull_finished_trial(os.path.dirname(op["checkpoint_dir"]))
            tracker.end_trial(run_id, op["status"], op.get("reason"), op.get("checkpoint_dir"))
        else:
            raise ValueError(f"unknown outbox op {kind!r}")
