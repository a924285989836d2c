"""The layers: the engine imports no Hydra, OmegaConf or MLflow (so it can be used as a library);
no module imports from a layer above its own; stx's module-level imports have no cycle; a job's config
takes one straight path through the modules."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import stx

PACKAGE = Path(stx.__file__).parent
LAYERS = {"stx.errors": 0, "stx.engine": 1, "stx.runs": 2, "stx.fast": 3, "stx.cli": 4, "stx.api": 4, "stx.__main__": 4}


def module_name(path):
    return ".".join(("stx", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


def layer(module):
    return next(rank for prefix, rank in LAYERS.items() if module == prefix or module.startswith(prefix + "."))


def imports(path, top_level_only):
    """The stx modules ``path`` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stx"):
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("stx")}
    return found & set(MODULES)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts}


def test_the_engine_imports_no_hydra_omegaconf_or_mlflow():
    engine = sorted(m for m in MODULES if m.startswith("stx.engine."))
    assert len(engine) >= 10
    code = f"import sys; import {', '.join(engine)}; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not {"'hydra'", "'omegaconf'", "'mlflow'"} & set(loaded.strip("[]\n").split(", ")), loaded


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [(m, i) for m, p in MODULES.items() for i in imports(p, top_level_only=False) if layer(i) > layer(m)]
    assert not upward


def test_module_level_imports_have_no_cycle():
    graph = {m: imports(p, top_level_only=True) - {m} for m, p in MODULES.items()}
    done, active = set(), []

    def visit(module):
        assert module not in active, f"import cycle: {' -> '.join(active[active.index(module):] + [module])}"
        if module in done:
            return
        active.append(module)
        for target in graph[module]:
            visit(target)
        active.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_a_vgg_job_imports_neither_torchvision_nor_dynamo(tmp_path):
    """torchvision's import (models, ops, transforms) and torch._dynamo's (which torch.optim's
    wrapped methods import on first use) cost seconds of every job's start-up; a VGG job builds its
    encoder from the layer list, reads images with Pillow and torch, and steps stx's L-BFGS
    (checkpoints included) without either."""
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from stx.runs.schema import CONF_DIR\n"
        "from stx.runs.job import build_job\n"
        "from stx.engine.optim import OptimizationCallback, optimise_image\n"
        "import stx.runs.runner\n"
        "with initialize_config_dir(str(CONF_DIR), version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['encoder.weights=random', 'judge.weights=random', 'schedule.size=32',\n"
        "                                       'schedule.steps=3', 'schedule.checkpoint_every=1'])\n"
        "job = build_job(cfg)\n"
        "class Keep(OptimizationCallback):\n"
        "    def on_checkpoint(self, checkpoint): self.last = checkpoint\n"
        "keep = Keep()\n"
        "optimise_image(job.loss, content=job.content, styles=job.styles, style_weights=job.style_weights,\n"
        "               schedule=job.schedule, callback=keep)\n"
        "optimise_image(job.loss, content=job.content, styles=job.styles, style_weights=job.style_weights,\n"
        "               schedule=job.schedule, start=keep.last)\n"
        "print(job.judge.name, sorted(m for m in sys.modules if m.startswith(('torchvision', 'torch._dynamo'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    assert out.split() == ["vgg19/random", "[]"], out


@pytest.mark.parametrize("root", ["run_tracked", "train"])
def test_a_jobs_config_takes_one_straight_path(root):
    """benchmarks/job_walk.py's config walk: at most 12 stays, 2 climbs back up, no module entered more than twice."""
    done = subprocess.run([sys.executable, str(PACKAGE.parent / "benchmarks" / "job_walk.py"), "--root", root],
                          capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if line.startswith("config walk:"))
    stays, climbs = int(line.split()[2]), int(line.split(" climbs")[0].split()[-1])
    most = int(line.split("entered most: ")[1].split(",")[0].split()[-1])
    assert stays <= 12 and climbs <= 2 and most <= 2, line
