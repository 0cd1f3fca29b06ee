"""vdm-sample: generate videos from text prompts (or unconditionally) with a consolidated model."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:limit] or "video"


def parse_args(argv=None) -> argparse.Namespace:
    from vdm.config import SampleConfig

    d = SampleConfig()
    p = argparse.ArgumentParser(prog="vdm-sample", description=__doc__)
    p.add_argument("model_dir", help="directory written by vdm-consolidate (model.safetensors + model_config.json)")
    p.add_argument("--prompt", action="append", default=[], help="a text prompt; repeat for several")
    p.add_argument("--prompts-file", default=None, help="a file with one prompt per line")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="videos per prompt (or in all, without prompts)")
    p.add_argument("--cond-scale", type=float, default=d.cond_scale, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--guidance-rescale", type=float, default=d.guidance_rescale)
    p.add_argument("--sampler", default=d.sampler, help="ddpm, ddim or dpmpp")
    p.add_argument("--steps", type=int, default=d.steps, help="sampling steps (ddpm uses all timesteps)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--format", choices=("gif", "mp4", "png"), action="append", default=None,
                   help="output format; repeat for several (default gif)")
    p.add_argument("--fps", type=int, default=d.fps)
    p.add_argument("--out", default="samples", help="output directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from vdm.diffusion import SAMPLERS
    from vdm.sampling.pipeline import load_pipeline
    from vdm.sampling.video_io import write_video

    if args.device == "cpu":
        from vdm.runtime import keep_freed_memory

        keep_freed_memory()  # each denoising step reuses the last one's memory, no page faults
    if args.sampler not in SAMPLERS:
        print(f"vdm-sample: --sampler {args.sampler!r} is not one of {', '.join(SAMPLERS)}", file=sys.stderr)
        return 2
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    try:
        pipe = load_pipeline(args.model_dir, device=args.device)
    except FileNotFoundError as err:
        print(f"vdm-sample: {err}", file=sys.stderr)
        return 2
    steps = None if args.sampler == "ddpm" else args.steps
    start = time.perf_counter()
    videos = pipe(prompts or None, num_samples=args.num_samples, cond_scale=args.cond_scale, sampler=args.sampler,
                  steps=steps, seed=args.seed, eta=args.eta, guidance_rescale=args.guidance_rescale,
                  progress=not args.no_progress)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [p for p in prompts for _ in range(args.num_samples)] if prompts else [""] * len(videos)
    records = []
    for i, (video, prompt) in enumerate(zip(videos, labels)):
        files = [str(write_video(out / f"{i:03d}_{_slug(prompt or 'unconditional')}.{fmt}", video, fps=args.fps))
                 for fmt in (args.format or ["gif"])]
        records.append({"index": i, "prompt": prompt, "files": files})
    settings = {"model_dir": str(args.model_dir), "sampler": args.sampler, "steps": steps, "eta": args.eta,
                "cond_scale": args.cond_scale, "guidance_rescale": args.guidance_rescale, "seed": args.seed,
                "seconds": round(seconds, 2)}
    (out / "samples.json").write_text(json.dumps({"settings": settings, "samples": records}, indent=2))
    print(f"wrote {len(records)} videos ({args.sampler}, {steps or 'all'} steps, cond_scale {args.cond_scale}) "
          f"in {seconds:.1f}s to {out}/ (index: {out / 'samples.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
