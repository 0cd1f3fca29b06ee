"""Does a trained model follow its text? The whole pipeline from nothing, scored by a program.

    make learn                                   # .venv/bin/python bench/learn.py --report docs/RESULTS.md
    .venv/bin/python bench/learn.py --out learn_out --steps 300     # a shorter run, report in learn_out/

1. captioned clips of coloured shapes moving in named directions; some colour x shape x direction
   triples are held out of training and only prompted at test time (data_tools.demo_data);
2. vdm-shard with a validation split; 3. vdm-train on 2 ranks under the deepspeed launcher
   (ZeRO 2, validation loss in TensorBoard); 4. vdm-consolidate, every saved checkpoint;
5. the time-order probe per checkpoint: the diffusion loss of each held-out clip under its caption,
   played forwards against backwards (which moves the other way), at fixed timesteps and noise;
6. vdm-sample over seen and held-out prompts at guidance 1, 3 and 7, read back by the checker
   (data_tools.shape_checker), against its ceiling (real held-out clips) and chance (noise);
7. the same weights with DDPM (every step), DDIM-50 and DPM-Solver++ at 20 and 10 steps.
The report (Markdown, a loss-curve PNG and a PNG grid of samples) goes to --report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.learn_report import write_report  # noqa: E402
from data_tools import shape_checker  # noqa: E402
from data_tools.demo_data import BACKGROUND, HELD_OUT, render_array  # noqa: E402

GUIDANCE = (1.0, 3.0, 7.0)
SAMPLERS = (("ddpm", None), ("ddim", 50), ("dpmpp", 20), ("dpmpp", 10))
PROBE_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)  # of the schedule's timesteps
SEEN = [("red", "circle", "right"), ("blue", "square", "up"), ("yellow", "triangle", "left"),
        ("green", "circle", "down"), ("purple", "triangle", "right"), ("white", "square", "left"),
        ("red", "square", "up"), ("blue", "circle", "down")]  # prompts of triples seen in training
assert not set(SEEN) & set(HELD_OUT)


# One word of a (colour, shape, direction) triple changed: what the text measurements compare against.
SWAPS = {"colour": lambda c: ("green" if c[0] != "green" else "red",) + c[1:],
         "shape": lambda c: (c[0], "square" if c[1] != "square" else "circle", c[2]),
         "direction": lambda c: c[:2] + ({"left": "right", "right": "left", "up": "down", "down": "up"}[c[2]],)}


def caption(combo) -> str:
    return "a {} {} moving {}".format(*combo)


class Stages:
    """Runs each stage's command with its output in OUT/logs, and keeps its wall time."""

    def __init__(self, out: Path):
        self.out, self.seconds = out, {}
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")

    def run(self, stage: str, cmd: list[str], **env) -> None:
        log_path = self.out / "logs" / f"{stage.split()[0]}.log"
        print(f"== {stage}: {' '.join(cmd)}  (log: {log_path})", flush=True)
        start = time.perf_counter()
        with open(log_path, "a") as log:
            done = subprocess.run(cmd, cwd=ROOT, env=dict(self.env, **env), stdout=log, stderr=subprocess.STDOUT)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        if done.returncode:
            tail = log_path.read_text().splitlines()[-30:]
            raise SystemExit(f"{stage} failed (exit {done.returncode}); last lines of {log_path}:\n" + "\n".join(tail))

    def timed(self, stage: str, fn, *args, **kwargs):
        print(f"== {stage}", flush=True)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        return result


def held_out_clips(n_per_combo: int, seed: int = 1) -> tuple[np.ndarray, list[str]]:
    """Real clips of the held-out triples, (N, F, H, W, 3) uint8, with their captions."""
    import random

    rng = random.Random(seed)
    clips, captions = [], []
    for combo in HELD_OUT:
        for _ in range(n_per_combo):
            clips.append(render_array(*combo, size=32, frames=8, rng=rng))
            captions.append(caption(combo))
    return np.stack(clips), captions


@torch.no_grad()
def time_order_probe(model_dir: Path, clips: np.ndarray, captions: list[str]) -> dict:
    """Fraction of clips whose diffusion loss under their caption is lower played forwards than backwards."""
    from vdm.sampling.pipeline import load_pipeline

    pipe = load_pipeline(model_dir)
    diffusion = pipe.diffusion
    cond, mask = pipe.encoder.encode_padded(captions)
    x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # (b, c, f, h, w) in [-1, 1]
    generator = torch.Generator().manual_seed(0)
    losses = {"forward": torch.zeros(len(clips)), "backward": torch.zeros(len(clips))}
    for frac in PROBE_FRACTIONS:
        t = torch.full((len(clips),), int(frac * diffusion.num_timesteps))
        noise = torch.randn(x.shape, generator=generator)
        for order, video in (("forward", x), ("backward", x.flip(2))):
            x_t = diffusion.q_sample(video, t, noise)
            out = diffusion.denoise_fn(x_t, t, cond=cond, cond_mask=mask, null_cond_prob=0.0).float()
            target = diffusion.objective_target(video, t, noise)
            losses[order] += ((out - target) ** 2).mean(dim=(1, 2, 3, 4)) / len(PROBE_FRACTIONS)
    wins = (losses["forward"] < losses["backward"]).float().mean().item()
    return {"true_order_wins": wins, "loss_forward": losses["forward"].mean().item(),
            "loss_backward": losses["backward"].mean().item()}


def _centroid_direction(x0: torch.Tensor) -> str:
    """The direction in which the weight of `x0` (c, f, h, w; in [-1, 1]) away from the background moves."""
    background = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1, 1) / 127.5 - 1
    weight = (x0 - background).abs().sum(0)
    weight = (weight - weight.mean(dim=(1, 2), keepdim=True)).clamp(min=0) + 1e-6  # (f, h, w)
    ys, xs = torch.meshgrid(torch.arange(x0.shape[2]).float(), torch.arange(x0.shape[3]).float(), indexing="ij")
    path = torch.stack([(weight * c).sum((1, 2)) / weight.sum((1, 2)) for c in (xs, ys)])  # (2, f)
    t = torch.arange(x0.shape[1]).float() - (x0.shape[1] - 1) / 2
    vx, vy = (path * t).sum(1) / (t * t).sum()
    if vx.abs() > vy.abs():
        return "right" if vx > 0 else "left"
    return "down" if vy > 0 else "up"


@torch.no_grad()
def text_sensitivity(model_dir: Path, frac: float = 0.95, draws: int = 4) -> dict:
    """Sampler-free: does the caption set the motion at high noise? The direction of the conditional mean
    x0 for each held-out caption (from `draws` noises at `frac` of the schedule), and how much x0 moves
    when one word of the caption changes: a colour, a shape or a direction."""
    from vdm.sampling.pipeline import load_pipeline

    pipe = load_pipeline(model_dir)
    diffusion = pipe.diffusion
    captions = [caption(c) for c in HELD_OUT]
    swaps = {word: [caption(swap(c)) for c in HELD_OUT] for word, swap in SWAPS.items()}
    generator = torch.Generator().manual_seed(0)
    t = torch.full((len(captions),), int(frac * diffusion.num_timesteps))
    noises = [torch.randn(len(captions), *diffusion.video_shape, generator=generator) for _ in range(draws)]

    def mean_x0(texts):
        cond, mask = pipe.encoder.encode_padded(texts)
        total = 0
        for x in noises:
            out = diffusion.denoise_fn(x, t, cond=cond, cond_mask=mask, null_cond_prob=0.0).float()
            total = total + diffusion.output_to_start_and_noise(x, t, out)[0] / draws
        return total

    base = mean_x0(captions)
    right = [_centroid_direction(base[i]) == c[2] for i, c in enumerate(HELD_OUT)]
    change = {word: (mean_x0(texts) - base).abs().mean().item() for word, texts in swaps.items()}
    return {"mean_x0_direction": sum(right) / len(right), "x0_change": change}


def caption_similarity(encoder_name: str = "packaged:minilm") -> dict:
    """How far one changed word moves the caption's encoding: cosine between each held-out caption and the
    same caption with its colour, shape or direction word swapped, at that word's token and for the mean
    over tokens (what the pooled conditioning sees)."""
    from vdm.text import TextEncoder

    encoder = TextEncoder(encoder_name)
    base, mask = encoder.encode_padded([caption(c) for c in HELD_OUT])
    out = {}
    for word, fn in SWAPS.items():
        other, _ = encoder.encode_padded([caption(fn(c)) for c in HELD_OUT])
        token = torch.nn.functional.cosine_similarity(base, other, dim=-1)  # (n, L)
        changed = token.masked_fill(~mask, 2).min(dim=1).values  # the token that changed most
        weights = mask.unsqueeze(-1).float()
        mean = torch.nn.functional.cosine_similarity((base * weights).sum(1), (other * weights).sum(1), dim=-1)
        out[word] = {"token_cosine": changed.mean().item(), "mean_cosine": mean.mean().item()}
    return out


def stream_check(shards: Path, batches: int = 12) -> dict:
    """The checker on training clips as the trainer receives them (vdm.data.stream), against their captions:
    shard -> stream keeps colour, shape and direction with their caption."""
    from vdm.config import DataConfig
    from vdm.data.stream import build_loader

    loader = build_loader(DataConfig(shards=str(shards), num_workers=0, shuffle_buffer=16), batch_size=8, rank=0,
                          world_size=1, seed=0)
    readings, captions = [], []
    for i, batch in zip(range(batches), loader):
        video = ((batch.video.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (b, c, f, h, w)
        readings += [shape_checker.read_video(v.permute(1, 2, 3, 0).numpy()) for v in video]
        captions += batch.captions
    return shape_checker.score(readings, captions)


def read_samples(sample_dir: Path) -> tuple[list, list[str], float]:
    """The checker's readings of a vdm-sample output folder, their prompts, and seconds per video."""
    readings, prompts = shape_checker.check_samples(sample_dir)
    seconds = json.loads((sample_dir / "samples.json").read_text())["settings"]["seconds"]
    return readings, prompts, seconds / max(1, len(prompts))


def split_scores(readings, prompts) -> dict:
    """Scores on the seen and the held-out prompts separately."""
    held = {caption(c) for c in HELD_OUT}
    out = {}
    for name, keep in (("seen", lambda p: p not in held), ("held_out", lambda p: p in held)):
        pairs = [(r, p) for r, p in zip(readings, prompts) if keep(p)]
        if pairs:
            out[name] = shape_checker.score([r for r, _ in pairs], [p for _, p in pairs])
    return out


def sample(stages: Stages, model_dir: Path, out: Path, prompts_file: Path, cond_scale: float, sampler: str,
           steps: int | None, num_samples: int, stage: str) -> dict:
    cmd = ["vdm-sample", str(model_dir), "--prompts-file", str(prompts_file), "--num-samples", str(num_samples),
           "--cond-scale", str(cond_scale), "--sampler", sampler, "--seed", "0", "--out", str(out), "--no-progress"]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    stages.run(stage, cmd)
    readings, prompts, seconds = read_samples(out)
    return {"scores": split_scores(readings, prompts), "seconds_per_video": seconds, "dir": str(out)}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="learn_out", help="working folder (recreated)")
    p.add_argument("--report", default=None, help="where RESULTS.md goes (default OUT/RESULTS.md); "
                   "its pictures go beside it in results/")
    p.add_argument("--config", default="configs/learn.yaml")
    p.add_argument("--clips", type=int, default=720, help="training clips (before the validation split)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--precision", default="auto", help="bf16, fp32, or auto: bf16 where the CPU multiplies it "
                   "natively (AMX, AVX512-BF16), fp32 elsewhere (bf16 is emulated there and 1.7x slower)")
    p.add_argument("--seeds", type=int, default=3, help="samples per prompt")
    p.add_argument("--sampler-seeds", type=int, default=2,
                   help="samples per held-out prompt in the sampler comparison (DDPM runs every timestep)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from vdm.config import load_config
    from vdm.text import _cpu_has_bf16_matmul

    out = (ROOT / args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    report = Path(args.report).resolve() if args.report else out / "RESULTS.md"
    precision = args.precision if args.precision != "auto" else ("bf16" if _cpu_has_bf16_matmul() else "fp32")
    config = load_config(ROOT / args.config, [f"train.steps={args.steps}"] if args.steps else [])
    steps = config.train.steps
    stages = Stages(out)
    py = sys.executable
    start = time.perf_counter()

    stages.run("1 data", [py, "-m", "data_tools.demo_data", str(out / "gifs"), "--n", str(args.clips),
                          "--combos", "train", "--seed", "0"])
    stages.run("2 shard", ["vdm-shard", str(out / "gifs"), str(out / "shards"), "--frames", "8", "--size", "32",
                           "--shard-size", "40", "--workers", "2", "--val-fraction", "0.1"])
    train_cmd = ["bash", "launch/single_node.sh", args.config, f"data.shards={out / 'shards'}",
                 f"train.output_dir={out / 'run'}", f"train.precision={precision}", f"train.steps={steps}"]
    stages.run("3 train", train_cmd, NPROC="2", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))

    ckpt_dir = out / "run" / "checkpoints"
    tags = sorted(p.name for p in ckpt_dir.iterdir() if (p / "COMPLETE").exists())
    for tag in tags:
        stages.run("4 consolidate", ["vdm-consolidate", str(out / "run"), "--tag", tag, "--out", str(out / "models" / tag)])
    final = out / "models" / tags[-1]

    clips, clip_captions = held_out_clips(n_per_combo=8)
    probe = {tag: stages.timed("5 probe", time_order_probe, out / "models" / tag, clips, clip_captions) for tag in tags}
    for tag in tags:
        probe[tag].update(stages.timed("5 probe", text_sensitivity, out / "models" / tag))
    encoder = stages.timed("5 probe", caption_similarity)
    streamed = stages.timed("5 probe", stream_check, out / "shards")
    ceiling = shape_checker.score([shape_checker.read_video(c) for c in clips], clip_captions)
    noise = np.random.default_rng(0).integers(0, 256, size=clips.shape, dtype=np.uint8)
    chance = shape_checker.score([shape_checker.read_video(c) for c in noise], clip_captions)

    prompts = [caption(c) for c in SEEN + list(HELD_OUT)]
    prompts_file = out / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    guidance = {g: sample(stages, final, out / "samples" / f"g{g:g}", prompts_file, g, "dpmpp", 20, args.seeds,
                          "6 sample") for g in GUIDANCE}
    best = max(GUIDANCE, key=lambda g: guidance[g]["scores"]["held_out"]["all"])
    held_file = out / "held_out_prompts.txt"
    held_file.write_text("\n".join(caption(c) for c in HELD_OUT) + "\n")
    samplers = {f"{name}-{steps_ or 'all'}": sample(stages, final, out / "samplers" / f"{name}{steps_ or ''}",
                                                    held_file, best, name, steps_, args.sampler_seeds, "7 samplers")
                for name, steps_ in SAMPLERS}
    budget = {tag: sample(stages, out / "models" / tag, out / "budget" / tag, held_file, best, "dpmpp", 20,
                          args.seeds, "8 budget") for tag in tags[:-1]}
    budget[tags[-1]] = {"scores": {"held_out": guidance[best]["scores"]["held_out"]}}

    results = {"command": " ".join(["bench/learn.py", *(argv if argv is not None else sys.argv[1:])]),
               "machine": machine(), "precision": precision, "steps": steps, "clips": args.clips,
               "held_out": [caption(c) for c in HELD_OUT], "stage_seconds": stages.seconds,
               "total_seconds": time.perf_counter() - start, "probe": probe, "ceiling": ceiling, "chance": chance,
               "guidance": guidance, "best_guidance": best, "encoder": encoder, "streamed": streamed,
               "samplers": samplers, "budget": budget, "config": str(args.config)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    write_report(results, out, report)
    held = guidance[best]["scores"]["held_out"]
    print(f"learn: {steps} steps in {results['total_seconds'] / 60:.1f} min; held-out at guidance {best:g}: "
          f"colour {held['colour']:.2f} shape {held['shape']:.2f} direction {held['direction']:.2f}; "
          f"time-order probe {probe[tags[-1]]['true_order_wins']:.2f}; report {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
