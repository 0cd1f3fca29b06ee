"""Shards -> batches on simulated ranks: real shards (vdm-shard's and hand-made bad ones), real WebDataset."""

import itertools
import os
import pathlib
import pickle
import shutil
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from vdm.config import DataConfig
from vdm.data.format import Manifest, decode_sample, encode_sample, write_manifest
from vdm.data.stream import BAD_SHARD, Batch, LoaderState, build_loader, resolve_shards

F, S, D = 4, 8, 6  # hand-made shards: 4 frames of 8x8, embeddings of width 6


def take(loader, n):
    return list(itertools.islice(loader, n))


def keys_of(batches):
    return [k for b in batches for k in b.keys]


def write_dataset(root, n_shards=4, per=8, bad=None, prefix="s"):
    """Hand-made shards; ``bad`` maps a global sample index to extra/replacement members."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng, shards, k = np.random.default_rng(0), [], 0
    for i in range(n_shards):
        name = f"train-{i:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for _ in range(per):
                frames = rng.integers(0, 256, (F, S, S, 3), dtype=np.uint8)
                emb = rng.standard_normal((1 + k % 5, D)).astype(np.float16)
                sample = encode_sample(f"{prefix}{k:04d}", frames, f"caption {k}", emb, {"i": k})
                sink.write({**sample, **(bad or {}).get(k, {})})
                k += 1
        shards.append({"name": name, "samples": per})
    write_manifest(root, Manifest(F, S, S, 3, encoder="test", encoder_dim=D, max_tokens=8, shards=shards))
    return root


def reference(root):
    """key -> decoded sample, read straight from the tars."""
    out = {}
    for tar in sorted(pathlib.Path(root).glob("*.tar")):
        for raw in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            out[raw["__key__"]] = decode_sample(raw)
    return out


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """48 captioned demo GIFs sharded by vdm-shard (4 per shard, MiniLM embeddings)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from data_tools.cli import main
    from data_tools.demo_data import make_demo_dataset

    base = tmp_path_factory.mktemp("demo")
    gifs = make_demo_dataset(base / "gifs", n=48)
    out = base / "shards"
    assert main([str(gifs), str(out), "--frames", "8", "--size", "32", "--shard-size", "4", "--workers", "0",
                 "--no-progress", "-q"]) == 0
    return out


@pytest.fixture(scope="session")
def small(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("small") / "ds")


@pytest.mark.parametrize("world,workers,batch", [(2, 0, 4), (2, 2, 3), (4, 2, 3)])
def test_vdm_shard_round_trip_ranks_see_disjoint_samples_covering_the_epoch(demo_shards, world, workers, batch):
    ref = reference(demo_shards)
    cfg = DataConfig(shards=str(demo_shards), num_workers=workers, shuffle_buffer=8)
    seen = []
    for rank in range(world):
        loader = build_loader(cfg, batch, rank, world, seed=1, expect_cond_dim=384)
        assert loader.manifest.encoder_dim == 384 and loader.steps_per_epoch == 48 // (world * batch)
        batches = take(loader, loader.steps_per_epoch)
        seen += keys_of(batches)
        for b in batches:
            assert isinstance(b, Batch) and b.video.shape == (batch, 3, 8, 32, 32) and b.video.dtype == torch.float32
            assert b.text.shape[0] == batch and b.text.shape[2] == 384 and b.mask.dtype == torch.bool
            for i, key in enumerate(b.keys):
                want = ref[key]
                frames = torch.from_numpy(want.frames).permute(3, 0, 1, 2).float() / 127.5 - 1
                assert torch.equal(b.video[i], frames)
                n = want.emb.shape[0]
                assert b.mask[i].sum() == n and b.mask[i, :n].all()
                assert torch.equal(b.text[i, :n], torch.from_numpy(want.emb).float())
                assert not b.text[i, n:].any() and b.captions[i] == want.caption
        assert loader.stats()["samples"] == loader.steps_per_epoch * batch
    assert len(seen) == len(set(seen)) and set(seen) == set(ref)


def test_epoch_tail_is_dropped_evenly_and_rotates(small):
    # 32 samples, 3 ranks x 1 reader x batch 4: 2 batches per rank, 8 samples wait each epoch
    cfg = DataConfig(shards=str(small), num_workers=0, shuffle_buffer=4)
    loaders = [build_loader(cfg, 4, r, 3, seed=0) for r in range(3)]
    assert {ld.steps_per_epoch for ld in loaders} == {2}
    epochs = [take(ld, 4) for ld in loaders]
    first = keys_of([b for e in epochs for b in e[:2]])
    second = keys_of([b for e in epochs for b in e[2:]])
    assert len(set(first)) == len(first) == 24 and len(set(second)) == 24
    assert set(first) != set(second)  # another tail waits in epoch 1
    assert all(ld.state_dict()["epoch"] == 1 for ld in loaders)


def test_too_few_shards_for_ranks_times_workers(small):
    cfg = DataConfig(shards=str(small), num_workers=2)
    with pytest.raises(ValueError, match=r"4 shards for 4 ranks x 2 workers = 8 readers"):
        build_loader(cfg, 1, 0, 4, seed=0)
    build_loader(cfg, 1, 0, 2, seed=0)  # 4 readers: fine


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_exactly_the_rest(small, workers):
    cfg = DataConfig(shards=str(small), num_workers=workers, shuffle_buffer=6)
    full = build_loader(cfg, 2, 1, 2, seed=3)
    steps = full.steps_per_epoch
    expected = keys_of(take(full, steps + 3))  # into the next epoch too
    first = build_loader(cfg, 2, 1, 2, seed=3)
    head = keys_of(take(first, 3))  # workers have prefetched more than this
    state = first.state_dict()
    assert state["step"] == 3 and sum(state["positions"]["1"]) == 6
    import json
    resumed = build_loader(cfg, 2, 1, 2, seed=3, state=json.loads(json.dumps(state)))
    rest = keys_of(take(resumed, steps))
    assert head + rest == expected
    assert resumed.stats()["samples"] == (steps + 3) * 2


def test_resume_from_another_ranks_state_derives_positions(small):
    cfg = DataConfig(shards=str(small), num_workers=2, shuffle_buffer=6)
    expected = keys_of(take(build_loader(cfg, 2, 0, 2, seed=3), 8))
    rank1 = build_loader(cfg, 2, 1, 2, seed=3)
    take(rank1, 3)
    resumed = build_loader(cfg, 2, 0, 2, seed=3, state=rank1.state_dict())  # positions of rank 1 only
    assert keys_of(take(resumed, 5)) == expected[6:]
    merged = LoaderState.merge([rank1.state_dict(), {"positions": {"0": [4, 2]}}])
    assert merged["positions"] == {"1": [4, 2], "0": [4, 2]}


def test_same_seed_reproduces_other_seed_reorders(small):
    cfg = DataConfig(shards=str(small), num_workers=2, shuffle_buffer=8)
    a, b, c = (keys_of(take(build_loader(cfg, 4, 0, 1, seed=s), 8)) for s in (5, 5, 6))
    assert a == b and sorted(a) == sorted(c) and a != c
    in_order = lambda keys: sum(int(y[1:]) == int(x[1:]) + 1 for x, y in zip(keys, keys[1:]))  # noqa: E731
    unbuffered = keys_of(take(build_loader(DataConfig(shards=str(small), num_workers=0, shuffle_buffer=0),
                                           4, 0, 1, seed=5), 8))
    assert in_order(unbuffered) == 28 and in_order(a) < 12  # the buffer mixes samples within and across shards


def test_hflip_is_seeded_and_flips_some(small):
    ref = reference(small)
    cfg = DataConfig(shards=str(small), num_workers=0, hflip=True)
    batches = take(build_loader(cfg, 8, 0, 1, seed=0), 4)
    again = take(build_loader(cfg, 8, 0, 1, seed=0), 4)
    flips = []
    for b, b2 in zip(batches, again):
        assert torch.equal(b.video, b2.video)
        for i, key in enumerate(b.keys):
            frames = torch.from_numpy(ref[key].frames).permute(3, 0, 1, 2).float() / 127.5 - 1
            flipped = torch.equal(b.video[i], frames.flip(-1))
            assert flipped or torch.equal(b.video[i], frames)
            flips.append(flipped)
    assert 0 < sum(flips) < len(flips)


def test_resampled_continues_with_new_randomness_after_resume(small):
    cfg = DataConfig(shards=str(small), mode="resampled", num_workers=2, shuffle_buffer=4)
    first = build_loader(cfg, 4, 0, 2, seed=0)
    assert first.steps_per_epoch is None
    head = keys_of(take(first, 6))
    fresh = keys_of(take(build_loader(cfg, 4, 0, 2, seed=0), 12))
    assert head == fresh[:24]  # reproducible without a resume
    resumed = build_loader(cfg, 4, 0, 2, seed=0, state=first.state_dict())
    tail = keys_of(take(resumed, 6))
    assert tail != fresh[24:] and tail != head  # not a replay of either
    assert set(tail) <= set(reference(small))
    other_rank = keys_of(take(build_loader(cfg, 4, 1, 2, seed=0), 6))
    assert other_rank != head


def test_weights_mix_datasets_in_resampled_mode(small, tmp_path):
    other = write_dataset(tmp_path / "other", n_shards=2, prefix="t")
    cfg = DataConfig(shards=[str(small), str(other)], weights=[0.0, 1.0], mode="resampled", num_workers=0)
    keys = keys_of(take(build_loader(cfg, 4, 0, 1, seed=0), 5))
    assert len(keys) == 20 and all(k.startswith("t") for k in keys)
    cfg.weights = [1.0, 1.0]
    keys = keys_of(take(build_loader(cfg, 4, 0, 1, seed=0), 10))
    assert any(k.startswith("t") for k in keys) and any(k.startswith("s") for k in keys)
    with pytest.raises(ValueError, match="only data.mode=resampled"):
        build_loader(DataConfig(shards=[str(small), str(other)], weights=[1.0, 2.0]), 4, 0, 1, seed=0)


class Payload:
    """Unpickling this creates the marker file: proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def truncate_inside_sample(tar_path, key):
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(key + "."))
    with open(tar_path, "r+b") as f:
        f.truncate(member.offset_data + 10)


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_data_is_skipped_counted_and_pickles_never_run(tmp_path, workers):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists()  # the payload does run when unpickled
    wrong = np.zeros((F, S + 2, S, 3), np.uint8)
    bad = {3: {"frames.npy": encode_sample("x", wrong, "", None, {})["frames.npy"]},
           9: {"frames.npy": b"this is not an npy array"},
           12: {"pyd": payload, "pickle": payload, "pth": payload}}
    root = write_dataset(tmp_path / "bad", bad=bad)
    # cut inside s0029: s0024..s0027 survive; s0028 too is lost, as it cannot be known complete at the cut
    truncate_inside_sample(root / "train-000003.tar", "s0029")
    cfg = DataConfig(shards=str(root), num_workers=workers, shuffle_buffer=4)
    loader = build_loader(cfg, 1, 0, 1, seed=0)  # batch 1: no partial batch can hide a sample
    steps = loader.steps_per_epoch
    batches = take(loader, steps)
    stats = loader.stats()
    assert not marker.exists()
    good = {f"s{k:04d}" for k in range(28)} - {"s0003", "s0009"}  # s0012 carries the pickles but is good
    assert set(keys_of(batches)) == good
    assert stats["skipped_by_reason"] == {"frames shape != manifest": 1, "unreadable frames.npy": 1, BAD_SHARD: 4}
    assert stats["skipped"] == 6 and stats["bad_shards"] == 1 and stats["samples"] == len(good)
    assert len(batches) == steps == 32 and stats["padded_batches"] == 32 - len(good)


def test_bad_sample_skips_resume_exactly(tmp_path):
    root = write_dataset(tmp_path / "bad", bad={5: {"frames.npy": b"junk"}, 20: {"frames.npy": b"junk"}})
    cfg = DataConfig(shards=str(root), num_workers=2, shuffle_buffer=4)
    expected = keys_of(take(build_loader(cfg, 2, 0, 1, seed=0), 12))
    first = build_loader(cfg, 2, 0, 1, seed=0)
    head = keys_of(take(first, 5))
    rest = keys_of(take(build_loader(cfg, 2, 0, 1, seed=0, state=first.state_dict()), 7))
    assert head + rest == expected


def test_manifest_mismatches_fail_at_start(small):
    with pytest.raises(ValueError, match="embeddings of width 512 but the shards hold 6"):
        build_loader(DataConfig(shards=str(small)), 2, 0, 1, seed=0, expect_cond_dim=512)
    with pytest.raises(ValueError, match="data.frames=16 but the shards hold 4"):
        build_loader(DataConfig(shards=str(small), frames=16), 2, 0, 1, seed=0)
    with pytest.raises(ValueError, match="data.image_size=64 but the shards hold 8x8"):
        build_loader(DataConfig(shards=str(small), image_size=64), 2, 0, 1, seed=0)
    build_loader(DataConfig(shards=str(small), frames=F, image_size=S), 2, 0, 1, seed=0, expect_cond_dim=D)


def test_raw_gif_dir_and_empty_specs_fail_with_what_to_do(tmp_path):
    from data_tools.demo_data import make_demo_dataset

    gifs = make_demo_dataset(tmp_path / "gifs", n=3)
    with pytest.raises(ValueError, match=f"looks like raw videos.*vdm-shard {gifs} {gifs}_shards"):
        build_loader(DataConfig(shards=str(gifs)), 2, 0, 1, seed=0)
    with pytest.raises(ValueError, match="looks like raw videos"):
        build_loader(DataConfig(shards=f"{gifs}/train-{{000000..000003}}.tar"), 2, 0, 1, seed=0)
    with pytest.raises(ValueError, match="matches nothing"):
        build_loader(DataConfig(shards=str(tmp_path / "nope-{0..3}.tar")), 2, 0, 1, seed=0)
    with pytest.raises(ValueError, match="empty shard spec"):
        resolve_shards("")


def test_brace_pattern_list_and_pipe_cat_specs(small, tmp_path):
    expected = sorted(keys_of(take(build_loader(DataConfig(shards=str(small)), 4, 0, 1, seed=0), 8)))
    assert len(expected) == 32
    specs = [str(small / "train-{000000..000003}.tar"),
             [str(small / f"train-{i:06d}.tar") for i in range(4)],
             f"pipe:cat {small}/train-{{000000..000003}}.tar"]
    for spec in specs:
        loader = build_loader(DataConfig(shards=spec, num_workers=2), 4, 0, 1, seed=0)
        assert loader.steps_per_epoch == 8 and sorted(keys_of(take(loader, 8))) == expected
    # a pipe: source without a manifest streams in resampled mode, checked against data.frames/image_size
    bare = tmp_path / "bare"
    shutil.copytree(small, bare)
    (bare / "manifest.json").unlink()
    spec = f"pipe:cat {bare}/train-{{000000..000003}}.tar"
    with pytest.raises(ValueError, match="set data.frames and data.image_size"):
        build_loader(DataConfig(shards=spec, mode="resampled"), 4, 0, 1, seed=0)
    with pytest.raises(ValueError, match="epoch mode needs each shard's sample count"):
        build_loader(DataConfig(shards=spec, frames=F, image_size=S), 4, 0, 1, seed=0)
    loader = build_loader(DataConfig(shards=spec, mode="resampled", frames=F, image_size=S), 4, 0, 1, seed=0)
    assert set(keys_of(take(loader, 4))) <= set(expected)
    # ... or in epoch mode, with a local copy of the manifest naming the remote shards
    loader = build_loader(DataConfig(shards={"urls": spec, "manifest": str(small)}), 4, 0, 1, seed=0)
    assert loader.steps_per_epoch == 8 and sorted(keys_of(take(loader, 8))) == expected
