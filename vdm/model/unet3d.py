"""Unet3D: the space-time factored denoiser of Ho et al., "Video Diffusion Models".

Arguments mean what they mean in lucidrains/video-diffusion-pytorch. Differences, and why:
- GroupNorm normalises each frame on its own (the reference pools statistics over frames), so a
  sample with `focus_present_mask` never mixes frames (each frame still knows its index).
- Text conditioning is on token embeddings: cross-attention at every level but the highest
  resolution (`layer_cross_attns`), plus the masked mean of the tokens added to the time
  embedding; a learned null (tokens and pooled vector) is used for classifier-free guidance.
  A `(b, cond_dim)` vector is accepted as a single token.
- The time/text vector sets a scale and shift in each ResNet block (the reference only shifts).
- Frames know where they stand in time, and what the caption says of that time: `frame_cond` adds
  to each frame's vector an MLP of its position and of an attention from that position over the
  caption's tokens; `temporal_pos` adds each frame's sinusoidal position to the input of every
  temporal attention; `temporal_conv` adds a residual 1D convolution across frames to every level;
  `spatial_pos` gives the first convolution the pixel coordinates.
Kept from the reference: the up path has one level fewer than the down path, so the first
level's output is not used as a skip connection; parameter counts stay comparable.
"""

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from vdm.model.attention import (CrossAttention, RelativePositionBias, SpatialAttention,
                                 SpatialLinearAttention, TemporalAttention, attend)
from vdm.model.layers import Downsample, ResnetBlock, SinusoidalPosEmb, TemporalConv, Upsample


def prob_mask_like(batch: int, prob: float, device) -> torch.Tensor:
    """A `(batch,)` bool mask, each entry True with probability `prob`."""
    if prob <= 0:
        return torch.zeros(batch, dtype=torch.bool, device=device)
    if prob >= 1:
        return torch.ones(batch, dtype=torch.bool, device=device)
    return torch.rand(batch, device=device) < prob


def _coordinates(x: torch.Tensor) -> torch.Tensor:
    """Two channels, column and row position in [-1, 1], for a `(n, c, h, w)` input."""
    n, _, h, w = x.shape
    ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
    grid = torch.stack((xs.expand(h, w), ys[:, None].expand(h, w)))
    return grid.expand(n, 2, h, w)


class Unet3D(nn.Module):
    """3D U-Net over `(b, c, f, h, w)` videos: pseudo-3D convs, spatial + temporal attention."""

    def __init__(self, dim, cond_dim=None, out_dim=None, dim_mults=(1, 2, 4, 8), channels=3,
                 attn_heads=8, attn_dim_head=32, init_dim=None, init_kernel_size=7,
                 use_sparse_linear_attn=True, resnet_groups=8, max_text_len=None,
                 gradient_checkpointing=False, layer_cross_attns=None, frame_cond=True,
                 temporal_pos=True, temporal_conv=True, spatial_pos=True):
        super().__init__()
        if init_kernel_size % 2 == 0:
            raise ValueError(f"init_kernel_size must be odd, got {init_kernel_size}")
        self.channels = channels
        self.cond_dim = cond_dim
        self.has_cond = cond_dim is not None
        self.max_text_len = max_text_len
        self.gradient_checkpointing = gradient_checkpointing
        self.downsample_factor = 2 ** (len(dim_mults) - 1)
        attn = dict(heads=attn_heads, dim_head=attn_dim_head)

        self.time_rel_pos_bias = RelativePositionBias(heads=attn_heads, max_distance=32)
        init_dim = init_dim or dim // 3 * 2
        self.spatial_pos = spatial_pos
        self.init_conv = nn.Conv2d(channels + 2 * spatial_pos, init_dim, init_kernel_size,
                                   padding=init_kernel_size // 2)
        tattn = dict(attn, absolute_pos=temporal_pos)
        self.init_temporal_attn = TemporalAttention(init_dim, **tattn)

        time_dim = dim * 4
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))

        context_dim = None
        if self.has_cond:
            # Learned null: enough tokens to fill a padded sequence when max_text_len is set,
            # otherwise one token (the rest of the sequence is then masked out). The count is kept
            # as an int: under ZeRO 3 a partitioned parameter's shape is not its real shape.
            self.num_null_tokens = max_text_len or 1
            self.null_text_tokens = nn.Parameter(torch.randn(self.num_null_tokens, cond_dim) * 0.02)
            self.null_text_pooled = nn.Parameter(torch.randn(cond_dim) * 0.02)
            # Tokens are projected once to a narrow width shared by every cross-attention layer.
            context_dim = time_dim
            self.text_to_context = nn.Sequential(nn.LayerNorm(cond_dim),
                                                 nn.Linear(cond_dim, context_dim))
            self.text_to_time = nn.Sequential(nn.LayerNorm(cond_dim), nn.Linear(cond_dim, time_dim),
                                              nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.frame_cond = None
        if frame_cond:
            self.frame_pos = SinusoidalPosEmb(dim)
            # Each frame's position asks the caption's tokens what holds at that time: a per-frame
            # attention, since a mean over tokens all but erases a single word such as "left".
            self.frame_query = nn.Linear(dim, time_dim) if self.has_cond else None
            self.frame_cond = nn.Sequential(nn.Linear(time_dim + dim, time_dim), nn.SiLU(),
                                            nn.Linear(time_dim, time_dim))
            nn.init.zeros_(self.frame_cond[-1].weight)
            nn.init.zeros_(self.frame_cond[-1].bias)

        dims = [init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        # Cross-attention per resolution level (ups share their level's flag). As in Imagen, none
        # at the highest resolution by default: there it is the costliest block and text already
        # reaches every block through the pooled vector in the time embedding.
        if layer_cross_attns is None:
            layer_cross_attns = (False,) + (True,) * (len(dim_mults) - 1)
        if len(layer_cross_attns) != len(dim_mults):
            raise ValueError(f"layer_cross_attns needs one flag per level ({len(dim_mults)}), "
                             f"got {layer_cross_attns}")
        self.layer_cross_attns = tuple(bool(c) and self.has_cond for c in layer_cross_attns)

        def resnet(d_in, d_out):
            return ResnetBlock(d_in, d_out, emb_dim=time_dim, groups=resnet_groups)

        def level(d_in, d_out, resample, cross):
            return nn.ModuleDict(dict(
                block1=resnet(d_in, d_out), block2=resnet(d_out, d_out),
                temporal_conv=TemporalConv(d_out) if temporal_conv else nn.Identity(),
                spatial_attn=SpatialLinearAttention(d_out, attn_heads)
                if use_sparse_linear_attn else nn.Identity(),
                cross_attn=CrossAttention(d_out, context_dim, **attn) if cross else nn.Identity(),
                temporal_attn=TemporalAttention(d_out, **tattn),
                resample=resample))

        last = len(in_out) - 1
        self.downs = nn.ModuleList(
            level(d_in, d_out, Downsample(d_out) if i < last else nn.Identity(),
                  self.layer_cross_attns[i])
            for i, (d_in, d_out) in enumerate(in_out))
        mid = dims[-1]
        self.mid = nn.ModuleDict(dict(
            block1=resnet(mid, mid), temporal_conv=TemporalConv(mid) if temporal_conv else nn.Identity(),
            spatial_attn=SpatialAttention(mid, **attn),
            cross_attn=CrossAttention(mid, context_dim, **attn) if self.has_cond else nn.Identity(),
            temporal_attn=TemporalAttention(mid, **tattn), block2=resnet(mid, mid)))
        # As in the reference, the up path mirrors all but the first level and always upsamples;
        # the last up level ends at width `dim`.
        self.ups = nn.ModuleList(
            level(d_out * 2, d_in, Upsample(d_in), self.layer_cross_attns[i])
            for i, (d_in, d_out) in reversed(list(enumerate(in_out))[1:]))

        self.final_block = ResnetBlock(dim, dim, groups=resnet_groups)
        self.final_conv = nn.Conv2d(dim, out_dim or channels, 1)
        # Conv weights in the activations' channels-last layout: oneDNN then takes them as they
        # are, and their gradients need no transposing copy into .grad. (Only values are saved:
        # state dicts are made contiguous before writing.)
        self.to(memory_format=torch.channels_last)

    # conditioning -----------------------------------------------------------------------------

    def _text_conditioning(self, cond, cond_mask, null_mask, batch, device):
        """-> context `(b, L, context_dim)`, mask `(b, L)`, pooled `(b, cond_dim)`."""
        if cond is None:
            cond = self.null_text_tokens[:1].expand(batch, 1, -1)
            cond_mask, null_mask = None, torch.ones(batch, dtype=torch.bool, device=device)
        if cond.ndim == 2:  # a pooled vector, as the reference takes: one always-real token
            cond = rearrange(cond, "b d -> b 1 d")
            cond_mask = None
        if cond.ndim != 3 or cond.shape[0] != batch or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"cond must be (batch={batch}, L, {self.cond_dim}) or "
                             f"(batch, {self.cond_dim}); got {tuple(cond.shape)}")
        length = cond.shape[1]
        if length == 0:
            raise ValueError("cond has 0 tokens; pass cond=None for the unconditional model")
        if cond_mask is None:
            cond_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        if cond_mask.shape != (batch, length):
            raise ValueError(f"cond_mask must be ({batch}, {length}), got {tuple(cond_mask.shape)}")
        cond_mask = cond_mask.bool()
        n_null = self.num_null_tokens
        if self.max_text_len is not None:
            if length > self.max_text_len:
                raise ValueError(f"cond has {length} tokens, more than max_text_len="
                                 f"{self.max_text_len}; truncate at encoding time")
            cond = F.pad(cond, (0, 0, 0, self.max_text_len - length))
            cond_mask = F.pad(cond_mask, (0, self.max_text_len - length), value=False)
        # A caption with no real token carries no text: treat it as the null caption.
        null_mask = null_mask | ~cond_mask.any(dim=1)

        cond = cond.to(self.null_text_tokens.dtype)
        weights = cond_mask.to(cond.dtype).unsqueeze(-1)
        pooled = (cond * weights).sum(1) / weights.sum(1).clamp(min=1)
        pooled = torch.where(null_mask[:, None], self.null_text_pooled, pooled)

        null_tokens = F.pad(self.null_text_tokens, (0, 0, 0, cond.shape[1] - n_null))
        null_tmask = torch.arange(cond.shape[1], device=device) < n_null
        cond = torch.where(null_mask[:, None, None], null_tokens, cond)
        cond_mask = torch.where(null_mask[:, None], null_tmask, cond_mask)
        return self.text_to_context(cond), cond_mask, pooled

    def _frame_conditioning(self, batch, frames, context, context_mask, device):
        """`(b f, time_dim)`: an MLP of each frame's position and what it read from the caption."""
        pos = self.frame_pos(torch.arange(frames, device=device))  # (f, dim)
        if context is None:
            text = pos.new_zeros(batch * frames, self.frame_cond[0].in_features - pos.shape[1])
        else:
            pos = pos.to(context.dtype)
            query = repeat(self.frame_query(pos), "f d -> b 1 f d", b=batch)
            text = attend(query, context[:, None], context[:, None], rearrange(context_mask, "b l -> b 1 1 l"))
            text = rearrange(text, "b 1 f d -> (b f) d")
        pos = repeat(pos, "f d -> (b f) d", b=batch).to(text.dtype)
        return self.frame_cond(torch.cat((text, pos), dim=-1))

    # forward ----------------------------------------------------------------------------------

    def _maybe_checkpoint(self, fn, *args, **kwargs):
        # Per-block activation checkpointing; non-reentrant so it works with ZeRO 2/3 hooks and
        # with inputs that do not require grad.
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def _level(self, blocks, x, emb, frames, pos_bias, focus, context, context_mask):
        run = self._maybe_checkpoint
        x = run(blocks["block1"], x, emb)
        x = run(blocks["block2"], x, emb)
        if not isinstance(blocks["temporal_conv"], nn.Identity):
            x = run(blocks["temporal_conv"], x, frames)
        if not isinstance(blocks["spatial_attn"], nn.Identity):
            x = run(blocks["spatial_attn"], x)
        if context is not None and not isinstance(blocks["cross_attn"], nn.Identity):
            x = run(blocks["cross_attn"], x, frames, context, context_mask)
        return run(blocks["temporal_attn"], x, frames, pos_bias, focus)

    def _check_input(self, x, time):
        if x.ndim != 5 or x.shape[1] != self.channels:
            raise ValueError(f"x must be (batch, channels={self.channels}, frames, height, width),"
                             f" got {tuple(x.shape)}")
        h, w, d = x.shape[-2], x.shape[-1], self.downsample_factor
        if h % d or w % d:
            raise ValueError(f"height and width must be divisible by the total downsampling "
                             f"factor {d} (2 ** (len(dim_mults) - 1)); got {h}x{w}")
        if time.ndim == 0:  # one timestep for the whole batch
            time = time.expand(x.shape[0])
        if time.shape != (x.shape[0],):
            raise ValueError(f"time must be ({x.shape[0]},), got {tuple(time.shape)}")
        return time

    def forward(self, x, time, cond=None, cond_mask=None, null_cond_prob=0.,
                focus_present_mask=None, prob_focus_present=0., null_mask=None):
        """Predict from noisy video x `(b, c, f, h, w)` at timesteps `(b,)`; same shape out.

        cond: `(b, L, cond_dim)` tokens with cond_mask `(b, L)` (True = real), or `(b, cond_dim)`,
        or None (= the learned null). null_mask `(b,)` forces the null for chosen samples; else it
        is drawn with `null_cond_prob`. focus_present_mask is drawn with `prob_focus_present`.
        """
        time = self._check_input(x, time)
        b, _, frames, _, _ = x.shape
        device = x.device
        if cond is not None and not self.has_cond:
            raise ValueError("cond was given but the model was built without cond_dim")
        if focus_present_mask is None:
            focus_present_mask = prob_mask_like(b, prob_focus_present, device)
        if focus_present_mask.shape != (b,):
            raise ValueError(f"focus_present_mask must be ({b},), "
                             f"got {tuple(focus_present_mask.shape)}")
        focus = focus_present_mask.to(device=device, dtype=torch.bool)
        focus = focus if bool(focus.any()) else None  # one host sync here, not one per block

        t = self.time_mlp(time)
        context = context_mask = None
        if self.has_cond:
            if null_mask is None:
                null_mask = prob_mask_like(b, null_cond_prob, device)
            context, context_mask, pooled = self._text_conditioning(
                cond, cond_mask, null_mask.to(device=device, dtype=torch.bool), b, device)
            t = t + self.text_to_time(pooled)
        emb = repeat(t, "b d -> (b f) d", f=frames)
        if self.frame_cond is not None:
            emb = emb + self._frame_conditioning(b, frames, context, context_mask, device)
        pos_bias = self.time_rel_pos_bias(frames, device)
        args = (frames, pos_bias, focus, context, context_mask)

        # Frames folded into the batch, channels-last memory: all convs and projections then run
        # on (b f) h w c without permutes (see layers.py).
        x = rearrange(x, "b c f h w -> (b f) c h w")
        if self.spatial_pos:
            x = torch.cat((x, _coordinates(x)), dim=1)
        x = self.init_conv(x.contiguous(memory_format=torch.channels_last))
        x = self._maybe_checkpoint(self.init_temporal_attn, x, frames, pos_bias, focus)

        skips = []
        for blocks in self.downs:
            x = self._level(blocks, x, emb, *args)
            skips.append(x)
            x = blocks["resample"](x)

        run = self._maybe_checkpoint
        x = run(self.mid["block1"], x, emb)
        if not isinstance(self.mid["temporal_conv"], nn.Identity):
            x = run(self.mid["temporal_conv"], x, frames)
        x = run(self.mid["spatial_attn"], x)
        if context is not None:
            x = run(self.mid["cross_attn"], x, frames, context, context_mask)
        x = run(self.mid["temporal_attn"], x, frames, pos_bias, focus)
        x = run(self.mid["block2"], x, emb)

        for blocks in self.ups:
            x = torch.cat((x, skips.pop()), dim=1)
            x = self._level(blocks, x, emb, *args)
            x = blocks["resample"](x)

        x = self.final_conv(run(self.final_block, x))
        return rearrange(x, "(b f) c h w -> b c f h w", f=frames).contiguous()

    def forward_with_cond_scale(self, x, time, cond=None, cond_mask=None, cond_scale=1.,
                                rescaled_phi=0., **kwargs):
        """Classifier-free guidance: conditional and null predictions in one batched call."""
        kwargs.pop("null_cond_prob", None)
        if not self.has_cond or cond is None or cond_scale == 1:
            return self(x, time, cond=cond, cond_mask=cond_mask, null_cond_prob=0., **kwargs)
        b = x.shape[0]
        if time.ndim == 0:
            time = time.expand(b)
        null_mask = torch.arange(2 * b, device=x.device) >= b
        # Both halves must see the same focus mask, so draw it here, once for b samples.
        focus = kwargs.pop("focus_present_mask", None)
        if focus is None:
            focus = prob_mask_like(b, kwargs.pop("prob_focus_present", 0.), x.device)
        focus = torch.cat((focus, focus))
        # Through __call__, not .forward: ZeRO 3 gathers this module's own parameters (the
        # learned null) in its forward hooks.
        out = self(torch.cat((x, x)), torch.cat((time, time)), cond=torch.cat((cond, cond)),
                   cond_mask=None if cond_mask is None else torch.cat((cond_mask, cond_mask)),
                   null_mask=null_mask, focus_present_mask=focus, **kwargs)
        cond_out, null_out = out.chunk(2)
        guided = null_out + (cond_out - null_out) * cond_scale
        if rescaled_phi == 0.:
            return guided
        # Lin et al. 2023: match the guided prediction's std to the conditional one's.
        dims = tuple(range(1, guided.ndim))
        ratio = cond_out.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        rescaled = guided * ratio
        return rescaled * rescaled_phi + guided * (1. - rescaled_phi)
