"""The runner: Hydra configs in, MLflow runs out.

- :mod:`~stx.runs.schema`: the config's schema, checked at start-up; :mod:`~stx.runs.job`: one job
  assembled from a config (allow-listed ``_target_`` + ``instantiate``); :mod:`~stx.runs.objectives`:
  what a job returns to a sweeper.
- :mod:`~stx.runs.runner`: one tracked run; :mod:`~stx.runs.monitor`: what a run logs while it
  optimises; :mod:`~stx.runs.tracking`: the MLflow store; :mod:`~stx.runs.layout`: artifact names,
  tags and logged configs.
- :mod:`~stx.runs.callbacks`: Hydra callbacks (a sweep's parent run); :mod:`~stx.runs.interrupts`,
  :mod:`~stx.runs.liveness`: stopped and dead runs; :mod:`~stx.runs.startup`: loading torch and
  MLflow without the garbage collector's walks.
- :mod:`~stx.runs.compare`, :mod:`~stx.runs.reproduce`: closing the loop on logged runs;
  :mod:`~stx.runs.plugins`, :mod:`~stx.runs.project`: user code and ``stx init``.

A new launcher is a YAML file in ``conf/hydra/launcher/``; a new tracker store is a file in
``conf/tracking/``.
"""
