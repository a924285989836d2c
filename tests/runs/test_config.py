"""Compose-API tests of every config group option, and start-up validation."""

import pytest
import torch
from conftest import FAST, STYLE, options
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from stx.engine import losses
from stx.errors import StxError
from stx.runs.job import build_job


def test_defaults_compose_to_gatys_on_vgg19(make_cfg, tmp_path):
    cfg = make_cfg()
    assert cfg.encoder._target_ == "stx.engine.encoders.vgg19" and cfg.encoder.weights == "auto"
    assert set(cfg.loss) == {"content", "style"}
    assert cfg.tracking.uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert OmegaConf.to_container(cfg.schedule.levels, resolve=True) == [{"size": 256, "steps": 200}]


@pytest.mark.parametrize("choice", options("encoder"))
def test_encoder_options(make_cfg, choice):
    """Every encoder runs with the default loss alone: it reads the layers the encoder option names."""
    job = build_job(make_cfg(f"encoder={choice}", *FAST, "schedule.size=48"))
    last = {"resnet50": "layer4_2", "efficientnet_b0": "head_conv", "mobilenet_v2": "head_conv"}.get(choice, "pool5")
    assert job.loss.encoder.available[-1] == last
    assert ("relu5_4" in job.loss.encoder.available) == (choice == "vgg19")
    cfg = make_cfg(f"encoder={choice}")
    assert job.loss.losses["style"].layer_weights == cfg.encoder.layers.style
    assert job.loss.losses["content"].layer_weights == cfg.encoder.layers.content
    mrf = build_job(make_cfg(f"encoder={choice}", "loss=mrf", *FAST, "schedule.size=96"))
    assert mrf.loss.losses["style"].layer_weights == cfg.encoder.layers.patch


@pytest.mark.parametrize("choice", options("loss"))
def test_loss_options(make_cfg, choice):
    job = build_job(make_cfg(f"loss={choice}", *FAST, "schedule.size=48"))  # MRF's 3×3 patches at relu4_1 need 24 px
    assert all(isinstance(term, losses.Loss) for term in job.loss.losses.values())
    expected = {"gatys": {"content", "style"}, "gatys_tv": {"content", "style", "tv"}, "mrf": {"content", "style", "tv"},
                "johnson": {"content", "style", "tv"},
                **dict.fromkeys(("meanstd", "wasserstein", "guided"), {"content", "style"})}
    assert set(job.loss.losses) == expected[choice]


@pytest.mark.parametrize("choice", options("schedule"))
def test_schedule_options(make_cfg, choice):
    job = build_job(make_cfg(f"schedule={choice}", "encoder.weights=random", "schedule.size=64", "schedule.steps=3"))
    sizes = [level.size for level in job.schedule.levels]
    assert sizes == ([32, 64] if choice == "pyramid" else [64])
    assert all(level.steps == 3 for level in job.schedule.levels)
    assert isinstance(job.schedule.make_optimizer([torch.zeros(1, requires_grad=True)]), torch.optim.Optimizer)


def test_images_option_and_blend_weights(make_cfg, tmp_path):
    assert options("images") == ["sample"]
    style = str(STYLE)
    job = build_job(make_cfg(*FAST, f"images.styles=[{style},{style}]", "images.style_weights=[3,1]"))
    assert job.style_weights == [3.0, 1.0] and len(job.styles) == 2
    assert job.content.shape == (1, 3, 21, 32)  # 451×300 sample, long edge 32


@pytest.mark.parametrize("choice", options("tracking"))
def test_tracking_options(make_cfg, choice, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    cfg = make_cfg(f"tracking={choice}")
    assert cfg.tracking.uri.startswith("sqlite:///" if choice == "local" else "http://127.0.0.1:5999")


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.sytle=1", "Could not override 'loss.sytle'"),
        ("schedule.stpes=10", "Could not override 'schedule.stpes'"),
        ("loss=gatyss", "Could not find 'loss/gatyss'"),
        ("schedule.steps=many", "schedule.steps"),
    ],
)
def test_typos_fail_at_composition(make_cfg, override, message):
    with pytest.raises(ConfigCompositionException, match=message):
        make_cfg(override)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["loss.style.score_weight=-1"], r"loss.style: score_weight=-1.0 is not valid"),
        (["encoder.layers.style.relu1_1=nan"], r"layer weight relu1_1=nan is not valid"),
        (["images.styles=[[a,b]]"], r"images.styles.0=\['a', 'b'\] is not valid: give the path of an image file"),
        (["images.styles=[{_target_:os.system,command:ls}]"], r"images.styles.0=\{'_target_': 'os.system'.* is not valid"),
        (["+loss.content.layers.relu9_1=1.0"], r"unknown encoder layer\(s\) 'relu9_1'; valid layers are: conv1_1"),
        (["schedule.size=4"], r"pyramid level size 4 is impossible"),
        (["schedule.steps=-3"], r"steps=-3 is not valid"),
        (["schedule.optimizer.lr=-0.5"], r"schedule.optimizer is not valid: lr=-0.5 is not valid: use a number > 0"),
        (["schedule.init=noise"], r"schedule.init='noise' is not valid"),
        (["device=cuda:3"], r"device='cuda:3' was asked for, but this machine has 0 CUDA"),
        (["device=tpu"], r"device='tpu' is not"),
        (["precision=fp16"], r"precision=fp16 uses CUDA autocast"),
        (["precision=fp8"], r"precision='fp8' is not valid"),
        (["images.content=nowhere.png"], r"image '.*nowhere.png' does not exist"),
        (["images.style_weights=[1,2]"], r"style_weights has 2 value\(s\) for 1 style"),
        (["images.style_weights=[-1]"], r"style_weights=\[-1.0\] is not valid"),
        (["+loss.evil={_target_: os.system, command: 'echo hi'}"], r"loss.evil._target_='os.system' is not allowed: it must name a stx.engine.losses.Loss"),
        (["schedule.optimizer._target_=builtins.eval"], r"is not allowed: it must name a torch.optim.optimizer.Optimizer"),
        (["+loss.style.layers.relu1_2={_target_: os.system, command: 'echo hi'}"], r"loss.style.layers holds a nested _target_"),
        (["+schedule.optimizer.betas=[{_target_: os.getcwd}, 0.9]"], r"schedule.optimizer.betas holds a nested _target_"),
        (["encoder._target_=torchvision.models.resnet18"], r"is not allowed: it must name an encoder from stx.engine.encoders"),
        (["encoder._target_=stx.engine.encoders.torch.load"], r"is not an encoder from stx.engine.encoders"),
        (["loss.style._target_=this.x"], r"loss.style._target_='this.x' is not allowed"),
        (["encoder.pooling=min"], r"pooling='min' is not valid"),
    ],
)
def test_bad_values_fail_before_work(make_cfg, overrides, message):
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(StxError, match=message):
        build_job(make_cfg(*FAST, *overrides))


def test_size_that_cannot_fit_is_refused_with_the_estimate(make_cfg):
    with pytest.raises(StxError, match=r"schedule size 8192 px needs about \d+\.\d GiB on cpu \(image and optimiser .*encoder activations .*MRF patches and similarities .*\), but only"):
        build_job(make_cfg("loss=mrf", "encoder.weights=random", "schedule.size=8192"))


def test_memory_estimate_counts_vgg_activations(make_cfg):
    from stx.engine import plan

    job = build_job(make_cfg(*FAST))
    shapes = list(job.loss.encoder.layer_shapes(64, 96).values())
    assert shapes[0] == (64, 64, 96) and shapes[job.loss.encoder.names.index("pool1")] == (64, 32, 48)
    assert shapes[-1] == (512, 4, 6)  # relu5_1, after four poolings
    estimate = plan.estimate_bytes(job.loss, 64, 96, optimizer_state_images=2, styles=1)
    assert estimate["encoder activations"] == round(1.25 * 4 * sum(c * h * w for c, h, w in shapes))
    assert estimate["image and optimiser"] == 4 * 3 * 64 * 96 * 4
