"""The shape checker against clips with known answers, and the held-out combinations of the demo dataset."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageSequence

from data_tools.demo_data import (BACKGROUND, COLORS, DIRECTIONS, HELD_OUT, SHAPES, combinations, main,
                                  make_demo_dataset, render_array, render_clip)
from data_tools.shape_checker import Reading, parse_caption, read_video, score

TRIPLES = [(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def caption(triple: tuple[str, str, str]) -> str:
    return "a {} {} moving {}".format(*triple)


def every_clip(size: int, frames: int = 8, seed: int = 0) -> list[np.ndarray]:
    rng = random.Random(seed)
    return [render_array(*t, size=size, frames=frames, rng=rng) for t in TRIPLES]


def captions_of(folder: Path) -> list[str]:
    return [p.read_text(encoding="utf-8").strip() for p in sorted(folder.glob("*.txt"))]


# ---------------------------------------------------------------- known answers

@pytest.mark.parametrize("size, frames, max_jitter", [(16, 8, 0.13), (32, 8, 0.07), (64, 6, 0.04)])
def test_every_rendered_clip_reads_right(size, frames, max_jitter):
    videos = every_clip(size, frames)
    readings = [read_video(v) for v in videos]
    result = score(readings, [caption(t) for t in TRIPLES])
    assert result == pytest.approx({"count": 72, "colour": 1.0, "shape": 1.0, "direction": 1.0, "all": 1.0,
                                    "found": 1.0, "background_error": 0.0, "jitter": result["jitter"]})
    assert max(r.jitter for r in readings) < max_jitter
    # The demo's shapes travel half the frame; centroids of pixel shapes land within a pixel of that.
    assert [r.displacement for r in readings] == pytest.approx([size / 2] * 72, abs=1.0)


def test_render_array_is_the_rgb_of_render_clip():
    video = render_array("blue", "circle", "up", size=24, frames=5, rng=random.Random(3))
    frames = render_clip("blue", "circle", "up", 24, 5, random.Random(3))
    assert video.shape == (5, 24, 24, 3) and video.dtype == np.uint8
    assert np.array_equal(video, np.stack([np.asarray(f.convert("RGB")) for f in frames]))
    assert {tuple(p) for p in video.reshape(-1, 3)} == {BACKGROUND, COLORS["blue"]}


def test_reversed_clip_reads_the_opposite_direction():
    for triple, video in zip(TRIPLES, every_clip(32)):
        reading = read_video(video[::-1])
        assert (reading.colour, reading.shape) == triple[:2]
        assert reading.direction == OPPOSITE[triple[2]], triple


def test_static_clip_has_no_direction_and_no_jitter():
    video = np.repeat(render_array("green", "square", "left")[:1], 8, axis=0)
    reading = read_video(video)
    assert reading.found and reading.direction is None
    assert reading.displacement == pytest.approx(0.0, abs=1e-9) and reading.jitter == pytest.approx(0.0, abs=1e-9)


def test_jitter_rises_when_the_object_shakes_and_changes_size():
    steady = render_array("red", "square", "right", size=32, rng=random.Random(1))
    shaky = steady.copy()
    for t, dy in enumerate([0, 3, -3, 2, -2, 3, -3, 0]):  # up and down while it moves right
        shaky[t] = np.roll(steady[t], dy, axis=0)
    pulsing = np.stack([render_array("red", "square", "right", size=32, rng=random.Random(1 + t % 2))[t]
                        for t in range(8)])  # two radii, alternating
    steady_jitter = read_video(steady).jitter
    assert steady_jitter < 0.05
    assert read_video(shaky).jitter > 0.2 > steady_jitter
    assert read_video(pulsing).jitter > steady_jitter + 0.05
    assert read_video(shaky).direction == "right"


def test_gaussian_noise_still_reads_right():
    noise = np.random.default_rng(0)
    noisy = [np.clip(v + noise.normal(0, 20, v.shape), 0, 255).astype(np.uint8) for v in every_clip(32)]
    result = score([read_video(v) for v in noisy], [caption(t) for t in TRIPLES])
    assert result["all"] >= 0.9 and result["found"] == 1.0
    # Mean |N(0, 20)| is 16; clipping at 0 near the dark background takes a little off.
    assert 12 < result["background_error"] < 17


def test_uniform_noise_is_not_read_confidently():
    noise = np.random.default_rng(0)
    videos = [noise.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8) for _ in TRIPLES]
    readings = [read_video(v) for v in videos]
    result = score(readings, [caption(t) for t in TRIPLES])
    # Chance is 1/6, 1/3, 1/4 and 1/72; noise must not do better.
    assert result["colour"] <= 0.3 and result["shape"] <= 0.45 and result["direction"] <= 0.35
    assert result["all"] <= 0.05
    assert result["found"] <= 0.2 and result["background_error"] > 60


def test_empty_frames_find_nothing():
    reading = read_video(np.broadcast_to(np.array(BACKGROUND, dtype=np.uint8), (8, 32, 32, 3)))
    assert reading == Reading(None, None, None, 0.0, 0.0, reading.jitter, found=False)
    assert np.isnan(reading.jitter)
    assert np.isnan(score([reading], ["a red circle moving up"])["jitter"])


def test_bad_inputs_say_what_was_wrong():
    with pytest.raises(ValueError, match=r"uint8 video .* float32 \(8, 32, 32, 3\)"):
        read_video(np.zeros((8, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(8, 32, 32\)"):
        read_video(np.zeros((8, 32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="'a red blob moving up' is not"):
        parse_caption("a red blob moving up")
    with pytest.raises(ValueError, match="2 readings and 1 captions"):
        score([read_video(v) for v in every_clip(16)[:2]], ["a red circle moving up"])


def test_parse_caption():
    assert parse_caption("a purple triangle moving down\n") == ("purple", "triangle", "down")
    assert [parse_caption(caption(t)) for t in TRIPLES] == TRIPLES


# ---------------------------------------------------------------- held-out combinations

def test_held_out_leaves_every_part_in_training():
    train = combinations("train")
    assert combinations("held-out") == [t for t in TRIPLES if t in HELD_OUT]
    assert len(HELD_OUT) == len(set(HELD_OUT)) == 8 and set(HELD_OUT) <= set(TRIPLES)
    assert len(train) == 64 and not set(train) & set(HELD_OUT) and combinations("all") == TRIPLES
    for i, part in enumerate((COLORS, SHAPES, DIRECTIONS)):
        assert {t[i] for t in train} == set(part)
    for colour, shape, direction in HELD_OUT:
        assert any(t[:2] == (colour, shape) for t in train)
        assert any(t[0] == colour and t[2] == direction for t in train)
        assert any(t[1] == shape and t[2] == direction for t in train)
    with pytest.raises(ValueError, match="combos must be one of .* got 'test'"):
        combinations("test")


def test_train_and_held_out_datasets(tmp_path):
    train = captions_of(make_demo_dataset(tmp_path / "train", n=40, size=16, frames=4, combos="train"))
    held = captions_of(make_demo_dataset(tmp_path / "held", n=40, size=16, frames=4, combos="held-out"))
    held_out = {caption(t) for t in HELD_OUT}
    assert len(train) == len(held) == 40
    assert not set(train) & held_out and set(held) <= held_out
    assert len(set(held)) >= 6  # draws over the whole list, not one triple
    again = captions_of(make_demo_dataset(tmp_path / "again", n=40, size=16, frames=4, combos="held-out"))
    assert again == held


def test_combos_all_is_the_dataset_from_before(tmp_path):
    # The first captions of seed 0, as written before held-out combinations existed.
    first = ["a yellow square moving left", "a yellow square moving down", "a green triangle moving right",
             "a purple square moving right", "a white square moving down", "a blue triangle moving right",
             "a purple square moving left", "a red circle moving down"]
    default = make_demo_dataset(tmp_path / "default", n=24)
    explicit = make_demo_dataset(tmp_path / "all", n=24, combos="all")
    assert captions_of(default)[:8] == first
    files = sorted(p.name for p in default.iterdir())
    assert files == sorted(p.name for p in explicit.iterdir())
    assert all((default / f).read_bytes() == (explicit / f).read_bytes() for f in files)
    # The old loop: three draws for the caption, then the clip's own draws.
    rng, old = random.Random(0), []
    for _ in range(24):
        triple = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(list(DIRECTIONS))
        render_clip(*triple, 32, 8, rng)
        old.append(caption(triple))
    assert captions_of(default) == old


def test_written_gifs_read_back_right(tmp_path):
    folder = make_demo_dataset(tmp_path / "held", n=12, combos="held-out", seed=5)
    videos = [np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(Image.open(p))])
              for p in sorted(folder.glob("*.gif"))]
    assert score([read_video(v) for v in videos], captions_of(folder))["all"] == 1.0


def test_cli_combos(tmp_path):
    assert main([str(tmp_path / "out"), "--n", "6", "--size", "16", "--frames", "4", "--combos", "held-out"]) == 0
    assert set(captions_of(tmp_path / "out")) <= {caption(t) for t in HELD_OUT}
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--combos", "test"])


def test_checker_reads_a_vdm_sample_folder(tmp_path, capsys):
    """The demo's closing check: GIFs written as vdm-sample writes them, with samples.json, read and scored;
    a sample that moves the wrong way counts as wrong."""
    import json

    import torch

    from data_tools import shape_checker
    from vdm.sampling.video_io import write_video

    triples = [("red", "circle", "left"), ("blue", "square", "up"), ("yellow", "triangle", "right")]
    records = []
    for i, triple in enumerate(triples):
        frames = render_array(*triple, rng=random.Random(i))
        if i == 2:
            frames = frames[::-1]  # drawn moving left, prompted "moving right"
        video = torch.from_numpy(frames.copy()).permute(3, 0, 1, 2).float() / 255  # (c, f, h, w) in [0, 1]
        path = write_video(tmp_path / f"{i:03d}.gif", video)
        records.append({"index": i, "prompt": "a {} {} moving {}".format(*triple), "files": [str(path)]})
    (tmp_path / "samples.json").write_text(json.dumps({"settings": {}, "samples": records}))

    readings, prompts = shape_checker.check_samples(tmp_path)
    assert [r.direction for r in readings] == ["left", "up", "left"]
    assert shape_checker.main([str(tmp_path)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("checker: 3 videos, right colour 1.00, shape 1.00, direction 0.67, all three 0.67")
