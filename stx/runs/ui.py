"""``stx ui``: MLflow's UI on a store, opened on stx's view of an experiment's runs (see
:data:`stx.runs.store.VIEW_KEY`): sorted by objective, the quality metrics and swept params as columns."""

from __future__ import annotations

import os
import sys

from stx.runs import layout
from stx.runs.store import VIEW_KEY, existing_store, show_params, sweep_view, view_link
from stx.runs.tracking import TrackingError


def open_ui(uri: str, experiment: str, host: str, port: int, sweep: str | None = None) -> None:
    """Print the link to ``experiment``'s stx view, or with ``sweep`` (a sweep's parent run id) to a view of
    that sweep's runs only, and serve MLflow's UI on the store at ``uri`` (replacing this process); for a
    tracking server, whose UI is already up, print its link only."""
    client = existing_store(uri)
    key, what = VIEW_KEY, repr(experiment)
    if sweep is not None:
        parent = layout.find_run(client, sweep)
        if parent is None or layout.TAG_SWEEP not in parent.data.tags:
            raise TrackingError(f"stx ui {sweep}: the store {uri} has no sweep with that parent run id; give the id "
                                f"a sweep prints when it starts (stx: sweep parent MLflow run …), or leave it out to "
                                f"see every run of --experiment.")
        experiment = client.get_experiment(parent.info.experiment_id).name
        key, what = sweep_view(client, parent), f"sweep {parent.info.run_id} ({parent.info.run_name})"
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise TrackingError(f"--experiment={experiment!r}: the store {uri} has no such experiment (it has: {names}); "
                            f"give one of those, or run a job first (tracking.experiment names it).")
    show_params(client, found.experiment_id, [])  # an experiment from before stx kept this view gets it
    if uri.startswith(("http://", "https://")):
        print(f"stx: {what} in the MLflow UI: {view_link(uri, found.experiment_id, key)}", flush=True)
        return
    print(f"stx: {what} in the MLflow UI: {view_link(f'http://{host}:{port}', found.experiment_id, key)} "
          f"(Ctrl-C stops the UI)", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    # MLflow 3's server also starts GenAI job runners (7 processes polling at ~14 % of a CPU); stx's runs use none
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, command)
