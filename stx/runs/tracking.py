"""MLflow tracking of stx jobs.

One stx job is one MLflow run holding: the resolved config flattened into params (and whole,
as ``config.yaml``), Hydra's overrides and group choices, the git commit, library versions
and device as tags, every loss term per step as metrics (buffered and written with one
``log_batch`` call every few seconds, so tracking costs well under 3% of run time; also
appended to ``metrics.csv`` in the run dir), the image
every ``image_every`` steps (``mlflow.log_image``, with the UI's step slider), the final
image, the input images, Hydra's ``.hydra/`` folder and the job's log, and the host, pid and a
heartbeat that tell a live run from one whose process was killed (see :mod:`stx.runs.liveness`).
"""

from __future__ import annotations

import csv
import logging
import platform
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from omegaconf import DictConfig, OmegaConf

from stx.errors import ConfigError, StoreFailure, TrackingError, first_line
from stx.runs import layout, startup, store_process
from stx.runs.liveness import heartbeat, process_tags

if TYPE_CHECKING:  # torch loads with the job, not with a sweep's parent (whose jobs may run elsewhere)
    import torch

    from stx.engine.optim import StepInfo
    from stx.runs.store import MetricPoint

SOURCE_DIR = Path(__file__).resolve().parents[2]
LOCKED_RETRY_S = (1.0, 2.0, 4.0)
"""Waits before retrying a call that a local sqlite store refused as locked (another process was
writing longer than sqlite's own 5 s wait, e.g. on a loaded machine); then it counts as failed."""
METRICS_COLUMNS = ("step", "key", "value", "timestamp_ms")
VERSIONED = ("stx", "torch", "torchvision", "hydra-core", "omegaconf", "mlflow", "pillow")


log = logging.getLogger(__name__)


def tracking_uri(tracking: DictConfig) -> str:
    """The tracking URI from the config; a server URI must answer its health check. (A local
    sqlite store is created when it is first opened: :func:`stx.runs.store.opened`.)"""
    uri = tracking.uri
    if not uri:
        raise TrackingError(
            "tracking=server needs the server's address: set MLFLOW_TRACKING_URI (e.g. "
            "http://127.0.0.1:5000) or tracking.uri=…, or use tracking=local for the embedded store."
        )
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5):
                pass
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"the MLflow server at {uri} does not answer ({exc}); start it (mlflow server "
                f"--host 127.0.0.1 --port …) or fix tracking.uri / MLFLOW_TRACKING_URI."
            ) from exc
    return uri


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` → ``{"a.b.0": 1}``."""
    if isinstance(node, Mapping):
        items = node.items()
    elif isinstance(node, (list, tuple)):
        items = enumerate(node)
    else:
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _git(*args: str) -> str | None:
    try:
        result = subprocess.run(["git", *args], cwd=SOURCE_DIR, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """Git commit (and whether the tree had local changes), library and Python versions."""
    tags = {f"version.{name}": _version(name) for name in VERSIONED}
    tags["version.python"] = platform.python_version()
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[layout.TAG_COMMIT] = commit
        tags["stx.git.dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    return tags


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def device_tags(device: torch.device) -> dict[str, str]:
    """The device a run computes on: its name, and on a CPU the thread count in effect."""
    import torch

    tags = {"device": str(device)}
    if device.type == "cuda":
        tags["device.name"] = torch.cuda.get_device_name(device)
    else:
        tags[layout.TAG_THREADS] = str(torch.get_num_threads())
    return tags


def hydra_tags(hydra_cfg: DictConfig) -> dict[str, str]:
    """The command-line overrides and the config group choices."""
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)  # "k=${x}" stays text
    tags = {layout.TAG_OVERRIDES: " ".join(overrides)}
    for group, choice in hydra_cfg.runtime.choices.items():
        if not group.startswith("hydra/") and choice is not None:
            tags[f"{layout.TAG_CHOICE}{group}"] = str(choice)
    # a run of the user's own images is not tagged as the option whose images it replaced
    own = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").startswith(("images.content", "images.styles"))]
    if own and f"{layout.TAG_CHOICE}images" in tags:
        tags[f"{layout.TAG_CHOICE}images"] = f"{tags[f'{layout.TAG_CHOICE}images']} with {' '.join(own)}"
    return tags


class Store(Protocol):
    """The store a job logs to: :class:`stx.runs.store.JobStore`, here or in the helper process."""

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any: ...


def open_ahead(tracking: DictConfig) -> None:
    """Have the helper process (if this job logs through one) open the store of ``tracking`` while
    the job is built: creating a new local store takes seconds."""
    helper = store_process.started()
    if helper is not None and "mlflow" not in sys.modules and tracking.uri:
        helper.open_ahead(tracking.uri)


def store_for(uri: str) -> Store:
    """The store at ``uri``, called through the helper process when ``stx`` started one and MLflow is
    not loaded here (:mod:`stx.runs.store_process`), else in this process (a launcher's worker process,
    a resumed run, stx used as a library)."""
    helper = store_process.started()
    if helper is not None and "mlflow" not in sys.modules:
        return store_process.RemoteStore(helper, uri)
    with startup.heavy_imports():
        from stx.runs.store import JobStore

    return JobStore(uri)


class RunTracker:
    """Logs one job to the MLflow run it opens; use :meth:`open` as a context manager around the work.

    Every call to the store goes through :meth:`_store`: the first one that fails raises a
    :class:`TrackingError` naming the store, and every later one is skipped. Metric points are
    also appended to ``metrics.csv`` in ``run_dir`` before they are sent, so a failing store
    loses none of them.
    """

    def __init__(self, tracking: DictConfig, run_dir: Path) -> None:
        self.uri = tracking_uri(tracking)
        self.metrics_every = max(1, int(tracking.metrics_every))
        self.image_every = int(tracking.image_every)
        self.flush_seconds = float(tracking.flush_seconds)
        if not 0 <= self.flush_seconds < float("inf"):
            raise ConfigError(f"tracking.flush_seconds={tracking.flush_seconds} is not valid: use a number of seconds >= 0 "
                              f"(0 writes the metrics at every step).")
        self.system_metrics = bool(tracking.system_metrics)
        self.metrics_file = run_dir / layout.METRICS_FILE
        self.failure: TrackingError | None = None
        self.store = store_for(self.uri)
        self.experiment_id = self._store("opening the experiment", "experiment", tracking.experiment,
                                         tracking.artifact_location)
        self._store("closing runs whose process is gone", "close_dead_runs", self.experiment_id)
        self.last_image_step = -1
        self.run_id: str | None = None
        self.pending: list[MetricPoint] = []
        """Metric points to write at the next flush: key, value, unix time in ms, step."""
        self.logged_through: dict[str, int] = {}
        """Per metric key, the last step a reopened run had logged (its steps up to it are skipped)."""
        self.last_flush = time.monotonic()

    def _store(self, doing: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """The store's ``method(*args, **kwargs)`` (:class:`~stx.runs.store.JobStore`); None
        (skipped) once the store has failed."""
        if self.failure is not None:
            return None
        for wait in (*LOCKED_RETRY_S, None):
            try:
                return self.store.call(method, *args, **kwargs)
            except StoreFailure as exc:
                if wait is not None and "database is locked" in str(exc):  # sqlite: another writer, for now
                    time.sleep(wait)
                    continue
                self.failure = TrackingError(f"the MLflow tracking store {self.uri} failed while {doing}: {first_line(exc)}")
                raise self.failure from exc

    @contextmanager
    def open(
        self,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        run_id: str | None = None,
        log_file: Path | None = None,
    ) -> Iterator[str]:
        """Start a run (or reopen ``run_id``), tagged with ``tags`` and this process's host, pid
        and heartbeat; end it FINISHED, FAILED (tag ``stx.error``) or KILLED (interrupt), with
        ``log_file`` logged in every case. A store failure while closing a run that failed for
        another reason is logged, and that reason is raised."""
        tags = {**tags, **process_tags()}
        if run_id is None:
            if parent_run_id is not None:
                tags[layout.TAG_PARENT] = parent_run_id
            self.run_id = self._store("starting the run", "start_run", self.experiment_id,
                                      tags.get(layout.TAG_RUN_NAME), tags)
        else:
            self.logged_through = self._store("reopening the run", "reopen_run", run_id, tags)
            self.run_id = run_id
        sampler = None
        if self.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            sampler = SystemMetricsMonitor(self.run_id, resume_logging=run_id is not None, tracking_uri=self.uri)
            sampler.start()
        try:
            yield self.run_id
        except BaseException as exc:
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            status = "KILLED" if interrupted else "FAILED"
            try:
                self._close(status, "interrupted" if interrupted else f"{type(exc).__name__}: {exc}"[:5000], log_file)
            except TrackingError as failure:
                log.error("%s", failure)
            raise
        finally:
            if sampler is not None:
                sampler.finish()
        self._close("FINISHED", None, log_file)

    def _close(self, status: str, error: str | None, log_file: Path | None) -> None:
        self.flush()
        if error is not None:
            self._store("tagging the error", "set_tag", self.run_id, layout.TAG_ERROR, error)
        if log_file is not None and log_file.is_file():
            self._store("logging the job's log", "log_artifact", self.run_id, str(log_file))
        self._store("closing the run", "end_run", self.run_id, status)

    def log_config(self, cfg: DictConfig, run_dir: Path, tags: Mapping[str, str] | None = None) -> None:
        """Params (the flattened resolved config, and each config group's choice from the
        ``hydra.choice.<group>`` ``tags`` as ``choice/<group>``, e.g. ``choice/color=luminance``),
        ``config.yaml`` and the ``.hydra/`` folder."""
        resolved = OmegaConf.to_container(cfg, resolve=True)
        params = {key: str(value) for key, value in flatten(resolved).items()}
        params.update({f"choice/{group}": choice for group, choice in layout.choices(tags or {}).items()})
        self._store("logging the config", "log_batch", self.run_id, params=params)
        self._store("logging the config", "log_dict", self.run_id, resolved, layout.CONFIG)
        if (run_dir / ".hydra").is_dir():
            self._store("logging the config", "log_artifacts", self.run_id, str(run_dir / ".hydra"), layout.HYDRA)

    def log_inputs(self, content: Path, styles: list[Path], init: Path | None = None) -> None:
        """Log the input images (and the start image, ``schedule.init_image``), which a reproduction reads."""
        self._store("logging the inputs", "log_artifact", self.run_id, str(content), layout.content_dir())
        for index, style in enumerate(styles):
            self._store("logging the inputs", "log_artifact", self.run_id, str(style), layout.style_dir(index))
        if init is not None:
            self._store("logging the inputs", "log_artifact", self.run_id, str(init), layout.init_dir())

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """Log the file ``path`` as an artifact (under ``folder``)."""
        self._store("logging an artifact", "log_artifact", self.run_id, str(path), folder)

    def log_step(self, info: StepInfo) -> None:
        """The image every ``image_every`` steps; loss terms every ``metrics_every`` steps, buffered
        and flushed every ``tracking.flush_seconds``. Steps a reopened run had logged are skipped."""
        if self.image_every > 0 and info.step % self.image_every == 0 and info.step > max(self.logged_through.values(), default=-1):
            self.log_image(info.image, info.step)
        if info.step % self.metrics_every == 0:
            self.log_metrics(info.values, info.step)
        if time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        """Buffer ``{key: value}`` at ``step`` (written at the next flush); steps a reopened run had
        logged are skipped."""
        timestamp = int(time.time() * 1000)
        self.pending.extend((key, value, timestamp, step) for key, value in values.items()
                            if step > self.logged_through.get(key, -1))

    def flush(self) -> None:
        """Append the buffered metrics to ``metrics.csv``, then write them and a fresh heartbeat
        to the store in one batch."""
        metrics, self.pending = self.pending, []
        self.last_flush = time.monotonic()
        if metrics:
            new = not self.metrics_file.exists()
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_file.open("a", newline="") as file:
                writer = csv.writer(file)
                if new:
                    writer.writerow(METRICS_COLUMNS)
                writer.writerows((step, key, repr(value), timestamp) for key, value, timestamp, step in metrics)
        if self.run_id is not None:
            self._store("logging metrics", "log_batch", self.run_id, metrics=metrics, tags=heartbeat())

    def log_image(self, image: torch.Tensor, step: int) -> None:
        from stx.engine.image import to_pil

        self._store("logging the image", "log_image", self.run_id, to_pil(image), layout.IMAGE_KEY, step)
        self.last_image_step = step

    def log_output(self, image: torch.Tensor, path: Path, step: int) -> None:
        """The final image: as the last point of the image series and as a file artifact."""
        if self.last_image_step != step:
            self.log_image(image, step)
        self._store("logging the output", "log_artifact", self.run_id, str(path))

    def describe(self, output: Path, scores: Mapping[str, float]) -> None:
        """The run's description (``mlflow.note.content``, which the UI shows on the run's page):
        its quality metrics and its output image, the artifact ``output.name``."""
        metrics = ", ".join(f"{name.replace('_', ' ')} {value:.4g}" for name, value in scores.items())
        image = f"get-artifact?path={urllib.parse.quote(output.name)}&run_uuid={self.run_id}"  # the UI's own route
        self._store("describing the run", "describe", self.run_id, f"**{output.name}**: {metrics}\n\n![{output.name}]({image})")

    def log_checkpoint(self, path: Path, step: int) -> None:
        """The metrics so far, then the latest checkpoint file (replacing the previous one) and its
        step as a tag: a run resumed from it has every step up to it logged."""
        self.flush()
        self._store("logging the checkpoint", "log_artifact", self.run_id, str(path), layout.CHECKPOINT_DIR)
        self._store("logging the checkpoint", "set_tag", self.run_id, layout.TAG_CHECKPOINT_STEP, str(step))
