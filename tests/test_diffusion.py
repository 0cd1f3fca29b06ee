"""GaussianDiffusion, schedules, samplers and guidance, checked against closed forms (vdm.diffusion)."""

import ast
import math
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vdm.diffusion import BETA_SCHEDULES, LOSS_TYPES, OBJECTIVES, SAMPLERS, GaussianDiffusion
from vdm.diffusion.guidance import combine_guidance, guided_output
from vdm.diffusion.schedule import make_betas, rescale_zero_terminal_snr

torch.set_num_threads(2)


# ---------------------------------------------------------------- denoisers used as test doubles

class GaussianOracle:
    """Bayes-optimal denoiser for data x0 ~ N(mu, s²) i.i.d. per element, in the diffusion's objective."""

    def __init__(self, mu, s):
        self.mu, self.s, self.diffusion = mu, s, None

    def __call__(self, x, t, **kwargs):
        a = self.diffusion.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1, 1)
        xd, mu, var = x.double(), self.mu, self.s ** 2
        # x_t ~ N(√a·mu, a·s² + 1 − a); E[eps | x_t] and E[x0 | x_t] by Gaussian conditioning
        eps = (1 - a).sqrt() * (xd - a.sqrt() * mu) / (a * var + 1 - a)
        x0 = mu + a.sqrt() * var * (xd - a.sqrt() * mu) / (a * var + 1 - a)
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.diffusion.objective]
        return out.to(x.dtype)


class SharedFrameOracle:
    """Optimal eps for videos whose frames are all equal to z ~ N(0, s²) per pixel (differentiable in x)."""

    def __init__(self, s):
        self.s, self.diffusion = s, None

    def __call__(self, x, t, **kwargs):
        a = self.diffusion.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1, 1)
        xd, frames = x.double(), x.shape[2]
        precision = 1 / self.s ** 2 + frames * a / (1 - a)
        z = a.sqrt() * xd.sum(2, keepdim=True) / (1 - a) / precision
        return ((xd - a.sqrt() * z) / (1 - a).sqrt()).to(x.dtype)


def make_diffusion(denoiser, **kwargs):
    """A diffusion over (1, 4, 8, 8) videos in [−1, 1]; oracles get the diffusion back to read ᾱ."""
    kwargs = {"image_size": 8, "num_frames": 4, "channels": 1, "timesteps": 250, "auto_normalize": False,
              **kwargs}
    diffusion = GaussianDiffusion(denoiser, **kwargs)
    if hasattr(denoiser, "diffusion"):
        denoiser.diffusion = diffusion
    return diffusion


class TinyDenoiser(nn.Module):
    """Two 3-D convs with a learned time embedding and an optional pooled text condition."""

    def __init__(self, channels=3, dim=16, timesteps=1000, cond_dim=None):
        super().__init__()
        self.time = nn.Embedding(timesteps, dim)
        self.inp = nn.Conv3d(channels, dim, 3, padding=1)
        self.out = nn.Conv3d(dim, channels, 3, padding=1)
        self.cond_proj = nn.Linear(cond_dim, dim) if cond_dim else None
        self.null_cond = nn.Parameter(torch.randn(dim)) if cond_dim else None
        self.calls = []

    def forward(self, x, t, cond=None, cond_mask=None, null_cond_prob=0.0, **kwargs):
        self.calls.append({"batch": x.shape[0], "null_cond_prob": null_cond_prob, **kwargs})
        h = self.inp(x) + self.time(t)[:, :, None, None, None]
        if self.cond_proj is not None and cond is not None:
            c = self.cond_proj(cond.mean(1))
            drop = torch.rand(x.shape[0], device=x.device) < null_cond_prob  # per sample, as Unet3D
            h = h + torch.where(drop[:, None], self.null_cond, c)[:, :, None, None, None]
        return self.out(F.silu(h))


class BatchedCFGDenoiser(TinyDenoiser):
    """TinyDenoiser with a one-pass `forward_with_cond_scale`, the way Unet3D exposes it."""

    def forward_with_cond_scale(self, x, t, cond=None, cond_mask=None, cond_scale=1.0, rescaled_phi=0.0):
        self.calls.append({"batch": 2 * x.shape[0], "batched": True})
        h = self.inp(torch.cat([x, x])) + self.time(torch.cat([t, t]))[:, :, None, None, None]
        c = torch.cat([self.cond_proj(cond.mean(1)), self.null_cond.expand(x.shape[0], -1)])
        out = self.out(F.silu(h + c[:, :, None, None, None]))
        return combine_guidance(*out.chunk(2), cond_scale, rescaled_phi)


def reference_alphas_cumprod(timesteps, s=0.008):
    """The cosine schedule's ᾱ_t written out independently, float64, with the 0.999 beta cap."""
    f = [math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2 for t in range(timesteps + 1)]
    out, prod = [], 1.0
    for t in range(1, timesteps + 1):
        prod *= 1 - min(1 - f[t] / f[t - 1], 0.999)
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------- forward process

def test_q_sample_has_closed_form_mean_and_variance():
    diffusion = make_diffusion(lambda x, t, **kw: x, timesteps=1000)
    ab = reference_alphas_cumprod(1000)
    torch.manual_seed(0)
    x_start = torch.linspace(-1, 1, 8 * 8).reshape(1, 1, 1, 8, 8).expand(4000, 1, 4, 8, 8)  # 16k draws/pixel
    for t in (0, 100, 500, 900, 999):
        x_t = diffusion.q_sample(x_start, torch.full((4000,), t)).double()
        mean, var = x_t.mean(dim=(0, 2)), x_t.var(dim=(0, 2))
        expected_mean = ab[t].sqrt() * x_start[0, 0, 0].double()
        assert torch.allclose(diffusion.alphas_cumprod[t].double(), ab[t], rtol=1e-5)
        # 16k samples: standard errors √((1−ᾱ)/16000) for the mean, ~1.1% of the variance
        assert (mean - expected_mean).abs().max() < 5 * math.sqrt((1 - ab[t]) / 16000) + 1e-4
        assert (var / (1 - ab[t]) - 1).abs().max() < 0.06


def test_posterior_matches_gaussian_conditioning():
    diffusion = make_diffusion(lambda x, t, **kw: x, timesteps=1000, beta_schedule="linear")
    betas = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64)
    ab = torch.cumprod(1 - betas, 0)
    torch.manual_seed(0)
    x_start, x_t = torch.randn(5, 1, 4, 8, 8), torch.randn(5, 1, 4, 8, 8)
    t = torch.tensor([1, 10, 300, 700, 999])
    mean, var = diffusion.q_posterior(x_start, x_t, t)
    for i, ti in enumerate(t.tolist()):
        # x_{t-1} = √ᾱ_{t-1}·x0 + √(1−ᾱ_{t-1})·ε₁ and x_t = √α_t·x_{t-1} + √β_t·ε₂: condition on x_t
        ab_prev, alpha = ab[ti - 1], 1 - betas[ti]
        cov = alpha.sqrt() * (1 - ab_prev)
        ref_mean = ab_prev.sqrt() * x_start[i].double() + cov / (1 - ab[ti]) * (
            x_t[i].double() - ab[ti].sqrt() * x_start[i].double())
        ref_var = (1 - ab_prev) - cov ** 2 / (1 - ab[ti])
        assert torch.allclose(mean[i].double(), ref_mean, rtol=1e-4, atol=1e-5)
        assert torch.allclose(var[i].double().flatten()[0], ref_var, rtol=1e-4)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_each_objective_recovers_x_start(objective):
    torch.manual_seed(0)
    x_start, noise = torch.rand(8, 1, 4, 8, 8) * 2 - 1, torch.randn(8, 1, 4, 8, 8)
    t = torch.tensor([0, 1, 50, 100, 125, 200, 240, 249])
    ab = make_diffusion(None).alphas_cumprod.double()[t].reshape(-1, 1, 1, 1, 1)
    target = {"eps": noise.double(), "x0": x_start.double(),
              "v": ab.sqrt() * noise - (1 - ab).sqrt() * x_start}[objective]
    oracle = lambda x, tt, **kw: target.float()  # noqa: E731  (knows x0 and the noise)
    diffusion = make_diffusion(oracle, objective=objective, loss_type="l2")
    x_t = diffusion.q_sample(x_start, t, noise)
    x0_hat, eps_hat = diffusion.output_to_start_and_noise(x_t, t, oracle(x_t, t))
    assert torch.allclose(x0_hat, x_start, atol=2e-3)
    assert torch.allclose(eps_hat, noise, atol=2e-3)
    assert diffusion.p_losses(x_start, t, noise) < 1e-10  # the training target is the same quantity


# ---------------------------------------------------------------- samplers against a known distribution

MU, S = 0.3, 0.2


def gaussian_samples(sampler, steps=None, eta=0.0, seed=0, **kwargs):
    diffusion = make_diffusion(GaussianOracle(MU, S), **kwargs)
    x_T = torch.randn(64, 1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))  # 16k elements
    return diffusion.sample(x_T=x_T, sampler=sampler, steps=steps, eta=eta, clip_denoised=False,
                            progress=False, generator=torch.Generator().manual_seed(seed + 1))


def moment_error(x):
    return abs(x.mean().item() - MU) + abs(x.std().item() - S)


@pytest.mark.parametrize("sampler, steps, tol", [
    # measured errors (|Δmean| + |Δstd|, 16k samples, T = 250) in the comments
    ("ddpm", None, 0.015),  # 0.007
    ("ddim", 250, 0.008),   # 0.0035
    ("ddim", 50, 0.02),     # 0.013
    ("dpmpp", 20, 0.008),   # 0.0038
    ("dpmpp", 10, 0.012),   # 0.0057
])
def test_samplers_reproduce_gaussian_data(sampler, steps, tol):
    x = gaussian_samples(sampler, steps)
    assert x.isfinite().all()
    assert moment_error(x) < tol, (x.mean().item(), x.std().item())


def test_ddim_eta_zero_is_deterministic_and_eta_one_is_not():
    a, b = gaussian_samples("ddim", 20, seed=0), gaussian_samples("ddim", 20, seed=0)
    assert torch.equal(a, b)
    diffusion = make_diffusion(GaussianOracle(MU, S))
    x_T = torch.randn(2, 1, 4, 8, 8)
    runs = [diffusion.sample(x_T=x_T, sampler="ddim", steps=20, eta=eta, progress=False,
                             generator=torch.Generator().manual_seed(seed))
            for eta, seed in [(0.0, 1), (0.0, 2), (1.0, 1), (1.0, 2)]]
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[2], runs[3])


def test_ddim_with_eta_one_over_all_steps_is_ddpm():
    ddpm, ddim = gaussian_samples("ddpm"), gaussian_samples("ddim", 250, eta=1.0)
    assert torch.allclose(ddpm, ddim, atol=1e-4)


def test_dpmpp_20_is_at_least_as_close_as_ddim_20():
    for schedule in BETA_SCHEDULES:
        ddim = moment_error(gaussian_samples("ddim", 20, beta_schedule=schedule, timesteps=1000))
        dpmpp = moment_error(gaussian_samples("dpmpp", 20, beta_schedule=schedule, timesteps=1000))
        assert dpmpp <= ddim, (schedule, dpmpp, ddim)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_generator_seed_gives_identical_samples(sampler):
    model = TinyDenoiser(channels=1, timesteps=50)
    diffusion = make_diffusion(model, timesteps=50)
    kwargs = {"batch_size": 2, "sampler": sampler, "steps": 50 if sampler == "ddpm" else 10,
              "eta": 1.0, "progress": False}
    a = diffusion.sample(generator=torch.Generator().manual_seed(7), **kwargs)
    b = diffusion.sample(generator=torch.Generator().manual_seed(7), **kwargs)
    c = diffusion.sample(generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- schedules

@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_schedules_are_monotone_and_zero_terminal_snr_reaches_zero(schedule):
    betas = make_betas(schedule, 1000)
    ab = torch.cumprod(1 - betas, 0)
    assert betas.dtype == torch.float64 and ((betas > 0) & (betas < 1)).all()
    assert (ab[1:] < ab[:-1]).all() and ab[0] <= 1 and ab[-1] > 0
    zt = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    assert zt[-1] == 0 and (zt[1:] < zt[:-1]).all() and torch.isclose(zt[0], ab[0])
    diffusion = make_diffusion(GaussianOracle(MU, S), beta_schedule=schedule, zero_terminal_snr=True)
    assert diffusion.alphas_cumprod[-1] == 0 and diffusion.alphas_cumprod.dtype == torch.float32
    for objective in ("v", "eps"):  # eps is ill-posed at SNR 0 but must stay finite
        diffusion.objective = objective
        for sampler, steps in (("ddim", 10), ("dpmpp", 10)):
            x = diffusion.sample(batch_size=2, sampler=sampler, steps=steps, progress=False)
            assert x.isfinite().all(), (objective, sampler)


def test_linear_schedule_uses_beta_start_and_end():
    betas = make_betas("linear", 100, beta_start=1e-3, beta_end=5e-2)
    assert betas[0].item() == pytest.approx(1e-3) and betas[-1].item() == pytest.approx(5e-2)


# ---------------------------------------------------------------- errors a user can act on

@pytest.mark.parametrize("kwarg, allowed", [
    ("beta_schedule", BETA_SCHEDULES), ("objective", OBJECTIVES), ("loss_type", LOSS_TYPES)])
def test_unknown_names_list_allowed_values(kwarg, allowed):
    with pytest.raises(ValueError, match=kwarg) as info:
        make_diffusion(TinyDenoiser(), **{kwarg: "nope"})
    assert "'nope'" in str(info.value) and all(name in str(info.value) for name in allowed)


def test_bad_sampler_steps_and_shapes_raise_value_error():
    diffusion = make_diffusion(TinyDenoiser(channels=1, timesteps=250))
    with pytest.raises(ValueError, match="sampler 'euler'.*ddpm, ddim, dpmpp"):
        diffusion.sample(batch_size=1, sampler="euler")
    with pytest.raises(ValueError, match="ddpm sampler runs all 250"):
        diffusion.sample(batch_size=1, sampler="ddpm", steps=50)
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 250\]"):
        diffusion.sample(batch_size=1, sampler="ddim", steps=0)
    with pytest.raises(ValueError, match=r"channels=1, num_frames=4, height=8, width=8\), got \(2, 1, 5, 8, 8\)"):
        diffusion(torch.rand(2, 1, 5, 8, 8))
    with pytest.raises(ValueError, match="got \\(1, 4, 8, 8\\)"):
        diffusion(torch.rand(1, 4, 8, 8))
    with pytest.raises(TypeError, match="encode the prompts"):
        diffusion(torch.rand(2, 1, 4, 8, 8), cond=["a cat"])


# ---------------------------------------------------------------- training loss

@pytest.mark.parametrize("objective, loss_type, extra", [
    ("eps", "l1", {}),
    ("v", "l2", {"min_snr_gamma": 5.0, "offset_noise": 0.1}),
    ("x0", "huber", {"min_snr_gamma": 5.0}),
])
def test_loss_is_finite_and_falls_when_training(objective, loss_type, extra):
    torch.manual_seed(0)
    model = TinyDenoiser(channels=3, timesteps=100)
    diffusion = GaussianDiffusion(model, image_size=8, num_frames=4, timesteps=100, objective=objective,
                                  loss_type=loss_type, **extra)
    clip = torch.rand(1, 3, 4, 8, 8).expand(8, -1, -1, -1, -1)
    # a fixed evaluation set of timesteps and noise, so before/after are comparable
    t_eval, noise_eval = torch.arange(0, 100, 4), torch.randn(25, 3, 4, 8, 8)
    x_eval = diffusion.normalize(clip[:1].expand(25, -1, -1, -1, -1))

    def eval_loss():
        with torch.no_grad():
            return diffusion.p_losses(x_eval, t_eval, noise_eval).item()

    before = eval_loss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = diffusion(clip)
        assert loss.isfinite() and loss.ndim == 0
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.85 * before  # measured: 0.66 (eps), 0.70 (v), 0.37 (x0) of before


def test_loss_is_fp32_under_bf16_autocast_and_buffers_stay_fp32():
    model = TinyDenoiser(channels=3, timesteps=100)
    diffusion = GaussianDiffusion(model, image_size=8, num_frames=4, timesteps=100)
    ab = diffusion.alphas_cumprod.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = diffusion(torch.rand(2, 3, 4, 8, 8))
    assert loss.dtype == torch.float32 and loss.isfinite()
    diffusion.to(torch.bfloat16)  # what a bf16 engine does to the whole module
    assert next(model.parameters()).dtype == torch.bfloat16
    assert diffusion.alphas_cumprod.dtype == torch.float32 and torch.equal(diffusion.alphas_cumprod, ab)
    assert "alphas_cumprod" not in diffusion.state_dict()  # the schedule comes from the config
    loss = diffusion(torch.rand(2, 3, 4, 8, 8).bfloat16())
    assert loss.dtype == torch.float32 and loss.isfinite()
    x = diffusion.sample(batch_size=1, sampler="ddim", steps=3, progress=False)
    assert x.dtype == torch.float32 and x.isfinite().all()


def test_training_passes_cond_drop_prob_and_denoiser_kwargs():
    model = TinyDenoiser(channels=1, timesteps=250, cond_dim=6)
    diffusion = make_diffusion(model, cond_drop_prob=0.25)
    cond = torch.randn(2, 3, 6)
    diffusion(torch.rand(2, 1, 4, 8, 8), cond=cond)
    diffusion(torch.rand(2, 1, 4, 8, 8), cond=cond, null_cond_prob=0.5, prob_focus_present=0.3)
    assert model.calls[0]["null_cond_prob"] == 0.25
    assert model.calls[1]["null_cond_prob"] == 0.5 and model.calls[1]["prob_focus_present"] == 0.3


def test_auto_normalize_maps_data_range():
    diffusion = GaussianDiffusion(GaussianOracle(0.0, 0.5), image_size=8, num_frames=4, channels=1,
                                  timesteps=50)
    diffusion.denoise_fn.diffusion = diffusion
    x = diffusion.sample(batch_size=2, sampler="ddim", steps=10, progress=False)
    assert x.min() >= 0 and x.max() <= 1 and x.mean().item() == pytest.approx(0.5, abs=0.1)
    assert torch.equal(diffusion.normalize(torch.ones(1)), torch.ones(1))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_min_snr_gamma_weights_follow_closed_form(objective):
    gamma, ab = 5.0, reference_alphas_cumprod(250)
    # an output off by exactly 1 everywhere: the l2 loss at a single t is the weight itself
    diffusion = make_diffusion(None, objective=objective, loss_type="l2", min_snr_gamma=gamma, timesteps=250)
    for t in (0, 20, 100, 249):
        x_start, noise = torch.rand(1, 1, 4, 8, 8), torch.randn(1, 1, 4, 8, 8)
        target = diffusion.objective_target(x_start, torch.tensor([t]), noise)
        diffusion.denoise_fn = lambda x, tt, target=target, **kw: target + 1
        snr = (ab[t] / (1 - ab[t])).item()
        weight = {"eps": min(snr, gamma) / snr, "x0": min(snr, gamma), "v": min(snr, gamma) / (snr + 1)}
        loss = diffusion.p_losses(x_start, torch.tensor([t]), noise)
        assert loss.item() == pytest.approx(weight[objective], rel=1e-3), t


def test_offset_noise_adds_a_shared_offset_per_video_and_channel():
    torch.manual_seed(0)
    seen = []
    diffusion = make_diffusion(lambda x, t, **kw: seen.append(x) or x, offset_noise=0.5, objective="x0",
                               timesteps=250)
    x_start = torch.zeros(2000, 1, 4, 8, 8)
    diffusion.p_losses(x_start, torch.full((2000,), 249))  # ᾱ ≈ 0: the input is the noise itself
    per_video_mean = seen[0].mean(dim=(2, 3, 4)).flatten()
    # variance of the mean of 256 elements: 1/256 without offset, 0.25 + 1/256 with it
    assert per_video_mean.var().item() == pytest.approx(0.25 + 1 / 256, rel=0.15)


def test_dynamic_thresholding_rescales_by_the_percentile():
    diffusion = make_diffusion(None, use_dynamic_thres=True, dynamic_thres_percentile=0.9)
    x_start = torch.linspace(-3, 3, 256).reshape(1, 1, 4, 8, 8)
    x_start = torch.cat([x_start, x_start / 10])  # the second sample is already inside [-1, 1]
    out = diffusion.threshold(x_start)
    s = x_start[0].abs().flatten().sort().values.quantile(0.9)
    assert torch.allclose(out[0], x_start[0].clamp(-s, s) / s) and out[0].abs().max() == 1
    assert torch.equal(out[1], x_start[1])  # s is clamped to at least 1: nothing to do
    plain = make_diffusion(None).threshold(x_start)
    assert torch.equal(plain, x_start.clamp(-1, 1))


def test_text_use_bert_cls_conditions_on_the_first_token():
    seen = {}

    def denoiser(x, t, cond=None, cond_mask=None, **kwargs):
        seen.update(cond=cond, cond_mask=cond_mask)
        return x

    diffusion = make_diffusion(denoiser, text_use_bert_cls=True)
    cond, mask = torch.randn(2, 5, 6), torch.ones(2, 5, dtype=torch.bool)
    diffusion(torch.rand(2, 1, 4, 8, 8), cond=cond, cond_mask=mask)
    assert torch.equal(seen["cond"], cond[:, :1]) and seen["cond_mask"].shape == (2, 1)


# ---------------------------------------------------------------- guidance

def test_cfg_two_pass_matches_formula_and_batched_path_agrees():
    torch.manual_seed(0)
    model = BatchedCFGDenoiser(channels=1, timesteps=250, cond_dim=6)
    x, t, cond = torch.randn(3, 1, 4, 8, 8), torch.tensor([5, 100, 200]), torch.randn(3, 2, 6)
    with torch.no_grad():
        cond_out = model(x, t, cond=cond, null_cond_prob=0.0)
        null_out = model(x, t, cond=cond, null_cond_prob=1.0)
        two_pass = guided_output(model, x, t, cond=cond, cond_scale=3.0, batched=False)
        model.calls.clear()
        batched = guided_output(model, x, t, cond=cond, cond_scale=3.0, guidance_rescale=0.7)
        assert model.calls == [{"batch": 6, "batched": True}]
        two_pass_rescaled = guided_output(model, x, t, cond=cond, cond_scale=3.0, guidance_rescale=0.7,
                                          batched=False)
    assert torch.allclose(two_pass, null_out + 3.0 * (cond_out - null_out), atol=1e-5)
    assert torch.allclose(batched, two_pass_rescaled, atol=1e-5)
    assert not torch.allclose(cond_out, null_out)


def test_guidance_rescale_restores_conditional_std():
    torch.manual_seed(0)
    cond_out, null_out = torch.randn(2, 1, 4, 8, 8), torch.randn(2, 1, 4, 8, 8)
    guided = combine_guidance(cond_out, null_out, 7.0, guidance_rescale=1.0)
    assert torch.allclose(guided.std(dim=(1, 2, 3, 4)), cond_out.std(dim=(1, 2, 3, 4)), rtol=1e-5)
    assert torch.allclose(combine_guidance(cond_out, null_out, 1.0), cond_out, atol=1e-6)


def test_conditional_and_unconditional_sampling_with_cfg(capsys):
    model = TinyDenoiser(channels=1, timesteps=250, cond_dim=6)
    diffusion = make_diffusion(model)
    cond = torch.randn(3, 2, 6)
    model.calls.clear()
    x = diffusion.sample(cond=cond, cond_scale=2.0, batch_size=16, sampler="dpmpp", steps=5, progress=False)
    assert x.shape == (3, 1, 4, 8, 8) and len(model.calls) == 10  # no batched method: cond + null per step
    assert "ddim" not in capsys.readouterr().err
    x = diffusion.sample(batch_size=2, sampler="ddim", steps=5, progress=True)  # no cond: unconditional
    assert x.shape == (2, 1, 4, 8, 8) and "ddim" in capsys.readouterr().err  # the tqdm bar


# ---------------------------------------------------------------- given frames, interpolation

@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("dpmpp", 20)])
def test_reconstruction_guidance_extends_a_clip(sampler, steps):
    diffusion = make_diffusion(SharedFrameOracle(0.4))
    z = 0.4 * torch.randn(32, 1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    clip = z.expand(-1, -1, 2, -1, -1)  # 2 given frames; the data model says the next 2 equal them

    def error(weight):
        out = diffusion.extend(clip, sampler=sampler, steps=steps, recon_weight=weight, progress=False,
                               generator=torch.Generator().manual_seed(1))
        assert out.shape == (32, 1, 4, 8, 8) and torch.equal(out[:, :, :2], clip)  # kept fixed
        return (out[:, :, 2:] - z).abs().mean().item()

    guided, unguided = error(2.0), error(0.0)
    assert guided < 0.03 and guided < unguided / 2, (guided, unguided)


def test_known_mask_validation():
    diffusion = make_diffusion(SharedFrameOracle(0.4))
    with pytest.raises(ValueError, match="known_mask must have shape"):
        diffusion.sample(batch_size=1, known_frames=torch.zeros(1, 1, 4, 8, 8), known_mask=torch.ones(3))
    with pytest.raises(ValueError, match="together"):
        diffusion.sample(batch_size=1, known_frames=torch.zeros(1, 1, 4, 8, 8))


def test_interpolate_stays_near_endpoints_at_small_t():
    diffusion = make_diffusion(GaussianOracle(0.0, 0.5))
    x1, x2 = torch.full((2, 1, 4, 8, 8), -0.5), torch.full((2, 1, 4, 8, 8), 0.5)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    near_x1 = diffusion.interpolate(x1, x2, t=5, lam=0.0, generator=gen(), progress=False)
    mid = diffusion.interpolate(x1, x2, t=5, lam=0.5, generator=gen(), progress=False)
    assert (near_x1 - x1).abs().mean() < 0.05 and mid.abs().mean() < 0.05
    full = diffusion.interpolate(x1, x2, lam=0.3, generator=gen(), progress=False)
    assert full.shape == x1.shape and full.isfinite().all()


# ---------------------------------------------------------------- boundary

def test_diffusion_package_imports_only_torch_einops_and_stdlib():
    allowed = {"torch", "einops", "vdm", "tqdm"}  # tqdm only lazily, inside the progress helper
    import sys
    for path in pathlib.Path(__file__).parents[1].joinpath("vdm", "diffusion").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                root = name.split(".")[0]
                assert root in allowed or root in sys.stdlib_module_names, (path.name, name)
                if root == "vdm":
                    assert name.startswith("vdm.diffusion"), (path.name, name)
                if root == "tqdm":
                    assert node.col_offset > 0, f"{path.name}: import tqdm lazily"
        assert ".cuda(" not in path.read_text(), path.name


# ---------------------------------------------------------------- with the real denoiser

def tiny_unet(**kwargs):
    from vdm.model.unet3d import Unet3D

    torch.manual_seed(0)
    return Unet3D(dim=8, dim_mults=(1, 2), channels=3, attn_heads=2, attn_dim_head=8, **kwargs)


def test_unet3d_loss_is_finite_and_falls_on_a_fixed_clip():
    model = tiny_unet(cond_dim=16)
    diffusion = GaussianDiffusion(model, image_size=16, num_frames=4, timesteps=100, cond_drop_prob=0.1)
    clip, cond = torch.rand(2, 3, 4, 16, 16), torch.randn(2, 3, 16)
    assert diffusion(clip, cond=cond, prob_focus_present=0.5).isfinite()
    # a fixed (t, noise) so that a dozen steps of a real U-Net show a falling loss
    t, noise = torch.tensor([10, 60]), torch.randn(2, 3, 4, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = diffusion.p_losses(diffusion.normalize(clip), t, noise, cond=cond)
        assert loss.isfinite()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.9 * losses[0], losses  # measured 0.81


def test_unet3d_batched_cfg_matches_two_passes_and_samples():
    model = tiny_unet(cond_dim=16).eval()
    diffusion = GaussianDiffusion(model, image_size=16, num_frames=4, timesteps=100)
    x, t, cond = torch.randn(2, 3, 4, 16, 16), torch.tensor([3, 90]), torch.randn(2, 3, 16)
    with torch.no_grad():
        batched = guided_output(model, x, t, cond=cond, cond_scale=4.0, guidance_rescale=0.5)
        two_pass = guided_output(model, x, t, cond=cond, cond_scale=4.0, guidance_rescale=0.5, batched=False)
        null = model(x, t, cond=cond, null_cond_prob=1.0)
    assert torch.allclose(batched, two_pass, atol=1e-4) and not torch.allclose(batched, null, atol=1e-3)
    videos = diffusion.sample(cond=cond, cond_scale=4.0, sampler="dpmpp", steps=3, progress=False)
    assert videos.shape == (2, 3, 4, 16, 16) and videos.min() >= 0 and videos.max() <= 1
    clip = torch.rand(2, 3, 2, 16, 16)  # reconstruction guidance differentiates through the U-Net
    extended = diffusion.extend(clip, cond=cond, cond_scale=2.0, sampler="ddim", steps=2, progress=False)
    assert extended.isfinite().all() and torch.equal(extended[:, :, :2], clip)
