"""The MLflow outbox with its background deliverer, on a real MLflow store (SQLite): records arrive
in order and once, a killed sweep's file keeps what was not delivered, and an error that is not an
outage is raised in the sweep's own thread instead of dying with the deliverer."""

from __future__ import annotations

import json
import os

import pytest

from vidtune.tracking import Outbox, SweepTracker


def make_tracker(tmp_path, name="outbox"):
    tracker = SweepTracker(f"sqlite:///{tmp_path}/mlflow.db", name)
    tracker.start_sweep(f"{name}-sweep", "val_top1", "max", {"num_samples": 2})
    return tracker


def test_background_delivery_keeps_order_and_delivers_once(tmp_path):
    tracker = make_tracker(tmp_path)
    path = str(tmp_path / "mlflow_outbox.jsonl")
    box = Outbox(tracker, path)
    box.start()
    for trial in ("t1", "t2"):
        box.put("start", trial, params={"train.lr": 0.01})
        for epoch in (1, 2, 3):
            box.put("epoch", trial, params={"train.lr": 0.01}, metrics={"val_top1": epoch / 10, "epoch": epoch}, step=epoch)
        box.put("end", trial, params={"train.lr": 0.01}, status="completed")
    assert box.drain(60)
    assert box._thread is None and len(box) == 0 and not os.path.exists(path)
    for trial in ("t1", "t2"):
        run_id = tracker.start_trial(trial, {})
        history = tracker.client.get_metric_history(run_id, "val_top1")
        assert [(m.step, round(m.value, 2)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
        run = tracker.client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["vidtune.trial_status"] == "completed"


def test_unreachable_server_keeps_records_in_the_file(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracker = SweepTracker.__new__(SweepTracker)  # no server to create the experiment on
    from mlflow.tracking import MlflowClient

    tracker.uri, tracker.client, tracker.experiment_id = f"http://127.0.0.1:{port}", MlflowClient(f"http://127.0.0.1:{port}"), "0"
    tracker.parent_id, tracker.trial_runs, tracker.closed = "p", {}, set()
    path = str(tmp_path / "mlflow_outbox.jsonl")
    box = Outbox(tracker, path, retry_every_s=0.2)
    box.start()
    box.put("start", "t1", params={})
    box.put("epoch", "t1", params={}, metrics={"val_top1": 0.5}, step=1)
    assert not box.drain(1.0)
    with open(path) as f:
        kept = [json.loads(line)["op"] for line in f]
    assert kept == ["start", "epoch"]  # a --resume delivers these


def test_an_error_that_is_not_an_outage_reaches_the_sweep(tmp_path):
    box = Outbox(make_tracker(tmp_path, "bad"), str(tmp_path / "box.jsonl"))
    box.start()
    box.put("no-such-op", "t1")
    with pytest.raises(ValueError, match="unknown outbox op"):
        box.drain(10)
