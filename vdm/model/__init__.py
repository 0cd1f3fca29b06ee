"""The denoiser: Unet3D (pure torch + einops)."""

from vdm.model.unet3d import Unet3D

__all__ = ["Unet3D"]
