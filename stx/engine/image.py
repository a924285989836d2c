"""Image I/O and resizing.

Convention everywhere in stx: an image is a float tensor with values in [0, 1] and shape
``B×3×H×W`` (RGB, batch first). Sizes are given as the length of the *long edge* in pixels.

:func:`read_image` reads every mode Pillow opens: 1-bit, 8-bit grey, palette, RGB, CMYK,
YCbCr and LAB through Pillow's conversion to RGB (Pillow opens 16-bit RGB files as 8-bit RGB);
16-bit grey (``I;16*``) as 0…65535; 32-bit integer grey (``I``, e.g. 16-bit PGM) as 0…65535 when
every value fits, else as 0…2³¹−1; float grey (``F``) as it is, which must lie in [0, 1]. Grey
images are repeated into three channels. Alpha is dropped (a transparent pixel keeps the colour
stored under it) and of a multi-frame file (GIF, APNG, TIFF, WebP, MPO) only the first frame is
read; each is said in one log line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageCms, ImageOps

from stx.errors import ImageError, TooManyPixelsError

log = logging.getLogger(__name__)
_SRGB = ImageCms.createProfile("sRGB")

MIN_SIZE = 16
"""Smallest long edge (px) stx accepts: VGG needs a few pixels left after its pooling layers."""
MAX_SIZE = 8192
"""Largest long edge (px) stx accepts."""
MAX_PIXELS = 16384 * 16384
"""Most pixels (width × height) an input file may have (268 M); larger files are refused
before anything is decoded. Pillow's own decompression-bomb check guards frames and tiles at
twice this."""

FLOAT_RANGE = (
    "stx reads float images as intensities in [0, 1]; rescale it to [0, 1] (no NaN or infinity) "
    "or save it as an 8- or 16-bit image."
)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}
"""Premultiplied-alpha modes and the straight-alpha mode Pillow converts them to."""
WITHOUT_ALPHA = {"LA": "L", "PA": "RGB", "RGBA": "RGB"}


def check_size(size: int, what: str = "image size") -> int:
    """Return ``size`` if it is a possible long-edge length, else raise :class:`ImageError`."""
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ImageError(
            f"{what} {size!r} is impossible: give the long edge in pixels as a whole number "
            f"from {MIN_SIZE} to {MAX_SIZE}."
        )
    return size


@contextlib.contextmanager
def _pillow_pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to ``limit`` (None: off) and its warning silenced:
    stx checks :data:`MAX_PIXELS` itself and says so in its own words."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _unreadable(path: Path, exc: Exception) -> ImageError:
    return ImageError(
        f"image {str(path)!r} could not be read ({exc}): the file is corrupt or not an "
        f"image; give a PNG, JPEG or other format Pillow can read."
    )


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``path`` opened by Pillow, header only, with its pixel count checked against
    :data:`MAX_PIXELS`; loading it inside the block is guarded by Pillow's bomb check."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(
            f"image {str(path)!r} does not exist or is not a file: give the path of a PNG, JPEG "
            f"or other image Pillow can read (relative paths are taken from the directory "
            f"stx was started in)."
        )
    try:
        with _pillow_pixel_limit(None):
            pil = Image.open(path)
    except Exception as exc:  # Pillow's decoders raise many types (SyntaxError, struct.error, …) on bad bytes
        raise _unreadable(path, exc) from exc
    with pil:
        width, height = pil.size
        if width * height > MAX_PIXELS:
            raise TooManyPixelsError(
                f"image {str(path)!r} has {width}×{height} = {width * height:,} pixels, more than stx "
                f"reads ({MAX_PIXELS:,}): downscale the file first, e.g. with ImageMagick's `magick "
                f"{path.name} -resize {MAX_SIZE}x{MAX_SIZE} smaller.png` (stx optimises at most "
                f"{MAX_SIZE} px on the long edge, so nothing is lost)."
            )
        with _pillow_pixel_limit(MAX_PIXELS):
            yield pil


EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)
"""EXIF orientations that turn the stored image by a quarter (phone photos held upright)."""


def _orientation(pil: Image.Image) -> int:
    """The image's EXIF orientation (1: upright), read from its header only (Pillow would decode a
    whole PNG to look for an EXIF chunk after the pixels); 1 for unreadable EXIF data."""
    if pil.format == "PNG" and "exif" not in pil.info:
        return 1
    try:
        return int(pil.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF takes many forms; the pixels are still readable
        return 1


def _shape(pil: Image.Image) -> tuple[int, int]:
    """``(H, W)`` of the image as it is meant to be seen: its EXIF orientation applied."""
    turned = _orientation(pil) in TRANSPOSED_ORIENTATIONS
    return (pil.width, pil.height) if turned else (pil.height, pil.width)


def _upright(pil: Image.Image) -> Image.Image:
    """The loaded image turned and flipped as its EXIF orientation says (itself when upright)."""
    return pil if _orientation(pil) == 1 else ImageOps.exif_transpose(pil)


def image_shape(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file as it is meant to be seen (EXIF orientation applied), from its
    header (nothing is decoded)."""
    with open_image(path) as pil:
        return _shape(pil)


def reduction_factor(long_edge: int, size: int | None) -> int:
    """Whole factor by which :func:`read_image` shrinks a file of ``long_edge`` px before
    resizing it to ``size`` px: as much as keeps at least ``2 × size`` px (1: not at all)."""
    return 1 if size is None else max(1, long_edge // (2 * size))


def _working_image(pil: Image.Image, path: Path) -> tuple[Image.Image, float]:
    """The loaded frame as an 8-bit ``L`` or ``RGB`` image or a float ``F`` image, alpha
    dropped, and the value that stands for 1.0."""
    if pil.mode in SIXTEEN_BIT_MODES:
        return pil.convert("F"), 65535.0
    if pil.mode == "F":
        low, high = pil.getextrema()  # skips NaN, which read_image looks for in the tensor
        if not 0.0 <= low <= high <= 1.0:
            raise ImageError(f"image {str(path)!r} is a float image with values from {low} to {high}: {FLOAT_RANGE}")
        return pil, 1.0
    if pil.mode == "I":
        low, high = pil.getextrema()
        if low < 0:
            raise ImageError(
                f"image {str(path)!r} is a 32-bit integer image with negative values (down to {low}): "
                f"stx reads integer images as intensities from 0; save it as an 8- or 16-bit image."
            )
        return pil.convert("F"), 65535.0 if high <= 65535 else 2.0**31 - 1
    pil.info.pop("transparency", None)  # alpha is dropped; Pillow would warn converting palette transparency
    pil = pil.convert(PREMULTIPLIED[pil.mode]) if pil.mode in PREMULTIPLIED else pil
    pil = pil.convert(WITHOUT_ALPHA[pil.mode]) if pil.mode in WITHOUT_ALPHA else pil
    pil = _to_srgb(pil, path)
    mode = "L" if pil.mode in ("1", "L") else "RGB"
    return (pil if pil.mode == mode else pil.convert(mode)), 255.0


def _to_srgb(pil: Image.Image, path: Path) -> Image.Image:
    """An 8-bit RGB or CMYK image with an embedded ICC profile (Display P3, Adobe RGB, a printer's
    CMYK, …) converted to sRGB, which is what stx's encoders and outputs assume (relative
    colorimetric intent); images without a profile, or tagged sRGB, are taken as they are."""
    icc = pil.info.get("icc_profile")
    if not icc or pil.mode not in ("RGB", "CMYK"):
        return pil
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if pil.mode == "RGB" and "srgb" in ImageCms.getProfileDescription(source).lower().replace(" ", ""):
            return pil
        return ImageCms.profileToProfile(pil, source, _SRGB, renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                         outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        log.warning("image %s: its ICC colour profile could not be read (%s); its colours are taken as sRGB.", path, exc)
        return pil


def _dropped(pil: Image.Image) -> str | None:
    """What :func:`read_image` leaves out of ``pil`` (frames after the first, alpha), in words."""
    parts = []
    frames = getattr(pil, "n_frames", 1)
    if frames > 1:
        parts.append(f"only its first of {frames} frames is used")
    if pil.mode in (*PREMULTIPLIED, *WITHOUT_ALPHA) or "transparency" in pil.info:
        parts.append("its alpha channel is dropped (transparent pixels keep the colour stored under them)")
    return " and ".join(parts) or None


def read_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """Read an image file as a contiguous ``1×3×H×W`` float tensor in [0, 1].

    ``size`` resizes the long edge to that many pixels (aspect ratio kept): files at least
    four times larger are first shrunk by a whole factor (JPEG: decoded at 1/2, 1/4 or 1/8
    scale; others: box-averaged) to no less than ``2 × size``, then resized with antialiased
    bicubic like everything else. Missing, unreadable, too large (:data:`MAX_PIXELS`) and
    non-image files, and float/integer images outside the range above, raise
    :class:`ImageError` naming the path.
    """
    path = Path(path)
    if size is not None:
        check_size(size)
    with open_image(path) as pil:
        shape = _shape(pil)
        try:
            if size is not None:
                height, width = long_edge_shape(pil.height, pil.width, 2 * size)
                pil.draft(None, (width, height))  # JPEG only; a no-op for other formats
            dropped = _dropped(pil)
            pil.load()
            working, one = _working_image(_upright(pil), path)
            factor = reduction_factor(max(working.size), size)
            if factor > 1:
                working = working.reduce(factor)
            image = _to_tensor(working).unsqueeze(0).to(torch.float32, memory_format=torch.contiguous_format)
        except ImageError:
            raise
        except Exception as exc:
            raise _unreadable(path, exc) from exc
    if working.mode == "F" and image.isnan().any():
        raise ImageError(f"image {str(path)!r} is a float image holding NaN values: {FLOAT_RANGE}")
    if dropped:
        log.warning("image %s: %s.", path, dropped)
    image.div_(one)
    if size is not None:
        image = resize_to(image, long_edge_shape(*shape, size))
    return image.expand(-1, 3, -1, -1).contiguous()


def _to_tensor(pil: Image.Image) -> torch.Tensor:
    """A Pillow image as a ``C×H×W`` tensor of its own dtype (uint8, uint16, int32 or float32)."""
    array = np.array(pil, copy=True)
    return torch.from_numpy(array.reshape(pil.height, pil.width, -1)).permute(2, 0, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    """The first image of a ``B×3×H×W`` tensor in [0, 1] as an 8-bit RGB Pillow image (values
    × 255, truncated, as torchvision's ``to_pil_image``)."""
    pixels = image[0].detach().float().clamp(0.0, 1.0).cpu().mul(255).byte()
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())


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
    """Resize a ``B×C×H×W`` image so its long edge is ``size`` pixels (bicubic, antialiased)."""
    check_size(size)
    return resize_to(image, long_edge_shape(image.shape[-2], image.shape[-1], size))


def read_mask(path: str | Path, shape: tuple[int, int]) -> torch.Tensor:
    """Read a mask image as a ``1×1×H×W`` float tensor in [0, 1] at ``shape = (H, W)``: the mean
    of its RGB channels (white: inside, black: outside, grey: partly). Errors as :func:`read_image`."""
    return resize_to(read_image(path, max(shape)), shape).mean(dim=1, keepdim=True)


def resize_mask(mask: torch.Tensor, shape: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resize a ``B×1×H×W`` mask to ``shape`` by area averaging (a pooling layer's footprint)."""
    shape = tuple(shape)
    return mask if shape == tuple(mask.shape[-2:]) else F.interpolate(mask, size=shape, mode="area")


def resize_to(image: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Resize a ``B×C×H×W`` image in [0, 1] to ``shape = (H, W)`` (bicubic, antialiased)."""
    if shape == tuple(image.shape[-2:]):
        return image
    resized = F.interpolate(image, size=shape, mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp_(0.0, 1.0)
