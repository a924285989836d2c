"""What an stx MLflow run holds, and under which names: the one owner of artifact names, tag
keys, the checkpoint file and its format, and how a run's config is read back.

Used by the runner (writing), the sweep callback, ``stx compare``, ``stx reproduce`` and
``stx resume`` (reading), so a name changed here changes for all of them.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stx.errors import ConfigError, StxError
from stx.runs.schema import CONF_DIR, StxSchema

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

    from stx.engine.optim import Checkpoint

CONFIG = "config.yaml"
"""The resolved config, whole (params hold it flattened)."""
HYDRA = "hydra"
"""Hydra's ``.hydra/`` folder of the job."""
INPUTS = "inputs"
IMAGE_KEY = "image"
"""``mlflow.log_image`` key of the image series (every ``tracking.image_every`` steps)."""
OBJECTIVE_METRIC = "objective"
"""Metric holding what the job returned to the sweeper (a single objective; see stx.runs.objectives)."""
EVAL_PREFIX = "eval/"
BEST_PREFIX = "best/"
"""Prefix of a sweep parent's copies of its best run's objective and quality metrics (``best/objective``, …)."""
"""Prefix of the quality metrics a run is scored by (:mod:`stx.engine.judge`)."""
PERF_PREFIX = "perf/"
"""Prefix of the speed and memory metrics (seconds per step, start-up, peak memory)."""
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT = f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}"
DEFAULT_OUTPUT = "output.png"
LAST_FINITE = "last_finite_"
"""Prefix of the output's name for a run stopped by a non-finite loss (its last finite image)."""
INTERRUPTED = "interrupted_"
"""Prefix of the output's name for an interrupted run (its latest image)."""
METRICS_FILE = "metrics.csv"
"""In the run dir: every metric point the job logged (``step,key,value,timestamp_ms``), written
at each flush before the store is asked, so it survives a failing store."""

PARENT_RUN_ENV = "STX_PARENT_RUN_ID"
"""Set by the sweep callback in each job's process: the sweep's parent MLflow run."""

TAG_ERROR = "stx.error"
TAG_KIND = "stx.kind"
"""``train`` on the runs of ``stx train`` (feed-forward model training)."""
EXPORT_DIR = "export"
"""Artifact folder of a training run's exported model files (TorchScript, ONNX)."""
TAG_RUN_DIR = "stx.run_dir"
TAG_OUTPUT = "stx.output"
TAG_TILE = "stx.tile"
"""The tile edge (px) the objective was evaluated with, or ``off`` (what schedule.tile=auto chose)."""
TAG_BATCHED = "stx.batched"
"""``true`` on a run of a batched sweep (hydra/launcher=stx_batched): it stepped together with its batch,
so its ``perf/seconds_per_step`` is the batch's time per step and ``perf/peak_memory_bytes`` the process's."""
TAG_BATCH_SIZE = "stx.batch_size"
"""On a run of a batched sweep: how many runs its batch ran at once (all devices together), the runs that
shared each ``perf/seconds_per_step`` (fewer once some have finished)."""
TAG_WEIGHTS = "stx.encoder.weights"
"""The weights the run's encoder held, as ``encoder.weights`` names them (what ``auto`` took: ``imagenet``,
``caffe``, ``hed``…; a file by its path); ``none`` for a loss set that reads no encoder."""
TAG_THREADS = "device.threads"
"""On a CPU run: torch's intra-op thread count, which changes float sums in the last bits (``stx reproduce``
replays it, so a run reproduces to the bit on the same machine)."""
TAG_JUDGE = "stx.judge"
"""The judge that scored a run's eval/ metrics, ``<arch>/<weights>`` (stx.engine.judge.judge_name)."""
TAG_CHECKPOINT_STEP = "stx.checkpoint_step"
TAG_RESUMED_AT_STEP = "stx.resumed_at_step"
TAG_RESUME_CHANGED = "stx.resume.changed"
"""What the overrides of each ``stx resume`` changed (``key old -> new (at step N)``; ``; ``-separated)."""
TAG_HOST = "stx.host"
TAG_PID = "stx.pid"
TAG_PID_START = "stx.pid_start"
TAG_HEARTBEAT = "stx.heartbeat"
TAG_SLURM_JOB = "stx.slurm_job_id"
"""The SLURM job the run's process ran in, as ``squeue`` and ``scancel`` name it (``<array job>_<task>`` for an array task)."""
TAG_SWEEP = "stx.sweep"
TAG_SWEEP_COMMAND = "stx.sweep.command"
TAG_SWEEP_DIR = "stx.sweep.dir"
TAG_SWEEP_JOBS = "stx.sweep.jobs"
TAG_BEST_RUN = "stx.sweep.best_run"
TAG_PARETO_RUNS = "stx.sweep.pareto_runs"
TAG_RUN_NAME = "mlflow.runName"
TAG_DESCRIPTION = "mlflow.note.content"
"""A run's description (Markdown), shown on its page in MLflow's UI (MLflow's ``MLFLOW_RUN_NOTE``)."""
SWEPT_KEYS_ENV = "STX_SWEPT_KEYS"
"""Set by the sweep callback in each job's process: the keys the sweep varies (comma-separated)."""
TAG_JOB_NUM = "stx.sweep.job_num"
TAG_FAILED_JOB = "stx.failed_job."
TAG_REPRODUCED_FROM = "reproduced_from"
TAG_PROMOTED_FROM = "promoted_from"
TAG_COMMIT_MISMATCH = "stx.reproduce.commit_mismatch"
TAG_OVERRIDES = "hydra.overrides"
TAG_CHOICE = "hydra.choice."
TAG_PARENT = "mlflow.parentRunId"
TAG_COMMIT = "mlflow.source.git.commit"


def content_dir() -> str:
    return f"{INPUTS}/content"


def style_dir(index: int) -> str:
    return f"{INPUTS}/style_{index}"


def init_dir() -> str:
    return f"{INPUTS}/init"


OUTPUT_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
"""Suffixes ``output`` may have: formats Pillow writes from 8-bit RGB."""


def check_output(name: str) -> None:
    """``output`` names the result in the run dir and, unchanged, the run's artifact: it must
    be a plain file name with one of :data:`OUTPUT_SUFFIXES`."""
    if Path(name).name != name:
        problem = "give a file name, without a folder (the file is written in the run dir)"
    elif Path(name).suffix.lower() not in OUTPUT_SUFFIXES:
        problem = f"its suffix must be one of {', '.join(OUTPUT_SUFFIXES)}"
    else:
        return
    raise ConfigError(f"output={name!r} is not valid: {problem}; e.g. output=result.png.")


def parse_overrides(text: str) -> dict[str, str]:
    """The ``hydra.overrides`` tag's text as ``{key: value}``."""
    try:
        items = shlex.split(text)
    except ValueError:  # an unbalanced quote: a tag edited by hand
        items = text.split()
    pairs = (item.split("=", 1) for item in items if "=" in item)
    return {key: value for key, value in pairs}


def choices(tags: Mapping[str, str]) -> dict[str, str]:
    """``{group: option}`` of the ``hydra.choice.<group>`` tags among ``tags``."""
    return {key.removeprefix(TAG_CHOICE): value for key, value in tags.items() if key.startswith(TAG_CHOICE)}


def param_key(override_key: str) -> str:
    """The param a run logs for an override's key: ``choice/<group>`` for a config group
    (``color`` → ``choice/color``), the dotted key itself for a value (``loss.style.score_weight``)."""
    key = override_key.lstrip("+~")
    return f"choice/{key}" if (CONF_DIR / key).is_dir() else key


NOT_IN_NAMES = ("runs_dir", "tracking", "hydra", "device", "resume")
"""Override keys (and their sub-keys) that say where a run goes, not what it is: left out of its name."""


def run_name(overrides: str, keys: Sequence[str] = ()) -> str | None:
    """A short, readable MLflow run name from the run's overrides (or, for a sweep job, its values
    of the swept ``keys``): ``sw=1e3 lr=0.5``, ``color=luminance``; None when nothing is left."""
    values = parse_overrides(overrides)
    keys = [key for key in keys if key in values] or [
        key for key in values if key.lstrip("+~").split(".")[0].split("/")[0] not in NOT_IN_NAMES]
    return " ".join(f"{name}={short_value(values[key])}" for name, key in zip(short_keys(keys), keys))[:250] or None


def short_keys(keys: Sequence[str]) -> list[str]:
    """:func:`short_key` of each key, told apart by its parent where two would read the same
    (``loss.style.score_weight``, ``loss.content.score_weight`` → ``style.sw``, ``content.sw``)."""
    short = [short_key(key) for key in keys]
    return [".".join([*key.split(".")[-2:-1], name]) if short.count(name) > 1 else name for key, name in zip(keys, short)]


def short_key(key: str) -> str:
    """``loss.style.score_weight`` → ``sw``, ``schedule.optimizer.lr`` → ``lr``, ``color`` → ``color``."""
    last = key.lstrip("+~").rsplit(".", 1)[-1].rsplit("/", 1)[-1]
    words = [word for word in last.split("_") if word]
    return "".join(word[0] for word in words) if len(words) > 1 else last


def short_value(text: str) -> str:
    """Numbers compactly (``1000000.0`` → ``1e6``, ``1000.0`` → ``1000``, ``0.5`` → ``0.5``), other values as given."""
    try:
        number = float(text)
    except ValueError:
        return text
    if number.is_integer() and abs(number) < 1e4:
        return str(int(number))
    return f"{number:.4g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def output_names(run: Run) -> list[str]:
    """Artifact names the run's output image may have, best first: the finished output, then
    the images kept by a run that stopped early."""
    output = run.data.tags.get(TAG_OUTPUT, DEFAULT_OUTPUT)
    try:
        check_output(output)
    except ConfigError as exc:
        raise StxError(f"run {run.info.run_id} has the tag {TAG_OUTPUT}={output!r}, which is not a plain output file "
                       f"name: the store was edited, and stx reads no artifact through it.") from exc
    return [output, LAST_FINITE + output, INTERRUPTED + output]


CHECKPOINT_OWNER = "run_id"
"""The key of a checkpoint file that names the run which wrote it: a run resumes from its own checkpoints only."""


def save_checkpoint(checkpoint: Checkpoint, path: Path, run_id: str) -> Path:
    """Write ``checkpoint`` of run ``run_id`` to ``path`` (tensors and numbers only, see :func:`load_checkpoint`)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {field.name: getattr(checkpoint, field.name) for field in dataclasses.fields(checkpoint)}
    state.update(parameter=checkpoint.parameter.cpu(), best=checkpoint.best.cpu(), **{CHECKPOINT_OWNER: run_id})
    torch.save(state, path)
    return path


def load_checkpoint(path: Path) -> tuple[Checkpoint, str | None]:
    """The checkpoint at ``path`` and the run id it names as its writer (None: written before stx named it)."""
    from stx.engine import files
    from stx.engine.optim import Checkpoint

    try:
        state = files.load_tensors(path)
        owner = state.pop(CHECKPOINT_OWNER, None)
        return Checkpoint(**state), owner
    except Exception as exc:  # a truncated or foreign file: zip, unpickling (weights_only) or field errors
        raise StxError(
            f"the checkpoint {path.name} of this run cannot be read as an stx checkpoint ({files.problem(exc)}); "
            f"it was truncated or replaced. Start a new run instead of resuming this one."
        ) from exc


def download_artifact(
    client: MlflowClient, run_id: str, path: str, folder: Path, hint: str = "only runs made by stx hold it"
) -> Path:
    """Download artifact ``path`` of ``run_id`` into ``folder``; a missing one raises with ``hint``."""
    from mlflow.exceptions import MlflowException

    try:
        return Path(client.download_artifacts(run_id, path, str(folder)))
    except (MlflowException, OSError) as exc:
        raise StxError(f"run {run_id} has no artifact {path!r} ({exc}); {hint}.") from exc


LEGACY_VALUES = {
    "color": {"_target_": "stx.engine.color.ColorControl"},
    "schedule.tile": "off",
    "encoder.softmax": None,
    "tracking.flush_seconds": 5.0,
    "encoder.layers": {"content": {}, "style": {}, "patch": {}},  # its losses named their layers themselves
    "objective.limits": {},
    "objective.penalty": 0.0,
}
"""Config keys added after runs were logged without them: the value that does what stx did
before the key existed, filled in when such a run is reproduced, resumed or promoted."""


MOVED_MODULES = {f"stx.{name}": f"stx.{package}.{name}" for package, names in {
    "engine": ("color", "encoders", "lbfgs", "losses"), "fast": ("transformer",)}.items() for name in names}
"""Where the modules a logged ``_target_`` names moved when stx was split into layers: runs
logged before then name ``stx.losses.GramStyleLoss``, now ``stx.engine.losses.GramStyleLoss``."""


def find_run(client: MlflowClient, ref: str) -> Run | None:
    """The run whose id is ``ref``, else the one whose id starts with it (the 8-character ids
    ``stx compare`` prints), else None; :class:`StxError` when several ids start with it."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    matches = []
    if re.fullmatch(r"[0-9a-f]{4,31}", ref):
        for experiment in client.search_experiments(view_type=ViewType.ALL):
            runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=50000)
            matches += [run for run in runs if run.info.run_id.startswith(ref)]
    if len(matches) > 1:
        ids = ", ".join(run.info.run_id for run in matches[:5])
        raise StxError(f"run id {ref!r} is the start of {len(matches)} runs' ids in {client.tracking_uri} ({ids}"
                       f"{', …' if len(matches) > 5 else ''}); give more of it.")
    return matches[0] if matches else None


PLAIN_YAML_BYTES = 1_000_000
PLAIN_YAML_NODES = 100_000
"""Bounds on a YAML file read back from a store (a logged config is some 10 kB and 1,000 nodes)."""


def plain_yaml(path: Path) -> object:
    """The YAML file at ``path`` as plain data, bounded: at most :data:`PLAIN_YAML_BYTES` bytes and
    :data:`PLAIN_YAML_NODES` nodes, with no anchors or aliases (nine levels of nine aliases expand to
    387 M leaves) and no tags (``yaml.safe_load``); raises ``ValueError`` or ``yaml.YAMLError``."""
    if (size := path.stat().st_size) > PLAIN_YAML_BYTES:
        raise ValueError(f"{size} bytes, more than the {PLAIN_YAML_BYTES} stx reads")
    text = path.read_text()
    for count, event in enumerate(yaml.parse(text, Loader=yaml.SafeLoader)):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ValueError("it uses YAML anchors or aliases, which stx never writes")
        if count > PLAIN_YAML_NODES:
            raise ValueError(f"more than {PLAIN_YAML_NODES} nodes")
    return yaml.safe_load(text)


def read_logged_config(path: Path, run_id: str) -> DictConfig:
    """A logged ``config.yaml`` read as data: plain YAML (no tags), and no interpolation left in
    it (stx logs resolved configs, so a ``${…}`` was put there by hand, e.g. ``${oc.env:SECRET}``,
    which would read this machine's environment into the store)."""
    try:
        data = plain_yaml(path)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:
        raise StxError(f"the config logged with run {run_id} ({path.name}) is not plain YAML "
                       f"({str(exc).splitlines()[0]}); stx reads logged configs as data only.") from exc
    if not isinstance(data, dict):
        raise StxError(f"the config logged with run {run_id} ({path.name}) is not a mapping of keys.")
    for key, value in _leaves(data):
        if isinstance(value, str) and "${" in value:
            raise StxError(
                f"the config logged with run {run_id} has {key}={value!r}: an interpolation, which stx never "
                f"logs (its configs are resolved) and will not resolve from a store (it could read this "
                f"machine's environment or files); the artifact was edited. Re-run from your own config instead."
            )
    config = OmegaConf.create(data)
    for key, value in _leaves(data):
        module, _, name = str(value).rpartition(".")
        if key.rpartition(".")[2] == "_target_" and module in MOVED_MODULES:
            OmegaConf.update(config, key, f"{MOVED_MODULES[module]}.{name}")
    return config


def _leaves(node: object, prefix: str = ""):
    """``(dotted key, value)`` of every leaf of nested dicts and lists."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        yield prefix.rstrip("."), node
        return
    for key, value in items:
        yield from _leaves(value, f"{prefix}{key}.")


def _logged_input(folder: Path, run_id: str) -> Path:
    """The one image file a run logged in ``folder`` (``inputs/content``, ``inputs/style_<i>``)."""
    files = sorted(path for path in folder.iterdir() if path.is_file()) if folder.is_dir() else []
    if len(files) != 1:
        found = ", ".join(path.name for path in files) or "nothing"
        raise StxError(f"run {run_id} logged {found} in {folder.parent.name}/{folder.name}, where stx logs exactly one "
                       f"input image: the artifacts do not match its config.yaml (edited?).")
    return files[0]


def load_run_config(client: MlflowClient, run_id: str, folder: Path, runs_dir: str, uri: str) -> DictConfig:
    """The run's resolved config, checked against stx's schema (keys it predates filled in from
    :data:`LEGACY_VALUES`), reading its logged input images (downloaded into ``folder/inputs``)
    and writing to ``runs_dir`` and ``uri``."""
    loaded = read_logged_config(download_artifact(client, run_id, CONFIG, folder), run_id)
    tags = client.get_run(run_id).data.tags
    if tags.get(TAG_KIND) == "train":
        raise StxError(f"run {run_id} was made by stx train, not by stx: reproduce, promote and resume here take "
                       f"image-optimisation runs; continue a training run with stx train resume={run_id}.")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(StxSchema), loaded)
    except OmegaConfBaseException as exc:
        raise StxError(f"the config logged with run {run_id} does not fit stx's schema: "
                       f"{str(exc).splitlines()[0]}; the artifact was edited or is not stx's.") from exc
    for key, value in LEGACY_VALUES.items():
        parent, _, name = key.rpartition(".")
        if OmegaConf.is_missing(OmegaConf.select(cfg, parent) if parent else cfg, name):
            OmegaConf.update(cfg, key, value)
    if OmegaConf.is_missing(cfg.judge, "weights"):  # judged before the judge had its own keys
        cfg.judge.arch, cfg.judge.weights = "vgg19", cfg.encoder.weights
    if cfg.encoder.weights == "auto" and tags.get(TAG_WEIGHTS) in ("imagenet", "caffe", "hed"):
        cfg.encoder.weights = tags[TAG_WEIGHTS]  # what auto took there, not what it would take here
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise StxError(f"the config logged with run {run_id} lacks {', '.join(missing)}, which every stx run logs: "
                       f"the artifact was edited or is not stx's.")
    download_artifact(client, run_id, INPUTS, folder)
    content = _logged_input(folder / content_dir(), run_id)
    styles = [_logged_input(folder / style_dir(index), run_id) for index in range(len(cfg.images.styles))]
    cfg.images.content, cfg.images.styles = str(content), [str(style) for style in styles]
    if cfg.schedule.init_image is not None:  # a path on the machine that ran it: its logged copy is read instead
        if not (folder / init_dir()).is_dir():
            raise StxError(f"run {run_id} started from schedule.init_image={cfg.schedule.init_image!r} but logged no "
                           f"copy of it in {init_dir()} (made before stx logged start images, or edited), and stx "
                           f"reads no path that a stored run names. Run it again with your copy of that image: "
                           f"stx schedule.init_image=<file> and the run's other settings (its params).")
        cfg.schedule.init_image = str(_logged_input(folder / init_dir(), run_id))
    # artifacts go under this runs folder as the local store puts them, never where a logged path points
    local = cfg.tracking.artifact_location == f"{cfg.runs_dir}/artifacts"
    cfg.tracking.artifact_location = f"{runs_dir}/artifacts" if local else None
    cfg.runs_dir, cfg.tracking.uri = runs_dir, uri
    return cfg
