"""Multi-node on one machine, with real parts: a Ray cluster of a head and two worker nodes
(`ray start`, token authentication on), a real `mlflow server` over HTTP backed by a real
PostgreSQL server (SQLite where PostgreSQL is not installed), sweeps submitted through
`launch/sweep.py --address ...`; then the faults: a DDP worker killed mid-trial, the sweep driver
killed and resumed, the tracking server down for a while, and storage one node cannot see; and
`--storage s3://...` on a real S3 API server (moto's), each node with its own local disk."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PG_BINS = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)  # Debian's postgresql package


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# ----------------------------------------------------------------------------------------------
# PostgreSQL + mlflow server
# ----------------------------------------------------------------------------------------------
def _pg_tool(name: str) -> str | None:
    for folder in (*PG_BINS, *os.environ.get("PATH", "").split(os.pathsep)):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    return None


@pytest.fixture(scope="module")
def backend_store(tmp_path_factory):
    """A PostgreSQL database URI (a server this fixture starts), else a SQLite file URI."""
    import tempfile

    initdb, pg_ctl = _pg_tool("initdb"), _pg_tool("pg_ctl")
    if not (initdb and pg_ctl):
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite')}/mlflow.db"
        return
    # PostgreSQL refuses to run as root: as root, run it as the `postgres` user, in a folder it
    # owns (pytest's tmp folders are private to root).
    folder = tempfile.mkdtemp(prefix="vidtune-pg-")
    as_user = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres", "postgres")
    data, port = os.path.join(folder, "data"), free_port()
    subprocess.run([*as_user, initdb, "-D", data, "--auth=trust", "-U", "postgres"], check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", data, "-w", "-l", os.path.join(folder, "pg.log"),
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


class MlflowServer:
    def __init__(self, backend: str, artifacts: str, port: int, log: str):
        self.backend, self.artifacts, self.port, self.log = backend, artifacts, port, log
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        import urllib.request

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.backend, "--serve-artifacts", "--artifacts-destination", self.artifacts,
             "--workers", "1"],
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True,
        )

        def healthy():
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                assert self.proc.poll() is None, f"mlflow server exited; see {self.log}"
                return False

        wait_for(healthy, 120, "the mlflow server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(backend_store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(backend_store, str(folder / "artifacts"), free_port(), str(folder / "server.log"))
    server.start()
    yield server
    server.stop()


# ----------------------------------------------------------------------------------------------
# A three-node Ray cluster on this machine
# ----------------------------------------------------------------------------------------------
class S3Server:
    """moto's S3 API server (a real HTTP endpoint speaking the S3 protocol) on 127.0.0.1."""

    def __init__(self, log: str):
        self.port = free_port()
        self.env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "vidtune",
                    "AWS_SECRET_ACCESS_KEY": "vidtune", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)

        def up():
            assert self.proc.poll() is None, f"moto server exited; see {log}"
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(up, 60, "the S3 server")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], aws_access_key_id="vidtune",
                            aws_secret_access_key="vidtune", region_name="us-east-1")

    def keys(self, bucket: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    pytest.importorskip("moto.server")
    server = S3Server(str(tmp_path_factory.mktemp("s3") / "moto.log"))
    yield server
    server.stop()


class RayNodes:
    def __init__(self, tmp, extra_env: dict | None = None):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
                    "RAY_USAGE_STATS_ENABLED": "0", **(extra_env or {})}
        self.env.pop("RAY_ADDRESS", None)
        self.tmp = tmp
        import tempfile

        self.temp_dir = tempfile.mkdtemp(prefix="vt-ray-", dir="/tmp")  # short: Ray's socket paths live here

    def ray(self, *args, prefix=(), env=None, **kw):
        return subprocess.run([*prefix, os.path.join(os.path.dirname(sys.executable), "ray"), *args],
                              env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=180, **kw)

    def scratch(self, name: str) -> str:
        """A node's own local disk for a cloud --storage's mirror (workers inherit the raylet's env)."""
        return os.path.join(self.temp_dir, f"scratch-{name}")

    def start(self) -> None:
        # A temp dir of its own: `ray start` records its cluster as the machine's current one there,
        # and other Ray users on this machine (other tests, sweeps) must not find and join it.
        head = self.ray("start", "--head", "--temp-dir", self.temp_dir, "--node-ip-address", "127.0.0.1",
                        "--port", str(self.port), "--num-cpus", "1",
                        "--resources", '{"vidtune_driver": 10}', "--dashboard-port", str(free_port()),
                        "--min-worker-port", "0", "--max-worker-port", "0", env={"VIDTUNE_SCRATCH": self.scratch("head")})
        assert head.returncode == 0, head.stderr[-2000:]
        for i in range(2):
            worker = self.ray("start", "--address", self.address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                              env={"VIDTUNE_SCRATCH": self.scratch(f"worker{i}")})
            assert worker.returncode == 0, worker.stderr[-2000:]
        wait_for(lambda: len(self.alive_nodes()) == 3, 60, "3 Ray nodes")

    def alive_nodes(self) -> list[str]:
        out = subprocess.run([sys.executable, "-c",
                              "import ray, json; ray.init(address=%r, logging_level='ERROR');"
                              "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive']]))" % self.address],
                             env=self.env, capture_output=True, text=True, timeout=120)
        import json

        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("[")]
        return json.loads(lines[-1]) if lines else []

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes only (other Rays on the machine are left alone): those whose
        command line names its GCS port, and their descendants (workers retitle themselves
        `ray::...`)."""
        import re

        # Ray may advertise the machine's own address rather than 127.0.0.1: match the port.
        mark = re.compile(rf"(gcs[-_]address=[\w.\-]+:{self.port}\b|gcs_server_port={self.port}\b|--port={self.port}\b)")
        found = {}
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if mark.search(cmd):
                found[p.pid] = p
                try:
                    found.update({c.pid: c for c in p.children(recursive=True)})
                except psutil.Error:
                    pass
        return list(found.values())

    def stop(self) -> None:
        for p in self.processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_nodes(tmp_path_factory, s3_server):
    nodes = RayNodes(tmp_path_factory.mktemp("raynodes"), s3_server.env)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


# ----------------------------------------------------------------------------------------------
# Sweeps through launch/sweep.py
# ----------------------------------------------------------------------------------------------
def write_space(folder, name: str, workers: int = 1, num_samples: int = 3, epochs: int = 3, concurrent: int = 3) -> str:
    space = {
        "name": name,
        "recipe": "classify",
        "fixed": {
            "data": {"num_segments": 4, "crop_size": 32, "decode_short_side": 40, "hflip": 0.0, "num_workers": 0},
            "model": {"arch": "cnn3d", "widths": [8, 16], "pool": "max"},
            "train": {"epochs": epochs, "batch_size": 8, "lr": 0.005},
        },
        "space": {"train.lr": {"type": "float", "low": 1.0e-3, "high": 2.0e-2, "log": True}},
        # Every trial runs its full budget (ASHA's grace period = max epochs): the fault tests
        # count epochs per run.
        "tune": {"metric": "val_top1", "mode": "max", "num_samples": num_samples, "max_concurrent": concurrent, "seed": 0,
                 "asha": {"grace_period": epochs, "reduction_factor": 2}},
        "resources": {"workers": workers, "cpus_per_worker": 1, "driver_resource": "vidtune_driver"},
    }
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(space, f)
    return path


def launch(nodes: RayNodes, space: str, data: str, uri: str, storage: str, experiment: str, *extra, log: str,
           env: dict | None = None):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "sweep.py"), "--space", space, "--data", data, "--address",
           nodes.address, "--tracking-uri", uri, "--storage", storage, "--experiment", experiment, "--skip-preflight",
           *extra]
    return subprocess.Popen(cmd, cwd=os.path.dirname(log), env={**nodes.env, **(env or {})}, stdout=open(log, "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, log: str, timeout: float = 420) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    with open(log) as f:
        text = f.read()
    assert proc.returncode == 0, text[-4000:]
    return text


def trial_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return client, [], []
    runs = client.search_runs([exp.experiment_id], max_results=500)
    return (client, [r for r in runs if r.data.tags.get("vidtune.role") == "sweep"],
            [r for r in runs if r.data.tags.get("vidtune.role") == "trial"])


def epochs_logged(client, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "val_top1"))


def one_done_one_running(uri: str, experiment: str) -> bool:
    """A trial run finished and another mid-way (an epoch logged): the moment to kill the driver."""
    client, _, trials = trial_runs(uri, experiment)
    done = [t for t in trials if t.info.status == "FINISHED"]
    running = [t for t in trials if t.info.status == "RUNNING" and epochs_logged(client, t.info.run_id)]
    return bool(done and running)


def assert_every_run_whole(client, trials, epochs: int):
    for t in trials:
        assert t.info.status in ("FINISHED", "FAILED"), (t.info.run_name, t.info.status)
        assert t.data.tags["vidtune.trial_status"] == "completed", t.data.tags
        assert epochs_logged(client, t.info.run_id) == list(range(1, epochs + 1))  # each epoch once
        names = {a.path for a in client.list_artifacts(t.info.run_id, "checkpoint")}
        assert "checkpoint/model.pt" in names


def test_killed_ddp_worker_resumes_from_checkpoint(ray_nodes, mlflow_server, tiny_set, tmp_path):
    storage = str(tmp_path / "storage")
    log = str(tmp_path / "sweep.log")
    space = write_space(tmp_path, "ddpkill", workers=2, num_samples=1, epochs=8, concurrent=1)
    proc = launch(ray_nodes, space, tiny_set, mlflow_server.url, storage, "ddpkill", log=log)

    def logged_epoch():
        client, _, trials = trial_runs(mlflow_server.url, "ddpkill")
        return trials and len(epochs_logged(client, trials[0].info.run_id)) >= 1

    wait_for(logged_epoch, 300, "the DDP trial's first epoch")
    titles = {p: " ".join(p.cmdline()) for p in ray_nodes.processes()}
    workers = [p for p, title in titles.items() if "RayTrainWorker" in title]
    assert len(workers) == 2, sorted(t[:80] for t in titles.values() if t.startswith("ray::"))
    workers[1].kill()  # one rank dies mid-trial: Ray Train restarts the group from the checkpoint
    text = finish(proc, log)
    client, parents, trials = trial_runs(mlflow_server.url, "ddpkill")
    assert len(trials) == 1  # the same MLflow run continued
    assert_every_run_whole(client, trials, epochs=8)
    assert len(trials[0].data.tags["vidtune.nodes"].split(",")) == 2  # the two ranks ran on two nodes
    assert "resumed from" in text


def test_killed_sweep_driver_resumes_without_losing_or_duplicating(ray_nodes, mlflow_server, tiny_set, tmp_path):
    storage = str(tmp_path / "storage")
    log = str(tmp_path / "sweep.log")
    space = write_space(tmp_path, "driverkill", num_samples=4, epochs=4, concurrent=2)
    proc = launch(ray_nodes, space, tiny_set, mlflow_server.url, storage, "driverkill", log=log)

    wait_for(lambda: one_done_one_running(mlflow_server.url, "driverkill"), 300, "a finished trial and a trial mid-way")
    _, _, before = trial_runs(mlflow_server.url, "driverkill")
    finished_before = {t.info.run_id: t.info.end_time for t in before if t.info.status == "FINISHED"}
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep driver dies with no chance to clean up
    proc.wait()

    proc = launch(ray_nodes, space, tiny_set, mlflow_server.url, storage, "driverkill", "--resume", log=log)
    finish(proc, log)
    client, parents, trials = trial_runs(mlflow_server.url, "driverkill")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 4, [t.info.run_name for t in trials]  # exactly one run per trial
    assert_every_run_whole(client, trials, epochs=4)
    after = {t.info.run_id: t.info.end_time for t in trials}
    for run_id, end in finished_before.items():
        assert after[run_id] == end  # finished trials were not run again


def test_sweep_spans_nodes_logs_over_http_and_outlives_a_tracking_outage(ray_nodes, backend_store, tiny_set, tmp_path):
    # A server of its own: this test takes it down for a while mid-sweep.
    server = MlflowServer(backend_store, str(tmp_path / "artifacts"), free_port(), str(tmp_path / "server.log"))
    server.start()
    storage = str(tmp_path / "storage")
    log = str(tmp_path / "sweep.log")
    proc = launch(ray_nodes, write_space(tmp_path, "spread", num_samples=3, epochs=5), tiny_set, server.url, storage,
                  "spread", log=log)
    try:
        def first_epoch():
            client, _, trials = trial_runs(server.url, "spread")
            return trials and any(epochs_logged(client, t.info.run_id) for t in trials)

        wait_for(first_epoch, 300, "a first epoch in MLflow")
        server.stop()
        time.sleep(20)  # trials go on training while the server is down
        assert proc.poll() is None, "the sweep must not stop because MLflow is down"
        server.start()
        text = finish(proc, log)
        assert "shared by all 3 nodes" in text
        assert "unreachable" in text and "reachable again" in text
        client, parents, trials = trial_runs(server.url, "spread")
        assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(trials) == 3
        assert_every_run_whole(client, trials, epochs=5)  # nothing lost, nothing twice
        nodes = {t.data.tags["vidtune.nodes"] for t in trials}
        assert len(nodes) >= 2, nodes  # 3 one-CPU trials at once on three one-CPU nodes
        assert not glob.glob(os.path.join(storage, "*", "mlflow_outbox.jsonl"))  # all delivered
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        server.stop()


def test_cloud_storage_uri_sweep_resumes_from_another_machine(ray_nodes, s3_server, mlflow_server, tiny_set, tmp_path):
    """`--storage s3://...`: every node works on its own local disk; checkpoints, histories, the
    manifest and Tune's state travel through S3. The driver is killed mid-sweep, every node's local
    files are wiped, and the sweep is resumed by a driver with an empty disk of its own."""
    s3_server.client().create_bucket(Bucket="vidtune-cloud")
    storage = "s3://vidtune-cloud/sweeps"
    log = str(tmp_path / "sweep.log")
    space = write_space(tmp_path, "cloud", num_samples=4, epochs=4, concurrent=2)
    proc = launch(ray_nodes, space, tiny_set, mlflow_server.url, storage, "cloud", log=log,
                  env={"VIDTUNE_SCRATCH": str(tmp_path / "driver-a")})

    wait_for(lambda: one_done_one_running(mlflow_server.url, "cloud"), 300, "a finished trial and a trial mid-way")
    _, _, before = trial_runs(mlflow_server.url, "cloud")
    finished_before = {t.info.run_id: t.info.end_time for t in before if t.info.status == "FINISHED"}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    def trial_actors_gone():  # Ray kills a dead driver's actors; none may write after the wipe
        titles = []
        for p in ray_nodes.processes():
            with contextlib.suppress(psutil.Error):
                titles.append(" ".join(p.cmdline()))
        return not any("ImplicitFunc" in t or "trial_driver" in t for t in titles)

    wait_for(trial_actors_gone, 60, "the killed sweep's trial processes to exit")
    for folder in [tmp_path / "driver-a", *glob.glob(ray_nodes.scratch("*"))]:
        shutil.rmtree(folder, ignore_errors=True)  # nothing local survives: all must come from S3

    proc = launch(ray_nodes, space, tiny_set, mlflow_server.url, storage, "cloud", "--resume", log=log,
                  env={"VIDTUNE_SCRATCH": str(tmp_path / "driver-b")})
    text = finish(proc, log)
    assert "reachable from all 3 nodes" in text
    client, parents, trials = trial_runs(mlflow_server.url, "cloud")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 4, [t.info.run_name for t in trials]
    assert_every_run_whole(client, trials, epochs=4)  # each epoch once, best checkpoints in MLflow
    after = {t.info.run_id: t.info.end_time for t in trials}
    for run_id, end in finished_before.items():
        assert after[run_id] == end
    keys = s3_server.keys("vidtune-cloud")
    for t in trials:
        trial_id = t.data.tags["vidtune.trial_id"]
        assert any(k.endswith(f"/trials/{trial_id}/best/model.pt") for k in keys), trial_id
        assert any(k.endswith(f"/trials/{trial_id}/history.jsonl") for k in keys), trial_id
    assert not os.path.exists(tmp_path / "ray_results")  # nothing went to a local default folder


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /mnt && umount /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs mount namespaces (unshare -m) to give a node its own view of the disk")
def test_storage_one_node_cannot_see_is_refused(ray_nodes, mlflow_server, tiny_set, tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    # A fourth node in its own mount namespace, with an empty tmpfs over the storage folder: to
    # it, the sweep's storage is a different, node-local folder.
    manager_port = free_port()
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    node = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs tmpfs {storage} && exec {ray_bin} start --address {ray_nodes.address} "
         f"--node-ip-address 127.0.0.1 --num-cpus 1 --node-manager-port {manager_port} --block"],
        env=ray_nodes.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for(lambda: len(ray_nodes.alive_nodes()) == 4, 90, "the fourth node")
        log = str(tmp_path / "sweep.log")
        proc = launch(ray_nodes, write_space(tmp_path, "localstore"), tiny_set, mlflow_server.url, str(storage),
                      "localstore", log=log)
        proc.wait(timeout=300)
        with open(log) as f:
            text = f.read()
        assert proc.returncode == 2, text[-3000:]
        assert f"--storage {storage}: not shared; 1 of 4 nodes cannot see it" in text
        assert "Traceback" not in text
        _, _, trials = trial_runs(mlflow_server.url, "localstore")
        assert trials == []  # refused before any trial started
    finally:
        for p in psutil.process_iter(["cmdline"]):
            if f"{manager_port}" in " ".join(p.info["cmdline"] or []) or p.pid == node.pid:
                try:
                    for child in p.children(recursive=True):
                        child.kill()
                    p.kill()
                except psutil.Error:
                    pass
        node.wait(timeout=30)
