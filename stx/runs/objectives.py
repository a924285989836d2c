"""What a job returns to the sweeper, chosen by the config group ``objective``.

The value is computed from the run's final quality metrics (:mod:`stx.engine.judge`, logged as
``eval/<name>``), never from its loss: a loss scales with the score weights being swept, so an
optimiser minimising it would only drive the weights down.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from stx.engine.judge import METRICS
from stx.errors import ConfigError
from stx.runs.layout import OBJECTIVE_METRIC


@dataclass(frozen=True)
class Objective:
    """``Σ weight · metric`` over ``metrics`` (``{metric name: weight}``; give a metric that
    grows when better, such as ``ssim_content``, a negative weight), or, with ``pareto``, the
    list of ``weight · metric`` for each metric of non-zero weight (Optuna's multi-objective
    search, one direction per entry)."""

    metrics: Mapping[str, float]
    pareto: bool

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(METRICS))
        if unknown:
            raise ConfigError(
                f"objective.metrics names unknown metric(s) {', '.join(unknown)}; valid metrics are "
                f"{', '.join(METRICS)}."
            )
        weights = {name: float(weight) for name, weight in self.metrics.items()}
        if not all(math.isfinite(w) for w in weights.values()) or not any(weights.values()):
            raise ConfigError(f"objective.metrics={weights} is not valid: use finite weights, at least one not 0.")
        object.__setattr__(self, "metrics", {name: w for name, w in weights.items() if w != 0})

    def logged(self, value: float | list[float]) -> dict[str, float]:
        """The metrics a run logs for the value it returns: ``objective``, or with ``pareto`` one
        ``objective/<metric>`` per entry."""
        if not self.pareto:
            return {OBJECTIVE_METRIC: value}
        return {f"{OBJECTIVE_METRIC}/{name}": entry for name, entry in zip(self.metrics, value)}

    def __call__(self, evaluation: Mapping[str, float]) -> float | list[float]:
        """The sweeper's value from the final ``{metric: value}`` of a run."""
        terms = [weight * evaluation[name] for name, weight in self.metrics.items()]
        return terms if self.pareto else math.fsum(terms)
