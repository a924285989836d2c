"""End-to-end runs of the ``stx`` console script; MLflow is queried for what it really holds."""

from pathlib import Path

import numpy as np
import pytest
from conftest import artifact_paths, client_for, only_run, run_stx
from PIL import Image

pytestmark = pytest.mark.slow
FAST = ["encoder.weights=random", "schedule.size=48"]


def test_job_is_tracked_in_mlflow(tmp_path):
    result = run_stx(tmp_path, *FAST, "loss=gatys_tv", "schedule.steps=4", "tracking.image_every=2")
    assert result.returncode == 0, result.stderr
    client, run = only_run(tmp_path)
    assert f"MLflow run {run.info.run_id}" in result.stdout
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["loss.style.score_weight"] == "1000.0"
    assert params["schedule.levels.0.steps"] == "4" and params["encoder.weights"] == "random"
    tags = run.data.tags
    assert tags["hydra.choice.loss"] == "gatys_tv" and tags["hydra.choice.encoder"] == "vgg19"
    assert "schedule.steps=4" in tags["hydra.overrides"]
    assert tags["device"] == "cpu" and tags["version.torch"].startswith("2.")

    total = client.get_metric_history(run.info.run_id, "total")
    assert [m.step for m in sorted(total, key=lambda m: m.step)] == [1, 2, 3, 4]
    for key in ("content", "content/relu4_2", "style", "style/relu1_1", "style/relu5_1", "tv", "tv/image"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 4, key
    metrics = run.data.metrics
    assert metrics["total"] == pytest.approx(metrics["content"] + metrics["style"] + metrics["tv"], rel=1e-5)

    artifacts = artifact_paths(client, run.info.run_id)
    for expected in ("config.yaml", "hydra/config.yaml", "hydra/overrides.yaml", "hydra/hydra.yaml",
                     "output.png", "inputs/content/content.png", "inputs/style_0/style.png", "stx.log"):
        assert expected in artifacts
    assert sum("images/image+step+2+" in p and p.endswith(".png") for p in artifacts) == 1
    assert sum("images/image+step+4+" in p and p.endswith(".png") for p in artifacts) == 1

    run_dir = Path(tags["stx.run_dir"])
    assert run_dir.parent.parent == tmp_path / "runs"
    written = np.asarray(Image.open(run_dir / "output.png"))
    logged = np.asarray(Image.open(client.download_artifacts(run.info.run_id, "output.png", str(tmp_path))))
    assert written.shape == (32, 48, 3) and np.array_equal(written, logged)


def test_bad_image_path_is_one_clear_error_before_any_run(tmp_path):
    result = run_stx(tmp_path, *FAST, "images.content=missing/cat.png")
    assert result.returncode == 2
    assert "stx: error: image" in result.stderr and "missing/cat.png" in result.stderr
    assert "Traceback" not in result.stderr
    db = tmp_path / "runs" / "mlflow.db"
    assert not db.exists() or not client_for(tmp_path).search_experiments(filter_string="name = 'stx'")


@pytest.mark.parametrize("multirun", [[], ["-m", "seed=0,1"]], ids=["run", "sweep"])
def test_unwritable_runs_folder_is_one_clear_error(tmp_path, multirun):
    (tmp_path / "a_file").write_text("not a folder")
    runs = tmp_path / "a_file" / "runs"
    result = run_stx(tmp_path, *multirun, *FAST, env={"STX_RUNS_DIR": str(runs)})
    assert result.returncode == 2
    assert f"stx: error: the runs folder '{runs}' cannot be written" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_group_option_lists_valid_ones(tmp_path):
    result = run_stx(tmp_path, "loss=nope")
    assert result.returncode == 1
    assert "Could not find 'loss/nope'" in result.stderr and "gatys_tv" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "override,message",
    [("loss=0", "Config group override must be a string or a list"), ("schedule.size=${oops}", "Interpolation key 'oops' not found")],
)
def test_composition_and_resolution_errors_print_no_traceback(tmp_path, override, message):
    result = run_stx(tmp_path, "encoder.weights=random", override)
    assert result.returncode in (1, 2)
    assert message in result.stderr and "Traceback" not in result.stderr + result.stdout


def test_non_finite_loss_fails_the_run_and_keeps_the_image(tmp_path):
    result = run_stx(tmp_path, *FAST, "schedule.steps=3", "loss.style.score_weight=1e39")
    assert result.returncode == 2
    assert "the loss became inf at step 1" in result.stderr and "Traceback" not in result.stderr
    client, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["stx.error"]
    assert (Path(run.data.tags["stx.run_dir"]) / "last_finite_output.png").is_file()
    assert "last_finite_output.png" in artifact_paths(client, run.info.run_id)

    resumed = run_stx(tmp_path, f"resume={run.info.run_id}")  # it ran without checkpoints
    assert resumed.returncode == 2 and "ran without schedule.checkpoint_every" in resumed.stderr
