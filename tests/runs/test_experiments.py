"""The paper presets of conf/experiment/ compose, state their paper, and build a job."""

import pytest
from conftest import options

from stx.runs.job import build_job
from stx.runs.schema import CONF_DIR

PAPERS = {"gatys2016": "CVPR 2016", "li_wand2016": "CVPR 2016", "luminance_transfer": "CVPR 2017",
          "color_histogram": "CVPR 2017", "spatial_control": "CVPR 2017", "wang2021": "CVPR 2021"}


def test_every_preset_names_its_source():
    for name in options("experiment"):
        header = (CONF_DIR / "experiment" / f"{name}.yaml").read_text()
        assert header.startswith("# @package _global_")
        assert PAPERS.get(name, "") in header and f"experiment={name}" in header


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_preset_builds_a_job(make_cfg, name):
    cfg = make_cfg(f"experiment={name}", "encoder.weights=random", "schedule.size=128", "schedule.steps=1")
    job = build_job(cfg)
    assert job.schedule.steps >= 1
    if name == "gatys2016":
        assert cfg.encoder.pooling == "avg" and cfg.schedule.init == "random"
    if name == "luminance_transfer":
        assert (job.content[:, 0] == job.content[:, 1]).all()  # the objective sees grey images
    if name == "wang2021":
        assert job.loss.encoder.softmax == 1.0
