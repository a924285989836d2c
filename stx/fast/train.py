"""``stx train``: train a feed-forward stylisation model, tracked like an optimisation run.

One training job is one MLflow run (experiment ``stx-train`` by default) holding the resolved
config as params and ``config.yaml``, the style images under ``inputs/``, every loss term per
step (``metrics_every``), ``data/skipped`` (files that failed to decode), ``lr`` and, every
``tracking.image_every`` steps and at the end, the held-out images stylised (one grid, the image
series ``image``) and their mean quality metrics ``eval/…`` (:mod:`stx.engine.judge`). Checkpoints
(model, optimiser and schedule state) every ``trainer.checkpoint_every`` steps; ``stx train
resume=<run id>`` continues a run from its last one with the same data order and crops. At the
end the model is exported (:mod:`stx.fast.export`): TorchScript and ONNX files under ``export/`` and
the MLflow model ``model`` (registered as ``tracking.register_as`` when set). With ``distill.teacher``
(a trained model, as ``stx stylize`` takes it) the model also learns the teacher's outputs: ``distill``,
the mean squared pixel difference, is logged and added to the loss times ``distill.weight``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import to_absolute_path
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from torch.utils.data import DataLoader
from torchvision.utils import make_grid

from stx.engine import files
from stx.engine.image import MIN_SIZE, check_size, read_image
from stx.engine.judge import Judge
from stx.engine.losses import PerceptualObjective
from stx.engine.temporal import inside, warp_batch
from stx.engine.temporal import random_flows as temporal_flows
from stx.errors import ConfigError, NonFiniteLossError, StxError
from stx.fast import data, export
from stx.fast.cost import median_latency, multiply_adds
from stx.fast.prune import start_and_prune
from stx.fast.stylize import load_models
from stx.runs import hydra_job, interrupts, layout
from stx.runs.job import build, build_encoder, build_judge, objective_of, resolve_device, style_weights
from stx.runs.monitor import peak_memory_bytes, step_bar
from stx.runs.objectives import Objective
from stx.runs.schema import TrainSchema
from stx.runs.store import opened
from stx.runs.tracking import RunTracker, device_tags, hydra_tags, source_tags, tracking_uri

log = logging.getLogger(__name__)

RESUME_KEEPS = ("resume", "tracking", "tracking.uri", "runs_dir", "trainer.steps", "trainer.checkpoint_every")
"""Overrides ``stx train resume=…`` accepts; the rest of the config is the one the run logged."""


@dataclass
class Training:
    """Everything one training run needs, built and checked from a config."""

    model: torch.nn.Module
    loss: PerceptualObjective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    dataset: data.ContentCrops
    held_out: torch.Tensor
    """``N×3×S×S`` held-out images (``S = data.eval_size``) on the device."""
    judges: list[Judge]
    """One judge per held-out image, its references set."""
    style_paths: list[Path]
    device: torch.device
    objective: Objective
    skipped_files: int
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None
    """The model distilled from (``distill.teacher``): ``B×3×H×W`` in [0, 1] in, the same shape out."""
    distill_weight: float = 0.0


def build_training(cfg: DictConfig) -> Training:
    """Check ``cfg`` and build the :class:`Training` it describes (raises :class:`ConfigError`)."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"{exc.full_key} is not set: give it on the command line, e.g. "
                          f"stx train data.content_dir=/path/to/images.") from exc
    except OmegaConfBaseException as exc:
        raise ConfigError(f"the config cannot be resolved: {str(exc).splitlines()[0]}") from exc
    # The config is read into values top to bottom: settings and built parts (the judge last), sizes and
    # style images, the content data.
    cfg.data.content_dir = to_absolute_path(cfg.data.content_dir)  # logged absolute, for a resume from elsewhere
    trainer = cfg.trainer
    for key in ("batch_size", "steps"):
        if trainer[key] < 1:
            raise ConfigError(f"trainer.{key}={trainer[key]} is not valid: use a whole number >= 1.")
    unknown = sorted(set(trainer.export) - set(export.FORMATS))
    if unknown:
        raise ConfigError(f"trainer.export names unknown format(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(export.FORMATS)}.")
    if trainer.checkpoint_every < 0 or cfg.data.workers < 0:
        raise ConfigError("trainer.checkpoint_every and data.workers must be >= 0 (0: off / load in process).")
    for key in ("distill.weight", "temporal.weight", "temporal.shift", "temporal.elastic"):
        value = OmegaConf.select(cfg, key)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{key}={value} is not valid: use a finite number >= 0.")
    device = resolve_device(cfg.device)
    weights = style_weights(cfg.images)
    loss_set = {str(name): build(node, f"loss.{name}", "loss") for name, node in cfg.loss.items()}
    layers = frozenset().union(*(loss.layers for loss in loss_set.values()))
    encoder = build_encoder(cfg.encoder, layers) if layers else None
    first = build_judge(cfg, device) if cfg.data.holdout else None  # data.holdout > 0 holds images out
    crop = check_size(cfg.data.crop, "data.crop")
    eval_size = check_size(cfg.data.eval_size, "data.eval_size")
    style_paths = [Path(to_absolute_path(path)) for path in cfg.images.styles]
    styles = [read_image(path, check_size(trainer.style_size, "trainer.style_size")).to(device) for path in style_paths]
    files = data.scan(cfg.data.content_dir)
    if not files.paths:
        raise ConfigError(
            f"data.content_dir={cfg.data.content_dir!r} holds no usable content image ({files.skipped} file(s) "
            f"skipped: not an image Pillow opens, or under {MIN_SIZE} px on an edge): give a folder of photos "
            f"(searched recursively), e.g. COCO's train2014.")
    train_paths, held_paths = data.split(files.paths, cfg.data.holdout)
    if len(train_paths) < trainer.batch_size:
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} is more than the {len(train_paths)} training image(s) in "
            f"{cfg.data.content_dir} ({files.skipped} file(s) skipped, {len(held_paths)} held out): lower it or "
            f"add images."
        )
    dataset = data.ContentCrops(train_paths, crop, cfg.seed)
    held_out = torch.cat([centre_square(data.read_short_edge(held, eval_size), eval_size) for held in held_paths]) \
        if held_paths else torch.empty(0, 3, eval_size, eval_size)
    loss = PerceptualObjective(encoder, loss_set).to(device)
    loss.set_styles(styles, weights)
    judges = []
    for image in held_out:
        judge = Judge(first.encoder, name=first.name)
        judge.set_references(image[None].to(device), styles, weights)
        judges.append(judge)
    objective = objective_of(cfg)
    torch.manual_seed(cfg.seed)  # the model's initial weights
    model = build(cfg.model, "model", "model")
    make_optimizer = build(trainer.optimizer, "trainer.optimizer", "schedule.optimizer")
    make_scheduler = None if trainer.lr_schedule is None else \
        build(trainer.lr_schedule, "trainer.lr_schedule", "trainer.lr_schedule")
    start, teacher = load_models({"start_from": cfg.start_from, "distill.teacher": cfg.distill.teacher},
                                 tracking_uri(cfg.tracking), device)
    model = start_and_prune(model, start, cfg.prune.amount, cfg.prune.importance).to(device)
    optimizer = make_optimizer(model.parameters())  # of the pruned model's parameters
    scheduler = None if make_scheduler is None else make_scheduler(optimizer)
    return Training(model, loss, optimizer, scheduler, dataset, held_out.to(device), judges, style_paths, device,
                    objective, files.skipped, teacher, float(cfg.distill.weight))


COST_SIZE = 256
"""The frame edge (px) a trained model's multiply-adds and latency are measured at."""


def deployment_costs(model: torch.nn.Module, files: dict[str, Path]) -> dict[str, float]:
    """What a deployer compares: ``model/macs_256`` (multiply-adds per 256×256 frame), and per exported
    file ``export/<kind>_bytes`` and, for ONNX files, ``perf/latency_ms_256/<kind>``: the median of 20
    single-frame calls in ONNX Runtime on the CPU (its default threads: one per physical core)."""
    costs = {"model/macs_256": float(multiply_adds(model, COST_SIZE))}
    for kind, path in files.items():
        costs[f"export/{kind}_bytes"] = float(path.stat().st_size)
        if path.suffix == ".onnx":
            costs[f"perf/latency_ms_256/{kind}"] = 1000 * median_latency(export.OnnxModel(path), COST_SIZE)
    return costs


def centre_square(image: torch.Tensor, edge: int) -> torch.Tensor:
    """The central ``edge×edge`` square of a ``B×3×H×W`` image whose short edge is ``edge``."""
    top, left = (image.shape[-2] - edge) // 2, (image.shape[-1] - edge) // 2
    return image[..., top:top + edge, left:left + edge]


def hydra_task(cfg: DictConfig) -> float | list[float]:
    """The Hydra task of ``stx train``: train in Hydra's run dir; return the objective."""
    hydra_cfg = hydra_job.config()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    log_file = run_dir / f"{hydra_cfg.job.name}.log"
    tags = hydra_tags(hydra_cfg)
    if cfg.resume:
        cfg, tags = resumed_config(cfg, list(hydra_cfg.overrides.task), run_dir)
    return train(cfg, run_dir, tags, log_file=log_file, resume_run_id=cfg.resume or None)


def resumed_config(cfg: DictConfig, overrides: list[str], run_dir: Path) -> tuple[DictConfig, dict[str, str]]:
    """The config run ``cfg.resume`` logged, with the store, runs folder and the overrides of
    :data:`RESUME_KEEPS` taken from ``cfg``; any other override is refused."""
    refused = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in RESUME_KEEPS]
    if refused:
        raise StxError(
            f"resume={cfg.resume} continues the training run with the config it logged, so {', '.join(refused)} "
            f"cannot be applied; on resume only {', '.join(RESUME_KEEPS[1:])} may be given."
        )
    client = opened(tracking_uri(cfg.tracking))
    try:
        client.get_run(cfg.resume)
    except MlflowException as exc:
        raise StxError(f"resume={cfg.resume!r}: no such run in {cfg.tracking.uri}.") from exc
    logged = layout.read_logged_config(
        layout.download_artifact(client, cfg.resume, layout.CONFIG, run_dir / "resumed_from"), cfg.resume)
    if "trainer" not in logged:  # stx's image-optimisation runs have no trainer
        raise StxError(f"run {cfg.resume} was not made by stx train: stx train resume= continues training runs only; "
                       f"continue an image-optimisation run with stx resume={cfg.resume}.")
    try:
        original = OmegaConf.merge(OmegaConf.structured(TrainSchema), logged)
    except OmegaConfBaseException as exc:
        raise StxError(f"run {cfg.resume} is not an stx training run: its config.yaml does not fit ({exc}).") from exc
    for key in ("resume", "runs_dir", "tracking.uri", "trainer.steps", "trainer.checkpoint_every"):
        OmegaConf.update(original, key, OmegaConf.select(cfg, key))
    return original, {}


def train(
    cfg: DictConfig, run_dir: Path, tags: dict[str, str], *, log_file: Path | None = None,
    resume_run_id: str | None = None,
) -> float | list[float]:
    """Train the model ``cfg`` describes inside one MLflow run (or continue ``resume_run_id``
    from its checkpoint); return the objective of the final held-out metrics."""
    job = build_training(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    tracker = RunTracker(cfg.tracking, run_dir)
    tags = {**tags, **source_tags(), **device_tags(job.device), layout.TAG_RUN_DIR: str(run_dir),
            layout.TAG_KIND: "train", **({layout.TAG_JUDGE: job.judges[0].name} if job.judges else {})}
    start = 0
    if resume_run_id is not None:
        path = layout.download_artifact(opened(tracker.uri), resume_run_id, layout.CHECKPOINT, run_dir / "resumed_from",
                                        hint="it ran with trainer.checkpoint_every=0: there is nothing to resume from")
        start = load_state(job, path)
        tags[layout.TAG_RESUMED_AT_STEP] = str(start)
    if job.skipped_files:
        log.warning("%d file(s) under %s are not readable images and were skipped", job.skipped_files,
                    cfg.data.content_dir)
    previous_handlers = interrupts.stop_on_signals()
    try:
        with tracker.open(tags, run_id=resume_run_id, log_file=log_file) as run_id:
            if resume_run_id is None:
                tracker.log_config(cfg, run_dir, tags)
                for index, style in enumerate(job.style_paths):
                    tracker.log_artifact(style, layout.style_dir(index))
                tracker.log_metrics({"data/skipped_files": job.skipped_files, "data/train_images": len(job.dataset),
                                     "data/held_out_images": len(job.judges),
                                     "model/parameters": sum(p.numel() for p in job.model.parameters())}, 0)
            log.info("MLflow run %s in %s; %d steps of %d images on %s", run_id, tracker.uri, cfg.trainer.steps,
                     cfg.trainer.batch_size, job.device)
            evaluation = Loop(job, cfg, tracker, run_dir, start).run()
            crops = (job.dataset[index] for index in range(min(len(job.dataset), export.CALIBRATION_IMAGES)))
            calibration = [crop[None] for crop in crops if crop is not None] if "onnx_int8" in cfg.trainer.export else []
            files = {kind: export.export_file(job.model, run_dir, kind, calibration) for kind in cfg.trainer.export}
            for path in files.values():
                tracker.log_artifact(path, layout.EXPORT_DIR)
            tracker.log_metrics(deployment_costs(job.model, files), cfg.trainer.steps)
            tracker.flush()
            uri = export.log_model(job.model, run_id, tracker.uri, cfg.tracking.register_as)
            objective = job.objective(evaluation) if evaluation else float("nan")
            if evaluation:
                tracker.log_metrics(job.objective.logged(objective), cfg.trainer.steps)
    finally:
        interrupts.restore(previous_handlers)
    registered = f", registered as '{cfg.tracking.register_as}'" if cfg.tracking.register_as else ""
    print(f"stx: trained {cfg.trainer.steps} steps; model runs:/{run_id}/{export.MODEL_NAME} ({uri}){registered}; "
          f"run dir {run_dir}; MLflow run {run_id} (experiment '{cfg.tracking.experiment}', {tracker.uri})", flush=True)
    return objective


class Loop:
    """The training steps from ``start`` to ``cfg.trainer.steps``, each reported to ``tracker``
    and a progress bar, with held-out evaluation, samples and checkpoints."""

    def __init__(self, job: Training, cfg: DictConfig, tracker: RunTracker, run_dir: Path, start: int) -> None:
        self.job, self.cfg, self.tracker, self.run_dir = job, cfg, tracker, run_dir
        self.step = start
        self.steps = int(cfg.trainer.steps)
        self.batch_size = int(cfg.trainer.batch_size)
        self.per_epoch = len(job.dataset) // self.batch_size

    def run(self) -> dict[str, float]:
        """Train to the last step; return the final held-out metrics (empty without a held-out set)."""
        job, started, images = self.job, time.perf_counter(), 0
        progress = step_bar(self.steps, "stx train", self.step)
        job.model.train()
        try:
            while self.step < self.steps:
                for batch, skipped in self.loader():
                    self.step += 1
                    values = self.train_step(batch) if batch is not None else {}
                    images += 0 if batch is None else batch.shape[0]
                    self.report(values, skipped)
                    progress.set_postfix(loss=f"{values.get('total', float('nan')):.4g}", refresh=False)
                    progress.update()
                    if self.step >= self.steps:
                        break
        except KeyboardInterrupt:
            if self.step > 0:
                self.checkpoint()
            raise
        finally:
            progress.close()
        seconds = time.perf_counter() - started
        evaluation = self.evaluate()
        perf = {"peak_memory_bytes": float(peak_memory_bytes(job.device))}
        if images and seconds > 0:
            perf["images_per_second"] = images / seconds
        self.tracker.log_metrics({layout.PERF_PREFIX + k: v for k, v in perf.items()}, self.steps)
        if self.cfg.trainer.checkpoint_every:
            self.checkpoint()
        return evaluation

    def loader(self) -> DataLoader:
        """Batches of the current step's epoch, from the batch the step is at."""
        epoch, position = divmod(self.step, self.per_epoch)
        self.job.dataset.epoch = epoch
        sampler = data.EpochSampler(self.job.dataset, skip=position * self.batch_size)
        return DataLoader(self.job.dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=int(self.cfg.data.workers), collate_fn=data.collate)

    def train_step(self, batch: torch.Tensor) -> dict[str, float]:
        job = self.job
        batch = batch.to(job.device)
        job.loss.set_content(batch)
        output = job.model(batch)
        total, values = job.loss(output)
        if job.teacher is not None:
            with torch.no_grad():
                target = job.teacher(batch)
            values = {**values, "distill": (output - target).square().mean()}
            total = total + job.distill_weight * values["distill"]
        temporal = self.cfg.temporal
        if temporal.weight > 0:
            values = {**values, "temporal": self.temporal_difference(batch, output)}
            total = total + temporal.weight * values["temporal"]
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"the training loss became {total.item()} at step {self.step}; lower trainer.optimizer.lr or the "
                f"loss score weights.", self.step, batch[:1].detach())
        job.optimizer.zero_grad(set_to_none=True)
        total.backward()
        job.optimizer.step()
        if job.scheduler is not None:
            job.scheduler.step()
        measured = {**values, "total": total}
        return dict(zip(measured, torch.stack([v.detach().float() for v in measured.values()]).tolist()))

    def temporal_difference(self, batch: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Mean squared difference between the model's output on ``batch`` moved by a random flow and its
        ``output`` moved by the same flow, where the flow stays in the frame (the step's flows are fixed by
        the seed and the step, so a resumed run draws the same)."""
        temporal = self.cfg.temporal
        generator = data.seeded(self.cfg.seed, self.step, -1)  # -1: never a crop's index, so never its draws
        flows = temporal_flows(batch.shape[0], *batch.shape[-2:], temporal.shift, temporal.elastic,
                               generator).to(batch.device)
        kept = inside(flows)[:, None].to(batch.dtype)
        moved = self.job.model(warp_batch(batch, flows))
        difference = (moved - warp_batch(output, flows)).square() * kept
        return difference.sum() / (kept.sum() * batch.shape[1]).clamp_min(1)

    def report(self, values: dict[str, float], skipped: int) -> None:
        tracker, cfg = self.tracker, self.cfg
        if self.step % tracker.metrics_every == 0 or skipped:
            lr = self.job.optimizer.param_groups[0]["lr"]
            tracker.log_metrics({**values, "lr": lr, "data/skipped": float(skipped)}, self.step)
        if tracker.image_every > 0 and self.step % tracker.image_every == 0 and self.step < self.steps:
            self.evaluate()
        every = cfg.trainer.checkpoint_every
        if every and self.step % every == 0 and self.step < self.steps:
            self.checkpoint()
        if time.monotonic() - tracker.last_flush >= tracker.flush_seconds:
            tracker.flush()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Stylise the held-out images, log them as one grid and their mean ``eval/…`` metrics; with a
        teacher, also ``eval/psnr_teacher``: the outputs' PSNR (dB) against the teacher's."""
        job = self.job
        if not job.judges:
            return {}
        job.model.eval()
        outputs = torch.cat([job.model(image[None]) for image in job.held_out])
        job.model.train()
        self.tracker.log_image(make_grid(outputs, nrow=len(outputs), padding=2)[None], self.step)
        scores = [judge(output[None]) for judge, output in zip(job.judges, outputs)]
        mean = {name: sum(score[name] for score in scores) / len(scores) for name in scores[0]}
        if job.teacher is not None:
            taught = torch.cat([job.teacher(image[None]) for image in job.held_out])
            errors = (outputs - taught).square().flatten(1).mean(1).clamp_min(1e-10)
            mean["psnr_teacher"] = float((-10 * errors.log10()).mean())
        self.tracker.log_metrics({layout.EVAL_PREFIX + name: value for name, value in mean.items()}, self.step)
        return mean

    def checkpoint(self) -> None:
        job = self.job
        state = {"step": self.step, "model": job.model.state_dict(), "optimizer": job.optimizer.state_dict(),
                 "scheduler": job.scheduler.state_dict() if job.scheduler is not None else None}
        path = self.run_dir / layout.CHECKPOINT_FILE
        torch.save(state, path)
        self.tracker.log_checkpoint(path, self.step)


def load_state(job: Training, path: Path) -> int:
    """Load a training checkpoint into ``job``; return the step it was taken at."""
    try:
        state = files.load_tensors(path, job.device)
        job.model.load_state_dict(state["model"])
        job.optimizer.load_state_dict(state["optimizer"])
        if job.scheduler is not None and state["scheduler"] is not None:
            job.scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"its step {step!r} is not a count of steps")
    except Exception as exc:  # a truncated or foreign file: zip, unpickling (weights_only), keys or shapes
        raise StxError(f"the checkpoint {path.name} of this training run cannot be resumed from ({files.problem(exc)}); "
                       f"it was truncated or replaced. Start a new training run instead.") from exc
    return step
