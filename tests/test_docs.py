"""The docs say what stx does: every ``stx …`` command that README.md and docs/*.md show is checked.

* Each command — a line of a ```bash block, or an inline code span starting with ``stx `` — is
  parsed as the ``stx`` command would parse it: the main app's and ``stx train``'s command lines
  by Hydra's own argument parser, and every ``key=value`` composed against the config tree with
  Hydra's compose API (each value of a sweep in turn), so a renamed key, option or group in the
  code fails here until the docs follow; the subcommands (``compare``, ``reproduce``,
  ``promote``, ``init``, ``stylize``, ``serve``) by the real parser of ``stx/cli.py``.
  Placeholders (``<run-id>``, ``<px>``) stand for any value; a ``key=<…>`` only needs its key.
* A handful of the small run commands really run, with tiny sizes (``slow``; through the ``stx``
  command's ``main``, in this process).
* Links between the pages, and the repository paths they name, exist.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shlex
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FAST, client_for, stx_here
from hydra import compose
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path, get_args_parser
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stx import cli
from stx.runs.project import scaffold
from stx.runs.schema import CONF_PACKAGE

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = "PLACEHOLDER"
"""What a ``<…>`` placeholder becomes: any value (a run id, a size, a file)."""
SEPARATORS = {"&&", "||", ";", "|"}
UNPARSEABLE = "<a line the shell cannot split>"


@dataclass(frozen=True)
class Shown:
    """One ``stx`` command as a page shows it: where, its text, and its arguments after ``stx``."""

    where: str
    text: str
    argv: tuple[str, ...]


def words(text: str) -> list[str]:
    """``text`` split as the shell would (comments dropped, ``$VAR`` and a leading ``~`` expanded),
    with each ``<placeholder>`` (or ``…``) one word and a usage line's ``[--option value]`` brackets dropped."""
    text = re.sub(r"<[^<>\n]*>|…", PLACEHOLDER, text)
    text = re.sub(r"\[(--[^\[\]]*)\]", r"\1", text)
    return [os.path.expanduser(os.path.expandvars(word)) for word in shlex.split(text, comments=True)]


def stx_commands(text: str) -> list[tuple[str, ...]]:
    """The ``stx`` commands in one shell line (``a && b``; environment assignments before a command)."""
    try:
        split = words(text)
    except ValueError:  # e.g. an unclosed quote
        return [(UNPARSEABLE, text)] if re.search(r"(^|[\s/])stx\s", text) else []
    found, segment = [], []
    for word in [*split, ";"]:
        if word not in SEPARATORS:
            segment.append(word)
            continue
        while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):
            segment.pop(0)
        if segment and (segment[0] == "stx" or segment[0].endswith("/stx")):
            found.append(tuple(segment[1:]))
        segment = []
    return found


def shown_commands(page: Path) -> list[Shown]:
    """Every ``stx`` command of ``page``: lines of its ```bash blocks, and inline code spans
    (which may wrap across lines of a paragraph) that start with ``stx ``."""
    name = page.relative_to(ROOT).as_posix()
    shown, prose = [], []
    lines = page.read_text().splitlines()
    fence, pending, start = None, "", 0
    for number, line in enumerate(lines, 1):
        if re.match(r"\s*```", line):
            fence = None if fence is not None else line.strip().strip("`").strip()
            prose.append("")
            continue
        if fence is None:
            prose.append(line)
            continue
        prose.append("")
        if fence != "bash":
            continue
        start = start or number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text, pending = " ".join((pending + line).split()), ""
        shown += [Shown(f"{name}:{start}", text, argv) for argv in stx_commands(text)]
        start = 0
    number = 1
    for paragraph in re.split(r"(\n[ \t]*\n)", "\n".join(prose)):
        for span in re.finditer(r"`([^`]+)`", paragraph):
            text = " ".join(span.group(1).split())
            if text.startswith("stx "):
                line = number + paragraph.count("\n", 0, span.start())
                shown += [Shown(f"{name}:{line}", text, argv) for argv in stx_commands(text)]
        number += paragraph.count("\n")
    return shown


SHOWN = [command for page in PAGES for command in shown_commands(page)]


def parse_subcommand(argv: list[str]) -> argparse.Namespace:
    """``stx <subcommand> …`` through the real parser of ``stx/cli.py`` (nothing runs)."""
    errors = io.StringIO()
    with redirect_stderr(errors):
        try:
            return cli.parse_tool_args([word if word != PLACEHOLDER else "1" for word in argv])
        except SystemExit:
            pass
    pytest.fail(f"stx {' '.join(argv)}: {' '.join(errors.getvalue().split())}")


@contextmanager
def stx_hydra(config_dir: Path | None = None):
    """Hydra set up as the ``stx`` command sets it up: stx's config package, plus ``config_dir``
    (``-cd``) in front of it."""
    search_path = create_config_search_path(f"pkg://{CONF_PACKAGE}")
    if config_dir is not None:
        search_path.prepend("command-line", config_dir.resolve().as_uri(), anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2("stx", search_path)
    try:
        yield GlobalHydra.instance().config_loader()
    finally:
        GlobalHydra.instance().clear()


def check_overrides(overrides: list[str], *, config_name: str, multirun: bool, config_dir: Path | None = None) -> None:
    """Compose ``overrides`` with the Hydra config (so ``hydra/launcher=…`` and ``hydra.…`` are
    checked too), each value of a sweep in turn; a ``key=<placeholder>`` needs only an existing key
    or config group."""
    def has_placeholder(override):
        return "=" in override and PLACEHOLDER in override.split("=", 1)[1]

    placeholders = [o.split("=", 1)[0].lstrip("+~") for o in overrides if has_placeholder(o)]
    given = [o for o in overrides if o != PLACEHOLDER and not has_placeholder(o)]
    base, sweeps = [], []
    for override in OverridesParser.create().parse_overrides(given):
        if not override.is_sweep_override():
            base.append(override.input_line)
            continue
        assert multirun, f"{override.input_line} is a sweep: the command needs -m"
        if override.is_discrete_sweep():
            values = list(override.sweep_string_iterator())
        elif override.is_interval_sweep():
            values = [str(override.value().start)]
        else:
            pytest.fail(f"{override.input_line}: this test cannot expand that sweep")
        base.append(f"{override.get_key_element()}={values[0]}")
        sweeps += [(len(base) - 1, f"{override.get_key_element()}={value}") for value in values[1:]]
    with stx_hydra(config_dir) as loader:
        for index, value in [(None, None), *sweeps]:
            now = base if index is None else base[:index] + [value] + base[index + 1:]
            cfg = compose(config_name, overrides=now, return_hydra_config=True)
        missing = object()
        for key in placeholders:
            if not loader.get_group_options(key):
                assert OmegaConf.select(cfg, key, default=missing) is not missing, f"{key}=<…>: {key} is neither a key nor a group"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The folder the docs' ``stx init myproject && cd myproject`` leaves you in, with the
    ``conf/loss/mine.yaml`` the docs tell you to add."""
    folder = tmp_path_factory.mktemp("docs") / "myproject"
    scaffold(folder)
    (folder / "conf" / "loss" / "mine.yaml").parent.mkdir(parents=True)
    (folder / "conf" / "loss" / "mine.yaml").write_text("defaults: [gatys, _self_]\n")
    return folder


def check(argv: tuple[str, ...], project: Path) -> None:
    """Fail unless ``stx *argv`` is a valid command line (see the module's docstring)."""
    assert not argv or argv[0] != UNPARSEABLE, f"the shell cannot split {argv[1]!r}"
    if argv and argv[0] in cli.COMMANDS:
        if len(argv) == 1:
            return  # the subcommand named in prose
        args = parse_subcommand(list(argv))
        if getattr(args, "overrides", None):  # promote's changes, serve --optimize's config
            check_overrides(args.overrides, config_name="config", multirun=False)
        return
    if argv in (("--help",), ("-h",), ("--version",), ("-V",), ("train", "--help")):
        return  # stx's own flags (stx/cli.py main)
    train = bool(argv) and argv[0] == "train"
    errors = io.StringIO()
    with redirect_stderr(errors):
        try:
            args = get_args_parser().parse_args(list(argv[1:] if train else argv))
        except SystemExit:
            pytest.fail(f"stx {' '.join(argv)}: {' '.join(errors.getvalue().split())}")
    config_dir = project / args.config_dir if args.config_dir else None
    name = args.config_name or ("train" if train else "config")
    check_overrides(args.overrides, config_name=name, multirun=args.multirun, config_dir=config_dir)


def test_the_docs_show_commands():
    """The extraction finds the commands (so that the check below cannot pass on nothing)."""
    pages = {shown.where.split(":")[0] for shown in SHOWN}
    assert len(SHOWN) >= 40 and {"README.md", "docs/running.md", "docs/fast-models-and-serving.md"} <= pages
    argvs = {shown.argv for shown in SHOWN}
    assert ("compare", PLACEHOLDER) in argvs and ("train", "--cfg", "job") in argvs  # a block line, an inline span


@pytest.mark.parametrize("shown", SHOWN, ids=[f"{s.where} {s.text}"[:120] for s in SHOWN])
def test_command_is_valid(shown, project, monkeypatch):
    monkeypatch.setenv("STX_RUNS_DIR", str(project / "runs"))
    try:
        check(shown.argv, project)
    except (HydraException, OmegaConfBaseException) as error:  # their reports of a bad override
        pytest.fail(f"{shown.where}: {shown.text}\n{type(error).__name__}: {error}")


BAD = ["stx loss.sytle.score_weight=1", "stx loss=gatyss", "stx -m color=none,lumnance", "stx seed=0,1",
       "stx experiment=<name> experimnt=x", "stx unknown=<x>", "stx resume=<run-id> schedul.steps=3",
       "stx train trainer.stepz=3", "stx train data.content_dir=~/photos", "stx --cfg jobs", "stx browse",
       "stx -cd conf -cn project loss=yours", "stx promote <run-id> schedule.sise=1024", "stx stylize <model>",
       "stx serve --models mosaic=mosaic"]
"""Commands the check must refuse, as stx does: an unknown key, option, group, flag or subcommand, a
sweep without -m, a missing argument, a value Hydra's grammar rejects (``~`` after ``=``)."""


@pytest.mark.parametrize("text", BAD)
def test_a_bad_command_fails(text, project, monkeypatch):
    monkeypatch.setenv("STX_RUNS_DIR", str(project / "runs"))
    (argv,) = stx_commands(text)
    with pytest.raises((pytest.fail.Exception, AssertionError, HydraException, OmegaConfBaseException)):
        check(argv, project)


E2E = {
    ("color=luminance",): [],
    ("loss=guided", "encoder.weights=random"): ["schedule.size=48"],
    ("-m", "loss.style.score_weight=1,5,20", "color=none,luminance"): [],
    ("--cfg", "job"): [],
}
"""Small run commands the docs show, run end to end with :data:`conftest.FAST` (and the extra
overrides given here) in place of their sizes and steps."""


def fast(argv: tuple[str, ...], extra: list[str]) -> list[str]:
    tiny = [*FAST, *extra]
    keys = {o.split("=", 1)[0] for o in tiny}
    return [a for a in argv if a.split("=", 1)[0].lstrip("+") not in keys] + ([] if "--cfg" in argv else tiny)


@pytest.mark.slow
def test_small_commands_run(tmp_path):
    assert set(E2E) <= {shown.argv for shown in SHOWN}, "a command run here is no longer in the docs"
    for argv, extra in E2E.items():
        result = stx_here(tmp_path, *fast(argv, extra))
        assert result.returncode == 0 and "Traceback" not in result.stderr, f"stx {' '.join(argv)}\n{result.stderr[-3000:]}"
    client = client_for(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("stx").experiment_id])
    assert len(runs) == 9 and {run.info.status for run in runs} == {"FINISHED"}  # 2 jobs, a sweep's parent and its 6 jobs


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(match) for match in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_and_paths_exist(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file) if file else page
        assert path.exists(), f"{page.name}: link to {target}: no such file"
        if anchor:
            assert anchor in anchors(path), f"{page.name}: link to {target}: no such heading"
    user_project = {"conf/project.yaml", "conf/experiment/quick_look.yaml", "conf/loss/mine.yaml"}  # stx init's, yours
    for span in re.findall(r"`([^`]+)`", text):
        for word in span.split():
            word = word.rstrip(".,:;)")
            if re.fullmatch(r"(stx|tests|conf|benchmarks|docs|\.ci)/[\w./-]*", word) and word not in user_project:
                assert (ROOT / word).exists(), f"{page.name}: `{word}` does not exist"
