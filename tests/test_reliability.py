"""Interruptions end to end: nothing logged is lost, runs are closed, killed runs resume exactly."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import STX, artifact_paths, client_for, run_stx
from PIL import Image

pytestmark = pytest.mark.slow

STEPS = ["encoder.weights=random", "schedule.size=32", "schedule.steps=300", "tracking.image_every=0"]


def start_stx(tmp_path, *args):
    env = {**os.environ, "STX_RUNS_DIR": str(tmp_path / "runs")}
    return subprocess.Popen(STX + list(args), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_run_line(process):
    """Read the job's output until it reports its MLflow run (the store exists by then); keep
    draining the rest in the background so the job never blocks on a full pipe."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "[stx.runner][INFO] - MLflow run" in line:
            threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
            return lines
    raise AssertionError("the job ended before starting its run:\n" + "".join(lines))


def wait_for(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return value


def running_run(tmp_path):
    db = tmp_path / "runs" / "mlflow.db"
    if not db.exists():
        return None
    client = client_for(tmp_path)
    experiment = client.get_experiment_by_name("stx")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
    children = [r for r in runs if "stx.sweep" not in r.data.tags]
    return children[0] if children else None


def pixels(path):
    return np.asarray(Image.open(path))


def test_interrupted_run_keeps_its_work_and_resumes_to_the_uninterrupted_result(tmp_path):
    process = start_stx(tmp_path, *STEPS, "schedule.checkpoint_every=5")
    output = wait_for_run_line(process)
    run = wait_for(lambda: (r := running_run(tmp_path)) and "stx.checkpoint_step" in client_for(tmp_path).get_run(r.info.run_id).data.tags and r)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, "".join(output)
    time.sleep(0.5)  # let the drain thread take the last lines
    assert "stx: interrupted" in "".join(output) and "Traceback" not in "".join(output)

    client = client_for(tmp_path)
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["stx.error"] == "interrupted"
    logged_steps = [m.step for m in client.get_metric_history(run.info.run_id, "total")]
    assert 5 <= max(logged_steps) < 300  # metrics up to the interruption were kept
    run_dir = Path(killed.data.tags["stx.run_dir"])
    assert (run_dir / "interrupted_output.png").is_file()
    assert {"interrupted_output.png", "checkpoint/checkpoint.pt"} <= set(artifact_paths(client, run.info.run_id))

    resumed = run_stx(tmp_path, f"resume={run.info.run_id}")
    assert resumed.returncode == 0, resumed.stderr
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "total")) == 300

    (tmp_path / "u").mkdir()
    uninterrupted = run_stx(tmp_path / "u", *STEPS)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    (reference,) = (tmp_path / "u" / "runs").glob("*/*/output.png")
    resumed_output = Path(finished.data.tags["stx.run_dir"]) / "output.png"
    assert np.array_equal(pixels(resumed_output), pixels(reference))

    again = run_stx(tmp_path, f"resume={run.info.run_id}")
    assert again.returncode == 2 and "already FINISHED" in again.stderr


def test_terminated_sweep_closes_its_parent(tmp_path):
    process = start_stx(tmp_path, "-m", *STEPS, "seed=0,1")
    output = wait_for_run_line(process)
    child = wait_for(lambda: running_run(tmp_path))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    time.sleep(0.5)
    assert "Traceback" not in "".join(output), "".join(output)
    client = client_for(tmp_path)
    assert client.get_run(child.info.run_id).info.status == "KILLED"
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"
