"""``stx stylize``: apply a trained feed-forward model to many images.

A model is named by: a file (TorchScript ``.pt``/``.pth``, or ``.onnx`` run by ONNX Runtime), a
folder holding an MLflow model (``MLmodel``), a ``runs:/…`` or ``models:/…`` URI, a run id (its
model ``model``), or a registered name with an optional version (``name``, ``name/3``; latest
version when none). Images are stylised in batches of equal size (the network is fully
convolutional: any size works), optionally resized to a long edge first, and written as PNG
under the output folder, keeping their path relative to the folder they were found in.
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from stx.engine.image import MIN_SIZE, check_size, read_image, write_image
from stx.errors import StxError, first_line
from stx.fast import data, export
from stx.fast.video import is_video, stylize_clip

Model = Callable[[torch.Tensor], torch.Tensor]
"""A stylisation model: ``B×3×H×W`` images in [0, 1] in, the same shape out."""
RUN_ID = re.compile(r"[0-9a-f]{32}")
MODEL_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".onnx")
"""Suffixes that make a model reference a file's path (never a registered model's name)."""


def load_model(ref: str, tracking_uri: str, device: torch.device) -> Model:
    """The model ``ref`` names (see the module docstring), on ``device``, in eval mode.

    Nothing read here can run code: an MLflow model's file is loaded as a TorchScript archive
    (what ``stx train`` logs) and never unpickled (``mlflow.pytorch.load_model`` would
    ``torch.load`` it, so a pickle placed in a shared store would run on every reader).
    """
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".onnx":
            try:
                return export.OnnxModel(path, device)
            except Exception as exc:  # onnxruntime's own types (InvalidProtobuf, Fail, …)
                raise StxError(f"model file {str(path)!r} is not an ONNX model ONNX Runtime can run ({first_line(exc)}); "
                               f"give {export.ONNX_FILE} as stx train exported it.") from exc
        return _load_torchscript(path, device, f"model file {str(path)!r}")
    if path.suffix.lower() in MODEL_SUFFIXES:
        raise StxError(f"model file {str(path)!r} does not exist: give the path of a TorchScript or ONNX file, a run id "
                       f"of stx train, runs:/<id>/model, models:/<name>/<version> or a registered model name.")
    if path.is_dir() and (path / "MLmodel").is_file():
        uri, folder = str(path), path
    else:
        if ref.startswith(("runs:/", "models:/")):
            uri = ref
        elif RUN_ID.fullmatch(ref):
            uri = f"runs:/{ref}/{export.MODEL_NAME}"
        else:
            name, _, version = ref.partition("/")
            uri = f"models:/{name}/{version or 'latest'}"
        folder = _download_model(ref, uri, tracking_uri)
    return _load_torchscript(_model_file(folder, ref), device, f"the model {ref!r} ({uri})")


def load_models(refs: dict[str, str | None], tracking_uri: str, device: torch.device) -> list[Model | None]:
    """The models named by ``refs`` (a config key → a reference as :func:`load_model` takes it, or None
    for none), in order; an error names the key."""
    models = []
    for key, ref in refs.items():
        try:
            models.append(None if ref is None else load_model(ref, tracking_uri, device))
        except StxError as exc:
            raise StxError(f"{key}={ref!r}: {exc}") from exc
    return models


def _download_model(ref: str, uri: str, tracking_uri: str) -> Path:
    """The local folder of the MLflow model at ``uri`` (downloaded from the store when remote)."""
    import mlflow.artifacts

    try:
        with export.tracking_uri_set(tracking_uri), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:  # mlflow raises MlflowException, OSError or its own registry errors
        raise StxError(
            f"cannot load the model {ref!r} (as {uri}) from {tracking_uri}: {first_line(exc)}. Give a TorchScript or ONNX "
            f"file, an MLflow model folder, a run id of stx train, runs:/<id>/model, models:/<name>/<version> or a "
            f"registered model name."
        ) from exc


def _model_file(folder: Path, ref: str) -> Path:
    """The serialised model inside an MLflow model folder (its pytorch flavour's ``model_data``)."""
    import yaml

    from stx.runs.layout import plain_yaml

    try:
        meta = plain_yaml(folder / "MLmodel")
        data = meta["flavors"]["pytorch"]["model_data"]
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError) as exc:  # ValueError: not UTF-8
        raise StxError(
            f"the model {ref!r} has no readable pytorch flavour in {folder / 'MLmodel'} ({type(exc).__name__}: "
            f"{first_line(exc)}); give a model logged by stx train."
        ) from exc
    file = (folder / str(data) / "model.pth").resolve()
    if not file.is_relative_to(folder.resolve()):
        raise StxError(f"the model {ref!r} names model data outside its folder ({data!r}); refusing to read it.")
    return file


def _load_torchscript(path: Path, device: torch.device, what: str) -> Model:
    """A TorchScript archive, refusing anything else (pickles included) without unpickling it."""
    try:
        return export.load_torchscript(path, device)
    except (RuntimeError, ValueError, OSError) as exc:
        raise StxError(
            f"{what} is not a TorchScript model ({first_line(exc)}); stx loads only TorchScript and ONNX files, never "
            f"pickles, which can run code. Give a model written by stx train (export/{export.TORCHSCRIPT_FILE}, "
            f"{export.ONNX_FILE}, or its logged MLflow model)."
        ) from exc


@dataclass(frozen=True)
class Item:
    """One image to stylise: where it is, and where its result goes (relative to the output folder)."""

    source: Path
    target: Path


def collect(inputs: Sequence[str]) -> tuple[list[Item], int]:
    """``(items, skipped)``: each file given, and every image under each folder given
    (recursive; unreadable files skipped and counted). A missing path raises."""
    items, skipped = [], 0
    for given in inputs:
        path = Path(given).expanduser()
        if path.is_dir():
            found = data.scan(path)
            skipped += found.skipped
            items += [Item(file, file.relative_to(path).with_suffix(".png")) for file in found.paths]
        elif path.is_file():
            items.append(Item(path, Path(path.name).with_suffix(".png")))
        else:
            raise StxError(f"{given!r} is neither an image file nor a folder: give images or folders of images.")
    return _distinct_targets(items), skipped


def _distinct_targets(items: list[Item]) -> list[Item]:
    """Items whose results would overwrite each other (``a.png`` and ``a.jpg``) get distinct
    targets, the later ones named after their format too (``a_jpg.png``)."""
    seen: set[Path] = set()
    distinct = []
    for item in items:
        target, number = item.target, 1
        while target in seen:
            suffix = item.source.suffix.lstrip(".").lower()
            target = item.target.with_name(f"{item.target.stem}_{suffix}{'' if number == 1 else number}.png")
            number += 1
        seen.add(target)
        distinct.append(Item(item.source, target))
    return distinct


def batches(items: Sequence[Item], size: int | None, batch_size: int) -> Iterator[tuple[list[Item], torch.Tensor]]:
    """Consecutive items read (resized to long edge ``size`` when given) and stacked in batches
    of up to ``batch_size`` images of one shape."""
    pending: list[tuple[Item, torch.Tensor]] = []
    for item in items:
        image = read_image(item.source, size)
        if min(image.shape[-2:]) < MIN_SIZE:
            raise StxError(f"image {str(item.source)!r} is {image.shape[-2]}×{image.shape[-1]} px; stylising needs "
                           f"at least {MIN_SIZE} px on both edges.")
        if pending and (len(pending) == batch_size or pending[0][1].shape != image.shape):
            yield [i for i, _ in pending], torch.cat([t for _, t in pending])
            pending = []
        pending.append((item, image))
    if pending:
        yield [i for i, _ in pending], torch.cat([t for _, t in pending])


def checked_output(outputs: object, images: torch.Tensor) -> torch.Tensor:
    """A model's output for ``images`` (``B×3×H×W``) clamped to [0, 1], once it is seen to be
    ``B`` finite RGB (or grey) images; else :class:`StxError`."""
    batch = images.shape[0]
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 4 or outputs.shape[:1] != (batch,) \
            or outputs.shape[1] not in (1, 3):
        got = f"a {tuple(outputs.shape)} tensor" if isinstance(outputs, torch.Tensor) else f"a {type(outputs).__name__}"
        raise StxError(f"the model returned {got} for {batch} image(s); a stylisation model returns B×3×H×W images.")
    if not torch.isfinite(outputs).all():
        raise StxError("the model returned NaN or infinite values: it is broken (a diverged training?); "
                       "nothing was written for these images.")
    return outputs.clamp(0, 1)


@torch.no_grad()
def stylize(model: Model, items: Sequence[Item], out: Path, device: torch.device, *, size: int | None = None,
            batch_size: int = 4) -> list[Path]:
    """Stylise ``items`` with ``model`` and write them under ``out``; return the files written."""
    if size is not None:
        check_size(size, "--size")
    if batch_size < 1:
        raise StxError(f"--batch-size {batch_size} is not valid: use a whole number >= 1.")
    written = []
    with tqdm(total=len(items), desc="stx stylize", unit="image", dynamic_ncols=True) as progress:
        for group, images in batches(items, size, batch_size):
            outputs = checked_output(model(images.to(device)), images)
            for item, output in zip(group, outputs):
                written.append(write_image(output[None], out / item.target))
            progress.update(len(group))
    return written


def command(args: argparse.Namespace) -> None:
    """``stx stylize`` with its parsed arguments."""
    from stx.runs.job import resolve_device

    device = resolve_device(args.device)
    clips = [Path(given).expanduser() for given in args.images if is_video(Path(given)) and Path(given).expanduser().is_file()]
    images = [given for given in args.images if Path(given).expanduser() not in clips]
    items, skipped = collect(images) if images else ([], 0)
    if not items and not clips:
        raise StxError(f"no images found in {', '.join(args.images)} ({skipped} unreadable file(s) skipped).")
    model = load_model(args.model, args.tracking_uri, device)
    if items:
        written = stylize(model, items, args.out, device, size=args.size, batch_size=args.batch_size)
        note = f"; {skipped} unreadable file(s) skipped" if skipped else ""
        print(f"stx: stylised {len(written)} image(s) into {args.out}{note}")
    for clip in clips:
        result = stylize_clip(model, clip, args.out / clip.with_suffix(".mp4").name, device, size=args.size,
                              batch_size=args.batch_size, measure=args.measure)
        flicker = (f"; warping error {result.warping_error:.4g} (the input clip's own: {result.input_warping_error:.4g})"
                   if result.warping_error is not None else "")
        print(f"stx: stylised {result.frames} frame(s) of {clip} at {result.rate:g} frames/s into {result.path}{flicker}")
