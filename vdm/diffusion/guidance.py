"""Classifier-free guidance (Ho & Salimans 2022) with optional guidance rescale (Lin et al. 2023)."""


def combine_guidance(cond_out, null_out, cond_scale, guidance_rescale=0.0):
    """null + cond_scale·(cond − null), then pull its per-sample std back towards cond's by `guidance_rescale`."""
    guided = null_out + (cond_out - null_out) * cond_scale
    if guidance_rescale <= 0:
        return guided
    dims = tuple(range(1, cond_out.ndim))
    rescaled = guided * (cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def guided_output(denoise_fn, x, t, *, cond=None, cond_mask=None, cond_scale=1.0,
                  guidance_rescale=0.0, batched=True, **kwargs):
    """The denoiser's output under classifier-free guidance.

    Without a condition or with cond_scale == 1 this is a single conditional call. Otherwise the
    denoiser's own `forward_with_cond_scale` is used when it has one and `batched` is True (Unet3D
    evaluates cond and null in one batched pass there); else two passes, cond then null, where the
    null pass sets null_cond_prob=1.0, which every denoiser in vdm honours per sample.
    """
    if cond is None or cond_scale == 1:
        return denoise_fn(x, t, cond=cond, cond_mask=cond_mask, null_cond_prob=0.0, **kwargs)
    if batched and hasattr(denoise_fn, "forward_with_cond_scale"):
        return denoise_fn.forward_with_cond_scale(
            x, t, cond=cond, cond_mask=cond_mask, cond_scale=cond_scale,
            rescaled_phi=guidance_rescale, **kwargs)
    cond_out = denoise_fn(x, t, cond=cond, cond_mask=cond_mask, null_cond_prob=0.0, **kwargs)
    null_out = denoise_fn(x, t, cond=cond, cond_mask=cond_mask, null_cond_prob=1.0, **kwargs)
    return combine_guidance(cond_out, null_out, cond_scale, guidance_rescale)


__all__ = ["combine_guidance", "guided_output"]
