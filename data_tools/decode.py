"""Decode a GIF (Pillow) or video (PyAV), pick frames by a stated policy, resize and crop or pad.

``load_clips(item, opts)`` is what a worker process runs per input: it returns fixed-size uint8
``(F, H, W, 3)`` clips with their meta, or raises ``SkipInput`` with the reason. Frame sizes are
checked from the header before anything is decoded, so a decompression bomb is refused cheaply.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from data_tools.sources import Item

FRAME_POLICIES = ("first", "stride", "fps", "clips")
SHORT_POLICIES = ("loop", "skip")
RESIZE_MODES = ("crop", "pad")


class SkipInput(Exception):
    """An input that yields no sample; the message is the reason listed in the manifest."""


@dataclass(frozen=True)
class DecodeOptions:
    """How clips are cut from a source: geometry, frame policy and limits."""

    frames: int = 8
    height: int = 32
    width: int = 32
    frame_policy: str = "stride"  # first | stride | fps | clips
    target_fps: float | None = None  # fps and clips policies; None = the source's own rate
    max_clips: int = 4  # clips policy: most clips taken from one source
    short_policy: str = "loop"  # loop | skip, when the source has fewer frames than a clip needs
    resize_mode: str = "crop"  # crop | pad
    min_source_frames: int = 2  # a one-frame GIF is a still image, not a video
    max_pixels: int = 4096 * 4096  # per frame, from the header, before decoding
    max_source_frames: int = 100_000

    def __post_init__(self):
        if self.frame_policy not in FRAME_POLICIES:
            raise ValueError(f"frame_policy {self.frame_policy!r} is not one of {FRAME_POLICIES}")
        if self.short_policy not in SHORT_POLICIES:
            raise ValueError(f"short_policy {self.short_policy!r} is not one of {SHORT_POLICIES}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if min(self.frames, self.height, self.width, self.max_clips) < 1:
            raise ValueError(f"frames, height, width and max_clips must be >= 1, got {self}")
        if self.target_fps is not None and self.target_fps <= 0:
            raise ValueError(f"target_fps must be > 0, got {self.target_fps}")


def select_clips(n: int, fps: float, opts: DecodeOptions) -> list[list[int]]:
    """Source frame indices of each clip for a source of ``n`` frames at ``fps`` (see ``--frame-policy``)."""
    f = opts.frames
    step = fps / opts.target_fps if opts.target_fps and fps > 0 else 1.0
    if opts.frame_policy == "stride":
        clips = [np.linspace(0, n - 1, f).round().astype(int).tolist()] if n >= f else [list(range(f))]
    elif opts.frame_policy == "clips":
        span = round(f * step)  # source frames one clip covers; clips do not overlap
        count = max(1, min(opts.max_clips, (n - round((f - 1) * step) - 1) // max(span, 1) + 1))
        clips = [[k * span + round(i * step) for i in range(f)] for k in range(count)]
    else:  # first, fps
        step = 1.0 if opts.frame_policy == "first" else step
        clips = [[round(i * step) for i in range(f)]]
    if max(clips[-1]) >= n:
        if opts.short_policy == "skip":
            need = max(clips[-1]) + 1
            raise SkipInput(f"too short: {n} frames, a clip needs {need} (--short-policy skip)")
        clips = [[i % n for i in clip] for clip in clips]
    return clips


def resize_frame(img: Image.Image, height: int, width: int, mode: str = "crop") -> np.ndarray:
    """Resize to cover (crop) or fit inside (pad, black borders) ``height x width``, centred; uint8 (H, W, 3)."""
    img = img.convert("RGB")
    w0, h0 = img.size
    scale = max(width / w0, height / h0) if mode == "crop" else min(width / w0, height / h0)
    nw = min(max(1, round(w0 * scale)), width) if mode == "pad" else max(width, round(w0 * scale))
    nh = min(max(1, round(h0 * scale)), height) if mode == "pad" else max(height, round(h0 * scale))
    if (nw, nh) != (w0, h0):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if mode == "crop":
        left, top = (nw - width) // 2, (nh - height) // 2
        return np.asarray(img.crop((left, top, left + width, top + height)))
    canvas = Image.new("RGB", (width, height))
    canvas.paste(img, ((width - nw) // 2, (height - nh) // 2))
    return np.asarray(canvas)


class _GifReader:
    """Pillow reader: header size and frame count without decoding pixels."""

    def __init__(self, src, opts: DecodeOptions):
        # Our own size check runs on the header; Pillow's bomb guard (it errors above 2x its limit)
        # then stays on for later frames, which GIF allows to grow the canvas.
        Image.MAX_IMAGE_PIXELS = None
        try:
            self.im = Image.open(src)
            try:
                _check_pixels(self.im.size, opts)
            except SkipInput:
                self.im.close()
                raise
            Image.MAX_IMAGE_PIXELS = opts.max_pixels // 2
            self.im.load()
        except Image.DecompressionBombError:
            raise SkipInput(f"refused: a frame is over --max-pixels {opts.max_pixels}") from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as err:
            raise SkipInput(f"not a readable image ({type(err).__name__}: {err})") from None
        self.size = self.im.size
        try:
            self.n = min(getattr(self.im, "n_frames", 1), opts.max_source_frames)
        except (OSError, EOFError, ValueError, IndexError) as err:
            raise SkipInput(f"truncated or corrupt GIF ({type(err).__name__}: {err or 'ends early'})") from None
        duration = self.im.info.get("duration") or 100  # GIF players treat 0 as 100 ms
        self.fps = 1000.0 / duration

    def close(self) -> None:
        self.im.close()

    def frames(self) -> Iterator[Image.Image]:
        for i in range(self.n):
            self.im.seek(i)
            yield self.im


class _VideoReader:
    """PyAV reader: header size, frame rate, and frame count (from the header or by counting packets)."""

    def __init__(self, src, opts: DecodeOptions):
        import av

        self.src = src
        try:
            self.container = av.open(src)
            stream = self.container.streams.video[0]
        except (av.error.FFmpegError, IndexError, OSError, ValueError, UnicodeDecodeError) as err:
            if getattr(self, "container", None) is not None:
                self.container.close()
            raise SkipInput(f"not a readable video ({type(err).__name__}: {err})") from None
        self.size = (stream.codec_context.width, stream.codec_context.height)
        _check_pixels(self.size, opts)
        self.fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        self.n = stream.frames
        if not self.n:
            try:
                self.n = sum(1 for p in self.container.demux(stream) if p.size)
                self.container.seek(0)
            except av.error.FFmpegError as err:
                raise SkipInput(f"corrupt video stream ({type(err).__name__}: {err})") from None
        self.n = min(self.n, opts.max_source_frames)
        # One decoder thread: parallelism comes from worker processes, each busy with its own file.
        stream.codec_context.thread_count = 1
        self.stream = stream

    def close(self) -> None:
        self.container.close()

    def frames(self) -> Iterator[Image.Image]:
        import av

        try:
            for i, frame in enumerate(self.container.decode(self.stream)):
                if i >= self.n:
                    return
                yield frame.to_image()
        except av.error.FFmpegError as err:
            raise SkipInput(f"decode error ({type(err).__name__}: {err})") from None


def _check_pixels(size: tuple[int, int], opts: DecodeOptions) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise SkipInput(f"bad frame size {w}x{h}")
    if w * h > opts.max_pixels:
        raise SkipInput(f"refused: frame size {w}x{h} is over --max-pixels {opts.max_pixels}")


def _open(item: Item, opts: DecodeOptions):
    data = item.read_bytes()
    src = io.BytesIO(data) if data is not None else item.path
    if (data is not None and not data) or (data is None and os.path.getsize(item.path) == 0):
        raise SkipInput("empty file (0 bytes)")
    return (_GifReader if item.kind == "gif" else _VideoReader)(src, opts)


def load_clips(item: Item, opts: DecodeOptions) -> tuple[list[tuple[np.ndarray, dict]], dict]:
    """Decode one input into ``[(frames uint8 (F, H, W, 3), meta), ...]`` and timings; SkipInput on bad input."""
    t0 = time.perf_counter()
    reader = _open(item, opts)
    try:
        if reader.n < opts.min_source_frames:
            raise SkipInput(f"only {reader.n} frame(s), fewer than --min-source-frames {opts.min_source_frames}")
        clips = select_clips(reader.n, reader.fps, opts)
        picked, decoded, resize_s = _pick_frames(reader, {i for clip in clips for i in clip}, opts)
    finally:
        reader.close()
    if len(picked) < len({i for clip in clips for i in clip}):
        # The header promised more frames than the file holds (e.g. truncated): choose again from what exists.
        if decoded < opts.min_source_frames:
            raise SkipInput(f"only {decoded} decodable frame(s) of {reader.n} in the header")
        return load_clips_from_count(item, opts, decoded)
    out = []
    for k, clip in enumerate(clips):
        meta = {"source": item.source, "orig_size": list(reader.size), "fps": round(reader.fps, 4),
                "source_frames": reader.n, "frame_indices": clip, "clip": k}
        out.append((np.stack([picked[i] for i in clip]), meta))
    total = time.perf_counter() - t0
    return out, {"decode_s": total - resize_s, "resize_s": resize_s}


def _pick_frames(reader, wanted: set[int], opts: DecodeOptions) -> tuple[dict[int, np.ndarray], int, float]:
    """Decode in order, keeping only the wanted frames (resized at once, so long videos stay small in memory)."""
    picked: dict[int, np.ndarray] = {}
    resize_s, decoded = 0.0, 0
    try:
        for i, img in enumerate(reader.frames()):
            decoded = i + 1
            if i in wanted:
                t = time.perf_counter()
                picked[i] = resize_frame(img, opts.height, opts.width, opts.resize_mode)
                resize_s += time.perf_counter() - t
            if len(picked) == len(wanted):
                break
    except Image.DecompressionBombError:
        raise SkipInput(f"refused: a frame is over --max-pixels {opts.max_pixels}") from None
    except (OSError, EOFError, ValueError, IndexError) as err:
        raise SkipInput(f"decode error after {decoded} frames ({type(err).__name__}: {err})") from None
    return picked, decoded, resize_s


def load_clips_from_count(item: Item, opts: DecodeOptions, n: int) -> tuple[list[tuple[np.ndarray, dict]], dict]:
    """Second pass for a source whose real frame count ``n`` is below its header's: decode the first n only."""
    capped = DecodeOptions(**{**opts.__dict__, "max_source_frames": n})
    return load_clips(item, capped)


def clip_count_bound(opts: DecodeOptions) -> int:
    """Most samples one input can give (for sizing shards)."""
    return opts.max_clips if opts.frame_policy == "clips" else 1
