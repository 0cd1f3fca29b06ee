"""The diffusion process: schedules, GaussianDiffusion, samplers and guidance (pure torch)."""

from vdm.diffusion.gaussian import LOSS_TYPES, OBJECTIVES, GaussianDiffusion
from vdm.diffusion.samplers import SAMPLERS
from vdm.diffusion.schedule import BETA_SCHEDULES

__all__ = ["GaussianDiffusion", "SAMPLERS", "BETA_SCHEDULES", "OBJECTIVES", "LOSS_TYPES"]
