"""Fused CPU kernels for the Unet3D, built on first use with torch's C++ extension loader.

- `temporal_attention(qkv, bias, frames, heads)`: the temporal attention core, softmax(q k^T /
  sqrt(d) + bias) v over the frames at every position and head, reading the packed q/k/v
  projection as it is and writing the layout the output projection reads.
- `linear_attention_softmax(qkv, heads)`: the spatial linear attention's layout and softmax step,
  from the packed q/k/v projection to q (softmax over d), k (softmax over positions) and v, each
  `(n, heads, positions, d)`, as its batched matmuls read them.
- `group_norm_silu(x, weight, bias, groups, eps, scale, shift)`: silu((GroupNorm(x) * weight +
  bias) * (1 + scale) + shift), the tail of every ResNet block's conv, in one pass each way.
- `linear(x, weight, bias)` and `conv3x3(x, weight, bias)`: F.linear and a 3x3 F.conv2d whose
  backwards compute the weight gradient as one matmul over the positions, with the narrower
  operand made position-contiguous by a 2-byte transpose kernel (`transpose(x)`).

The fused kernels compute in fp32 (fp64 for fp64 inputs), forward and backward; `linear` and
`conv3x3` leave their products to PyTorch's matmuls (fp32 accumulation). csrc/ says why each
kernel exists.

The kernels are compiled once per CPU type into torch's extension cache (TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions), as DeepSpeed builds its CPU ops; concurrent processes wait
for one build. Where no compiler is available, or with VDM_CPU_KERNELS=0, `available()` is False
and the model uses its PyTorch path (same results, slower; tests check that the two agree).
"""

import hashlib
import logging
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "temporal_attention.cpp", _CSRC / "group_norm_silu.cpp",
            _CSRC / "linear_attention.cpp", _CSRC / "transpose.cpp"]
_state = {}


def _build_tag() -> str:
    """A short hash of the kernels' sources (headers included, which torch's loader does not
    hash) and of the CPU's model and flags: the build uses -march=native, so a cache shared by
    different machines keeps one build per CPU type."""
    info = platform.machine() + "".join(p.read_text() for p in sorted(_CSRC.iterdir()))
    try:
        with open("/proc/cpuinfo") as f:  # model name and flags (the same on every core)
            info += "".join(sorted({line for line in f
                                    if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return hashlib.sha1(info.encode()).hexdigest()[:10]


def _load() -> bool:
    from torch.utils.cpp_extension import load
    flags = ["-O3", "-march=native", "-fopenmp"]
    log.info("loading the vdm CPU kernels (the first time on a machine, this builds them: ~30 s)")
    try:
        load(name=f"vdm_cpu_kernels_{_build_tag()}", sources=[str(p) for p in _SOURCES],
             extra_cflags=flags, extra_ldflags=["-fopenmp"], is_python_module=False,
             verbose=False)
    except Exception as e:  # no compiler, no ninja, an unsupported platform: fall back
        log.warning("vdm CPU kernels unavailable, using the PyTorch path: %s: %s",
                    type(e).__name__, str(e)[-2000:])
        return False
    return True


# dim_head values the temporal kernel is compiled for (multiples of the fp32 and fp64 vector
# widths).
KERNEL_DIM_HEADS = (16, 32, 64, 128)


def available() -> bool:
    """True when the fused CPU kernels are built and loaded (built on the first call)."""
    if "ok" not in _state:
        _state["ok"] = os.environ.get("VDM_CPU_KERNELS", "1") != "0" and _load()
    return _state["ok"]


def _eager_on_cpu(t: torch.Tensor) -> bool:
    """What every kernel needs: a CPU tensor, outside torch.compile (which traces the PyTorch
    path), and the kernels built."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and available()


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The kernels' accumulation dtype for t: fp64 for fp64, else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def use_temporal_kernel(qkv: torch.Tensor, dim_head: int) -> bool:
    """Whether TemporalAttention takes the fused kernel for this input: on CPU, for a dim_head it
    is compiled for, outside torch.compile (which traces the PyTorch path), once it is built."""
    return dim_head in KERNEL_DIM_HEADS and _eager_on_cpu(qkv)


class _TemporalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, frames, heads, scale):
        ctx.save_for_backward(qkv, bias)
        ctx.args = frames, heads, scale
        return torch.ops.vdm_cpu.temporal_attention_forward(qkv, bias, frames, heads, scale)

    @staticmethod
    def backward(ctx, grad_out):
        qkv, bias = ctx.saved_tensors
        grad_qkv, grad_bias = torch.ops.vdm_cpu.temporal_attention_backward(
            grad_out.contiguous().to(qkv.dtype), qkv, bias, *ctx.args)
        return grad_qkv, grad_bias, None, None, None


def use_fused_norm(x: torch.Tensor) -> bool:
    """Whether GroupNormSiLU takes the fused kernel: a CPU tensor in channels-last memory, outside
    torch.compile, once the kernels are built."""
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and _eager_on_cpu(x))


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps):
        out, mean, rstd = torch.ops.vdm_cpu.gn_silu_forward(x, weight, bias, scale, shift, groups,
                                                            eps)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.groups = groups
        return out

    @staticmethod
    def backward(ctx, grad_out):
        *saved, = ctx.saved_tensors
        grads = torch.ops.vdm_cpu.gn_silu_backward(
            grad_out.contiguous(memory_format=torch.channels_last), *saved, ctx.groups)
        return (*grads, None, None)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int,
                    eps: float, scale: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None) -> torch.Tensor:
    """silu((group_norm(x) * weight + bias) * (1 + scale) + shift) for x `(n, c, h, w)` in
    channels-last memory; scale and shift broadcast as `(n, c, 1, 1)` (None: 0). The result is
    in x's dtype and memory format. Needs `available()`."""
    acc = _acc_dtype(x)
    n, c = x.shape[:2]

    def per_sample(t):
        if t is None:
            return torch.zeros(n, c, dtype=acc, device=x.device)
        return t.expand(n, c, 1, 1).reshape(n, c).to(acc).contiguous()

    return _GroupNormSiLU.apply(x, weight.to(acc).contiguous(), bias.to(acc).contiguous(),
                                per_sample(scale), per_sample(shift), groups, eps)


def temporal_attention(qkv: torch.Tensor, bias: torch.Tensor | None, frames: int,
                       heads: int) -> torch.Tensor:
    """qkv `((b f), ..., 3 * heads * d)` packed as (q | k | v), each (heads, d) -> `((b f), ...,
    heads * d)`: every position attends over its `frames` frames, per head, with the additive
    `bias` `(heads, frames, frames)` (None: no bias). Needs `available()`."""
    acc = _acc_dtype(qkv)
    if bias is None:
        bias = torch.zeros(heads, frames, frames, dtype=acc, device=qkv.device)
    dim_head = qkv.shape[-1] // (3 * heads)
    return _TemporalAttention.apply(qkv.contiguous(), bias.to(acc).contiguous(), frames, heads,
                                    dim_head ** -0.5)


def use_linear_attention_kernel(qkv: torch.Tensor, dim_head: int) -> bool:
    """Whether SpatialLinearAttention takes the fused layout and softmax kernel: on CPU, for a
    dim_head that is whole vectors (a multiple of 16), outside torch.compile, once the kernels
    are built."""
    return dim_head % 16 == 0 and _eager_on_cpu(qkv)


class _LinearAttentionSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, heads):
        q, k, v = torch.ops.vdm_cpu.linear_attention_softmax_forward(qkv, heads)
        ctx.save_for_backward(q, k)  # the softmaxes; their backward needs nothing of qkv
        ctx.qkv_shape = qkv.shape
        return q, k, v

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        q, k = ctx.saved_tensors
        # (autograd passes zeros, not None, for an output that was not used)
        grads = [g.contiguous().to(q.dtype) for g in (grad_q, grad_k, grad_v)]
        grad_qkv = torch.ops.vdm_cpu.linear_attention_softmax_backward(*grads, q, k)
        return grad_qkv.view(ctx.qkv_shape), None


def linear_attention_softmax(qkv: torch.Tensor, heads: int):
    """qkv `(n, ..., 3 * heads * d)` packed as (q | k | v), each (heads, d), the positions in
    between -> q, k, v `(n, heads, positions, d)`: q softmaxed over d, k over the positions, v
    as it is. Needs `available()`."""
    return _LinearAttentionSoftmax.apply(qkv.contiguous(), heads)


# The weight gradient of a projection reduces over its input's rows (positions). From this many
# rows on, `linear` computes it from a transposed copy of the narrower operand: in bf16 on a
# 2-core Intel CPU with AMX 1.07-1.49x faster from 32,768 rows (the 32x32 and 64x64 levels), 0.8-0.9x at
# 8,192 (bench/README.md, measurements behind the model's CPU paths).
LINEAR_TRANSPOSED_MIN_ROWS = 32768


def use_linear_kernel(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a projection of x computed in `dtype` takes `linear`: a 2-byte dtype (bf16, fp16;
    the transpose kernel moves 2-byte elements), with gradients on, on CPU outside torch.compile,
    once the kernels are built."""
    return dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled() and _eager_on_cpu(x)


def weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad^T x for grad `(P, O)` and x `(P, C)`, 2-D and contiguous: the weight gradient of a
    projection, `(O, C)`. With many rows, the narrower operand is transposed first (so oneDNN
    reads it position-contiguous) and multiplied as the left factor."""
    if x.shape[0] < LINEAR_TRANSPOSED_MIN_ROWS:
        return grad.t() @ x
    if x.shape[1] <= grad.shape[1]:
        return (torch.ops.vdm_cpu.transpose(x) @ grad).t().contiguous()
    return torch.ops.vdm_cpu.transpose(grad) @ x


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = (grad @ weight).view(x.shape) if need_x else None
        grad_w = weight_grad(grad, x.reshape(-1, x.shape[-1]).contiguous()) if need_w else None
        grad_b = grad.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), all three in one 2-byte dtype; the backward takes the weight
    gradient through `weight_grad`. Needs `available()`."""
    return _Linear.apply(x, weight, bias)


# A 3x3 convolution over at most this many positions per image takes `conv3x3`. oneDNN's weight
# gradient ran at 0.64-0.76 TFLOP/s on the 8x8 level (bf16, 2 cores); as one matmul over
# positions it took the level's conv backwards 1.41-1.48x faster, but 0.68-0.76x at 16x16
# (bench/README.md, measurements behind the model's CPU paths).
CONV3X3_MAX_POSITIONS = 64


def use_conv3x3_kernel(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a 3x3 convolution (stride 1, padding 1) of x `(n, c, h, w)` computed in `dtype`
    takes `conv3x3`: few positions per image, channels-last memory, and what `linear` needs."""
    return (x.dim() == 4 and x.shape[-2] * x.shape[-1] <= CONV3X3_MAX_POSITIONS
            and x.is_contiguous(memory_format=torch.channels_last) and use_linear_kernel(x, dtype))


def conv3x3_weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight gradient of a 3x3 convolution (stride 1, padding 1), grad `(n, o, h, w)` and x
    `(n, c, h, w)` both channels-last: the output gradient transposed to `(o, positions)` times
    the nine shifted copies of x side by side, `(positions, 9 c)`. That product is the weight in
    channels-last memory, `(o, 3, 3, c)`; returned as `(o, c, 3, 3)`."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1)  # (n, h + 2, w + 2, c)
    cols = torch.cat([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], dim=-1)
    grad_t = torch.ops.vdm_cpu.transpose(grad.permute(0, 2, 3, 1).reshape(-1, grad.shape[1]))
    return (grad_t @ cols.view(-1, 9 * c)).view(-1, 3, 3, c).permute(0, 3, 1, 2)


class _Conv3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = torch.ops.aten.convolution_backward(
            grad, x, weight, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1,
            (True, False, False))[0] if need_x else None
        grad_w = conv3x3_weight_grad(grad, x) if need_w else None
        grad_b = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a 3x3 weight, all in one 2-byte dtype, x
    channels-last; the backward takes the weight gradient through `conv3x3_weight_grad`. Needs
    `available()`."""
    return _Conv3x3.apply(x, weight, bias)
