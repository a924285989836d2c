"""stx train: content folder, training that lowers the loss, tracking, resume, exports and stylize."""

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import artifact_paths, place_store, run_stx, stx_here
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient
from PIL import Image

from stx.errors import ConfigError, StxError
from stx.fast import data, export
from stx.fast.stylize import collect, load_model, stylize
from stx.fast.train import train
from stx.fast.cost import multiply_adds
from stx.fast.mobile import MobileStyleNet
from stx.fast.prune import prune_channels, start_and_prune
from stx.fast.transformer import TransformerNet
from stx.runs.schema import CONF_DIR

TINY = [
    "encoder.weights=random", "model.channels=4", "model.residual_blocks=1",
    "data.crop=32", "data.eval_size=32", "data.holdout=1", "data.workers=0", "trainer.batch_size=2",
    "trainer.style_size=32", "trainer.optimizer.lr=0.02", "tracking.image_every=10", "trainer.export=[]",
]
"""A training job of well under a second per step: 4-channel model, 32 px crops, random VGG16."""


def write_images(folder, count, rng):
    """``count`` smooth random RGB images of varied sizes and formats, half in a subfolder."""
    for index in range(count):
        height, width = 36 + 3 * index, 48
        base = rng.random((height // 6 + 1, width // 6 + 1, 3))
        pixels = np.kron(base, np.ones((6, 6, 1)))[:height, :width]
        path = folder / ("sub" if index % 2 else "") / f"c{index}.{'jpg' if index % 3 == 0 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def content_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("content")
    write_images(folder, 8, np.random.default_rng(0))
    (folder / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(folder / "tiny.png")
    return folder


def compose_train(tmp_path, content_dir, *overrides):
    other_model = any(override.startswith("model=") for override in overrides)  # TINY's model keys are Johnson's
    tiny = [override for override in TINY if not (other_model and override.startswith("model."))]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.content_dir={content_dir}", f"runs_dir={tmp_path / 'runs'}",
                                          *tiny, *overrides])
    GlobalHydra.instance().clear()
    return cfg


def run_training(tmp_path, content_dir, name, *overrides, resume=None):
    cfg = compose_train(tmp_path, content_dir, *overrides, *([f"resume={resume}"] if resume else []))
    if resume:
        from stx.fast.train import resumed_config

        cfg, _ = resumed_config(cfg, [f"resume={resume}", *[o for o in overrides if o.startswith("trainer.steps")]],
                                tmp_path / name)
    train(cfg, tmp_path / name, {}, resume_run_id=resume)
    client = MlflowClient(cfg.tracking.uri)
    (run,) = [r for r in client.search_runs([client.get_experiment_by_name("stx-train").experiment_id])
              if r.data.tags.get("stx.run_dir") == str(tmp_path / name)]
    return client, run


def test_scan_skips_unreadable_and_tiny_files_and_holds_out_a_fixed_spread(content_dir):
    found = data.scan(content_dir)
    assert len(found.paths) == 8 and found.skipped == 2  # notes.txt, the 8×8 image
    assert any(path.parent.name == "sub" for path in found.paths)
    train_paths, held = data.split(found.paths, 2)
    assert [found.paths.index(p) for p in held] == [2, 6]  # evenly spread over the sorted files
    assert len(train_paths) == 6 and not set(train_paths) & set(held)
    with pytest.raises(ConfigError, match="data.holdout=8"):
        data.split(found.paths, 8)


def test_crops_are_deterministic_per_seed_epoch_and_index_and_bad_files_drop_from_the_batch(content_dir, tmp_path):
    paths = data.scan(content_dir).paths
    dataset = data.ContentCrops(paths, 32, seed=0)
    first = dataset[3]
    assert first.shape == (3, 32, 32) and torch.equal(first, dataset[3])
    dataset.epoch = 1
    assert not torch.equal(first, dataset[3])
    broken = tmp_path / "broken.png"
    broken.write_bytes((content_dir / "sub" / "c1.png").read_bytes()[:200])  # a PNG cut short: header only
    batch, skipped = data.collate([dataset[0], data.ContentCrops([broken], 32, 0)[0]])
    assert batch.shape == (1, 3, 32, 32) and skipped == 1


def test_transformer_keeps_any_size():
    model = TransformerNet(channels=4, residual_blocks=1).eval()
    for shape in ((1, 3, 17, 23), (2, 3, 64, 33)):
        out = model(torch.rand(shape))
        assert out.shape == shape and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ConfigError, match="model.channels=0"):
        TransformerNet(channels=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, content_dir, store_template):
    """One 20-step training run with every export, registered as ``tiny``."""
    tmp_path = tmp_path_factory.mktemp("trained")
    place_store(store_template, tmp_path)
    client, run = run_training(tmp_path, content_dir, "job", "trainer.steps=20", "trainer.checkpoint_every=10",
                               "tracking.register_as=tiny", "trainer.export=[torchscript,onnx]")
    return tmp_path, client, run


def logged_model_folder(client, run, folder):
    """The run's logged MLflow model, downloaded into ``folder``."""
    import mlflow.artifacts

    with export.tracking_uri_set(client._tracking_client.tracking_uri):  # MLflow finds logged models through it
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run.info.run_id}/model",
                                                        dst_path=str(folder)))


def test_training_lowers_the_loss_and_is_tracked(trained):
    tmp_path, client, run = trained
    totals = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "total"), key=lambda m: m.step)]
    assert len(totals) == 20
    assert np.mean(totals[-5:]) < 0.5 * np.mean(totals[:5])
    assert run.info.status == "FINISHED" and run.data.tags["stx.kind"] == "train"
    assert "MLFLOW_TRACKING_URI" not in os.environ  # logging the model leaves no store to later commands
    assert {"content", "style", "tv", "style/relu3_3", "lr", "eval/style_distance", "perf/images_per_second",
            "data/skipped_files"} <= set(run.data.metrics)
    assert run.data.metrics["data/skipped_files"] == 2 and run.data.metrics["data/held_out_images"] == 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/style_distance")] == [10, 20]
    paths = artifact_paths(client, run.info.run_id)
    assert {"config.yaml", "checkpoint/checkpoint.pt", "export/model.torchscript.pt", "export/model.onnx",
            "inputs/style_0/style.png"} <= set(paths)
    assert sum(path.startswith("images/") and path.endswith(".png") for path in paths) >= 2  # samples at 10 and 20
    assert run.data.params["model.channels"] == "4"


def test_exports_and_logged_model_match_the_eager_model(trained):
    tmp_path, client, run = trained
    model = TransformerNet(channels=4, residual_blocks=1)
    model.load_state_dict(torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=True)["model"])
    model.eval()
    image = torch.rand(2, 3, 45, 61, generator=torch.Generator().manual_seed(0))  # odd sizes, not the example's
    with torch.no_grad():
        expected = model(image)
        scripted = export.load_torchscript(tmp_path / "job" / export.TORCHSCRIPT_FILE)(image)
    onnx = export.OnnxModel(tmp_path / "job" / export.ONNX_FILE)(image)
    assert (scripted - expected).abs().max() < 1e-4
    assert (onnx - expected).abs().max() < 1e-4
    import mlflow.pyfunc

    with export.tracking_uri_set(client._tracking_client.tracking_uri):
        for ref in (f"runs:/{run.info.run_id}/model", "models:/tiny/1"):
            predicted = mlflow.pyfunc.load_model(ref).predict(image.numpy())
            assert np.abs(predicted - expected.numpy()).max() < 1e-4
        signature = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model").signature
    assert signature.inputs.inputs[0].shape == (-1, 3, -1, -1)
    assert client.get_model_version("tiny", "1").run_id == run.info.run_id
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_stylize_loads_each_kind_of_reference_and_writes_every_image(trained, content_dir, tmp_path):
    tmp, client, run = trained
    uri = client._tracking_client.tracking_uri
    items, skipped = collect([str(content_dir)])
    assert len(items) == 8 and skipped == 2
    outputs = {}
    for ref in (run.info.run_id, "tiny", "tiny/1", str(tmp / "job" / export.TORCHSCRIPT_FILE),
                str(tmp / "job" / export.ONNX_FILE)):
        model = load_model(ref, uri, torch.device("cpu"))
        out = tmp_path / ref.replace("/", "_")
        written = stylize(model, items[:3], out, torch.device("cpu"), size=40, batch_size=2)
        assert len(written) == 3 and written[0].suffix == ".png"
        outputs[ref] = np.asarray(Image.open(written[0]), dtype=int)
    first = next(iter(outputs.values()))
    assert all(np.abs(o - first).max() <= 1 for o in outputs.values())  # the same model, ±1 rounding level
    assert Image.open(written[0]).size == (40, 36 * 40 // 48)  # long edge 40, aspect kept
    with pytest.raises(StxError, match="cannot load the model 'nosuch'"):
        load_model("nosuch", uri, torch.device("cpu"))


class Payload:
    """A pickle that runs a command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("form", ["pickle", "torch.save"])
def test_a_pickle_in_a_shared_store_is_refused_and_never_run(trained, tmp_path, form):
    _, client, run = trained
    uri = client._tracking_client.tracking_uri
    folder = logged_model_folder(client, run, tmp_path)
    marker = tmp_path / "ran"
    model_file = folder / "data" / "model.pth"
    if form == "pickle":
        model_file.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save(Payload(marker), model_file)
    tampered = client.create_run(run.info.experiment_id).info.run_id
    client.log_artifacts(tampered, str(folder), "model")
    for ref in (tampered, f"runs:/{tampered}/model", str(folder), str(model_file)):
        with pytest.raises(StxError, match="is not a TorchScript model.*never pickles"):
            load_model(ref, uri, torch.device("cpu"))
    assert not marker.exists()


@pytest.mark.parametrize("compressed", [False, True], ids=["johnson", "pruned mobile with the temporal loss"])
def test_resume_continues_to_the_same_weights_as_an_uninterrupted_run(tmp_path, content_dir, fresh_store, compressed):
    fresh_store(tmp_path)
    common = ("trainer.checkpoint_every=2", "tracking.image_every=0", "data.holdout=0")
    if compressed:  # rebuilt on resume: the same start weights, the same channels pruned, the same random flows
        start = export.export_torchscript(MobileStyleNet(channels=16), tmp_path / "trained.pt")
        common += ("model=mobile", "model.channels=16", f"start_from={start}", "prune.amount=0.5", "temporal.weight=1")
    _, straight = run_training(tmp_path, content_dir, "straight", "trainer.steps=4", *common)
    client, first = run_training(tmp_path, content_dir, "first", "trainer.steps=2", *common)
    _, resumed = run_training(tmp_path, content_dir, "resumed", "trainer.steps=4", *common, resume=first.info.run_id)
    assert resumed.info.run_id == first.info.run_id and resumed.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first.info.run_id, "total")] == [1, 2, 3, 4]
    want = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["model"]
    got = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(want[key], got[key]) for key in want)


def test_bad_training_config_is_one_paragraph(tmp_path, content_dir):
    with pytest.raises(ConfigError, match="trainer.batch_size=9 is more than the 7 training image"):
        train(compose_train(tmp_path, content_dir, "trainer.batch_size=9"), tmp_path / "job", {})
    with pytest.raises(ConfigError, match="data.content_dir="):
        train(compose_train(tmp_path, tmp_path / "missing"), tmp_path / "job", {})
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no photos here")
    with pytest.raises(ConfigError, match=r"data.content_dir='.*notes' holds no usable content image \(1 file\(s\) skipped"):
        train(compose_train(tmp_path, tmp_path / "notes"), tmp_path / "job", {})  # not data.holdout's fault
    with pytest.raises(ConfigError, match="model._target_='os.system' is not allowed"):
        train(compose_train(tmp_path, content_dir, "model._target_=os.system"), tmp_path / "job", {})


@pytest.mark.slow
def test_stx_train_command(tmp_path, content_dir, fresh_store):
    fresh_store(tmp_path)
    result = run_stx(tmp_path, "train", f"data.content_dir={content_dir}", *TINY, "trainer.steps=2")
    assert result.returncode == 0, result.stderr
    assert "stx: trained 2 steps; model runs:/" in result.stdout
    assert "Warning" not in result.stderr, result.stderr
    unset = stx_here(tmp_path, "train")
    assert unset.returncode == 2 and "stx: error: data.content_dir is not set" in unset.stderr


def test_train_resume_of_an_image_optimisation_run_is_one_paragraph(tmp_path, content_dir):
    from stx.fast.train import resumed_config

    cfg = compose_train(tmp_path, content_dir)
    client = MlflowClient(cfg.tracking.uri)
    run = client.create_run(client.create_experiment("stx"))
    (tmp_path / "config.yaml").write_text("images: {content: cat.jpg}\nschedule: {steps: 10}\n")
    client.log_artifact(run.info.run_id, str(tmp_path / "config.yaml"))
    cfg.resume = run.info.run_id
    with pytest.raises(StxError, match=f"was not made by stx train.*stx resume={run.info.run_id}"):
        resumed_config(cfg, [f"resume={run.info.run_id}"], tmp_path / "job")


class Scalar(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.mean()


class NotANumber(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image * float("nan")


@pytest.mark.parametrize("module, message", [
    (Scalar(), r"the model returned a \(\) tensor for 1 image\(s\); a stylisation model returns B×3×H×W images"),
    (NotANumber(), "the model returned NaN or infinite values"),
])
def test_a_model_returning_no_images_is_one_paragraph_and_writes_nothing(tmp_path, content_dir, module, message):
    path = tmp_path / "model.pt"
    export.export_torchscript(module, path)
    model = load_model(str(path), "sqlite:///unused.db", torch.device("cpu"))
    items, _ = collect([str(content_dir / "c2.png")])
    with pytest.raises(StxError, match=message):
        stylize(model, items, tmp_path / "out", torch.device("cpu"))
    assert not (tmp_path / "out").exists()


def test_model_files_that_are_not_models_are_one_paragraph(trained, tmp_path):
    _, client, run = trained
    folder = logged_model_folder(client, run, tmp_path)
    (folder / "MLmodel").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(StxError, match="has no readable pytorch flavour"):
        load_model(str(folder), "sqlite:///unused.db", torch.device("cpu"))
    (tmp_path / "garbage.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(StxError, match="is not an ONNX model ONNX Runtime can run"):
        load_model(str(tmp_path / "garbage.onnx"), "sqlite:///unused.db", torch.device("cpu"))
    with pytest.raises(StxError, match=f"model file '{tmp_path / 'missing.pt'}' does not exist"):
        load_model(str(tmp_path / "missing.pt"), "sqlite:///unused.db", torch.device("cpu"))


def test_images_whose_results_share_a_name_are_all_written(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.png", "a.jpg"):
        Image.fromarray((rng.random((32, 40, 3)) * 255).astype(np.uint8)).save(tmp_path / name)
    items, _ = collect([str(tmp_path)])
    targets = {str(item.source.name): str(item.target) for item in items}
    assert len(set(targets.values())) == 2 and "a.png" in targets.values()
    assert targets["a.jpg"] in ("a.png", "a_jpg.png") and targets["a.png"] in ("a.png", "a_png.png")


@pytest.mark.parametrize("tamper", ["truncated", "no model", "pickle"])
def test_a_bad_training_checkpoint_is_one_paragraph(tmp_path, content_dir, tamper):
    from stx.fast.train import build_training, load_state

    path = tmp_path / "checkpoint.pt"
    if tamper == "truncated":
        path.write_bytes(b"PK\x03\x04 truncated")
    elif tamper == "no model":
        torch.save({"optimizer": {}, "scheduler": None, "step": 2}, path)
    else:
        torch.save({"model": Path("x")}, path)
    job = build_training(compose_train(tmp_path, content_dir))
    with pytest.raises(StxError, match="the checkpoint checkpoint.pt of this training run cannot be resumed from"):
        load_state(job, path)


def test_the_mobile_network_keeps_any_size_with_a_thirtieth_of_johnsons_weights():
    model = MobileStyleNet().eval()
    for shape in ((1, 3, 17, 23), (2, 3, 64, 33)):
        out = model(torch.rand(shape))
        assert out.shape == shape and 0 <= out.min() and out.max() <= 1
    count = lambda net: sum(p.numel() for p in net.parameters())
    assert count(model) * 30 < count(TransformerNet())  # 42 019 against 1 679 235 at the configs' defaults
    assert count(MobileStyleNet(width=0.5)) < count(model) < count(MobileStyleNet(blocks=6))
    with pytest.raises(ConfigError, match="model.width=0 is not valid"):
        MobileStyleNet(width=0)


def test_a_mobile_model_trains_and_its_int8_export_matches_it(tmp_path, content_dir, fresh_store):
    """``model=mobile`` through ``stx train`` with ``trainer.export=[onnx,onnx_int8]``: the int8 file has
    weights under half the fp32 ones, runs in ONNX Runtime and through ``stx stylize``, and stays close to the model."""
    fresh_store(tmp_path)
    client, run = run_training(tmp_path, content_dir, "job", "model=mobile", "model.channels=8", "trainer.steps=6",
                               "trainer.checkpoint_every=6", "trainer.export=[onnx,onnx_int8]")
    assert {"export/model.onnx", "export/model.int8.onnx"} <= set(artifact_paths(client, run.info.run_id))
    fp32, int8 = tmp_path / "job" / export.ONNX_FILE, tmp_path / "job" / export.ONNX_INT8_FILE
    costs = run.data.metrics  # what a deployer compares, logged by the run
    assert costs["export/onnx_int8_bytes"] == int8.stat().st_size and costs["export/onnx_bytes"] == fp32.stat().st_size
    assert costs["perf/latency_ms_256/onnx_int8"] > 0 and costs["perf/latency_ms_256/onnx"] > 0
    assert costs["model/macs_256"] == multiply_adds(MobileStyleNet(channels=8), 256)
    import onnx

    weights = lambda path: sum(len(t.raw_data) + 4 * len(t.float_data) for t in onnx.load(str(path)).graph.initializer)
    assert weights(int8) < 0.5 * weights(fp32)  # int8 weights (per-channel scales and int32 biases beside them)
    model = MobileStyleNet(channels=8)
    model.load_state_dict(torch.load(tmp_path / "job" / "checkpoint.pt", weights_only=True)["model"])
    image = next(iter(data.ContentCrops(data.scan(content_dir).paths, 32, 1)))[None]
    with torch.no_grad():
        expected = model.eval()(image)
    quantised = export.OnnxModel(int8)(image)
    assert quantised.shape == expected.shape and (quantised - expected).abs().mean() < 0.02
    written = stylize(load_model(str(int8), "sqlite:///unused.db", torch.device("cpu")), collect([str(content_dir)])[0][:2],
                      tmp_path / "out", torch.device("cpu"), size=40, batch_size=2)
    assert len(written) == 2 and all(path.is_file() for path in written)


def test_a_student_distilled_from_a_teacher_comes_close_to_its_outputs(trained, tmp_path, content_dir, fresh_store):
    """The perceptual loss off, only ``distill`` left: a mobile student's distance to a trained Johnson
    teacher's outputs falls; a teacher that cannot be read is one paragraph naming distill.teacher."""
    teacher = trained[0] / "job" / export.TORCHSCRIPT_FILE
    fresh_store(tmp_path)
    off = ["loss.content.score_weight=0", "loss.style.score_weight=0", "loss.tv.score_weight=0"]
    client, run = run_training(tmp_path, content_dir, "student", "model=mobile", "model.channels=8", *off,
                               f"distill.teacher={teacher}", "distill.weight=1", "trainer.steps=30",
                               "trainer.optimizer.lr=0.01")
    distances = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "distill"), key=lambda m: m.step)]
    assert len(distances) == 30 and np.mean(distances[-5:]) < 0.5 * np.mean(distances[:5]), distances
    assert run.data.metrics["total"] == pytest.approx(distances[-1], rel=1e-5)  # the only term left
    psnr = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "eval/psnr_teacher"), key=lambda m: m.step)]
    assert len(psnr) >= 2 and psnr[-1] > psnr[0] + 1, psnr  # dB against the teacher's held-out outputs
    with pytest.raises(StxError, match=r"distill.teacher='nosuch.pt': model file 'nosuch.pt' does not exist"):
        train(compose_train(tmp_path, content_dir, "distill.teacher=nosuch.pt"), tmp_path / "bad", {})
    with pytest.raises(ConfigError, match="distill.weight=-1.0 is not valid"):
        train(compose_train(tmp_path, content_dir, "distill.weight=-1"), tmp_path / "bad", {})


def test_pruning_removes_channels_and_fine_tunes_from_the_unpruned_model(tmp_path, content_dir, fresh_store):
    """Parameters, file bytes and multiply-adds fall with prune.amount; the pruned model starts from the
    trained unpruned one (start_from) and trains on; Johnson's instance norm is refused in one paragraph."""
    fresh_store(tmp_path)
    mobile = ["model=mobile", "model.channels=16", "trainer.export=[torchscript,onnx]", "trainer.steps=4"]
    client, unpruned = run_training(tmp_path, content_dir, "unpruned", *mobile)
    start = tmp_path / "unpruned" / export.TORCHSCRIPT_FILE
    started = MobileStyleNet(channels=16)
    start_and_prune(started, load_model(str(start), "sqlite:///unused.db", torch.device("cpu")), 0.0, "l2")
    trained = torch.load(tmp_path / "unpruned" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(value, trained[key]) for key, value in started.state_dict().items())
    sizes = {0.0: (unpruned.data.metrics["model/parameters"], (tmp_path / "unpruned" / export.ONNX_FILE).stat().st_size)}
    for amount in (0.25, 0.5):
        _, run = run_training(tmp_path, content_dir, f"pruned{amount}", *mobile, f"start_from={start}",
                              f"prune.amount={amount}")
        sizes[amount] = (run.data.metrics["model/parameters"], (tmp_path / f"pruned{amount}" / export.ONNX_FILE).stat().st_size)
        assert run.info.status == "FINISHED" and math.isfinite(run.data.metrics["total"])
    counts, files = zip(*(sizes[amount] for amount in (0.0, 0.25, 0.5)))
    assert counts[0] > counts[1] > counts[2] and counts[2] < 0.4 * counts[0], sizes  # channels², so about quadratic
    assert files[0] > files[1] > files[2], sizes
    pruned = prune_channels(MobileStyleNet(channels=16), 0.5, "l2", export.example_input(32))
    assert pruned(torch.rand(1, 3, 37, 53)).shape == (1, 3, 37, 53)  # odd sizes still come back whole
    assert multiply_adds(pruned, 64) < 0.4 * multiply_adds(MobileStyleNet(channels=16), 64)
    with pytest.raises(ConfigError, match="TransformerNet normalises with instance norm"):
        train(compose_train(tmp_path, content_dir, "prune.amount=0.5"), tmp_path / "bad", {})
    with pytest.raises(ConfigError, match=r"prune.amount=1.0 is not valid"):
        prune_channels(MobileStyleNet(), 1.0, "l2", export.example_input(32))



def test_the_temporal_loss_makes_outputs_follow_motion(tmp_path, content_dir, fresh_store):
    """With only the temporal term left, its value (output of a moved crop against the moved output) falls;
    warping by a zero flow is the identity; a random flow is smooth and bounded by its settings."""
    from stx.engine import temporal

    flows = temporal.random_flows(3, 32, 48, 3.0, 1.0, torch.Generator().manual_seed(0))
    assert flows.shape == (3, 32, 48, 2) and flows.abs().max() < 3 + 3 + 1
    assert (flows[:, :, 1:] - flows[:, :, :-1]).abs().max() < 0.5  # smooth: neighbours move alike
    image = torch.rand(2, 3, 32, 48)
    # float32 grid coordinates are exact to about 47 px × 1.2e-7; random pixels change by up to 1 per px
    assert torch.allclose(temporal.warp_batch(image, torch.zeros(2, 32, 48, 2)), image, atol=1e-5)
    fresh_store(tmp_path)
    off = ["loss.content.score_weight=0", "loss.style.score_weight=0", "loss.tv.score_weight=0"]
    client, run = run_training(tmp_path, content_dir, "stable", *off, "temporal.weight=1", "trainer.steps=30",
                               "trainer.optimizer.lr=0.01")
    values = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "temporal"), key=lambda m: m.step)]
    assert len(values) == 30 and np.mean(values[-5:]) < 0.5 * np.mean(values[:5]), values
    with pytest.raises(ConfigError, match="temporal.shift=-1.0 is not valid"):
        train(compose_train(tmp_path, content_dir, "temporal.shift=-1"), tmp_path / "bad", {})


def test_start_from_needs_a_torchscript_model_of_the_same_architecture(tmp_path):
    onnx = export.OnnxModel(export.export_onnx(MobileStyleNet(channels=8), tmp_path / "m.onnx"))
    with pytest.raises(StxError, match="start_from is an ONNX file, whose weights stx does not read back"):
        start_and_prune(MobileStyleNet(channels=8), onnx, 0.0, "l2")
    wider = export.load_torchscript(export.export_torchscript(MobileStyleNet(channels=16), tmp_path / "m.pt"))
    with pytest.raises(StxError, match=r"start_from is not a model of this config's architecture \(Error"):
        start_and_prune(MobileStyleNet(channels=8), wider, 0.0, "l2")


def test_seeded_draws_are_the_same_in_every_process():
    """Crops and the temporal loss's flows are drawn from data.seeded: a resumed run, a new process
    with its own string-hash salt, draws the same numbers."""
    import subprocess
    import sys

    code = "from stx.fast import data; import torch; print(torch.rand(3, generator=data.seeded(7, 5, -1)).tolist())"
    draws = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": salt}).stdout for salt in ("1", "2")}
    assert len(draws) == 1 and draws == {f"{torch.rand(3, generator=data.seeded(7, 5, -1)).tolist()}\n"}
