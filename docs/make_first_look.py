"""Write docs/first_look.png: content | style | output of a run, side by side at the output's height.

Usage: ``python docs/make_first_look.py runs/<date>/<time>/output.png`` (the output of the README's
first command, plain ``stx``: the original VGG19 where torchvision's is not cached, on the sample images).
"""

import sys
from pathlib import Path

from PIL import Image

from stx.runs.schema import ASSETS_DIR

GAP = 4
"""White pixels between the pictures."""


def side_by_side(paths: list[Path], height: int) -> Image.Image:
    """The images of ``paths`` scaled to ``height`` px and laid out left to right on white."""
    pictures = []
    for path in paths:
        with Image.open(path) as image:
            width = round(image.width * height / image.height)
            pictures.append(image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS))
    sheet = Image.new("RGB", (sum(p.width for p in pictures) + GAP * (len(pictures) - 1), height), "white")
    left = 0
    for picture in pictures:
        sheet.paste(picture, (left, 0))
        left += picture.width + GAP
    return sheet


if __name__ == "__main__":
    output = Path(sys.argv[1])
    with Image.open(output) as image:
        height = image.height
    target = Path(__file__).resolve().parent / "first_look.png"
    side_by_side([ASSETS_DIR / "content.png", ASSETS_DIR / "style.png", output], height).save(target, optimize=True)
    print(f"{target}: {target.stat().st_size / 1024:.0f} KiB")
