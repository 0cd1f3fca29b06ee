"""GIF / MP4 / PNG writing and reading with the real Pillow and PyAV."""

import numpy as np
import pytest
import torch
from PIL import Image

from vdm.sampling.video_io import (frames_to_tensor, gif_to_tensor, read_gif, read_video, tensor_to_frames,
                                   video_tensor_to_gif, write_video)


def moving_square(frames=6, size=24):
    video = torch.zeros(3, frames, size, size)
    for f in range(frames):
        video[0, f, 4:12, 2 + 2 * f:10 + 2 * f] = 1.0  # a red square moving right
        video[2, f] = 0.25
    return video


def test_gif_round_trip_is_exact_for_few_colours(tmp_path):
    video = moving_square()
    path = write_video(tmp_path / "v.gif", video, fps=10)
    with Image.open(path) as img:
        assert img.n_frames == 6 and img.size == (24, 24)
        assert img.info["duration"] == 100
    back = gif_to_tensor(path)
    assert back.shape == video.shape
    assert torch.allclose(back, torch.round(video * 255) / 255, atol=1 / 255)


def test_reference_helpers_round_trip(tmp_path):
    video = moving_square(frames=4, size=16)
    video_tensor_to_gif(video, tmp_path / "r.gif", duration=120)
    with Image.open(tmp_path / "r.gif") as img:
        assert img.info["duration"] == 120
    assert torch.allclose(gif_to_tensor(tmp_path / "r.gif"), video, atol=1 / 255)


def test_mp4_round_trip_with_pyav(tmp_path):
    video = moving_square(frames=8, size=32)
    path = write_video(tmp_path / "v.mp4", video, fps=8)
    frames = read_video(path)
    assert frames.shape == (8, 32, 32, 3)
    # Lossy codec: colours close, the square where it should be.
    assert np.abs(frames.astype(float) - tensor_to_frames(video).astype(float)).mean() < 6


def test_odd_sizes_are_padded_for_h264(tmp_path):
    frames = read_video(write_video(tmp_path / "odd.mp4", torch.rand(3, 3, 15, 17)))
    assert frames.shape == (3, 16, 18, 3)


def test_png_strip_and_bad_suffix(tmp_path):
    path = write_video(tmp_path / "s.png", moving_square(frames=3, size=8))
    assert Image.open(path).size == (24, 8)
    with pytest.raises(ValueError, match="suffix must be one of gif, mp4, png"):
        write_video(tmp_path / "v.avi", moving_square())


def test_tensor_frame_conversions_invert():
    frames = np.random.default_rng(0).integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    assert np.array_equal(tensor_to_frames(frames_to_tensor(frames)), frames)


def test_read_gif_as_grayscale(tmp_path):
    path = write_video(tmp_path / "g.gif", moving_square(frames=2, size=8))
    gray = read_gif(path, channels=1)
    assert gray.shape == (2, 8, 8, 1) and gray.dtype == np.uint8
