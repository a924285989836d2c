"""RunTracker and run liveness against a real sqlite store: store failures, dead runs, resumed runs."""

import csv
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from conftest import FAST, artifact_paths
from omegaconf import OmegaConf

import stx.runs.monitor
import stx.runs.tracking
from stx.engine.optim import StepInfo
from stx.errors import ConfigError, StoreFailure
from stx.runs import layout, store_process
from stx.runs.compare import compare
from stx.runs.liveness import DEAD_AFTER_S, close_dead_runs, process_start
from stx.runs.runner import run_tracked
from stx.runs.tracking import RunTracker, TrackingError


@pytest.fixture
def client(tmp_path, fresh_store):
    """The client of a fresh store in ``tmp_path/runs`` (where ``make_cfg``'s jobs log), a copy of
    the session's empty store (conftest.store_template): copying saves each test the migrations."""
    return fresh_store(tmp_path)


def tracking(client, **changes):
    folder = Path(client.tracking_uri.removeprefix("sqlite:///")).parent
    return OmegaConf.create({"uri": client.tracking_uri, "artifact_location": str(folder / "artifacts"),
                             "experiment": "stx", "metrics_every": 1, "image_every": 0, "flush_seconds": 5.0, "system_metrics": False,
                              **changes})


def step(n):
    return StepInfo(n, 0, 8, {"total": float(n), "style": n / 2}, torch.full((1, 3, 8, 8), n / 10))


def steps_logged(client, run_id, key="total"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def chattr(path, flag):
    subprocess.run(["chattr", flag, str(path)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def freezable(tmp_path_factory):
    """Skip where a file cannot be made immutable (``chattr +i``: unwritable even for root)."""
    probe = tmp_path_factory.mktemp("chattr") / "probe"
    probe.touch()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode:
        pytest.skip("needs chattr +i (root, on a file system with inode flags)")
    chattr(probe, "-i")


@contextmanager
def frozen(path):
    chattr(path, "+i")
    try:
        yield
    finally:
        chattr(path, "-i")


def test_a_failing_store_raises_one_error_skips_later_calls_and_keeps_the_metrics_on_disk(tmp_path, client, freezable, capfd, caplog):
    job_dir = tmp_path / "job"
    tracker = RunTracker(tracking(client), job_dir)
    with pytest.raises(TrackingError) as raised, tracker.open({}) as run_id:
        tracker.log_step(step(1))
        tracker.log_step(step(2))
        tracker.flush()
        with frozen(tmp_path / "runs" / "mlflow.db"):
            tracker.log_step(step(3))
            tracker.flush()
    assert str(raised.value).startswith(f"the MLflow tracking store {client.tracking_uri} failed while "
                                        "logging metrics: (sqlite3.OperationalError)")
    assert raised.value is tracker.failure
    assert "Traceback" not in capfd.readouterr().err
    assert not [r for r in caplog.records if r.name.startswith("mlflow") and r.levelno >= logging.ERROR]

    # the store works again, but the tracker made no further call: the run was not closed
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and layout.TAG_ERROR not in run.data.tags
    assert steps_logged(client, run_id) == [1, 2]
    with (job_dir / layout.METRICS_FILE).open() as file:
        rows = list(csv.DictReader(file))
    assert [(int(r["step"]), r["key"], float(r["value"])) for r in rows] == [
        (1, "total", 1.0), (1, "style", 0.5), (2, "total", 2.0), (2, "style", 1.0), (3, "total", 3.0), (3, "style", 1.5)]


def test_a_job_whose_store_fails_stops_and_writes_its_image_and_metrics(tmp_path, client, freezable, make_cfg, monkeypatch):
    cfg = make_cfg(*FAST, "schedule.steps=6", "tracking.image_every=0", "tracking.flush_seconds=0")
    db = tmp_path / "runs" / "mlflow.db"
    report = stx.runs.monitor.JobMonitor.on_step

    def freeze_at_step_3(monitor, info):
        if info.step == 3:
            chattr(db, "+i")
        report(monitor, info)

    monkeypatch.setattr(stx.runs.monitor.JobMonitor, "on_step", freeze_at_step_3)
    run_dir = tmp_path / "job"
    try:
        with pytest.raises(TrackingError) as raised:
            run_tracked(cfg, run_dir, {})
    finally:
        chattr(db, "-i")
    message = str(raised.value)
    assert "failed while logging metrics" in message
    assert f"what the job computed is on disk in {run_dir}: interrupted_output.png, metrics.csv." in message
    assert (run_dir / "interrupted_output.png").is_file() and not (run_dir / "output.png").exists()
    with (run_dir / layout.METRICS_FILE).open() as file:
        assert sorted(int(r["step"]) for r in csv.DictReader(file) if r["key"] == "total") == [1, 2, 3]

    (run,) = client.search_runs([client.get_experiment_by_name("stx").experiment_id])
    assert run.info.status == "RUNNING" and steps_logged(client, run.info.run_id) == [1, 2]
    assert close_dead_runs(client, run.info.experiment_id) == []  # its process (this one) is alive


def dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_close_dead_runs_closes_only_runs_whose_process_is_gone(tmp_path, client):
    experiment = client.create_experiment("stx", artifact_location=(tmp_path / "artifacts").as_uri())
    here, now = socket.gethostname(), time.time()
    me = {layout.TAG_HOST: here, layout.TAG_PID: str(os.getpid()), layout.TAG_HEARTBEAT: str(int(now) - 3600)}
    own_start = process_start(os.getpid())
    assert own_start is not None

    def run(tags, status=None):
        run_id = client.create_run(experiment, tags=tags).info.run_id
        if status:
            client.set_terminated(run_id, status)
        return run_id

    gone = run({**me, layout.TAG_PID: str(dead_pid()), layout.TAG_HEARTBEAT: "1700000000"})
    reused = run({**me, layout.TAG_PID_START: f"{float(own_start) + 1:.2f}"})
    alive = run({**me, layout.TAG_PID_START: own_start})  # silent for an hour, but its process is alive
    ticks = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, as older stx wrote it
    older = run({**me, layout.TAG_PID_START: ticks})  # this process, by a tag of older stx: alive
    older_reused = run({**me, layout.TAG_PID_START: str(int(ticks) + 100)})
    silent = run({layout.TAG_HOST: "elsewhere", layout.TAG_PID: "1", layout.TAG_HEARTBEAT: str(int(now - DEAD_AFTER_S - 5))})
    beating = run({layout.TAG_HOST: "elsewhere", layout.TAG_PID: "1", layout.TAG_HEARTBEAT: str(int(now - DEAD_AFTER_S + 60))})
    untagged = run({})
    finished = run({**me, layout.TAG_PID: str(dead_pid())}, status="FINISHED")

    assert sorted(close_dead_runs(client, experiment)) == sorted([gone, reused, older_reused, silent])
    assert client.get_run(older).info.status == "RUNNING"
    for run_id in gone, reused, silent:
        closed = client.get_run(run_id)
        assert closed.info.status == "FAILED"
        assert "closed as FAILED by stx" in closed.data.tags[layout.TAG_ERROR]
    assert client.get_run(gone).info.end_time == 1700000000 * 1000  # the last sign of life
    assert client.get_run(gone).data.tags[layout.TAG_ERROR].startswith(
        f"its process (pid {client.get_run(gone).data.tags[layout.TAG_PID]} on {here}) is gone: ")
    assert "sent no heartbeat for" in client.get_run(silent).data.tags[layout.TAG_ERROR]
    for run_id in alive, beating, untagged:
        assert client.get_run(run_id).info.status == "RUNNING"
    assert client.get_run(finished).info.status == "FINISHED" and layout.TAG_ERROR not in client.get_run(finished).data.tags



def test_compare_shows_a_running_run_whose_process_is_gone_as_dead(tmp_path, client):
    experiment = client.create_experiment("stx", artifact_location=(tmp_path / "artifacts").as_uri())
    tags = {layout.TAG_HOST: socket.gethostname(), layout.TAG_HEARTBEAT: str(int(time.time()))}
    dead = client.create_run(experiment, tags={**tags, layout.TAG_PID: str(dead_pid())}).info.run_id
    live = client.create_run(experiment, tags={**tags, layout.TAG_PID: str(os.getpid())}).info.run_id
    table = compare("stx", client.tracking_uri, tmp_path / "compare")[1]
    statuses = {line.split()[0]: line.split()[1] for line in table.splitlines()[1:]}
    assert statuses == {dead[:8]: "DEAD", live[:8]: "RUNNING"}


def test_a_run_records_its_process_and_each_flush_refreshes_its_heartbeat(tmp_path, client):
    tracker = RunTracker(tracking(client, flush_seconds=0), tmp_path / "job")
    with tracker.open({}) as run_id:
        tags = client.get_run(run_id).data.tags
        assert (tags[layout.TAG_HOST], tags[layout.TAG_PID]) == (socket.gethostname(), str(os.getpid()))
        assert tags[layout.TAG_PID_START] == process_start(os.getpid())
        client.set_tag(run_id, layout.TAG_HEARTBEAT, "0")
        before = int(time.time())
        tracker.log_step(step(1))
        assert int(client.get_run(run_id).data.tags[layout.TAG_HEARTBEAT]) >= before


def test_a_checkpoint_flushes_the_metrics_before_it(tmp_path, client):
    tracker = RunTracker(tracking(client, flush_seconds=1e9), tmp_path / "job")
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"state")
    with tracker.open({}) as run_id:
        for n in range(1, 6):
            tracker.log_step(step(n))
        assert steps_logged(client, run_id) == []
        tracker.log_checkpoint(checkpoint, 5)
        assert steps_logged(client, run_id) == [1, 2, 3, 4, 5]
        assert client.get_run(run_id).data.tags[layout.TAG_CHECKPOINT_STEP] == "5"


def test_a_reopened_run_logs_no_step_twice(tmp_path, client):
    first = RunTracker(tracking(client, image_every=2, flush_seconds=0), tmp_path / "job")
    with pytest.raises(KeyboardInterrupt), first.open({}) as run_id:
        for n in range(1, 9):
            first.log_step(step(n))
        raise KeyboardInterrupt
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = RunTracker(tracking(client, image_every=2, flush_seconds=0), tmp_path / "resumed")
    with resumed.open({}, run_id=run_id):  # resumed from a checkpoint at step 5
        assert client.get_run(run_id).info.status == "RUNNING"
        for n in range(6, 11):
            resumed.log_step(step(n) if n > 8 else StepInfo(n, 0, 8, {"total": -1.0, "style": -1.0}, step(n).image))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and layout.TAG_ERROR not in run.data.tags
    for key in "total", "style":
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, 11))
        assert min(m.value for m in history) > 0  # steps 6-8 kept their first values
    images = [p for p in artifact_paths(client, run_id) if p.startswith("images/") and p.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in images) == [2, 4, 6, 8, 10]


def test_a_live_run_is_not_reopened(tmp_path, client):
    tracker = RunTracker(tracking(client), tmp_path / "job")
    with tracker.open({}) as run_id:
        with pytest.raises(TrackingError, match=f"run {run_id} is still RUNNING in process {os.getpid()} on "):
            with RunTracker(tracking(client), tmp_path / "other").open({}, run_id=run_id):
                pass
        assert client.get_run(run_id).info.status == "RUNNING"


@pytest.mark.parametrize(("error", "status"), [(None, "FINISHED"), (RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_the_log_file_is_logged_whatever_the_outcome(tmp_path, client, error, status):
    log_file = tmp_path / "stx.log"
    log_file.write_text("a line the job logged\n")
    tracker = RunTracker(tracking(client), tmp_path / "job")
    with pytest.raises(error) if error else nullcontext(), tracker.open({}, log_file=log_file) as run_id:
        if error:
            raise error("stopped")
    assert client.get_run(run_id).info.status == status
    assert "stx.log" in artifact_paths(client, run_id)


def test_a_store_locked_for_a_while_is_waited_for_and_one_locked_for_good_fails(tmp_path, client, monkeypatch):
    monkeypatch.setattr(stx.runs.tracking, "LOCKED_RETRY_S", (0.0, 0.0, 0.0))
    tracker = RunTracker(tracking(client), tmp_path / "job")
    calls = []

    class Locked:
        def __init__(self, times):
            self.times = times

        def call(self, method, *args):
            calls.append(method)
            if len(calls) <= self.times:
                raise StoreFailure("(sqlite3.OperationalError) database is locked")
            return "done"

    tracker.store = Locked(3)
    assert tracker._store("logging metrics", "log_batch") == "done" and len(calls) == 4 and tracker.failure is None
    calls.clear()
    tracker.store = Locked(4)
    with pytest.raises(TrackingError, match="failed while logging metrics: .*database is locked"):
        tracker._store("logging metrics", "log_batch")
    assert len(calls) == 4 and tracker.failure is not None


def test_a_job_logs_through_the_store_process_what_it_logs_here(tmp_path, client, monkeypatch):
    """The helper process a single job logs through (MLflow loads there while the job is built):
    the same run, metrics and tags; the store's error raised here; it ends when its stdin closes."""
    helper = store_process.StoreProcess()
    monkeypatch.setattr(stx.runs.tracking, "store_for", lambda uri: store_process.RemoteStore(helper, uri))
    tracker = RunTracker(tracking(client, image_every=2, flush_seconds=0), tmp_path / "job")
    with tracker.open({"stx.test": "remote"}) as run_id:
        for n in (1, 2, 3):
            tracker.log_step(step(n))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stx.test"] == "remote"
    assert run.data.tags[layout.TAG_PID] == str(os.getpid()) != str(helper.process.pid)
    assert steps_logged(client, run_id) == [1, 2, 3] and run.data.metrics["style"] == 1.5
    assert [p for p in artifact_paths(client, run_id) if p.startswith("images/") and p.endswith(".png")]

    with pytest.raises(TrackingError, match=r"failed while reopening the run: Run with id=0+ not found"):
        with RunTracker(tracking(client), tmp_path / "other").open({}, run_id="0" * 32):
            pass
    helper.process.stdin.close()
    assert helper.process.wait(timeout=60) == 0


def test_each_experiment_carries_stx_view_of_its_runs_and_a_sweep_adds_its_swept_params(client):
    from stx.runs.store import VIEW_TAG, ensure_experiment, show_params

    created = ensure_experiment(client, "views", None)
    view = json.loads(client.get_experiment(created).tags[VIEW_TAG])
    assert view["orderByKey"] == "metrics.`objective`" and view["orderByAsc"] is True
    assert view["selectedColumns"][:4] == ["metrics.`objective`", "metrics.`eval/style_distance`",
                                           "metrics.`eval/structure`", "metrics.`eval/content_distance`"]
    older = client.create_experiment("made before the view")
    assert ensure_experiment(client, "made before the view", None) == older
    assert VIEW_TAG in client.get_experiment(older).tags

    swept = [layout.param_key(key) for key in ("loss.style.score_weight", "color")]
    assert swept == ["loss.style.score_weight", "choice/color"]  # a config group's choice is logged as choice/<group>
    show_params(client, created, swept)
    show_params(client, created, ["seed", "choice/color"])  # a later sweep: added after, never twice
    columns = json.loads(client.get_experiment(created).tags[VIEW_TAG])["selectedColumns"]
    assert [c for c in columns if c.startswith("params.")] == [
        "params.`loss.style.score_weight`", "params.`choice/color`", "params.`seed`"]


def test_stx_ui_prints_the_view_and_serves_the_store_it_is_given(client, tmp_path, monkeypatch, capsys):
    from stx import cli
    from stx.runs.store import ensure_experiment

    missing = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    with pytest.raises(SystemExit):
        cli.tool_main(["ui", "--tracking-uri", missing])
    assert "there is no MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()  # never created

    experiment = ensure_experiment(client, "stx", None)
    started = []
    monkeypatch.setattr(os, "execv", lambda program, argv: started.append(argv))
    cli.tool_main(["ui", "--tracking-uri", client.tracking_uri, "--port", "5123"])
    assert f"http://127.0.0.1:5123/#/experiments/{experiment}/runs?viewStateShareKey=stx&workflowType=machine_learning" in capsys.readouterr().out
    (argv,) = started
    assert argv[1:] == ["-m", "mlflow", "ui", "--backend-store-uri", client.tracking_uri, "--host", "127.0.0.1",
                        "--port", "5123"]
    with pytest.raises(SystemExit):
        cli.tool_main(["ui", "--tracking-uri", client.tracking_uri, "--experiment", "nope"])
    assert "--experiment='nope': the store" in capsys.readouterr().err


def test_stx_ui_of_a_sweep_opens_a_view_of_its_runs_only(client, tmp_path, monkeypatch, capsys):
    from stx import cli
    from stx.runs.store import ensure_experiment

    experiment = ensure_experiment(client, "stx", None)
    parent = client.create_run(experiment, run_name="sweep sw=1,10",
                               tags={"stx.sweep": "true", "hydra.overrides": "loss.style.score_weight=1,10 seed=3"})
    monkeypatch.setattr(os, "execv", lambda program, argv: None)
    cli.tool_main(["ui", parent.info.run_id, "--tracking-uri", client.tracking_uri, "--port", "5123"])
    key = f"sweep-{parent.info.run_id[:12]}"
    assert f"http://127.0.0.1:5123/#/experiments/{experiment}/runs?viewStateShareKey={key}&workflowType=machine_learning" in capsys.readouterr().out
    view = json.loads(client.get_experiment(experiment).tags[f"mlflow.sharedViewState.{key}"])
    assert view["searchFilter"] == f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    assert view["orderByKey"] == "metrics.`objective`" and "params.`loss.style.score_weight`" in view["selectedColumns"]
    assert view["columnOrder"][:2] == ["metrics.`objective`", "params.`loss.style.score_weight`"]  # not seed: one value
    assert "groupBy" not in view  # one photo and style: nothing to keep apart
    experiment_view = json.loads(client.get_experiment(experiment).tags["mlflow.sharedViewState.stx"])
    images = [{"mode": "param", "groupByData": "images.content"}, {"mode": "param", "groupByData": "images.styles.0"}]
    assert experiment_view["groupBy"]["groupByKeys"] == images  # every run: each photo and style ranked apart
    over_photos = client.create_run(experiment, tags={"stx.sweep": "true", "hydra.overrides": "images.content=a.jpg,b.jpg"})
    cli.tool_main(["ui", over_photos.info.run_id, "--tracking-uri", client.tracking_uri, "--port", "5123"])
    key = f"sweep-{over_photos.info.run_id[:12]}"
    assert json.loads(client.get_experiment(experiment).tags[f"mlflow.sharedViewState.{key}"])["groupBy"]["groupByKeys"] == images
    single = client.create_run(experiment)
    with pytest.raises(SystemExit):
        cli.tool_main(["ui", single.info.run_id, "--tracking-uri", client.tracking_uri])
    assert "has no sweep with that parent run id" in capsys.readouterr().err


def test_a_run_page_shows_the_output_and_its_scores_first(tmp_path, client, make_cfg):
    result = run_tracked(make_cfg(*FAST, "tracking.image_every=0"), tmp_path / "job", {})
    run = client.get_run(result.run_id)
    note = run.data.tags["mlflow.note.content"]  # the run's description, atop its page in the UI
    assert note.startswith(f"**output.png**: objective {run.data.metrics['objective']:.4g}, style distance ")
    assert note.endswith(f"![output.png](get-artifact?path=output.png&run_uuid={result.run_id})")
    assert "output.png" in [artifact.path for artifact in client.list_artifacts(result.run_id)]  # what it shows


@pytest.mark.parametrize("seconds", [-1.0, float("inf"), float("nan")])
def test_a_flush_interval_that_is_not_a_duration_is_one_paragraph(tmp_path, client, seconds):
    with pytest.raises(ConfigError, match=rf"^tracking.flush_seconds={seconds} is not valid: use a number of seconds >= 0"):
        RunTracker(tracking(client, flush_seconds=seconds), tmp_path / "job")


def test_a_run_of_ones_own_images_says_so_in_its_images_choice():
    from omegaconf import OmegaConf

    from stx.runs.tracking import hydra_tags

    def tags(*overrides):
        return hydra_tags(OmegaConf.create({"overrides": {"task": list(overrides)},
                                            "runtime": {"choices": {"images": "sample", "loss": "gatys"}}}))

    assert tags("seed=1")["hydra.choice.images"] == "sample"
    own = tags("images.content=me.jpg", "images.styles=[mondrian.png]", "seed=1")
    assert own["hydra.choice.images"] == "sample with images.content=me.jpg images.styles=[mondrian.png]"
    assert own["hydra.choice.loss"] == "gatys"
