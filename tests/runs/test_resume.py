"""``stx resume=<id> key=value``: which overrides a resumed run honours, how it records them, and
which it refuses (in-process; the command-line path is in test_cli.py)."""

import numpy as np
import pytest
import yaml
from conftest import artifact_paths, local_uri
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

from stx.errors import StxError
from stx.runs.runner import _resume_updates, resume, run_tracked

JOB = ["encoder.weights=random", "judge.weights=random", "schedule.size=32", "tracking.image_every=0"]


def killed_run(make_cfg, tmp_path, fresh_store):
    """A 4-step run with its last checkpoint at step 4, marked KILLED (as if stopped before its output)."""
    fresh_store(tmp_path)
    result = run_tracked(make_cfg(*JOB, "schedule.steps=4", "schedule.checkpoint_every=2"), tmp_path / "first", {})
    client = MlflowClient(local_uri(tmp_path))
    client.set_terminated(result.run_id, "KILLED")
    return client, result.run_id


def logged_config(client, run_id, folder):
    return yaml.safe_load(open(client.download_artifacts(run_id, "config.yaml", str(folder))))


@pytest.mark.slow
def test_resume_honours_steps_and_image_every_and_records_them(make_cfg, tmp_path, fresh_store):
    client, run_id = killed_run(make_cfg, tmp_path, fresh_store)
    overrides = [f"resume={run_id}", "schedule.steps=6", "tracking.image_every=1"]
    result = resume(make_cfg(*overrides), tmp_path / "resumed", overrides=overrides)

    run = client.get_run(run_id)
    assert result.run_id == run_id and run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "total")) == [1, 2, 3, 4, 5, 6]
    assert run.data.tags["stx.resume.changed"] == (
        "schedule.steps 4 -> 6; tracking.image_every 0 -> 1; schedule.levels.0.steps 4 -> 6 (at step 4)")
    config = logged_config(client, run_id, tmp_path / "download")
    assert config["schedule"]["steps"] == 6 and config["schedule"]["levels"][0]["steps"] == 6
    assert config["tracking"]["image_every"] == 1
    images = [path for path in artifact_paths(client, run_id, "images") if path.endswith(".png")]
    assert sorted(int(path.split("+step+")[1].split("+")[0]) for path in images) == [4, 5, 6]  # 4: first output

    uninterrupted = run_tracked(make_cfg(*JOB, "schedule.steps=6"), tmp_path / "uninterrupted", {})
    assert np.array_equal(np.asarray(Image.open(result.output)), np.asarray(Image.open(uninterrupted.output)))


@pytest.mark.slow
def test_resume_refuses_to_end_before_its_checkpoint_and_records_nothing(make_cfg, tmp_path, fresh_store):
    client, run_id = killed_run(make_cfg, tmp_path, fresh_store)
    overrides = [f"resume={run_id}", "schedule.steps=3"]
    with pytest.raises(StxError, match=rf"resume={run_id}: schedule.steps=3 ends before the checkpoint it resumes "
                                       r"from \(step 4, 4 steps into pyramid level 0\); give schedule.steps=4 or more."):
        resume(make_cfg(*overrides), tmp_path / "resumed", overrides=overrides)
    assert "stx.resume.changed" not in client.get_run(run_id).data.tags
    assert logged_config(client, run_id, tmp_path / "download")["schedule"]["steps"] == 4


@pytest.mark.slow
def test_a_resume_refused_because_the_run_is_alive_rewrites_nothing(make_cfg, tmp_path, fresh_store):
    client, run_id = killed_run(make_cfg, tmp_path, fresh_store)
    client.update_run(run_id, "RUNNING")  # as if its process (this one: alive, same host) still ran it
    overrides = [f"resume={run_id}", "schedule.steps=6"]
    with pytest.raises(StxError, match=rf"run {run_id} is still RUNNING in process"):
        resume(make_cfg(*overrides), tmp_path / "resumed", overrides=overrides)
    assert "stx.resume.changed" not in client.get_run(run_id).data.tags
    assert logged_config(client, run_id, tmp_path / "download")["schedule"]["steps"] == 4


@pytest.mark.parametrize("override", ["loss.style.score_weight=5", "schedule=adam", "seed=3", "tracking.experiment=other"])
def test_resume_refuses_any_other_override_by_name(make_cfg, override):
    overrides = ["resume=0123abcd", "schedule.steps=6", override]
    with pytest.raises(StxError, match=rf"resume=0123abcd continues the run with the config it logged, so {override} "
                                       r"cannot be applied .* only schedule.steps, schedule.checkpoint_every, "
                                       r"tracking.metrics_every, tracking.image_every, tracking.flush_seconds can change"):
        resume(make_cfg(*overrides), make_cfg().runs_dir, overrides=overrides)


def test_steps_change_only_the_levels_not_yet_finished(make_cfg):
    logged = make_cfg("schedule=pyramid", "schedule.size=64", "schedule.steps=100")
    asked = make_cfg("schedule.steps=300")
    in_last_level = {"step": 150, "level": 1}
    assert _resume_updates("r", logged, asked, ["schedule.steps"], **in_last_level) == {
        "schedule.steps": 300, "schedule.levels.1.steps": 300}
    assert _resume_updates("r", logged, asked, ["schedule.steps"], step=50, level=0) == {
        "schedule.steps": 300, "schedule.levels.0.steps": 300, "schedule.levels.1.steps": 300}
    with pytest.raises(StxError, match=r"give schedule.steps=50 or more"):
        _resume_updates("r", logged, make_cfg("schedule.steps=40"), ["schedule.steps"], **in_last_level)
    assert OmegaConf.to_container(logged.schedule.levels, resolve=True) == [{"size": 32, "steps": 100}, {"size": 64, "steps": 100}]


def test_a_run_resumed_at_its_last_step_reports_its_checkpoints_loss(make_cfg, tmp_path, fresh_store):
    client, run_id = killed_run(make_cfg, tmp_path, fresh_store)
    result = resume(make_cfg(f"resume={run_id}"), tmp_path / "resumed", overrides=[f"resume={run_id}"])
    logged = client.get_metric_history(run_id, "total")
    assert result.total == min(m.value for m in logged)  # no step left to take: the best loss, not nan
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_run_stopped_before_its_first_checkpoint_says_so_when_resumed(make_cfg, tmp_path, fresh_store):
    fresh_store(tmp_path)
    result = run_tracked(make_cfg(*JOB, "schedule.steps=2", "schedule.checkpoint_every=5"), tmp_path / "first", {})
    MlflowClient(local_uri(tmp_path)).set_terminated(result.run_id, "KILLED")
    with pytest.raises(StxError, match=rf"it stopped before its first checkpoint \(schedule.checkpoint_every=5\), so "
                                       rf"there is nothing to resume from; run it again \(stx reproduce {result.run_id}\)"):
        resume(make_cfg(f"resume={result.run_id}"), tmp_path / "resumed", overrides=[f"resume={result.run_id}"])
