import pytest
import torch

from stx import encoders


@pytest.fixture(scope="session")
def vgg19_random() -> encoders.MultiLayerEncoder:
    """A randomly initialised VGG19 encoder covering the layers the tests use."""
    layers = ["conv1_1", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"]
    return encoders.vgg19(layers, weights="random", seed=0)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)
