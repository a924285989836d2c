"""Sweeps (basic, joblib, submitit-local, Optuna), ``stx compare`` and ``stx reproduce``, end to end:
the ``stx`` command in a process of its own where that matters (a sweep's start-up, launchers'
worker processes, a server that does not answer), else its ``main`` in this process (conftest.stx_here)."""

import math
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import CONTENT, FAST, artifact_paths, local_uri, only_run, run_stx, stx_here
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient
from PIL import Image

from stx.runs import layout
from stx.runs.compare import CELL, Row, default_out_dir, load_output, swept_label
from stx.runs.schema import CONF_DIR

pytestmark = pytest.mark.slow


def runs_by_role(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("stx").experiment_id])
    parents = [r for r in runs if r.data.tags.get("stx.sweep") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_sweep_then_compare_then_reproduce(tmp_path, fresh_store):
    fresh_store(tmp_path)
    result = run_stx(tmp_path, "-m", *FAST, "schedule.steps=5", "loss.style.score_weight=1e1,1e3,1e5")
    assert result.returncode == 0, result.stderr
    client, (parent,), children = runs_by_role(local_uri(tmp_path))
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["stx.sweep.command"].startswith("stx -m encoder.weights=random")
    sweep_dir = Path(parent.data.tags["stx.sweep.dir"])
    assert (sweep_dir / "multirun.yaml").is_file() and "multirun.yaml" in artifact_paths(client, parent.info.run_id)
    assert sorted(c.data.params["loss.style.score_weight"] for c in children) == ["10.0", "1000.0", "100000.0"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.info.run_name for c in children) == ["sw=10", "sw=1000", "sw=1e5"]
    assert parent.info.run_name == "sweep sw=1e1,1e3,1e5"
    assert parent.data.params == {"encoder.weights": "random", "judge.weights": "random", "schedule.size": "32",
                                  "schedule.steps": "5"}  # fixed overrides

    # the objective is the judge's style distance plus 10 × the structure's shortfall below 0.35 (objective=keeper),
    # not the weighted loss (whose smallest is the smallest score weight's by far)
    for child in children:
        metrics = child.data.metrics
        shortfall = max(0.0, 0.35 - metrics["eval/structure"])
        assert metrics["objective"] == pytest.approx(metrics["eval/style_distance"] + 10 * shortfall)
    by_weight = {c.data.params["loss.style.score_weight"]: c for c in children}
    assert min(children, key=lambda c: c.data.metrics["total"]) is by_weight["10.0"]
    best = min(children, key=lambda c: c.data.metrics["objective"])
    assert len({round(c.data.metrics["objective"], 6) for c in children}) == 3  # 5 steps tell the weights apart
    assert parent.data.tags["stx.sweep.best_run"] == best.info.run_id
    assert {"compare/table.txt", "compare/contact_sheet.png", "compare/scatter.png"} <= set(artifact_paths(client, parent.info.run_id))
    startup = sorted(c.data.metrics["perf/startup_seconds"] for c in children)
    assert max(startup[:-1]) < startup[-1]  # one process: only the first job to start pays the imports
    assert {f"best/{k}": v for k, v in best.data.metrics.items() if k == "objective" or k.startswith("eval/")} == \
        parent.data.metrics  # the parent carries its best run's objective and quality metrics, as best/…
    assert f"**Best run:** `{best.info.run_id}`" in parent.data.tags["mlflow.note.content"]  # its page's description
    assert "images" in {item.path for item in client.list_artifacts(parent.info.run_id)}  # the best runs' pictures
    jobs = sorted(line for line in result.stdout.splitlines() if line.startswith("stx: job "))  # they start together
    assert [(line[:13], line.rpartition("=")[2]) for line in jobs] == [
        ("stx: job 1/3:", "10.0"), ("stx: job 2/3:", "1000.0"), ("stx: job 3/3:", "100000.0")]
    assert f"stx: best run {best.info.run_id} (objective {best.data.metrics['objective']:.4g})" in result.stdout
    assert f"stx: {sweep_dir / 'compare' / 'table.txt'}, {sweep_dir / 'compare' / 'contact_sheet.png'}" in result.stdout

    compared = stx_here(tmp_path, "compare", parent.info.run_id, "--tracking-uri", local_uri(tmp_path))
    assert compared.returncode == 0, compared.stderr
    header, *rows = compared.stdout.splitlines()[:4]
    assert header.split()[:6] == ["run", "status", "front", "sw", "objective", "style_d"]
    assert max(len(line) for line in compared.stdout.splitlines() if not line.startswith("stx: ")) <= 100  # a terminal's
    assert "(sw: loss.style.score_weight; style_d: eval/style_distance;" in compared.stdout
    objectives = [float(row.split()[4]) for row in rows]
    assert objectives == sorted(objectives) and rows[0].split()[0] == best.info.run_id[:8]  # best first
    assert rows[0].split()[2] == "*"  # the best by the sum is on the style/content front

    original = next(c for c in children if c.data.params["loss.style.score_weight"] == "100000.0")
    reproduced = stx_here(tmp_path, "reproduce", original.info.run_id)
    assert reproduced.returncode == 0, reproduced.stderr
    assert "max pixel difference to the original output: 0/255" in reproduced.stdout
    assert "warning" not in reproduced.stderr  # same commit

    client.set_tag(original.info.run_id, "mlflow.source.git.commit", "0" * 40)
    again = stx_here(tmp_path, "reproduce", original.info.run_id)
    assert f"stx: warning: run {original.info.run_id} was made at commit {'0' * 40}" in again.stderr
    copy, mismatched = sorted(client.search_runs([original.info.experiment_id], filter_string=f"tags.reproduced_from = '{original.info.run_id}'"),
                              key=lambda r: r.info.start_time)
    assert "stx.reproduce.commit_mismatch" in mismatched.data.tags and "stx.reproduce.commit_mismatch" not in copy.data.tags
    moved = {"runs_dir", "images.content", "images.styles.0"}  # the inputs are the run's logged copies
    assert {k: v for k, v in copy.data.params.items() if k not in moved} == {k: v for k, v in original.data.params.items() if k not in moved}
    assert copy.data.params["images.content"].endswith("inputs/content/content.png")
    # run alone, as the batched sweep's run was not: the same up to float rounding in the batched encoder pass
    assert copy.data.metrics["total"] == pytest.approx(original.data.metrics["total"], rel=1e-5)
    assert copy.data.metrics["reproduce/max_pixel_diff"] == 0


def test_failed_job_fails_the_parent_but_not_the_other_jobs(tmp_path, fresh_store):
    """A job that fails as it runs (1e45 is a valid weight, but its loss is inf in float32); a value known to
    be bad before any work stops the whole sweep instead (test_a_sweep_with_one_bad_value_starts_nothing)."""
    fresh_store(tmp_path)
    result = stx_here(tmp_path, "-m", *FAST, "loss.style.score_weight=1,1e45")
    assert result.returncode == 1
    assert "stx: error: " in result.stderr and "stx: sweep ended FAILED" in result.stderr
    _, (parent,), children = runs_by_role(local_uri(tmp_path))
    statuses = {c.data.params["loss.style.score_weight"]: c.info.status for c in children}
    assert statuses == {"1": "FINISHED", "1e+45": "FAILED"}
    assert parent.info.status == "FAILED"
    assert "stx.failed_job.0" not in parent.data.tags
    assert "returned nan" in parent.data.tags["stx.failed_job.1"]


def test_a_job_without_steps_finishes_with_the_loss_of_its_starting_image(tmp_path, fresh_store):
    fresh_store(tmp_path)
    result = stx_here(tmp_path, "-m", *FAST, "schedule.steps=0,1")
    assert result.returncode == 0, result.stderr
    client, (parent,), children = runs_by_role(local_uri(tmp_path))
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    assert not any(key.startswith("stx.failed_job.") for key in parent.data.tags)
    history = {c.data.params["schedule.steps"]: client.get_metric_history(c.info.run_id, "total") for c in children}
    (no_steps,), first_of_one = history["0"], [m for m in history["1"] if m.step == 1]
    assert no_steps.step == 0 and math.isfinite(no_steps.value)
    assert [no_steps.value] == [m.value for m in first_of_one]  # step 1 is measured on the starting image too


def test_output_name_reaches_reproduce_and_compare_beside_the_store(tmp_path, fresh_store):
    fresh_store(tmp_path / "a")
    (tmp_path / "b").mkdir()
    made = stx_here(tmp_path / "a", *FAST, "output=result.png")
    assert made.returncode == 0, made.stderr
    client, run = only_run(tmp_path / "a")
    written = np.asarray(Image.open(Path(run.data.tags["stx.run_dir"]) / "result.png"))

    reproduced = stx_here(tmp_path / "a", "reproduce", run.info.run_id)
    assert reproduced.returncode == 0, reproduced.stderr
    assert "max pixel difference to the original output: 0/255" in reproduced.stdout

    store = local_uri(tmp_path / "a")
    compared = stx_here(tmp_path / "b", "compare", "stx", "--tracking-uri", store)  # from elsewhere
    assert compared.returncode == 0, compared.stderr
    sheet_path = tmp_path / "a" / "runs" / "compare" / "stx" / "contact_sheet.png"
    assert f"stx: contact sheet {sheet_path}" in compared.stdout
    assert not (tmp_path / "b" / "runs").exists()
    assert np.array_equal(np.asarray(load_output(client, run, tmp_path / "downloads")), written)
    sheet = np.asarray(Image.open(sheet_path))
    assert all(len(np.unique(cell[CELL // 4: 3 * CELL // 4, CELL // 4: 3 * CELL // 4].reshape(-1, 3), axis=0)) > 50
               for cell in (sheet[:CELL, :CELL], sheet[:CELL, CELL:2 * CELL]))  # both runs drawn, not "no output image"


@pytest.mark.parametrize(
    "uri,folder",
    [("sqlite:////data/x/mlflow.db", "/data/x"), ("sqlite:///rel/mlflow.db?mode=ro", "{cwd}/rel"),
     ("file:///data/y/mlruns", "/data/y"), ("http://127.0.0.1:5000", "{runs}"), ("postgresql://u@db/mlflow", "{runs}")],
)
def test_compare_writes_beside_the_store_it_reads(tmp_path, monkeypatch, uri, folder):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    expected = Path(folder.format(cwd=tmp_path, runs=tmp_path / "runs")) / "compare"
    assert default_out_dir(uri, "0123abcd") == expected / "0123abcd"
    assert default_out_dir(uri, "team/../exp 1") == expected / "team_.._exp_1"


def test_optuna_sweep_returns_finite_objectives(tmp_path, fresh_store):
    fresh_store(tmp_path)
    result = stx_here(tmp_path, "-m", *FAST, "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                     "hydra.sweeper.sampler.seed=0", "loss.style.score_weight=interval(100,10000)")
    assert result.returncode == 0, result.stderr
    _, (parent,), children = runs_by_role(local_uri(tmp_path))
    assert parent.info.status == "FINISHED" and len(children) == 2
    results = yaml.safe_load((Path(parent.data.tags["stx.sweep.dir"]) / "optimization_results.yaml").read_text())
    assert math.isfinite(results["best_value"])
    assert results["best_value"] == pytest.approx(min(c.data.metrics["objective"] for c in children))
    assert {"multirun.yaml", "optimization_results.yaml"} <= set(artifact_paths(MlflowClient(local_uri(tmp_path)), parent.info.run_id))


def test_submitit_launcher_carries_the_parent_into_jobs(tmp_path, fresh_store):
    fresh_store(tmp_path)
    result = run_stx(tmp_path, "-m", *FAST, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "seed=0,1")
    assert result.returncode == 0, result.stderr
    _, (parent,), children = runs_by_role(local_uri(tmp_path))
    assert parent.info.status == "FINISHED"
    assert sorted(c.data.params["seed"] for c in children) == ["0", "1"]


def test_slurm_launcher_config_composes():
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=stx_slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert cfg.hydra.launcher.gpus_per_node == 1


@pytest.mark.parametrize("store", ["mlflow_server", "local_sqlite"])
def test_parallel_joblib_sweep_loses_and_duplicates_no_run(tmp_path, request, store, fresh_store):
    if store == "mlflow_server":
        uri = request.getfixturevalue("mlflow_server")
        tracking = ["tracking=server"]
    else:
        fresh_store(tmp_path)
        uri, tracking = local_uri(tmp_path), []
    result = run_stx(tmp_path, "-m", *FAST, *tracking, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                     "seed=0,1,2,3", env={"MLFLOW_TRACKING_URI": uri} if tracking else None)
    assert result.returncode == 0, result.stderr
    client, (parent,), children = runs_by_role(uri)
    assert parent.info.status == "FINISHED" and parent.data.tags["stx.sweep.jobs"] == "4"
    assert sorted(c.data.tags["stx.sweep.job_num"] for c in children) == ["0", "1", "2", "3"]  # each once
    assert sorted(c.data.params["seed"] for c in children) == ["0", "1", "2", "3"]
    assert all(c.info.status == "FINISHED" and "output.png" in artifact_paths(client, c.info.run_id) for c in children)


def test_unreachable_server_fails_fast_with_the_uri(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    result = run_stx(tmp_path, *FAST, "tracking=server", env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert result.returncode == 2
    assert f"the MLflow server at http://127.0.0.1:{port} does not answer" in result.stderr
    assert time.monotonic() - started < 60


def test_promote_reruns_a_run_larger_from_its_output(tmp_path, fresh_store):
    fresh_store(tmp_path)
    small = stx_here(tmp_path, *FAST, "schedule.steps=4")
    assert small.returncode == 0, small.stderr
    client = MlflowClient(local_uri(tmp_path))
    (original,) = client.search_runs([client.get_experiment_by_name("stx").experiment_id])
    promoted = stx_here(tmp_path, "promote", original.info.run_id, "schedule.size=48", "schedule.steps=3")
    assert promoted.returncode == 0, promoted.stderr
    (large,) = client.search_runs([original.info.experiment_id], filter_string=f"tags.promoted_from = '{original.info.run_id}'")
    assert large.info.status == "FINISHED" and large.data.params["schedule.size"] == "48"
    assert large.data.params["loss.style.score_weight"] == original.data.params["loss.style.score_weight"]
    assert large.data.params["schedule.init_image"].endswith("promoted_from/output.png")
    assert max(Image.open(Path(large.data.tags["stx.run_dir"]) / "output.png").size) == 48
    assert [m.step for m in client.get_metric_history(large.info.run_id, "total")] == [1, 2, 3]

    refused = stx_here(tmp_path, "promote", original.info.run_id, "schedule.sise=64")
    assert refused.returncode == 2 and "schedule.sise" in refused.stderr and "Traceback" not in refused.stderr


def test_a_seed_sweep_that_changes_nothing_is_warned_about():
    from omegaconf import OmegaConf

    from stx.runs.callbacks import idle_seed_warning

    config = lambda init="content", weights="hed", image=None: OmegaConf.create(
        {"schedule": {"init": init, "init_image": image}, "encoder": {"weights": weights}})
    assert "with schedule.init=content every job starts from the same image" in idle_seed_warning(config(), ["seed"])
    assert "(and an init image)" in idle_seed_warning(config("style", image="a.png"), ["seed"])
    assert idle_seed_warning(config("random"), ["seed"]) is None  # the seed draws the start
    assert idle_seed_warning(config(weights="random"), ["seed"]) is None  # and the random weights
    assert idle_seed_warning(config(), ["seed", "schedule.init"]) is None
    assert idle_seed_warning(config(), ["loss.style.score_weight"]) is None
    assert idle_seed_warning(OmegaConf.create({"trainer": {}}), ["seed"]) is None  # stx train's config


def test_two_swept_keys_that_shorten_alike_are_told_apart_in_names_and_the_table():
    assert layout.short_keys(["loss.style.score_weight", "loss.content.score_weight", "seed"]) == [
        "style.sw", "content.sw", "seed"]
    assert layout.run_name("loss.style.score_weight=1e3 loss.content.score_weight=2") == "style.sw=1000 content.sw=2"
    swept = {"loss.style.score_weight": "1000.0", "loss.content.score_weight": "2.0"}
    assert swept_label(Row(None, swept, None)) == "style.sw=1000 content.sw=2"  # the contact sheet's and scatter's


@pytest.mark.parametrize("swept, message", [
    ("loss.style.score_weight=1e3,abc", "sweep job 2/2 (loss.style.score_weight=abc): loss.style: score_weight='abc' "
                                        "is not valid: weights must be finite numbers >= 0. No job was started."),
    ("images.content=nope.png,stx/assets/content.png", "sweep job 1/2 (images.content=nope.png): images.content: image "),
])
def test_a_sweep_with_one_bad_value_starts_nothing(tmp_path, fresh_store, swept, message):
    """Every job's values are checked before the parent run is created or any job starts."""
    fresh_store(tmp_path)
    result = stx_here(tmp_path, "-m", *FAST, swept)
    assert result.returncode == 2 and result.stderr.startswith(f"stx: error: {message}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "stx: job" not in result.stdout
    store = tmp_path / "runs" / "mlflow.db"
    assert not store.exists() or not MlflowClient(local_uri(tmp_path)).search_runs(
        [e.experiment_id for e in MlflowClient(local_uri(tmp_path)).search_experiments()])


def test_the_scatter_plot_of_fifty_runs_features_the_front_and_the_best_only(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from stx.runs import compare

    rows = [compare.Row(SimpleNamespace(data=SimpleNamespace(metrics={"objective": 1.0 + (index * 7 % 50) / 10,
                                                                      "eval/style_distance": 0.5, "eval/content_distance": 1.0}),
                                        info=SimpleNamespace(run_id=f"{index:032d}")),
                        {"loss.style.score_weight": str(index)}, Image.new("RGB", (32, 24)), on_front=index in (3, 40))
            for index in range(50)]
    points = [(row, 1.0 + index / 50, 0.5) for index, row in enumerate(rows)]
    chosen = [row for row, _, _ in compare.featured(points)]
    assert len(chosen) == compare.SCATTER_FEATURED and chosen[:2] == [rows[3], rows[40]]
    rest = sorted((row for row in rows if not row.on_front), key=lambda row: row.run.data.metrics["objective"])
    assert chosen[2:] == rest[:compare.SCATTER_FEATURED - 2]
    assert compare.featured(points[:5]) == points[:5]
    assert compare.scatter_plot(rows, tmp_path / "scatter.png").is_file()


def test_compare_reads_a_store_on_a_read_only_filesystem(tmp_path, monkeypatch, fresh_store):
    """No lock file can be made there and nothing logged; the table is written where --out says, and an
    unwritable --out is one paragraph."""
    import errno

    from stx import api
    from stx.errors import StxError
    from stx.runs import compare as comparing, store

    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    fresh_store(tmp_path)
    api.run(FAST)
    (tmp_path / "runs" / "mlflow.db.lock").unlink()
    real_open = open

    def read_only_open(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(store, "open", read_only_open, raising=False)
    monkeypatch.setattr(store, "_opened", {})
    monkeypatch.setattr(store.os, "access", lambda path, mode: False)
    sheet, text = comparing.compare("stx", local_uri(tmp_path), tmp_path / "out")
    assert sheet.is_file() and len(text.splitlines()) >= 2 and not (tmp_path / "runs" / "mlflow.db.lock").exists()
    (tmp_path / "a file").write_text("")
    with pytest.raises(StxError, match="stx compare cannot write its table and pictures into .*a file/out .* --out"):
        comparing.compare("stx", local_uri(tmp_path), tmp_path / "a file" / "out")
