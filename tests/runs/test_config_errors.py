"""Command-line config mistakes (typo'd keys, unknown options, bad values) in stx's one-paragraph form."""

from pathlib import Path

import pytest
from conftest import FAST, options
from hydra.errors import HydraException

from stx.cli import config_error_message
from stx.errors import ConfigError
from stx.runs.job import build_job


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.sytle=1", "loss.sytle is not a config key. Did you mean loss.style? Keys under loss: content, style. "
                         "To add a new key there instead, write +loss.sytle=…"),
        ("schedule.stpes=2", "schedule.stpes is not a config key. Did you mean schedule.steps? Keys under schedule: "
                             "bounds, checkpoint_every, cuda_graph, init, init_image, levels, max_rise, optimizer, size, steps, style_scale, tile."),
        ("loss.style.layerz.relu1_1=1", "loss.style.layerz is not a config key. Did you mean loss.style.layers? "
                                        "Keys under loss.style: _target_, layers, normalize_gradients, relative, score_weight. "
                                        "To add a new key there instead, write +loss.style.layerz=…"),
        ("sed=1", "sed is not a config key. Did you mean seed? Keys at the top level: color, device, encoder, hydra, images, judge, "
                  "loss, objective, output, precision, resume, runs_dir, schedule, seed, tracking."),
        ("loss.style.score_weight.x=1", "loss.style.score_weight.x is not a config key: loss.style.score_weight is a "
                                        "value, with no keys under it."),
        ("loss.style.layers.relu1_1=0.5", "loss.style.layers.relu1_1 cannot be set alone: loss.style.layers is the "
                                          "encoder's layer set it reads (${encoder.layers.content}, style or patch; "
                                          "`stx --cfg job` shows which). Set the weight there, e.g. "
                                          "encoder.layers.style.relu1_1=…, or replace the whole set: "
                                          "'loss.style.layers={relu1_1: …}'."),
        ("images.styles=photo.png", "images.styles=photo.png is not valid: Invalid value assigned: str is not a "
                                    "ListConfig, list or tuple. It takes a list: 'images.styles=[photo.png]' (quoted for the shell)."),
        ("images.content=~/me.jpg", f"cannot parse the override 'images.content=~/me.jpg': the shell does not expand ~ "
                                    f"after '=', and Hydra reads ~ as its delete operator; write the path out: "
                                    f"images.content={Path('~/me.jpg').expanduser()}."),
        ("loss=gatyss", "loss=gatyss is not an option of loss. Did you mean gatys or gatys_tv? Options: "
                        f"{', '.join(options('loss'))}."),
        ("schedule=_bse", "schedule=_bse is not an option of schedule. Options: adam, lbfgs, pyramid."),  # _base is shared
        ("hydra/launcher=jobib", "hydra/launcher=jobib is not an option of hydra/launcher. Did you mean joblib? Options: "
                                 "basic, joblib, stx_batched, stx_slurm, submitit_local, submitit_slurm."),
        ("schedule.steps=many", "schedule.steps=many is not valid: Value 'many' of type 'str' could not be converted to Integer."),
        ("loss.style.score_weight=1e3,", "cannot parse the override 'loss.style.score_weight=1e3,': mismatched input '<EOF>'"),
    ],
)
def test_composition_errors_name_the_key_or_option_and_the_valid_ones(make_cfg, override, message):
    with pytest.raises(HydraException) as error:
        make_cfg(override)
    text = config_error_message(error.value)
    assert text.startswith(message)
    assert "\n" not in text and "full_key" not in text and "search path" not in text


@pytest.mark.parametrize("output", ["sub/result.png", "/tmp/result.png", "result", "result.txt"])
def test_output_must_be_an_image_file_name(make_cfg, output):
    with pytest.raises(ConfigError, match=rf"output='{output}' is not valid: .*; e.g. output=result.png."):
        build_job(make_cfg(*FAST, f"output={output}"))


def test_a_url_as_an_image_is_named_as_such(make_cfg):
    with pytest.raises(ConfigError, match=r"images.styles.0='https://example.org/a.jpg' is a URL; stx reads image files"):
        build_job(make_cfg("encoder.weights=random", "judge.weights=random", "images.styles=[https://example.org/a.jpg]"))


def test_a_small_content_is_upscaled_with_a_warning(make_cfg, tmp_path, caplog):
    from PIL import Image

    Image.new("RGB", (20, 20), "red").save(tmp_path / "tiny.png")
    build_job(make_cfg("encoder.weights=random", "judge.weights=random", f"images.content={tmp_path / 'tiny.png'}",
                       "schedule.size=64"))
    assert "images.content is 20×20 px; it is upscaled to a 64 px long edge" in caplog.text
