"""The content images a feed-forward model trains on: every image file under a folder.

:func:`scan` walks ``data.content_dir`` recursively and keeps the files whose header Pillow
reads (any format it opens), counting the others as skipped; :func:`split` sets a fixed,
evenly spread held-out set aside for evaluation. :class:`ContentCrops` yields one random
``crop×crop`` crop per file, of the image resized so that its short edge is ``crop``; the crop
depends only on ``(seed, epoch, index)``, so the data order and crops survive a resume and do
not depend on the number of loader workers. A file that fails to decode later is dropped from
its batch (:func:`collate`) and counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from stx.engine.image import MIN_SIZE, image_shape, read_image
from stx.errors import ConfigError, ImageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ContentFiles:
    """The usable image files under a folder (sorted) and how many files were skipped."""

    paths: list[Path]
    skipped: int


def scan(folder: str | Path, minimum: int = MIN_SIZE) -> ContentFiles:
    """Every file under ``folder`` (recursive, sorted) that opens as an image with both edges
    at least ``minimum`` px; other files are skipped and counted (each logged at debug level)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.content_dir={str(folder)!r} is not a folder: give a folder of content images "
                          f"(searched recursively, any format Pillow opens).")
    paths, skipped = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            height, width = image_shape(path)
        except ImageError as exc:
            log.debug("skipped %s: %s", path, exc)
            skipped += 1
            continue
        if min(height, width) < minimum:
            log.debug("skipped %s: %d×%d px is under %d px", path, height, width, minimum)
            skipped += 1
            continue
        paths.append(path)
    return ContentFiles(paths, skipped)


def split(paths: Sequence[Path], holdout: int) -> tuple[list[Path], list[Path]]:
    """``(train, held_out)``: ``holdout`` files spread evenly over the sorted list are held out."""
    if holdout < 0 or holdout >= len(paths):
        raise ConfigError(
            f"data.holdout={holdout} is not valid for {len(paths)} usable content image(s): hold out at least 0 "
            f"and leave at least one image to train on."
        )
    picked = {round((i + 0.5) * len(paths) / holdout - 0.5) for i in range(holdout)} if holdout else set()
    return ([p for i, p in enumerate(paths) if i not in picked], [p for i, p in enumerate(paths) if i in picked])


def read_short_edge(path: Path, edge: int) -> torch.Tensor:
    """``path`` as a ``1×3×H×W`` image in [0, 1] resized so that its short edge is ``edge`` px."""
    height, width = image_shape(path)
    return read_image(path, max(MIN_SIZE, math.ceil(edge * max(height, width) / min(height, width))))


class ContentCrops(Dataset):
    """Item ``i`` of epoch ``epoch``: a random ``3×crop×crop`` crop of file ``i`` (see module
    docstring), or None when the file cannot be decoded. Set :attr:`epoch` before each epoch."""

    def __init__(self, paths: Sequence[Path], crop: int, seed: int) -> None:
        self.paths, self.crop, self.seed = list(paths), crop, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        try:
            image = read_short_edge(self.paths[index], self.crop)[0]
        except ImageError as exc:
            log.warning("skipped %s: %s", self.paths[index], exc)
            return None
        generator = seeded(self.seed, self.epoch, index)
        top = int(torch.randint(image.shape[1] - self.crop + 1, (1,), generator=generator))
        left = int(torch.randint(image.shape[2] - self.crop + 1, (1,), generator=generator))
        return image[:, top:top + self.crop, left:left + self.crop]


def seeded(*parts: int) -> torch.Generator:
    """A generator seeded by whole numbers: the same in every process (Python salts the hash of a
    string per process, not that of a tuple of ints), so a resumed run draws what it drew before."""
    return torch.Generator().manual_seed(hash(parts) & 0x7FFF_FFFF)


def collate(items: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, int]:
    """``(batch, skipped)``: the decodable crops stacked ``B×3×crop×crop`` (None if none) and
    how many items of the batch could not be decoded."""
    kept = [item for item in items if item is not None]
    return (torch.stack(kept) if kept else None), len(items) - len(kept)


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``count`` files in ``epoch`` (the same for every run with ``seed``)."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


class EpochSampler(torch.utils.data.Sampler[int]):
    """Yields :func:`epoch_order` of the dataset's current epoch, from position ``skip`` on."""

    def __init__(self, dataset: ContentCrops, skip: int = 0) -> None:
        self.dataset, self.skip = dataset, skip

    def __len__(self) -> int:
        return len(self.dataset) - self.skip

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(len(self.dataset), self.dataset.seed, self.dataset.epoch)
        yield from order[self.skip:]
