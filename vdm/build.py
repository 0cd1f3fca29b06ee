"""Build the denoiser and the diffusion process from their config sections.

Shared by the trainer (from the run config) and the sampling pipeline (from model_config.json),
so a consolidated model is rebuilt exactly as it was trained.
"""

from __future__ import annotations

import dataclasses

from vdm.config import DiffusionConfig, ModelConfig


def build_unet(model: ModelConfig):
    """Unet3D from the `model` section; `cond_dim` must already be resolved (0 or None: unconditional)."""
    from vdm.model.unet3d import Unet3D

    return Unet3D(dim=model.dim, cond_dim=model.cond_dim or None, dim_mults=tuple(model.dim_mults),
                  channels=model.channels, attn_heads=model.attn_heads, attn_dim_head=model.attn_dim_head,
                  init_kernel_size=model.init_kernel_size, resnet_groups=model.resnet_groups,
                  use_sparse_linear_attn=model.use_sparse_linear_attn,
                  gradient_checkpointing=model.gradient_checkpointing, frame_cond=model.frame_cond,
                  temporal_pos=model.temporal_pos, temporal_conv=model.temporal_conv,
                  spatial_pos=model.spatial_pos)


def build_diffusion(unet, diffusion: DiffusionConfig, image_size: int, num_frames: int, channels: int):
    """GaussianDiffusion around `unet`, taking [-1, 1] videos (the loader's range)."""
    from vdm.diffusion.gaussian import GaussianDiffusion

    kwargs = dataclasses.asdict(diffusion)
    kwargs.pop("prob_focus_present")  # a per-step training argument, not a constructor one
    return GaussianDiffusion(unet, image_size=image_size, num_frames=num_frames, channels=channels,
                             auto_normalize=False, **kwargs)
