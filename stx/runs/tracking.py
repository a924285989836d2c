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
import fcntl
import json
import logging
import platform
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch
from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE
from omegaconf import DictConfig, OmegaConf

from stx.engine.image import to_pil
from stx.engine.optim import StepInfo
from stx.errors import StxError, first_line
from stx.runs import layout
from stx.runs.liveness import DEAD_AFTER_S, close_dead_runs, dead_reason, heartbeat, process_tags

SOURCE_DIR = Path(__file__).resolve().parents[2]
FLUSH_EVERY_S = 5.0
LOCKED_RETRY_S = (1.0, 2.0, 4.0)
"""Waits before retrying a call that a local sqlite store refused as locked (another process was
writing longer than sqlite's own 5 s wait, e.g. on a loaded machine); then it counts as failed."""
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Makes MLflow 3's UI open the experiment on its runs table rather than the GenAI overview."""
VIEW_KEY = "stx"
"""The view of the runs table stx keeps on each experiment, MLflow's shared view state (the experiment tag
``mlflow.sharedViewState.stx``, opened by ``…/#/experiments/<id>/runs?viewStateShareKey=stx``, the
link ``stx ui`` prints): sorted by ``objective``, with the quality metrics and swept params as columns."""
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_METRICS = ("objective", "eval/style_distance", "eval/content_distance", "eval/ssim_content",
                "eval/color_distance_style")
METRICS_COLUMNS = ("step", "key", "value", "timestamp_ms")
QUIET_LOGGERS = ("mlflow.store.db.utils",)
"""They log each failed call to the store as an ERROR with a traceback; stx reports the failure once."""
VERSIONED = ("stx", "torch", "torchvision", "hydra-core", "omegaconf", "mlflow", "pillow")


log = logging.getLogger(__name__)
T = TypeVar("T")


class TrackingError(StxError):
    """The tracking store cannot be reached or used."""


def tracking_uri(tracking: DictConfig) -> str:
    """The tracking URI from the config; a server URI must answer its health check."""
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
    elif uri.startswith("sqlite:///"):
        open_sqlite_store(uri)
    return uri


def open_sqlite_store(uri: str) -> None:
    """Create or upgrade the sqlite store at ``uri`` under an exclusive lock (``<db>.lock``), so
    that jobs started together on a new store do not run MLflow's migrations at once (which
    leaves it half-migrated); a store that cannot be opened gets one paragraph."""
    path = Path(uri.removeprefix("sqlite:///"))
    if (known := _opened.get(uri)) is not None and known == _identity(path):
        return  # opened by an earlier job of this process (a sweep's), and not replaced since
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f"{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            MlflowClient(uri).get_experiment_by_name("Default")  # creates the store, or checks its schema
        except Exception as exc:  # sqlalchemy's and alembic's errors, MlflowException
            raise TrackingError(
                f"the MLflow store {path} could not be opened ({type(exc).__name__}: {first_line(exc)[:300]}). If another "
                f"program holds it locked, wait for it and run again; if it was left half-created (an interrupted "
                f"first job: tables named _alembic_tmp_*), move it aside and stx creates a new one; or give "
                f"another tracking.uri / runs_dir."
            ) from exc
    _opened[uri] = _identity(path)


_opened: dict[str, tuple[int, int] | None] = {}
"""The sqlite stores this process has opened: URI → the file's identity then (:func:`_identity`)."""


def _identity(path: Path) -> tuple[int, int] | None:
    """The file's device and inode (None when it does not exist): a store replaced by another file differs."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def existing_store(uri: str) -> MlflowClient:
    """A client of the store at ``uri`` for a command that reads runs from it: a local sqlite
    store that does not exist is not created, and one that cannot be read (corrupt, locked,
    half-created) gets one paragraph."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///").split("?")[0])
        if not path.is_file():
            raise TrackingError(f"there is no MLflow store at {path} ({uri}): give the store your runs are in with "
                                f"--tracking-uri (or $MLFLOW_TRACKING_URI), or run stx in the folder whose runs/ holds it.")
        open_sqlite_store(uri)
    return MlflowClient(uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Id of experiment ``name``, created (with its artifact root and stx's view, :data:`VIEW_KEY`)
    if it does not exist yet; an experiment from before the view gets it."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if VIEW_TAG not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, VIEW_TAG, view_state())
        return experiment.experiment_id
    location = Path(artifact_location).resolve().as_uri() if artifact_location else None
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={**EXPERIMENT_KIND, VIEW_TAG: view_state()})
    except MlflowException:  # created meanwhile by a parallel job
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def view_state(params: Sequence[str] = ()) -> str:
    """stx's view (:data:`VIEW_KEY`) as MLflow's UI reads it: the runs table sorted by ``objective``
    (lowest first), with :data:`VIEW_METRICS` and ``params`` (logged param keys) as columns."""
    columns = [f"metrics.`{name}`" for name in VIEW_METRICS] + [f"params.`{name}`" for name in params]
    return json.dumps({"orderByKey": "metrics.`objective`", "orderByAsc": True, "selectedColumns": columns})


def show_params(client: MlflowClient, experiment_id: str, params: Sequence[str]) -> None:
    """Add ``params`` (logged param keys, e.g. a sweep's swept keys) to the columns of the
    experiment's stx view, after those it shows already."""
    tags = client.get_experiment(experiment_id).tags
    try:
        shown = [column.removeprefix("params.`").removesuffix("`") for column in
                 json.loads(tags.get(VIEW_TAG, "{}")).get("selectedColumns", []) if column.startswith("params.`")]
    except (ValueError, AttributeError):  # edited by hand: written anew
        shown = []
    wanted = list(dict.fromkeys([*shown, *params]))
    if wanted != shown or VIEW_TAG not in tags:
        client.set_experiment_tag(experiment_id, VIEW_TAG, view_state(wanted))


def view_link(ui: str, experiment_id: str) -> str:
    """The address of the experiment's stx view (:data:`VIEW_KEY`) in the MLflow UI at ``ui``."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


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
    tags = {"device": str(device)}
    if device.type == "cuda":
        tags["device.name"] = torch.cuda.get_device_name(device)
    return tags


def hydra_tags(hydra_cfg: DictConfig) -> dict[str, str]:
    """The command-line overrides and the config group choices."""
    overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)  # "k=${x}" stays text
    tags = {layout.TAG_OVERRIDES: " ".join(overrides)}
    for group, choice in hydra_cfg.runtime.choices.items():
        if not group.startswith("hydra/") and choice is not None:
            tags[f"{layout.TAG_CHOICE}{group}"] = str(choice)
    return tags


def check_not_running(run: Run) -> None:
    """Refuse to continue a run that a live process still runs (:class:`TrackingError`)."""
    if run.info.status == "RUNNING" and layout.TAG_PID in run.data.tags and dead_reason(run) is None:
        raise TrackingError(
            f"run {run.info.run_id} is still RUNNING in process {run.data.tags[layout.TAG_PID]} on "
            f"{run.data.tags[layout.TAG_HOST]}: stop that job first (a run whose process is gone is "
            f"closed by the next job on the store; on another host after {DEAD_AFTER_S:.0f} s without heartbeat)."
        )


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
        self.system_metrics = bool(tracking.system_metrics)
        self.metrics_file = run_dir / layout.METRICS_FILE
        self.failure: TrackingError | None = None
        self.client = self._store("opening it", MlflowClient, self.uri)
        self.experiment_id = self._store("opening the experiment", ensure_experiment, self.client,
                                         tracking.experiment, tracking.artifact_location)
        self._store("closing runs whose process is gone", close_dead_runs, self.client, self.experiment_id)
        self.last_image_step = -1
        self.run_id: str | None = None
        self.pending: list[Metric] = []
        self.logged_through: dict[str, int] = {}
        """Per metric key, the last step a reopened run had logged (its steps up to it are skipped)."""
        self.last_flush = time.monotonic()

    def _store(self, doing: str, call: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``call(*args, **kwargs)`` against the store; None (skipped) once the store has failed."""
        if self.failure is not None:
            return None
        for wait in (*LOCKED_RETRY_S, None):
            try:
                with _errors_muted(QUIET_LOGGERS):
                    return call(*args, **kwargs)
            except (MlflowException, OSError) as exc:  # OSError covers requests' connection errors
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
        self.run_id = self._start(tags, parent_run_id) if run_id is None else self._reopen(run_id, tags)
        sampler = None
        if self.system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            sampler = SystemMetricsMonitor(self.run_id, resume_logging=run_id is not None, tracking_uri=self.uri)
            sampler.start()
        try:
            yield self.run_id
        except BaseException as exc:
            interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
            status = RunStatus.KILLED if interrupted else RunStatus.FAILED
            try:
                self._close(status, "interrupted" if interrupted else f"{type(exc).__name__}: {exc}"[:5000], log_file)
            except TrackingError as failure:
                log.error("%s", failure)
            raise
        finally:
            if sampler is not None:
                sampler.finish()
        self._close(RunStatus.FINISHED, None, log_file)

    def _start(self, tags: dict[str, str], parent_run_id: str | None) -> str:
        if parent_run_id is not None:
            tags[layout.TAG_PARENT] = parent_run_id
        run = self._store("starting the run", self.client.create_run, self.experiment_id,
                          run_name=tags.get(layout.TAG_RUN_NAME) or None,
                          tags=resolve_tags(tags))
        return run.info.run_id

    def _reopen(self, run_id: str, tags: dict[str, str]) -> str:
        """Set run ``run_id`` RUNNING again (clearing its ``stx.error``) and note which steps it logged."""
        run = self._store("reopening the run", self.client.get_run, run_id)
        check_not_running(run)
        for key in run.data.metrics:
            history = self._store("reading the run's metrics", self.client.get_metric_history, run_id, key)
            self.logged_through[key] = max(metric.step for metric in history)
        self._store("reopening the run", self.client.update_run, run_id, RunStatus.to_string(RunStatus.RUNNING))
        if layout.TAG_ERROR in run.data.tags:
            self._store("reopening the run", self.client.delete_tag, run_id, layout.TAG_ERROR)
        self._store("tagging the run", self.client.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        return run_id

    def _close(self, status: int, error: str | None, log_file: Path | None) -> None:
        self.flush()
        if error is not None:
            self._store("tagging the error", self.client.set_tag, self.run_id, layout.TAG_ERROR, error)
        if log_file is not None and log_file.is_file():
            self._store("logging the job's log", self.client.log_artifact, self.run_id, str(log_file))
        self._store("closing the run", self.client.set_terminated, self.run_id, RunStatus.to_string(status))

    def log_config(self, cfg: DictConfig, run_dir: Path, tags: Mapping[str, str] | None = None) -> None:
        """Params (the flattened resolved config, and each config group's choice from the
        ``hydra.choice.<group>`` ``tags`` as ``choice/<group>``, e.g. ``choice/color=luminance``),
        ``config.yaml`` and the ``.hydra/`` folder."""
        resolved = OmegaConf.to_container(cfg, resolve=True)
        params = [Param(key, str(value)) for key, value in flatten(resolved).items()]
        params += [Param(f"choice/{group}", choice) for group, choice in layout.choices(tags or {}).items()]
        self._store("logging the config", self.client.log_batch, self.run_id, params=params)
        self._store("logging the config", self.client.log_dict, self.run_id, resolved, layout.CONFIG)
        if (run_dir / ".hydra").is_dir():
            self._store("logging the config", self.client.log_artifacts, self.run_id, str(run_dir / ".hydra"), layout.HYDRA)

    def log_inputs(self, content: Path, styles: list[Path]) -> None:
        self._store("logging the inputs", self.client.log_artifact, self.run_id, str(content), layout.content_dir())
        for index, style in enumerate(styles):
            self._store("logging the inputs", self.client.log_artifact, self.run_id, str(style), layout.style_dir(index))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """Log the file ``path`` as an artifact (under ``folder``)."""
        self._store("logging an artifact", self.client.log_artifact, self.run_id, str(path), folder)

    def log_step(self, info: StepInfo) -> None:
        """The image every ``image_every`` steps; loss terms every ``metrics_every`` steps, buffered
        and flushed every :data:`FLUSH_EVERY_S`. Steps a reopened run had logged are skipped."""
        if self.image_every > 0 and info.step % self.image_every == 0 and info.step > max(self.logged_through.values(), default=-1):
            self.log_image(info.image, info.step)
        if info.step % self.metrics_every == 0:
            self.log_metrics(info.values, info.step)
        if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            self.flush()

    def log_metrics(self, values: Mapping[str, float], step: int) -> None:
        """Buffer ``{key: value}`` at ``step`` (written at the next flush); steps a reopened run had
        logged are skipped."""
        timestamp = int(time.time() * 1000)
        self.pending.extend(Metric(key, value, timestamp, step) for key, value in values.items()
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
                writer.writerows((m.step, m.key, repr(m.value), m.timestamp) for m in metrics)
        if self.run_id is not None:
            beat = [RunTag(key, value) for key, value in heartbeat().items()]
            self._store("logging metrics", self.client.log_batch, self.run_id, metrics=metrics, tags=beat)

    def log_image(self, image: torch.Tensor, step: int) -> None:
        # synchronous: the async queue costs ~1 s to shut down when the run ends
        self._store("logging the image", self.client.log_image, self.run_id, to_pil(image), key=layout.IMAGE_KEY,
                    step=step, synchronous=True)
        self.last_image_step = step

    def log_output(self, image: torch.Tensor, path: Path, step: int) -> None:
        """The final image: as the last point of the image series and as a file artifact."""
        if self.last_image_step != step:
            self.log_image(image, step)
        self._store("logging the output", self.client.log_artifact, self.run_id, str(path))

    def describe(self, output: Path, scores: Mapping[str, float]) -> None:
        """The run's description (``mlflow.note.content``, which the UI shows on the run's page):
        its quality metrics and its output image, the artifact ``output.name``."""
        metrics = ", ".join(f"{name.replace('_', ' ')} {value:.4g}" for name, value in scores.items())
        image = f"get-artifact?path={urllib.parse.quote(output.name)}&run_uuid={self.run_id}"  # the UI's own route
        self._store("describing the run", self.client.set_tag, self.run_id, MLFLOW_RUN_NOTE,
                    f"**{output.name}**: {metrics}\n\n![{output.name}]({image})")

    def log_checkpoint(self, path: Path, step: int) -> None:
        """The metrics so far, then the latest checkpoint file (replacing the previous one) and its
        step as a tag: a run resumed from it has every step up to it logged."""
        self.flush()
        self._store("logging the checkpoint", self.client.log_artifact, self.run_id, str(path), layout.CHECKPOINT_DIR)
        self._store("logging the checkpoint", self.client.set_tag, self.run_id, layout.TAG_CHECKPOINT_STEP, str(step))


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextmanager
def _errors_muted(names: tuple[str, ...]) -> Iterator[None]:
    """Drop the ERROR records of the named loggers for the duration."""
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addFilter(_below_error)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_below_error)
