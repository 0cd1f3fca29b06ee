"""A tiny captioned video dataset for the demo and tests: coloured shapes moving on a plain background.

Writes ``clip_00000.gif`` + ``clip_00000.txt`` ("a red circle moving left") pairs, as a user's folder
of captioned GIFs would look. Everything follows from the seed. ``HELD_OUT`` names a few (colour, shape,
direction) triples that a "train" dataset never shows, so that a model can be asked for unseen combinations.

    python -m data_tools.demo_data OUT --n 300 [--combos train]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("data_tools.demo_data")

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40),
          "purple": (150, 60, 200), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = (24, 24, 32)

# 8 of the 72 triples, each from a different (colour, shape) pair, each direction twice: every colour, shape,
# direction and (colour, shape) pair still occurs in training, only these combinations of them do not.
HELD_OUT = (("red", "circle", "left"), ("green", "square", "up"), ("blue", "triangle", "right"),
            ("yellow", "circle", "down"), ("purple", "square", "left"), ("white", "triangle", "up"),
            ("red", "triangle", "down"), ("blue", "square", "right"))
COMBOS = ("all", "train", "held-out")


def combinations(combos: str = "all") -> list[tuple[str, str, str]]:
    """The (colour, shape, direction) triples of ``combos``: "all" 72, "train" all but HELD_OUT, "held-out" those."""
    if combos not in COMBOS:
        raise ValueError(f"combos must be one of {COMBOS}, got {combos!r}")
    every = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
    if combos == "all":
        return every
    held = set(HELD_OUT)
    return [t for t in every if (t in held) == (combos == "held-out")]


def _palette() -> list[int]:
    # A fixed palette (background first) so that GIF encoding is lossless and byte-stable.
    colors = [BACKGROUND, *COLORS.values()]
    flat = [c for rgb in colors for c in rgb]
    return flat + [0] * (768 - len(flat))


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: int) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def render_clip(color: str, shape: str, direction: str, size: int, frames: int, rng: random.Random) -> list[Image.Image]:
    """Render one clip as palette ("P") frames: the shape crosses about half the frame in ``direction``."""
    r = size * rng.uniform(0.14, 0.22)
    dx, dy = DIRECTIONS[direction]
    travel = size * 0.5
    # Start so that the whole path stays inside the frame.
    cx = size / 2 - dx * travel / 2 + (0 if dx else rng.uniform(-size / 6, size / 6))
    cy = size / 2 - dy * travel / 2 + (0 if dy else rng.uniform(-size / 6, size / 6))
    fill = 1 + list(COLORS).index(color)
    out = []
    for t in range(frames):
        img = Image.new("P", (size, size), 0)
        img.putpalette(_palette())
        f = t / max(frames - 1, 1)
        _draw(ImageDraw.Draw(img), shape, cx + dx * travel * f, cy + dy * travel * f, r, fill)
        out.append(img)
    return out


def render_array(color: str, shape: str, direction: str, size: int = 32, frames: int = 8,
                 rng: random.Random | None = None) -> np.ndarray:
    """Render one clip as RGB pixels, uint8 ``(frames, size, size, 3)``; ``rng`` (default seed 0) sets size and path."""
    clip = render_clip(color, shape, direction, size, frames, rng or random.Random(0))
    return np.stack([np.asarray(img.convert("RGB")) for img in clip])


def make_demo_dataset(out_dir: str | Path, n: int = 300, size: int = 32, frames: int = 8, seed: int = 0,
                      combos: str = "all") -> Path:
    """Write ``n`` captioned GIFs of the ``combos`` triples (see ``combinations``) into ``out_dir`` (created)."""
    pool = combinations(combos)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        if combos == "all":  # three draws, as before HELD_OUT existed, so old seeds give the same files
            color, shape, direction = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS))
        else:
            color, shape, direction = rng.choice(pool)
        clip = render_clip(color, shape, direction, size, frames, rng)
        stem = out / f"clip_{i:05d}"
        clip[0].save(stem.with_suffix(".gif"), save_all=True, append_images=clip[1:], duration=100, loop=0,
                     optimize=False)
        stem.with_suffix(".txt").write_text(f"a {color} {shape} moving {direction}\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m data_tools.demo_data OUT [--n 300] [--size 32] [--frames 8] [--seed 0] [--combos]``."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.demo_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="output directory (created)")
    parser.add_argument("--n", type=int, default=300, help="number of clips (default 300)")
    parser.add_argument("--size", type=int, default=32, help="frame width and height in pixels (default 32)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--combos", choices=COMBOS, default="all",
                        help="which (colour, shape, direction) triples: all (default), train (no HELD_OUT), held-out")
    args = parser.parse_args(argv)
    if args.n < 1 or args.size < 8 or args.frames < 2:
        parser.error(f"need --n >= 1, --size >= 8, --frames >= 2; got {args.n}, {args.size}, {args.frames}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = make_demo_dataset(args.out, n=args.n, size=args.size, frames=args.frames, seed=args.seed,
                            combos=args.combos)
    log.info("wrote %d captioned GIFs (%dx%d, %d frames, %s combinations) to %s", args.n, args.size, args.size,
             args.frames, args.combos, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
