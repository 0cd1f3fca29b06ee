"""Reverse-process samplers over any `predict(x_t, t) -> (x_start, eps)` callable.

The samplers know the schedule (ᾱ and, for DDPM, the posterior coefficients) but not the model,
the objective or the guidance: GaussianDiffusion builds `predict` and hands it over. All noise is
drawn from `generator` so a seed reproduces a sample.
"""

import math

import torch

SAMPLERS = ("ddpm", "ddim", "dpmpp")


def randn_like(x, generator=None):
    """Standard normal noise shaped like `x`, drawn from `generator` (the global RNG when None)."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # lazy: the diffusion package imports only torch and einops

    return tqdm(iterable, desc=desc, total=len(iterable))


def _batch_t(x, t):
    return torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)


def _broadcast(value, x):
    # a per-timestep buffer entry, shaped to multiply a (b, c, f, h, w) tensor
    return value.to(x.dtype).reshape(1, *(1,) * (x.ndim - 1))


def _check_steps(num_timesteps, steps):
    if not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_timesteps}], got {steps!r}")


def _pairs(times):
    times = list(times) + [-1]
    return list(zip(times[:-1], times[1:]))


def spaced_timesteps(num_timesteps, steps):
    """(t, t_next) pairs visiting `steps` timesteps evenly spaced from T−1 down to 0; t_next = −1 is clean data."""
    _check_steps(num_timesteps, steps)
    if steps == 1:
        return _pairs([num_timesteps - 1])
    return _pairs(torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long().tolist())


def logsnr_timesteps(alphas_cumprod, steps, min_log_snr=-8.0):
    """(t, t_next) pairs from T−1 down to 0, evenly spaced in log-SNR (as Lu et al. advise for DPM-Solver).

    A second-order multistep solver is unstable when consecutive steps differ much in log-SNR; evenly
    spaced t gives the step into t = 0 a log-SNR gap several times its predecessor's. Below
    `min_log_snr` (e.g. the near-zero ᾱ at the end of the cosine schedule) nothing happens, so the grid
    starts there; the first step still starts at T−1. Duplicates after rounding to integer timesteps
    are dropped, so a schedule may take fewer than `steps` steps.
    """
    num_timesteps = len(alphas_cumprod)
    _check_steps(num_timesteps, steps)
    ab = alphas_cumprod.double().cpu()
    log_snr = ab.log() - (1 - ab).log()
    grid = torch.linspace(max(log_snr[-1].item(), min_log_snr), log_snr[0].item(), steps, dtype=torch.float64)
    times = (log_snr[None, :] - grid[:, None]).abs().argmin(dim=1).tolist()
    times[0] = num_timesteps - 1
    return _pairs(sorted(set(times), reverse=True))


def _alpha_bar(alphas_cumprod, t):
    return 1.0 if t < 0 else alphas_cumprod[t]


def ddpm_loop(predict, schedule, x, *, start_t=None, generator=None, progress=True):
    """Ancestral sampling (Ho et al. 2020): x_{t-1} ~ q(x_{t-1} | x_t, x̂0) for t = start_t … 0."""
    start_t = len(schedule.alphas_cumprod) - 1 if start_t is None else start_t
    for t in _progress(range(start_t, -1, -1), progress, "ddpm"):
        x_start, _ = predict(x, _batch_t(x, t))
        mean = (_broadcast(schedule.posterior_mean_coef1[t], x) * x_start
                + _broadcast(schedule.posterior_mean_coef2[t], x) * x)
        if t > 0:
            x = mean + _broadcast(schedule.posterior_variance[t].sqrt(), x) * randn_like(x, generator)
        else:
            x = mean
    return x


def ddim_loop(predict, alphas_cumprod, x, *, steps, eta=0.0, generator=None, progress=True):
    """DDIM (Song et al. 2021) over an evenly spaced subsequence; eta=0 is deterministic, eta=1 ~ DDPM."""
    alphas_cumprod = alphas_cumprod.double().tolist()  # one host copy, not a sync per step
    for t, t_next in _progress(spaced_timesteps(len(alphas_cumprod), steps), progress, "ddim"):
        x_start, eps = predict(x, _batch_t(x, t))
        a, a_next = _alpha_bar(alphas_cumprod, t), _alpha_bar(alphas_cumprod, t_next)
        var = eta**2 * (1 - a_next) / (1 - a) * (1 - a / a_next)
        x = math.sqrt(a_next) * x_start + math.sqrt(max(1 - a_next - var, 0.0)) * eps
        if var > 0:
            x = x + math.sqrt(var) * randn_like(x, generator)
    return x


def _log_snr_half(a):
    # λ = log(α/σ) with α = √ᾱ, σ = √(1 − ᾱ); −inf at zero terminal SNR, +inf for clean data
    if a <= 0:
        return -math.inf
    if a >= 1:
        return math.inf
    return 0.5 * (math.log(a) - math.log1p(-a))


def dpmpp_2m_loop(predict, alphas_cumprod, x, *, steps, progress=True):
    """DPM-Solver++(2M) (Lu et al. 2022), data-prediction form, first order on the first and last step."""
    pairs = logsnr_timesteps(alphas_cumprod, steps)
    alphas_cumprod = alphas_cumprod.double().tolist()
    x_start_prev, h_prev = None, None
    for t, t_next in _progress(pairs, progress, "dpm++"):
        x_start, _ = predict(x, _batch_t(x, t))
        if t_next < 0:  # the last step lands on clean data: x0 itself
            return x_start
        a, a_next = _alpha_bar(alphas_cumprod, t), _alpha_bar(alphas_cumprod, t_next)
        h = _log_snr_half(a_next) - _log_snr_half(a)
        if x_start_prev is None:
            d = x_start
        else:
            half_inv_r = 0.5 * h / h_prev  # 1/(2r) with r = h_prev / h; 0 after an infinite first step
            d = (1 + half_inv_r) * x_start - half_inv_r * x_start_prev
        sigma_ratio = math.sqrt((1 - a_next) / (1 - a))
        x = sigma_ratio * x - math.sqrt(a_next) * math.expm1(-h) * d
        x_start_prev, h_prev = x_start, h
    return x


def run_sampler(name, predict, schedule, x, *, steps=None, eta=0.0, generator=None, progress=True):
    """Dispatch to the sampler called `name`; `x` is x_T, the result x_0."""
    num_timesteps = len(schedule.alphas_cumprod)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")
    if name == "ddpm":
        if steps not in (None, num_timesteps):
            raise ValueError(
                f"the ddpm sampler runs all {num_timesteps} timesteps, got steps={steps}; "
                "use sampler='ddim' or 'dpmpp' for fewer steps")
        return ddpm_loop(predict, schedule, x, generator=generator, progress=progress)
    if name == "ddim":
        steps = num_timesteps if steps is None else steps
        return ddim_loop(predict, schedule.alphas_cumprod, x, steps=steps, eta=eta,
                         generator=generator, progress=progress)
    steps = min(20, num_timesteps) if steps is None else steps
    return dpmpp_2m_loop(predict, schedule.alphas_cumprod, x, steps=steps, progress=progress)
