"""The sixth stop's four changes against the fifth stop's code, alternating 16-frame bf16 training
steps of the fixed config in one process (the machine's drift between runs is larger than these
gains): all four together, then each alone.

    .venv/bin/python bench/ab_sixth_stop.py [pairs]      # ~5 min at the default 6 pairs

The changes, each switched off by restoring the fifth stop's path for a step:
- `linear`: the attention projections' weight gradients through a transposed copy of the narrower
  operand (`cpu_kernels.use_linear_kernel`); off, nn.Linear's backward.
- `conv3x3`: the 8x8 level's 3x3 convolutions' weight gradients as one matmul over positions
  (`cpu_kernels.use_conv3x3_kernel`); off, oneDNN's convolution backward.
- `spatial`: the 8x8 level's full spatial attention through `attend`'s explicit CPU path; off,
  SDPA, as the fifth stop's SpatialAttention called it.
- `products`: the linear attention's two products with k's gradient in k's layout
  (`attention._LinearAttentionProducts`); off, the plain matmuls and autograd's backward.
A one-off for the sixth stop's note, kept so its figures can be reproduced.
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from einops import rearrange

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, ROOT)
import unet as B  # noqa: E402
import vdm.model.attention as A  # noqa: E402
from vdm.model import cpu_kernels  # noqa: E402
from vdm.runtime import keep_freed_memory  # noqa: E402

keep_freed_memory()
torch.set_num_threads(2)
assert cpu_kernels.available()
ON = {"linear": True, "conv3x3": True, "spatial": True, "products": True}

use_linear, use_conv3x3 = cpu_kernels.use_linear_kernel, cpu_kernels.use_conv3x3_kernel
cpu_kernels.use_linear_kernel = lambda x, dtype: ON["linear"] and use_linear(x, dtype)
cpu_kernels.use_conv3x3_kernel = lambda x, dtype: ON["conv3x3"] and use_conv3x3(x, dtype)
spatial_forward = A.SpatialAttention.forward


def fifth_stop_spatial_forward(self, x):
    q, k, v = (rearrange(t, "n h w (m d) -> n m (h w) d", m=self.heads)
               for t in self._normed_qkv(x).chunk(3, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v)
    out = rearrange(out, "n m (h w) d -> n h w (m d)", h=x.shape[-2])
    return x + A._from_tokens(self.to_out(out))


A.SpatialAttention.forward = lambda self, x: (spatial_forward if ON["spatial"]
                                              else fifth_stop_spatial_forward)(self, x)


products = A._LinearAttentionProducts.apply


def fifth_stop_products(q, k, v, scale):
    return torch.matmul(q, torch.matmul(k.transpose(-1, -2), v) * scale)


A._LinearAttentionProducts.apply = lambda *args: (products if ON["products"]
                                                  else fifth_stop_products)(*args)


def step_seconds(model, inputs):
    start = time.perf_counter()
    B.train_step(model, inputs, torch.bfloat16)
    return time.perf_counter() - start


def compare(model, inputs, switches, pairs):
    """Alternating steps with `switches` on (this stop) and off (the fifth stop's paths)."""
    times = {True: [], False: []}
    for i in range(pairs + 1):  # the first pair warms both paths up
        for on in ((True, False) if i % 2 else (False, True)):
            ON.update({s: on for s in switches})
            seconds = step_seconds(model, inputs)
            if i:
                times[on].append(seconds)
    ON.update({s: True for s in ON})
    new, old = times[True], times[False]
    print(f"{'+'.join(switches):22} fifth stop min {min(old):.3f} s, median "
          f"{statistics.median(old):.3f}; this stop min {min(new):.3f}, median "
          f"{statistics.median(new):.3f}: {min(old) / min(new):.3f}x by min, "
          f"{statistics.median(old) / statistics.median(new):.3f}x by median", flush=True)


def main():
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    model, inputs = B.build("fixed", torch.device("cpu"))
    print(f"16-frame bf16 step of the fixed config, {pairs} alternating pairs per line; load "
          f"average {os.getloadavg()[0]:.1f}")
    compare(model, inputs, list(ON), pairs)
    for switch in ON:
        compare(model, inputs, [switch], pairs)


if __name__ == "__main__":
    main()
