"""Claim: the shard loader feeds training >= 10x faster than a training step consumes (bench config, 2 workers, CPU).

For the demo config (8 frames 32x32) and the bench config (16 frames 64x64) this writes format-v1
shards (random frames, 384-wide embeddings of 4-16 tokens), measures the videos/s that
``build_loader`` delivers with 0, 1 and 2 DataLoader workers over two epochs, and the videos/s of
a Unet3D forward+backward (bf16 autocast, as the trainer runs on CPU) at the same config and micro
batch, and prints loader/consumption. Both are measured in this run, on this machine.

    python bench/loader.py [--samples 256] [--steps 5]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
import yaml

from vdm.config import DataConfig
from vdm.data.format import Manifest, encode_sample, write_manifest
from vdm.data.stream import build_loader

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"demo": ROOT / "configs/demo.yaml", "bench": ROOT / "configs/bench.yaml"}
GEOMETRY = {"demo": (8, 32), "bench": (16, 64)}  # frames, size
COND_DIM = 384


def write_shards(root: Path, n: int, frames: int, size: int, per_shard: int = 16) -> Path:
    """n samples of random clips in shards of ``per_shard``, with a manifest."""
    rng = np.random.default_rng(0)
    shards = []
    for i in range(0, n, per_shard):
        name = f"train-{i // per_shard:06d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for k in range(i, min(n, i + per_shard)):
                clip = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
                emb = rng.standard_normal((int(rng.integers(4, 17)), COND_DIM)).astype(np.float16)
                sink.write(encode_sample(f"{k:06d}", clip, f"clip {k}", emb, {}))
        shards.append({"name": name, "samples": min(n, i + per_shard) - i})
    write_manifest(root, Manifest(frames, size, size, 3, "bench", COND_DIM, 16, shards))
    return root


def loader_rate(shards: Path, batch: int, workers: int, epochs: int = 2) -> float:
    """Videos/s delivered by build_loader, first batch (worker start-up) excluded."""
    cfg = DataConfig(shards=str(shards), num_workers=workers, shuffle_buffer=64)
    loader = build_loader(cfg, batch, 0, 1, seed=0, expect_cond_dim=COND_DIM)
    batches = iter(loader)
    next(batches)
    n = epochs * loader.steps_per_epoch - 1
    start = time.perf_counter()
    for b in itertools.islice(batches, n):
        assert b.video.shape[0] == batch
    return n * batch / (time.perf_counter() - start)


def step_rate(name: str, batch: int, steps: int) -> tuple[float, str]:
    """Videos/s of Unet3D forward+backward at the config's model and geometry, or (nan, why not)."""
    try:
        from vdm.model.unet3d import Unet3D
    except ImportError as err:
        return float("nan"), f"Unet3D not importable: {err}"
    model_cfg = yaml.safe_load(CONFIGS[name].read_text())["model"]
    model_cfg["cond_dim"] = model_cfg.get("cond_dim") or COND_DIM
    model_cfg["dim_mults"] = tuple(model_cfg["dim_mults"])
    unet = Unet3D(**model_cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    frames, size = GEOMETRY[name]
    x = torch.randn(batch, 3, frames, size, size)
    cond, mask = torch.randn(batch, 12, COND_DIM), torch.ones(batch, 12, dtype=torch.bool)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, torch.randint(0, 1000, (batch,)), cond=cond, cond_mask=mask, null_cond_prob=0.1)
        out.float().sub(x).abs().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    per_step = float(np.median(times[1:]))  # the first step pays allocation and kernel selection
    return batch / per_step, f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M params, bf16 autocast"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=256, help="samples per dataset (shards of 16)")
    p.add_argument("--steps", type=int, default=2, help="training steps timed per config")
    p.add_argument("--configs", nargs="+", default=["demo", "bench"], choices=sorted(CONFIGS))
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            frames, size = GEOMETRY[name]
            batch = yaml.safe_load(CONFIGS[name].read_text())["train"]["micro_batch_size"]
            (Path(tmp) / name).mkdir()
            shards = write_shards(Path(tmp) / name, args.samples, frames, size)
            consume, note = step_rate(name, batch, args.steps)
            print(f"{name}: {frames} frames {size}x{size}, micro batch {batch}; training step {consume:.2f} videos/s ({note})")
            for workers in (0, 1, 2):
                rate = loader_rate(shards, batch, workers)
                print(f"  loader, {workers} workers: {rate:8.1f} videos/s = {rate / consume:6.1f}x consumption")
                lines.append((name, workers, rate / consume))
    best = [r for n, w, r in lines if n == "bench" and w == 2]
    if best:
        verdict = "holds" if best[0] >= 10 else "does NOT hold"
        print(f"summary: bench config, 2 workers: loader/consumption = {best[0]:.1f}x (claim >= 10x {verdict})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
