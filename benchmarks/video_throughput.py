"""A clip through ``stx stylize``: frames/s against the model alone, and peak memory against the clip's length.

    .venv/bin/python benchmarks/video_throughput.py [--size 256] [--frames 48] [--longer 10] [--model mobile|johnson]

Writes two synthetic clips (``tests/clips.py``: a pan over smooth random texture, H.264 with an AAC tone,
``size×size``, 24 frames/s): one of ``frames`` frames and one ``longer`` times as long. Each is stylised by :func:`stx.fast.video.stylize_clip` in
a fresh process (random weights, TorchScript, batches of 4, no flicker measure), which reports its frames/s
and peak RSS. Beside it, in the same process, the model alone on the same number of ``4×3×size×size``
batches (no decoding, encoding or resizing). Prints the throughput ratio (I/O overhead) and the RSS ratio of
the longer clip to the shorter.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from stx.fast import export
from stx.fast.mobile import MobileStyleNet
from stx.fast.transformer import TransformerNet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from clips import make_clip  # noqa: E402 - the tests' synthetic clip, one writer for both

CHILD = """
import json, resource, sys, time, torch
from pathlib import Path
from stx.fast import export
from stx.fast.video import stylize_clip
torch.set_num_threads(int(sys.argv[4]))
model = export.load_torchscript(sys.argv[1])
started = time.perf_counter()
result = stylize_clip(model, Path(sys.argv[2]), Path(sys.argv[3]), torch.device("cpu"), batch_size=4)
seconds = time.perf_counter() - started
with torch.no_grad():
    batch = torch.rand(4, 3, result_size := int(sys.argv[5]), result_size)
    model(batch)
    alone = time.perf_counter()
    for _ in range(result.frames // 4):
        model(batch)
    alone = time.perf_counter() - alone
print(json.dumps({"frames": result.frames, "clip_fps": result.frames / seconds,
                  "model_fps": 4 * (result.frames // 4) / alone,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--longer", type=int, default=10)
    parser.add_argument("--model", choices=("mobile", "johnson"), default="mobile")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    net = MobileStyleNet() if args.model == "mobile" else TransformerNet()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        model = export.export_torchscript(net.eval(), Path(folder) / "model.pt")
        for frames in (args.frames, args.frames * args.longer):
            clip = make_clip(Path(folder) / f"clip{frames}.mp4", frames, (args.size, args.size), rate=24)
            done = subprocess.run([sys.executable, "-c", CHILD, str(model), str(clip), str(Path(folder) / "out.mp4"),
                                   str(args.threads), str(args.size)], capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.model} network, {args.size}×{args.size}, {args.threads} thread(s), random weights\n")
    print("| frames | clip frames/s | model alone frames/s | clip / model | peak RSS MB |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['frames']} | {row['clip_fps']:.1f} | {row['model_fps']:.1f} | "
              f"{row['clip_fps'] / row['model_fps']:.2f} | {row['peak_rss_mb']:.0f} |")
    print(f"\npeak RSS, the {args.longer}× longer clip against the shorter: "
          f"{rows[1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.3f}")


if __name__ == "__main__":
    main()
