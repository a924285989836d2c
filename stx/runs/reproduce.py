"""``stx reproduce``: re-run a logged run from what MLflow holds and compare the outputs;
``stx promote``: re-run it with changes (a larger size), starting from its output."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from stx.engine.image import MIN_SIZE
from stx.errors import StxError
from stx.runs import layout
from stx.runs.runner import JobResult, run_tracked
from stx.runs.schema import runs_dir
from stx.runs.store import existing_store
from stx.runs.tracking import source_tags

COPIED_TAGS = ("hydra.", layout.TAG_JOB_NUM)


def max_pixel_difference(a: Path, b: Path) -> int:
    """Largest absolute difference between two 8-bit images, in 0…255 (255 if the sizes differ)."""
    with Image.open(a) as first, Image.open(b) as second:
        x, y = np.asarray(first.convert("RGB"), dtype=np.int16), np.asarray(second.convert("RGB"), dtype=np.int16)
    return 255 if x.shape != y.shape else int(np.abs(x - y).max())


def why_different(tags: dict[str, str], difference: int) -> str:
    """What a reproduction's max pixel ``difference`` means for a run with ``tags``, in a sentence ('' when 0)."""
    if difference == 0:
        return ""
    if tags.get(layout.TAG_BATCHED) == "true":
        return (f"the original ran in a batched sweep ({tags.get(layout.TAG_BATCH_SIZE, 'several')} runs at once, tag "
                f"{layout.TAG_BATCHED}), whose batched encoder passes round floats differently from a run alone; the "
                f"difference grows over the L-BFGS steps, so {difference}/255 is rounding, not a change of settings. "
                f"For an exact replay, sweep with hydra/launcher=basic: its runs reproduce to 0/255 on the same machine.")
    return ("the original was not batched, so on the same machine and commit it should reproduce exactly: a "
            "difference comes from another machine's or library's float arithmetic (CPU kind, thread count, "
            "torch version) or from a changed commit (see the warning above, if any).")


def reproduce(run_id: str, uri: str) -> tuple[JobResult, int]:
    """Re-run ``run_id`` as a new run tagged ``reproduced_from``; return it and the max pixel difference."""
    client = existing_store(uri)
    original = layout.find_run(client, run_id)
    if original is None:
        raise StxError(f"run {run_id!r} is not in {uri}: give a run id from the MLflow UI, stx compare or the summary line of stx.")
    run_id = original.info.run_id
    if original.info.status != "FINISHED":
        raise StxError(f"run {run_id} ended {original.info.status}: it has no finished output to compare a reproduction "
                       f"with. Continue it with stx resume={run_id} (when it kept checkpoints), or reproduce a "
                       f"FINISHED run.")
    then, now = original.data.tags.get(layout.TAG_COMMIT), source_tags().get(layout.TAG_COMMIT)
    tags = {k: v for k, v in original.data.tags.items() if k.startswith(COPIED_TAGS)}
    tags[layout.TAG_REPRODUCED_FROM] = run_id
    tags[layout.TAG_RUN_NAME] = f"reproduce of {original.info.run_name or run_id}"[:250]
    if then != now:
        tags[layout.TAG_COMMIT_MISMATCH] = f"{then} -> {now}"
        print(f"stx: warning: run {run_id} was made at commit {then}, this code is at {now}; the result may differ.",
              file=sys.stderr)
    run_dir = Path(runs_dir()) / "reproduce" / run_id / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    cfg = layout.load_run_config(client, run_id, run_dir, runs_dir(), uri)
    with _threads_of(original.data.tags):
        result = run_tracked(cfg, run_dir, tags)
    with tempfile.TemporaryDirectory() as downloads:
        original_output = layout.download_artifact(client, run_id, layout.output_names(original)[0], Path(downloads))
        difference = max_pixel_difference(original_output, result.output)
    client.log_metric(result.run_id, "reproduce/max_pixel_diff", difference)
    return result, difference


@contextmanager
def _threads_of(tags: dict[str, str]) -> Iterator[None]:
    """Run with the CPU thread count an unbatched original ran with (tag ``device.threads``), if it
    fits this machine: the count changes the order of float sums, hence the last bits of a run."""
    import torch

    threads, before = tags.get(layout.TAG_THREADS, ""), torch.get_num_threads()
    replay = tags.get(layout.TAG_BATCHED) != "true" and threads.isdigit() and 0 < int(threads) <= (os.cpu_count() or 1)
    if replay:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def promote(run_id: str, uri: str, overrides: list[str]) -> JobResult:
    """Re-run ``run_id``'s exact config with ``overrides`` (``key=value``, e.g. a larger
    ``schedule.size``), starting from its output image, as a new run tagged ``promoted_from``:
    sweep small, pick the best, render it large."""
    client = existing_store(uri)
    original = layout.find_run(client, run_id)
    if original is None:
        raise StxError(f"run {run_id!r} is not in {uri}: give a run id from the MLflow UI or stx compare.")
    run_id = original.info.run_id
    run_dir = Path(runs_dir()) / "promote" / run_id / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    cfg = layout.load_run_config(client, run_id, run_dir, runs_dir(), uri)
    before = cfg.schedule.size, cfg.schedule.steps
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except (OmegaConfBaseException, ValueError) as exc:
        raise StxError(f"stx promote {run_id} {' '.join(overrides)}: the overrides do not fit the run's config ({str(exc).splitlines()[0]}); "
                       f"give key=value pairs of existing keys, e.g. schedule.size=1024.") from exc
    start = layout.download_artifact(client, run_id, layout.output_names(original)[0], run_dir / "promoted_from",
                                     hint="only a run that finished has an output to start from")
    cfg.schedule.init_image = str(start)
    _follow_size_and_steps(cfg.schedule, *before)
    tags = {k: v for k, v in original.data.tags.items() if k.startswith(COPIED_TAGS) and k != layout.TAG_JOB_NUM}
    tags.update({layout.TAG_PROMOTED_FROM: run_id, layout.TAG_OVERRIDES: " ".join(overrides),
                 layout.TAG_RUN_NAME: f"promote of {original.info.run_name or run_id}: {' '.join(overrides)}"[:250]})
    return run_tracked(cfg, run_dir, tags)


def _follow_size_and_steps(schedule: DictConfig, size: int, steps: int) -> None:
    """The logged config is resolved, so its pyramid levels no longer follow ``schedule.size``
    and ``schedule.steps``: scale each level's size by the new size's ratio, and give the new
    step count to the levels that had the old one."""
    for level in schedule.levels:
        level.size = max(MIN_SIZE, round(level.size * schedule.size / size))
        if level.steps == steps:
            level.steps = schedule.steps
