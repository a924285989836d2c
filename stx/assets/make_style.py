"""Regenerate ``style.png``: a deterministic brush-stroke "painting" (CC0, made by stx).

Swirling strokes in a warm/cool palette, drawn with Pillow from a fixed seed, so that the
sample style is reproducible and free of any licence. Run: ``python stx/assets/make_style.py``.
"""

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

PALETTE = [(27, 45, 94), (44, 90, 160), (90, 150, 200), (240, 200, 80), (230, 120, 40), (250, 235, 180), (20, 30, 40)]


def make_style(size: int = 384, strokes: int = 2600, seed: int = 1889) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), PALETTE[0])
    draw = ImageDraw.Draw(image)
    centres = [(rng.uniform(0, size), rng.uniform(0, size), rng.choice((-1, 1))) for _ in range(7)]
    for _ in range(strokes):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        cx, cy, spin = min(centres, key=lambda c: (c[0] - x) ** 2 + (c[1] - y) ** 2)
        angle = math.atan2(y - cy, x - cx) + spin * math.pi / 2 + rng.gauss(0, 0.2)
        length, width = rng.uniform(8, 22), rng.randint(2, 5)
        colour = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in rng.choice(PALETTE))
        points = [(x, y)]
        for _ in range(4):
            angle += spin * 0.15
            x, y = x + math.cos(angle) * length / 4, y + math.sin(angle) * length / 4
            points.append((x, y))
        draw.line(points, fill=colour, width=width, joint="curve")
    return image.filter(ImageFilter.SMOOTH)


if __name__ == "__main__":
    make_style().save(Path(__file__).with_name("style.png"), optimize=True)
