"""The fifth stop's model code against the fourth stop's (commit b3b1b07), alternating 16-frame bf16
training steps of the fixed config in one process: the one comparison of two code versions that
the shared machine's drift (its matmul peak read 1.87-2.10 TFLOP/s across runs) does not blur.

    .venv/bin/python bench/ab_fourth_stop.py [pairs]      # in a git checkout; ~3 min

The fourth stop's kernels are built from that commit's sources (`git show`) under another op
namespace; its Python paths (no linear attention kernel, nn.ConvTranspose2d's own backward, the
masked_fill cross-attention mask) are restored by swapping the functions for each step. A one-off
for the fifth stop's note, kept so its figure can be reproduced.
"""
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)
import unet as B  # noqa: E402
from vdm.runtime import keep_freed_memory  # noqa: E402

BASE = "b3b1b07"
keep_freed_memory()
torch.set_num_threads(2)
from torch.utils.cpp_extension import load  # noqa: E402

old_src = tempfile.mkdtemp(prefix="vdm_old_kernels_")
for name in ("common.h", "temporal_attention.cpp", "group_norm_silu.cpp"):
    text = subprocess.run(["git", "-C", ROOT, "show", f"{BASE}:vdm/model/csrc/{name}"],
                          check=True, capture_output=True, text=True).stdout
    with open(os.path.join(old_src, name), "w") as f:
        f.write(text.replace("vdm_cpu", "vdm_old"))
load(name=f"vdm_old_kernels_{BASE}",
     sources=[os.path.join(old_src, n) for n in ("temporal_attention.cpp", "group_norm_silu.cpp")],
     extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
     is_python_module=False)
from vdm.model import cpu_kernels  # noqa: E402
import vdm.model.attention as A  # noqa: E402
import vdm.model.layers as Lyr  # noqa: E402

assert cpu_kernels.available()
old_ops = torch.ops.vdm_old


class OldTemporal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, bias, frames, heads, scale):
        ctx.save_for_backward(qkv, bias)
        ctx.args = frames, heads, scale
        return old_ops.temporal_attention_forward(qkv, bias, frames, heads, scale)

    @staticmethod
    def backward(ctx, grad_out):
        qkv, bias = ctx.saved_tensors
        grad_qkv, grad_bias = old_ops.temporal_attention_backward(
            grad_out.contiguous().to(qkv.dtype), qkv, bias, *ctx.args)
        return grad_qkv, grad_bias, None, None, None


class OldGroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups, eps):
        out, mean, rstd = old_ops.gn_silu_forward(x, weight, bias, scale, shift, groups, eps)
        ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
        ctx.groups = groups
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grads = old_ops.gn_silu_backward(grad_out.contiguous(memory_format=torch.channels_last),
                                         *ctx.saved_tensors, ctx.groups)
        return (*grads, None, None)


def old_attend(q, k, v, mask=None, explicit=None):
    """The fourth stop's attend: a boolean mask through masked_fill on the scaled scores."""
    if explicit is None:
        explicit = q.device.type == "cpu" and k.shape[-2] <= A.CPU_EXPLICIT_MAX_KEYS
    if not explicit:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-1, -2))
    scale = q.shape[-1] ** -0.5
    if mask is None:
        scores = scores.float() * scale
    elif mask.dtype == torch.bool:
        scores = (scores.float() * scale).masked_fill(~mask, torch.finfo(torch.float32).min)
    else:
        scores = torch.add(mask.float(), scores, alpha=scale)
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


NEW = dict(temporal=cpu_kernels._TemporalAttention, gn=cpu_kernels._GroupNormSiLU,
           linear=cpu_kernels.use_linear_attention_kernel, upsample=Lyr.Upsample.forward,
           attend=A.attend)


def use(new: bool):
    """This stop's code (True) or the fourth stop's (False) for the next step."""
    cpu_kernels._TemporalAttention = NEW["temporal"] if new else OldTemporal
    cpu_kernels._GroupNormSiLU = NEW["gn"] if new else OldGroupNormSiLU
    cpu_kernels.use_linear_attention_kernel = NEW["linear"] if new else (lambda *args: False)
    Lyr.Upsample.forward = NEW["upsample"] if new else torch.nn.ConvTranspose2d.forward
    A.attend = NEW["attend"] if new else old_attend


def main():
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    model, inputs = B.build("fixed", torch.device("cpu"))
    for new in (True, False, True, False):  # warm-up
        use(new)
        B.train_step(model, inputs, torch.bfloat16)
    times = {True: [], False: []}
    for i in range(pairs):
        for new in ((True, False) if i % 2 == 0 else (False, True)):
            use(new)
            start = time.perf_counter()
            B.train_step(model, inputs, torch.bfloat16)
            times[new].append(time.perf_counter() - start)
    old, cur = sorted(times[False]), sorted(times[True])
    print("this stop:", [round(t, 3) for t in times[True]])
    print("fourth stop:", [round(t, 3) for t in times[False]])
    print(f"16-frame bf16 step: fourth stop {old[0]:.3f} s -> this stop {cur[0]:.3f} s (min), "
          f"{old[0] / cur[0]:.3f}x; median {old[pairs // 2]:.3f} -> {cur[pairs // 2]:.3f} s")


if __name__ == "__main__":
    main()
