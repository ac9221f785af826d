"""The README's local commands run as written, in an empty folder: the quickstart sweep, the MLflow
UI, promote and predict (the install itself is what CI's `.ci/run` does before the suite)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks() -> dict[str, list[str]]:
    """The commands of each ```bash block, keyed by the heading above it; comments stripped."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    out, heading = {}, None
    for m in re.finditer(r"^(#+ [^\n]*)$|^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
            continue
        lines = []
        for line in m.group(2).splitlines():
            if line.lstrip().startswith("#"):
                continue
            command = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            if command:
                lines.append(command)
        out.setdefault(heading, []).extend(lines)
    return out


def test_readme_blocks_are_found():
    blocks = readme_blocks()
    assert blocks["Two commands"][0].startswith("pip install -e") and "&& vidtune sweep" in blocks["Two commands"][0]
    assert [c.split()[1] for c in blocks["What the quickstart does"]] == ["ui", "promote", "predict"]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.slow  # ~3 min quiet; not yet seen passing in the default suite under load (see issue 14 note)
def test_readme_quickstart_runs_as_written(tmp_path):
    blocks = readme_blocks()
    install_and_sweep = blocks["Two commands"][0]
    sweep = install_and_sweep.split("&&", 1)[1].strip()  # the install is CI's own first step
    ui, promote, predict = blocks["What the quickstart does"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the README's store: ./mlflow.db

    def run(command: str, timeout: float) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    swept = run(sweep, timeout=1500)
    summary = json.loads(swept.stdout.strip().splitlines()[-1])
    assert summary["experiment"] == "quickstart" and summary["completed"] >= 1
    link = next(line for line in swept.stdout.splitlines() if line.startswith("MLflow UI:"))
    assert "mlflow ui --backend-store-uri sqlite:///" in link and "workflowType=machine_learning" in link

    # `mlflow ui` serves until stopped: start it as written (another port only if 5000 is taken
    # on this machine), check that it serves the sweep's store, stop it.
    command = ui if _port_free(5000) else f"{ui} --port {_free_port()}"
    port = int(re.search(r"--port (\d+)", command).group(1)) if "--port" in command else 5000
    server = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, f"`{command}` exited with {server.returncode}"
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get-by-name"
                                              "?experiment_name=quickstart", timeout=5).read()
                break
            except OSError:
                assert time.time() < deadline, f"`{command}` did not serve within 180 s"
                time.sleep(1)
        assert json.loads(body)["experiment"]["name"] == "quickstart"
    finally:
        server.terminate()
        server.wait(30)

    promoted = run(promote, timeout=300)
    assert "registered quickstart version 1" in promoted.stdout
    predicted = run(predict, timeout=300)
    lines = [json.loads(line) for line in predicted.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1 and lines[0]["video"].endswith("move_left/move_left_0049.mp4")
    top = lines[0]["top_k"]
    scores = [t["score"] for t in top]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-4
    names = {p.name for p in next((tmp_path / "data").glob("quickstart-*")).iterdir() if p.is_dir()}
    assert len(names) == 6 and {t["label"] for t in top} <= names, (top, names)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", ["Two commands", "What the quickstart does"])
def test_readme_commands_exist_as_cli_entry_points(name):
    """Every `vidtune` subcommand the README's runnable blocks name is one the CLI knows."""
    from vidtune.cli import build_parser

    parser = build_parser()
    for command in readme_blocks()[name]:
        for part in command.split("&&"):
            words = part.split()
            if words and words[0] == "vidtune":
                parser.parse_args(words[1:])  # exits 2 on an unknown subcommand or flag
