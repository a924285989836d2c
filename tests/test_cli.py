"""End-to-end runs of the ``stx`` command; MLflow is queried for what it really holds. The console
script runs in a process of its own where only that shows it (a whole job's output, signals,
the flags); the rest calls its ``main`` in this process (conftest.stx_here)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import conftest
import numpy as np
import pytest
from conftest import STX, artifact_paths, client_for, only_run, options, run_stx, stx_here
from PIL import Image

from stx.runs import layout
from stx.runs.runner import run_tracked

pytestmark = pytest.mark.slow
FAST = ["encoder.weights=random", "schedule.size=48"]


def test_job_is_tracked_in_mlflow(tmp_path):
    result = run_stx(tmp_path, *FAST, "loss=gatys_tv", "schedule.steps=4", "tracking.image_every=2")
    assert result.returncode == 0, result.stderr
    client, run = only_run(tmp_path)
    assert f"MLflow run {run.info.run_id}" in result.stdout
    assert run.info.status == "FINISHED"

    params = run.data.params
    assert params["loss.style.score_weight"] == "5.0"
    assert params["schedule.levels.0.steps"] == "4" and params["encoder.weights"] == "random"
    assert params["choice/loss"] == "gatys_tv" and params["choice/color"] == "none"  # plottable in the UI
    assert run.info.run_name == "weights=random size=48 loss=gatys_tv steps=4"  # short; no runs_dir, no tracking
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
    story = (run_dir / "stx.log").read_text()  # the run's whole story: what it was, how it went, what came out
    for line in ("job 'weights=random size=48 loss=gatys_tv steps=4': overrides: encoder.weights=random",
                 "  choices: color=none, encoder=vgg19, images=sample, judge=default, loss=gatys_tv, objective=keeper, "
                 "schedule=lbfgs, tracking=local", "  size: 48 px, steps: 4, device: auto",
                 "step 1/4 (48 px): total ", "step 4/4 (48 px): total ", "result: output " + str(run_dir / "output.png")):
        assert line in story, story
    assert story.count("] - step ") == 4 and "step " not in result.stderr.replace("step/s", "")
    written = np.asarray(Image.open(run_dir / "output.png"))
    logged = np.asarray(Image.open(client.download_artifacts(run.info.run_id, "output.png", str(tmp_path))))
    assert written.shape == (32, 48, 3) and np.array_equal(written, logged)


def test_a_missing_training_folder_is_refused_before_anything_starts(tmp_path):
    result = stx_here(tmp_path, "train", "data.content_dir=photos", "-c", "job")
    assert "data:" in result.stdout  # --cfg job prints the config without checking files
    result = stx_here(tmp_path, "train", "data.content_dir=photos")
    assert result.returncode == 2 and result.stderr.startswith(
        f"stx: error: data.content_dir='photos' is not a folder (relative paths are taken from the folder stx was "
        f"started in, {tmp_path})"), result.stderr
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # nothing started


def test_bad_image_path_is_one_clear_error_before_any_run(tmp_path):
    result = stx_here(tmp_path, *FAST, "images.content=missing/cat.png")
    assert result.returncode == 2
    assert result.stderr.startswith("stx: error: images.content='missing/cat.png': no such file (relative paths are "
                                    f"taken from the folder stx was started in, {tmp_path})"), result.stderr
    assert "Traceback" not in result.stderr
    db = tmp_path / "runs" / "mlflow.db"
    assert not db.exists() or not client_for(tmp_path).search_experiments(filter_string="name = 'stx'")


@pytest.mark.parametrize("multirun", [[], ["-m", "seed=0,1"]], ids=["run", "sweep"])
def test_unwritable_runs_folder_is_one_clear_error(tmp_path, multirun):
    (tmp_path / "a_file").write_text("not a folder")
    runs = tmp_path / "a_file" / "runs"
    result = stx_here(tmp_path, *multirun, *FAST, env={"STX_RUNS_DIR": str(runs)})
    assert result.returncode == 2
    assert f"stx: error: the runs folder '{runs}' cannot be written" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss=gatyss", "loss=gatyss is not an option of loss. Did you mean gatys or gatys_tv? Options: "
                        f"{', '.join(options('loss'))}."),
        ("loss.sytle=1", "loss.sytle is not a config key. Did you mean loss.style? Keys under loss: content, style. "
                         "To add a new key there instead, write +loss.sytle=…"),
        ("schedule.stpes=2", "schedule.stpes is not a config key. Did you mean schedule.steps? Keys under schedule: "
                             "bounds, checkpoint_every, cuda_graph, init, init_image, levels, max_rise, optimizer, size, steps, style_scale, tile."),
    ],
)
def test_typo_in_a_key_or_an_option_is_one_paragraph_naming_the_valid_ones(tmp_path, override, message):
    result = stx_here(tmp_path, "encoder.weights=random", override)
    assert result.returncode == 2
    assert result.stderr == f"stx: error: {message}\n"


@pytest.mark.parametrize(
    "override,message",
    [("loss=0", "Config group override must be a string or a list"), ("schedule.size=${oops}", "Interpolation key 'oops' not found")],
)
def test_composition_and_resolution_errors_print_no_traceback(tmp_path, override, message):
    result = stx_here(tmp_path, "encoder.weights=random", override)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr + result.stdout


def start_job(folder, *args):
    """Start ``stx`` in ``folder``; return the process once its MLflow run has logged an image
    (a step is done), and the lines it printed (still collected in the background)."""
    env = {**os.environ, "STX_RUNS_DIR": str(folder / "runs")}
    process = subprocess.Popen(STX + list(args), cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    deadline = time.monotonic() + 180
    while not any("[stx.runs.runner][INFO] - MLflow run" in line for line in lines):
        assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.2)
    run_id = next(line for line in lines if "[stx.runs.runner][INFO] - MLflow run" in line).split("MLflow run ")[1].split()[0]
    client = client_for(folder)
    while not client.list_artifacts(run_id, "images"):
        assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.2)
    return process, run_id, lines


@pytest.mark.parametrize("first,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_during_shutdown_do_not_keep_the_run_from_closing(tmp_path, first, code, fresh_store):
    fresh_store(tmp_path)
    process, run_id, lines = start_job(tmp_path, *FAST, "schedule.steps=300", "tracking.image_every=1")
    process.send_signal(first)
    while process.poll() is None:  # sent again and again while stx writes the image and closes the run
        time.sleep(0.02)
        process.send_signal(first)
    time.sleep(0.5)  # the reader thread takes the last lines
    output = "".join(lines)
    assert process.returncode == code, output
    assert "Traceback" not in output
    assert f"stx: interrupted by {signal.Signals(first).name}; the job's MLflow run" in output
    run = client_for(tmp_path).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["stx.error"] == "interrupted"
    assert (Path(run.data.tags["stx.run_dir"]) / "interrupted_output.png").is_file()
    assert f"its latest image kept as {Path(run.data.tags['stx.run_dir']) / 'interrupted_output.png'}" in output
    assert "interrupted_output.png" in artifact_paths(client_for(tmp_path), run_id)


def test_a_stopped_job_names_only_the_image_it_left(tmp_path, monkeypatch):
    """Stopped before its first step, or while writing its output, a job names what is there, not an
    interrupted_output.png it never wrote."""
    from omegaconf import OmegaConf

    from stx import cli
    from stx.runs import hydra_job

    monkeypatch.setattr(hydra_job, "config", lambda: OmegaConf.create({"runtime": {"output_dir": str(tmp_path)}}))
    cfg = OmegaConf.create({"output": "output.png"})
    assert cli._kept(cfg) == "no image kept (it stopped before its first step)"
    (tmp_path / "output.png").write_bytes(b"")  # SIGTERM while the finished image was being written and logged
    assert cli._kept(cfg) == f"its output written as {tmp_path / 'output.png'}"
    (tmp_path / "interrupted_output.png").write_bytes(b"")
    assert cli._kept(cfg) == f"its latest image kept as {tmp_path / 'interrupted_output.png'}"


def test_resume_honours_steps_and_refuses_other_overrides(tmp_path, make_cfg, fresh_store):
    fresh_store(tmp_path)
    first = run_tracked(make_cfg(*FAST, "schedule.steps=2", "schedule.checkpoint_every=2"), tmp_path / "first", {})
    client = client_for(tmp_path)
    client.set_terminated(first.run_id, "KILLED")  # stopped after its checkpoint, before writing its output

    refused = stx_here(tmp_path, f"resume={first.run_id}", "schedule.steps=3", "loss=mrf")
    assert refused.returncode == 2
    assert f"stx: error: resume={first.run_id} continues the run with the config it logged, so loss=mrf cannot be applied" in refused.stderr

    resumed = stx_here(tmp_path, f"resume={first.run_id}", "schedule.steps=3")
    assert resumed.returncode == 0, resumed.stderr
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "total")) == [1, 2, 3]
    assert run.data.tags["stx.resume.changed"] == "schedule.steps 2 -> 3; schedule.levels.0.steps 2 -> 3 (at step 2)"


def test_non_finite_loss_fails_the_run_and_keeps_the_image(tmp_path, fresh_store):
    fresh_store(tmp_path)
    result = stx_here(tmp_path, *FAST, "schedule.steps=3", "loss.style.score_weight=1e39")
    assert result.returncode == 2
    assert "the loss became inf at step 1" in result.stderr and "Traceback" not in result.stderr
    client, run = only_run(tmp_path)
    assert run.info.status == "FAILED"
    assert "NonFiniteLossError" in run.data.tags["stx.error"]
    assert (Path(run.data.tags["stx.run_dir"]) / "last_finite_output.png").is_file()
    assert "last_finite_output.png" in artifact_paths(client, run.info.run_id)

    resumed = stx_here(tmp_path, f"resume={run.info.run_id}")  # it ran without checkpoints
    assert resumed.returncode == 2 and "ran without schedule.checkpoint_every" in resumed.stderr


@pytest.mark.slow
def test_an_error_inside_a_job_is_printed_once_and_kept_in_its_log(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    result = stx_here(tmp_path, *FAST, "images.content=notes.png")
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert output.count("could not be read") == 1 and "[ERROR]" not in output, output
    (log,) = (tmp_path / "runs").glob("*/*/stx.log")
    assert "stx: error: image" in log.read_text()


def test_help_introduces_the_commands_and_each_primary_configs_own_groups():
    from stx import cli

    main, train = cli.overview("config"), cli.overview("train")
    for command in (*cli.COMMANDS, "train"):
        assert f"\n  {command} " in main
    assert "\n  encoder     alexnet, efficientnet_b0, mobilenet_v2, resnet50, vgg16, vgg19*\n" in main
    assert "_base" not in main and "_base" not in train
    assert "\n  experiment " in main and "\n  experiment " not in train  # each lists its own groups only
    assert "\n  trainer " in train and "\n  trainer " not in main
    assert cli.version().startswith("stx 0.1.0 (torch ")


@pytest.mark.slow
def test_help_version_and_a_private_config_file_from_the_command_line(tmp_path):
    helped = run_stx(tmp_path, "--help")
    assert helped.returncode == 0 and "commands (stx <command> --help for each):" in helped.stdout
    assert run_stx(tmp_path, "--version").stdout.startswith("stx 0.1.0")
    reading, writing = os.pipe()
    os.close(reading)  # a reader gone before stx writes, as `stx --help | head -1` can be
    with os.fdopen(writing, "w") as closed:
        piped = subprocess.run([*STX, "--help"], cwd=tmp_path, stdout=closed, stderr=subprocess.PIPE, text=True)
    assert piped.returncode == 0 and piped.stderr == ""  # no BrokenPipeError traceback
    base = run_stx(tmp_path, "schedule=_base")
    assert base.returncode == 2 and base.stderr.strip() == (
        "stx: error: schedule=_base is a shared base of the schedule group, not an option; stx --help lists the options.")
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # refused before any run was opened


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [[], ["-m", "seed=0,1"]], ids=["job", "sweep"])
def test_mlflow_loads_only_in_the_store_process(tmp_path, fresh_store, sweep):
    """MLflow's import (1–2 s) runs in the helper process while the job is built; the process that
    runs the job, or a sweep's jobs and its parent run, never loads it, and the runs are in the store
    as always (a sweep's summary included)."""
    fresh_store(tmp_path)
    code = ("import sys\nfrom stx import cli\nsys.argv = ['stx', *sys.argv[1:]]\ntry:\n    cli.main()\nfinally:\n"
            "    print('mlflow modules:', sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))\n")
    result = subprocess.run([sys.executable, "-c", code, *sweep, *conftest.FAST], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "STX_RUNS_DIR": str(tmp_path / "runs")})
    assert result.returncode == 0, result.stderr
    assert "mlflow modules: []" in result.stdout
    if not sweep:
        client, run = only_run(tmp_path)
        assert run.info.status == "FINISHED" and run.data.tags["stx.pid"] != "" and "total" in run.data.metrics
        return
    client = client_for(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("stx").experiment_id])
    (parent,) = [run for run in runs if run.data.tags.get(layout.TAG_SWEEP) == "true"]
    children = [run for run in runs if run.data.tags.get(layout.TAG_PARENT) == parent.info.run_id]
    assert len(children) == 2 and {run.info.status for run in [parent, *children]} == {"FINISHED"}
    assert parent.data.tags[layout.TAG_SWEEP_JOBS] == "2" and layout.TAG_BEST_RUN in parent.data.tags
    assert {item.path for item in client.list_artifacts(parent.info.run_id, "compare")} >= {
        "compare/table.txt", "compare/contact_sheet.png"}


def test_the_command_and_a_sweeps_callbacks_load_neither_torch_nor_mlflow():
    """What every ``stx`` process loads before its config is checked (the command, Hydra's callbacks,
    the launcher's entry point); MLflow loads in the store's helper process, torch where jobs run."""
    code = ("import sys\nimport stx.cli, stx.runs.callbacks, hydra_plugins.stx_launcher\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'mlflow'}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("folder", ["''", "/"])
def test_an_empty_or_root_runs_dir_is_refused_before_anything_is_written(tmp_path, folder):
    result = stx_here(tmp_path, *FAST, f"runs_dir={folder}")
    assert result.returncode == 2 and result.stderr.startswith(f"stx: error: runs_dir={folder if folder != '/' else repr(folder)} "
                                                               f"is not valid: "), result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("argv, message", [
    (["serve", "--port", "70000"], "argument --port: '70000' is not a port: give a whole number from 1 to 65535"),
    (["ui", "--port", "0"], "argument --port: '0' is not valid: give a whole number >= 1"),
    (["serve", "--max-upload-mb", "-5"], "argument --max-upload-mb: '-5' is not valid: give a number > 0"),
    (["serve", "--max-size", "0"], "argument --max-size: '0' is not valid: give a whole number >= 1"),
    (["serve", "--max-pixels", "1e999"], "argument --max-pixels: '1e999' is not valid: give a whole number >= 1"),
    (["stylize", "m.pt", "x.png", "--batch-size", "0"], "argument --batch-size: '0' is not valid"),
])
def test_out_of_range_arguments_are_one_line_before_anything_runs(argv, message, capsys):
    from stx import cli

    with pytest.raises(SystemExit) as exit_:
        cli.parse_tool_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_stylize_refuses_an_existing_file_as_its_output_folder(tmp_path, capsys):
    from stx import cli

    (tmp_path / "taken.png").write_bytes(b"x")
    with pytest.raises(SystemExit):
        cli.parse_tool_args(["stylize", "m.pt", "x.png", "--out", str(tmp_path / "taken.png")])
    assert "is a file: give a folder (new or existing) to write the images into" in capsys.readouterr().err


def test_a_folder_or_a_pipe_given_as_an_image_is_named_as_such(tmp_path):
    import os

    (tmp_path / "photos").mkdir()
    os.mkfifo(tmp_path / "pipe")
    folder = stx_here(tmp_path, "images.content=photos")
    assert folder.returncode == 2 and "images.content='photos': a folder (relative paths" in folder.stderr
    pipe = stx_here(tmp_path, "images.content=pipe")
    assert pipe.returncode == 2 and "images.content='pipe': not a regular file (a pipe, socket or device)" in pipe.stderr
