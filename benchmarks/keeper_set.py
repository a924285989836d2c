"""The labelled keeper set: sweeps whose pictures a person has labelled, and how often an objective's
first pick is a picture a person would keep.

``make`` runs the sweeps (the sample cat; three styles: the sample's strokes, a Mondrian-like drawing
and a dotted pattern, drawn here with Pillow; networks: the original VGG19 and HED's VGG16, and
MobileNetV2 on two styles; each sweep ``loss.style.score_weight`` × ``color=none,luminance``) through
the engine at :data:`SIZE` px × :data:`STEPS` L-BFGS steps, and writes each output as a JPEG under
``tests/data/keepers/<sweep>/`` with a contact sheet per sweep (``sheet.jpg``) to label by eye.
``tests/data/keepers/labels.json`` holds the labels (``{sweep: {picture: true/false}}``: would a
person keep it: recognisably the photo and clearly in the style). ``score`` judges the stored
pictures and prints, per objective option of ``conf/objective/``, each sweep's first pick and
whether it is a keeper; ``tests/test_keepers.py`` asserts it for the default.

    python benchmarks/keeper_set.py make      # about 15 minutes on 2 CPU cores
    python benchmarks/keeper_set.py score
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from stx import api
from stx.engine.image import read_image, resize_to, write_image
from stx.engine.optim import optimise_image
from stx.runs.job import build_job, build_judge, objective_of
from stx.runs.schema import ASSETS_DIR

ROOT = Path(__file__).resolve().parents[1] / "tests" / "data" / "keepers"
SIZE, STEPS = 128, 80
WEIGHTS = ("0.1", "2", "20", "500")
COLOURS = ("none", "luminance")
NETWORKS = {"vgg19": ["encoder=vgg19", "encoder.weights=caffe"], "hed": ["encoder=vgg16", "encoder.weights=hed"],
            "mobilenet": ["encoder=mobilenet_v2", "encoder.weights=auto"]}
SWEEPS = [(network, style) for network in ("vgg19", "hed") for style in ("strokes", "mondrian", "dots")] + \
         [("mobilenet", "strokes"), ("mobilenet", "mondrian")]
JUDGE = ["judge.arch=vgg16", "judge.weights=hed"]


def mondrian(size: int = 320, seed: int = 1921) -> Image.Image:
    """A Mondrian-like drawing: white, red, blue and yellow blocks between black lines."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (245, 242, 230))
    draw = ImageDraw.Draw(image)
    xs = sorted(rng.sample(range(30, size - 30), 4))
    ys = sorted(rng.sample(range(30, size - 30), 4))
    cells = [(x0, y0, x1, y1) for x0, x1 in zip([0, *xs], [*xs, size]) for y0, y1 in zip([0, *ys], [*ys, size])]
    for cell in rng.sample(cells, 7):
        draw.rectangle(cell, fill=rng.choice([(200, 30, 30), (30, 60, 160), (240, 200, 30)]))
    for x in xs:
        draw.rectangle((x - 4, 0, x + 4, size), fill=(15, 15, 15))
    for y in ys:
        draw.rectangle((0, y - 4, size, y + 4), fill=(15, 15, 15))
    return image


def dots(size: int = 320, seed: int = 7) -> Image.Image:
    """Bright dots of many sizes on a dark green ground (a pointillist-like pattern)."""
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (20, 50, 35))
    draw = ImageDraw.Draw(image)
    for _ in range(900):
        x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 9)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=rng.choice([(250, 120, 150), (255, 220, 90), (120, 220, 240),
                                                                    (250, 250, 240), (180, 90, 200)]))
    return image


def style_path(name: str) -> Path:
    if name == "strokes":
        return ASSETS_DIR / "style.png"
    path = ROOT / f"style_{name}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        {"mondrian": mondrian, "dots": dots}[name]().save(path)
    return path


def picture_name(weight: str, colour: str) -> str:
    return f"sw{weight}_{colour}.jpg"


def make() -> None:
    torch.set_num_threads(2)
    for network, style in SWEEPS:
        folder = ROOT / f"{network}_{style}"
        folder.mkdir(parents=True, exist_ok=True)
        tiles = []
        for colour in COLOURS:
            for weight in WEIGHTS:
                overrides = [*NETWORKS[network], *JUDGE, f"images.styles=[{style_path(style)}]", f"color={colour}",
                             f"loss.style.score_weight={weight}", f"schedule.size={SIZE}", f"schedule.steps={STEPS}"]
                job = build_job(api.compose_config(overrides))
                output = job.color.finish(optimise_image(job.loss, content=job.content, styles=job.styles,
                                                         style_weights=job.style_weights, schedule=job.schedule))
                path = folder / picture_name(weight, colour)
                write_image(output, path.with_suffix(".png"))
                Image.open(path.with_suffix(".png")).save(path, quality=92)
                path.with_suffix(".png").unlink()
                tiles.append((path.stem, Image.open(path)))
                print(folder.name, path.name, flush=True)
        width, height = tiles[0][1].size
        sheet = Image.new("RGB", (len(WEIGHTS) * width, len(COLOURS) * (height + 14)), "white")
        draw = ImageDraw.Draw(sheet)
        for index, (name, tile) in enumerate(tiles):
            left, top = (index % len(WEIGHTS)) * width, (index // len(WEIGHTS)) * (height + 14)
            sheet.paste(tile, (left, top + 14))
            draw.text((left + 2, top + 1), name, fill="black")
        sheet.save(folder / "sheet.jpg", quality=85)


def evaluations() -> dict[str, dict[str, dict[str, float]]]:
    """``{sweep: {picture: the judge's metrics}}`` of the stored pictures (HED's VGG16 judges them)."""
    content = read_image(ASSETS_DIR / "content.png", SIZE)
    judge = build_judge(api.compose_config(JUDGE))
    scores = {}
    for network, style in SWEEPS:
        judge.set_references(content, [read_image(style_path(style), SIZE)])
        folder = ROOT / f"{network}_{style}"
        scores[folder.name] = {path.name: judge(resize_to(read_image(path), tuple(content.shape[-2:])))
                               for path in sorted(folder.glob("sw*.jpg"))}
    return scores


def first_picks(objective_option: str, scores: dict[str, dict[str, dict[str, float]]]) -> dict[str, str]:
    """Each sweep's picture ranked first by ``objective=<objective_option>``."""
    objective = objective_of(api.compose_config([f"objective={objective_option}"]))
    return {sweep: min(pictures, key=lambda name: objective(pictures[name])) for sweep, pictures in scores.items()}


def score() -> None:
    labels = json.loads((ROOT / "labels.json").read_text())
    scores = evaluations()
    for option in ("keeper", "balanced", "style"):
        picks = first_picks(option, scores)
        kept = sum(labels[sweep][pick] for sweep, pick in picks.items())
        print(f"objective={option}: first pick a keeper in {kept} of {len(picks)} sweeps")
        for sweep, pick in picks.items():
            metrics = scores[sweep][pick]
            print(f"  {sweep:18s} {pick:22s} {'keeper' if labels[sweep][pick] else 'NOT a keeper':12s} "
                  f"style {metrics['style_distance']:.3f} structure {metrics['structure']:.3f}")
    for sweep, pictures in scores.items():  # the score weight's range: from the photo to the style's texture
        for metric in ("content_distance", "style_distance"):
            values = [pictures[picture_name(weight, "none")][metric] for weight in WEIGHTS]
            ordered = sorted(values, reverse=metric == "style_distance")
            print(f"  {sweep:18s} {metric} by score weight {', '.join(WEIGHTS)}: "
                  f"{', '.join(f'{d:.3f}' for d in values)}{'' if values == ordered else '  NOT monotonic'}")
    keepers = [scores[s][p]["structure"] for s in labels for p, kept in labels[s].items() if kept]
    others = [scores[s][p]["structure"] for s in labels for p, kept in labels[s].items() if not kept]
    print(f"structure of keepers {min(keepers):.2f}–{max(keepers):.2f} (n={len(keepers)}), of the others "
          f"{min(others):.2f}–{max(others):.2f} (n={len(others)})")
    assert not math.isnan(sum(keepers))


if __name__ == "__main__":
    {"make": make, "score": score}[sys.argv[1]]()
