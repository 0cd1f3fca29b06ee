"""Space-time factored attention for the Unet3D; softmax attention goes through SDPA, except on
CPU: the temporal attention runs a fused kernel (cpu_kernels.py), as do the linear attention's
softmaxes, and attention over few keys runs explicitly (see attend); tests check every path
against SDPA or the plain formula.

All modules take and return the internal layout `(b f) c h w` (channels-last memory) and are
pre-norm residual blocks: `x + attn(norm(x))`. Frames mix only in `TemporalAttention`.
"""

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vdm.model import cpu_kernels
from vdm.model.layers import Linear, sinusoidal_embedding


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """`n c h w -> n h w c`; a view in channels-last memory, so projections need no copy."""
    return rearrange(x, "n c h w -> n h w c")


def _from_tokens(x: torch.Tensor) -> torch.Tensor:
    """`n h w c -> n c h w`; a view that yields a channels-last NCHW tensor."""
    return rearrange(x, "n h w c -> n c h w")


class RelativePositionBias(nn.Module):
    """Learned per-head bias over signed frame distance, T5-style log buckets: `-> (h, f, f)`."""

    def __init__(self, heads: int = 8, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def _bucket(self, rel: torch.Tensor) -> torch.Tensor:
        # Half the buckets per direction; near distances exact, far ones log-spaced, so any frame
        # count works and long clips share the farthest buckets.
        half = self.num_buckets // 2
        ret = (rel > 0).long() * half
        n = rel.abs()
        max_exact = half // 2
        far = max_exact + (
            torch.log(n.float().clamp(min=1) / max_exact)
            / math.log(self.max_distance / max_exact) * (half - max_exact)
        ).long()
        far = far.clamp(max=half - 1)
        return ret + torch.where(n < max_exact, n, far)

    def forward(self, frames: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(frames, device=device)
        rel = rearrange(pos, "j -> 1 j") - rearrange(pos, "i -> i 1")
        return rearrange(self.relative_attention_bias(self._bucket(rel)), "i j h -> h i j")


class _PreNormAttention(nn.Module):
    """Shared pieces: channel LayerNorm (gain only), q/k/v projection, output projection."""

    def __init__(self, dim: int, heads: int, dim_head: int, out_bias: bool = False):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        hidden = heads * dim_head
        self.gamma = nn.Parameter(torch.ones(dim))
        self.to_qkv = Linear(dim, hidden * 3, bias=False)
        self.to_out = Linear(hidden, dim, bias=out_bias)

    def _normed_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x `(n c h w)` -> q, k, v packed as `n h w (3 heads d)`, computed in the channels-last layout."""
        t = _to_tokens(x)
        t = F.layer_norm(t, t.shape[-1:], self.gamma.to(t.dtype), None, 1e-5)
        return self.to_qkv(t)


# On CPU, attention over at most this many keys runs as explicit matmuls and softmax (see attend).
CPU_EXPLICIT_MAX_KEYS = 256


def attend(q, k, v, mask=None, explicit: bool | None = None):
    """softmax(q k^T / sqrt(d) + mask) v over `(..., L, d)` tensors; mask: additive float, or bool
    with True = attend (every query keeps at least one key), broadcastable to `(..., Lq, Lk)`.

    Through SDPA, except on CPU over few keys (`explicit=None`): there the temporal attention (a
    frame-distance bias that needs a gradient, which no fused CPU kernel supports), the
    cross-attention (a dozen text tokens) and the spatial attention of the lowest level (64
    positions at 64x64 input) run as one matmul, one op that scales, adds the mask and goes to
    fp32, an fp32 softmax and one matmul. SDPA's CPU kernels lose on such shapes: in bf16 fwd+bwd
    its unfused fallback made the temporal attention of the 64x64 level 1.7x slower, its flash
    kernel the cross-attention of the 32x32 level 2x slower and the 8x8 spatial attention 5x
    slower (20.6 against 4.0 ms; at 256 keys the two are even). bench/unet.py measures the whole
    model; both paths agree (tests).
    """
    if explicit is None:
        explicit = q.device.type == "cpu" and k.shape[-2] <= CPU_EXPLICIT_MAX_KEYS
    if not explicit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # Scores go to fp32 in the op that scales them and adds the bias: the CPU softmax is 3.5x
    # slower on bf16 rows of 16 than on fp32 ones (fwd+bwd), far more than the casts cost.
    scores = torch.matmul(q, k.transpose(-1, -2))
    scale = q.shape[-1] ** -0.5
    if mask is None:
        scores = scores.float() * scale
    else:
        if mask.dtype == torch.bool:
            # As an additive mask (small: it broadcasts), so that scaling, masking and the cast
            # stay one pass over the scores. The most negative float, not -inf: a query with every
            # key masked gets a uniform average instead of NaN (min + a score rounds to min); with
            # one real key the masked ones still get exactly 0.
            mask = torch.zeros(mask.shape, device=mask.device).masked_fill_(
                ~mask, torch.finfo(torch.float32).min)
        scores = torch.add(mask.float(), scores, alpha=scale)  # bf16 + fp32 -> fp32
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


class TemporalAttention(_PreNormAttention):
    """Attention across frames at each spatial position, with a relative position bias and (with
    `absolute_pos`) each frame's sinusoidal position added to its normalised input, as AnimateDiff's
    motion modules do: relative distances alone cannot tell the first frame from the last.

    `focus_present_mask` (b,) bool: those samples attend only to their own frame, which makes the
    attention output exactly the value of that frame; images and videos can then train jointly.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 32, absolute_pos: bool = True):
        super().__init__(dim, heads, dim_head)
        self.absolute_pos = absolute_pos

    def _normed_qkv(self, x: torch.Tensor, frames: int = 1) -> torch.Tensor:
        t = _to_tokens(x)
        t = F.layer_norm(t, t.shape[-1:], self.gamma.to(t.dtype), None, 1e-5)
        if self.absolute_pos:
            pos = sinusoidal_embedding(torch.arange(frames, device=t.device), t.shape[-1])
            t = t + repeat(pos.to(t.dtype), "f c -> (b f) 1 1 c", b=t.shape[0] // frames)
        return self.to_qkv(t)

    def forward(self, x, frames: int, pos_bias=None, focus_present_mask=None):
        b = x.shape[0] // frames
        if frames == 1 or (focus_present_mask is not None and bool(focus_present_mask.all())):
            # Softmax over a single key is 1, so the output is the value: no attention and no
            # permutes (the common case for image batches). to_qkv is called whole, not sliced,
            # so ZeRO 3 gathers its weight through the usual module hooks.
            v = self._normed_qkv(x, frames).chunk(3, dim=-1)[2]
            return x + _from_tokens(self.to_out(v))
        qkv = self._normed_qkv(x, frames)  # (b f) h w (3 heads d), in the channels-last layout
        if cpu_kernels.use_temporal_kernel(qkv, self.dim_head):
            # Fused CPU kernel: reads q, k, v from qkv as they are, writes (b f) h w (heads d).
            out = cpu_kernels.temporal_attention(qkv, pos_bias, frames, self.heads)
            if focus_present_mask is not None and bool(focus_present_mask.any()):
                keep = rearrange(focus_present_mask.repeat_interleave(frames), "n -> n 1 1 1")
                out = torch.where(keep, qkv[..., 2 * out.shape[-1]:], out)
            return x + _from_tokens(self.to_out(out))
        # PyTorch path: one copy makes each (position, head) a contiguous (frames x d) matrix for
        # q, k and v at once.
        qkv = rearrange(qkv, "(b f) h w (k m d) -> k (b h w) m f d", f=frames, k=3, m=self.heads)
        q, k, v = qkv.contiguous()
        out = attend(q, k, v, None if pos_bias is None else pos_bias.to(q.dtype))
        if focus_present_mask is not None and bool(focus_present_mask.any()):
            keep = rearrange(focus_present_mask, "b -> b 1 1 1 1")
            out = rearrange(out, "(b s) m f d -> b s m f d", b=b)
            out = torch.where(keep, rearrange(v, "(b s) m f d -> b s m f d", b=b), out)
            out = rearrange(out, "b s m f d -> (b s) m f d")
        out = rearrange(out, "(b h w) m f d -> (b f) h w (m d)", b=b, h=x.shape[-2]).contiguous()
        return x + _from_tokens(self.to_out(out))


class SpatialAttention(_PreNormAttention):
    """Full softmax attention among the positions of each frame (used at the lowest resolution)."""

    def forward(self, x):
        q, k, v = (rearrange(t, "n h w (m d) -> n m (h w) d", m=self.heads)
                   for t in self._normed_qkv(x).chunk(3, dim=-1))
        out = attend(q, k, v)
        out = rearrange(out, "n m (h w) d -> n h w (m d)", h=x.shape[-2])
        return x + _from_tokens(self.to_out(out))


class SpatialLinearAttention(_PreNormAttention):
    """Linear (softmax-kernel) attention within each frame: cost linear in h*w.

    The reference's `use_sparse_linear_attn` block. It has no attention matrix, so it is the one
    attention not expressed through SDPA.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 32):
        super().__init__(dim, heads, dim_head, out_bias=True)

    def forward(self, x):
        # q, k and v as (n, heads, positions, d): both products below then run as batched matmuls
        # on them (k transposed as a view), with no further permutes.
        qkv = self._normed_qkv(x)
        if cpu_kernels.use_linear_attention_kernel(qkv, self.dim_head):
            # Fused CPU kernel: the layout copy and both softmaxes in one pass each way; then both
            # products with k's gradient computed in k's layout.
            q, k, v = cpu_kernels.linear_attention_softmax(qkv, self.heads)
            out = _LinearAttentionProducts.apply(q, k, v, self.dim_head ** -0.5)
        else:
            qkv = rearrange(qkv, "n h w (k m d) -> k n m (h w) d", k=3, m=self.heads)
            q, k, v = qkv.contiguous()  # one copy for all three
            # The softmax kernels accumulate in fp32 for bf16/fp16 inputs (CPU and CUDA), so the
            # sum over thousands of positions is exact enough without materialising fp32 copies.
            q = q.softmax(dim=-1)
            k = k.softmax(dim=-2)
            # The 1/sqrt(d) scale goes on the small (d x d) context rather than on q.
            context = torch.matmul(k.transpose(-1, -2), v) * self.dim_head ** -0.5
            out = torch.matmul(q, context)
        out = rearrange(out, "n m (h w) e -> n h w (m e)", h=x.shape[-2])
        return x + _from_tokens(self.to_out(out))


class _LinearAttentionProducts(torch.autograd.Function):
    """q (k^T v * scale) over `(n, heads, positions, d)` tensors, with k's gradient computed in k's
    layout, v (dcontext)^T, rather than as autograd's (dcontext v^T)^T: that transposed product
    and the copy that made it contiguous took 18.6 ms at the 64x64 level (bf16, CPU), this 5 ms."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        context = torch.matmul(k.transpose(-1, -2), v) * scale
        ctx.save_for_backward(q, k, v, context)
        ctx.scale = scale
        return torch.matmul(q, context)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, context = ctx.saved_tensors
        grad_out = grad_out.to(q.dtype)
        grad_q = torch.matmul(grad_out, context.transpose(-1, -2))
        grad_context = torch.matmul(q.transpose(-1, -2), grad_out) * ctx.scale
        grad_k = torch.matmul(v, grad_context.transpose(-1, -2))
        grad_v = torch.matmul(k, grad_context)
        return grad_q, grad_k, grad_v, None


class CrossAttention(nn.Module):
    """Video features (all frames and positions of a sample) attend to that sample's text tokens.

    context: `(b, L, context_dim)`; context_mask: `(b, L)` bool, True = real token. Padding keys
    are excluded through SDPA's boolean mask, so their values cannot reach the output.
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 8, dim_head: int = 32):
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.gamma = nn.Parameter(torch.ones(dim))
        self.to_q = Linear(dim, hidden, bias=False)
        self.to_kv = nn.Linear(context_dim, hidden * 2, bias=False)
        self.to_out = Linear(hidden, dim, bias=False)

    def forward(self, x, frames: int, context, context_mask=None):
        t = _to_tokens(x)
        t = F.layer_norm(t, t.shape[-1:], self.gamma.to(t.dtype), None, 1e-5)
        q = rearrange(self.to_q(t), "(b f) h w (m d) -> b m (f h w) d", f=frames, m=self.heads)
        k, v = (rearrange(c, "b l (m d) -> b m l d", m=self.heads)
                for c in self.to_kv(context.to(q.dtype)).chunk(2, dim=-1))
        mask = None if context_mask is None else rearrange(context_mask, "b l -> b 1 1 l")
        out = attend(q, k, v, mask)
        out = rearrange(out, "b m (f h w) d -> (b f) h w (m d)", f=frames, h=x.shape[-2])
        return x + _from_tokens(self.to_out(out))
