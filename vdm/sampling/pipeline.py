"""load_pipeline(dir): consolidated weights + their config -> a sampler ready for prompts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from vdm.sampling.consolidate import MODEL_CONFIG, WEIGHTS, build_from_model_config


class Pipeline:
    """Text prompts in, videos out: encodes prompts with the model's own encoder, then samples with CFG."""

    def __init__(self, diffusion, config: dict, device: torch.device):
        self.diffusion = diffusion
        self.config = config
        self.device = device
        self._encoder = None

    @property
    def conditional(self) -> bool:
        return bool(self.config["model"].get("cond_dim"))

    @property
    def encoder(self):
        """The text encoder named in model_config.json, loaded on first use."""
        if self._encoder is None:
            from vdm.text import TextEncoder

            enc = self.config["encoder"]
            # The dtype the captions were encoded in (older model configs: fp32).
            self._encoder = TextEncoder(enc["name"], max_tokens=enc.get("max_tokens") or 64, device=self.device,
                                        dtype=enc.get("dtype") or "float32")
            if self._encoder.dim != enc["dim"]:
                raise ValueError(f"encoder {enc['name']} gives width {self._encoder.dim}, the model was trained "
                                 f"with {enc['dim']}")
        return self._encoder

    @torch.no_grad()
    def __call__(self, prompts: list[str] | None = None, num_samples: int = 1, cond_scale: float = 5.0,
                 sampler: str = "dpmpp", steps: int | None = 20, seed: int | None = 0, eta: float = 0.0,
                 guidance_rescale: float = 0.0, progress: bool = True) -> torch.Tensor:
        """Videos (B, C, F, H, W) in [0, 1]: `num_samples` per prompt, or unconditional without prompts."""
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        cond = mask = None
        if prompts:
            if not self.conditional:
                raise ValueError("this model was trained without text; sample it without prompts")
            texts = [p for p in prompts for _ in range(num_samples)]
            cond, mask = self.encoder.encode_padded(texts)
            cond, mask = cond.to(self.device), mask.to(self.device)
            batch_size = len(texts)
        else:
            batch_size = num_samples
        video = self.diffusion.sample(cond=cond, cond_mask=mask, cond_scale=cond_scale, batch_size=batch_size,
                                      sampler=sampler, steps=steps, eta=eta, guidance_rescale=guidance_rescale,
                                      generator=generator, progress=progress)
        return ((video.float() + 1) / 2).clamp(0, 1)  # the rebuilt diffusion works in [-1, 1]


def load_pipeline(model_dir: str | Path, device: str | torch.device = "cpu") -> Pipeline:
    """Rebuild Unet3D + GaussianDiffusion from `model_dir` (written by vdm-consolidate); weights via safetensors."""
    model_dir = Path(model_dir)
    for name in (MODEL_CONFIG, WEIGHTS):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name} is missing: make it with vdm-consolidate RUN_DIR --out {model_dir}")
    config = json.loads((model_dir / MODEL_CONFIG).read_text())
    unet, diffusion = build_from_model_config(config)
    unet.load_state_dict(load_file(str(model_dir / WEIGHTS)), strict=True)
    device = torch.device(device)
    return Pipeline(diffusion.to(device).eval(), config, device)
