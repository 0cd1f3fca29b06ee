"""Seconds per sampled video for DDPM, DDIM-50 and DPM-Solver++-20, with and without CFG.

    .venv/bin/python bench/sampling.py            # CPU, 2 threads, batch 1
    .venv/bin/python bench/sampling.py --full     # also time every sampler end to end (slow)

Configs: `demo` = Unet3D(dim=16, dim_mults=(1, 2), cond_dim=384), 8 frames 32x32; `bench` = dim 32,
dim_mults (1, 2, 4), cond_dim 384, 8 frames 64x64. One video per call, 16 text tokens.

Every sampler makes one denoiser call per step (two with two-pass CFG), so a sampler's time is
steps x the per-step time; the per-step time of each mode is measured over a few DDIM steps
(best of interleaved repeats, after a warm-up), and DPM-Solver++-20 is also timed end to end on the demo
config to show the extrapolation holds (--full: every sampler, every config). DDPM is given for timesteps=250 (and x4 for 1000).
"""

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vdm.diffusion import GaussianDiffusion  # noqa: E402
from vdm.model.unet3d import Unet3D  # noqa: E402

CONFIGS = {
    "demo": dict(model=dict(dim=16, dim_mults=(1, 2), cond_dim=384), frames=8, size=32),
    "bench": dict(model=dict(dim=32, dim_mults=(1, 2, 4), cond_dim=384), frames=8, size=64),
}
TIMESTEPS = 250
SAMPLERS = [("ddpm", TIMESTEPS), ("ddim", 50), ("dpmpp", 20)]


class TwoPass(nn.Module):
    """The same denoiser without `forward_with_cond_scale`: CFG then runs as two separate passes."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def build(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = Unet3D(**cfg["model"]).eval()
    diffusion = GaussianDiffusion(model, image_size=cfg["size"], num_frames=cfg["frames"],
                                  timesteps=TIMESTEPS)
    cond = torch.randn(1, 16, cfg["model"]["cond_dim"])
    return diffusion, model, cond


def timed_sample(diffusion, cond, cond_scale, sampler, steps):
    """(wall seconds, process CPU seconds) of one sample() call."""
    wall, cpu = time.perf_counter(), time.process_time()
    diffusion.sample(cond=cond, cond_scale=cond_scale, batch_size=1, sampler=sampler, steps=steps,
                     progress=False, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - wall, time.process_time() - cpu


def per_step_times(diffusion, model, cond, steps=2, repeats=3):
    """Wall and CPU seconds per sampler step for each mode: the best of `repeats` DDIM runs.

    The modes are interleaved round by round and the minimum kept, so that load from other processes
    on a shared machine inflates no single mode; CPU seconds (both threads) are reported beside wall
    seconds because they are less disturbed by such load.
    """
    modes = {"uncond": (model, None, 1.0), "cfg batched": (model, cond, 5.0),
             "cfg two-pass": (TwoPass(model), cond, 5.0)}
    wall, cpu = {mode: [] for mode in modes}, {mode: [] for mode in modes}
    for round_ in range(repeats + 1):  # round 0 warms up
        for mode, (denoiser, c, scale) in modes.items():
            diffusion.denoise_fn = denoiser
            w, p = timed_sample(diffusion, c, scale, "ddim", steps)
            if round_:
                wall[mode].append(w / steps)
                cpu[mode].append(p / steps)
    diffusion.denoise_fn = model
    return {m: min(ts) for m, ts in wall.items()}, {m: min(ts) for m, ts in cpu.items()}


def bench_config(name, full):
    diffusion, model, cond = build(name)
    wall, cpu = per_step_times(diffusion, model, cond)

    print(f"\n[{name}] {CONFIGS[name]}  (s/video, batch 1; extrapolated from per-step wall times)")
    print(f"{'mode':<14}{'s/step':>9}{'cpu-s/step':>12}" + "".join(f"{s}-{n:>4}".rjust(13) for s, n in SAMPLERS))
    for mode, step in wall.items():
        print(f"{mode:<14}{step:>9.3f}{cpu[mode]:>12.3f}" + "".join(f"{step * n:>13.2f}" for _, n in SAMPLERS))
    print(f"  DDPM at 1000 timesteps (x4 of 250): {4 * wall['uncond'] * TIMESTEPS:.0f} s uncond, "
          f"{4 * wall['cfg batched'] * TIMESTEPS:.0f} s with batched CFG")
    print(f"  speed-up over DDPM-{TIMESTEPS}: DDIM-50 x{TIMESTEPS / 50:.1f}, DPM++-20 x{TIMESTEPS / 20:.1f} "
          "(equal per-step cost)")
    for label, t in (("wall", wall), ("cpu", cpu)):
        print(f"  [{label}] CFG cost: batched x{t['cfg batched'] / t['uncond']:.2f}, two-pass "
              f"x{t['cfg two-pass'] / t['uncond']:.2f} of uncond; batched-CFG speed-up over two "
              f"passes x{t['cfg two-pass'] / t['cfg batched']:.2f}")

    if name == "demo" or full:
        checks = [("dpmpp", 20)] + ([("ddim", 50), ("ddpm", None)] if full else [])
        for sampler, steps in checks:
            for mode, c, scale in (("uncond", None, 1.0), ("cfg batched", cond, 5.0)):
                measured, _ = timed_sample(diffusion, c, scale, sampler, steps)
                predicted = wall[mode] * (steps or TIMESTEPS)
                print(f"  end to end {sampler}-{steps or TIMESTEPS} {mode}: {measured:.2f} s "
                      f"(extrapolated {predicted:.2f} s, ratio {measured / predicted:.2f})")
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="time every sampler end to end")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    results = {name: bench_config(name, args.full) for name in args.configs}
    summary = ", ".join(f"{n}: DPM++-20 with CFG {r['cfg batched'] * 20:.1f} s/video, batched CFG "
                        f"x{r['cfg two-pass'] / r['cfg batched']:.2f}" for n, r in results.items())
    print(f"\nsampling bench done: {summary}")


if __name__ == "__main__":
    main()
