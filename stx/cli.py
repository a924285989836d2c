"""The ``stx`` command.

* ``stx key=value …`` runs one job, ``stx -m key=a,b …`` a sweep (a Hydra app; ``stx --help``).
* ``stx compare <parent-run-id | experiment>``: contact sheet and table of a sweep's runs.
* ``stx reproduce <run-id>``: re-run a logged run and report the max pixel difference.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from stx.errors import StxError
from stx.schema import CONF_DIR, runs_dir

log = logging.getLogger("stx")
COMMANDS = ("compare", "reproduce")


class _Task:
    started = False  # whether Hydra got as far as the task: errors before it are config mistakes


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    from stx.runner import hydra_task  # torch & mlflow load after Hydra has parsed the command line

    _Task.started = True
    try:
        return hydra_task(cfg)
    except (StxError, OmegaConfBaseException) as error:  # the latter: a value that cannot be resolved
        log.error("%s", error)
        print(f"stx: error: {error}", file=sys.stderr, flush=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return float("nan")  # the other jobs go on; the sweep callback fails the parent run
        sys.exit(2)
    except KeyboardInterrupt:
        print("stx: interrupted; the latest image was written and the MLflow run marked KILLED.", file=sys.stderr)
        sys.exit(130)


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir()}/mlflow.db"


def tool_main(argv: list[str]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", default=default_tracking_uri(),
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else the local runs/mlflow.db)")
    parser = argparse.ArgumentParser(prog="stx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    compare_parser = commands.add_parser("compare", parents=[common], help="contact sheet and table of a sweep's runs")
    compare_parser.add_argument("target", help="a sweep's parent run id, or an experiment name or id")
    compare_parser.add_argument("--out", type=Path, help="folder for contact_sheet.png and table.txt (default: runs/compare/<target>)")
    reproduce_parser = commands.add_parser("reproduce", parents=[common], help="re-run a logged run and compare its output")
    reproduce_parser.add_argument("run_id")
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            from stx.compare import compare

            sheet, text = compare(args.target, args.tracking_uri, args.out or Path(runs_dir()) / "compare" / args.target)
            print(text)
            print(f"stx: contact sheet {sheet}")
        else:
            from stx.reproduce import reproduce

            result, difference = reproduce(args.run_id, args.tracking_uri)
            print(f"stx: reproduced {args.run_id} as MLflow run {result.run_id}; max pixel difference to the "
                  f"original output: {difference}/255")
    except StxError as error:
        print(f"stx: error: {error}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        tool_main(sys.argv[1:])
        return
    # Hydra prints some composition errors (e.g. `loss=0`) as raw tracebacks; stx reports them.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        hydra_main()
    except Exception as error:
        if _Task.started:
            raise  # not a config mistake: a bug, whose traceback is wanted
        cause = f" ({error.__cause__})" if isinstance(error.__cause__, OmegaConfBaseException) else ""
        print(f"stx: error: {error}{cause}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
