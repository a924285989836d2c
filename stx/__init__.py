"""stx: config-driven neural style transfer. Three layers, each a package:
:mod:`stx.engine` (torch only), :mod:`stx.runs` (Hydra and MLflow) and :mod:`stx.fast`
(feed-forward stylisers); :mod:`stx.cli`, :mod:`stx.api` and :mod:`stx.errors` sit on top."""
