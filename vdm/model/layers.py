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

from vdm.model import cpu_kernels


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """`(n,) -> (n, dim)` fp32: sines then cosines of the positions at frequencies from 1 to 1/10000."""
    if dim < 4 or dim % 2:
        raise ValueError(f"sinusoidal embedding dim must be even and >= 4, got {dim}")
    # Timesteps up to 1000 times frequencies near 1 lose all phase precision in bf16, so this
    # runs in fp32 even under autocast.
    half = dim // 2
    with torch.autocast(device_type=positions.device.type, enabled=False):
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=positions.device, dtype=torch.float32) * -scale)
        args = rearrange(positions.float(), "b -> b 1") * rearrange(freqs, "d -> 1 d")
        return torch.cat((args.sin(), args.cos()), dim=-1)


class SinusoidalPosEmb(nn.Module):
    """Sinusoidal embedding of diffusion timesteps (or frame indices), `(b,) -> (b, dim)`, in fp32."""

    def __init__(self, dim: int):
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        return sinusoidal_embedding(time, self.dim)


def _cpu_autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype CPU autocast would run a conv or matmul of x in (x's own when autocast is off):
    the layers below that replace PyTorch's backward cast to it and run with autocast off."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


class GroupNormSiLU(nn.GroupNorm):
    """silu(GroupNorm(x) * (1 + scale) + shift): on CPU one fused kernel each way (cpu_kernels),
    elsewhere the PyTorch ops. A GroupNorm subclass, so its parameters and their names are
    GroupNorm's (and ZeRO 3 gathers them through this module's own hooks)."""

    def forward(self, x, scale=None, shift=None):
        if cpu_kernels.use_fused_norm(x):
            # In x's dtype, as the PyTorch path under CPU autocast (whose GroupNorm keeps bf16).
            return cpu_kernels.group_norm_silu(x, self.weight, self.bias, self.num_groups,
                                               self.eps, scale, shift)
        x = super().forward(x)
        if scale is not None:
            x = torch.addcmul(shift, x, scale + 1)
        return F.silu(x)


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(dim, dim_out, 3, padding=1) whose CPU backward, on levels of at most 64
    positions, computes the weight gradient as one matmul over the positions
    (cpu_kernels.conv3x3): oneDNN's took 13-14 ms of the 8x8 level's 21 ms 512-channel conv
    backwards in bf16. Same parameters and state-dict names as nn.Conv2d; elsewhere (GPU, fp32,
    larger levels, inference, torch.compile) it is nn.Conv2d."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__(dim, dim_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _cpu_autocast_dtype(x)  # computed in it below, with autocast off inside
        if not cpu_kernels.use_conv3x3_kernel(x, dtype):
            return super().forward(x)
        with torch.autocast("cpu", enabled=False):
            return cpu_kernels.conv3x3(x.to(dtype), self.weight.to(dtype), self.bias.to(dtype))


class Block(nn.Module):
    """Spatial 3x3 conv -> GroupNorm (per frame) -> optional scale-shift -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        if dim_out % groups:
            raise ValueError(f"resnet_groups={groups} must divide the block width {dim_out}")
        self.proj = Conv3x3(dim, dim_out)
        self.norm = GroupNormSiLU(groups, dim_out)

    def forward(self, x: torch.Tensor, scale_shift=None) -> torch.Tensor:
        scale, shift = scale_shift if scale_shift is not None else (None, None)
        return self.norm(self.proj(x), scale, shift)


class ResnetBlock(nn.Module):
    """Two `Block`s with a residual; the conditioning vector sets a per-channel scale and shift."""

    def __init__(self, dim: int, dim_out: int, *, emb_dim: int | None = None, groups: int = 8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, dim_out * 2)) if emb_dim else None
        self.block1 = Block(dim, dim_out, groups=groups)
        self.block2 = Block(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

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


class TemporalConv(nn.Module):
    """A residual 1D convolution across frames at each position (Make-A-Video's pseudo-3D step),
    zero at initialisation: after a spatial convolution it can move content from one frame to the
    next at a spatial offset, the operator that motion in a given direction is made of."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        h = rearrange(x, "(b f) c h w -> (b h w) c f", f=frames)
        h = rearrange(self.conv(h), "(b h w) c f -> (b f) c h w", h=x.shape[-2], w=x.shape[-1])
        return x + h.contiguous(memory_format=torch.channels_last)


def Downsample(dim: int) -> nn.Module:
    """Halve height and width, frames untouched (strided 4x4 conv, as in the reference)."""
    return nn.Conv2d(dim, dim, 4, stride=2, padding=1)


class _ConvTransposeSummedBiasGrad(torch.autograd.Function):
    """conv_transpose2d whose backward takes the bias gradient as a sum of the output gradient.

    PyTorch's CPU backward of a transposed conv with a bias spends most of its time on the bias
    gradient: in bf16 channels-last, the 64-256 channel Upsamples' backwards took 17-25 ms, of
    which their input and weight gradients 5-11 ms; this sum takes 0.1-1.7 ms (bench/README.md,
    measurements behind the model's CPU paths)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.conv = stride, padding
        return F.conv_transpose2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.conv
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, stride, padding, (1, 1), True, (0, 0), 1,
            (need_x, need_w, False))
        grad_b = grad.sum((0, 2, 3)) if need_b else None
        return grad_x, grad_w, grad_b, None, None


class Upsample(nn.ConvTranspose2d):
    """Double height and width, frames untouched (transposed 4x4 conv, as in the reference)."""

    def __init__(self, dim: int):
        super().__init__(dim, dim, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return super().forward(x)
        dtype = _cpu_autocast_dtype(x)  # computed in it below, with autocast off inside
        with torch.autocast("cpu", enabled=False):
            return _ConvTransposeSummedBiasGrad.apply(
                x.to(dtype), self.weight.to(dtype), self.bias.to(dtype), self.stride, self.padding)


class Linear(nn.Linear):
    """nn.Linear whose CPU backward computes the weight gradient through a transposed copy of the
    narrower operand (cpu_kernels.linear) when it reduces over many positions: the attention
    projections of the 64x64 level reduced 131,072 rows at 0.45 TFLOP/s in bf16 through oneDNN's
    transposed read. Same parameters and state-dict names as nn.Linear; elsewhere (GPU, fp32,
    inference, torch.compile) it is nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _cpu_autocast_dtype(x)  # computed in it below, with autocast off inside
        if not cpu_kernels.use_linear_kernel(x, dtype):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return cpu_kernels.linear(x.to(dtype), self.weight.to(dtype), bias)
