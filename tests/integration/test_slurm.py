"""Sweeps on a real one-node SLURM cluster through submitit (``hydra/launcher=stx_slurm``),
logging to an ``mlflow server`` on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from conftest import FAST, STX, run_stx
from mlflow.tracking import MlflowClient

# stx_slurm asks for a GPU, 8 CPUs and 32 GB per job: this node has 4 CPUs and no GPU
ON_THIS_NODE = ["hydra/launcher=stx_slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.mem_gb=null",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=30", "tracking=server"]


def sweep_runs(uri, experiment):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    (parent,) = [run for run in runs if run.data.tags.get("stx.sweep") == "true"]
    return client, parent, sorted((run for run in runs if run is not parent), key=lambda run: int(run.data.tags["stx.sweep.job_num"]))


def test_sweep_on_slurm(slurm, postgres_server, tmp_path):
    env = {**slurm, "MLFLOW_TRACKING_URI": postgres_server}
    result = run_stx(tmp_path, "-m", *ON_THIS_NODE, *FAST, "tracking.experiment=slurm", "seed=range(4)", env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    _, parent, children = sweep_runs(postgres_server, "slurm")
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert [child.info.status for child in children] == ["FINISHED"] * 4
    assert [child.data.params["seed"] for child in children] == ["0", "1", "2", "3"]
    submitted = {path.name for path in (Path(parent.data.tags["stx.sweep.dir"]) / ".submitit").glob("*_*") if path.is_dir()}
    assert {child.data.tags["stx.slurm_job_id"] for child in children} == submitted and len(submitted) == 4


def test_scancel_one_job(slurm, postgres_server, tmp_path):
    """``scancel`` of one running job: SLURM's accounting records it CANCELLED, its run ends KILLED
    (SIGTERM) or FAILED with its latest image on disk, the other jobs FINISHED; the sweep, not
    interrupted itself, learns the job's end from ``sacct`` (submitit polls it), exits 1 with one
    ``stx: error:`` line naming the job and its state, and closes its parent FAILED with the
    sweep's summary."""
    env = {**os.environ, "STX_RUNS_DIR": str(tmp_path / "runs"), **slurm, "MLFLOW_TRACKING_URI": postgres_server}
    sweep = subprocess.Popen(STX + ["-m", *ON_THIS_NODE, *FAST, "tracking.experiment=scancel", "schedule.steps=2,2,2,100000"],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(postgres_server)
    try:
        for _ in range(900):  # until 3 jobs are done and the long one has logged metrics
            experiment = client.get_experiment_by_name("scancel")
            runs = experiment and client.search_runs([experiment.experiment_id], "tags.`stx.sweep.job_num` != ''")
            if runs and sorted(run.info.status for run in runs) == ["FINISHED"] * 3 + ["RUNNING"]:
                (long,) = [run for run in runs if run.info.status == "RUNNING"]
                if "total" in long.data.metrics:
                    break
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(1)
        job_id = long.data.tags["stx.slurm_job_id"]
        subprocess.run(["scancel", job_id], env=env, check=True)
        _, err = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:  # only when the test already failed: leave no sweep behind
            sweep.kill()
            sweep.communicate()
    accounting = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], env=env, capture_output=True, text=True)
    assert accounting.stdout.startswith("CANCELLED"), accounting
    assert sweep.returncode == 1 and "Traceback" not in err, err
    (message,) = [line for line in err.splitlines() if line.startswith("stx: error:") and job_id in line]
    assert "CANCELLED" in message, err
    _, parent, children = sweep_runs(postgres_server, "scancel")
    assert [child.info.status for child in children[:3]] == ["FINISHED"] * 3
    assert children[3].info.status in ("KILLED", "FAILED") and children[3].data.tags["stx.error"] == "interrupted"
    assert (Path(children[3].data.tags["stx.run_dir"]) / "interrupted_output.png").is_file()
    assert parent.info.status == "FAILED" and "stx: warning" not in err, err
    assert [item.path for item in client.list_artifacts(parent.info.run_id, "compare")]  # the sweep's summary, made at exit
