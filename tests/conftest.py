import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from stx import encoders
from stx.config import CONF_DIR

FAST = ["encoder.weights=random", "schedule.size=32", "schedule.steps=2"]


@pytest.fixture(scope="session")
def vgg19_random() -> encoders.MultiLayerEncoder:
    """A randomly initialised VGG19 encoder covering the layers the tests use."""
    layers = ["conv1_1", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"]
    return encoders.vgg19(layers, weights="random", seed=0)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def make_cfg(tmp_path, monkeypatch):
    """Compose stx's config with overrides (compose API), outputs under a temporary runs dir."""
    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))
    GlobalHydra.instance().clear()
