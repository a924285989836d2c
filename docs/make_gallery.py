"""Write docs/gallery.png and docs/gallery.md: every VGG preset of conf/experiment/ and every colour
mode of conf/color/ on the sample images, with HED's trained VGG16 (encoder.weights=hed).

Each picture is a real, tracked stx run (stx.api.run) into a temporary runs folder, at
:data:`SIZE` px with at most :data:`STEPS` steps per level (the presets' own 512 px × 500 steps
take too long on a CPU); its caption gives the judge's style and content distances.

    python docs/make_gallery.py          # about 10 minutes on 2 CPU cores
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from stx import api

SIZE, STEPS = 256, 200
TRAINED = ["encoder=vgg16", "encoder.weights=hed", "judge.arch=vgg16", "judge.weights=hed"]
ENTRIES = {
    "default (loss=gatys, lbfgs)": [],
    "experiment=gatys2016": ["experiment=gatys2016"],
    "experiment=li_wand2016": ["experiment=li_wand2016", f"schedule.steps={STEPS // 2}"],
    "experiment=luminance_transfer": ["experiment=luminance_transfer"],
    "experiment=color_histogram": ["experiment=color_histogram"],
    "experiment=spatial_control": ["experiment=spatial_control"],
    "color=original_colors": ["color=original_colors"],
}
"""Caption → overrides. experiment=wang2021 (ResNet-50) is left out: no trained ResNet-50 can be
had offline; color=luminance and color=histogram are the presets luminance_transfer and
color_histogram."""
CAPTION = 30


def main() -> None:
    here = Path(__file__).resolve().parent
    tiles, rows = [], ["| run | eval/style_distance | eval/content_distance | eval/ssim_content |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as runs:
        for caption, overrides in ENTRIES.items():
            result = api.run([*TRAINED, f"schedule.size={SIZE}", f"schedule.steps={STEPS}", f"runs_dir={runs}",
                              "tracking.image_every=0", *overrides])
            m = result.metrics
            rows.append(f"| `{caption}` | {m['eval/style_distance']:.3f} | {m['eval/content_distance']:.3f} "
                        f"| {m['eval/ssim_content']:.3f} |")
            tiles.append((caption, result.image))
            print(rows[-1], flush=True)
    width, height = max(t.width for _, t in tiles), max(t.height for _, t in tiles)
    columns = 4
    sheet = Image.new("RGB", (columns * width, -(-len(tiles) // columns) * (height + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (caption, tile) in enumerate(tiles):
        left, top = (index % columns) * width, (index // columns) * (height + CAPTION)
        sheet.paste(tile, (left, top + CAPTION))
        draw.text((left + 4, top + 8), caption, fill="black")
    sheet.save(here / "gallery.png", optimize=True)
    (here / "gallery.md").write_text(
        "# Gallery: presets and colour modes with trained weights\n\n"
        f"Made by `python docs/make_gallery.py` ({' '.join(TRAINED)}, {SIZE} px, {STEPS} steps a level, "
        "the sample images; judge: HED's VGG16). Each picture is the output of a tracked stx run.\n\n"
        "![gallery](gallery.png)\n\n" + "\n".join(rows) + "\n\n"
        "`experiment=wang2021` (ResNet-50 with the softmax transform) is not shown: no trained ResNet-50 "
        "can be had on the machines stx is built on.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
