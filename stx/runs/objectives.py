"""What a job returns to the sweeper, chosen by the config group ``objective``.

The value is computed from the run's final quality metrics (:mod:`stx.engine.judge`, logged as
``eval/<name>``), never from its loss: a loss scales with the score weights being swept, so an
optimiser minimising it would only drive the weights down.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from stx.engine.judge import METRICS
from stx.errors import ConfigError
from stx.runs.layout import OBJECTIVE_METRIC


def _check_metrics(key: str, metrics: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ConfigError(
            f"objective.{key} names unknown metric(s) {', '.join(unknown)}; valid metrics are {', '.join(METRICS)}."
        )
    values = {name: float(value) for name, value in metrics.items()}
    if not all(math.isfinite(v) for v in values.values()):
        raise ConfigError(f"objective.{key}={values} is not valid: use finite numbers.")
    return values


@dataclass(frozen=True)
class Objective:
    """``Σ weight · metric`` over ``metrics`` (``{metric name: weight}``; give a metric that
    grows when better, such as ``ssim_content``, a negative weight), plus ``penalty`` × how far each
    metric of ``limits`` (``{metric name: limit}``) falls short of its limit (below it for a metric that
    grows when better, such as ``structure``; above it for a distance), or, with ``pareto``, the list
    of ``weight · metric`` for each metric of non-zero weight, each plus that penalty (Optuna's
    multi-objective search, one direction per entry).

    A limit says what a picture must keep to be worth ranking at all: with ``limits: {structure: 0.35}``
    a run that lost the photo's subject ranks below every run that kept it, by how much it lost."""

    metrics: Mapping[str, float]
    pareto: bool
    limits: Mapping[str, float] = field(default_factory=dict)
    penalty: float = 0.0

    def __post_init__(self) -> None:
        weights = _check_metrics("metrics", self.metrics)
        if not any(weights.values()):
            raise ConfigError(f"objective.metrics={weights} is not valid: use finite weights, at least one not 0.")
        object.__setattr__(self, "metrics", {name: w for name, w in weights.items() if w != 0})
        object.__setattr__(self, "limits", _check_metrics("limits", self.limits))
        penalty = float(self.penalty)
        if not (math.isfinite(penalty) and penalty >= 0):
            raise ConfigError(f"objective.penalty={self.penalty!r} is not valid: use a finite number >= 0, e.g. 10.")
        object.__setattr__(self, "penalty", penalty)

    def shortfall(self, evaluation: Mapping[str, float]) -> float:
        """How far the run's metrics fall short of :attr:`limits`, summed (0 when every limit is met)."""
        return math.fsum(max(0.0, limit - evaluation[name]) if METRICS[name] == "maximize"
                         else max(0.0, evaluation[name] - limit) for name, limit in self.limits.items())

    def logged(self, value: float | list[float]) -> dict[str, float]:
        """The metrics a run logs for the value it returns: ``objective``, or with ``pareto`` one
        ``objective/<metric>`` per entry."""
        if not self.pareto:
            return {OBJECTIVE_METRIC: value}
        return {f"{OBJECTIVE_METRIC}/{name}": entry for name, entry in zip(self.metrics, value)}

    def __call__(self, evaluation: Mapping[str, float]) -> float | list[float]:
        """The sweeper's value from the final ``{metric: value}`` of a run."""
        penalty = self.penalty * self.shortfall(evaluation)
        terms = [weight * evaluation[name] for name, weight in self.metrics.items()]
        return [term + penalty for term in terms] if self.pareto else math.fsum(terms) + penalty
