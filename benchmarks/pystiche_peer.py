"""pystiche 1.0.1, the peer, run natively in its own venv (Python 3.10, torch 1.12.1,
torchvision 0.13.1; make it with ``benchmarks/peer_venv.sh``), and the client the benchmarks
use to drive it from stx's venv.

pystiche's own objective on the benchmarks' layers and weights: ``PerceptualLoss`` of a
``FeatureReconstructionLoss`` on relu4_2 and a ``MultiLayerEncodingLoss`` of ``GramLoss`` on
relu1_1…relu5_1 (layer weights: the mean) × 1e3, on its VGG19 multi-layer encoder with random
weights and internal ImageNet preprocessing, optimised by ``pystiche.optim.image_optimization``
(its default L-BFGS: lr=1, max_iter=1, history 100, one optimiser per run, no clamp).

In the peer venv, as a script:

* ``--serve``: for ``benchmarks/lbfgs_eval.py``. Prints one JSON line of versions, then for
  each line ``NAME EVALS`` read from stdin (NAME: ``pystiche``, or ``floor``, the floor of
  ``benchmarks/floor.py`` on this torch) runs that many evaluations in one run and prints
  ``{"seconds": …}``.
* otherwise: the pystiche *process* of ``benchmarks/whole_process.py``: read the sample images,
  build, optimise ``--steps`` evaluations, write the result.

    PEER/bin/python benchmarks/pystiche_peer.py [--size 256] [--steps 100] [--output pystiche.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

from floor import floor_runner, load_samples, write_image
from tutorial import CONTENT_LAYER, STYLE_LAYERS, STYLE_WEIGHT

SCRIPT = Path(__file__).resolve()
HINT = "make the peer venv with `benchmarks/peer_venv.sh [DIR]` and pass --peer-python DIR/bin/python"


def pystiche_runner(content: torch.Tensor, style: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """``run(evals)``: pystiche's ``image_optimization`` from ``content`` for ``evals``
    evaluations; returns the image (``1×3×H×W``)."""
    with warnings.catch_warnings():  # torchvision 0.13 deprecates the model_urls pystiche reads
        warnings.simplefilter("ignore")
        from pystiche import enc, loss, optim

        mle = enc.vgg19_multi_layer_encoder(pretrained=False, framework="torch", internal_preprocessing=True)
    perceptual = loss.PerceptualLoss(
        loss.FeatureReconstructionLoss(mle.extract_encoder(CONTENT_LAYER)),
        loss.MultiLayerEncodingLoss(
            mle, STYLE_LAYERS, lambda encoder, weight: loss.GramLoss(encoder, score_weight=weight),
            score_weight=STYLE_WEIGHT,
        ),
    ).to(content.device)
    perceptual.set_content_image(content)
    perceptual.set_style_image(style)

    def run(evals: int) -> torch.Tensor:
        return optim.image_optimization(content.clone(), perceptual, num_steps=evals, quiet=True)

    return run


def serve(size: int, device: torch.device) -> None:
    content, style = load_samples(size, device)
    runners = {"pystiche": pystiche_runner(content, style), "floor": floor_runner(content)}
    import pystiche  # imported by pystiche_runner already

    info = {"torch": torch.__version__, "pystiche": pystiche.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        name, evals = line.split()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        runners[name](int(evals))
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


# --- the client side, imported by the benchmarks in stx's venv -------------------------------


def peer_python(path: Optional[Path]) -> Optional[Path]:
    """The peer venv's interpreter given as ``--peer-python``; None (and a printed notice that
    pystiche is skipped) when none was given."""
    if path is None:
        print(f"pystiche: SKIPPED (no --peer-python; {HINT})", flush=True)
        return None
    if not path.is_file():
        raise SystemExit(f"--peer-python {path}: no such file; {HINT}")
    return path


class PeerServer:
    """A ``--serve`` peer process; ``runner(name)(evals)`` times one run there (seconds)."""

    def __init__(self, python: Path, size: int, device: str) -> None:
        command = [str(python), str(SCRIPT), "--serve", "--size", str(size), "--device", device]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the pystiche peer ({self.process.args[0]}) exited with {self.process.wait()}; "
                             f"its error is above")
        return json.loads(line)

    def runner(self, name: str) -> Callable[[int], float]:
        def run(evals: int) -> float:
            self.process.stdin.write(f"{name} {evals}\n")
            self.process.stdin.flush()
            return self._reply()["seconds"]

        return run

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="long edge, px")
    parser.add_argument("--steps", type=int, default=100, help="objective evaluations")
    parser.add_argument("--output", type=Path, default=Path("pystiche.png"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--serve", action="store_true", help="time runs on request (see above)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.serve:
        serve(args.size, device)
        return
    content, style = load_samples(args.size, device)
    write_image(pystiche_runner(content, style)(args.steps), args.output)


if __name__ == "__main__":
    main()
