"""vdm: Video Diffusion Models (Ho et al.) as a distributed training system."""

__version__ = "0.1.0"
__all__ = ["Unet3D", "GaussianDiffusion", "load_pipeline", "__version__"]


def __getattr__(name):
    # Lazy so that `vdm-shard --help` and friends do not pay for importing torch.
    if name == "Unet3D":
        from vdm.model.unet3d import Unet3D
        return Unet3D
    if name == "GaussianDiffusion":
        from vdm.diffusion.gaussian import GaussianDiffusion
        return GaussianDiffusion
    if name == "load_pipeline":
        from vdm.sampling.pipeline import load_pipeline
        return load_pipeline
    raise AttributeError(f"module 'vdm' has no attribute {name!r}")
