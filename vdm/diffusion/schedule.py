"""Beta schedules and the buffers derived from them, all computed in float64."""

import math

import torch

BETA_SCHEDULES = ("linear", "cosine", "sigmoid")

# Betas are capped below 1 so that every ᾱ_t stays positive (unless zero-terminal-SNR is asked for).
MAX_BETA = 0.999


def linear_betas(timesteps, beta_start=1e-4, beta_end=2e-2):
    """Ho et al. 2020: betas evenly spaced from `beta_start` to `beta_end` (taken literally, not rescaled)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def _betas_from_alphas_cumprod(alphas_cumprod):
    # alphas_cumprod has timesteps + 1 entries, the first being ᾱ at t = 0 (clean data)
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(0, MAX_BETA)


def cosine_betas(timesteps, s=0.008):
    """Nichol & Dhariwal 2021: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), normalised so ᾱ(0) = 1."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    alphas_cumprod = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return _betas_from_alphas_cumprod(alphas_cumprod / alphas_cumprod[0])


def sigmoid_betas(timesteps, start=-3.0, end=3.0, tau=1.0):
    """Chen 2023 ("On the importance of noise scheduling"): ᾱ follows a rescaled sigmoid in t."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alphas_cumprod = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alphas_cumprod(alphas_cumprod / alphas_cumprod[0])


def make_betas(name, timesteps, beta_start=1e-4, beta_end=2e-2):
    """Betas (float64, shape (timesteps,)) for the schedule called `name`."""
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta_schedule {name!r}; allowed: {', '.join(BETA_SCHEDULES)}")
    if not isinstance(timesteps, int) or timesteps < 1:
        raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
    if name == "linear":
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(
                f"linear schedule needs 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        return linear_betas(timesteps, beta_start, beta_end)
    if name == "cosine":
        return cosine_betas(timesteps)
    return sigmoid_betas(timesteps)


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2023, Alg. 1: shift and scale √ᾱ so that ᾱ_T = 0 while ᾱ_1 is unchanged."""
    sqrt_ab = torch.cumprod(1 - betas.double(), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


def schedule_buffers(betas):
    """Every per-timestep quantity the process and the samplers need, in float64.

    With zero terminal SNR ᾱ_T is 0, so 1/√ᾱ is clamped to stay finite: an eps-prediction carries no
    information about x0 at that step (use objective='v' with zero_terminal_snr, as Lin et al. advise).
    """
    betas = betas.double()
    alphas = 1 - betas
    alphas_cumprod = torch.cumprod(alphas, 0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    safe_ab = alphas_cumprod.clamp(min=1e-20)
    one_minus_ab = 1 - alphas_cumprod
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": one_minus_ab.sqrt(),
        "sqrt_recip_alphas_cumprod": safe_ab.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / safe_ab - 1).sqrt(),
        # q(x_{t-1} | x_t, x0) = N(coef1·x0 + coef2·x_t, posterior_variance)
        "posterior_variance": betas * (1 - alphas_cumprod_prev) / one_minus_ab,
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / one_minus_ab,
        "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / one_minus_ab,
        "snr": alphas_cumprod / one_minus_ab,
    }
