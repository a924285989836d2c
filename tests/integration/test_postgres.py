"""A sweep in parallel processes logging to a real ``mlflow server`` on PostgreSQL, and that server going away."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import FAST, STX, mlflow_server_at, run_stx
from mlflow.tracking import MlflowClient

PARALLEL = ["tracking=server", "hydra/launcher=joblib", "hydra.launcher.n_jobs=4"]


def sweep_runs(uri, experiment="stx"):
    """The client, parent runs and child runs of ``experiment`` at ``uri``."""
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    parents = [run for run in runs if run.data.tags.get("stx.sweep") == "true"]
    return client, parents, [run for run in runs if "mlflow.parentRunId" in run.data.tags]


def test_parallel_sweep_on_postgres_then_compare_and_reproduce(postgres_server, tmp_path):
    uri = postgres_server
    env = {"MLFLOW_TRACKING_URI": uri}
    result = run_stx(tmp_path, "-m", *PARALLEL, *FAST, "seed=range(8)", env=env, timeout=600)
    assert result.returncode == 0, result.stderr

    client, (parent,), children = sweep_runs(uri)
    assert parent.info.status == "FINISHED" and parent.data.tags["stx.sweep.jobs"] == "8"
    assert len(children) == 8 and {child.info.status for child in children} == {"FINISHED"}
    assert sorted(int(child.data.params["seed"]) for child in children) == list(range(8))  # none lost or twice
    assert sorted(int(child.data.tags["stx.sweep.job_num"]) for child in children) == list(range(8))
    assert {child.data.tags["mlflow.parentRunId"] for child in children} == {parent.info.run_id}
    assert len({child.data.tags["stx.pid"] for child in children}) > 1  # really several processes
    assert all(child.data.metrics["total"] > 0 for child in children)

    compared = run_stx(tmp_path, "compare", parent.info.run_id, "--tracking-uri", uri)
    assert compared.returncode == 0, compared.stderr
    rows = compared.stdout.splitlines()[1:9]
    assert sorted(row.split()[0] for row in rows) == sorted(child.info.run_id[:8] for child in children)

    original = children[0]
    reproduced = run_stx(tmp_path, "reproduce", original.info.run_id, "--tracking-uri", uri, env=env)
    assert reproduced.returncode == 0, reproduced.stderr
    assert "max pixel difference to the original output: 0/255" in reproduced.stdout
    (copy,) = client.search_runs([original.info.experiment_id], f"tags.reproduced_from = '{original.info.run_id}'")
    assert copy.info.status == "FINISHED" and copy.data.metrics["total"] == original.data.metrics["total"]


EXPERIMENT = "tracking.experiment=server_stop"


def test_server_stopped_mid_sweep(postgres, tmp_path):
    """The server dies while 4 of 8 parallel jobs run: each job stops with one error naming the
    store, its image and metrics stay on disk, the sweep exits 1, and once the server is back the
    next job closes the orphaned runs (children and parent) as FAILED."""
    fail_fast = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    with mlflow_server_at(tmp_path / "server", backend=postgres) as (server, uri):
        env = {**os.environ, "STX_RUNS_DIR": str(tmp_path / "runs"), "MLFLOW_TRACKING_URI": uri, **fail_fast}
        sweep = subprocess.Popen(STX + ["-m", *PARALLEL, *FAST, EXPERIMENT, "schedule.steps=100000", "seed=range(8)"], cwd=tmp_path,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        client = MlflowClient(uri)
        try:
            for _ in range(600):  # until the 4 first jobs have logged metrics
                experiment = client.get_experiment_by_name("server_stop")
                filter_running = "attributes.status = 'RUNNING' and metrics.total > 0"
                if experiment and len(client.search_runs([experiment.experiment_id], filter_running)) == 4 or sweep.poll() is not None:
                    break
                time.sleep(1)
            assert sweep.poll() is None, sweep.communicate()
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            _, err = sweep.communicate(timeout=600)
    assert sweep.returncode == 1, err
    assert "Traceback" not in err and "Warning" not in err, err
    # the first write after the kill: the metrics, or the image when the job is at an image_every step
    assert err.count(f"stx: error: the MLflow tracking store {uri} failed while logging") == 4, err
    assert err.count(f"stx: error: the MLflow server at {uri} does not answer") == 4, err  # the jobs not yet started
    assert err.count("could not be closed: the tracking store") == 1  # the parent
    for folder in sorted((tmp_path / "runs" / "multirun").glob("*/*/[0-3]")):  # the jobs that ran: nothing lost
        steps = [int(line.split(",")[0]) for line in (folder / "metrics.csv").read_text().splitlines() if ",total," in line]
        assert steps and steps == sorted(set(steps)) and (folder / "interrupted_output.png").is_file()

    with mlflow_server_at(tmp_path / "server", backend=postgres, port=int(uri.rsplit(":", 1)[1])):
        _, parents, children = sweep_runs(uri, "server_stop")
        assert len(parents) == 1 and len(children) == 4
        assert {run.info.status for run in parents + children} == {"RUNNING"}
        for child in children:  # what MLflow holds of each job is also in its metrics.csv
            logged = max(point.step for point in client.get_metric_history(child.info.run_id, "total"))
            assert f"{logged},total," in (Path(child.data.tags["stx.run_dir"]) / "metrics.csv").read_text()
        after = run_stx(tmp_path, "tracking=server", *FAST, EXPERIMENT, env={"MLFLOW_TRACKING_URI": uri})
        assert after.returncode == 0, after.stderr
        _, parents, children = sweep_runs(uri, "server_stop")
        assert {run.info.status for run in parents + children} == {"FAILED"}
        assert all("is gone" in run.data.tags["stx.error"] for run in parents + children)
