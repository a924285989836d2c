"""Hydra callbacks (registered in ``conf/config.yaml``).

:class:`RunsDirCheck` checks, before Hydra creates the run or sweep dir, that the runs folder
can be written, so that a bad one gets a clear message instead of a traceback.

:class:`MlflowSweepCallback` gives a sweep (``stx -m …``) one parent MLflow run and each job
a child run. In the
launching process it creates the experiment once (no race between parallel jobs) and the
parent run, tagged with the command line and sweep dir. Every launcher (basic, joblib,
submitit) pickles callbacks into the job's process, where :meth:`on_job_start` hands the
parent run id to the job through ``$STX_PARENT_RUN_ID`` and :meth:`on_job_end` records a
failed job on the parent. The parent is closed FINISHED, or FAILED when any job failed or
when the sweep stops early — Hydra skips ``on_multirun_end`` when a job raises, so an
``atexit`` hook closes it then. The parent carries the launching process's host and pid (no
heartbeat), so if the store fails and the parent cannot be closed, the next job on the store
closes it as FAILED once that process is gone (:mod:`stx.runs.liveness`); the sweep then says so
and exits 1.
"""

from __future__ import annotations

import atexit
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from stx.errors import StxError, first_line
from stx.runs import hydra_job, interrupts, layout, startup
from stx.runs.liveness import process_tags
from stx.runs.tracking import source_tags, tracking_uri

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def exit_with(error: StxError) -> None:
    """Stop the command with the error's message (SystemExit passes Hydra's reporter untouched)."""
    print(f"stx: error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)


def check_writable(folder: str) -> None:
    """Create ``folder`` if needed and check a file can be written in it."""
    path = Path(folder)
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
        self._closed = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with startup.heavy_imports():  # MLflow loads for a sweep here, for a single job in a helper process
            from mlflow.entities import Param

            from stx.runs.store import ensure_experiment, opened, show_params

        try:
            self.uri = tracking_uri(config.tracking)
            client = opened(self.uri)
            experiment_id = ensure_experiment(client, config.tracking.experiment, config.tracking.artifact_location)
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
        self.swept_keys = [o.key_or_group for o in overrides if o.is_sweep_override()]
        self.swept_keys += [str(key) for key in (config.hydra.sweeper.get("params") or {})]
        show_params(client, experiment_id, [layout.param_key(key) for key in self.swept_keys])
        if warning := idle_seed_warning(config, self.swept_keys):
            print(f"stx: warning: {warning}", file=sys.stderr, flush=True)
        swept = layout.run_name(tags[layout.TAG_OVERRIDES], self.swept_keys)  # "sw=1e1,1e3,1e5"
        run = client.create_run(experiment_id, run_name=f"sweep {swept or command}"[:250], tags=tags)
        self.parent_run_id = run.info.run_id
        self.jobs = sweep_size(config, overrides)
        fixed = {o.key_or_group: o.get_value_element_as_str() for o in overrides if not o.is_sweep_override()}
        client.log_batch(self.parent_run_id, params=[Param(key, value) for key, value in fixed.items()])
        atexit.register(self.finish)
        print(f"stx: sweep parent MLflow run {self.parent_run_id} ({self.uri})", flush=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.parent_run_id:  # a sweep's job (Hydra calls this for a single run too)
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
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            try:
                MlflowClient(self.uri).set_tag(self.parent_run_id, f"{layout.TAG_FAILED_JOB}{config.hydra.job.num}", reason[:5000])
            except (MlflowException, OSError) as exc:
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
        from mlflow.exceptions import MlflowException

        try:
            return self.close(completed)
        except (MlflowException, OSError) as exc:
            print(f"stx: error: the sweep's parent MLflow run {self.parent_run_id} could not be closed: "
                  f"{_store_failure(self.uri, exc)}. It stays RUNNING until the next stx job on this store finds "
                  f"this process (pid {os.getpid()}) gone and closes it as FAILED.", file=sys.stderr, flush=True)
            return None

    def close(self, completed: bool = False) -> str | None:
        """End the parent and return its status: FINISHED only if the sweep completed and every
        child finished; KILLED if the sweep itself was interrupted (Ctrl-C or SIGTERM here);
        FAILED otherwise, e.g. when a child was stopped on its own (``scancel``) or failed."""
        from mlflow.entities import RunStatus
        from mlflow.tracking import MlflowClient

        if self._closed or not self.parent_run_id:
            return None
        self._closed = True
        client = MlflowClient(self.uri)
        self._log_sweep_files(client)
        parent = client.get_run(self.parent_run_id)
        children = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.{layout.TAG_PARENT} = '{self.parent_run_id}'", max_results=50000
        )
        if interrupts.received is not None:
            children = self._stop_jobs(client, parent.info.experiment_id, children)
        failed = any(key.startswith(layout.TAG_FAILED_JOB) for key in parent.data.tags)
        statuses = {child.info.status for child in children}
        if interrupts.received is not None:
            status = RunStatus.KILLED
        elif completed and not failed and statuses <= {"FINISHED"}:
            status = RunStatus.FINISHED
        else:
            status = RunStatus.FAILED
        client.set_tag(self.parent_run_id, layout.TAG_SWEEP_JOBS, str(len(children)))
        if children:
            self.summarize()
        client.set_terminated(self.parent_run_id, RunStatus.to_string(status))
        return RunStatus.to_string(status)

    def _log_sweep_files(self, client: MlflowClient) -> None:
        """Log the sweep's ``multirun.yaml`` (written here when the sweeper, e.g. Optuna's, wrote
        none) and the search's ``optimization_results.yaml`` (best params and value) if there is one."""
        sweep_dir = Path(self.sweep_dir)
        multirun_yaml = sweep_dir / "multirun.yaml"
        if not multirun_yaml.is_file() and self.sweep_config is not None:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.sweep_config, multirun_yaml)
        for name in ("multirun.yaml", "optimization_results.yaml"):
            if (sweep_dir / name).is_file():
                client.log_artifact(self.parent_run_id, str(sweep_dir / name))

    def _stop_jobs(self, client: MlflowClient, experiment_id: str, children: list) -> list:
        """The sweep was interrupted: its stop signal went on to the jobs' worker processes,
        which had time to write their latest image and close their runs KILLED (see
        :func:`stx.runs.interrupts.forward`); close any of ``children`` (just searched) still RUNNING
        as KILLED. Returns the children as they are then."""
        for child in children:
            if child.info.status == "RUNNING":
                client.set_tag(child.info.run_id, layout.TAG_ERROR,
                               "interrupted: the sweep was stopped and this job's process did not close its run")
                client.set_terminated(child.info.run_id, "KILLED")
        search = f"tags.{layout.TAG_PARENT} = '{self.parent_run_id}'"
        return client.search_runs([experiment_id], filter_string=search, max_results=50000)

    def report(self, status: str) -> None:
        """The sweep's result in a few lines: its status, the best run (or the Pareto set), where
        its table, contact sheet and scatter plot are, and how to see its runs in MLflow's UI."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            parent = MlflowClient(self.uri).get_run(self.parent_run_id)
        except (MlflowException, OSError):
            return
        tags, lines = parent.data.tags, [f"stx: sweep {status}: MLflow run {self.parent_run_id} ({self.uri})"]
        if layout.TAG_BEST_RUN in tags:
            objective = parent.data.metrics.get(layout.OBJECTIVE_METRIC)
            shown = f" (objective {objective:.4g})" if objective is not None else ""
            lines.append(f"stx: best run {tags[layout.TAG_BEST_RUN]}{shown}")
        elif layout.TAG_PARETO_RUNS in tags:  # objective=pareto: no single best
            lines.append(f"stx: Pareto set: {tags[layout.TAG_PARETO_RUNS].replace(',', ', ')}")
        folder = Path(self.sweep_dir) / "compare"
        files = [folder / name for name in ("table.txt", "contact_sheet.png", "scatter.png") if (folder / name).is_file()]
        if files:
            lines.append("stx: " + ", ".join(str(path) for path in files))
        lines.append(f"stx: every run in MLflow's UI, best objective first: stx ui --tracking-uri {self.uri}")
        print("\n".join(lines), flush=True)

    def summarize(self) -> None:
        """The sweep's table, contact sheet and scatter plot on the parent, with its best child
        (``stx compare`` of the parent); a failure here is reported, never fails the sweep."""
        from stx.runs.compare import compare

        try:
            compare(self.parent_run_id, self.uri, Path(self.sweep_dir) / "compare")
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
