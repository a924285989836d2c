"""Fuzzing: garbage override values and image bytes always end in a clean, user-facing error."""

import torch
from conftest import FAST
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from stx.errors import ImageError, StxError
from stx.image import read_image
from stx.job import build_job
from stx.schema import ASSETS_DIR

KEYS = [
    "schedule.size", "schedule.steps", "schedule.init", "schedule.style_scale", "schedule.optimizer.lr",
    "schedule.checkpoint_every", "loss.style.score_weight", "loss.content.layers.relu4_2", "loss.style.layers",
    "encoder.pooling", "encoder.weights", "device", "precision", "seed", "images.content", "images.styles",
    "images.style_weights", "loss", "schedule", "encoder", "tracking.metrics_every",
]
SPECIAL = ["nan", "inf", "-inf", "-1", "0", "1e400", "[1,2]", "[]", "{a: 1}", "null", "''", "${oops}", "${schedule}",
           "relu9_9", "cuda", "cuda:7", "bf16", "avg", "random", "style", "/dev/null", "/", "~", "😀", "a,b"]
VALUES = st.one_of(
    st.integers(-10**9, 10**9).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=10),
    st.sampled_from(SPECIAL),
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_garbage_overrides_fail_cleanly(make_cfg, key, value):
    try:
        cfg = make_cfg(*FAST, f"{key}={value}")
    except (HydraException, OmegaConfBaseException, ValueError):
        return  # composition errors: the stx command prints them as one message (tests/test_cli.py)
    try:
        build_job(cfg)
    except StxError as error:
        message = str(error)
        assert len(message) > 30 and "\n\n" not in message and "Traceback" not in message  # one paragraph


REAL_PNG = (ASSETS_DIR / "style.png").read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=512), st.integers(0, len(REAL_PNG)).map(lambda n: REAL_PNG[:n]),
                      st.binary(min_size=1, max_size=64).map(lambda junk: REAL_PNG[:200] + junk + REAL_PNG[264:])))
def test_garbage_image_bytes_fail_cleanly(tmp_path, data):
    path = tmp_path / "image.png"
    path.write_bytes(data)
    try:
        image = read_image(path, size=32)
    except ImageError as error:
        assert str(path) in str(error)
        return
    assert image.shape[:2] == (1, 3) and max(image.shape[-2:]) == 32
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
