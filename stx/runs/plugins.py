"""Trusted plugins: modules outside stx whose losses and encoders a config may name.

A module is trusted when the user says so in a way a run's config cannot: an installed package
declares it in the entry-point group ``stx.plugins`` (in its ``pyproject.toml``:
``[project.entry-points."stx.plugins"] myproject = "myproject.losses"``), or the environment
variable ``STX_PLUGINS`` lists it (comma-separated module names). Only the names are read here;
nothing is imported until a ``_target_`` inside a trusted module is built.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points

ENTRY_POINT_GROUP = "stx.plugins"
ENVIRONMENT_VARIABLE = "STX_PLUGINS"


def trusted_modules() -> tuple[str, ...]:
    """Names of the trusted plugin modules (entry points first, then ``$STX_PLUGINS``)."""
    declared = [point.value.split(":")[0].strip() for point in entry_points(group=ENTRY_POINT_GROUP)]
    listed = [name.strip() for name in os.environ.get(ENVIRONMENT_VARIABLE, "").split(",")]
    return tuple(dict.fromkeys(name for name in declared + listed if name))


def how_to_trust(module: str) -> str:
    """The sentence telling the user how to make ``module`` trusted."""
    return (
        f"to use your own code, declare its module in your package's entry points "
        f"([project.entry-points.\"{ENTRY_POINT_GROUP}\"] name = \"{module}\") and install it, or list it "
        f"in ${ENVIRONMENT_VARIABLE}"
    )
