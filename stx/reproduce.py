"""``stx reproduce``: re-run a logged run from what MLflow holds and compare the outputs."""

from __future__ import annotations

import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from stx import layout
from stx.errors import StxError
from stx.runner import JobResult, run_tracked
from stx.schema import runs_dir
from stx.tracking import source_tags

COPIED_TAGS = ("hydra.", layout.TAG_JOB_NUM)


def max_pixel_difference(a: Path, b: Path) -> int:
    """Largest absolute difference between two 8-bit images, in 0…255 (255 if the sizes differ)."""
    with Image.open(a) as first, Image.open(b) as second:
        x, y = np.asarray(first.convert("RGB"), dtype=np.int16), np.asarray(second.convert("RGB"), dtype=np.int16)
    return 255 if x.shape != y.shape else int(np.abs(x - y).max())


def reproduce(run_id: str, uri: str) -> tuple[JobResult, int]:
    """Re-run ``run_id`` as a new run tagged ``reproduced_from``; return it and the max pixel difference."""
    client = MlflowClient(uri)
    try:
        original = client.get_run(run_id)
    except MlflowException as exc:
        raise StxError(f"run {run_id!r} is not in {uri}: give a run id from the MLflow UI or the summary line of stx.") from exc
    then, now = original.data.tags.get(layout.TAG_COMMIT), source_tags().get(layout.TAG_COMMIT)
    tags = {k: v for k, v in original.data.tags.items() if k.startswith(COPIED_TAGS)}
    tags[layout.TAG_REPRODUCED_FROM] = run_id
    if then != now:
        tags[layout.TAG_COMMIT_MISMATCH] = f"{then} -> {now}"
        print(f"stx: warning: run {run_id} was made at commit {then}, this code is at {now}; the result may differ.",
              file=sys.stderr)
    run_dir = Path(runs_dir()) / "reproduce" / run_id / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    cfg = layout.load_run_config(client, run_id, run_dir, runs_dir(), uri)
    result = run_tracked(cfg, run_dir, tags)
    with tempfile.TemporaryDirectory() as downloads:
        original_output = layout.download_artifact(client, run_id, layout.output_names(original)[0], Path(downloads))
        difference = max_pixel_difference(original_output, result.output)
    client.log_metric(result.run_id, "reproduce/max_pixel_diff", difference)
    return result, difference
