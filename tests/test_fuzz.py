"""Fuzzing: garbage overrides and image bytes end in a clean, user-facing error; valid but unusual
images (every mode and bit depth Pillow writes, 1×1 to long and thin, below, at and above the
target size) are read into [0, 1] or refused in one paragraph naming the file, and run."""

import numpy as np
import pytest
import torch
from conftest import FAST, Totals
from hydra.errors import HydraException
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from stx.engine import encoders, losses
from stx.engine.image import long_edge_shape, read_image
from stx.engine.inputs import check_encodable
from stx.engine.optim import optimise_image
from stx.errors import ConfigError, ImageError, StxError
from stx.runs.job import build_job, build_schedule
from stx.runs.schema import ASSETS_DIR

KEYS = [
    "schedule.size", "schedule.steps", "schedule.init", "schedule.style_scale", "schedule.optimizer.lr",
    "schedule.checkpoint_every", "loss.style.score_weight", "loss.content.layers.relu4_2", "loss.style.layers",
    "encoder.pooling", "encoder.weights", "device", "precision", "seed", "images.content", "images.styles",
    "images.style_weights", "loss", "schedule", "encoder", "tracking.metrics_every",
]
GROUPS = {"loss", "schedule", "encoder"}
SPECIAL = ["nan", "inf", "-inf", "-1", "0", "1e400", "[1,2]", "[]", "{a: 1}", "null", "''", "${oops}", "${schedule}",
           "relu9_9", "cuda", "cuda:7", "bf16", "avg", "random", "style", "/dev/null", "/", "~", "😀", "a,b"]
VALUES = st.one_of(
    st.integers(-10**9, 10**9).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=10),
    st.sampled_from(SPECIAL),
)


def one_paragraph(message):
    return len(message) > 30 and "\n\n" not in message and "Traceback" not in message


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_garbage_overrides_fail_cleanly(make_cfg, key, value):
    try:
        cfg = make_cfg(*FAST, f"{key}={value}")
    except (HydraException, OmegaConfBaseException) as error:  # stx.cli prints these in its own form
        names = f"{error} {getattr(error, 'override', '')}"  # a parse error keeps the override apart
        assert key in names or (value.startswith("${") and value in names), error
        event("refused by Hydra or OmegaConf")
        return
    except (ValueError, TypeError) as error:  # Hydra's own check that a group is given a name
        assert key in GROUPS, error
        event("refused by Hydra: a group given a number or list")
        return
    try:
        job = build_job(cfg)
    except StxError as error:
        assert one_paragraph(str(error)), error
        event("refused by stx")
        return
    event("built")
    content = job.content
    assert content.shape[:2] == (1, 3) and max(content.shape[-2:]) == job.schedule.size and content.is_contiguous()
    assert torch.isfinite(content).all() and content.min() >= 0 and content.max() <= 1


REAL_PNG = (ASSETS_DIR / "style.png").read_bytes()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=512), st.integers(0, len(REAL_PNG)).map(lambda n: REAL_PNG[:n]),
                      st.binary(min_size=1, max_size=64).map(lambda junk: REAL_PNG[:200] + junk + REAL_PNG[264:])))
def test_garbage_image_bytes_fail_cleanly(tmp_path, data):
    path = tmp_path / "image.png"
    path.write_bytes(data)
    try:
        image = read_image(path, size=32)
    except ImageError as error:
        assert str(path) in str(error) and one_paragraph(str(error))
        return
    assert image.shape[:2] == (1, 3) and max(image.shape[-2:]) == 32
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


FORMATS = {
    "1": ["png", "tif", "bmp", "pbm"],
    "L": ["png", "tif", "jpg", "bmp", "pgm", "tga"],
    "LA": ["png", "tif", "tga", "webp"],
    "P": ["png", "tif", "gif", "bmp", "tga"],
    "PA": ["tif"],
    "RGB": ["png", "tif", "jpg", "webp", "bmp", "ppm", "tga"],
    "RGBA": ["png", "tif", "webp", "tga"],
    "CMYK": ["tif", "jpg"],
    "YCbCr": ["tif"],
    "LAB": ["tif"],
    "I;16": ["png", "tif"],
    "I;16B": ["tif"],
    "I": ["tif", "pgm"],
    "F": ["tif", "pfm"],
}
"""Every mode Pillow opens from files and writes, with formats that keep it (premultiplied La and RGBa,
which Pillow does not write, are tested in tests/engine/test_image.py)."""
MULTI_FRAME = {"png", "tif", "gif", "webp"}
TARGETS = [16, 32, 48]


def pixel_data(mode, width, height, rng, out_of_range):
    """A random ``mode`` image; integer and float images outside stx's range when ``out_of_range``."""
    if mode == "F":
        values = rng.random((height, width), dtype=np.float32)
        return Image.fromarray(3 * values - 1 if out_of_range else values)
    if mode == "I":
        top = 2**31 - 1 if rng.random() < 0.5 else 65536
        return Image.fromarray(rng.integers(-5 if out_of_range else 0, top, (height, width), dtype=np.int32))
    if mode.startswith("I;16"):
        values = rng.integers(0, 65536, (height, width), dtype=np.uint16)
        return Image.frombytes(mode, (width, height), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    if mode == "1":
        return Image.fromarray(rng.random((height, width)) < 0.5)
    bands = Image.getmodebands(mode)
    values = rng.integers(0, 256, (height, width, bands), dtype=np.uint8)
    image = Image.frombytes(mode, (width, height), values.tobytes())
    if mode in ("P", "PA"):
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if rng.random() < 0.3:
            image.info["transparency"] = int(rng.integers(0, 256))
    return image


@st.composite
def unusual_images(draw):
    """``(mode, file name, (H, W), target size, frames, out_of_range, seed)`` of a valid file:
    every mode, sizes from 1×1 to 1×300, below, at and above the target, up to 3 frames;
    ``out_of_range``: an integer or float image with values stx refuses to guess a range for."""
    mode = draw(st.sampled_from(sorted(FORMATS)))
    suffix = draw(st.sampled_from(FORMATS[mode]))
    target = draw(st.sampled_from(TARGETS))
    long_edge = draw(st.one_of(st.just(target), st.integers(1, target - 1), st.integers(target + 1, 300)))
    short_edge = draw(st.one_of(st.just(1), st.just(long_edge), st.integers(1, long_edge)))
    shape = (long_edge, short_edge) if draw(st.booleans()) else (short_edge, long_edge)
    frames = draw(st.integers(1, 3)) if suffix in MULTI_FRAME else 1
    out_of_range = mode in ("F", "I") and draw(st.booleans())
    return mode, f"image.{suffix}", shape, target, frames, out_of_range, draw(st.integers(0, 2**32 - 1))


def write(tmp_path, mode, name, shape, frames, out_of_range, seed):
    """Write the image an :func:`unusual_images` case describes; return its path and whether
    stx must refuse it (integer values below 0, float values outside [0, 1])."""
    rng = np.random.default_rng(seed)
    images = [pixel_data(mode, shape[1], shape[0], rng, out_of_range) for _ in range(frames)]
    path = tmp_path / name
    options = {"save_all": True, "append_images": images[1:]} if frames > 1 else {}
    images[0].save(path, **options, **({"lossless": True} if name.endswith("webp") else {}))
    with Image.open(path) as stored:  # what the file holds: PGM, for one, cannot store negative values
        values = np.asarray(stored) if stored.mode in ("I", "F") else np.zeros(1)
        refused = values.min() < 0 or (stored.mode == "F" and values.max() > 1)
    return path, refused


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=unusual_images())
def test_unusual_valid_images_are_read_into_range(tmp_path, case):
    mode, name, shape, target, frames, out_of_range, seed = case
    path, refused = write(tmp_path, mode, name, shape, frames, out_of_range, seed)
    try:
        image = read_image(path, target)
    except ImageError as error:
        assert refused, error
        assert str(path) in str(error) and one_paragraph(str(error))
        return
    assert not refused
    assert image.shape == (1, 3, *long_edge_shape(*shape, target)) and image.dtype == torch.float32
    assert image.is_contiguous() and torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


@pytest.fixture(scope="module")
def shallow_objective():
    """Content, Gram and TV terms on a random VGG19 cut after relu2_1 (one pooling: 2 px needed)."""
    encoder = encoders.vgg19(["relu1_1", "relu2_1"], weights="random", pooling="max", seed=0)
    return losses.PerceptualObjective(encoder, {
        "content": losses.ContentLoss({"relu2_1": 1.0}),
        "style": losses.GramStyleLoss({"relu1_1": 1.0, "relu2_1": 1.0}),
        "tv": losses.TotalVariationLoss(),
    })


@pytest.fixture
def default_schedules(make_cfg):
    """The shipped default schedule (L-BFGS) for 2 steps at each target size."""
    return {size: build_schedule(make_cfg(f"schedule.size={size}", "schedule.steps=2")) for size in TARGETS}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content_case=unusual_images(), style_case=unusual_images())
@example(content_case=("I;16", "image.png", (30, 48), 48, 1, False, 0), style_case=("P", "image.gif", (300, 20), 48, 3, False, 1))
@example(content_case=("F", "image.tif", (1, 1), 16, 2, False, 2), style_case=("RGBA", "image.webp", (2, 300), 16, 1, False, 3))
def test_unusual_valid_images_optimise_or_are_refused(tmp_path, shallow_objective, default_schedules, content_case,
                                                      style_case):
    """Two L-BFGS steps at the content's target size, or a one-paragraph refusal of an input
    too thin for the encoder at that size."""
    size = content_case[3]
    images = []
    for role, case in (("content", content_case), ("style", style_case)):
        mode, name, shape, _, frames, _, seed = case
        (tmp_path / role).mkdir(exist_ok=True)
        path, _ = write(tmp_path / role, mode, name, shape, frames, False, seed)
        try:
            check_encodable(shallow_objective, f"{role} {str(path)!r}", *long_edge_shape(*shape, size))
        except ConfigError as error:
            assert str(path) in str(error) and one_paragraph(str(error)) and min(long_edge_shape(*shape, size)) < 2
            event("refused: too thin")
            return
        images.append(read_image(path, size))
    content, style = images
    recorder = Totals()
    out = optimise_image(shallow_objective, content=content, styles=[style], style_weights=[1.0],
                         schedule=default_schedules[size], callback=recorder)
    assert out.shape == content.shape and len(recorder.totals) == 2 and all(np.isfinite(recorder.totals))
    event("optimised")
