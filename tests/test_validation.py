"""Validation loss: config errors, the one-pass validation loader's split over ranks, and the fixed
timesteps and noise that make the figure independent of ranks and order (the 2-rank DeepSpeed run
is in test_training.py, on the run it already makes)."""

import pathlib

import pytest
import torch

from vdm.config import ConfigError, DataConfig, load_config
from vdm.data.stream import build_val_loader
from vdm.training.validation import evaluate, fixed_t_and_noise, video_losses

from test_stream import D, write_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides,message", [
    (["log.val_every=-1"], "log.val_every: must be >= 0, got -1"),
    (["log.val_max_videos=-5"], "log.val_max_videos: must be >= 0, got -5"),
    (["data.val_shards=7"], "data.val_shards: expected a shard spec"),
    (["log.val_every=10", "data.val_shards="], "log.val_every=10 needs validation shards but data.val_shards is ''"),
    (["log.val_every=10", "data.val_shards=false"], "set data.val_shards to a spec or null"),
])
def test_bad_validation_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/demo.yaml", overrides)
    assert message in str(err.value)


def test_validation_is_off_by_default_and_takes_specs():
    config = load_config(ROOT / "configs/demo.yaml")
    assert config.log.val_every == 0 and config.data.val_shards is None and config.log.val_max_videos == 256
    config = load_config(None, ["log.val_every=5", "data.val_shards=[a/val, b/val]", "log.val_max_videos=0"])
    assert config.data.val_shards == ["a/val", "b/val"] and config.log.val_every == 5


@pytest.fixture(scope="module")
def val_root(tmp_path_factory):
    """A training dataset with a 20-sample validation split in val/ beside it (3 shards: 8, 8, 4)."""
    root = write_dataset(tmp_path_factory.mktemp("v") / "ds", n_shards=2, per=8)
    write_dataset(root / "val", n_shards=1, per=20, prefix="v")
    return root


def keys_by_rank(cfg, world, workers, max_videos=0, batch=3):
    cfg = DataConfig(shards=cfg.shards, val_shards=cfg.val_shards, num_workers=workers)
    out = []
    for rank in range(world):
        loader = build_val_loader(cfg, batch, rank, world, max_videos=max_videos, expect_cond_dim=D)
        batches = list(loader)
        assert all(1 <= len(b.keys) <= batch for b in batches)
        assert [k for b in list(loader) for k in b.keys] == [k for b in batches for k in b.keys], "one pass, same order"
        out.append([k for b in batches for k in b.keys])
    return out


@pytest.mark.parametrize("world,workers,max_videos", [(1, 0, 0), (2, 0, 0), (3, 2, 0), (4, 1, 13), (2, 2, 7)])
def test_val_loader_reads_each_sample_once_split_by_rank(val_root, world, workers, max_videos):
    want = [f"v{i:04d}" for i in range(max_videos or 20)]  # the first N, in the shards' order
    shares = keys_by_rank(DataConfig(shards=str(val_root)), world, workers, max_videos)
    assert sorted(k for share in shares for k in share) == want
    # rank r's share is the same whatever the workers: [r*N//R, (r+1)*N//R)
    n = len(want)
    assert [sorted(s) for s in shares] == [want[r * n // world:(r + 1) * n // world] for r in range(world)]


def test_val_shards_default_and_missing_val_folder(val_root, tmp_path):
    # data.shards as a directory, a brace pattern or the manifest: val/ beside it
    for spec in (str(val_root), str(val_root / "train-{000000..000001}.tar"), str(val_root / "manifest.json")):
        assert len(keys_by_rank(DataConfig(shards=spec), 1, 0)[0]) == 20
    explicit = keys_by_rank(DataConfig(shards="unused", val_shards=str(val_root / "val")), 1, 0)[0]
    assert len(explicit) == 20
    bare = write_dataset(tmp_path / "bare", n_shards=2, per=4)
    with pytest.raises(ValueError) as err:
        build_val_loader(DataConfig(shards=str(bare)), 4, 0, 1)
    assert "data.val_shards is unset" in str(err.value) and str(bare / "val") in str(err.value)
    assert "vdm-shard --val-fraction" in str(err.value)


def test_fixed_timesteps_and_noise_follow_the_key_only():
    t1, n1 = fixed_t_and_noise(["a", "b", "c"], 1000, (3, 2, 4, 4))
    t2, n2 = fixed_t_and_noise(["c", "a"], 1000, (3, 2, 4, 4))
    assert torch.equal(t1[[2, 0]], t2) and torch.equal(n1[[2, 0]], n2)
    assert len(set(t1.tolist())) > 1 and not torch.equal(n1[0], n1[1])
    _, offset = fixed_t_and_noise(["a"], 1000, (3, 2, 4, 4), offset_noise=0.5)
    assert not torch.equal(offset[0], n1[0])


@pytest.fixture(scope="module")
def tiny_diffusion():
    from vdm.build import build_diffusion, build_unet
    from vdm.config import DiffusionConfig, ModelConfig

    torch.manual_seed(0)
    unet = build_unet(ModelConfig(dim=8, dim_mults=(1, 2), attn_heads=2, attn_dim_head=8, resnet_groups=4,
                                  init_kernel_size=3, cond_dim=D))
    return build_diffusion(unet, DiffusionConfig(timesteps=50, loss_type="l2", cond_drop_prob=0.5), 8, 4, 3)


def test_evaluate_is_the_mean_per_video_loss_whatever_the_split(val_root, tiny_diffusion):
    """The shares of 3 ranks, summed as the all-reduce would, give the loss of 1 rank, which equals the
    mean of each video's loss computed alone; repeatable although cond_drop_prob=0.5 (no caption dropout)."""
    cpu = torch.device("cpu")
    cfg = DataConfig(shards=str(val_root), num_workers=0)
    whole = evaluate(tiny_diffusion, build_val_loader(cfg, 4, 0, 1, expect_cond_dim=D), cpu, "fp32")
    assert whole["videos"] == 20 and len(whole["loss_t"]) >= 2
    parts = [evaluate(tiny_diffusion, build_val_loader(cfg, 3, r, 3, expect_cond_dim=D), cpu, "fp32") for r in range(3)]
    assert [p["videos"] for p in parts] == [6, 7, 7]
    combined = sum(p["loss"] * p["videos"] for p in parts) / 20
    assert combined == pytest.approx(whole["loss"], rel=1e-5)
    alone = [video_losses(tiny_diffusion, b, cpu, "fp32")[0].item()
             for b in build_val_loader(DataConfig(shards=str(val_root), num_workers=0), 1, 0, 1, expect_cond_dim=D)]
    assert sum(alone) / 20 == pytest.approx(whole["loss"], rel=1e-5)
    again = evaluate(tiny_diffusion, build_val_loader(cfg, 4, 0, 1, expect_cond_dim=D), cpu, "fp32")
    assert again == whole and tiny_diffusion.training, "deterministic, and the module's mode is restored"
