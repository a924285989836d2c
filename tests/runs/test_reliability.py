"""Interruptions and failures end to end: nothing computed is lost, every step is logged exactly
once, runs are closed (by the next job when their process was killed), killed runs resume exactly.
The job that is stopped runs the ``stx`` command in a process of its own; the commands after it
(a resume, a reference run) call its ``main`` in this process (conftest.stx_here)."""

import csv
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, STX, artifact_paths, client_for, local_uri, relay_to, run_stx, stx_here
from mlflow.tracking import MlflowClient
from PIL import Image

from stx.runs.compare import compare
from stx.runs.liveness import close_dead_runs

pytestmark = pytest.mark.slow

STEPS = ["encoder.weights=random", "schedule.size=32", "schedule.steps=120", "tracking.image_every=0",
         "judge.weights=random"]
LONG = [*STEPS[:2], "schedule.steps=20000", *STEPS[3:], "tracking.flush_seconds=0.5"]
"""A job that cannot end before the test acts on it, even on a loaded machine; its metrics reach the
store every 0.5 s (the tests wait for its first ones)."""
EVERY_STEP = list(range(1, 121))


def start_stx(tmp_path, *args, env=None):
    env = {**os.environ, "STX_RUNS_DIR": str(tmp_path / "runs"), **(env or {})}
    return subprocess.Popen(STX + list(args), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def steps_logged(client, run_id, key="total"):
    """The steps of ``key``'s history, sorted, repeats included."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def steps_on_disk(run_dir, key="total"):
    with (run_dir / "metrics.csv").open() as file:
        return sorted(int(row["step"]) for row in csv.DictReader(file) if row["key"] == key)


def wait_for_run_line(process):
    """Read the job's output until it reports its MLflow run (the store exists by then); keep
    draining the rest in the background so the job never blocks on a full pipe."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "[stx.runs.runner][INFO] - MLflow run" in line:
            threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
            return lines
    raise AssertionError("the job ended before starting its run:\n" + "".join(lines))


def wait_for(condition, timeout=120):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
    return value


def running_run(tmp_path, client=None, experiment="stx"):
    if client is None:
        if not (tmp_path / "runs" / "mlflow.db").exists():
            return None
        client = client_for(tmp_path)
    experiment = client.get_experiment_by_name(experiment)
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
    children = [r for r in runs if "stx.sweep" not in r.data.tags]
    return children[0] if children else None


def pixels(path):
    return np.asarray(Image.open(path))


def test_interrupted_run_keeps_its_work_and_resumes_to_the_uninterrupted_result(tmp_path, fresh_store):
    fresh_store(tmp_path)
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
    logged_steps = steps_logged(client, run.info.run_id)
    assert 5 <= max(logged_steps) < 120  # metrics up to the interruption were kept
    run_dir = Path(killed.data.tags["stx.run_dir"])
    assert (run_dir / "interrupted_output.png").is_file()
    assert {"interrupted_output.png", "checkpoint/checkpoint.pt", "stx.log"} <= set(artifact_paths(client, run.info.run_id))
    assert steps_on_disk(run_dir) == logged_steps == list(range(1, max(logged_steps) + 1))

    resumed = stx_here(tmp_path, f"resume={run.info.run_id}")
    assert resumed.returncode == 0, resumed.stderr
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and "stx.error" not in finished.data.tags
    assert steps_logged(client, run.info.run_id) == EVERY_STEP  # the steps after the checkpoint not twice
    assert "stx.log" in artifact_paths(client, run.info.run_id)

    (tmp_path / "u").mkdir()
    uninterrupted = stx_here(tmp_path / "u", *STEPS)
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    (reference,) = (tmp_path / "u" / "runs").glob("*/*/output.png")
    resumed_output = Path(finished.data.tags["stx.run_dir"]) / "output.png"
    assert np.array_equal(pixels(resumed_output), pixels(reference))

    again = stx_here(tmp_path, f"resume={run.info.run_id}")
    assert again.returncode == 2 and "already FINISHED" in again.stderr


def test_terminated_sweep_closes_its_parent(tmp_path, fresh_store):
    fresh_store(tmp_path)
    process = start_stx(tmp_path, "-m", *LONG, "seed=0,1")  # jobs that cannot end before the signal
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


def start_joblib_sweep(tmp_path, *args):
    """``stx -m`` over seeds 0 and 1 with two joblib workers, returned once the store is set up
    (its parent run exists); the rest of its output is drained in the background."""
    process = start_stx(tmp_path, "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *args, "seed=0,1")
    for line in process.stdout:
        if "stx: sweep parent MLflow run" in line:
            break
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process


def started_children(tmp_path):
    """The sweep's RUNNING child runs that have logged a step."""
    client = client_for(tmp_path)
    experiment = client.get_experiment_by_name("stx")
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'") if experiment else []
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags and "total" in r.data.metrics]


def assert_killed_with_their_images(client, children):
    """Each of a stopped sweep's ``children`` is KILLED with its interrupted output, and so is their parent."""
    for child in children:
        run = client.get_run(child.info.run_id)
        assert run.info.status == "KILLED"
        assert (Path(run.data.tags["stx.run_dir"]) / "interrupted_output.png").is_file()
    assert client.get_run(children[0].data.tags["mlflow.parentRunId"]).info.status == "KILLED"


def test_a_terminated_joblib_sweep_closes_every_child_with_its_image(tmp_path, fresh_store):
    """SIGTERM to the sweep alone (``kill <pid>``) while two joblib workers run jobs: the signal
    is passed on, each job writes its interrupted output and closes its run KILLED."""
    fresh_store(tmp_path)
    process = start_joblib_sweep(tmp_path, *LONG)
    children = wait_for(lambda: len(running := started_children(tmp_path)) == 2 and running, timeout=300)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=180) == 143
    assert_killed_with_their_images(client_for(tmp_path), children)


def test_a_job_stopped_on_its_own_fails_its_sweep(tmp_path, fresh_store):
    """As ``scancel`` does on SLURM: SIGTERM to each job's process, not to the sweep's. The jobs'
    runs end KILLED; the sweep was not interrupted, so its parent ends FAILED. (Jobs too long to
    end on their own before the signal reaches them, even on a loaded machine.)"""
    fresh_store(tmp_path)
    process = start_joblib_sweep(tmp_path, *LONG)
    children = wait_for(lambda: len(running := started_children(tmp_path)) == 2 and running, timeout=300)
    assert process.pid not in {int(child.data.tags["stx.pid"]) for child in children}
    for child in children:
        os.kill(int(child.data.tags["stx.pid"]), signal.SIGTERM)
    assert process.wait(timeout=180) != 0
    client = client_for(tmp_path)
    assert {client.get_run(child.info.run_id).info.status for child in children} == {"KILLED"}
    assert client.get_run(children[0].data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_killed_job_is_closed_by_the_next_one_and_resumes_with_every_step_logged_once(tmp_path, fresh_store):
    fresh_store(tmp_path)
    process = start_stx(tmp_path, *STEPS, "schedule.steps=150", "schedule.checkpoint_every=5")
    wait_for_run_line(process)
    client = client_for(tmp_path)
    run = wait_for(lambda: (r := running_run(tmp_path))
                   and int(client.get_run(r.info.run_id).data.tags.get("stx.checkpoint_step", 0)) >= 10 and r)
    process.kill()  # SIGKILL: no handler runs, the run stays RUNNING
    assert process.wait(timeout=60) == -signal.SIGKILL
    killed = client.get_run(run.info.run_id)
    assert killed.info.status == "RUNNING"
    checkpoint = int(killed.data.tags["stx.checkpoint_step"])
    logged = steps_logged(client, run.info.run_id)
    assert logged == list(range(1, max(logged) + 1)) and max(logged) >= checkpoint  # flushed with each checkpoint
    table = compare("stx", local_uri(tmp_path), tmp_path / "compare")[1]
    assert table.splitlines()[1].split()[:2] == [run.info.run_id[:8], "DEAD"]

    resumed = stx_here(tmp_path, f"resume={run.info.run_id}")
    assert resumed.returncode == 0, resumed.stderr
    assert f"closed 1 run(s) whose process is gone as FAILED: {run.info.run_id}" in resumed.stdout + resumed.stderr
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED" and "stx.error" not in finished.data.tags
    for key in ("total", "style", "content/relu4_2"):
        assert steps_logged(client, run.info.run_id, key) == list(range(1, 151)), key


def failed_job_output(process, output):
    """The job's whole output once it has exited with 2 after one error and no traceback."""
    assert process.wait(timeout=300) == 2, "".join(output)
    time.sleep(0.5)  # let the drain thread take the last lines
    text = "".join(output)
    assert text.count("stx: error:") == 1 and "Traceback" not in text, text
    return text


def assert_work_kept(run_dir, logged):
    """The latest image and every computed step on disk, more than the store got (``logged``)."""
    assert (run_dir / "interrupted_output.png").is_file() and not (run_dir / "output.png").exists()
    on_disk = steps_on_disk(run_dir)
    assert on_disk == list(range(1, len(on_disk) + 1))
    assert logged == list(range(1, len(logged) + 1)) and 0 < len(logged) < len(on_disk)


@pytest.mark.skipif(shutil.which("chattr") is None or os.geteuid() != 0, reason="needs chattr +i (as root)")
def test_failing_store_stops_the_job_with_one_error_and_keeps_its_work_on_disk(tmp_path, fresh_store):
    fresh_store(tmp_path)
    process = start_stx(tmp_path, *LONG)
    output = wait_for_run_line(process)
    client = client_for(tmp_path)
    run = wait_for(lambda: (r := running_run(tmp_path)) and client.get_metric_history(r.info.run_id, "total") and r)
    db = tmp_path / "runs" / "mlflow.db"
    subprocess.run(["chattr", "+i", str(db)], check=True)  # unwritable, even for root
    try:
        text = failed_job_output(process, output)
    finally:
        subprocess.run(["chattr", "-i", str(db)], check=True)
    # which write fails first depends on timing: the metrics' flush, or the heartbeat under load
    assert f"stx: error: the MLflow tracking store sqlite:///{db} failed while " in text
    run_dir = Path(run.data.tags["stx.run_dir"])
    assert f"what the job computed is on disk in {run_dir}: interrupted_output.png, metrics.csv, stx.log." in text
    assert_work_kept(run_dir, steps_logged(client, run.info.run_id))
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    assert close_dead_runs(client, run.info.experiment_id) == [run.info.run_id]  # as the next job on the store does
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_server_going_away_stops_the_job_with_one_error_and_keeps_its_work_on_disk(tmp_path, mlflow_server):
    """The job talks to the session's server through a relay; taking the relay away is, to the
    job, its server killed (connections reset, new ones refused)."""
    with relay_to(mlflow_server) as (uri, take_away):
        # MLflow retries a request for ~4 min by default; a test need not wait for that
        process = start_stx(tmp_path, *LONG, "tracking=server", "tracking.experiment=going_away",
                            env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
        output = wait_for_run_line(process)
        client = MlflowClient(mlflow_server)
        run = wait_for(lambda: (r := running_run(tmp_path, client, "going_away"))
                       and client.get_metric_history(r.info.run_id, "total") and r)
        logged = steps_logged(client, run.info.run_id)
        take_away()
        text = failed_job_output(process, output)
    assert f"stx: error: the MLflow tracking store {uri} failed while" in text and "Connection refused" in text
    assert_work_kept(Path(run.data.tags["stx.run_dir"]), logged)


OPEN_STORE = "import sys; from stx.runs.store import open_sqlite_store; open_sqlite_store(sys.argv[1])"


@pytest.mark.slow
def test_jobs_started_together_on_a_new_store_all_open_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    python = str(Path(STX[0]).with_name("python"))
    jobs = [subprocess.Popen([python, "-c", OPEN_STORE, uri], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errors = [job.communicate(timeout=300)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0, 0], errors
    client = MlflowClient(uri)
    client.create_run(client.create_experiment("after"))  # the store is whole
    assert client.search_experiments(filter_string="name = 'after'")


@pytest.mark.parametrize("kind", ["not a database", "a folder"])
def test_a_store_that_cannot_be_opened_is_one_paragraph(tmp_path, kind):
    """At once: MLflow itself would retry a path sqlite cannot open for minutes."""
    from stx.runs.store import open_sqlite_store
    from stx.runs.tracking import TrackingError

    broken = tmp_path / "mlflow.db"
    if kind == "a folder":
        broken.mkdir()
    else:
        broken.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TrackingError, match=rf"the MLflow store {broken} could not be opened .* move it aside"):
        open_sqlite_store(f"sqlite:///{broken}")


@pytest.mark.slow
def test_a_config_error_while_a_new_store_is_created_leaves_it_usable(tmp_path):
    """The store's helper is let finish creating and migrating a new store when the job stops with a config
    error a second after asking for it (killed there, it left `_alembic_tmp_*` tables and every later job failed)."""
    import sqlite3

    bad = run_stx(tmp_path, *FAST, "schedule.init=bogus")
    assert bad.returncode == 2 and "schedule.init='bogus' is not valid" in bad.stderr
    assert "Traceback" not in bad.stderr
    store = tmp_path / "runs" / "mlflow.db"
    if store.exists():
        tables = [row[0] for row in sqlite3.connect(store).execute("select name from sqlite_master where type='table'")]
        assert not [name for name in tables if name.startswith("_alembic_tmp")], tables
    good = run_stx(tmp_path, *FAST)
    assert good.returncode == 0, good.stderr


def test_a_full_disk_while_checkpointing_stops_the_job_like_a_store_failure(tmp_path, monkeypatch, fresh_store):
    """ENOSPC writing a checkpoint: one paragraph, exit 2, the latest image kept (it was a torch.save traceback)."""
    import errno

    from stx.runs import layout

    def full(checkpoint, path, run_id):
        raise OSError(errno.ENOSPC, "No space left on device")

    fresh_store(tmp_path)
    monkeypatch.setattr(layout, "save_checkpoint", full)
    result = stx_here(tmp_path, *FAST, "schedule.steps=4", "schedule.checkpoint_every=2")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "the checkpoint of step 2 could not be written to" in result.stderr
    assert "(No space left on device): the disk is full or failing" in result.stderr
    assert list((tmp_path / "runs").rglob("interrupted_output.png")) and "is closed FAILED" in result.stderr
