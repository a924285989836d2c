"""Reading tensor files (checkpoints, weights) safely: tensors and plain Python values only."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from stx.errors import first_line


def load_tensors(path: str | Path, device: torch.device | str = "cpu") -> object:
    """``torch.load`` of ``path`` onto ``device`` with ``weights_only``: a pickle of anything but
    tensors and plain values is refused, never run; torch's warnings about the file are muted
    (:func:`problem` says what was wrong in stx's words)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location=device, weights_only=True)


def problem(exc: Exception) -> str:
    """Why :func:`load_tensors` failed, in a few words (not torch's advice to load it unsafely)."""
    if isinstance(exc, pickle.UnpicklingError):
        return "it holds Python objects other than tensors and numbers, which stx never unpickles"
    return f"{type(exc).__name__}: {first_line(exc)[:300]}"
