"""vdm-shard: real GIFs/MP4s/WebDataset inputs, a real BERT, every bad input, resume and determinism."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.cli import main
from data_tools.decode import DecodeOptions, SkipInput, resize_frame, select_clips
from data_tools.demo_data import make_demo_dataset
from data_tools.pipeline import ShardConfig, run
from vdm.data.format import decode_sample, read_manifest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def encoder():
    from vdm.text import TextEncoder

    return TextEncoder("packaged:minilm", dtype="auto")  # as vdm-shard runs it (bf16 on AMX CPUs)


def gif_frames(n: int, h: int, w: int, seed: int) -> tuple[list[Image.Image], np.ndarray]:
    """Random palette frames (lossless in GIF) and their RGB arrays (n, h, w, 3)."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    idx = rng.integers(0, 16, (n, h, w), dtype=np.uint8)
    images = []
    for i in range(n):
        img = Image.fromarray(idx[i], mode="P")
        img.putpalette(palette.flatten().tolist() + [0] * (768 - 48))
        images.append(img)
    return images, palette[idx]


def write_gif(path: Path, n=10, h=32, w=32, seed=0, caption: str | bytes | None = "a test clip") -> np.ndarray:
    images, rgb = gif_frames(n, h, w, seed)
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0, optimize=False)
    if caption is not None:
        data = caption if isinstance(caption, bytes) else caption.encode("utf-8")
        path.with_suffix(".txt").write_bytes(data)
    return rgb


def write_video(path: Path, n=24, h=48, w=64, fps=12, codec="libx264") -> None:
    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n):
            img = np.full((h, w, 3), (i * 10) % 256, np.uint8)
            img[: h // 2, : w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())


def read_video(path: Path) -> list[Image.Image]:
    with av.open(str(path)) as c:
        return [f.to_image() for f in c.decode(video=0)]


def shard(src, out, encoder=None, **kw) -> "Summary":  # noqa: F821
    decode = DecodeOptions(**{k: kw.pop(k) for k in list(kw) if k in DecodeOptions.__dataclass_fields__})
    return run(ShardConfig(src, out, decode=decode, workers=kw.pop("workers", 0), progress=False, **kw),
               text_encoder=encoder)


def samples(root: Path) -> list:
    manifest = read_manifest(root)
    urls = [str(root / s["name"]) for s in manifest.shards]
    return [decode_sample(raw, expect=manifest) for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def tar_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.tar"))}


# ---------------------------------------------------------------- frame policies and resizing

def test_select_clips_policies():
    opts = DecodeOptions(frames=4)
    assert select_clips(10, 10, opts) == [[0, 3, 6, 9]]
    assert select_clips(10, 10, DecodeOptions(frames=4, frame_policy="first")) == [[0, 1, 2, 3]]
    assert select_clips(30, 30, DecodeOptions(frames=4, frame_policy="fps", target_fps=10)) == [[0, 3, 6, 9]]
    assert select_clips(20, 10, DecodeOptions(frames=4, frame_policy="clips", max_clips=3)) == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert select_clips(3, 10, opts) == [[0, 1, 2, 0]]  # loop
    with pytest.raises(SkipInput, match="too short: 3 frames"):
        select_clips(3, 10, DecodeOptions(frames=4, short_policy="skip"))


def test_resize_crop_and_pad():
    img = Image.fromarray(np.full((20, 40, 3), 200, np.uint8))
    assert resize_frame(img, 16, 16, "crop").shape == (16, 16, 3)
    padded = resize_frame(img, 16, 16, "pad")
    assert padded.shape == (16, 16, 3)
    assert (padded[0] == 0).all() and (padded[8] == 200).all()  # black bars above, image in the middle


def test_demo_dataset(tmp_path):
    a, b = make_demo_dataset(tmp_path / "a", n=20), make_demo_dataset(tmp_path / "b", n=20)
    files = sorted(p.name for p in a.iterdir())
    assert len(files) == 40 and files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    caption = (a / "clip_00000.txt").read_text().strip()
    assert caption.startswith("a ") and " moving " in caption
    assert Image.open(a / "clip_00000.gif").n_frames == 8


# ---------------------------------------------------------------- round trips

def test_gif_round_trip_frames_and_embeddings(tmp_path, encoder):
    src = tmp_path / "in"
    (src / "sub dir").mkdir(parents=True)
    exact = write_gif(src / "exact.gif", n=10, seed=1, caption="a red circle moving left")
    big = write_gif(src / "sub dir" / "wide.gif", n=8, h=48, w=64, seed=2, caption="  a blue square\nmoving up ")
    summary = shard(src, tmp_path / "out", encoder, frames=8, height=32, width=32)
    assert summary.written == 2 and summary.skipped == 0
    got = {s.meta["source"]: s for s in samples(tmp_path / "out")}
    idx = [0, 1, 3, 4, 5, 6, 8, 9]  # 8 of 10 frames, evenly strided
    s = got["exact.gif"]
    assert s.meta["frame_indices"] == idx and s.meta["orig_size"] == [32, 32]
    np.testing.assert_array_equal(s.frames, exact[idx])  # same size: the exact source pixels
    # 64x48 -> cover 32x32: resize to 43x32, keep the centre 32 columns.
    want = [np.asarray(Image.fromarray(f).resize((43, 32), Image.Resampling.BICUBIC, reducing_gap=3.0))[:, 5:37]
            for f in big]
    np.testing.assert_array_equal(got["sub dir/wide.gif"].frames, np.stack(want))
    assert got["sub dir/wide.gif"].caption == "a blue square moving up"  # whitespace normalised
    manifest = read_manifest(tmp_path / "out")
    assert manifest.encoder_dtype == encoder.dtype and manifest.extra["options"]["text_dtype"] == encoder.dtype
    for s in got.values():
        direct = encoder.encode([s.caption])[0]
        assert s.emb.dtype == np.float16 and s.emb.shape == direct.shape
        np.testing.assert_allclose(s.emb.astype(np.float32), direct.astype(np.float32), atol=2e-2, rtol=0)


def test_mp4_round_trip_and_fps_policy(tmp_path, encoder):
    src = tmp_path / "in"
    src.mkdir()
    write_video(src / "clip.mp4", n=24, fps=12)
    write_video(src / "other.webm", n=12, fps=12, codec="libvpx")
    (src / "clip.txt").write_text("a grey square")
    (src / "other.txt").write_text("a webm clip")
    shard(src, tmp_path / "out", encoder, frames=4, height=24, width=24, frame_policy="fps", target_fps=4)
    got = {s.meta["source"]: s for s in samples(tmp_path / "out")}
    assert set(got) == {"clip.mp4", "other.webm"}
    s = got["clip.mp4"]
    assert s.meta["frame_indices"] == [0, 3, 6, 9] and s.meta["fps"] == 12 and s.meta["orig_size"] == [64, 48]
    source = read_video(src / "clip.mp4")
    want = np.stack([resize_frame(source[i], 24, 24) for i in [0, 3, 6, 9]])
    np.testing.assert_array_equal(s.frames, want)


def test_clips_policy_cuts_several_samples(tmp_path, encoder):
    src = tmp_path / "in"
    src.mkdir()
    write_video(src / "long.mp4", n=40, fps=10)
    shard(src, tmp_path / "out", encoder, frames=8, height=16, width=16, frame_policy="clips", max_clips=3,
          no_text=True)
    got = samples(tmp_path / "out")
    assert [s.meta["frame_indices"][0] for s in got] == [0, 8, 16]
    assert [s.key for s in got] == ["0000000_00", "0000000_01", "0000000_02"]


def test_webdataset_input_is_resharded_with_embeddings(tmp_path, encoder):
    write_video(tmp_path / "v.mp4", n=10)
    mp4 = (tmp_path / "v.mp4").read_bytes()
    src = tmp_path / "in"
    src.mkdir()
    with wds.TarWriter(str(src / "00000.tar")) as w:  # video2dataset's layout
        w.write({"__key__": "000000000", "mp4": mp4, "txt": b"a clip from a shard", "json": b'{"url": "x"}'})
        w.write({"__key__": "000000001", "mp4": mp4, "json": json.dumps({"caption": "caption in json"}).encode()})
        w.write({"__key__": "000000002", "txt": b"no video here"})
    summary = shard(src, tmp_path / "out", encoder, frames=4, height=16, width=16)
    got = {s.meta["source"]: s for s in samples(tmp_path / "out")}
    assert set(got) == {"00000.tar#000000000", "00000.tar#000000001"} and summary.skipped == 1
    assert got["00000.tar#000000001"].caption == "caption in json"
    assert all(s.emb is not None and s.emb.shape[1] == 384 for s in got.values())
    assert "no video member" in read_manifest(tmp_path / "out").skipped[0]["reason"]


def test_captions_from_csv_and_jsonl(tmp_path, encoder):
    src = tmp_path / "in"
    (src / "b").mkdir(parents=True)
    write_gif(src / "one.gif", caption=None)
    write_gif(src / "b" / "two.gif", caption=None)
    write_gif(src / "b" / "three.gif", caption="sidecar wins")
    (src / "captions.csv").write_text("file,caption\none.gif,from the csv\n")
    (src / "b" / "captions.jsonl").write_text('{"file": "two.gif", "caption": "from the jsonl"}\n'
                                              '{"file": "three.gif", "caption": "not this"}\n')
    shard(src, tmp_path / "out", encoder, frames=4)
    got = {s.meta["source"]: s.caption for s in samples(tmp_path / "out")}
    assert got == {"one.gif": "from the csv", "b/two.gif": "from the jsonl", "b/three.gif": "sidecar wins"}


def test_unconditional_without_captions(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        write_gif(src / f"{i}.gif", seed=i, caption=None)
    assert main([str(src), str(tmp_path / "out"), "--workers", "0", "--no-progress", "--frames", "4"]) == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest.encoder is None and manifest.encoder_dim is None and manifest.total_samples == 3
    assert all(s.emb is None for s in samples(tmp_path / "out"))


# ---------------------------------------------------------------- bad inputs

def test_every_bad_input_is_skipped_with_its_reason(tmp_path, encoder):
    src = tmp_path / "in"
    src.mkdir()
    write_gif(src / "good.gif", seed=1)
    write_gif(src / "ünïcode name with spaces.gif", seed=2, caption="a café scene")
    write_gif(src / "short.gif", n=3, seed=3)  # looped by default
    good = (src / "good.gif").read_bytes()
    (src / "empty.gif").write_bytes(b"")
    (src / "empty.txt").write_text("x")
    (src / "truncated.gif").write_bytes(good[: len(good) // 3])
    (src / "truncated.txt").write_text("x")
    (src / "text.mp4").write_bytes(b"this is not a video at all" * 10)
    (src / "text.txt").write_text("x")
    write_gif(src / "still.gif", n=1, seed=4)
    bomb = bytearray(good)
    bomb[6:10] = b"\xff\xff\xff\xff"  # header claims 65535x65535
    (src / "bomb.gif").write_bytes(bytes(bomb))
    (src / "bomb.txt").write_text("x")
    write_gif(src / "latin1.gif", seed=5, caption="caf\xe9".encode("latin-1"))
    write_gif(src / "nocaption.gif", seed=6, caption=None)
    (src / "notes.pdf").write_bytes(b"%PDF")
    summary = shard(src, tmp_path / "out", encoder, frames=8, height=16, width=16, workers=2)
    reasons = {x["path"]: x["reason"] for x in read_manifest(tmp_path / "out").skipped}
    assert "empty file" in reasons["empty.gif"]
    assert "truncated or corrupt GIF" in reasons["truncated.gif"]
    assert "not a readable video" in reasons["text.mp4"]
    assert "only 1 frame" in reasons["still.gif"]
    assert reasons["bomb.gif"] == "refused: frame size 65535x65535 is over --max-pixels 16777216"
    assert "not valid UTF-8" in reasons["latin1.gif"]
    assert "missing caption" in reasons["nocaption.gif"]
    assert "not a video file" in reasons["notes.pdf"]
    assert len(reasons) == 8 and summary.skipped == 8
    got = {s.meta["source"]: s for s in samples(tmp_path / "out")}
    assert set(got) == {"good.gif", "ünïcode name with spaces.gif", "short.gif"}
    assert got["short.gif"].meta["frame_indices"] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert got["ünïcode name with spaces.gif"].caption == "a café scene"


def test_short_policy_skip_and_allow_empty_captions(tmp_path, encoder):
    src = tmp_path / "in"
    src.mkdir()
    write_gif(src / "short.gif", n=3)
    write_gif(src / "ok.gif", n=10, seed=1)
    write_gif(src / "nocap.gif", n=10, seed=2, caption=None)
    shard(src, tmp_path / "out", encoder, frames=8, short_policy="skip", allow_empty_captions=True)
    reasons = {x["path"]: x["reason"] for x in read_manifest(tmp_path / "out").skipped}
    assert list(reasons) == ["short.gif"] and "too short" in reasons["short.gif"]
    got = {s.meta["source"]: s for s in samples(tmp_path / "out")}
    assert got["nocap.gif"].caption == "" and got["nocap.gif"].emb.shape[0] == 2  # [CLS] [SEP]


def test_hanging_decoder_is_skipped_after_timeout(tmp_path, encoder, monkeypatch):
    import data_tools.pipeline as pipeline

    real = pipeline.load_clips

    def hangs_on_one(item, opts):  # the forked workers inherit this
        if item.source == "hang.gif":
            time.sleep(60)
        return real(item, opts)

    monkeypatch.setattr(pipeline, "load_clips", hangs_on_one)
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.gif", "hang.gif", "z.gif"):
        write_gif(src / name)
    t0 = time.time()
    summary = shard(src, tmp_path / "out", encoder, workers=2, decode_timeout=1.0, frames=4)
    assert time.time() - t0 < 30 and summary.written == 2
    assert read_manifest(tmp_path / "out").skipped == [
        {"path": "hang.gif", "reason": "decode timed out after 1s (--decode-timeout)"}]


def test_missing_input_dir_and_nothing_written(tmp_path, caplog):
    missing = tmp_path / "no such dir"
    assert main([str(missing), str(tmp_path / "out")]) == 2
    assert str(missing) in caplog.text and "does not exist" in caplog.text
    src = tmp_path / "in"
    src.mkdir()
    (src / "bad.gif").write_bytes(b"GIF89a broken")
    assert main([str(src), str(tmp_path / "out"), "--workers", "0", "--no-progress", "--no-text"]) == 1
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0


# ---------------------------------------------------------------- determinism, resume, inspect

def test_byte_identical_reruns_any_worker_count(tmp_path, encoder):
    """Same inputs and options: the same bytes (default dtype); in fp32 also across worker counts."""
    from vdm.text import TextEncoder

    src = make_demo_dataset(tmp_path / "in", n=30)
    shard(src, tmp_path / "d1", encoder, shard_size=8, workers=2)
    shard(src, tmp_path / "d2", encoder, shard_size=8, workers=2)
    assert tar_bytes(tmp_path / "d1") == tar_bytes(tmp_path / "d2")
    fp32 = TextEncoder("packaged:minilm", dtype="float32")
    shard(src, tmp_path / "a", fp32, shard_size=8, workers=0)
    shard(src, tmp_path / "b", fp32, shard_size=8, workers=2)
    a, b = tar_bytes(tmp_path / "a"), tar_bytes(tmp_path / "b")
    assert len(a) == 4 and a == b
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text().replace(
        str(tmp_path / "b"), str(tmp_path / "a"))
    shard(src, tmp_path / "c", encoder, shard_size=8, shuffle_seed=3)
    c = samples(tmp_path / "c")
    assert [s.meta["source"] for s in c] != sorted(s.meta["source"] for s in c)  # shuffled
    assert sorted(s.meta["source"] for s in c) == sorted(s.meta["source"] for s in samples(tmp_path / "a"))


def test_resume_after_partial_run(tmp_path, encoder):
    src = make_demo_dataset(tmp_path / "in", n=30)
    out = tmp_path / "out"
    shard(src, out, encoder, shard_size=8)
    clean = tar_bytes(out)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    # What a kill midway leaves: the last shard unfinished (.tmp), no stats, no manifest.
    (out / "train-000003.tar").rename(out / "train-000003.tar.tmp")
    (out / "train-000003.stats.json").unlink()
    (out / "manifest.json").unlink()
    summary = shard(src, out, encoder, shard_size=8)
    assert summary.resumed_shards == 3 and summary.written == 30
    assert tar_bytes(out) == clean and not list(out.glob("*.tmp"))
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items() if n != "train-000003.tar")
    keys = [s.key for s in samples(out)]
    assert len(keys) == len(set(keys)) == 30
    shard(src, out, encoder, shard_size=8, overwrite=True)
    assert tar_bytes(out) == clean
    assert all((out / n).stat().st_mtime_ns != t for n, t in kept.items())  # rewritten


def test_resume_after_killed_process(tmp_path, encoder):
    src = make_demo_dataset(tmp_path / "in", n=24)
    out, ref = tmp_path / "out", tmp_path / "ref"
    shard(src, ref, encoder, shard_size=2)
    cmd = [sys.executable, "-m", "data_tools.cli", str(src), str(out), "--shard-size", "2", "--workers", "0",
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.stats.json"))) < 2:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists() and len(list(out.glob("*.tar"))) < 12  # killed midway
    summary = shard(src, out, encoder, shard_size=2)  # the same options as the killed command line
    assert summary.resumed_shards >= 2 and summary.written == 24
    assert tar_bytes(out) == tar_bytes(ref) and not list(out.glob("*.tmp"))
    assert main(["--inspect", str(out)]) == 0


def test_text_dtype_option_records_and_uses_it(tmp_path, capsys):
    """--text-dtype: recorded in the manifest and shown by --inspect; bf16 embeddings are bf16-computed
    (close to, not equal to, fp32 ones)."""
    from vdm.text import TextEncoder

    src = make_demo_dataset(tmp_path / "in", n=6)
    for dtype in ("bfloat16", "float32"):
        out = tmp_path / dtype
        assert main([str(src), str(out), "--workers", "0", "--text-dtype", dtype, "--no-progress", "-q"]) == 0
        manifest = read_manifest(out)
        assert manifest.encoder_dtype == dtype and manifest.extra["options"]["text_dtype"] == dtype
        assert main(["--inspect", str(out)]) == 0
        assert dtype in capsys.readouterr().out
    got = samples(tmp_path / "bfloat16")
    fp32 = TextEncoder("packaged:minilm", dtype="float32").encode([s.caption for s in got])
    for s, ref in zip(got, fp32):
        a, b = s.emb.astype(np.float32), ref.astype(np.float32)
        assert a.shape == b.shape and not np.array_equal(a, b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.02


def test_val_split_and_inspect(tmp_path, encoder, capsys):
    src = make_demo_dataset(tmp_path / "in", n=40)
    out = tmp_path / "out"
    shard(src, out, encoder, shard_size=16, val_fraction=0.25)
    train, val = samples(out), samples(out / "val")
    assert len(train) + len(val) == 40 and 3 <= len(val) <= 18
    assert not {s.meta["source"] for s in train} & {s.meta["source"] for s in val}
    assert main(["--inspect", str(out)]) == 0
    assert "verified: OK" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["--inspect", str(out)]) == 1
    assert "manifest says" in capsys.readouterr().out
    with tarfile.open(out / "val" / "val-000000.tar") as t:
        first = t.getmembers()[0].name
    (out / "val" / "val-000000.tar").write_bytes((out / "val" / "val-000000.tar").read_bytes()[:1500])
    assert main(["--inspect", str(out / "val")]) == 1
    assert first.startswith("0000")
