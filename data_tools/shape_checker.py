"""Read a video of the demo dataset back: which colour, which shape, which way it moves, and how cleanly.

An automatic judge for generated clips: ``read_video`` turns uint8 ``(f, h, w, 3)`` RGB frames into a
``Reading``; ``score`` compares readings with their captions ("a red circle moving left"). Numpy only.

The object of a frame is the largest 4-connected region of pixels far (in RGB) from ``BACKGROUND`` whose
area is plausible for one shape. Its colour is the palette colour whose blend line from BACKGROUND passes
nearest its median pixel, so that blurred or faded objects keep their colour; the object is then cut
again where pixels are at least half-way from BACKGROUND to that colour, which keeps its size under blur
and noise. The shape is the ideal circle, square or triangle (of the object's area and centroid) that
overlaps it best; the centroids' straight-line fit gives the direction. Clean clips of 12 px and more read
right; at 8 px a circle is too few pixels to tell from a triangle.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.demo_data import BACKGROUND, COLORS, DIRECTIONS, SHAPES

OBJECT_DISTANCE = 70.0  # RGB distance from BACKGROUND; the nearest palette colour (green) is 169 away
MIN_AREA = 4  # pixels; smaller regions are specks of noise
MAX_AREA_FRACTION = 0.4  # of the frame; the largest demo shape covers about 0.2
MIN_TRAVEL_FRACTION = 0.1  # of the frame side; a slower object is read as not moving (direction None)

_CAPTION = re.compile(r"a (\w+) (\w+) moving (\w+)")
_BACKGROUND = np.array(BACKGROUND, dtype=np.float64)
_TOWARDS = {name: np.array(rgb, dtype=np.float64) - _BACKGROUND for name, rgb in COLORS.items()}


@dataclass(frozen=True)
class Reading:
    """What the checker saw in one video; colour, shape and direction are None where it could not tell.

    ``displacement`` is the length in pixels of the fitted straight path from the first to the last frame.
    ``background_error`` is the mean absolute difference (0-255) of the pixels outside the (dilated) object
    from BACKGROUND. ``jitter`` measures path and appearance in units of the object's size ``sqrt(area)``:
    the RMS distance of the centroids from the fitted straight path divided by the mean size, plus the
    relative standard deviation of the size over frames. A rigid shape at constant speed gives 0 but for
    pixel rounding (rendered clips: at most about 0.12 at 16 px, 0.06 at 32 px, 0.04 at 64 px); NaN if no
    object was found.
    """

    colour: str | None
    shape: str | None
    direction: str | None
    displacement: float
    background_error: float
    jitter: float
    found: bool


def parse_caption(caption: str) -> tuple[str, str, str]:
    """Split "a {colour} {shape} moving {direction}" into its three words."""
    match = _CAPTION.fullmatch(caption.strip())
    if not match or match[1] not in COLORS or match[2] not in SHAPES or match[3] not in DIRECTIONS:
        raise ValueError(f"caption {caption!r} is not 'a COLOUR SHAPE moving DIRECTION' with COLOUR in "
                         f"{list(COLORS)}, SHAPE in {list(SHAPES)}, DIRECTION in {list(DIRECTIONS)}")
    return match[1], match[2], match[3]


def _neighbours(a: np.ndarray, fill: int | bool) -> list[np.ndarray]:
    """``a`` (f, h, w) and its four shifts by one pixel, padded with ``fill``."""
    p = np.pad(a, ((0, 0), (1, 1), (1, 1)), constant_values=fill)
    return [p[:, 1:-1, 1:-1], p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]


def _components(mask: np.ndarray) -> np.ndarray:
    """Label the 4-connected regions of each frame of ``mask`` (f, h, w): equal labels, one region; -1 off mask."""
    none = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), none)
    while True:
        spread = np.where(mask, np.minimum.reduce(_neighbours(labels, none)), none)
        # Jump to the label of the pixel a label names: regions converge in a few dozen steps, not their length.
        spread = np.where(mask, spread.ravel()[np.minimum(spread, none - 1)].reshape(mask.shape), none)
        if np.array_equal(spread, labels):
            return np.where(mask, labels, -1)
        labels = spread


def _largest_regions(candidates: np.ndarray) -> np.ndarray:
    """Per frame, the largest region of ``candidates`` (f, h, w) with a plausible area, as a mask; empty if none."""
    labels = _components(candidates)
    h, w = candidates.shape[1:]
    masks = np.zeros(candidates.shape, dtype=bool)
    for t in range(len(candidates)):
        ids, areas = np.unique(labels[t][labels[t] >= 0], return_counts=True)
        ok = (areas >= MIN_AREA) & (areas <= MAX_AREA_FRACTION * h * w)
        if ok.any():
            masks[t] = labels[t] == ids[ok][np.argmax(areas[ok])]
    return masks


def _blend(pixels: np.ndarray, colour: str) -> np.ndarray:
    """How far each pixel (..., 3) lies from BACKGROUND (0) towards ``colour`` (1), projected on that line."""
    towards = _TOWARDS[colour]
    return (pixels - _BACKGROUND) @ towards / (towards @ towards)


def _colour(pixels: np.ndarray) -> str:
    """The palette colour whose line from BACKGROUND passes nearest the median of ``pixels`` (n, 3)."""
    median = np.median(pixels, axis=0)
    offsets = {name: np.linalg.norm(median - _BACKGROUND - np.clip(_blend(median, name), 0, 1) * towards)
               for name, towards in _TOWARDS.items()}
    return min(offsets, key=offsets.get)


def _overlaps(mask: np.ndarray) -> list[float]:
    """IoU of ``mask`` (h, w) with an ideal circle, square and triangle (apex up) of its area and centroid."""
    ys, xs = np.nonzero(mask)
    area = len(ys)
    dy, dx = np.mgrid[:mask.shape[0], :mask.shape[1]] - np.array([ys.mean(), xs.mean()])[:, None, None]
    side, height = math.sqrt(area), math.sqrt(2 * area)  # the demo's triangle is as wide as it is high
    below_apex = dy + 2 * height / 3  # a triangle's centroid is a third of its height above the base
    ideal = {"circle": dx ** 2 + dy ** 2 <= area / math.pi,
             "square": (np.abs(dx) <= side / 2) & (np.abs(dy) <= side / 2),
             "triangle": (below_apex >= 0) & (below_apex <= height) & (np.abs(dx) <= below_apex / 2)}
    return [(mask & ideal[shape]).sum() / (mask | ideal[shape]).sum() for shape in SHAPES]


def _shape(masks: np.ndarray) -> str:
    """The shape whose ideal overlaps the object best on average over frames.

    Unlike the fill ratio of the bounding box, the overlap uses every pixel, so a stray pixel of noise at
    the edge or corners rounded by blur do not flip a square into a circle.
    """
    return SHAPES[int(np.argmax(np.mean([_overlaps(mask) for mask in masks], axis=0)))]


def _path(masks: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, float]:
    """Fit the centroids' x(t), y(t) by straight lines: the velocity (vx, vy) in px/frame and the RMS residual."""
    ys, xs = np.stack([np.mean(np.nonzero(m), axis=1) for m in masks]).T
    vx, x0 = np.polyfit(times, xs, 1)
    vy, y0 = np.polyfit(times, ys, 1)
    residual = np.hypot(xs - (x0 + vx * times), ys - (y0 + vy * times))
    return np.array([vx, vy]), float(np.sqrt(np.mean(residual ** 2)))


def _direction(velocity: np.ndarray, displacement: float, size: int) -> str | None:
    """The direction of the dominant axis of motion (y grows downward); None if it travels too little."""
    if displacement < MIN_TRAVEL_FRACTION * size:
        return None
    vx, vy = velocity
    if abs(vx) >= abs(vy):
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


def _background_error(video: np.ndarray, masks: np.ndarray) -> float:
    """Mean |pixel - BACKGROUND| outside the object dilated by one pixel (its edge may be blended)."""
    dilated = np.logical_or.reduce(_neighbours(masks, False))
    diff = np.abs(video - _BACKGROUND)
    return float(diff[~dilated].mean()) if (~dilated).any() else 0.0


def _found(masks: np.ndarray) -> bool:
    """Whether an object is in more than half of the frames (and at least two, to fit a path)."""
    present = int(masks.any(axis=(1, 2)).sum())
    return present * 2 > len(masks) and present >= 2


def read_video(video: np.ndarray) -> Reading:
    """Read one clip, uint8 RGB ``(f, h, w, 3)``: colour, shape, direction and how clean and steady it is."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != np.uint8 or len(video) < 2:
        raise ValueError(f"expected a uint8 video (f >= 2, h, w, 3), got {video.dtype} {video.shape}")
    video = video.astype(np.float64)
    # First cut: far from the background in any way; it finds the object and its colour.
    masks = _largest_regions(np.linalg.norm(video - _BACKGROUND, axis=-1) > OBJECT_DISTANCE)
    colour = _colour(video[masks]) if _found(masks) else None
    if colour is not None:  # second cut: at least half-way to that colour
        masks = _largest_regions(_blend(video, colour) >= 0.5)
    background_error = _background_error(video, masks)
    if colour is None or not _found(masks):
        return Reading(None, None, None, 0.0, background_error, math.nan, found=False)
    present = masks.any(axis=(1, 2))
    frames = masks[present]
    velocity, rms = _path(frames, np.nonzero(present)[0].astype(np.float64))
    displacement = float(np.hypot(*velocity) * (len(video) - 1))
    sizes = np.sqrt(frames.sum(axis=(1, 2)))
    jitter = rms / math.sqrt(np.mean(sizes ** 2)) + float(sizes.std() / sizes.mean())
    return Reading(colour, _shape(frames), _direction(velocity, displacement, min(video.shape[1:3])),
                   displacement, background_error, jitter, found=True)


def score(readings: list[Reading], captions: list[str]) -> dict[str, float]:
    """Score readings against their captions: the fraction right of colour, shape, direction and "all" three,
    ``found`` (fraction with an object), mean ``background_error``, mean ``jitter`` (over videos with an
    object; NaN if none) and ``count``.
    """
    if len(readings) != len(captions):
        raise ValueError(f"need one caption per reading, got {len(readings)} readings and {len(captions)} captions")
    if not readings:
        raise ValueError("no readings to score")
    truth = [parse_caption(c) for c in captions]
    right = np.array([[r.colour == c, r.shape == s, r.direction == d] for r, (c, s, d) in zip(readings, truth)])
    jitters = [r.jitter for r in readings if r.found]
    return {"count": len(readings),
            "colour": float(right[:, 0].mean()), "shape": float(right[:, 1].mean()),
            "direction": float(right[:, 2].mean()), "all": float(right.all(axis=1).mean()),
            "found": float(np.mean([r.found for r in readings])),
            "background_error": float(np.mean([r.background_error for r in readings])),
            "jitter": float(np.mean(jitters)) if jitters else math.nan}


def check_samples(sample_dir: str | Path) -> tuple[list[Reading], list[str]]:
    """The readings of every GIF in a ``vdm-sample`` output folder (its samples.json), with their prompts."""
    from PIL import Image, ImageSequence

    index = json.loads((Path(sample_dir) / "samples.json").read_text())
    readings, prompts = [], []
    for record in index["samples"]:
        gif = next((f for f in record["files"] if f.endswith(".gif")), None)
        if gif is None:
            raise ValueError(f"{sample_dir}: sample {record['index']} has no GIF to read; sample with --format gif")
        with Image.open(gif) as img:
            frames = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)])
        readings.append(read_video(frames))
        prompts.append(record["prompt"])
    return readings, prompts


def main(argv: list[str] | None = None) -> int:
    """``python -m data_tools.shape_checker SAMPLES_DIR``: read and score the videos vdm-sample wrote there."""
    parser = argparse.ArgumentParser(prog="python -m data_tools.shape_checker", description=__doc__.split("\n\n")[0])
    parser.add_argument("sample_dir", help="a vdm-sample --out folder (samples.json + GIFs) of demo-style prompts")
    args = parser.parse_args(argv)
    readings, prompts = check_samples(args.sample_dir)
    for r, p in zip(readings, prompts):
        print(f"  {p!r}: read {r.colour} {r.shape} moving {r.direction} "
              f"(background error {r.background_error:.1f}, jitter {r.jitter:.2f})")
    s = score(readings, prompts)
    print(f"checker: {s['count']} videos, right colour {s['colour']:.2f}, shape {s['shape']:.2f}, direction "
          f"{s['direction']:.2f}, all three {s['all']:.2f}; background error {s['background_error']:.1f} "
          f"(0-255, real clips 0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
