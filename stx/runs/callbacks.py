"""Hydra callbacks (registered in ``conf/config.yaml``).

:class:`RunsDirCheck` checks, before Hydra creates the run or sweep dir, that the runs folder
can be written, so that a bad one gets a clear message instead of a traceback.

:class:`MlflowSweepCallback` gives a sweep (``stx -m …``) one parent MLflow run and each job
a child run. In the launching process it creates the experiment once (no race between parallel
jobs) and the parent run, tagged with the command line and sweep dir, through the store's helper
process and from a thread of its own, while the sweep composes its jobs and loads torch (each job
waits for it). Every launcher (basic, joblib, submitit) pickles callbacks into the job's process,
where :meth:`on_job_start` hands the parent run id to the job through ``$STX_PARENT_RUN_ID`` and
:meth:`on_job_end` records a failed job on the parent. The parent is closed FINISHED, or FAILED
when any job failed or when the sweep stops early — Hydra skips ``on_multirun_end`` when a job
raises, so an ``atexit`` hook closes it then. The parent carries the launching process's host and
pid (no heartbeat), so if the store fails and the parent cannot be closed, the next job on the
store closes it as FAILED once that process is gone (:mod:`stx.runs.liveness`); the sweep then
says so and exits 1.
"""

from __future__ import annotations

import atexit
import copy
import itertools
import math
import os
import shlex
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stx.errors import StoreFailure, StxError, TrackingError, first_line
from stx.runs import hydra_job, interrupts, layout
from stx.runs.liveness import process_tags
from stx.runs.tracking import Store, source_tags, store_for, tracking_uri


def exit_with(error: StxError) -> None:
    """Stop the command with the error's message (SystemExit passes Hydra's reporter untouched)."""
    print(f"stx: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_sweep_jobs(config: DictConfig, overrides: list) -> None:
    """Check every job of a sweep over plain values (``key=a,b,c``) with :func:`stx.runs.job.check_job`
    before the sweep's parent run is created or any job starts (config group sweeps are checked by Hydra
    as it composes them): a bad value stops the sweep with one paragraph naming the key, the value and
    the job, and exit status 2."""
    choices = set(config.hydra.runtime.choices)
    swept = [o for o in overrides if o.is_sweep_override() and o.is_discrete_sweep() and not o.is_hydra_override()
             and o.type == OverrideType.CHANGE and o.key_or_group not in choices and "/" not in o.key_or_group
             and o.package is None]
    if not swept:
        return
    from stx.runs.job import check_job  # loads torch: the sweep is about to

    keys = [o.key_or_group for o in swept]
    combinations = list(itertools.product(*(list(o.sweep_iterator()) for o in swept)))
    for number, values in enumerate(combinations, 1):
        job = copy.deepcopy(OmegaConf.masked_copy(config, [key for key in config if key != "hydra"]))
        where = f"sweep job {number}/{len(combinations)} ({', '.join(f'{k}={v}' for k, v in zip(keys, values))})"
        try:
            for key, value in zip(keys, values):
                OmegaConf.update(job, key, value, merge=True)
        except OmegaConfBaseException as exc:
            exit_with(StxError(f"{where}: {str(exc).splitlines()[0]}; no job was started."))
        try:
            check_job(job)
        except StxError as error:
            exit_with(StxError(f"{where}: {error} No job was started."))


def check_writable(folder: str) -> None:
    """Refuse an empty ``runs_dir`` or the filesystem's root (outputs, the store and its artifacts would be
    scattered there); create ``folder`` if needed and check a file can be written in it."""
    path = Path(folder)
    if not str(folder).strip() or path.resolve() == Path(path.resolve().anchor):
        exit_with(StxError(
            f"runs_dir={str(folder)!r} is not valid: stx writes the MLflow store, its artifacts and a folder per "
            f"run there, so it must be a folder of its own, not empty and not the filesystem's root; e.g. "
            f"runs_dir=runs (the default: runs/ in the current folder) or runs_dir=/data/stx-runs."
        ))
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        exit_with(StxError(
            f"the runs folder {str(path)!r} cannot be written ({exc.strerror or exc}); choose a writable "
            f"one with runs_dir=/path or the STX_RUNS_DIR environment variable."
        ))


class RunsDirCheck(Callback):
    """Refuse an unwritable ``runs_dir`` before Hydra creates the job's folder in it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(config.runs_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable(config.runs_dir)


def idle_seed_warning(config: DictConfig, swept: list[str]) -> str | None:
    """What to tell a sweep over ``seed`` in which the seed changes nothing: every job starts from
    the same image (``schedule.init`` content or style, or an init image) with trained weights."""
    init = OmegaConf.select(config, "schedule.init")
    if ("seed" not in swept or "schedule.init" in swept or init not in ("content", "style")
            or OmegaConf.select(config, "encoder.weights") == "random"):
        return None
    start = f"schedule.init={init}" + (" (and an init image)" if OmegaConf.select(config, "schedule.init_image") else "")
    return (f"seed is swept, but with {start} every job starts from the same image and nothing else in a "
            f"job is random, so the jobs will give one result; add schedule.init=random to see what the "
            f"seed changes, or sweep something else.")


class MlflowSweepCallback(Callback):
    """Parent run for a Hydra multirun; see the module docstring."""

    def __init__(self) -> None:
        self.uri: str | None = None
        self.parent_run_id: str | None = None
        self.sweep_dir: str | None = None
        self.swept_keys: list[str] = []
        self.sweep_config: DictConfig | None = None
        self.jobs: int | None = None
        self._store: Store | None = None
        self._opening: threading.Thread | None = None
        self._opening_error: StxError | None = None
        self._lock = threading.Lock()
        self._closed = False

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """The store's ``method(*args, **kwargs)`` (:class:`~stx.runs.store.JobStore`), in the helper
        process when ``stx`` started one (:func:`~stx.runs.tracking.store_for`)."""
        if self._store is None:
            self._store = store_for(self.uri)
        return self._store.call(method, *args, **kwargs)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self.uri = tracking_uri(config.tracking)
        except StxError as error:
            exit_with(error)
        self.sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        self.sweep_config = config
        interrupts.sweep_workers = True
        command = shlex.join(["stx", *sys.argv[1:]])
        tags = {
            **source_tags(),
            layout.TAG_SWEEP: "true",
            layout.TAG_SWEEP_COMMAND: command,
            layout.TAG_SWEEP_DIR: self.sweep_dir,
            layout.TAG_OVERRIDES: " ".join(OmegaConf.to_container(config.hydra.overrides.task, resolve=False)),
            # judged dead only on this host, by its process: a heartbeat would go stale during long jobs
            **{key: value for key, value in process_tags().items() if key != layout.TAG_HEARTBEAT},
        }
        overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        check_sweep_jobs(config, overrides)
        self.swept_keys = [o.key_or_group for o in overrides if o.is_sweep_override()]
        self.swept_keys += [str(key) for key in (config.hydra.sweeper.get("params") or {})]
        if warning := idle_seed_warning(config, self.swept_keys):
            print(f"stx: warning: {warning}", file=sys.stderr, flush=True)
        swept = layout.run_name(tags[layout.TAG_OVERRIDES], self.swept_keys)  # "sw=1e1,1e3,1e5"
        fixed = {o.key_or_group: o.get_value_element_as_str() for o in overrides if not o.is_sweep_override()}
        self.jobs = sweep_size(config, overrides)
        atexit.register(self.finish)
        self._opening = threading.Thread(target=self._open_parent, name="stx-sweep-parent", daemon=True,
                                         args=(config.tracking, f"sweep {swept or command}"[:250], tags, fixed))
        self._opening.start()

    def __getstate__(self) -> dict[str, Any]:
        """What a launcher's worker process gets (joblib and submitit pickle the callbacks): the parent
        run, once created; not this process's store, thread or lock (a worker calls its store itself)."""
        self._parent_opened()
        state = {**self.__dict__, "_store": None, "_opening": None}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def _open_parent(self, tracking: DictConfig, name: str, tags: dict[str, str], params: dict[str, str]) -> None:
        """Create the parent run (in a thread of its own: MLflow loads in the store's helper process
        meanwhile, while the sweep composes its jobs and loads torch here); a failure is kept for
        :meth:`_parent_opened`."""
        try:
            experiment_id = self._call("experiment", tracking.experiment, tracking.artifact_location)
            self._call("show_params", experiment_id, [layout.param_key(key) for key in self.swept_keys])
            self.parent_run_id = self._call("start_run", experiment_id, name, tags)
            self._call("log_batch", self.parent_run_id, params=params)
            self._call("prepare_summary")
        except StxError as error:
            self._opening_error = error
            return
        except StoreFailure as failure:
            self._opening_error = TrackingError(f"the sweep's parent MLflow run could not be created: "
                                                f"{_store_failure(self.uri, failure)}; check tracking.uri (and that "
                                                f"its server runs).")
            return

    def _parent_opened(self) -> bool:
        """Wait for the parent run (:meth:`_open_parent`) and say it, or the error that kept it from
        being created, once (above the sweep's progress bar, when one is drawn); whether there is one
        (False outside a sweep)."""
        with self._lock:
            if self._opening is not None:
                self._opening.join()
                self._opening = None
                if self._opening_error is not None:
                    hydra_job.say(f"stx: error: {self._opening_error}", error=True)
                else:
                    hydra_job.say(f"stx: sweep parent MLflow run {self.parent_run_id} ({self.uri})")
        return self.parent_run_id is not None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self._parent_opened():
            if self._opening_error is not None:
                sys.exit(2)  # no job runs without the sweep's parent run
            return  # a single run (Hydra calls this for one too)
        task = " ".join(config.hydra.overrides.task)
        hydra_job.say(f"stx: job {config.hydra.job.num + 1}/{self.jobs or '?'}: {task}")
        os.environ[layout.PARENT_RUN_ENV] = self.parent_run_id
        os.environ[layout.SWEPT_KEYS_ENV] = ",".join(self.swept_keys)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if not self.parent_run_id:
            return
        reason = None  # JobReturn.return_value would re-raise a failed job's exception: read the field
        if job_return.status == JobStatus.FAILED:
            reason = f"{type(job_return._return_value).__name__}: {job_return._return_value}"
        elif not _finite(job_return._return_value):
            reason = f"returned {job_return._return_value!r}"
        if reason:
            try:
                self._call("set_tag", self.parent_run_id, f"{layout.TAG_FAILED_JOB}{config.hydra.job.num}", reason[:5000])
            except (StoreFailure, StxError) as exc:
                print(f"stx: warning: job {config.hydra.job.num}'s failure could not be recorded on the sweep's parent "
                      f"MLflow run {self.parent_run_id}: {_store_failure(self.uri, exc)}", file=sys.stderr, flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        status = self.finish(completed=True)
        if status is not None:
            self.report(status)
        if status != "FINISHED":
            if status is not None:
                print(f"stx: sweep ended {status}: see the jobs' errors above and MLflow run {self.parent_run_id}", file=sys.stderr)
            sys.exit(1)

    def finish(self, completed: bool = False) -> str | None:
        """:meth:`close`, or None with one error on stderr when the store fails (Hydra would only
        warn about an exception in a callback, and the sweep would exit 0)."""
        try:
            return self.close(completed)
        except (StoreFailure, StxError) as exc:
            print(f"stx: error: the sweep's parent MLflow run {self.parent_run_id} could not be closed: "
                  f"{_store_failure(self.uri, exc)}. It stays RUNNING until the next stx job on this store finds "
                  f"this process (pid {os.getpid()}) gone and closes it as FAILED.", file=sys.stderr, flush=True)
            return None

    def close(self, completed: bool = False) -> str | None:
        """End the parent and return its status: FINISHED only if the sweep completed and every
        child finished; KILLED if the sweep itself was interrupted (Ctrl-C or SIGTERM here);
        FAILED otherwise, e.g. when a child was stopped on its own (``scancel``) or failed."""
        if self._closed or not self._parent_opened():
            return None
        self._closed = True
        self._log_sweep_files()
        interrupted = interrupts.received is not None
        failed, statuses = self._call("sweep_children", self.parent_run_id, interrupted)
        if interrupted:
            status = "KILLED"
        elif completed and not failed and set(statuses) <= {"FINISHED"}:
            status = "FINISHED"
        else:
            status = "FAILED"
        self._call("set_tag", self.parent_run_id, layout.TAG_SWEEP_JOBS, str(len(statuses)))
        if statuses:
            self.summarize()
        self._call("end_run", self.parent_run_id, status)
        return status

    def _log_sweep_files(self) -> None:
        """Log the sweep's ``multirun.yaml`` (written here when the sweeper, e.g. Optuna's, wrote
        none) and the search's ``optimization_results.yaml`` (best params and value) if there is one."""
        sweep_dir = Path(self.sweep_dir)
        multirun_yaml = sweep_dir / "multirun.yaml"
        if not multirun_yaml.is_file() and self.sweep_config is not None:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.sweep_config, multirun_yaml)
        for name in ("multirun.yaml", "optimization_results.yaml"):
            if (sweep_dir / name).is_file():
                self._call("log_artifact", self.parent_run_id, str(sweep_dir / name))

    def report(self, status: str) -> None:
        """The sweep's result in a few lines: its status, the best run (or the Pareto set), where
        its table, contact sheet and scatter plot are, and how to see its runs in MLflow's UI."""
        try:
            tags, metrics = self._call("tags_and_metrics", self.parent_run_id)
        except (StoreFailure, StxError):
            return
        lines = [f"stx: sweep {status}: MLflow run {self.parent_run_id} ({self.uri})"]
        if layout.TAG_BEST_RUN in tags:
            objective = metrics.get(layout.BEST_PREFIX + layout.OBJECTIVE_METRIC)
            shown = f" (objective {objective:.4g})" if objective is not None else ""
            lines.append(f"stx: best run {tags[layout.TAG_BEST_RUN]}{shown}")
        elif layout.TAG_PARETO_RUNS in tags:  # objective=pareto: no single best
            lines.append(f"stx: Pareto set: {tags[layout.TAG_PARETO_RUNS].replace(',', ', ')}")
        folder = Path(self.sweep_dir) / "compare"
        files = [folder / name for name in ("table.txt", "contact_sheet.png", "scatter.png") if (folder / name).is_file()]
        if files:
            lines.append("stx: " + ", ".join(str(path) for path in files))
        lines.append(f"stx: this sweep's runs in MLflow's UI, best objective first: stx ui {self.parent_run_id} "
                     f"--tracking-uri {self.uri}")
        print("\n".join(lines), flush=True)

    def summarize(self) -> None:
        """The sweep's table, contact sheet and scatter plot on the parent, with its best child
        (``stx compare`` of the parent); a failure here is reported, never fails the sweep."""
        try:
            self._call("summarize_sweep", self.parent_run_id, str(Path(self.sweep_dir) / "compare"))
        except Exception as exc:  # noqa: BLE001 - the sweep's own status must still be recorded
            print(f"stx: warning: the sweep summary could not be made ({type(exc).__name__}: {exc})", file=sys.stderr)


def sweep_size(config: DictConfig, overrides: list) -> int | None:
    """How many jobs the sweep runs: Optuna's ``n_trials``, else the product of the swept values'
    counts (None when a sweep is a range or interval that the basic sweeper cannot count)."""
    trials = config.hydra.sweeper.get("n_trials")
    if trials:
        return int(trials)
    params = OverridesParser.create().parse_overrides(
        [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()])
    total = 1
    for override in [*overrides, *params]:
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                return None
            total *= len(list(override.sweep_string_iterator()))
    return total


def _store_failure(uri: str | None, exc: Exception) -> str:
    return f"the tracking store {uri} failed ({first_line(exc)})"


def _finite(value: object) -> bool:
    """Whether a job returned a finite objective (a number, or a list of numbers for Pareto searches)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
