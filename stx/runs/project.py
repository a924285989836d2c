"""``stx init [dir]``: scaffold a project folder of the user's own, outside stx's repository.

The folder gets ``images/`` (copies of the sample images, to be replaced), ``conf/project.yaml``
(a primary config on top of stx's: the user's images and defaults), ``conf/experiment/
quick_look.yaml`` (a preset) and a README saying how to run and sweep it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from stx.errors import StxError
from stx.runs.schema import ASSETS_DIR

PROJECT_CONFIG = """\
# Your primary config, on top of stx's (`stx -cd conf -cn project`): state only what differs.
defaults:
  - config              # stx's own primary config
  - _self_

images:
  content: images/content.png   # relative to the folder stx is started in
  styles:
    - images/style.png
  style_weights: null
"""

QUICK_LOOK = """\
# @package _global_
# A preset (`experiment=quick_look`): a small, fast run to check images and weights.
schedule:
  size: 128
  steps: 50
tracking:
  image_every: 10
"""

README = """\
# {name}

An stx project: your images in `images/`, your configs in `conf/` (merged with stx's own).

```bash
stx -cd conf -cn project                                   # run with conf/project.yaml
stx -cd conf -cn project experiment=quick_look             # a preset from conf/experiment/
stx -cd conf -cn project -m loss.style.score_weight=1,10,100   # a sweep
mlflow ui --backend-store-uri sqlite:///runs/mlflow.db     # compare the runs
```

Add `encoder.weights=random` when the ImageNet weights cannot be downloaded (no real stylisation).
New options for any group go in `conf/<group>/<name>.yaml` (e.g. `conf/loss/mine.yaml`, then
`loss=mine`). Your own loss or encoder classes are admitted once their module is trusted: declare
it in your package's `[project.entry-points."stx.plugins"]`, or list it in `$STX_PLUGINS`.
"""


def scaffold(folder: Path) -> list[Path]:
    """Create the project files in ``folder`` (made if missing); refuse to overwrite any."""
    files = {
        folder / "conf" / "project.yaml": PROJECT_CONFIG,
        folder / "conf" / "experiment" / "quick_look.yaml": QUICK_LOOK,
        folder / "README.md": README.format(name=folder.resolve().name),
    }
    images = {folder / "images" / name: ASSETS_DIR / name for name in ("content.png", "style.png")}
    existing = [str(path) for path in [*files, *images] if path.exists()]
    if existing:
        raise StxError(f"stx init would overwrite {', '.join(existing)}; choose an empty or new folder.")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for path, source in images.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
    return [*files, *images]
