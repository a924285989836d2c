"""Runs logged before a config key existed are reproduced as they ran."""

from omegaconf import OmegaConf

from stx import api, layout
from stx.reproduce import reproduce

from conftest import FAST, client_for, local_uri


def test_a_run_logged_before_new_keys_existed_reproduces_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    run_id = api.run(FAST).run_id
    client = client_for(tmp_path)
    logged = OmegaConf.load(layout.download_artifact(client, run_id, layout.CONFIG, tmp_path / "logged"))
    del logged["color"], logged.schedule["tile"], logged.encoder["softmax"]
    client.log_dict(run_id, OmegaConf.to_container(logged), layout.CONFIG)
    result, difference = reproduce(run_id, local_uri(tmp_path))
    assert difference == 0
    cfg = OmegaConf.load(layout.download_artifact(client, result.run_id, layout.CONFIG, tmp_path / "again"))
    assert cfg.color == layout.LEGACY_VALUES["color"] and cfg.schedule.tile == "off" and cfg.encoder.softmax is None
