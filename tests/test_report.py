"""Sweep insight on one real sweep (real Ray, SQLite MLflow, encoded videos): honest Optuna state,
the parent run's plots/parquet/summary, per-trial figures, and `vidtune report` from MLflow alone."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest
import yaml
from test_sweep import TINY_SPACE

from vidtune.sweep import SweepOptions, run_sweep

PLOT_NAMES = ("optimization_history", "parallel_coordinate", "param_importances", "intermediate_values", "timeline")


@pytest.fixture(scope="module")
def swept(ray_cluster, tiny_set, tmp_path_factory):
    """One sweep that ASHA must prune: trials run one at a time (grace period 1, reduction factor 2),
    the baseline first, then a learning rate of 1e-12 that stays at its initial weights. ASHA stops
    any trial whose epoch-1 value is under the median of those before it."""
    tmp = tmp_path_factory.mktemp("report_sweep")
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space["space"]["train.lr"] = {"type": "categorical", "choices": [0.002, 0.005, 0.02, 1.0e-12]}
    space["fixed"]["train"].update({"schedule": "constant", "warmup_pct": 0.0})
    space["extra_points"] = [{"train.lr": 1.0e-12}]
    space["tune"].update({"num_samples": 4, "max_concurrent": 1})
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(space))
    uri, optuna_url = f"sqlite:///{tmp}/mlflow.db", f"sqlite:///{tmp}/optuna.db"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the progress lines are printed by this process
        summary = run_sweep(SweepOptions(space=str(path), data=tiny_set, tracking_uri=uri, storage=str(tmp / "ray"),
                                         experiment="insight", skip_preflight=True, optuna_storage=optuna_url))
    print(out.getvalue())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("insight")
    trials = client.search_runs([exp.experiment_id], "tags.`vidtune.role` = 'trial'", max_results=100)
    return {"summary": summary, "uri": uri, "optuna": optuna_url, "tmp": tmp, "client": client, "trials": trials,
            "stdout": out.getvalue()}


def test_asha_stopped_trials_are_pruned_in_the_optuna_study(swept):
    import optuna
    from optuna.trial import TrialState

    summary, client = swept["summary"], swept["client"]
    assert summary["failed"] == 0 and summary["pruned"] >= 1 and summary["completed"] >= 1, summary
    study = optuna.load_study(study_name=summary["sweep"], storage=swept["optuna"])  # one study per sweep
    assert len(study.trials) == 4
    by_run_status = {}
    for run in swept["trials"]:
        epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_top1"))
        values = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_top1")}
        by_run_status.setdefault(run.data.tags["vidtune.trial_status"], []).append((epochs, values, run))
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(pruned) == len(by_run_status.get("pruned", [])) >= 1
    assert len(complete) == len(by_run_status.get("completed", [])) >= 1
    assert not [t for t in study.trials if t.state not in (TrialState.PRUNED, TrialState.COMPLETE)]
    # Pruned: the epochs it ran as intermediate values (step = epoch), its last one as its value.
    pruned_curves = sorted(sorted(t.intermediate_values.items()) for t in pruned)
    assert pruned_curves == sorted(sorted(v.items()) for _, v, _ in by_run_status["pruned"])
    for t in pruned:
        assert max(t.intermediate_values) < 2 and t.value == t.intermediate_values[max(t.intermediate_values)]
    # Complete: every epoch of its budget, and its best epoch's value (the checkpoint it leaves).
    for t in complete:
        assert sorted(t.intermediate_values) == [1, 2]
    assert sorted(t.value for t in complete) == sorted(r.data.metrics["best_val_top1"] for _, _, r in by_run_status["completed"])


def _parent(swept):
    return swept["client"].get_run(swept["summary"]["parent_run_id"])


def test_parent_run_holds_plots_trials_table_and_summary(swept, tmp_path):
    import pandas as pd

    client, summary = swept["client"], swept["summary"]
    parent_id = summary["parent_run_id"]
    top = {os.path.basename(a.path) for a in client.list_artifacts(parent_id)}
    assert {"plots", "trials.parquet", "summary.md"} <= top
    plots = {os.path.basename(a.path): a.file_size for a in client.list_artifacts(parent_id, "plots")}
    local = client.download_artifacts(parent_id, "", str(tmp_path))
    summary_md = open(os.path.join(local, "summary.md")).read()
    for name in PLOT_NAMES:
        if name == "param_importances" and summary["completed"] < 2:
            assert "`param_importances`: needs at least 2 completed trials" in summary_md
            continue
        assert plots.get(f"{name}.html", 0) > 10_000 and plots.get(f"{name}.png", 0) > 5_000, (name, plots)
        with open(os.path.join(local, "plots", f"{name}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(local, "plots", "intermediate_values.html")) as f:
        html = f.read()
    assert "stopped by ASHA" in html  # the pruned trials' stopping points are marked

    df = pd.read_parquet(os.path.join(local, "trials.parquet"))
    runs = {r.info.run_id: r for r in swept["trials"]}
    assert len(df) == 4 and set(df["run_id"]) == set(runs)
    for row in df.to_dict("records"):
        run = runs[row["run_id"]]
        assert row["status"] == run.data.tags["vidtune.trial_status"]
        assert row["epochs"] == len(swept["client"].get_metric_history(row["run_id"], "val_top1"))
        assert row["best_val_top1"] == pytest.approx(run.data.metrics["best_val_top1"])
        assert row["wall_s"] > 0
        assert row["param.train.lr"] == float(run.data.params["train.lr"])
    assert df["param.train.lr"].dtype.kind == "f"

    best = client.get_run(summary["best_run_id"])
    assert f"run `{summary['best_run_id']}`" in summary_md
    assert f"{summary['completed']} completed, {summary['pruned']} pruned by ASHA, 0 failed" in summary_md
    assert f"| `train.lr` | {best.data.params['train.lr']} |" in summary_md
    saved = int(sum(2 - e for e, s in zip(df["epochs"], df["status"]) if s == "pruned"))
    assert f"ASHA saved {saved} epochs" in summary_md and saved >= 1


def test_each_trial_has_confusion_matrix_per_class_table_and_learning_curves(swept, tmp_path, tiny_set):
    import pandas as pd

    from vidtune.data.manifest import read_manifest

    classes = read_manifest(tiny_set).class_names
    client = swept["client"]
    for run in swept["trials"]:
        files = {os.path.basename(a.path) for a in client.list_artifacts(run.info.run_id)}
        assert {"confusion_matrix.png", "per_class_metrics.csv", "learning_curves.png", "checkpoint"} <= files, files
        table = pd.read_csv(client.download_artifacts(run.info.run_id, "per_class_metrics.csv", str(tmp_path)))
        assert list(table["class"]) == list(classes)
        assert table["support"].sum() == 8  # the tiny set's val split: 2 videos x 4 classes
        acc = {c: run.data.metrics.get(f"val_acc/{c}") for c in classes}
        assert all(0.0 <= a <= 1.0 for a in table["accuracy"])
        if run.data.tags["vidtune.trial_status"] == "completed" and all(v is not None for v in acc.values()):
            best_epoch_acc = table.set_index("class")["accuracy"].to_dict()
            hist = {c: {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"val_acc/{c}")} for c in classes}
            assert any(all(hist[c].get(step) == pytest.approx(best_epoch_acc[c]) for c in classes) for step in (1, 2))


def test_report_command_rebuilds_the_sweep_artifacts_from_mlflow(swept, tmp_path):
    import pandas as pd

    out = tmp_path / "rep"
    cmd = [sys.executable, "-m", "vidtune", "report", "--experiment", "insight", "--out", str(out), "--tracking-uri", swept["uri"]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "report of 4 trials" in done.stdout
    for name in ("optimization_history", "parallel_coordinate", "intermediate_values", "timeline"):
        assert (out / "plots" / f"{name}.html").stat().st_size > 10_000 and (out / "plots" / f"{name}.png").exists()
    parent = swept["client"].download_artifacts(swept["summary"]["parent_run_id"], "trials.parquet", str(tmp_path))
    ours, theirs = pd.read_parquet(out / "trials.parquet"), pd.read_parquet(parent)
    pd.testing.assert_frame_equal(ours.drop(columns=["end_time", "wall_s"]), theirs.drop(columns=["end_time", "wall_s"]))
    assert (out / "summary.md").read_text().startswith(f"# Sweep `{swept['summary']['sweep']}`")

    bad = subprocess.run([*cmd[:5], "no-such-experiment", *cmd[6:]], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"vidtune: error: no experiment named 'no-such-experiment' in {swept['uri']}"


def test_a_failing_report_step_never_fails_the_sweep(swept, capsys):
    from vidtune.report import log_trial_artifacts, publish_sweep_report

    # A parent run that does not exist: one line, no exception, nothing uploaded.
    assert publish_sweep_report(swept["client"], "insight", "0" * 32) is False
    assert "sweep report not written" in capsys.readouterr().out
    # A trial whose checkpoint folder is unreadable: one line, no exception.
    run_id = swept["trials"][0].info.run_id
    bad = swept["tmp"] / "bad_ckpt"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    assert log_trial_artifacts(swept["client"], run_id, str(bad)) == []
    assert f"trial {run_id}: figures not written (JSONDecodeError" in capsys.readouterr().out


def test_detection_trial_gets_a_per_class_ap_table(tmp_path):
    """A detection checkpoint's details (real mAP over real segments) become per_class_ap.csv; a
    class without ground truth is listed with an empty AP rather than dropped."""
    import numpy as np
    import pandas as pd

    from vidtune.checkpoint import save_checkpoint
    from vidtune.detection_metrics import detection_map
    from vidtune.report import trial_figures

    names = ["jump", "wave", "never"]
    gt = np.array([[0, 1.0, 3.0, 0], [0, 5.0, 8.0, 1], [1, 2.0, 4.0, 0]])
    pred = np.array([[0, 1.1, 3.0, 0, 0.9], [0, 5.0, 6.0, 1, 0.8], [1, 7.0, 9.0, 0, 0.7], [1, 2.0, 4.2, 0, 0.6]])
    scalars, details = detection_map(gt, pred, names)
    ckpt = save_checkpoint(str(tmp_path / "best"), {}, {"recipe": "detection"}, names, {"epoch": 3, "details": details})
    history = {"val_map": {1: 0.2, 2: 0.4, 3: scalars["map"]}, "train_loss": {1: 2.0, 2: 1.5, 3: 1.2}}
    written = trial_figures(ckpt, history, str(tmp_path / "out"))
    assert written == ["per_class_ap.csv", "learning_curves.png"]
    table = pd.read_csv(tmp_path / "out" / "per_class_ap.csv").set_index("class")
    assert list(table.index) == names
    assert table.loc["jump", "mean_ap"] == pytest.approx(details["per_class_ap"]["jump"]["mean_ap"])
    assert table.loc["wave", "ap@0.3"] == pytest.approx(1.0) and table.loc["wave", "ap@0.7"] == pytest.approx(0.0)
    assert np.isnan(table.loc["never", "mean_ap"]) and table.loc["never", "num_gt"] == 0
    assert float(np.nanmean(table["mean_ap"])) == pytest.approx(scalars["map"])


def test_report_is_refreshed_in_a_child_process_once_trials_finish(swept):
    """Tune's hooks driven by hand on the finished sweep: no refresh until a trial has finished, then
    one child process (`python -m vidtune.report`) that rewrites the parent run's report."""
    import pickle

    from vidtune.report_callback import ReportRefreshCallback

    client, parent_id = swept["client"], swept["summary"]["parent_run_id"]
    summary_path = os.path.join(client.get_run(parent_id).info.artifact_uri.removeprefix("file://"), "summary.md")
    before = os.stat(summary_path).st_mtime_ns
    cb = ReportRefreshCallback(swept["uri"], "insight", parent_id, every_s=0)
    cb.on_step_end(iteration=0, trials=[])
    assert cb._proc is None  # nothing finished since the callback started
    cb.on_trial_complete(iteration=0, trials=[], trial=None)
    cb.on_step_end(iteration=0, trials=[])
    assert cb._proc is not None
    assert pickle.loads(pickle.dumps(cb))._proc is None  # Tune can still snapshot its run config
    cb.on_step_end(iteration=0, trials=[])  # still drawing: no second child
    cb.on_experiment_end(trials=[])
    assert cb.refreshes == 1 and cb._proc is None
    assert os.stat(summary_path).st_mtime_ns > before
    with open(summary_path) as f:
        assert f.read().startswith(f"# Sweep `{swept['summary']['sweep']}`")


def test_a_later_sweep_warm_starts_from_the_persisted_study(swept, tiny_set):
    """A second sweep of the same space on the same --optuna-storage: its new study starts with the
    first sweep's finished trials (states, values, intermediate values kept), then runs its own."""
    import optuna
    from optuna.trial import TrialState

    from vidtune.optuna_search import WARM_FROM

    tmp = swept["tmp"]
    summary = run_sweep(SweepOptions(space=str(tmp / "tiny.yaml"), data=tiny_set, tracking_uri=swept["uri"], num_samples=1,
                                     storage=str(tmp / "ray2"), experiment="insight-warm", skip_preflight=True,
                                     optuna_storage=swept["optuna"]))
    assert summary["trials"] == 1 and summary["sweep"] != swept["summary"]["sweep"]
    first = optuna.load_study(study_name=swept["summary"]["sweep"], storage=swept["optuna"])
    second = optuna.load_study(study_name=summary["sweep"], storage=swept["optuna"])
    warm = [t for t in second.trials if t.user_attrs.get(WARM_FROM)]
    # Its own: the one trial it ran (the starting point it had no budget for stays WAITING).
    own = [t for t in second.trials if not t.user_attrs.get(WARM_FROM) and t.state != TrialState.WAITING]
    assert {t.user_attrs[WARM_FROM] for t in warm} == {first.study_name}

    def key(t):
        return (t.state, t.value, sorted(t.params.items()), sorted(t.intermediate_values.items()))

    assert sorted(map(key, warm)) == sorted(map(key, first.trials))
    assert len(own) == 1 and own[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert own[0].params == {"train.lr": 0.005, "model.dropout": 0.2}  # the baseline still runs first


def test_progress_lines_count_pruned_and_completed_trials(swept):
    """One line per finished trial (trials run one at a time here), the last one matching the sweep."""
    summary = swept["summary"]
    lines = [ln for ln in swept["stdout"].splitlines() if ln.startswith("progress: ")]
    finished = [ln for ln in lines if re.match(r"progress: \d+/4 trials finished", ln)]
    assert [int(re.match(r"progress: (\d+)/", ln).group(1)) for ln in finished][-4:] == [1, 2, 3, 4]
    assert finished[-1].startswith(f"progress: 4/4 trials finished ({summary['completed']} completed, "
                                   f"{summary['pruned']} pruned, 0 failed), 0 running; best val_top1 ")
    assert f"best val_top1 {summary['best_value']:.4f}" in finished[-1]
    assert "ETA ~" in finished[0] and "ETA" not in finished[-1]


def _chromium() -> str | None:
    import shutil

    return os.environ.get("VIDTUNE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_mlflow_ui_in_a_real_browser_lists_every_trial_and_the_sweep_plots(swept):
    """`mlflow ui` over the finished sweep's store, opened in headless Chromium through Playwright:
    the experiment's runs table lists every trial under the sweep's parent run, and the parent's
    artifact view shows plots/, trials.parquet and summary.md. Screenshots go to
    $VIDTUNE_TEST_ARTIFACTS (default test-artifacts/ in the repository)."""
    import socket
    import time
    import urllib.request

    from vidtune.tracking import ui_url

    playwright = pytest.importorskip("playwright.sync_api")
    shots = os.environ.get("VIDTUNE_TEST_ARTIFACTS") or os.path.join(os.path.dirname(os.path.dirname(__file__)), "test-artifacts")
    os.makedirs(shots, exist_ok=True)
    client, summary = swept["client"], swept["summary"]
    exp = client.get_experiment_by_name("insight")
    trials = [r.info.run_name for r in swept["trials"]]
    parent = client.get_run(summary["parent_run_id"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(swept["tmp"] / "mlflow-ui.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", swept["uri"], "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # start-up takes 10-40 s on a busy 2-core machine
            if server.poll() is not None:
                pytest.fail(f"mlflow ui exited with {server.returncode}; see {log.name}")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        with playwright.sync_playwright() as p:
            # No background networking: this machine's network is closed, and Chromium would keep
            # trying Google's hosts.
            browser = p.chromium.launch(executable_path=_chromium(), args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(120_000)
            # The link the sweep prints (``ui_url``): it must land on the runs table, not on
            # MLflow's GenAI overview (traces), which is where a plain experiment link opens.
            assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
            page.goto(ui_url(swept["uri"], exp.experiment_id, ui_base=base), wait_until="domcontentloaded")
            row = page.locator("[role=row]", has_text=parent.info.run_name).first
            row.wait_for()
            # Trial runs are nested under the sweep's parent run: expand it.
            row.locator("button[data-component-id*='runnamecellrenderer']").first.click()
            for name in trials:
                page.get_by_text(name, exact=True).first.wait_for()
            page.screenshot(path=os.path.join(shots, "mlflow_ui_experiment.png"), full_page=True)
            assert page.get_by_text(f"{len(trials) + 1} matching runs").count() == 1
            assert "/overview" not in page.url and "workflowType=machine_learning" in page.url
            # The best trial, one click away, shows the tuned metric with its value.
            metric, best_run = summary["metric"], client.get_run(summary["best_run_id"])
            page.get_by_text(best_run.info.run_name, exact=True).first.click()
            page.get_by_text(metric, exact=True).first.wait_for()
            page.get_by_text(str(round(best_run.data.metrics[metric], 3))).first.wait_for()
            page.screenshot(path=os.path.join(shots, "mlflow_ui_best_trial.png"), full_page=True)

            page.goto(f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts", wait_until="domcontentloaded")
            for name in ("plots", "trials.parquet", "summary.md"):
                page.get_by_text(name, exact=True).first.wait_for()
            page.get_by_text("plots", exact=True).first.click()  # open the folder
            for name in ("timeline.png", "intermediate_values.html", "optimization_history.png"):
                page.get_by_text(name, exact=True).first.wait_for()
            page.get_by_text("timeline.png", exact=True).first.click()  # its preview renders in the page
            page.wait_for_timeout(2000)
            page.screenshot(path=os.path.join(shots, "mlflow_ui_sweep_plots.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
        log.close()
