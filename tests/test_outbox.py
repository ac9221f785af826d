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


def test_a_record_mlflow_refuses_is_dead_lettered_and_the_rest_arrives(tmp_path, capsys):
    tracker = make_tracker(tmp_path, "refused")
    path = str(tmp_path / "mlflow_outbox.jsonl")
    box = Outbox(tracker, path)
    box.start()
    box.put("start", "t1", params={"train.lr": 0.01})
    box.put("start", "t2", params={"train.lr": 0.02})
    assert box.drain(60)
    tracker.client.delete_run(tracker.start_trial("t2", {}))  # deleted by a user mid-sweep: its writes are refused
    box.start()
    box.put("epoch", "t1", params={}, metrics={"val_top1": 0.5, "val_acc/R&D": 0.25, "train_loss": 1.0}, step=1,
            tags={"vidtune.at_chance": "false", "bad(tag)": "x"})
    box.put("end", "t2", params={}, status="completed")
    box.put("epoch", "t1", params={}, metrics={"val_top1": 0.75}, step=2)
    box.put("end", "t1", params={}, status="completed")
    assert box.drain(60) and len(box) == 0

    run = tracker.client.get_run(tracker.start_trial("t1", {}))
    assert run.info.status == "FINISHED" and run.data.tags["vidtune.at_chance"] == "false"
    assert [m.value for m in tracker.client.get_metric_history(run.info.run_id, "val_top1")] == [0.5, 0.75]
    assert "train_loss" in run.data.metrics and "bad(tag)" not in run.data.tags
    with open(tmp_path / "mlflow_deadletter.jsonl") as f:
        dead = [json.loads(line) for line in f]
    assert [(d.get("kind"), d.get("key"), d.get("what")) for d in dead] == [
        ("metric", "val_acc/R&D", "metric 'val_acc/R&D'"), ("tag", "bad(tag)", "tag 'bad(tag)'"), (None, None, "end record")]
    assert dead[0]["value"] == 0.25 and dead[0]["step"] == 1 and dead[2]["op"]["trial_id"] == "t2"
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("MLflow refused")]
    assert len(lines) == 3 and "'val_acc/R&D'" in lines[0] and "mlflow_deadletter.jsonl" in lines[0]
    assert box.refused == 3


def test_rejection_and_outage_are_told_apart_by_type_and_status():
    import requests
    from mlflow.exceptions import MlflowException, RestException

    from vidtune.tracking import is_rejection, is_unreachable

    # The text says the opposite of the type or status each time: only type and status count.
    refused = [RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "Connection refused"}),
               RestException({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "503"}),
               MlflowException.invalid_parameter_value("API request to x failed: Max retries exceeded")]
    down = [requests.exceptions.ConnectionError("INVALID_PARAMETER_VALUE"),
            RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "Invalid value"}),
            RestException({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "m"}),
            MlflowException("API request to http://h failed with exception Max retries exceeded")]
    assert all(is_rejection(e) and not is_unreachable(e) for e in refused)
    assert all(is_unreachable(e) and not is_rejection(e) for e in down)
    assert not is_rejection(ValueError("INVALID_PARAMETER_VALUE")) and not is_unreachable(ValueError("Connection refused"))
