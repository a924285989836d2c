"""Multi-layer encoders over torchvision's VGG networks.

Layers carry pystiche-style names: ``conv{block}_{index}``, ``relu{block}_{index}`` and
``pool{block}`` (e.g. ``relu4_2`` is the ReLU after the second convolution of block 4).
An encoder is truncated after the deepest layer it is asked for, so no work is spent on
layers that no loss reads.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from stx.errors import ConfigError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 20.0


def vgg_layer_names(features: nn.Sequential) -> list[str]:
    """Name each module of a VGG ``features`` stack: ``conv1_1, relu1_1, …, pool1, conv2_1, …``."""
    names, block, index = [], 1, 1
    for module in features:
        if isinstance(module, nn.Conv2d):
            names.append(f"conv{block}_{index}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{index}")
            index += 1
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:  # pragma: no cover - torchvision's VGG holds nothing else
            raise TypeError(f"unexpected module {module!r} in a VGG feature stack")
    return names


class MultiLayerEncoder(nn.Module):
    """Runs an image through a stack of named layers and returns the activations asked for.

    Input: a ``B×3×H×W`` float tensor in [0, 1]; ImageNet normalisation is applied inside.
    ``layers`` are all the layers this encoder will ever be asked for: the stack is cut after
    the deepest one, and ReLUs run in place wherever the convolution before them is not read.
    Parameters are frozen (the image is what gets optimised).
    """

    def __init__(self, features: nn.Sequential, names: list[str], layers: Collection[str]) -> None:
        super().__init__()
        self.available = list(names)
        self.layers = frozenset(layers)
        self._check(self.layers)
        depth = max(names.index(layer) for layer in self.layers) + 1
        modules = list(features)[:depth]
        for position, module in enumerate(modules):
            if isinstance(module, nn.ReLU):
                module.inplace = names[position - 1] not in self.layers
        self.names = names[:depth]
        self.features = nn.Sequential(*modules)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def _check(self, layers: Collection[str]) -> None:
        unknown = sorted(set(layers) - set(self.available))
        if unknown:
            raise ConfigError(
                f"unknown encoder layer(s) {', '.join(map(repr, unknown))}; valid layers are: "
                f"{', '.join(self.available)}."
            )
        if not layers:
            raise ConfigError("the encoder was asked for no layers; name at least one, e.g. 'relu4_2'.")

    def forward(self, image: torch.Tensor, layers: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """Return ``{layer: activation}`` for ``layers`` (default: all of this encoder's layers).

        Only the part of the stack up to the deepest requested layer runs.
        """
        wanted = self.layers if layers is None else frozenset(layers)
        if not wanted <= self.layers:
            self._check(wanted)
            raise ConfigError(
                f"layer(s) {sorted(wanted - self.layers)} were not declared when the encoder was "
                f"built (declared: {sorted(self.layers)})."
            )
        out: dict[str, torch.Tensor] = {}
        x = (image - self.mean) / self.std
        for name, module in zip(self.names, self.features):
            x = module(x)
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return out


def _download_timeout(load: Callable[[], nn.Module]) -> nn.Module:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return load()
    finally:
        socket.setdefaulttimeout(previous)


VGG_CONFIGS = {"vgg16": "D", "vgg19": "E"}


def vgg_features(arch: str) -> nn.Sequential:
    """torchvision's ``features`` stack for ``arch`` with torchvision's initialisation scheme.

    Only the convolutional part is built: the classifier (120M parameters) is never used.
    """
    features = models.vgg.make_layers(models.vgg.cfgs[VGG_CONFIGS[arch]])
    for module in features.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(module.bias, 0)
    return features


def _load_imagenet(arch: str) -> nn.Sequential:
    weights = models.get_model_weights(arch).IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return _download_timeout(lambda: models.get_model(arch, weights=weights)).features
    except Exception as exc:  # urllib, socket and hash errors all mean "could not get the file"
        raise WeightsError(
            f"could not load the ImageNet weights for {arch} ({type(exc).__name__}: {exc}). "
            f"torchvision looks for them at {cached} and downloads them from {weights.url} when "
            f"missing. When offline, copy that file there (or set TORCH_HOME), pass a local file "
            f"with encoder.weights=/path/to/{Path(weights.url).name}, or use "
            f"encoder.weights=random for tests."
        ) from exc


def _load_file(arch: str, path: Path) -> nn.Sequential:
    if not path.is_file():
        raise WeightsError(
            f"encoder weights file {str(path)!r} does not exist: give the path of a torchvision "
            f"{arch} state dict (.pth), or use encoder.weights=imagenet or encoder.weights=random."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if any(key.startswith("features.") for key in state):
            state = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        features = vgg_features(arch)
        features.load_state_dict(state)
    except Exception as exc:
        raise WeightsError(
            f"encoder weights file {str(path)!r} could not be loaded as a {arch} state dict "
            f"({type(exc).__name__}: {exc}); give a torchvision {arch} .pth file (whole model or "
            f"its 'features' part)."
        ) from exc
    return features


def _random_features(arch: str, seed: int) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return vgg_features(arch)


def build_vgg(arch: str, layers: Collection[str], *, weights: str, pooling: str, seed: int) -> MultiLayerEncoder:
    """Build a :class:`MultiLayerEncoder` over torchvision's ``vgg16`` or ``vgg19``.

    ``weights``: ``"imagenet"`` (torchvision's IMAGENET1K_V1, cached in the torch hub cache),
    ``"random"`` (torchvision's initialisation under ``seed``; for tests), or a path to a
    ``.pth`` state dict. ``pooling``: ``"max"`` (as trained) or ``"avg"`` (Gatys et al.).
    """
    if pooling not in ("max", "avg"):
        raise ConfigError(f"encoder.pooling={pooling!r} is not valid; use 'max' or 'avg'.")
    if arch not in VGG_CONFIGS:
        raise ConfigError(f"unknown encoder architecture {arch!r}; use one of {', '.join(VGG_CONFIGS)}.")
    if weights == "imagenet":
        features = _load_imagenet(arch)
    elif weights == "random":
        features = _random_features(arch, seed)
    else:
        features = _load_file(arch, Path(weights).expanduser())
    if pooling == "avg":
        features = nn.Sequential(
            *(nn.AvgPool2d(2, 2) if isinstance(m, nn.MaxPool2d) else m for m in features)
        )
    return MultiLayerEncoder(features, vgg_layer_names(features), layers)


def vgg19(layers: Collection[str], *, weights: str, pooling: str, seed: int) -> MultiLayerEncoder:
    """VGG19 encoder (layers ``conv1_1`` … ``pool5``); see :func:`build_vgg`."""
    return build_vgg("vgg19", layers, weights=weights, pooling=pooling, seed=seed)


def vgg16(layers: Collection[str], *, weights: str, pooling: str, seed: int) -> MultiLayerEncoder:
    """VGG16 encoder (layers ``conv1_1`` … ``pool5``); see :func:`build_vgg`."""
    return build_vgg("vgg16", layers, weights=weights, pooling=pooling, seed=seed)
