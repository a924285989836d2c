"""The sweep objective: weighted metrics plus a penalty for each limit a run misses (objective=keeper)."""

import pytest

from stx.errors import ConfigError
from stx.runs.objectives import Objective

KEEPER = Objective(metrics={"style_distance": 1.0}, pareto=False, limits={"structure": 0.35}, penalty=10.0)


def evaluation(style: float, structure: float, content: float = 1.0) -> dict[str, float]:
    return {"style_distance": style, "structure": structure, "content_distance": content}


def test_a_run_that_keeps_the_structure_ranks_by_its_style_distance_alone():
    assert KEEPER(evaluation(0.4, 0.5)) == pytest.approx(0.4)
    assert KEEPER(evaluation(0.4, 0.35)) == pytest.approx(0.4)


def test_a_run_that_lost_the_subject_ranks_below_every_run_that_kept_it():
    texture = evaluation(0.2, 0.05)  # the style's texture: all of the style, none of the photo
    untouched = evaluation(1.0, 1.0)  # the photo: none of the style
    assert KEEPER(texture) == pytest.approx(0.2 + 10 * 0.30)
    assert KEEPER(evaluation(0.6, 0.36)) < KEEPER(untouched) < KEEPER(texture)


def test_a_limit_on_a_distance_is_a_ceiling():
    objective = Objective(metrics={"style_distance": 1.0}, pareto=False, limits={"content_distance": 1.2}, penalty=2.0)
    assert objective(evaluation(0.3, 0.5, content=1.5)) == pytest.approx(0.3 + 2 * 0.3)
    assert objective(evaluation(0.3, 0.5, content=1.1)) == pytest.approx(0.3)


def test_pareto_entries_each_carry_the_penalty():
    objective = Objective(metrics={"style_distance": 1.0, "content_distance": 0.5}, pareto=True,
                          limits={"structure": 0.35}, penalty=10.0)
    assert objective(evaluation(0.4, 0.25, content=1.0)) == pytest.approx([0.4 + 1.0, 0.5 + 1.0])


@pytest.mark.parametrize("settings, message", [
    ({"limits": {"sharpness": 0.3}}, r"objective\.limits names unknown metric\(s\) sharpness; valid metrics are"),
    ({"limits": {"structure": float("nan")}}, r"objective\.limits=.* is not valid: use finite numbers"),
    ({"penalty": -1.0}, r"objective\.penalty=-1\.0 is not valid: use a finite number >= 0"),
])
def test_bad_limits_and_penalties_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        Objective(**{"metrics": {"style_distance": 1.0}, "pareto": False, **settings})
