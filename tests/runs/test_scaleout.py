"""Scale-out pieces that need no service: the SLURM job tag and a sweep whose store is gone.
(The real PostgreSQL and SLURM tests are in tests/integration.)"""

from conftest import free_port

from stx.runs import layout
from stx.runs.callbacks import MlflowSweepCallback
from stx.runs.liveness import process_tags


def test_runs_record_their_slurm_job(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert layout.TAG_SLURM_JOB not in process_tags()
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    assert process_tags()[layout.TAG_SLURM_JOB] == "41"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert process_tags()[layout.TAG_SLURM_JOB] == "40_1"  # the name scancel and squeue use


def test_sweep_parent_not_closed_when_store_is_gone_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    callback = MlflowSweepCallback()
    callback.uri, callback.parent_run_id, callback.sweep_dir = f"http://127.0.0.1:{free_port()}", "0" * 32, str(tmp_path)
    assert callback.finish(completed=True) is None
    err = capsys.readouterr().err
    assert err.startswith(f"stx: error: the sweep's parent MLflow run {'0' * 32} could not be closed: the tracking store "
                          f"{callback.uri} failed (") and err.count("\n") == 1
    assert callback.finish() is None and capsys.readouterr().err == ""  # once (atexit calls it again)
