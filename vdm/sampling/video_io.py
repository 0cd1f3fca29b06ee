"""Read and write videos: GIF (Pillow), MP4 (PyAV), PNG frame strips; and the tensor conversions.

Frames on disk are uint8 ``(F, H, W, C)``; tensors are float ``(C, F, H, W)`` in [0, 1], as the
reference implementation's ``video_tensor_to_gif`` / ``gif_to_tensor``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageSequence

WRITERS = ("gif", "mp4", "png")


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """(C, F, H, W) float in [0, 1] -> uint8 (F, H, W, C)."""
    if video.ndim != 4:
        raise ValueError(f"expected a video tensor (C, F, H, W), got shape {tuple(video.shape)}")
    frames = (video.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return rearrange(frames, "c f h w -> f h w c").cpu().numpy()


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (F, H, W, C) -> (C, F, H, W) float in [0, 1]."""
    return rearrange(torch.from_numpy(np.ascontiguousarray(frames)).float() / 255, "f h w c -> c f h w")


def write_gif(path: str | Path, frames: np.ndarray, fps: float = 8, duration_ms: int | None = None) -> Path:
    """Write uint8 (F, H, W, C) frames as a looping GIF, at `fps` or `duration_ms` per frame."""
    path = Path(path)
    images = [Image.fromarray(f.squeeze(-1) if f.shape[-1] == 1 else f) for f in frames]
    duration = duration_ms if duration_ms is not None else max(1, round(1000 / fps))
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration,
                   loop=0, optimize=False, disposal=2)
    return path


def read_gif(path: str | Path, channels: int = 3) -> np.ndarray:
    """Every frame of a GIF as uint8 (F, H, W, C), RGB (or L for channels=1)."""
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    with Image.open(path) as img:
        frames = [np.asarray(frame.convert(mode)) for frame in ImageSequence.Iterator(img)]
    array = np.stack(frames)
    return array[..., None] if array.ndim == 3 else array


def write_mp4(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write uint8 (F, H, W, 3) frames as H.264 MP4 (sizes padded to even, as yuv420p requires)."""
    import av

    path = Path(path)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    f, h, w, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Every frame of a video file (MP4, WebM, GIF...) via PyAV as uint8 (F, H, W, 3)."""
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def write_png_strip(path: str | Path, frames: np.ndarray) -> Path:
    """All frames side by side in one PNG, for a quick look."""
    strip = rearrange(frames, "f h w c -> h (f w) c")
    Image.fromarray(strip.squeeze(-1) if strip.shape[-1] == 1 else strip).save(path)
    return Path(path)


def write_video(path: str | Path, video: torch.Tensor, fps: int = 8) -> Path:
    """Write a (C, F, H, W) tensor in [0, 1]; the format comes from the suffix (.gif, .mp4, .png)."""
    path = Path(path)
    frames = tensor_to_frames(video)
    suffix = path.suffix.lower().lstrip(".")
    if suffix == "gif":
        return write_gif(path, frames, fps)
    if suffix == "mp4":
        return write_mp4(path, frames, fps)
    if suffix == "png":
        return write_png_strip(path, frames)
    raise ValueError(f"cannot write {path.name}: the suffix must be one of {', '.join(WRITERS)}")


def video_tensor_to_gif(video: torch.Tensor, path: str | Path, duration: int = 120) -> Path:
    """The reference's helper: (C, F, H, W) in [0, 1] to a GIF with `duration` ms per frame."""
    return write_gif(path, tensor_to_frames(video), duration_ms=duration)


def gif_to_tensor(path: str | Path, channels: int = 3) -> torch.Tensor:
    """The reference's helper: a GIF to (C, F, H, W) in [0, 1]."""
    return frames_to_tensor(read_gif(path, channels))
