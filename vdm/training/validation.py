"""Validation loss: the diffusion loss on held-out shards at fixed timesteps and fixed noise.

Each video's timestep and noise come from a generator seeded by (VAL_SEED, the video's key), so the
figure depends on neither the rank count nor the loader's order, and compares across steps and
runs. Captions are never dropped (null_cond_prob=0). Each rank evaluates its own share; all ranks
make as many forward calls as the busiest one (ZeRO 3 gathers weights collectively), and the sums
meet in one all-reduce on the engine's device.
"""

from __future__ import annotations

import hashlib

import torch

from vdm.data.stream import Batch
from vdm.training.engine import all_reduce_sum, autocast

VAL_SEED = 1234  # fixed for good: the same timestep and noise per video in every run
BUCKETS = ("low", "mid", "high")  # thirds of the timestep range, low = least noise


def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{VAL_SEED}:{key}".encode()).digest()[:8], "little") >> 1


def fixed_t_and_noise(keys: list[str], num_timesteps: int, shape: tuple, offset_noise: float = 0.0):
    """Per key a timestep and noise of `shape` (c, f, h, w), drawn on the CPU from a generator seeded by
    (VAL_SEED, key); with offset noise as in training. Returns t (b,) and noise (b, c, f, h, w)."""
    ts, noises = [], []
    for key in keys:
        gen = torch.Generator().manual_seed(_key_seed(key))
        ts.append(int(torch.randint(num_timesteps, (1,), generator=gen)))
        noise = torch.randn(shape, generator=gen)
        if offset_noise > 0:  # GaussianDiffusion._training_noise: one offset per channel, shared by all pixels
            noise += offset_noise * torch.randn((shape[0], 1, 1, 1), generator=gen)
        noises.append(noise)
    return torch.tensor(ts), torch.stack(noises)


def placeholder_batch(loader) -> Batch:
    """One black video (and one zero token) for a rank whose share holds no videos: it must still run
    the forward calls of the others, and discards the result."""
    m = loader.manifest
    text = mask = None
    if loader.want_text and m.encoder_dim:
        text, mask = torch.zeros(1, 1, m.encoder_dim), torch.ones(1, 1, dtype=torch.bool)
    return Batch(torch.zeros(1, m.channels, m.frames, m.height, m.width), text, mask, [""], ["placeholder"])


def video_losses(diffusion, batch: Batch, device: torch.device, precision: str):
    """The conditional loss of each video of `batch` at its fixed timestep and noise: (losses (b,), t (b,))."""
    t, noise = fixed_t_and_noise(batch.keys, diffusion.num_timesteps, tuple(batch.video.shape[1:]),
                                 diffusion.offset_noise)
    t = t.to(device)
    text = batch.text.to(device) if batch.text is not None else None
    mask = batch.mask.to(device) if batch.mask is not None else None
    with autocast(device, precision):
        losses = diffusion.p_losses(diffusion.normalize(batch.video.to(device)), t, noise=noise.to(device),
                                    cond=text, cond_mask=mask, null_cond_prob=0.0, reduction="none")
    return losses.double(), t


@torch.no_grad()
def evaluate(diffusion, loader, device: torch.device, precision: str) -> dict:
    """Mean validation loss over every rank's share of `loader` (a build_val_loader), as
    {"loss": float | None, "videos": int, "loss_t": {bucket: float}}; every rank gets the same."""
    # row 0: loss sums, row 1: counts; column 0 all videos, then one per timestep bucket
    totals = torch.zeros(2, 1 + len(BUCKETS), dtype=torch.float64, device=device)
    was_training = diffusion.training
    diffusion.eval()
    batches, last = iter(loader), None
    try:
        while True:
            batch = next(batches, None)
            if all_reduce_sum(torch.tensor([float(batch is not None)]), device).item() == 0:
                break  # every rank is done
            losses, t = video_losses(diffusion, batch or last or placeholder_batch(loader), device, precision)
            if batch is None:
                continue  # a forward call for the ranks that still have videos
            last = batch
            bucket = 1 + t * len(BUCKETS) // diffusion.num_timesteps
            totals[0, 0] += losses.sum()
            totals[1, 0] += len(losses)
            totals[0].index_add_(0, bucket, losses)
            totals[1].index_add_(0, bucket, torch.ones_like(losses))
    finally:
        diffusion.train(was_training)
    sums, counts = all_reduce_sum(totals, device).tolist()
    return {"loss": sums[0] / counts[0] if counts[0] else None, "videos": int(counts[0]),
            "loss_t": {name: s / n for name, s, n in zip(BUCKETS, sums[1:], counts[1:]) if n}}
