"""Every file and tag stx reads back from a store, tampered with: one paragraph (StxError), never
a traceback, never a file outside the store, and one bad tag never blocks the other runs."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONTENT, local_uri, place_store
from mlflow.tracking import MlflowClient

from stx.errors import StxError
from stx.runs import layout, liveness
from stx.runs.compare import compare
from stx.runs.reproduce import promote, reproduce
from stx.runs.runner import resume, run_tracked
from stx.runs.store import existing_store
from stx.runs.tracking import TrackingError

JOB = ["encoder.weights=random", "judge.weights=random", "schedule.size=32", "tracking.image_every=0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, store_template):
    """A KILLED 4-step run with checkpoints, in a store of its own: ``(folder, client, run id)``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stx.runs.schema import CONF_DIR

    folder = tmp_path_factory.mktemp("store")
    place_store(store_template, folder)
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*JOB, "schedule.steps=4", "schedule.checkpoint_every=2",
                                           f"runs_dir={folder / 'runs'}"])
    GlobalHydra.instance().clear()
    result = run_tracked(cfg, folder / "first", {})
    client = MlflowClient(local_uri(folder))
    client.set_terminated(result.run_id, "KILLED")
    return folder, client, result.run_id


@pytest.fixture
def artifacts(store):
    """The run's artifact folder, restored after the test."""
    folder, client, run_id = store
    root = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    saved = folder / "saved"
    shutil.copytree(root, saved)
    yield root
    shutil.rmtree(root)
    shutil.move(saved, root)


def resume_it(store, monkeypatch, tmp_path):
    folder, _, run_id = store
    monkeypatch.setenv("STX_RUNS_DIR", str(folder / "runs"))
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stx.runs.schema import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"resume={run_id}", f"runs_dir={folder / 'runs'}"])
    GlobalHydra.instance().clear()
    return resume(cfg, tmp_path / "resumed", overrides=[f"resume={run_id}"])


@pytest.mark.parametrize("change, message", [
    (dict(level=99), "it is at pyramid level 99, but the run has 1 level"),
    (dict(step=-5), "its step -5 is outside its level's steps 0–4"),
    (dict(step="abc"), "its step, level, loss or images are not of the types stx writes"),
    (dict(parameter=torch.zeros(1, 3, 7, 7)), r"its images are \(1, 3, 7, 7\), not \(1, 3, 21, 32\)"),
    (dict(run_id="0123456789abcdef0123456789abcdef"),
     "it names run '0123456789abcdef0123456789abcdef' as its writer \\(copied from another run\\)"),
])
def test_a_checkpoint_that_loads_but_does_not_fit_the_run_is_refused(store, artifacts, monkeypatch, tmp_path,
                                                                      change, message):
    path = artifacts / layout.CHECKPOINT
    state = torch.load(path, weights_only=True)
    assert state["run_id"] == store[2]  # each checkpoint names its run
    torch.save({**state, **change}, path)
    with pytest.raises(StxError, match=f"does not fit the run's config: {message}"):
        resume_it(store, monkeypatch, tmp_path)


def test_a_pickled_checkpoint_is_refused_in_stx_words(store, artifacts, monkeypatch, tmp_path):
    torch.save({"step": 4, "evil": Path("x")}, artifacts / layout.CHECKPOINT)
    with pytest.raises(StxError, match="holds Python objects other than tensors and numbers, which stx never unpickles"):
        resume_it(store, monkeypatch, tmp_path)


def drop_key(path, section, key):
    config = yaml.safe_load(path.read_text())
    del config[section][key]
    path.write_text(yaml.safe_dump(config))


def set_key(path, section, key, value):
    config = yaml.safe_load(path.read_text())
    config[section][key] = value
    path.write_text(yaml.safe_dump(config))


@pytest.mark.parametrize("tamper, message", [
    (lambda root: (root / "config.yaml").write_bytes(bytes(range(256)) * 4), "is not plain YAML"),
    (lambda root: drop_key(root / "config.yaml", "images", "styles"), "lacks images.styles, which every stx run logs"),
    (lambda root: shutil.copy(next((root / "inputs" / "content").iterdir()), root / "inputs" / "content" / "x.png"),
     r"logged content.png, x.png in inputs/content, where stx logs exactly one input image"),
    (lambda root: [p.unlink() for p in (root / "inputs" / "style_0").iterdir()], "logged nothing in inputs/style_0"),
    (lambda root: set_key(root / "config.yaml", "schedule", "init_image", str(CONTENT)),  # a file of the reader's
     "started from schedule.init_image='.*content.png' but logged no copy of it in inputs/init"),
])
def test_logged_configs_and_inputs_that_do_not_match_are_refused(store, artifacts, monkeypatch, tmp_path,
                                                                 tamper, message):
    tamper(artifacts)
    with pytest.raises(StxError, match=message):
        resume_it(store, monkeypatch, tmp_path)


def test_an_output_tag_naming_a_path_outside_the_run_reads_nothing(store, monkeypatch, tmp_path):
    folder, client, run_id = store
    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    client.set_tag(run_id, layout.TAG_OUTPUT, "../../../../etc/hostname")
    try:
        with pytest.raises(StxError, match=r"has the tag stx.output='../../../../etc/hostname', which is not a plain"):
            promote(run_id, local_uri(folder), ["schedule.size=40"])
        assert not list(tmp_path.rglob("hostname"))
    finally:
        client.set_tag(run_id, layout.TAG_OUTPUT, "output.png")


@pytest.mark.parametrize("tags", [
    {"stx.pid": "abc"}, {"stx.pid": "99999999999999999999"},
    {"stx.host": "otherhost", "stx.heartbeat": "abc"}, {"stx.host": "otherhost", "stx.heartbeat": "-1e300"},
])
def test_one_edited_liveness_tag_blocks_nothing(tmp_path, tags, fresh_store):
    client = fresh_store(tmp_path)
    experiment = client.create_experiment("stx")
    run = client.create_run(experiment, tags={"stx.host": "thishost", "stx.pid": "1", **tags})
    assert liveness.close_dead_runs(client, experiment) == []  # unknown: left RUNNING, no exception
    assert client.get_run(run.info.run_id).info.status == "RUNNING"


def test_a_store_that_does_not_exist_or_is_corrupt_is_one_paragraph_and_never_created(tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    with pytest.raises(TrackingError, match=f"there is no MLflow store at {missing}"):
        existing_store(f"sqlite:///{missing}")
    assert not missing.parent.exists()
    corrupt = tmp_path / "mlflow.db"
    corrupt.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(TrackingError, match=f"the MLflow store {corrupt} could not be opened"):
        reproduce("0" * 32, f"sqlite:///{corrupt}")


def test_an_unbalanced_quote_in_the_overrides_tag_is_read_word_by_word():
    assert layout.parse_overrides("seed=1 output='a.png") == {"seed": "1", "output": "'a.png"}


def test_compare_leaves_out_an_unreadable_output_with_a_warning(store, artifacts, tmp_path, capsys):
    folder, client, run_id = store
    (artifacts / "output.png").write_bytes(b"not a png")
    sheet, text = compare("stx", local_uri(folder), tmp_path / "compare")
    assert sheet.is_file() and run_id[:8] in text
    assert f"run {run_id}'s output output.png cannot be read" in capsys.readouterr().err


def test_short_run_ids_are_accepted_and_ambiguous_ones_refused(store, tmp_path):
    folder, client, run_id = store
    assert layout.find_run(client, run_id[:8]).info.run_id == run_id
    assert layout.find_run(client, "ffffffff") is None or run_id.startswith("ffffffff")
    other = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    common = next(n for n in range(len(run_id)) if run_id[n] != other[n])
    if common >= 4:
        with pytest.raises(StxError, match="is the start of 2 runs' ids"):
            layout.find_run(client, run_id[:common])
    client.delete_run(other)
