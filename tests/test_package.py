"""stx as a dependency, the way a user installs it: a wheel in a fresh virtual environment, used
from a folder outside the repository with a user config folder and a trusted user plugin."""

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
PLUGIN_LOSS = '''
import torch

from stx.engine.losses import Loss


class MeanBrightnessLoss(Loss):
    """(mean(image) - target)², a user's own loss term."""

    def __init__(self, score_weight: float = 1.0, target: float = 0.5) -> None:
        super().__init__({}, score_weight)
        self.target = float(target)

    def weighted(self, values):
        return self.score_weight * values["image"]

    def forward(self, features, image):
        return {"image": (image.mean() - self.target) ** 2}
'''


def pip(venv, *args):
    """The repository venv's pip, installing into ``venv`` (dependencies are not reinstalled)."""
    command = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), *args]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def user_env(tmp_path_factory):
    """A fresh venv holding the stx wheel and a user plugin package (both non-editable). Its
    third-party dependencies (torch, mlflow, …) are those of the test's own environment, made
    visible through a .pth file instead of being downloaded again."""
    root = tmp_path_factory.mktemp("user")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = wheels.glob("stx-*.whl")
    pip(venv, "install", "--no-deps", str(wheel))

    plugin = root / "myplugin"
    (plugin / "myplugin").mkdir(parents=True)
    (plugin / "myplugin" / "__init__.py").write_text("")
    (plugin / "myplugin" / "losses.py").write_text(PLUGIN_LOSS)
    (plugin / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "myplugin"
        version = "0.1"
        [project.entry-points."stx.plugins"]
        myplugin = "myplugin.losses"
    '''))
    pip(venv, "install", "--no-deps", "--no-build-isolation", str(plugin))
    project = root / "project"
    project.mkdir()
    return venv, project


def stx(venv, project, *args, env=None):
    environment = {k: v for k, v in os.environ.items() if k not in ("STX_RUNS_DIR", "STX_PLUGINS", "MLFLOW_TRACKING_URI")}
    result = subprocess.run([str(venv / "bin" / "stx"), *args], cwd=project, env={**environment, **(env or {})},
                            capture_output=True, text=True, timeout=300)
    return result


def test_installed_wheel_runs_a_user_project_with_a_plugin_sweeps_and_reproduces(user_env):
    venv, project = user_env
    where = subprocess.run([venv / "bin" / "python", "-c", "import stx, stx.conf; print(stx.__file__, stx.conf.__file__)"],
                           cwd=project, check=True, capture_output=True, text=True).stdout
    assert str(REPO) not in where and "site-packages" in where  # the wheel, not the checkout

    created = stx(venv, project, "init", ".")
    assert created.returncode == 0, created.stderr
    (project / "conf" / "loss").mkdir()
    (project / "conf" / "loss" / "bright.yaml").write_text(
        "defaults:\n  - gatys\n  - _self_\nbrightness:\n  _target_: myplugin.losses.MeanBrightnessLoss\n  score_weight: 10.0\n"
    )
    fast = ["encoder.weights=random", "schedule.size=32", "schedule.steps=3", "loss=bright"]
    single = stx(venv, project, "-cd", "conf", "-cn", "project", *fast)
    assert single.returncode == 0, single.stderr
    client = MlflowClient(f"sqlite:///{project / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("stx").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["hydra.choice.loss"] == "bright"
    assert len(client.get_metric_history(run.info.run_id, "brightness")) == 3
    assert Path(run.data.tags["stx.run_dir"]).is_relative_to(project / "runs")
    assert run.data.params["images.content"] == "images/content.png"  # read from the project folder

    sweep = stx(venv, project, "-cd", "conf", "-cn", "project", "-m", *fast, "loss.brightness.score_weight=1,100")
    assert sweep.returncode == 0, sweep.stderr
    children = client.search_runs([run.info.experiment_id], filter_string="tags.`stx.sweep.job_num` != ''")
    assert sorted(c.data.params["loss.brightness.score_weight"] for c in children) == ["1", "100"]

    reproduced = stx(venv, project, "reproduce", children[0].info.run_id)
    assert reproduced.returncode == 0, reproduced.stderr
    assert "max pixel difference to the original output: 0/255" in reproduced.stdout


def test_untrusted_user_code_is_refused_before_it_is_imported(user_env):
    venv, project = user_env
    (project / "evil.py").write_text("open('imported', 'w').close()\n")
    refused = stx(venv, project, "encoder.weights=random", "+loss.evil._target_=evil.Loss", env={"PYTHONPATH": str(project)})
    assert refused.returncode == 2
    assert "loss.evil._target_='evil.Loss' is not allowed" in refused.stderr and "stx.plugins" in refused.stderr
    assert not (project / "imported").exists()
    trusted = stx(venv, project, "encoder.weights=random", "+loss.evil._target_=evil.Loss", "schedule.size=32",
                  env={"PYTHONPATH": str(project), "STX_PLUGINS": "evil"})
    assert "loss.evil._target_='evil.Loss' cannot be imported" in trusted.stderr  # trusted, so imported (no class Loss)
    assert (project / "imported").exists()
