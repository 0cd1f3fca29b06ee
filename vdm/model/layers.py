"""Convolutional building blocks of the Unet3D: time embedding, ResNet blocks, resampling.

Inside the network a video is held as `(b f) c h w`: frames folded into the batch, in
channels-last memory. Every layer here is spatial only (pseudo-3D, 1 x k x k), so folding the
frames costs nothing and keeps each frame independent; only the temporal attention mixes frames.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class _BF16ConvFn(torch.autograd.Function):
    """bf16 convolution whose weight and bias gradients are computed in fp32.

    oneDNN's bf16 weight-gradient (and bias-gradient) kernels on CPU run 10-20x slower than the
    bf16 input gradient or the fp32 weight gradient, and would dominate a training step. The input
    gradient stays in bf16; the weight reduction runs in fp32 against the fp32 parameter, which
    also keeps the bf16 rounding out of the weight gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, conf):
        ctx.save_for_backward(x, weight)
        ctx.conf, ctx.has_bias = conf, bias is not None
        stride, padding, transposed, output_padding = conf
        w, b = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
        if transposed:
            return F.conv_transpose2d(x, w, b, stride, padding, output_padding)
        return F.conv2d(x, w, b, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, transposed, output_padding = ctx.conf
        args = (None, stride, padding, (1, 1), transposed, output_padding, 1)
        aten = torch.ops.aten.convolution_backward
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = aten(grad, x, weight.to(x.dtype), *args, (True, False, False))[0]
        if ctx.needs_input_grad[1]:
            grad_w = aten(grad.float(), x.float(), weight.float(), *args,
                          (False, True, False))[1].to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3), dtype=torch.float32).to(weight.dtype)
        return grad_x, grad_w, grad_b, None


def _cpu_bf16_dtype(x: torch.Tensor):
    """bf16 if this conv would run in bf16 on CPU (autocast or bf16 input), else None."""
    if x.device.type != "cpu":
        return None
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dtype if dtype == torch.bfloat16 else None


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state dict) that avoids the slow CPU bf16 weight gradient."""

    def forward(self, x):
        dtype = _cpu_bf16_dtype(x)
        if dtype is None or not torch.is_grad_enabled() or self.groups != 1 or self.dilation != (1, 1):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return _BF16ConvFn.apply(x.to(dtype), self.weight, self.bias,
                                     (self.stride, self.padding, False, (0, 0)))


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d with the same CPU bf16 weight-gradient fix as `Conv2d`."""

    def forward(self, x, output_size=None):
        dtype = _cpu_bf16_dtype(x)
        if (dtype is None or not torch.is_grad_enabled() or output_size is not None
                or self.groups != 1 or self.dilation != (1, 1)):
            return super().forward(x, output_size)
        with torch.autocast("cpu", enabled=False):
            return _BF16ConvFn.apply(x.to(dtype), self.weight, self.bias,
                                     (self.stride, self.padding, True, self.output_padding))


class SinusoidalPosEmb(nn.Module):
    """Sinusoidal embedding of diffusion timesteps, `(b,) -> (b, dim)`, always in fp32."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        # Timesteps up to 1000 times frequencies near 1 lose all phase precision in bf16, so this
        # runs in fp32 even under autocast.
        half = self.dim // 2
        with torch.autocast(device_type=time.device.type, enabled=False):
            scale = math.log(10000) / (half - 1)
            freqs = torch.exp(torch.arange(half, device=time.device, dtype=torch.float32) * -scale)
            args = rearrange(time.float(), "b -> b 1") * rearrange(freqs, "d -> 1 d")
            return torch.cat((args.sin(), args.cos()), dim=-1)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a `(n, c, h, w)` tensor, gain only (as in the reference)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In channels-last memory 'n c h w -> n h w c' is a view, so this is one pass, no copies.
        x = rearrange(x, "n c h w -> n h w c")
        x = F.layer_norm(x, x.shape[-1:], self.gamma.to(x.dtype), None, self.eps)
        return rearrange(x, "n h w c -> n c h w")


class Block(nn.Module):
    """Spatial 3x3 conv -> GroupNorm (per frame) -> optional scale-shift -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        if dim_out % groups:
            raise ValueError(f"resnet_groups={groups} must divide the block width {dim_out}")
        self.proj = Conv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = torch.addcmul(shift, x, scale + 1)
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two `Block`s with a residual; the conditioning vector sets a per-channel scale and shift."""

    def __init__(self, dim: int, dim_out: int, *, emb_dim: int | None = None, groups: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim_out * 2)) if emb_dim else None
        self.block1 = Block(dim, dim_out, groups=groups)
        self.block2 = Block(dim_out, dim_out, groups=groups)
        self.res_conv = Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x: `(b f) c h w`; emb: `(b f) emb_dim` (the sample's conditioning repeated per frame)."""
        scale_shift = None
        if self.mlp is not None:
            if emb is None:
                raise ValueError("this ResnetBlock was built with emb_dim and needs an embedding")
            emb = rearrange(self.mlp(emb), "n c -> n c 1 1")
            scale_shift = emb.chunk(2, dim=1)
        h = self.block1(x, scale_shift)
        h = self.block2(h)
        return h + self.res_conv(x)


def Downsample(dim: int) -> nn.Module:
    """Halve height and width, frames untouched (strided 4x4 conv, as in the reference)."""
    return Conv2d(dim, dim, 4, stride=2, padding=1)


def Upsample(dim: int) -> nn.Module:
    """Double height and width, frames untouched (transposed 4x4 conv, as in the reference)."""
    return ConvTranspose2d(dim, dim, 4, stride=2, padding=1)
