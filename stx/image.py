"""Image I/O and resizing.

Convention everywhere in stx: an image is a float tensor with values in [0, 1] and shape
``B×3×H×W`` (RGB, batch first). Sizes are given as the length of the *long edge* in pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from stx.errors import ImageError

MIN_SIZE = 16
"""Smallest long edge (px) stx accepts: VGG needs a few pixels left after its pooling layers."""
MAX_SIZE = 8192
"""Largest long edge (px) stx accepts."""


def check_size(size: int, what: str = "image size") -> int:
    """Return ``size`` if it is a possible long-edge length, else raise :class:`ImageError`."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ImageError(
            f"{what} {size!r} is impossible: give the long edge in pixels as a whole number "
            f"from {MIN_SIZE} to {MAX_SIZE}."
        )
    return size


def read_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read an image file as a ``1×3×H×W`` float tensor in [0, 1].

    ``size`` resizes the long edge to that many pixels (aspect ratio kept). Missing,
    unreadable and non-image files raise :class:`ImageError` naming the path.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(
            f"image {str(path)!r} does not exist or is not a file: give the path of a PNG, JPEG "
            f"or other image Pillow can read (relative paths are taken from the directory "
            f"stx was started in)."
        )
    try:
        with Image.open(path) as pil:
            pil = pil.convert("RGB")
    except Exception as exc:  # Pillow's decoders raise many types (SyntaxError, struct.error, …) on bad bytes
        raise ImageError(
            f"image {str(path)!r} could not be read ({exc}): the file is corrupt or not an "
            f"image; give a PNG, JPEG or other format Pillow can read."
        ) from exc
    image = pil_to_tensor(pil).unsqueeze(0).float().div_(255.0)
    return image if size is None else resize(image, size)


def to_pil(image: torch.Tensor) -> Image.Image:
    """The first image of a ``B×3×H×W`` tensor in [0, 1] as an 8-bit RGB Pillow image."""
    return to_pil_image(image[0].detach().float().clamp(0.0, 1.0).cpu())


def write_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write the first image of a ``B×3×H×W`` tensor in [0, 1] to ``path`` (format from suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path)
    return path


def long_edge_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Return ``(H, W)`` scaled so that the long edge is ``size`` pixels (aspect ratio kept)."""
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a ``B×3×H×W`` image so its long edge is ``size`` pixels (bicubic, antialiased)."""
    check_size(size)
    shape = long_edge_shape(image.shape[-2], image.shape[-1], size)
    if shape == tuple(image.shape[-2:]):
        return image
    resized = F.interpolate(image, size=shape, mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp_(0.0, 1.0)
