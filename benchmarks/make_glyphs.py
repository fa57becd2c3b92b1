"""Build `glyphs10`, a second small dataset for trying `pretrain` on data the shipped models never saw.

10 classes (the letters A to J) of 28 px grey images, 800 training and 100 test images per class, written as
class-per-folder PNG trees OUT/train/<letter>/ and OUT/test/<letter>/ that every command reads with
`--data OUT/train` (`--test OUT/test`). Each image is one letter drawn in a font picked at random from the
system's TrueType fonts (fc-list; on the development machine the 22 DejaVu faces: sans, serif, mono, condensed,
bold, oblique, light), at a random size, rotation (+-15 degrees), shear, position and stroke blur, with a
random brightness and Gaussian pixel noise: white glyph on black, like MNIST. Deterministic for a --seed and a
font list.

`--hard` builds a harder variant (`glyphs10-hard`): wider size and rotation ranges, a part of the letter erased
by a black bar in half of the images, two to four clutter strokes, a background gradient and stronger noise,
so that a classifier no longer reads every image (the judge of `memdistill fidelity` stays below 100%).

    python benchmarks/make_glyphs.py --out /tmp/glyphs10
    python benchmarks/make_glyphs.py --hard --out /tmp/glyphs10-hard
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from memdistill.errors import UserError
from memdistill.manifest import check_output_folder

LETTERS = "ABCDEFGHIJ"
SIZE = 28


def system_fonts() -> list[str]:
    """TrueType font files that fc-list reports, sorted (the dataset depends on this list)."""
    try:
        out = subprocess.run(["fc-list", ":", "file"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        sys.exit(f"make_glyphs: fc-list failed ({err}); install fontconfig and a TrueType font")
    files = (line.split(":")[0].strip() for line in out.splitlines())  # "path: " per font
    fonts = sorted({f for f in files if f.endswith(".ttf")})
    # a math font draws letters as other glyphs; skip it
    fonts = [f for f in fonts if "Math" not in Path(f).name]
    if not fonts:
        sys.exit("make_glyphs: no TrueType font found by fc-list")
    return fonts


def draw(letter: str, font_file: str, rng: random.Random, hard: bool = False) -> Image.Image:
    """One 28x28 grey image of ``letter``: rendered large, transformed, then reduced (antialiased); ``hard`` adds
    the distortions of the --hard variant (module docstring)."""
    big = 4 * SIZE
    font = ImageFont.truetype(font_file, int(big * (rng.uniform(0.45, 0.85) if hard else rng.uniform(0.55, 0.8))))
    canvas = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(canvas)
    left, top, right, bottom = d.textbbox((0, 0), letter, font=font)
    x = (big - (right - left)) / 2 - left + rng.uniform(-0.08, 0.08) * big
    y = (big - (bottom - top)) / 2 - top + rng.uniform(-0.08, 0.08) * big
    d.text((x, y), letter, fill=255, font=font)
    shear = math.tan(math.radians(rng.uniform(-12, 12)))
    # shear about the centre, then rotate
    canvas = canvas.transform((big, big), Image.AFFINE, (1, shear, -shear * big / 2, 0, 1, 0),
                              resample=Image.BILINEAR)
    angle = 30 if hard else 15
    canvas = canvas.rotate(rng.uniform(-angle, angle), resample=Image.BILINEAR)
    if hard:
        d = ImageDraw.Draw(canvas)
        if rng.random() < 0.5:  # erase a bar across the letter: some strokes that tell letters apart go missing
            w, h = rng.uniform(0.12, 0.25) * big, rng.uniform(0.5, 1.0) * big
            cx, cy = rng.uniform(0.3, 0.7) * big, big / 2
            bar = [(cx + sx * w / 2, cy + sy * h / 2) for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
            turn = math.radians(rng.uniform(0, 180))  # the bar at a random angle about its centre
            bar = [(cx + (x - cx) * math.cos(turn) - (y - cy) * math.sin(turn),
                    cy + (x - cx) * math.sin(turn) + (y - cy) * math.cos(turn)) for x, y in bar]
            d.polygon(bar, fill=0)
        for _ in range(rng.randint(2, 4)):  # clutter strokes, as bright as a faint letter
            d.line([(rng.uniform(0, big), rng.uniform(0, big)) for _ in range(2)],
                   fill=int(rng.uniform(80, 200)), width=int(rng.uniform(2, 6)))
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0, 3)))
    img = np.asarray(canvas.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32) / 255
    noise = rng.uniform(0.04, 0.12) if hard else 0.04
    img = img * rng.uniform(0.6, 1.0) + np.asarray([rng.gauss(0, noise) for _ in range(SIZE * SIZE)],
                                                     dtype=np.float32).reshape(SIZE, SIZE)
    if hard:  # a background gradient in a random direction, up to 0.3 bright at one side
        ramp = np.linspace(0, rng.uniform(0, 0.3), SIZE, dtype=np.float32)
        img = img + (ramp[None, :] if rng.random() < 0.5 else ramp[:, None])
    return Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8), "L")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (train/ and test/ are written in it)")
    parser.add_argument("--train-per-class", type=int, default=800, help="train images per class, >= 1")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class, >= 1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hard", action="store_true", help="the harder variant (module docstring)")
    args = parser.parse_args(argv)
    for name in ("train_per_class", "test_per_class"):
        if getattr(args, name) < 1:  # an empty class folder is refused by every command that reads it
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    out = Path(args.out)
    try:
        check_output_folder(out)  # a file, a path inside a file, an unwritable folder: refused before drawing
    except UserError as err:
        parser.error(str(err))
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty; choose another --out")
    fonts = system_fonts()
    # Drawn into a hidden sibling and renamed at the end: an interrupted build leaves no half dataset at --out.
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    for split, per_class, seed in (("train", args.train_per_class, args.seed),
                                   ("test", args.test_per_class, args.seed + 1_000_003)):
        rng = random.Random(seed)
        for letter in LETTERS:
            folder = partial / split / letter
            folder.mkdir(parents=True)
            for i in range(per_class):
                draw(letter, rng.choice(fonts), rng, args.hard).save(folder / f"{i:04d}.png")
    if out.exists():
        out.rmdir()  # empty (checked above): rename needs it gone
    partial.rename(out)
    print(f"{out}: {len(LETTERS)} classes, {args.train_per_class} train / {args.test_per_class} test images per "
          f"class, 28 px grey, {len(fonts)} fonts{', hard variant' if args.hard else ''}")


if __name__ == "__main__":
    main()
