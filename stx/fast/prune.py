"""Structural channel pruning of a feed-forward model, with Torch-Pruning's dependency graph.

Channels are removed, not masked: every convolution loses the chosen fraction of its output
channels (and the layers that read them their inputs; the channels a residual addition joins are
pruned together), so the saved and exported model is smaller and faster. Which channels go is
decided per group by the weights' magnitude (``l1``, ``l2``) or at random. The convolutions that
write the image (3 output channels) keep theirs. Torch-Pruning follows batch norm, not instance
norm, so ``model=mobile`` can be pruned and Johnson's network cannot.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stx.errors import ConfigError, StxError, first_line
from stx.fast.export import example_input

IMPORTANCE = ("l1", "l2", "random")
"""``prune.importance`` choices: the weights' L1 or L2 magnitude, or none (a baseline)."""


def start_and_prune(model: nn.Module, start: Callable[[torch.Tensor], torch.Tensor] | None, amount: float,
                    importance: str) -> nn.Module:
    """``model`` with the weights of ``start`` (``start_from``, as :func:`stx.fast.stylize.load_model` loads it:
    a TorchScript model of the same architecture; None: its own initial weights), then ``amount`` of its
    channels pruned (:func:`prune_channels`)."""
    if start is not None:
        if not isinstance(start, nn.Module):
            raise StxError("start_from is an ONNX file, whose weights stx does not read back: give the TorchScript "
                           "model of the same training run (model.torchscript.pt, or its run id).")
        try:
            model.load_state_dict(start.state_dict())
        except RuntimeError as exc:
            raise StxError(f"start_from is not a model of this config's architecture ({first_line(exc)}): give a "
                           f"model trained with the same model.* settings, unpruned.") from exc
    return prune_channels(model, amount, importance, example_input())


def prune_channels(model: nn.Module, amount: float, importance: str, example: torch.Tensor) -> nn.Module:
    """``model`` with ``amount`` (0 ≤ amount < 1) of each layer's channels removed, in place; ``example``
    is a ``1×3×H×W`` input its dependency graph is traced with. Returns ``model``."""
    import torch_pruning as tp

    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 <= amount < 1:
        raise ConfigError(f"prune.amount={amount!r} is not valid: give the fraction of channels to remove, "
                          f"from 0 (none) up to but not including 1.")
    if importance not in IMPORTANCE:
        raise ConfigError(f"prune.importance={importance!r} is not valid: use one of {', '.join(IMPORTANCE)}.")
    if amount == 0:
        return model
    if any(isinstance(module, nn.InstanceNorm2d) for module in model.modules()):
        raise ConfigError(f"prune.amount={amount}: {type(model).__name__} normalises with instance norm, which "
                          f"Torch-Pruning does not follow; prune model=mobile (batch norm) instead.")
    scores = {"l1": tp.importance.MagnitudeImportance(p=1), "l2": tp.importance.MagnitudeImportance(p=2),
              "random": tp.importance.RandomImportance()}[importance]
    image_writers = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == 3]
    training = model.training
    model.eval()
    tp.pruner.MagnitudePruner(model, example, importance=scores, pruning_ratio=amount,
                              ignored_layers=image_writers).step()
    return model.train(training)
