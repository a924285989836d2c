"""The MLflow tracking store, as stx talks to it: opening a store, an experiment and its view, and
:class:`JobStore`, the calls one job makes for its run with plain values in and out.

This is the one module of a job's or a sweep's path that imports MLflow (1–2 s of a start-up).
``stx`` runs it in a helper process (``python -m stx.runs.store_process``, :mod:`stx.runs.store_process`),
started before it imports torch, so that MLflow loads while the job is built; a sweep's jobs and its
parent run (:class:`~stx.runs.callbacks.MlflowSweepCallback`) call it there too, so their calls to
the store run beside the jobs' work instead of taking turns with it for the interpreter.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pickle
import signal
import sqlite3
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE, MLFLOW_SOURCE_NAME

from stx.errors import StoreFailure, TrackingError, first_line
from stx.runs import layout
from stx.runs.liveness import DEAD_AFTER_S, close_dead_runs, dead_reason

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Makes MLflow 3's UI open the experiment on its runs table rather than the GenAI overview."""
VIEW_KEY = "stx"
"""The view of the runs table stx keeps on each experiment, MLflow's shared view state (the experiment tag
``mlflow.sharedViewState.stx``, opened by ``…/#/experiments/<id>/runs?viewStateShareKey=stx``, the
link ``stx ui`` prints): sorted by ``objective``, which comes first among the columns, then the swept params, then
the quality metrics."""
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
VIEW_METRICS = ("objective", "eval/style_distance", "eval/structure", "eval/content_distance", "eval/ssim_content",
                "eval/color_distance_style")
IMAGE_PARAMS = ("images.content", "images.styles.0")
"""The params a view groups runs by where they may differ (an experiment's every run; a sweep over images), so
that the runs of one photo and style rank only among themselves; a group's row shows its best (min) values."""
QUIET_LOGGERS = ("mlflow.store.db.utils",)
"""They log each failed call to the store as an ERROR with a traceback; stx reports the failure once."""


def sqlite_file(uri: str) -> Path | None:
    """The database file of a local sqlite store's URI (``sqlite:///x.db?mode=ro`` names ``x.db``); None for
    any other store."""
    return Path(uri.removeprefix("sqlite:///").split("?")[0]) if uri.startswith("sqlite:///") else None


def read_only_store(uri: str) -> bool:
    """Whether ``uri`` is a local sqlite store this process cannot write (e.g. on a read-only filesystem)."""
    database = sqlite_file(uri)
    return database is not None and not os.access(database, os.W_OK)


def open_sqlite_store(uri: str) -> None:
    """Create or upgrade the sqlite store at ``uri`` under an exclusive lock (``<db>.lock``), so
    that jobs started together on a new store do not run MLflow's migrations at once (which
    leaves it half-migrated); a store that cannot be opened gets one paragraph."""
    path = Path(uri.removeprefix("sqlite:///"))
    if (known := _opened.get(uri)) is not None and known == _identity(path):
        return  # opened by an earlier job of this process (a sweep's), and not replaced since
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        database = sqlite_file(uri).absolute()
        with _store_lock(path.with_name(f"{path.name}.lock"), database.exists()):
            mode = "ro" if database.exists() else "rwc"
            with closing(sqlite3.connect(f"{database.as_uri()}?mode={mode}", uri=True, timeout=30)) as connection:
                connection.execute("PRAGMA schema_version")  # a file sqlite cannot open fails here at once
            MlflowClient(uri).get_experiment_by_name("Default")  # creates the store, or checks its schema
    except Exception as exc:  # the OS's, sqlite's, sqlalchemy's and alembic's errors, MlflowException
        raise TrackingError(
            f"the MLflow store {path} could not be opened ({type(exc).__name__}: {first_line(exc)[:300]}). If another "
            f"program holds it locked, wait for it and run again; if it was left half-created (an interrupted "
            f"first job: tables named _alembic_tmp_*), move it aside and stx creates a new one; or give "
            f"another tracking.uri / runs_dir."
        ) from exc
    _opened[uri] = _identity(path)


@contextmanager
def _store_lock(path: Path, exists: bool) -> Iterator[None]:
    """Hold the exclusive lock file ``path`` of a sqlite store; an existing store on a read-only
    filesystem (where no lock file can be made, and nothing can migrate it) is read without one."""
    try:
        lock = open(path, "a")
    except OSError as exc:
        if exists and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield
            return
        raise
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


_opened: dict[str, tuple[int, int] | None] = {}
"""The sqlite stores this process has opened: URI → the file's identity then (:func:`_identity`)."""


def _identity(path: Path) -> tuple[int, int] | None:
    """The file's device and inode (None when it does not exist): a store replaced by another file differs."""
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_dev, info.st_ino


def opened(uri: str) -> MlflowClient:
    """A client of the store at ``uri`` (from :func:`~stx.runs.tracking.tracking_uri`), a local
    sqlite store created or upgraded first (:func:`open_sqlite_store`)."""
    if uri.startswith("sqlite:///"):
        open_sqlite_store(uri)
    return MlflowClient(uri)


def existing_store(uri: str) -> MlflowClient:
    """A client of the store at ``uri`` for a command that reads runs from it: a local sqlite
    store that does not exist is not created, and one that cannot be read (corrupt, locked,
    half-created) gets one paragraph."""
    if (path := sqlite_file(uri)) is not None:
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


def view_state(params: Sequence[str] = (), search_filter: str = "") -> str:
    """stx's view (:data:`VIEW_KEY`) as MLflow's UI reads it: the runs table sorted by ``objective``
    (lowest first), with :data:`VIEW_METRICS` and ``params`` (logged param keys) as columns in the order
    objective, params, the rest (MLflow would sort the metrics by name, putting ``eval/…`` first), and only the
    runs ``search_filter`` (MLflow's search syntax) selects; grouped by :data:`IMAGE_PARAMS` unless the view is
    a sweep's (a filter) that kept its images."""
    objective, *quality = [f"metrics.`{name}`" for name in VIEW_METRICS]
    columns = [objective, *(f"params.`{name}`" for name in params), *quality]
    view = {"orderByKey": objective, "orderByAsc": True, "selectedColumns": columns, "columnOrder": columns}
    if search_filter:
        view["searchFilter"] = search_filter
    if not search_filter or any(name.startswith("images.") for name in params):
        view["groupBy"] = {"aggregateFunction": "min", "groupByKeys": [
            {"mode": "param", "groupByData": name} for name in IMAGE_PARAMS]}
    return json.dumps(view)


def sweep_view(client: MlflowClient, parent: Run) -> str:
    """The key of a view of one sweep's runs (its children only, best objective first, its swept params
    first among the columns), written on its experiment as MLflow's shared view ``sweep-<id>``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    key = f"sweep-{parent.info.run_id[:12]}"
    try:
        overrides = OverridesParser.create().parse_overrides(parent.data.tags.get(layout.TAG_OVERRIDES, "").split())
        swept = [layout.param_key(o.key_or_group) for o in overrides if o.is_sweep_override()]
    except Exception:  # noqa: BLE001 - an edited tag: the view shows the quality metrics only
        swept = []
    client.set_experiment_tag(parent.info.experiment_id, f"mlflow.sharedViewState.{key}",
                              view_state(swept, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"))
    return key


def show_params(client: MlflowClient, experiment_id: str, params: Sequence[str]) -> None:
    """Add ``params`` (logged param keys, e.g. a sweep's swept keys) to the columns of the
    experiment's stx view, after those it shows already; a view written by an older stx is rewritten."""
    tags = client.get_experiment(experiment_id).tags
    try:
        shown = [column.removeprefix("params.`").removesuffix("`") for column in
                 json.loads(tags.get(VIEW_TAG, "{}")).get("selectedColumns", []) if column.startswith("params.`")]
    except (ValueError, AttributeError):  # edited by hand: written anew
        shown = []
    view = view_state(list(dict.fromkeys([*shown, *params])))
    if tags.get(VIEW_TAG) != view:
        client.set_experiment_tag(experiment_id, VIEW_TAG, view)


def view_link(ui: str, experiment_id: str, key: str = VIEW_KEY) -> str:
    """The address of the experiment's view ``key`` (stx's, :data:`VIEW_KEY`, by default) in the MLflow UI at
    ``ui``, in its model-training mode (MLflow 3 opens a fresh browser in its GenAI mode)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={key}&workflowType=machine_learning"


def check_not_running(run: Run) -> None:
    """Refuse to continue a run that a live process still runs (:class:`TrackingError`)."""
    if run.info.status == "RUNNING" and layout.TAG_PID in run.data.tags and dead_reason(run) is None:
        raise TrackingError(
            f"run {run.info.run_id} is still RUNNING in process {run.data.tags[layout.TAG_PID]} on "
            f"{run.data.tags[layout.TAG_HOST]}: stop that job first (a run whose process is gone is "
            f"closed by the next job on the store; on another host after {DEAD_AFTER_S:.0f} s without heartbeat)."
        )


MetricPoint = tuple[str, float, int, int]
"""A metric point as a job buffers it: key, value, unix time in ms, step."""


class JobStore:
    """The calls a job makes to the store at ``uri`` for its run, with plain values in and out;
    call them through :meth:`call`, which turns the store's and the OS's errors into
    :class:`~stx.errors.StoreFailure`. Opening it opens the store (:func:`opened`)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.client = opened(uri)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with _errors_muted(QUIET_LOGGERS):
            try:
                return getattr(self, method)(*args, **kwargs)
            except (MlflowException, OSError) as exc:  # OSError covers requests' connection errors
                raise StoreFailure(str(exc)) from None

    def ready(self) -> None:
        """Nothing: the store is open (:meth:`~stx.runs.store_process.StoreProcess.open_ahead`)."""

    def experiment(self, name: str, artifact_location: str | None) -> str:
        """The id of experiment ``name`` (:func:`ensure_experiment`)."""
        return ensure_experiment(self.client, name, artifact_location)

    def close_dead_runs(self, experiment_id: str) -> list[str]:
        return close_dead_runs(self.client, experiment_id)

    def start_run(self, experiment_id: str, name: str | None, tags: Mapping[str, str]) -> str:
        """A new RUNNING run with ``tags`` and MLflow's own (user, source: ``stx``, not this process's
        script); its id."""
        tags = resolve_tags({MLFLOW_SOURCE_NAME: "stx", **tags})
        return self.client.create_run(experiment_id, run_name=name or None, tags=tags).info.run_id

    def reopen_run(self, run_id: str, tags: Mapping[str, str]) -> dict[str, int]:
        """Set run ``run_id`` RUNNING again (refused while a live process runs it; its
        ``stx.error`` cleared) with ``tags`` added; per metric key, the last step it had logged."""
        run = self.client.get_run(run_id)
        check_not_running(run)
        logged = {key: max(point.step for point in self.client.get_metric_history(run_id, key)) for key in run.data.metrics}
        self.client.update_run(run_id, RunStatus.to_string(RunStatus.RUNNING))
        if layout.TAG_ERROR in run.data.tags:
            self.client.delete_tag(run_id, layout.TAG_ERROR)
        self.log_batch(run_id, tags=tags)
        return logged

    def log_batch(self, run_id: str, metrics: Sequence[MetricPoint] = (), params: Mapping[str, str] | None = None,
                  tags: Mapping[str, str] | None = None) -> None:
        self.client.log_batch(run_id, metrics=[Metric(*point) for point in metrics],
                              params=[Param(key, value) for key, value in (params or {}).items()],
                              tags=[RunTag(key, value) for key, value in (tags or {}).items()])

    def log_dict(self, run_id: str, value: dict, path: str) -> None:
        self.client.log_dict(run_id, value, path)

    def log_artifact(self, run_id: str, path: str, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, path, folder)

    def log_artifacts(self, run_id: str, path: str, folder: str | None = None) -> None:
        self.client.log_artifacts(run_id, path, folder)

    def log_image(self, run_id: str, image: Any, key: str, step: int) -> None:
        """A PIL image of the series ``key`` (the UI's step slider)."""
        # synchronous: the async queue costs ~1 s to shut down when the run ends
        self.client.log_image(run_id, image, key=key, step=step, synchronous=True)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def describe(self, run_id: str, text: str) -> None:
        """The run's description (``mlflow.note.content``, Markdown, shown on its page in the UI)."""
        self.client.set_tag(run_id, MLFLOW_RUN_NOTE, text)

    def end_run(self, run_id: str, status: str) -> None:
        """Close the run as ``status`` (FINISHED, FAILED or KILLED)."""
        self.client.set_terminated(run_id, status)

    # A sweep's parent run (stx.runs.callbacks.MlflowSweepCallback) makes these calls too.

    def show_params(self, experiment_id: str, params: Sequence[str]) -> None:
        """:func:`show_params`: the swept keys as columns of the experiment's stx view."""
        show_params(self.client, experiment_id, params)

    def sweep_children(self, parent_run_id: str, stop_running: bool) -> tuple[bool, list[str]]:
        """Whether a job's failure was recorded on the sweep's parent run (``stx.failed_job.*``), and
        the statuses of its child runs. ``stop_running``: the sweep was interrupted, and its jobs had
        time to close their runs KILLED (:func:`stx.runs.interrupts.forward`); children still RUNNING
        are closed KILLED here first, with ``stx.error`` saying so."""
        parent = self.client.get_run(parent_run_id)
        search = f"tags.{layout.TAG_PARENT} = '{parent_run_id}'"
        children = self.client.search_runs([parent.info.experiment_id], filter_string=search, max_results=50000)
        if stop_running:
            for child in children:
                if child.info.status == "RUNNING":
                    self.client.set_tag(child.info.run_id, layout.TAG_ERROR,
                                        "interrupted: the sweep was stopped and this job's process did not close its run")
                    self.client.set_terminated(child.info.run_id, "KILLED")
            children = self.client.search_runs([parent.info.experiment_id], filter_string=search, max_results=50000)
        failed = any(key.startswith(layout.TAG_FAILED_JOB) for key in parent.data.tags)
        return failed, [child.info.status for child in children]

    def prepare_summary(self) -> None:
        """Start loading what :meth:`summarize_sweep` needs (matplotlib, 0.3 s) in a thread, while the
        sweep's jobs run, rather than after the last one (an import that meets it waits for it)."""
        from stx.runs.compare import load_plotting

        threading.Thread(target=load_plotting, name="stx-load-plotting", daemon=True).start()

    def summarize_sweep(self, parent_run_id: str, folder: str) -> None:
        """``stx compare`` of the sweep's parent run into ``folder``, logged to it (:func:`stx.runs.compare.compare`)."""
        from stx.runs.compare import compare

        compare(parent_run_id, self.uri, Path(folder))

    def tags_and_metrics(self, run_id: str) -> tuple[dict[str, str], dict[str, float]]:
        """The run's tags and latest metric values."""
        run = self.client.get_run(run_id)
        return dict(run.data.tags), dict(run.data.metrics)


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


def serve() -> None:
    """The helper process's loop (:mod:`stx.runs.store_process`): read ``(uri, method, args,
    kwargs)`` requests from stdin, answer each with ``("ok", value)`` or ``("raise", exception)``
    on the original stdout, until stdin closes (the job's process ended, however it ended).
    Ctrl-C and SIGTERM are the job's to handle: it still closes its run through this process."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what MLflow prints cannot reach the answers
    stores: dict[str, JobStore] = {}
    while True:
        try:
            uri, method, args, kwargs = pickle.load(sys.stdin.buffer)
        except EOFError:
            return
        try:
            if uri not in stores:
                stores[uri] = JobStore(uri)
            answer = ("ok", stores[uri].call(method, *args, **kwargs))
        except (StoreFailure, TrackingError) as exc:
            answer = ("raise", exc)
        except Exception as exc:  # noqa: BLE001 — the job reports it, as any failure of its store
            answer = ("raise", StoreFailure(f"{type(exc).__name__}: {exc}"))
        pickle.dump(answer, answers)
        answers.flush()
