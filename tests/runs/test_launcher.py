"""The batched launcher (stx.runs.launcher, the default): which jobs share a batch, which device each
gets, and that a batched sweep's runs are the runs the basic launcher makes, one by one."""

import math
import signal
from pathlib import Path

import pytest
from conftest import FAST, local_uri, stx_here
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from test_reliability import LONG, assert_killed_with_their_images, client_for, start_stx, started_children, wait_for

from stx.runs.composer import ComposingOnce
from stx.runs.launcher import assign_devices, batch_key
from stx.runs.schema import CONF_DIR


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_jobs_that_differ_in_weights_share_a_batch_and_other_shapes_do_not():
    base = batch_key(composed("loss.style.score_weight=1e3"))
    assert batch_key(composed("loss.style.score_weight=1e5", "schedule.optimizer.lr=0.5", "seed=3")) == base
    assert batch_key(composed("images.style_weights=[1.0]", "color=luminance", "schedule.steps=7")) == base
    for other in ("schedule.size=128", "encoder=vgg16", "schedule=adam", "precision=bf16", "loss=mrf"):
        assert batch_key(composed(other)) != base, other


def test_jobs_composed_from_the_first_are_what_hydra_composes():
    sweep = [["loss.style.score_weight=1000.0", "seed=0", "schedule.optimizer.lr=1"],
             ["loss.style.score_weight=5", "seed=3", "schedule.optimizer.lr=0.5"],  # from the first
             ["color=luminance", "seed=3", "schedule.optimizer.lr=0.5"]]  # a group: composed in full
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        master = compose("config", return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        full = [loader.load_sweep_config(master, overrides) for overrides in sweep]
        once = ComposingOnce(loader)
        checked = [once.load_sweep_config(master, overrides) for overrides in sweep]  # the sweeper's check
        fast = once.compose(master, sweep)
        assert all(a is b for a, b in zip(checked, fast))  # composed once
        assert once.compose(master, sweep[1:2])[0] is not fast[1]  # handed out once
        with pytest.raises(ConfigCompositionException, match="schedule.steps=abc"):
            ComposingOnce(loader).compose(master, [["schedule.steps=1"], ["schedule.steps=abc"]])  # as Hydra refuses it
    assert fast[1].loss.style.score_weight == 5 and fast[1].hydra.overrides.task == sweep[1]
    for quick, composed_in_full in zip(fast, full):
        assert OmegaConf.to_container(quick, resolve=False) == OmegaConf.to_container(composed_in_full, resolve=False)


def test_devices_are_dealt_round_robin_to_the_jobs_that_leave_the_choice_open():
    configs = [OmegaConf.create({"device": device}) for device in ("auto", "cuda", "cpu", "auto", "cuda:1", "auto")]
    assert assign_devices(configs, 0) == [None] * 6
    assert assign_devices(configs, 1) == [None] * 6
    assert assign_devices(configs, 2) == ["cuda:0", "cuda:1", None, "cuda:0", None, "cuda:1"]
    assert assign_devices(configs, 4) == ["cuda:0", "cuda:1", None, "cuda:2", None, "cuda:3"]


def test_optuna_asks_for_trials_in_batches_of_the_batch_size():
    config = composed("hydra/sweeper=stx_optuna", "hydra.launcher.batch_size=6")
    assert config.hydra.sweeper.n_jobs == 6
    assert composed("hydra/sweeper=stx_optuna").hydra.sweeper.n_jobs == composed().hydra.launcher.batch_size


def histories(folder):
    """Each child run's status, ``stx.batched`` and ``stx.batch_size`` tags, ``total`` per step and run dir, by
    its swept score weight."""
    client = MlflowClient(local_uri(folder))
    runs = client.search_runs([client.get_experiment_by_name("stx").experiment_id])
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    return {run.data.params["loss.style.score_weight"]: (
        run.info.status, (run.data.tags.get("stx.batched"), run.data.tags.get("stx.batch_size")), [m.value for m in sorted(client.get_metric_history(run.info.run_id, "total"), key=lambda m: m.step)],
        Path(run.data.tags["stx.run_dir"])) for run in children}


@pytest.mark.slow
def test_each_run_of_a_batched_sweep_is_the_run_it_is_alone_and_a_nan_fails_only_its_own(tmp_path, fresh_store):
    """1e45 is finite, but not in float32: that job's loss is inf at its first step."""
    sweep = ["-m", *FAST, "schedule.steps=6", "loss.style.score_weight=1,1e45,10,100"]
    for folder, launcher in (("basic", ["hydra/launcher=basic"]), ("batched", [])):
        fresh_store(tmp_path / folder)
        assert stx_here(tmp_path / folder, *sweep, *launcher).returncode == 1  # a job failed
    alone, together = histories(tmp_path / "basic"), histories(tmp_path / "batched")
    assert together.keys() == alone.keys() and len(together) == 4
    assert together["1e+45"][0] == alone["1e+45"][0] == "FAILED"
    assert (together["1e+45"][3] / "last_finite_output.png").is_file()
    assert {run[1] for run in together.values()} == {("true", "4")} and {run[1] for run in alone.values()} == {(None, None)}
    for weight in ("1", "10", "100"):
        status, _, totals, run_dir = together[weight]
        assert status == "FINISHED" and len(totals) == 6 and (run_dir / "output.png").is_file()
        assert totals == pytest.approx(alone[weight][2], rel=1e-4)
        assert all(math.isfinite(total) for total in totals)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size, running", [(16, 2), (1, 1)])
def test_ctrl_c_closes_every_run_of_a_batched_sweep_killed_with_its_image(tmp_path, batch_size, running, fresh_store):
    """Both jobs in one batch, or one at a time (batch_size=1): the second, still queued, never starts."""
    fresh_store(tmp_path)
    process = start_stx(tmp_path, "-m", *LONG, "loss.style.score_weight=1e2,1e4", f"hydra.launcher.batch_size={batch_size}")
    for line in process.stdout:
        if "stx: sweep parent MLflow run" in line:
            break
    children = wait_for(lambda: len(started := started_children(tmp_path)) == running and started, timeout=300)
    process.send_signal(signal.SIGINT)
    output = process.stdout.read()
    assert process.wait(timeout=180) == 130, output
    assert "Traceback" not in output, output
    client = client_for(tmp_path)
    assert_killed_with_their_images(client, children)
    every = client.search_runs([client.get_experiment_by_name("stx").experiment_id])
    assert len([run for run in every if "mlflow.parentRunId" in run.data.tags]) == running


@pytest.mark.parametrize("override, message", [
    ("hydra.job.chdir=true", "hydra.job.chdir=true cannot be honoured by hydra/launcher=stx_batched"),
    ("hydra.launcher.batch_size=0", "hydra.launcher.batch_size=0 is not valid: use a whole number >= 1"),
])
def test_what_the_batched_launcher_cannot_do_is_one_paragraph_before_any_job(tmp_path, override, message, fresh_store):
    fresh_store(tmp_path)
    result = stx_here(tmp_path, "-m", *FAST, override, "loss.style.score_weight=1e2,1e4")
    assert result.returncode == 2 and f"stx: error: {message}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "stx: job" not in result.stdout


def test_a_sweep_on_two_gpus_deals_each_batch_to_both(tmp_path, monkeypatch, fresh_store):
    """Without GPUs: the launcher believes there are two, so each job asks for the one it was dealt
    and is refused with that device's name (what the jobs would run on)."""
    fresh_store(tmp_path)
    monkeypatch.setattr("stx.runs.launcher.cuda_devices", lambda: 2)
    result = stx_here(tmp_path, "-m", *FAST, "loss.style.score_weight=1e2,1e3,1e4,1e5")
    refused = [line for line in result.stderr.splitlines() if "was asked for, but this machine has 0 CUDA" in line]
    assert sorted(line.split("device=")[1][:8] for line in refused) == ["'cuda:0'", "'cuda:0'", "'cuda:1'", "'cuda:1'"]
