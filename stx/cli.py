"""The ``stx`` command: a Hydra app running one job (``stx key=value …``) or a sweep (``stx -m …``)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from stx.config import CONF_DIR
from stx.errors import StxError

log = logging.getLogger("stx")


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    from stx.runner import run_job  # torch & mlflow load after Hydra has parsed the command line

    try:
        return run_job(cfg)
    except StxError as error:
        log.error("%s", error)
        print(f"stx: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("stx: interrupted; the latest image was written and the MLflow run marked KILLED.", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    hydra_main()


if __name__ == "__main__":
    main()
