"""What the judge says along a score-weight sweep on trained features: style and content distance
(and SSIM) of each output, the content itself and the style's texture, and which runs lie on the
style/content Pareto front (a curve of trade-offs, not one point).

HED's VGG16 both paints and judges (what judge.weights=auto takes without ImageNet weights), the
sample images, the default loss set, L-BFGS.

    python benchmarks/judge_front.py --size 128 --steps 60
"""

from __future__ import annotations

import argparse

from stx import api
from stx.engine.image import resize_to
from stx.runs.job import build_job
from stx.engine.optim import optimise_image

WEIGHTS = (1e-2, 1e-1, 1.0, 1e1, 1e3, 1e5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    points = {}
    for weight in WEIGHTS:
        job = build_job(api.compose_config([
            "encoder=vgg16", "encoder.weights=hed", "judge.arch=vgg16", "judge.weights=hed",
            f"schedule.size={args.size}", f"schedule.steps={args.steps}", f"loss.style.score_weight={weight}"]))
        output = optimise_image(job.loss, content=job.content, styles=job.styles, style_weights=job.style_weights,
                                schedule=job.schedule)
        points[f"score_weight={weight:g}"] = job.judge(output)
    points["content itself"] = job.judge(job.content)
    points["style texture"] = job.judge(resize_to(job.styles[0], tuple(job.content.shape[-2:])))
    front = [name for name, p in points.items()
             if not any(q["style_distance"] <= p["style_distance"] and q["content_distance"] <= p["content_distance"]
                        and q != p for q in points.values())]
    print(f"{args.size} px, {args.steps} L-BFGS steps, HED VGG16 paints and judges")
    for name, p in points.items():
        print(f"{name:22s} style {p['style_distance']:.3f}  content {p['content_distance']:.3f}  "
              f"ssim {p['ssim_content']:.3f}  {'front' if name in front else ''}")


if __name__ == "__main__":
    main()
