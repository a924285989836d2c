"""Runs logged before a config key existed are reproduced as they ran; a tampered logged config
is refused before anything runs."""

import os
import shutil

import pytest
import torch
from conftest import CONTENT, FAST, client_for, local_uri
from omegaconf import OmegaConf

from stx import api
from stx.errors import StxError
from stx.runs import layout
from stx.runs.reproduce import reproduce


def test_a_run_logged_before_new_keys_existed_reproduces_exactly(tmp_path, monkeypatch, fresh_store):
    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    fresh_store(tmp_path)
    run_id = api.run(FAST).run_id
    client = client_for(tmp_path)
    logged = OmegaConf.load(layout.download_artifact(client, run_id, layout.CONFIG, tmp_path / "logged"))
    del logged["color"], logged.schedule["tile"], logged.encoder["softmax"], logged["judge"]
    before_layers = OmegaConf.to_yaml(logged).replace("stx.engine.", "stx.")  # _target_s named stx.losses.…
    assert "_target_: stx.losses." in before_layers and "_target_: stx.encoders." in before_layers
    client.log_text(run_id, before_layers, layout.CONFIG)
    result, difference = reproduce(run_id, local_uri(tmp_path))
    assert difference == 0
    original_name = client.get_run(run_id).info.run_name
    assert client.get_run(result.run_id).info.run_name == f"reproduce of {original_name}"
    cfg = OmegaConf.load(layout.download_artifact(client, result.run_id, layout.CONFIG, tmp_path / "again"))
    assert cfg.color == layout.LEGACY_VALUES["color"] and cfg.schedule.tile == "off" and cfg.encoder.softmax is None
    assert cfg.judge.arch == "vgg19" and cfg.judge.weights == "random"  # the run's encoder.weights, as then


@pytest.mark.parametrize("tamper, message", [
    ("tracking:\n  experiment: ${oc.env:STX_TEST_SECRET}\n", r"has tracking.experiment='\$\{oc.env:STX_TEST_SECRET\}': an interpolation"),
    ("seed: !!python/object/apply:os.system ['true']\n", "is not plain YAML"),
])
def test_a_tampered_logged_config_is_refused_before_anything_runs(tmp_path, monkeypatch, tamper, message, fresh_store):
    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("STX_TEST_SECRET", "secret-value")
    monkeypatch.chdir(tmp_path)
    fresh_store(tmp_path)
    run_id = api.run(FAST).run_id
    client = client_for(tmp_path)
    path = layout.download_artifact(client, run_id, layout.CONFIG, tmp_path / "logged")
    path.write_text(path.read_text() + tamper)
    client.log_artifact(run_id, str(path))
    with pytest.raises(StxError, match=message):
        reproduce(run_id, local_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("stx").experiment_id])
    assert len(runs) == 1 and not client.get_experiment_by_name("secret-value")


def test_runs_that_cannot_be_reproduced_are_refused_before_anything_runs(tmp_path, monkeypatch, fresh_store):
    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    fresh_store(tmp_path)
    client = client_for(tmp_path)
    killed = api.run(FAST).run_id
    client.set_terminated(killed, "KILLED")
    with pytest.raises(StxError, match=f"run {killed} ended KILLED: it has no finished output"):
        reproduce(killed, local_uri(tmp_path))
    trained = api.run(FAST).run_id
    client.set_tag(trained, layout.TAG_KIND, "train")
    with pytest.raises(StxError, match=f"run {trained} was made by stx train, not by stx"):
        reproduce(trained, local_uri(tmp_path))
    assert len(client.search_runs([client.get_experiment_by_name("stx").experiment_id])) == 2


def test_a_truncated_checkpoint_is_one_paragraph(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(StxError, match="the checkpoint checkpoint.pt of this run cannot be read as an stx checkpoint"):
        layout.load_checkpoint(path)


def test_a_difference_is_explained_by_how_the_original_ran():
    from stx.runs.reproduce import why_different

    assert why_different({"stx.batched": "true", "stx.batch_size": "4"}, 0) == ""
    batched = why_different({"stx.batched": "true", "stx.batch_size": "4"}, 31)
    assert "batched sweep (4 runs at once" in batched and "31/255 is rounding" in batched
    assert "hydra/launcher=basic" in batched
    assert "should reproduce exactly" in why_different({}, 3)


@pytest.mark.parametrize("text, message", [
    ("a: &x [1, 2]\nb: *x\n", "anchors or aliases"),
    ("seed: 0\n" + "k: " + "x" * 1_100_000 + "\n", "bytes, more than the 1000000 stx reads"),
])
def test_yaml_read_back_from_a_store_is_bounded_plain_data(tmp_path, text, message):
    """An alias bomb (nine levels of nine aliases) once ran `stx reproduce` until killed; now it is refused
    before anything is expanded."""
    from stx.runs import layout

    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(StxError, match=message):
        layout.read_logged_config(path, "0" * 32)


def test_an_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    from stx.runs import layout

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    path = tmp_path / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(StxError, match="anchors or aliases"):  # expanded, it would hold 387 M leaves
        layout.read_logged_config(path, "0" * 32)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to run with another thread count")
def test_a_run_reproduces_to_the_bit_with_the_thread_count_it_ran_with(tmp_path, monkeypatch, fresh_store):
    """One thread and two sum floats in different orders (seed 6's total differs in its 7th digit): the
    original's count is tagged and replayed, then this process's count is restored."""
    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    fresh_store(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_id = api.run([*FAST, "seed=6"]).run_id
    finally:
        torch.set_num_threads(max(2, threads))
    result, difference = reproduce(run_id, local_uri(tmp_path))
    assert torch.get_num_threads() == max(2, threads)
    client = client_for(tmp_path)
    original, copy = client.get_run(run_id).data, client.get_run(result.run_id).data
    assert original.tags[layout.TAG_THREADS] == copy.tags[layout.TAG_THREADS] == "1"
    assert difference == 0 and copy.metrics["total"] == original.metrics["total"]
    torch.set_num_threads(threads)


def test_a_run_started_from_an_image_reproduces_from_its_logged_copy(tmp_path, monkeypatch, fresh_store):
    """The start image is logged with the inputs; a reproduction reads that copy, never the path the run names."""
    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    fresh_store(tmp_path)
    start = tmp_path / "start.png"
    shutil.copy(CONTENT, start)
    run_id = api.run([*FAST, f"schedule.init_image={start}"]).run_id
    start.unlink()  # gone from the reader's machine
    result, difference = reproduce(run_id, local_uri(tmp_path))
    client = client_for(tmp_path)
    logged = client.get_run(result.run_id).data.params["schedule.init_image"]
    assert difference == 0 and logged.endswith("inputs/init/start.png") and str(tmp_path / "runs") in logged
