"""The ``stx`` command.

* ``stx key=value …`` runs one job, ``stx -m key=a,b …`` a sweep (a Hydra app); ``stx --help`` lists
  the commands and config groups, ``stx --version`` the versions.
* ``stx compare <parent-run-id | experiment>``: contact sheet and table of a sweep's runs.
* ``stx reproduce <run-id>``: re-run a logged run and report the max pixel difference.
* ``stx promote <run-id> key=value …``: re-run a run with changes (a larger size) from its output.
* ``stx ui``: MLflow's UI on the store, opened on the runs table sorted by objective.
* ``stx init [dir]``: scaffold a project folder of your own (images, configs, presets).
* ``stx train key=value …``: train a feed-forward stylisation model (a Hydra app over ``conf/train.yaml``).
* ``stx stylize <model> <images or folders>``: stylise images with a trained model.
* ``stx serve --model <model> …``: an HTTP service stylising uploaded images.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import logging
import math
import os
import sys
import threading
from concurrent.futures import thread as futures_thread
from pathlib import Path
from typing import Callable, NoReturn

import hydra
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from stx.errors import StxError
from stx.runs import hydra_job, interrupts, joblog, startup, store_process
from stx.runs.schema import CONF_PACKAGE, runs_dir

COMMANDS = ("compare", "reproduce", "promote", "ui", "init", "stylize", "serve")


class _Task:
    started = False  # whether Hydra got as far as the task: errors before it are config mistakes


@hydra.main(config_path=f"pkg://{CONF_PACKAGE}", config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> float:
    def task(cfg: DictConfig) -> float:
        with startup.heavy_imports():  # torch loads after the command line is checked
            from stx.runs.runner import hydra_task

        return hydra_task(cfg)

    return run_task(task, cfg)


@hydra.main(config_path=f"pkg://{CONF_PACKAGE}", config_name="train", version_base="1.3")
def train_main(cfg: DictConfig) -> float:
    def task(cfg: DictConfig) -> float:
        with startup.heavy_imports():
            from stx.fast.train import hydra_task

        return hydra_task(cfg)

    return run_task(task, cfg)


def _kept(cfg: DictConfig) -> str:
    """What a stopped job left in its folder, as the end of a sentence: the image it wrote, if any."""
    from stx.runs.layout import INTERRUPTED

    if "output" not in cfg:  # stx train: its checkpoints
        return "its latest checkpoint kept, if it had written one"
    run_dir = Path(hydra_job.config().runtime.output_dir)
    for name, what in ((INTERRUPTED + cfg.output, "its latest image kept as"), (cfg.output, "its output written as")):
        if (run_dir / name).is_file():
            return f"{what} {run_dir / name}"
    return "no image kept (it stopped before its first step)"


def run_task(task: Callable[[DictConfig], float], cfg: DictConfig) -> float:
    """Run a Hydra app's ``task`` with stx's reports of mistakes and interrupts."""
    _Task.started = True
    try:
        check_choices()
        check_input_files(cfg)
        return task(cfg)
    except (StxError, OmegaConfBaseException) as error:  # the latter: a value that cannot be resolved
        joblog.to_file(f"stx: error: {error}", logging.ERROR)
        hydra_job.say(f"stx: error: {error}", error=True)
        if hydra_job.config().mode == RunMode.MULTIRUN:
            return float("nan")  # the other jobs go on; the sweep callback fails the parent run
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        in_thread = threading.current_thread() is not threading.main_thread()  # a batched sweep's job
        if not in_thread:
            interrupts.ignore()
        hydra_job.say(f"stx: {interrupt or 'interrupted'}; the job's MLflow run, if it had started, is marked KILLED "
                      f"and {_kept(cfg)}.", error=True)
        if in_thread:
            raise  # its launcher (stx.runs.launcher) ends the sweep once every job has closed its run
        if os.environ.get(MAIN_PID_ENV) == str(os.getppid()):
            # a worker process the sweep started itself (joblib's): its job is closed; end it, so that
            # the stopped sweep, which waits for its workers, need not wait for an idle worker
            sys.stdout.flush()
            os._exit(interrupts.exit_code(interrupt))
        sys.exit(interrupts.exit_code(interrupt))


def fail(message: str) -> NoReturn:
    """Stop the command with one paragraph on stderr and exit status 2 (a mistake the user can fix)."""
    print(f"stx: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def closest(name: str, valid: list[str], prefix: str = "") -> str:
    """`` Did you mean X?`` for the valid names closest to ``name`` (difflib), else nothing."""
    matches = [prefix + match for match in difflib.get_close_matches(name, valid, n=3)]
    return f" Did you mean {' or '.join(matches)}?" if matches else ""


def unknown_option(group: str, option: str, options: list[str]) -> str:
    """``group=option`` names no config file of the group (files starting with ``_`` are shared bases)."""
    valid = sorted(o for o in options if not o.startswith("_"))
    return f"{group}={option} is not an option of {group}.{closest(option, valid)} Options: {', '.join(valid)}."


def unknown_key(error: ConfigAttributeError | ConfigKeyError) -> str:
    """An override names a key that is not in the composed config; list the keys at its level."""
    parent, _, key = error.full_key.rpartition(".")
    node = error.parent_node
    valid = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    if not valid and parent.startswith("loss.") and parent.endswith(".layers"):
        term = parent.split(".")[1]
        return (f"{error.full_key} cannot be set alone: {parent} is the encoder's layer set it reads "
                f"(${{encoder.layers.content}}, style or patch; `stx --cfg job` shows which). Set the weight there, "
                f"e.g. encoder.layers.{'content' if term == 'content' else 'style'}.{key}=…, or replace the whole set: "
                f"'{parent}={{{key}: …}}'.")
    if not valid:
        return f"{error.full_key} is not a config key: {parent} is a value, with no keys under it."
    where = f"under {parent}" if parent else "at the top level"
    message = f"{error.full_key} is not a config key.{closest(key, valid, f'{parent}.' if parent else '')} " \
              f"Keys {where}: {', '.join(valid)}."
    if OmegaConf.get_type(node) is dict:  # free-form (loss terms, layer weights, optimiser arguments)
        message += f" To add a new key there instead, write +{error.full_key}=…"
    return message


def config_error_message(error: HydraException | OmegaConfBaseException) -> str:
    """One paragraph for a command-line mistake that Hydra or OmegaConf reports: the bad key,
    option or value, the closest valid ones and the valid set."""
    cause = error.__cause__
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, option = error.missing_cfg_file.rpartition("/")
        return unknown_option(group, option, list(error.options))
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        return unknown_key(cause)
    if isinstance(error, OverrideParseException):
        key, _, value = str(error.override).partition("=")
        if value.startswith("~"):  # the shell leaves ~ after = alone; Hydra's grammar reads it as "delete"
            expanded = os.path.expanduser(value)
            return (f"cannot parse the override {error.override!r}: the shell does not expand ~ after '=', and Hydra "
                    f"reads ~ as its delete operator; write the path out: {key}={expanded}" + (
                        "" if expanded != value else " (with your home folder in place of ~)") + ".")
        return f"cannot parse the override {error.override!r}: {one_line(error.message)}"
    if isinstance(cause, OmegaConfBaseException):  # e.g. a value of the wrong type
        reason = str(cause.msg).splitlines()[0].rstrip(".")  # the lines after it are OmegaConf internals
        override = one_line(str(error)).removeprefix("Error merging override ")
        key, _, value = override.partition("=")
        fix = f" It takes a list: '{key}=[{value}]' (quoted for the shell)." if "ListConfig, list or tuple" in reason else ""
        return f"{override} is not valid: {reason}.{fix}"
    return one_line(str(error))


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir()}/mlflow.db"


def port(text: str) -> int:
    """An argument that is a TCP port, 1–65535."""
    value = whole(text, 1)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a whole number from 1 to 65535")
    return value


def whole(text: str, least: int = 1) -> int:
    """An argument that is a whole number >= ``least``."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: give a whole number >= {least}")
    return value


def positive(text: str) -> float:
    """An argument that is a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: give a number > 0")
    return value


def folder(text: str) -> Path:
    """An argument that names a folder to write into: new, or an existing folder (not a file)."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file: give a folder (new or existing) to write the images into")
    return path


def tool_parser() -> argparse.ArgumentParser:
    """The parser of stx's commands other than a job and ``train`` (see :data:`COMMANDS`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", default=default_tracking_uri(),
                        help="MLflow store (default: $MLFLOW_TRACKING_URI, else the local runs/mlflow.db)")
    parser = argparse.ArgumentParser(prog="stx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    compare_parser = commands.add_parser("compare", parents=[common], help="contact sheet and table of a sweep's runs")
    compare_parser.add_argument("target", help="a sweep's parent run id, or an experiment name or id")
    compare_parser.add_argument("--out", type=Path, help="folder for contact_sheet.png and table.txt (default: "
                                "compare/<target> beside a local store, else in the runs folder)")
    reproduce_parser = commands.add_parser("reproduce", parents=[common], help="re-run a logged run and compare its output")
    reproduce_parser.add_argument("run_id")
    promote_parser = commands.add_parser("promote", parents=[common],
                                         help="re-run a run larger (key=value changes), starting from its output")
    promote_parser.add_argument("run_id")
    promote_parser.add_argument("overrides", nargs="*", help="e.g. schedule.size=1024 schedule.steps=300")
    ui_parser = commands.add_parser("ui", parents=[common], help="the MLflow UI on the store, opened on stx's runs "
                                    "table: sorted by objective, quality metrics and swept params as columns")
    ui_parser.add_argument("sweep", nargs="?", help="a sweep's parent run id: open that sweep's runs only, best first")
    ui_parser.add_argument("--experiment", default="stx", help="the experiment to open (default: stx)")
    ui_parser.add_argument("--host", default="127.0.0.1")
    ui_parser.add_argument("--port", type=port, default=5000)
    init_parser = commands.add_parser("init", help="scaffold a project folder: your images, configs and presets")
    init_parser.add_argument("folder", nargs="?", type=Path, default=Path("."), help="(default: the current folder)")
    stylize_parser = commands.add_parser("stylize", parents=[common], help="stylise images and clips with a trained model")
    stylize_parser.add_argument("model", help="a TorchScript or ONNX file, an MLflow model folder, a training run id, "
                                "runs:/<id>/model, models:/<name>/<version>, or a registered name[/version]")
    stylize_parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) and video clips "
                                "(.mp4, .mov, .mkv, .webm, .avi: written as .mp4, same frames, rate and audio)")
    stylize_parser.add_argument("--out", type=folder, default=Path("stylized"), help="output folder (default: stylized)")
    stylize_parser.add_argument("--size", type=whole, help="resize each image to this long edge, px (default: as is)")
    stylize_parser.add_argument("--batch-size", type=whole, default=4, help="images per batch (same size only; default 4)")
    stylize_parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    stylize_parser.add_argument("--measure", action="store_true", help="for clips: the result's warping error "
                                "(flicker, Lai et al.'s E_warp) beside the input's own, from optical flow")
    serve_parser = commands.add_parser("serve", parents=[common], help="HTTP service stylising uploaded images")
    serve_parser.add_argument("--model", action="append", default=[], metavar="[NAME=]MODEL",
                              help="a model to serve (as for stylize), at POST /stylize/NAME; repeatable")
    serve_parser.add_argument("--optimize", action="store_true",
                              help="also serve POST /optimize: image optimisation with the main config")
    serve_parser.add_argument("overrides", nargs="*", help="main-config overrides for --optimize, e.g. loss=gatys_tv")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=port, default=8000)
    serve_parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    serve_parser.add_argument("--max-upload-mb", type=positive, default=20.0, help="largest request body (default 20)")
    serve_parser.add_argument("--max-pixels", type=whole, default=16_000_000, help="most pixels per image (default 16M)")
    serve_parser.add_argument("--max-size", type=whole, default=1024,
                              help="largest size= a request may ask, px; uploads sent without size= are shrunk to it")
    serve_parser.add_argument("--max-steps", type=whole, default=300, help="most steps= an /optimize request may ask")
    serve_parser.add_argument("--workers", type=whole, default=2, help="requests processed at once (default 2)")
    serve_parser.add_argument("--queue", type=lambda text: whole(text, 0), default=8,
                              help="requests that may wait for a worker; more get 503 + Retry-After (default 8)")
    return parser


def parse_tool_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` (``compare …``, ``promote …``) parsed; ``key=value`` overrides may also follow
    options (``stx promote ID --tracking-uri U key=value``)."""
    parser = tool_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def tool_main(argv: list[str]) -> None:
    args = parse_tool_args(argv)
    try:
        if args.command == "stylize":
            from stx.fast.stylize import command

            command(args)
            return
        if args.command == "serve":
            from stx.fast.serve import command

            command(args)
            return
        if args.command == "init":
            from stx.runs.project import scaffold

            created = scaffold(args.folder)
            print("stx: created " + ", ".join(str(path) for path in created))
            print(f"stx: run it with: cd {args.folder} && stx -cd conf -cn project")
            return
        if args.command == "ui":
            from stx.runs.ui import open_ui

            open_ui(args.tracking_uri, args.experiment, args.host, args.port, args.sweep)
            return
        if args.command == "promote":
            from stx.runs.reproduce import promote

            result = promote(args.run_id, args.tracking_uri, args.overrides)
            print(f"stx: promoted {args.run_id} to MLflow run {result.run_id}; output {result.output}")
            return
        if args.command == "compare":
            from stx.runs.compare import compare, default_out_dir

            out = args.out or default_out_dir(args.tracking_uri, args.target)
            sheet, text = compare(args.target, args.tracking_uri, out)
            print(text)
            print(f"stx: contact sheet {sheet}")
        else:
            from stx.runs.layout import find_run
            from stx.runs.reproduce import reproduce, why_different
            from stx.runs.store import existing_store

            result, difference = reproduce(args.run_id, args.tracking_uri)
            original = find_run(existing_store(args.tracking_uri), args.run_id)
            print(f"stx: reproduced {args.run_id} as MLflow run {result.run_id}; max pixel difference to the "
                  f"original output: {difference}/255")
            if why := why_different(original.data.tags, difference):
                print(f"stx: {why}")
    except StxError as error:
        fail(str(error))


LAUNCHERS = ("hydra/launcher=stx_batched* (a sweep's jobs of one shape share each encoder pass)|basic|joblib|"
             "submitit_local|submitit_slurm|stx_slurm, hydra/sweeper=optuna|stx_optuna")


def overview(primary: str = "config") -> str:
    """``stx --help`` (``primary="config"``) or ``stx train --help`` (``"train"``): the commands
    and the config groups of that primary config, each option named (``*``: the default)."""
    import yaml

    from stx.runs.schema import CONF_DIR

    defaults = yaml.safe_load((CONF_DIR / f"{primary}.yaml").read_text())["defaults"]
    groups = {group: choice for entry in defaults if isinstance(entry, dict) for group, choice in entry.items()
              if not group.startswith("override ")}  # Hydra's own groups (the launcher) are listed apart
    width = max(map(len, groups))
    lines = []
    for group, choice in groups.items():
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))
        shown = [f"{o}*" if o == choice else o for o in options]
        lines.append(f"  {group:<{width}}  {', '.join(shown)}{'' if choice else '  (default: none)'}")
    if primary == "train":
        head = ("usage: stx train [group=option ...] [key=value ...]   train a feed-forward stylisation model\n"
                "       stx train -m key=a,b ...                        a sweep of trainings\n"
                "       stx train resume=<run id>                       continue a training run\n")
    else:
        actions = tool_parser()._subparsers._group_actions[0]._choices_actions
        commands = [(a.dest, a.help) for a in actions] + [("train", "train a feed-forward model (stx train --help)")]
        name_width = max(len(name) for name, _ in commands)
        head = ("usage: stx [group=option ...] [key=value ...]   one job: an image optimised, tracked in MLflow\n"
                "       stx -m key=a,b,c ...                      a sweep: a parent MLflow run, a child run per job\n"
                "       stx <command> ...\n\ncommands (stx <command> --help for each):\n"
                + "".join(f"  {name:<{name_width}}  {text}\n" for name, text in commands))
    return (f"{head}\nconfig groups (group=option; * the default):\n" + "\n".join(lines) + "\n\n"
            f"launchers and sweepers: {LAUNCHERS}\n"
            f"any key: key=value (stx{' train' if primary == 'train' else ''} --cfg job prints them all); "
            f"Hydra's own help: --hydra-help; documentation: docs/index.md")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    def of(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"

    return f"stx {of('stx')} (torch {of('torch')}, hydra-core {of('hydra-core')}, mlflow {of('mlflow')})"


def check_choices() -> None:
    """Refuse a private config file (a shared base such as ``schedule=_base``) chosen as an option."""
    for group, choice in hydra_job.config().runtime.choices.items():
        if isinstance(choice, str) and choice.rpartition("/")[2].startswith("_") and not group.startswith("hydra"):
            raise StxError(f"{group}={choice} is a shared base of the {group} group, not an option; "
                           f"stx --help lists the options.")


def check_input_files(cfg: DictConfig) -> None:
    """Refuse, before anything heavy loads, an input image path that names no file (the key named);
    what the files hold is checked when the job is built."""
    images = cfg.get("images") or {}
    given = {f"images.styles.{i}": path for i, path in enumerate(images.get("styles") or [])}
    if "trainer" not in cfg:  # stx train reads its content images from data.content_dir
        given.update({"images.content": images.get("content"), "schedule.init_image": cfg.schedule.get("init_image")})
    elif isinstance(folder := cfg.data.get("content_dir"), str) and not cfg.get("resume") \
            and not Path(to_absolute_path(folder)).expanduser().is_dir():
        raise StxError(f"data.content_dir={folder!r} is not a folder (relative paths are taken from the folder stx "
                       f"was started in, {os.getcwd()}): give a folder of content images (searched recursively).")
    for key, path in given.items():
        if path is not None and not isinstance(path, str):
            shown = OmegaConf.to_container(path) if isinstance(path, (DictConfig, ListConfig)) else path
            raise StxError(f"{key}={shown!r} is not valid: give the path of an image file (a string); e.g. "
                           f"'images.styles=[a.jpg,b.jpg]' for several styles.")
        if isinstance(path, str) and "://" not in path and not Path(to_absolute_path(path)).is_file():
            found = Path(to_absolute_path(path))
            what = ("a folder" if found.is_dir() else "not a regular file (a pipe, socket or device)") if found.exists() \
                else "no such file"
            raise StxError(f"{key}={path!r}: {what} (relative paths are taken from the folder stx was started "
                           f"in, {os.getcwd()}); give the path of an image file.")


def app_main(app: Callable[[], object] = hydra_main) -> None:
    """A Hydra app, with Hydra's and OmegaConf's reports of command-line mistakes in stx's form."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # raise them here rather than print them
    from hydra.core.plugins import Plugins
    from hydra_plugins.stx_launcher import BatchedLauncher

    # Hydra finds plugins by listing hydra_plugins' folders, which an editable install does not have
    Plugins.instance().register(BatchedLauncher)
    try:
        app()
    except (HydraException, OmegaConfBaseException) as error:
        fail(config_error_message(error))
    except Exception as error:
        if _Task.started:
            raise  # not a config mistake: a bug, whose traceback is wanted
        from submitit.core.utils import UncompletedJobError

        if isinstance(error, UncompletedJobError):  # a submitit job (SLURM) ended without a result: scancel, time limit
            head = " ".join(str(error).splitlines()[:2])  # job id, result file, state; the job's whole stderr follows
            print(f"stx: error: {head}; the job's logs are beside that file (*_log.err, *_log.out)", file=sys.stderr, flush=True)
            sys.exit(1)  # the sweep failed (the callbacks close its parent run FAILED); not a usage mistake
        fail(one_line(str(error)))


NO_JOBS = ("-c", "--cfg", "-i", "--info", "--hydra-help", "-sc", "--shell-completion", "-p", "--package")
"""Hydra's flags after which ``stx`` runs no job in this process (a print-out)."""


def logs_through_helper(args: list[str]) -> bool:
    """Whether the command line ``args`` (without ``train`` or a tool command) runs a new job or a
    sweep here, which log through the store's helper process (:mod:`stx.runs.store_process`); a
    resumed run reads its checkpoint with MLflow here."""
    return not any(arg in NO_JOBS or arg.startswith(("--cfg=", "resume=")) for arg in args)


MAIN_PID_ENV = "STX_MAIN_PID"
"""The process the ``stx`` command started in; a job in a child of it runs in a launcher's worker."""


def main() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ[MAIN_PID_ENV] = str(os.getpid())
    startup.command_process()
    interrupts.stop_on_signals()
    first, second = (sys.argv[1:3] + ["", ""])[:2]
    try:
        if first in ("-h", "--help") or (first == "train" and second in ("-h", "--help")):
            print(overview("train" if first == "train" else "config"))
        elif first in ("-V", "--version"):
            print(version())
        elif first in COMMANDS:
            tool_main(sys.argv[1:])
        elif first == "train":
            sys.argv = [sys.argv[0], *sys.argv[2:]]  # Hydra reads sys.argv
            app_main(train_main)
        else:
            if logs_through_helper(sys.argv[1:]):
                store_process.prestart()
                atexit.register(store_process.stop)
            app_main()
    except KeyboardInterrupt as interrupt:  # outside a job (the job reports its own)
        interrupts.ignore()
        print(f"stx: {interrupt or 'interrupted'}.", file=sys.stderr, flush=True)
        sys.exit(interrupts.exit_code(interrupt))


def run() -> NoReturn:
    """The ``stx`` console command: :func:`main`, then :func:`exit_without_teardown`."""
    try:
        main()
    except SystemExit as stop:
        exit_without_teardown(stop.code)
    except BrokenPipeError:  # stdout closed by its reader (stx --help | head): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        exit_without_teardown(0)
    exit_without_teardown(0)


def exit_without_teardown(code: int | str | None) -> NoReturn:
    """Exit as ``sys.exit(code)`` would, without the interpreter's teardown, which spends seconds
    garbage-collecting torch's, MLflow's and SQLAlchemy's objects after the work is done (3.5 s after
    a 1-step job on a loaded 2-core machine). The exit handlers (logging's flush, MLflow's, weakref
    finalizers) still run first; while a non-daemon thread is still running, or for a text exit
    code, the normal exit is taken. Executors' worker threads do not count: after the exit handlers
    (which may still use them) they are ended as the normal exit ends them, their pending work done.
    (MLflow keeps an idle pool for artifact uploads, which sent a sweep down the slow exit, 1.5–2 s,
    once in three.)"""
    workers = set(getattr(futures_thread, "_threads_queues", {}))  # CPython's registry of executors' threads
    others = [thread for thread in threading.enumerate() if thread is not threading.main_thread() and thread not in workers]
    if isinstance(code, str) or any(thread.is_alive() and not thread.daemon for thread in others):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the normal exit runs before the teardown
    end_executors = getattr(futures_thread, "_python_exit", None)  # the normal exit's hook for executors
    if end_executors is not None:
        end_executors()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
