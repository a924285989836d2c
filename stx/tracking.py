"""MLflow tracking of stx jobs.

One stx job is one MLflow run holding: the resolved config flattened into params (and whole,
as ``config.yaml``), Hydra's overrides and group choices, the git commit, library versions
and device as tags, every loss term per step as metrics (buffered and written with one
``log_batch`` call every few seconds, so tracking costs well under 3% of run time), the image
every ``image_every`` steps (``mlflow.log_image``, with the UI's step slider), the final
image, the input images and Hydra's ``.hydra/`` folder.
"""

from __future__ import annotations

import platform
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from stx import layout
from stx.errors import StxError
from stx.image import to_pil
from stx.optim import StepInfo

SOURCE_DIR = Path(__file__).resolve().parent.parent
FLUSH_EVERY_S = 5.0
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Makes MLflow 3's UI open the experiment on its runs table rather than the GenAI overview."""
VERSIONED = ("stx", "torch", "torchvision", "hydra-core", "omegaconf", "mlflow", "pillow")


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
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return uri


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Id of experiment ``name``, created (with its artifact root) if it does not exist yet."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = Path(artifact_location).resolve().as_uri() if artifact_location else None
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel job
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


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


class RunTracker:
    """Logs one job to MLflow; use :meth:`open` as a context manager around the work."""

    def __init__(self, tracking: DictConfig) -> None:
        self.uri = tracking_uri(tracking)
        self.metrics_every = max(1, int(tracking.metrics_every))
        self.image_every = int(tracking.image_every)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(self.uri)
        self.experiment_id = ensure_experiment(self.client, tracking.experiment, tracking.artifact_location)
        self.last_image_step = -1
        self.run_id: str | None = None
        self.pending: list[Metric] = []
        self.last_flush = time.monotonic()

    @contextmanager
    def open(self, tags: Mapping[str, str], parent_run_id: str | None = None, run_id: str | None = None) -> Iterator[str]:
        """Start a run (or reopen ``run_id``); end it FINISHED, FAILED (tag ``stx.error``) or
        KILLED (interrupt)."""
        if run_id is not None:
            active = mlflow.start_run(run_id=run_id)
            mlflow.set_tags(dict(tags))
        else:
            active = mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=tags.get(layout.TAG_OVERRIDES) or None,
                tags=dict(tags),
                parent_run_id=parent_run_id,
            )
        self.run_id = active.info.run_id
        status = RunStatus.to_string(RunStatus.FINISHED)
        try:
            yield self.run_id
        except (KeyboardInterrupt, SystemExit):
            status = RunStatus.to_string(RunStatus.KILLED)
            mlflow.set_tag(layout.TAG_ERROR, "interrupted")
            raise
        except BaseException as exc:
            status = RunStatus.to_string(RunStatus.FAILED)
            mlflow.set_tag(layout.TAG_ERROR, f"{type(exc).__name__}: {exc}"[:5000])
            raise
        finally:
            self.flush()
            mlflow.end_run(status)

    def log_config(self, cfg: DictConfig, run_dir: Path) -> None:
        """Params (flattened resolved config), ``config.yaml`` and the ``.hydra/`` folder."""
        resolved = OmegaConf.to_container(cfg, resolve=True)
        mlflow.log_params(flatten(resolved))
        mlflow.log_dict(resolved, layout.CONFIG)
        if (run_dir / ".hydra").is_dir():
            mlflow.log_artifacts(str(run_dir / ".hydra"), layout.HYDRA)

    def log_inputs(self, content: Path, styles: list[Path]) -> None:
        mlflow.log_artifact(str(content), layout.content_dir())
        for index, style in enumerate(styles):
            mlflow.log_artifact(str(style), layout.style_dir(index))

    def log_step(self, info: StepInfo) -> None:
        """Loss terms every ``metrics_every`` steps (buffered); the image every ``image_every``."""
        if info.step % self.metrics_every == 0:
            timestamp = int(time.time() * 1000)
            self.pending.extend(Metric(key, value, timestamp, info.step) for key, value in info.values.items())
            if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
                self.flush()
        if self.image_every > 0 and info.step % self.image_every == 0:
            self.log_image(info.image, info.step)

    def flush(self) -> None:
        """Write the buffered metrics in one batch."""
        if self.pending and self.run_id:
            self.client.log_batch(self.run_id, metrics=self.pending)
        self.pending = []
        self.last_flush = time.monotonic()

    def log_image(self, image: torch.Tensor, step: int) -> None:
        # synchronous: mlflow.log_image's default async queue costs ~1 s to shut down at end_run
        mlflow.log_image(to_pil(image), key=layout.IMAGE_KEY, step=step, synchronous=True)
        self.last_image_step = step

    def log_output(self, image: torch.Tensor, path: Path, step: int) -> None:
        """The final image: as the last point of the image series and as a file artifact."""
        if self.last_image_step != step:
            self.log_image(image, step)
        mlflow.log_artifact(str(path))

    def log_checkpoint(self, path: Path, step: int) -> None:
        """The latest checkpoint file, replacing the previous one, and its step as a tag."""
        mlflow.log_artifact(str(path), layout.CHECKPOINT_DIR)
        mlflow.set_tag(layout.TAG_CHECKPOINT_STEP, str(step))

    def log_file(self, path: Path) -> None:
        if path.is_file():
            mlflow.log_artifact(str(path))

