// Fused temporal attention for CPUs: at each spatial position and head,
//   out = softmax(q k^T * scale + bias) v   over the frames,
// forward and backward, for the Unet3D's TemporalAttention (see vdm/model/cpu_kernels.py).
//
// Why by hand: each (position, head) is a frames x dim_head problem (16 x 32 in the paper's
// setting) and there are b*h*w*heads of them. In eager PyTorch that takes a layout copy of q, k, v
// (3 x heads x dim_head channels per position), batched matmuls of 16 x 16 matrices running at a
// few percent of the matmul peak, and an fp32 softmax over rows of 16, forward and backward. The
// CPU flash kernel of SDPA has no gradient for the bias and its backward is far slower on these
// shapes. Here each problem is read straight from the q/k/v projection's output, computed in
// small per-thread buffers in fp32 (fp64 for fp64 inputs), and written straight into the layout
// the output projection reads; the bias gradient is summed per thread.
//
// Layouts (all contiguous): qkv (b, f, n, 3, m, d); out and grad_out (b, f, n, m, d);
// bias (m, f, f) in the accumulation dtype. n = positions per frame, m = heads, d = dim_head.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using namespace vdm_kernels;

struct Shape {
  int64_t batch, frames, positions, heads, dim_head;
  int64_t tasks() const { return batch * positions * heads; }
  // Offsets of frame 0 of task t = ((b * n) + p) * m + h in qkv (for q; k and v follow at
  // +m*d and +2*m*d) and in out, and the stride between frames in each.
  int64_t qkv_frame_stride() const { return positions * 3 * heads * dim_head; }
  int64_t out_frame_stride() const { return positions * heads * dim_head; }
  int64_t qkv_offset(int64_t t) const {
    const int64_t h = t % heads, bp = t / heads, p = bp % positions, b = bp / positions;
    return ((b * frames) * positions + p) * 3 * heads * dim_head + h * dim_head;
  }
  int64_t out_offset(int64_t t) const {
    const int64_t h = t % heads, bp = t / heads, p = bp % positions, b = bp / positions;
    return ((b * frames) * positions + p) * heads * dim_head + h * dim_head;
  }
};

// Each task's q, k, v, grad_out rows are loaded as (f x D) in the accumulation dtype; q and
// grad_out are also kept transposed, (D x fp) with the frames padded with zeros to a multiple of
// the vector width. Every product below then accumulates 64-byte vectors held in registers (D is
// a compile-time dim_head, the frame count is free).
template <int D, typename scalar_t, typename acc_t>
inline void load_rows(const scalar_t* src, int64_t stride, int64_t f, acc_t* dst) {
  for (int64_t i = 0; i < f; ++i)
    to_buffer(src + i * stride, D, dst + i * D);
}

template <int D, typename scalar_t, typename acc_t>
inline void store_rows(const acc_t* src, int64_t f, scalar_t* dst, int64_t stride) {
  for (int64_t i = 0; i < f; ++i)
    from_buffer(src + i * D, D, dst + i * stride);
}

// dst (L x L block, row stride dst_stride) = src block (row stride src_stride) transposed, L the
// vector lanes. With GCC: in registers, by log2(L) rounds of two-vector shuffles that swap the
// off-diagonal sub-blocks of size s (row i takes row i+s's elements where bit s of the column is
// set, and row i+s the reverse), which compile to one permute instruction each.
template <typename acc_t>
inline void transpose_block(const acc_t* src, int64_t src_stride, acc_t* dst, int64_t dst_stride) {
  using S = Simd<acc_t>;
  constexpr int L = S::kLanes;
#if defined(__GNUC__) && !defined(__clang__)
  using Int = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  typedef Int Idx __attribute__((vector_size(64)));
  typename S::V r[L];
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) r[i] = S::load(src + i * src_stride);
#pragma GCC unroll 4
  for (int s = 1; s < L; s *= 2) {
    Idx lo, hi;
#pragma GCC unroll 16
    for (int j = 0; j < L; ++j) {
      lo[j] = (j & s) ? L + j - s : j;
      hi[j] = (j & s) ? L + j : j + s;
    }
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) {
      if (i & s) continue;
      const typename S::V x = r[i], y = r[i + s];
      r[i] = __builtin_shuffle(x, y, lo);
      r[i + s] = __builtin_shuffle(x, y, hi);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) S::store(dst + i * dst_stride, r[i]);
#else
  for (int i = 0; i < L; ++i)
    for (int j = 0; j < L; ++j) dst[j * dst_stride + i] = src[i * src_stride + j];
#endif
}

// dst (D x fp) = src (fp x D, rows f.. zero) transposed, block by block.
template <int D, typename acc_t>
inline void transpose(const acc_t* src, int64_t fp, acc_t* dst) {
  constexpr int L = Simd<acc_t>::kLanes;
  for (int64_t i = 0; i < fp; i += L)
    for (int e = 0; e < D; e += L) transpose_block(src + i * D + e, D, dst + e * fp + i, fp);
}

// out (R rows of stride fp) = a (R x D) . bt (D x fp), one vector of columns at a time. R rows at
// once give R independent accumulators, so the FMAs are not serialised on one register's latency.
template <int D, int R, typename acc_t>
inline void dots_block(const acc_t* a, const acc_t* bt, int64_t fp, acc_t* out) {
  using S = Simd<acc_t>;
  for (int64_t jb = 0; jb < fp; jb += S::kLanes) {
    typename S::V acc[R] = {};
#pragma GCC unroll 4
    for (int e = 0; e < D; ++e) {
      const typename S::V b = S::load(bt + e * fp + jb);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r] += a[r * D + e] * b;
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) S::store(out + r * fp + jb, acc[r]);
  }
}

// out (f x fp, row stride fp) = a (f x D) . bt (D x fp).
template <int D, typename acc_t>
inline void dots(const acc_t* a, const acc_t* bt, int64_t f, int64_t fp, acc_t* out) {
  int64_t i = 0;
  for (; i + 8 <= f; i += 8) dots_block<D, 8>(a + i * D, bt, fp, out + i * fp);
  for (; i + 4 <= f; i += 4) dots_block<D, 4>(a + i * D, bt, fp, out + i * fp);
  for (; i < f; ++i) dots_block<D, 1>(a + i * D, bt, fp, out + i * fp);
}

// Rows r0 .. r0+R of out (D wide) = alpha * sum_c w[r * rs + c * cs] * m row c, for c < f.
template <int D, int R, typename acc_t>
inline void combine_block(const acc_t* w, int64_t rs, int64_t cs, const acc_t* m, int64_t f,
                          acc_t alpha, acc_t* out) {
  using S = Simd<acc_t>;
  constexpr int kVecs = D / S::kLanes;  // D is a multiple of the lanes (checked at dispatch)
  typename S::V acc[R][kVecs] = {};
  for (int64_t c = 0; c < f; ++c) {
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) {
      const typename S::V x = S::load(m + c * D + v * S::kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][v] += w[r * rs + c * cs] * x;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kVecs; ++v) S::store(out + r * D + v * S::kLanes, acc[r][v] * alpha);
}

// out row r (D wide) = alpha * sum_c w[r * rs + c * cs] * m row c, for r, c < f: a few rows at a
// time, as many as keep the accumulators in registers.
template <int D, typename acc_t>
inline void combine(const acc_t* w, int64_t rs, int64_t cs, const acc_t* m, int64_t f,
                    acc_t alpha, acc_t* out) {
  constexpr int kVecs = D / Simd<acc_t>::kLanes;
  constexpr int R = kVecs >= 8 ? 1 : (kVecs >= 4 ? 2 : 4);
  int64_t r = 0;
  for (; r + R <= f; r += R) combine_block<D, R>(w + r * rs, rs, cs, m, f, alpha, out + r * D);
  for (; r < f; ++r) combine_block<D, 1>(w + r * rs, rs, cs, m, f, alpha, out + r * D);
}

// Scores are kept transposed, st (f rows = keys j, fp lanes = queries i), so the softmax over the
// keys of every query is vertical vector arithmetic: no horizontal max or sum.
// st <- softmax over keys of (st * scale + bias_t), bias_t (f x fp) the head's bias transposed.
// Padding lanes (queries f..fp) compute harmless values that are never read.
template <typename acc_t>
inline void softmax_keys(acc_t* st, const acc_t* bias_t, acc_t scale, int64_t f, int64_t fp) {
  using S = Simd<acc_t>;
  using V = typename S::V;
  for (int64_t ib = 0; ib < fp; ib += S::kLanes) {
    V mx = S::load(st + ib) * scale + S::load(bias_t + ib);
    for (int64_t j = 0; j < f; ++j) {
      const V x = S::load(st + j * fp + ib) * scale + S::load(bias_t + j * fp + ib);
      S::store(st + j * fp + ib, x);
      mx = x > mx ? x : mx;
    }
    V sum = {};
    for (int64_t j = 0; j < f; ++j) {
      const V e = exp_clamped(S::load(st + j * fp + ib) - mx);
      S::store(st + j * fp + ib, e);
      sum += e;
    }
    const V inv = acc_t(1) / sum;
    for (int64_t j = 0; j < f; ++j) S::store(st + j * fp + ib, S::load(st + j * fp + ib) * inv);
  }
}

// Loads task t's q, k, v rows and q's transpose, and sets pt to its probabilities, transposed:
// the forward's start, and the backward's recomputation.
template <int D, typename scalar_t, typename acc_t>
inline void probabilities(const scalar_t* qkv, const Shape& s, int64_t t, int64_t fp,
                          const acc_t* bias_t, acc_t scale, acc_t* q, acc_t* k, acc_t* v,
                          acc_t* qt, acc_t* pt) {
  const int64_t f = s.frames, md = s.heads * D;
  const scalar_t* src = qkv + s.qkv_offset(t);
  load_rows<D>(src, s.qkv_frame_stride(), f, q);
  load_rows<D>(src + md, s.qkv_frame_stride(), f, k);
  load_rows<D>(src + 2 * md, s.qkv_frame_stride(), f, v);
  transpose<D>(q, fp, qt);
  dots<D>(k, qt, f, fp, pt);  // pt[j][i] = k_j . q_i
  softmax_keys(pt, bias_t + (t % s.heads) * f * fp, scale, f, fp);
}

template <int D, typename scalar_t>
void forward_kernel(const scalar_t* qkv, const at::opmath_type<scalar_t>* bias_t, scalar_t* out,
                    const Shape& s, double scale_) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t f = s.frames, fp = padded(f, Simd<acc_t>::kLanes);
  const acc_t scale = static_cast<acc_t>(scale_);
  at::parallel_for(0, s.tasks(), 64, [&](int64_t begin, int64_t end) {
    // q has fp rows; the padding rows stay zero, as do the padding columns of its transpose.
    std::vector<acc_t> buf(3 * f * D + fp * D + D * fp + f * fp, acc_t(0));
    acc_t *k = buf.data(), *v = k + f * D, *o = v + f * D, *q = o + f * D, *qt = q + fp * D,
          *pt = qt + D * fp;
    for (int64_t t = begin; t < end; ++t) {
      probabilities<D>(qkv, s, t, fp, bias_t, scale, q, k, v, qt, pt);
      combine<D>(pt, 1, fp, v, f, acc_t(1), o);  // o_i = sum_j p_ij v_j
      store_rows<D>(o, f, out + s.out_offset(t), s.out_frame_stride());
    }
  });
}

template <int D, typename scalar_t>
void backward_kernel(const scalar_t* grad_out, const scalar_t* qkv,
                     const at::opmath_type<scalar_t>* bias_t, scalar_t* grad_qkv,
                     at::opmath_type<scalar_t>* grad_bias_t_partial, const Shape& s,
                     double scale_) {
  using acc_t = at::opmath_type<scalar_t>;
  using S = Simd<acc_t>;
  using V = typename S::V;
  const int64_t f = s.frames, fp = padded(f, S::kLanes), md = s.heads * D, ff = f * f;
  const acc_t scale = static_cast<acc_t>(scale_);
  at::parallel_for(0, s.tasks(), 64, [&](int64_t begin, int64_t end) {
    // Each thread sums its (transposed) bias gradient into its own slice; the caller adds them.
    acc_t* gbias_t = grad_bias_t_partial + at::get_thread_num() * s.heads * ff;
    // q and grad_out have fp rows whose padding stays zero (see forward_kernel).
    std::vector<acc_t> buf(5 * f * D + 2 * fp * D + 2 * D * fp + 2 * f * fp, acc_t(0));
    acc_t *k = buf.data(), *v = k + f * D, *gq = v + f * D, *gk = gq + f * D, *gv = gk + f * D,
          *q = gv + f * D, *go = q + fp * D, *qt = go + fp * D, *got = qt + D * fp,
          *pt = got + D * fp, *gst = pt + f * fp;
    for (int64_t t = begin; t < end; ++t) {
      probabilities<D>(qkv, s, t, fp, bias_t, scale, q, k, v, qt, pt);  // recomputed
      load_rows<D>(grad_out + s.out_offset(t), s.out_frame_stride(), f, go);
      transpose<D>(go, fp, got);
      dots<D>(v, got, f, fp, gst);  // d(loss)/d(p_ij), transposed: v_j . go_i
      // Through the softmax: ds_ij = p_ij (dp_ij - sum_j' p_ij' dp_ij'), per query lane; the
      // bias takes ds as it is.
      acc_t* gb = gbias_t + (t % s.heads) * ff;
      for (int64_t ib = 0; ib < fp; ib += S::kLanes) {
        V dot = {};
        for (int64_t j = 0; j < f; ++j) dot += S::load(pt + j * fp + ib) * S::load(gst + j * fp + ib);
        for (int64_t j = 0; j < f; ++j)
          S::store(gst + j * fp + ib,
                   S::load(pt + j * fp + ib) * (S::load(gst + j * fp + ib) - dot));
      }
      for (int64_t j = 0; j < f; ++j)
        for (int64_t i = 0; i < f; ++i) gb[j * f + i] += gst[j * fp + i];
      combine<D>(gst, 1, fp, k, f, scale, gq);  // gq_i = scale sum_j ds_ij k_j
      combine<D>(gst, fp, 1, q, f, scale, gk);  // gk_j = scale sum_i ds_ij q_i
      combine<D>(pt, fp, 1, go, f, acc_t(1), gv);  // gv_j = sum_i p_ij go_i
      scalar_t* dst = grad_qkv + s.qkv_offset(t);
      store_rows<D>(gq, f, dst, s.qkv_frame_stride());
      store_rows<D>(gk, f, dst + md, s.qkv_frame_stride());
      store_rows<D>(gv, f, dst + 2 * md, s.qkv_frame_stride());
    }
  });
}

// Calls fn with dim_head as a compile-time constant.
template <typename Fn>
void with_dim_head(int64_t d, Fn&& fn) {
  switch (d) {
    // (multiples of 16, so of the vector lanes of fp32 and fp64)
    case 16: return fn(std::integral_constant<int, 16>{});
    case 32: return fn(std::integral_constant<int, 32>{});
    case 64: return fn(std::integral_constant<int, 64>{});
    case 128: return fn(std::integral_constant<int, 128>{});
    default: TORCH_CHECK(false, "temporal attention kernel: dim_head must be 16, 32, 64 or 128, got ", d);
  }
}

Shape check(const at::Tensor& qkv, const at::Tensor& bias, int64_t frames, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.is_contiguous(), "qkv must be a contiguous CPU tensor");
  TORCH_CHECK(frames > 0 && heads > 0, "frames and heads must be positive");
  TORCH_CHECK(qkv.dim() >= 2 && qkv.size(0) % frames == 0,
              "qkv's first dim must be batch * frames");
  const int64_t width = qkv.size(-1);
  TORCH_CHECK(width % (3 * heads) == 0, "qkv's last dim must be 3 * heads * dim_head");
  Shape s{qkv.size(0) / frames, frames, qkv.numel() / (qkv.size(0) * width), heads,
          width / (3 * heads)};
  TORCH_CHECK(bias.is_contiguous() && bias.sizes() == at::IntArrayRef({heads, frames, frames}) &&
                  bias.scalar_type() == at::toOpMathType(qkv.scalar_type()),
              "bias must be a contiguous (heads, frames, frames) tensor in the accumulation dtype");
  return s;
}

// (heads, f, f) -> each head's bias transposed, (heads, f keys, fp query lanes), zero padded.
at::Tensor transposed_bias(const at::Tensor& bias, int64_t lanes) {
  const int64_t f = bias.size(-1);
  at::Tensor out = at::zeros({bias.size(0), f, padded(f, lanes)}, bias.options());
  out.narrow(2, 0, f).copy_(bias.transpose(1, 2));
  return out;
}

int64_t lanes(const at::Tensor& qkv) {
  return qkv.scalar_type() == at::kDouble ? Simd<double>::kLanes : Simd<float>::kLanes;
}

at::Tensor temporal_attention_forward(const at::Tensor& qkv, const at::Tensor& bias,
                                      int64_t frames, int64_t heads, double scale) {
  const Shape s = check(qkv, bias, frames, heads);
  const at::Tensor bias_t = transposed_bias(bias, lanes(qkv));
  auto sizes = qkv.sizes().vec();
  sizes.back() = s.heads * s.dim_head;
  at::Tensor out = at::empty(sizes, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "temporal_attn", [&] {
    with_dim_head(s.dim_head, [&](auto d) {
      forward_kernel<decltype(d)::value, scalar_t>(
          qkv.data_ptr<scalar_t>(), bias_t.data_ptr<at::opmath_type<scalar_t>>(),
          out.data_ptr<scalar_t>(), s, scale);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> temporal_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& bias, int64_t frames,
    int64_t heads, double scale) {
  const Shape s = check(qkv, bias, frames, heads);
  const at::Tensor bias_t = transposed_bias(bias, lanes(qkv));
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.scalar_type() == qkv.scalar_type() &&
                  grad_out.numel() * 3 == qkv.numel(),
              "grad_out must be contiguous, in qkv's dtype, with a third of its elements");
  at::Tensor grad_qkv = at::empty_like(qkv);
  at::Tensor partial = at::zeros({at::get_num_threads(), heads, frames, frames}, bias.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "temporal_attn_bwd", [&] {
    with_dim_head(s.dim_head, [&](auto d) {
      backward_kernel<decltype(d)::value, scalar_t>(
          grad_out.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(),
          bias_t.data_ptr<at::opmath_type<scalar_t>>(), grad_qkv.data_ptr<scalar_t>(),
          partial.data_ptr<at::opmath_type<scalar_t>>(), s, scale);
    });
  });
  return {grad_qkv, partial.sum(0).transpose(1, 2).contiguous()};
}

}  // namespace

TORCH_LIBRARY(vdm_cpu, m) {
  m.def("temporal_attention_forward(Tensor qkv, Tensor bias, int frames, int heads, float scale) -> Tensor");
  m.def("temporal_attention_backward(Tensor grad_out, Tensor qkv, Tensor bias, int frames, int heads, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vdm_cpu, CPU, m) {
  m.impl("temporal_attention_forward", &temporal_attention_forward);
  m.impl("temporal_attention_backward", &temporal_attention_backward);
}
