"""Fused CPU kernels for the Unet3D, built on first use with torch's C++ extension loader.

`temporal_attention(qkv, bias, frames, heads)` is the temporal attention core: softmax(q k^T /
sqrt(d) + bias) v over the frames at every position and head, reading the packed q/k/v
projection as it is and writing the layout the output projection reads (csrc/ explains why).

The kernel is compiled once per CPU type into torch's extension cache (TORCH_EXTENSIONS_DIR,
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

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "temporal_attention.cpp"
_state = {}


def _cpu_tag() -> str:
    """A short hash of the CPU's model and flags: the build uses -march=native, so a cache shared
    by different machines keeps one build per CPU type."""
    info = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info += "".join(line for line in f
                            if line.startswith(("model name", "flags"))).split("\n\n")[0]
    except OSError:
        pass
    return hashlib.sha1(info.encode()).hexdigest()[:10]


def _load() -> bool:
    from torch.utils.cpp_extension import load
    flags = ["-O3", "-march=native", "-fopenmp"]
    log.info("loading the vdm CPU kernels (the first time on a machine, this builds them: ~20 s)")
    try:
        load(name=f"vdm_cpu_kernels_{_cpu_tag()}", sources=[str(_SOURCE)], extra_cflags=flags,
             extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, no ninja, an unsupported platform: fall back
        log.warning("vdm CPU kernels unavailable (%s: %s); using the PyTorch path",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    return True


# dim_head values the kernel is compiled for (multiples of the fp32 and fp64 vector widths).
KERNEL_DIM_HEADS = (16, 32, 64, 128)


def available() -> bool:
    """True when the fused CPU kernels are built and loaded (built on the first call)."""
    if "ok" not in _state:
        _state["ok"] = os.environ.get("VDM_CPU_KERNELS", "1") != "0" and _load()
    return _state["ok"]


def use_temporal_kernel(qkv: torch.Tensor, dim_head: int) -> bool:
    """Whether TemporalAttention takes the fused kernel for this input: on CPU, for a dim_head it
    is compiled for, outside torch.compile (which traces the PyTorch path), once it is built."""
    return (qkv.device.type == "cpu" and dim_head in KERNEL_DIM_HEADS
            and not torch.compiler.is_compiling() and available())


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


def temporal_attention(qkv: torch.Tensor, bias: torch.Tensor | None, frames: int,
                       heads: int) -> torch.Tensor:
    """qkv `((b f), ..., 3 * heads * d)` packed as (q | k | v), each (heads, d) -> `((b f), ...,
    heads * d)`: every position attends over its `frames` frames, per head, with the additive
    `bias` `(heads, frames, frames)` (None: no bias). Needs `available()`."""
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    if bias is None:
        bias = torch.zeros(heads, frames, frames, dtype=acc, device=qkv.device)
    dim_head = qkv.shape[-1] // (3 * heads)
    return _TemporalAttention.apply(qkv.contiguous(), bias.to(acc).contiguous(), frames, heads,
                                    dim_head ** -0.5)
