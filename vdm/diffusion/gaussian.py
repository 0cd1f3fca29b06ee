"""GaussianDiffusion: forward process, training loss and sampling around a video denoiser.

Follows Ho et al. 2022 (Video Diffusion Models) and the reference implementation
lucidrains/video-diffusion-pytorch; the denoiser is any module called as
`denoise_fn(x, t, cond=None, cond_mask=None, null_cond_prob=0., **kwargs)` on (b, c, f, h, w) tensors.
"""

import torch
import torch.nn.functional as F
from torch import nn

from vdm.diffusion.guidance import guided_output
from vdm.diffusion.samplers import SAMPLERS, ddpm_loop, randn_like, run_sampler
from vdm.diffusion.schedule import make_betas, rescale_zero_terminal_snr, schedule_buffers

OBJECTIVES = ("eps", "x0", "v")
LOSS_TYPES = ("l1", "l2", "huber")


def _check_choice(kind, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; allowed: {', '.join(allowed)}")


def _extract(buf, t, x):
    # buf[t] for a (b,) tensor of timesteps, shaped to broadcast over x (b, c, f, h, w)
    return buf[t].to(x.dtype).reshape(-1, *(1,) * (x.ndim - 1))


def _check_cond(cond):
    if isinstance(cond, (list, tuple)):
        raise TypeError("cond must be a tensor of text embeddings (b, L, d); encode the prompts with "
                        "vdm.text first: GaussianDiffusion does not tokenize")


class GaussianDiffusion(nn.Module):
    """Gaussian diffusion over videos (b, c, f, h, w); the call returns the training loss, `sample` draws videos.

    The reference's arguments keep their meaning. Added: `beta_schedule` (linear uses beta_start/end
    as given), `zero_terminal_snr` (Lin et al.; pair it with objective='v'), `objective` (what the
    denoiser predicts: eps, x0 or v), `min_snr_gamma` (Hang et al. loss weights), `offset_noise`,
    `cond_drop_prob` (passed to the denoiser as null_cond_prob in training), `auto_normalize` (data in
    [0, 1] in and out, else [−1, 1]). `text_use_bert_cls` conditions on the first token of `cond` only.
    """

    def __init__(self, denoise_fn, *, image_size, num_frames, text_use_bert_cls=False, channels=3,
                 timesteps=1000, loss_type="l1", use_dynamic_thres=False, dynamic_thres_percentile=0.9,
                 beta_schedule="cosine", beta_start=1e-4, beta_end=2e-2, zero_terminal_snr=False,
                 objective="eps", min_snr_gamma=None, offset_noise=0.0, cond_drop_prob=0.0,
                 auto_normalize=True):
        super().__init__()
        _check_choice("loss_type", loss_type, LOSS_TYPES)
        _check_choice("objective", objective, OBJECTIVES)
        if not 0 < dynamic_thres_percentile <= 1:
            raise ValueError(f"dynamic_thres_percentile must be in (0, 1], got {dynamic_thres_percentile}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive or None, got {min_snr_gamma}")
        if not 0 <= cond_drop_prob <= 1:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        if offset_noise < 0:
            raise ValueError(f"offset_noise must be >= 0, got {offset_noise}")
        self.denoise_fn = denoise_fn
        self.image_size, self.num_frames, self.channels = image_size, num_frames, channels
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.video_shape = (channels, num_frames, *size)  # one video, without the batch dim
        self.text_use_bert_cls = text_use_bert_cls
        self.loss_type, self.objective = loss_type, objective
        self.use_dynamic_thres, self.dynamic_thres_percentile = use_dynamic_thres, dynamic_thres_percentile
        self.min_snr_gamma, self.offset_noise = min_snr_gamma, offset_noise
        self.cond_drop_prob, self.auto_normalize = cond_drop_prob, auto_normalize

        betas = make_betas(beta_schedule, timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        self.num_timesteps = timesteps
        # float64 masters: the float32 buffers are rebuilt from them whenever a cast (e.g. .bfloat16()
        # by a mixed-precision engine) would change their dtype. Not persistent: the schedule comes from
        # the config, so state_dict() holds the denoiser's weights only.
        self._schedule64 = schedule_buffers(betas)
        for name, value in self._schedule64.items():
            self.register_buffer(name, value.float(), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for name, value in self._schedule64.items():
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, value.to(device=buf.device, dtype=torch.float32))
        return self

    # data range
    def normalize(self, videos):
        return videos * 2 - 1 if self.auto_normalize else videos

    def unnormalize(self, x):
        return (x + 1) * 0.5 if self.auto_normalize else x

    def _check_videos(self, videos, what="videos"):
        if videos.ndim != 5 or tuple(videos.shape[1:]) != self.video_shape:
            c, f, h, w = self.video_shape
            raise ValueError(
                f"{what} must have shape (batch, channels={c}, num_frames={f}, height={h}, width={w}), "
                f"got {tuple(videos.shape)}")

    # forward process and parameterisations
    def q_sample(self, x_start, t, noise=None):
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (_extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior(self, x_start, x_t, t):
        """Mean and variance of q(x_{t−1} | x_t, x0)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, _extract(self.posterior_variance, t, x_t)

    def predict_start_from_noise(self, x_t, t, noise):
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * noise)

    def predict_noise_from_start(self, x_t, t, x_start):
        return ((x_t - _extract(self.sqrt_alphas_cumprod, t, x_t) * x_start)
                / _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t))

    def predict_v(self, x_start, t, noise):
        """v = √ᾱ·noise − √(1−ᾱ)·x0 (Salimans & Ho 2022)."""
        return (_extract(self.sqrt_alphas_cumprod, t, x_start) * noise
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start)

    def objective_target(self, x_start, t, noise):
        """What the denoiser is trained to output under `self.objective`."""
        if self.objective == "eps":
            return noise
        if self.objective == "x0":
            return x_start
        return self.predict_v(x_start, t, noise)

    def output_to_start_and_noise(self, x_t, t, out):
        """(x0, eps) implied by a denoiser output under `self.objective`."""
        if self.objective == "eps":
            return self.predict_start_from_noise(x_t, t, out), out
        if self.objective == "x0":
            return out, self.predict_noise_from_start(x_t, t, out)
        sqrt_ab = _extract(self.sqrt_alphas_cumprod, t, x_t)
        sqrt_1m_ab = _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return sqrt_ab * x_t - sqrt_1m_ab * out, sqrt_1m_ab * x_t + sqrt_ab * out

    def threshold(self, x_start):
        """Dynamic thresholding (Saharia et al. 2022) when enabled, else a clamp to [−1, 1]."""
        if not self.use_dynamic_thres:
            return x_start.clamp(-1, 1)
        s = torch.quantile(x_start.flatten(1).abs(), self.dynamic_thres_percentile, dim=1)
        s = s.clamp(min=1).reshape(-1, *(1,) * (x_start.ndim - 1))
        return x_start.clamp(-s, s) / s

    # training
    def _training_noise(self, x_start):
        noise = torch.randn_like(x_start)
        if self.offset_noise > 0:  # one offset per video and channel, shared by all frames and pixels
            noise = noise + self.offset_noise * torch.randn_like(x_start[:, :, :1, :1, :1])
        return noise

    def _min_snr_weight(self, t):
        snr, gamma = self.snr[t], self.min_snr_gamma
        if self.objective == "eps":
            return (gamma / snr).clamp(max=1)  # min(snr, γ)/snr, finite at snr = 0
        if self.objective == "x0":
            return snr.clamp(max=gamma)
        return snr.clamp(max=gamma) / (snr + 1)

    def p_losses(self, x_start, t, noise=None, cond=None, cond_mask=None, reduction="mean", **denoiser_kwargs):
        """Loss at given timesteps t (b,) for x_start in [−1, 1], computed in fp32: the batch's mean,
        or with reduction="none" one loss per video (b,)."""
        _check_choice("reduction", reduction, ("mean", "none"))
        in_dtype = x_start.dtype
        x_start = x_start.float()
        noise = self._training_noise(x_start) if noise is None else noise.float()
        x_t = self.q_sample(x_start, t, noise)
        cond, cond_mask = self._cond_tokens(cond, cond_mask)
        denoiser_kwargs.setdefault("null_cond_prob", self.cond_drop_prob)
        out = self.denoise_fn(x_t.to(in_dtype), t, cond=cond, cond_mask=cond_mask, **denoiser_kwargs)
        with torch.autocast(device_type=x_start.device.type, enabled=False):
            out, target = out.float(), self.objective_target(x_start, t, noise)
            if self.loss_type == "l1":
                loss = F.l1_loss(out, target, reduction="none")
            elif self.loss_type == "l2":
                loss = F.mse_loss(out, target, reduction="none")
            else:
                loss = F.huber_loss(out, target, reduction="none", delta=1.0)
            loss = loss.mean(dim=tuple(range(1, loss.ndim)))
            if self.min_snr_gamma is not None:
                loss = loss * self._min_snr_weight(t)
            return loss.mean() if reduction == "mean" else loss

    def forward(self, videos, cond=None, cond_mask=None, **denoiser_kwargs):
        """Training loss for a batch of videos (b, c, f, h, w) at uniformly drawn timesteps."""
        self._check_videos(videos)
        t = torch.randint(0, self.num_timesteps, (videos.shape[0],), device=videos.device)
        return self.p_losses(self.normalize(videos), t, cond=cond, cond_mask=cond_mask, **denoiser_kwargs)

    def _cond_tokens(self, cond, cond_mask):
        _check_cond(cond)
        if cond is not None and self.text_use_bert_cls and cond.ndim == 3:
            # the reference's text_use_bert_cls: condition on the [CLS] embedding only
            cond = cond[:, :1]
            cond_mask = None if cond_mask is None else cond_mask[:, :1]
        return cond, cond_mask

    # sampling
    def _model_dtype(self):
        # the denoiser's own dtype (bf16 after a bf16 engine's cast); the sampler's state stays fp32
        params = self.denoise_fn.parameters() if isinstance(self.denoise_fn, nn.Module) else ()
        return next((p.dtype for p in params if p.is_floating_point()), torch.float32)

    def _predictor(self, *, cond, cond_mask, cond_scale, guidance_rescale, clip_denoised,
                   known=None, known_mask=None, recon_weight=2.0, **denoiser_kwargs):
        """predict(x_t, t) -> (x0, eps): guidance, objective conversion, thresholding, given frames."""
        cond, cond_mask = self._cond_tokens(cond, cond_mask)
        model_dtype = self._model_dtype()

        def start_and_noise(x, t):
            out = guided_output(self.denoise_fn, x.to(model_dtype), t, cond=cond, cond_mask=cond_mask,
                                cond_scale=cond_scale, guidance_rescale=guidance_rescale, **denoiser_kwargs)
            return self.output_to_start_and_noise(x, t, out.float())

        def predict(x, t):
            if known is None:
                x_start, eps = start_and_noise(x, t)
            else:
                x_start = self._reconstruction_guided_start(start_and_noise, x, t, known, known_mask,
                                                            recon_weight)
            if clip_denoised:
                x_start = self.threshold(x_start)
            if known is not None:  # after thresholding, which may rescale the whole sample
                x_start = torch.where(known_mask, known, x_start)
            if clip_denoised or known is not None:  # keep eps consistent with the x0 actually used
                eps = self.predict_noise_from_start(x, t, x_start)
            return x_start, eps

        return predict

    def _reconstruction_guided_start(self, start_and_noise, x, t, known, known_mask, recon_weight):
        """Ho et al. 2022 §3.1: x̃0^b = x̂0^b − (w_r·√ᾱ_t / 2)·∇_{x_t^b} ‖x^a − x̂0^a‖² (a: given, b: generated)."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            x_start, _ = start_and_noise(x, t)
            err = ((known - x_start) ** 2 * known_mask).sum()
            (grad,) = torch.autograd.grad(err, x)
        return x_start.detach() - recon_weight * _extract(self.sqrt_alphas_cumprod, t, x) / 2 * grad

    def _prepare_known(self, known_frames, known_mask, batch_size, device):
        """Given frames in [−1, 1] and a bool mask (b, 1, f, 1, 1), from the user's data range and (f,)/(b, f)."""
        if (known_frames is None) != (known_mask is None):
            raise ValueError("known_frames and known_mask must be given together")
        if known_frames is None:
            return None, None
        self._check_videos(known_frames, "known_frames")
        if known_frames.shape[0] != batch_size:
            raise ValueError(f"known_frames has batch {known_frames.shape[0]}, expected {batch_size}")
        known_mask = torch.as_tensor(known_mask, device=device).bool()
        if known_mask.shape not in ((self.num_frames,), (batch_size, self.num_frames)):
            raise ValueError(f"known_mask must have shape ({self.num_frames},) or ({batch_size}, "
                             f"{self.num_frames}), got {tuple(known_mask.shape)}")
        known_mask = known_mask.reshape(-1, 1, self.num_frames, 1, 1)
        return self.normalize(known_frames.to(device=device, dtype=torch.float32)), known_mask

    @torch.no_grad()
    def sample(self, cond=None, cond_mask=None, cond_scale=1.0, batch_size=16, sampler="ddpm", steps=None,
               eta=0.0, guidance_rescale=0.0, generator=None, progress=True, x_T=None, clip_denoised=True,
               known_frames=None, known_mask=None, recon_weight=2.0, **denoiser_kwargs):
        """Draw videos (b, c, f, h, w), in [0, 1] when auto_normalize else [−1, 1].

        sampler: 'ddpm' (all timesteps), 'ddim' (`steps`, `eta`), 'dpmpp' (DPM-Solver++(2M), `steps`, default
        20). cond (b, L, d) sets the batch size; cond_scale != 1 applies classifier-free guidance.
        known_frames (b, c, f, h, w, same data range as the output) with known_mask (f,) or (b, f) bool keeps
        those frames fixed and guides the others towards them by reconstruction guidance with weight
        `recon_weight` (Ho et al. 2022 §3.1); `extend` wraps this for continuing a clip in time.
        All noise comes from `generator` (a torch.Generator on the diffusion's device), so a seed
        reproduces the videos; x_T fixes the start noise.
        """
        _check_choice("sampler", sampler, SAMPLERS)
        _check_cond(cond)
        batch_size = cond.shape[0] if cond is not None else batch_size
        device = self.betas.device
        if x_T is None:
            x = torch.randn((batch_size, *self.video_shape), generator=generator, device=device)
        else:
            self._check_videos(x_T, "x_T")
            if cond is not None and x_T.shape[0] != batch_size:
                raise ValueError(f"x_T has batch {x_T.shape[0]} but cond has batch {batch_size}")
            x, batch_size = x_T.to(device=device, dtype=torch.float32), x_T.shape[0]
        known, known_mask = self._prepare_known(known_frames, known_mask, batch_size, device)
        predict = self._predictor(cond=cond, cond_mask=cond_mask, cond_scale=cond_scale,
                                  guidance_rescale=guidance_rescale, clip_denoised=clip_denoised,
                                  known=known, known_mask=known_mask, recon_weight=recon_weight,
                                  **denoiser_kwargs)
        x = run_sampler(sampler, predict, self, x, steps=steps, eta=eta, generator=generator, progress=progress)
        if known is not None:
            x = torch.where(known_mask, known, x)
        return self.unnormalize(x)

    @torch.no_grad()
    def extend(self, clip, **sample_kwargs):
        """Continue `clip` (b, c, k, h, w), k < num_frames, in time: returns num_frames frames, the first k
        being `clip`; the rest are sampled with reconstruction guidance (see `sample`). Slide the window
        and call again to extend further."""
        b, k = clip.shape[0], clip.shape[2]
        if clip.ndim != 5 or not 0 < k < self.num_frames:
            raise ValueError(f"clip must be (b, c, k, h, w) with 0 < k < {self.num_frames}, got {tuple(clip.shape)}")
        known = clip.new_zeros((b, *self.video_shape))
        known[:, :, :k] = clip
        mask = torch.arange(self.num_frames, device=clip.device) < k
        return self.sample(known_frames=known, known_mask=mask, batch_size=b, **sample_kwargs)

    @torch.no_grad()
    def interpolate(self, x1, x2, t=None, lam=0.5, cond=None, cond_mask=None, cond_scale=1.0,
                    generator=None, progress=True, clip_denoised=True):
        """As the reference: noise x1 and x2 to step t (default the last), mix by lam, denoise with DDPM."""
        self._check_videos(x1, "x1")
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have the same shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        t = self.num_timesteps - 1 if t is None else t
        if not 0 <= t < self.num_timesteps:
            raise ValueError(f"t must be in [0, {self.num_timesteps - 1}], got {t}")
        device = self.betas.device
        x1, x2 = (self.normalize(v.to(device=device, dtype=torch.float32)) for v in (x1, x2))
        t_batch = torch.full((x1.shape[0],), t, device=device, dtype=torch.long)
        xt1 = self.q_sample(x1, t_batch, randn_like(x1, generator))
        xt2 = self.q_sample(x2, t_batch, randn_like(x2, generator))
        predict = self._predictor(cond=cond, cond_mask=cond_mask, cond_scale=cond_scale,
                                  guidance_rescale=0.0, clip_denoised=clip_denoised)
        x = ddpm_loop(predict, self, (1 - lam) * xt1 + lam * xt2, start_t=t, generator=generator,
                      progress=progress)
        return self.unnormalize(x)
