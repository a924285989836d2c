"""Seconds per objective evaluation (forward + backward) for each style loss option, side by side.

Every contender is stx's :class:`~stx.engine.losses.PerceptualObjective` on the same 256 px sample
images with the same randomly initialised VGG19 (timings do not depend on weight values):
content on relu4_2 and a style term on relu1_1…relu5_1 (gatys' layers and weights).

* gram (baseline) — the Gram loss of ``stx/engine/losses.py`` at ``--baseline`` (default b74d158, the
                  commit before these options), for "the default path is no slower";
* gram          — ``loss=gatys``;
* gram, normalized gradients — ``loss.{content,style}.normalize_gradients=true``;
* meanstd, wasserstein — ``loss=meanstd``, ``loss=wasserstein``;
* guided (2 regions)   — ``loss=guided`` (the sample's left/right masks).

Contenders are timed in interleaved rounds; the median seconds per evaluation and its ratio to
``gram`` are printed.
Usage: python benchmarks/style_losses.py [--size 256] [--evals 3] [--rounds 5] [--baseline REV]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from stx.engine import encoders, losses
from stx.engine.image import image_shape, long_edge_shape, read_image, read_mask
from stx.runs.schema import ASSETS_DIR

CONTENT = "relu4_2"
STYLE_LAYERS = {layer: 0.2 for layer in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")}


def committed_losses(revision: str):
    """stx/engine/losses.py at git ``revision``, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{revision}:stx/engine/losses.py"], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parent.parent).stdout
    path = Path(tempfile.mkdtemp()) / "stx_losses_head.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("stx_losses_head", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def contenders(size: int, baseline: str) -> tuple[dict[str, torch.nn.Module], torch.Tensor]:
    content = read_image(ASSETS_DIR / "content.png", size)
    style = read_image(ASSETS_DIR / "style.png", size)
    encoder = encoders.vgg19([CONTENT, *STYLE_LAYERS], weights="random", pooling="max", seed=0)
    head = committed_losses(baseline)
    shape = long_edge_shape(*image_shape(ASSETS_DIR / "content.png"), size)
    guided = losses.GuidedGramStyleLoss(STYLE_LAYERS, {
        "left": {"mask": "mask_left.png", "styles": ["style.png"]}, "right": {"mask": "mask_right.png", "styles": ["content.png"]}})
    guided.set_guides({
        "left": losses.Guide(read_mask(ASSETS_DIR / "mask_left.png", shape), [style], [None]),
        "right": losses.Guide(read_mask(ASSETS_DIR / "mask_right.png", shape), [content], [None]),
    })
    terms = {
        "gram (baseline)": (head, head.ContentLoss({CONTENT: 1.0}), head.GramStyleLoss(STYLE_LAYERS, 1e3)),
        "gram": (losses, losses.ContentLoss({CONTENT: 1.0}), losses.GramStyleLoss(STYLE_LAYERS, 1e3)),
        "gram, normalized gradients": (losses, losses.ContentLoss({CONTENT: 1.0}, normalize_gradients=True),
                                       losses.GramStyleLoss(STYLE_LAYERS, 1e3, normalize_gradients=True)),
        "meanstd": (losses, losses.ContentLoss({CONTENT: 1.0}), losses.MeanStdStyleLoss(STYLE_LAYERS, 1e2)),
        "wasserstein": (losses, losses.ContentLoss({CONTENT: 1.0}), losses.WassersteinStyleLoss(STYLE_LAYERS, 1e2)),
        "guided (2 regions)": (losses, losses.ContentLoss({CONTENT: 1.0}), guided),
    }
    runners = {}
    for name, (module, content_loss, style_loss) in terms.items():
        objective = module.PerceptualObjective(encoder, {"content": content_loss, "style": style_loss})
        objective.set_targets(content, [style], [1.0])
        runners[name] = objective
    return runners, content


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--evals", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", default="b74d158", help="git revision whose Gram loss is the baseline")
    args = parser.parse_args()
    runners, content = contenders(args.size, args.baseline)
    image = content.clone().requires_grad_(True)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for objective in runners.values():  # warm-up
        objective(image)[0].backward()
    for _ in range(args.rounds):
        for name, objective in runners.items():
            start = time.perf_counter()
            for _ in range(args.evals):
                image.grad = None
                objective(image)[0].backward()
            times[name].append((time.perf_counter() - start) / args.evals)
    base = statistics.median(times["gram"])
    print(f"{args.size} px, {args.rounds} rounds × {args.evals} evaluations, {torch.get_num_threads()} threads")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:28s} {median:.4f} s/eval  ×{median / base:.2f}")


if __name__ == "__main__":
    sys.exit(main())
