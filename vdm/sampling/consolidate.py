"""vdm-consolidate: a sharded DeepSpeed checkpoint -> model.safetensors + model_config.json.

The checkpoint is a trusted input (DeepSpeed's files are pickles); what this writes is not pickled,
so the weights can be shared and loaded safely.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from vdm.build import build_diffusion, build_unet
from vdm.config import DiffusionConfig, ModelConfig, section_from_dict

log = logging.getLogger("vdm.consolidate")
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"


def model_config_from_run(run: dict) -> dict:
    """The part of a run's resolved config needed to rebuild and prompt the model."""
    data = run["data"]
    return {"model": run["config"]["model"], "diffusion": run["config"]["diffusion"],
            "image_size": data["image_size"], "num_frames": data["frames"], "channels": data["channels"],
            "encoder": {"name": data["encoder"], "dim": data["encoder_dim"], "max_tokens": data["max_tokens"],
                        "dtype": data.get("encoder_dtype") or "float32"}}


def build_from_model_config(cfg: dict):
    """(unet, diffusion) on CPU in fp32, freshly initialised, from a model_config.json dict."""
    # Models consolidated before the frame-position features existed were trained without them.
    model = {"frame_cond": False, "temporal_pos": False, "temporal_conv": False,
                       "spatial_pos": False} | cfg["model"]
    unet = build_unet(section_from_dict(ModelConfig, model, "model."))
    process = section_from_dict(DiffusionConfig, cfg["diffusion"], "diffusion.")
    diffusion = build_diffusion(unet, process, cfg["image_size"],
                                cfg["num_frames"], cfg["channels"])
    return unet, diffusion


def _unet_prefix(diffusion, unet) -> str:
    for name, child in diffusion.named_children():
        if child is unet:
            return name + "."
    raise RuntimeError("the diffusion module does not hold the Unet3D as a direct child")


def consolidate(run_dir: str | Path, out_dir: str | Path | None = None, tag: str | None = None,
                weights: str = "ema") -> Path:
    """Write `out_dir/model.safetensors` (the denoiser's weights) and `model_config.json`; returns out_dir."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from vdm.training.checkpoint import EMA_FILE, find_latest, is_complete
    from vdm.training.loop import RUN_CONFIG

    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if not (run_dir / RUN_CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir} has no {RUN_CONFIG}: is it a vdm-train output_dir?")
    tag = tag or find_latest(ckpt_dir)
    if tag is None or not is_complete(ckpt_dir, tag):
        raise FileNotFoundError(f"no complete checkpoint {'tag ' + tag if tag else ''} in {ckpt_dir}")
    cfg = model_config_from_run(json.loads((run_dir / RUN_CONFIG).read_text()))
    unet, diffusion = build_from_model_config(cfg)
    prefix = _unet_prefix(diffusion, unet)

    full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
    if weights == "ema":
        ema_path = ckpt_dir / tag / EMA_FILE
        if not ema_path.is_file():
            raise FileNotFoundError(f"{ema_path} is missing; use --weights model for the raw weights")
        state.update(load_file(str(ema_path)))
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the configured Unet3D: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    out_dir = Path(out_dir) if out_dir else run_dir / "consolidated"
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in unet.state_dict().items()}
    save_file(tensors, str(out_dir / WEIGHTS), metadata={"tag": tag, "weights": weights})
    cfg.update(weights=weights, tag=tag, source=str(ckpt_dir / tag))
    (out_dir / MODEL_CONFIG).write_text(json.dumps(cfg, indent=2))
    n_params = sum(t.numel() for t in tensors.values())
    log.info("consolidated %s (%s weights, %.2fM values) -> %s", ckpt_dir / tag, weights, n_params / 1e6,
             out_dir / WEIGHTS)
    return out_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vdm-consolidate", description=__doc__)
    parser.add_argument("run_dir", help="a vdm-train output_dir (holds run_config.json and checkpoints/)")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/consolidated)")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema",
                        help="EMA weights (default) or the raw trained weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        out = consolidate(args.run_dir, args.out, args.tag, args.weights)
    except (FileNotFoundError, RuntimeError) as err:
        print(f"vdm-consolidate: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out / WEIGHTS} and {out / MODEL_CONFIG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
