// The layout and softmax step of the spatial linear attention for CPUs, forward and backward (see
// vdm/model/cpu_kernels.py): from the packed projection qkv (n, positions, 3 * heads * d) it makes
//   q = softmax over d of the q part, k = softmax over positions of the k part, v = the v part,
// each (n, heads, positions, d) contiguous, the layout the two batched matmuls of the linear
// attention read without copies.
//
// Why by hand: eager PyTorch runs this as a layout copy of all of qkv, a softmax over rows of 32
// and a strided softmax over 4,096 positions, and in the backward two softmax backwards, a stack
// of the three gradients and a layout copy back: on the 64x64 level (qkv 200 MB in bf16), more time
// than the module's matmuls. Here the forward reads qkv twice (the second read, of k only, is
// mostly in cache) and writes q, k, v once; the backward reads the three gradients and the saved
// softmaxes and writes the packed gradient once. All math in fp32 (fp64 for fp64 inputs).
//
// The matmuls stay with the BLAS: a fused kernel that did them too ran at 0.47-0.71x of eager.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

using namespace vdm_kernels;

// Rows are converted to fp32 buffers and processed in whole vectors; d is a multiple of the
// vector width (cpu_kernels.py checks), so each head's slice of a row is whole vectors.
template <typename acc_t>
using V = typename Simd<acc_t>::V;

template <typename Vec>
inline Vec vmax(Vec a, Vec b) {
  return a > b ? a : b;
}

template <typename acc_t>
inline acc_t hmax(V<acc_t> v) {
  acc_t m = v[0];
  for (int j = 1; j < Simd<acc_t>::kLanes; ++j) m = std::max(m, static_cast<acc_t>(v[j]));
  return m;
}

template <typename acc_t>
inline acc_t hsum(V<acc_t> v) {
  acc_t t = 0;
  for (int j = 0; j < Simd<acc_t>::kLanes; ++j) t += v[j];
  return t;
}

// Positions per block in the forward's first pass: the block's q and k, converted once, stay in a
// small buffer (kBlock x 2 x heads x d) for q's softmax and k's maximum and sum.
constexpr int64_t kBlock = 32;

template <typename scalar_t>
void forward_kernel(const scalar_t* qkv, scalar_t* q, scalar_t* k, scalar_t* v, int64_t n,
                    int64_t positions, int64_t heads, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  using S = Simd<acc_t>;
  constexpr int64_t L = S::kLanes;
  const int64_t hd = heads * d;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(hd), kmax(hd), ksum(hd), bmax(hd), block(kBlock * 2 * hd);
    for (int64_t s = begin; s < end; ++s) {
      const scalar_t* src = qkv + s * positions * 3 * hd;
      const int64_t out0 = s * heads * positions * d;  // (s, head 0, position 0, 0) in q, k, v
      auto at = [&](int64_t head, int64_t p) { return out0 + (head * positions + p) * d; };
      std::fill(kmax.begin(), kmax.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(ksum.begin(), ksum.end(), acc_t(0));
      // Pass 1, a block of positions at a time: the block's q and k parts are converted once
      // into a small buffer; q's softmax per head and v's copy, row by row; then k's maximum and
      // sum of exponentials over the block, merged into the running ones (sum *= exp(old max -
      // new max)).
      for (int64_t p0 = 0; p0 < positions; p0 += kBlock) {
        const int64_t rows = std::min(positions - p0, kBlock);
        for (int64_t p = 0; p < rows; ++p)
          to_buffer(src + (p0 + p) * 3 * hd, 2 * hd, block.data() + p * 2 * hd);
        for (int64_t p = 0; p < rows; ++p) {
          const scalar_t* v_src = src + (p0 + p) * 3 * hd + 2 * hd;
          for (int64_t head = 0; head < heads; ++head) {
            acc_t* qh = block.data() + p * 2 * hd + head * d;
            V<acc_t> mx = S::load(qh);
            for (int64_t j = L; j < d; j += L) mx = vmax(mx, S::load(qh + j));
            const acc_t m = hmax<acc_t>(mx);
            V<acc_t> sum{};
            for (int64_t j = 0; j < d; j += L) {
              const V<acc_t> e = exp_clamped(S::load(qh + j) - m);
              S::store(qh + j, e);
              sum += e;
            }
            const acc_t inv = acc_t(1) / hsum<acc_t>(sum);
            for (int64_t j = 0; j < d; j += L) S::store(qh + j, S::load(qh + j) * inv);
            from_buffer(qh, d, q + at(head, p0 + p));
            std::copy(v_src + head * d, v_src + (head + 1) * d, v + at(head, p0 + p));
          }
        }
        auto k_row = [&](int64_t p) { return block.data() + p * 2 * hd + hd; };
        std::copy(kmax.begin(), kmax.end(), bmax.begin());
        for (int64_t p = 0; p < rows; ++p)
          for (int64_t i = 0; i < hd; i += L)
            S::store(bmax.data() + i, vmax(S::load(bmax.data() + i), S::load(k_row(p) + i)));
        for (int64_t i = 0; i < hd; i += L)  // the old sum, rescaled to the new running max
          S::store(ksum.data() + i, S::load(ksum.data() + i) * exp_clamped(S::load(kmax.data() + i) -
                                                                           S::load(bmax.data() + i)));
        std::copy(bmax.begin(), bmax.end(), kmax.begin());
        for (int64_t p = 0; p < rows; ++p)
          for (int64_t i = 0; i < hd; i += L)
            S::store(ksum.data() + i, S::load(ksum.data() + i) +
                                          exp_clamped(S::load(k_row(p) + i) - S::load(kmax.data() + i)));
      }
      // Pass 2: k's softmax.
      for (int64_t i = 0; i < hd; ++i) ksum[i] = acc_t(1) / ksum[i];
      for (int64_t p = 0; p < positions; ++p) {
        to_buffer(src + p * 3 * hd + hd, hd, row.data());
        for (int64_t i = 0; i < hd; i += L)
          S::store(row.data() + i, exp_clamped(S::load(row.data() + i) - S::load(kmax.data() + i)) *
                                       S::load(ksum.data() + i));
        for (int64_t head = 0; head < heads; ++head)
          from_buffer(row.data() + head * d, d, k + at(head, p));
      }
    }
  });
}

// Softmax backward, dx = y (dy - sum(dy y)), the sum over d for q and over positions for k.
template <typename scalar_t>
void backward_kernel(const scalar_t* dq, const scalar_t* dk, const scalar_t* dv, const scalar_t* q,
                     const scalar_t* k, scalar_t* dqkv, int64_t n, int64_t positions,
                     int64_t heads, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  using S = Simd<acc_t>;
  constexpr int64_t L = S::kLanes;
  const int64_t hd = heads * d;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> kdot(hd), g(d), y(d), out(2 * hd);
    for (int64_t s = begin; s < end; ++s) {
      const int64_t in0 = s * heads * positions * d;
      auto at = [&](int64_t head, int64_t p) { return in0 + (head * positions + p) * d; };
      // sum over positions of dk * k, per (head, j); each head's rows are contiguous.
      for (int64_t head = 0; head < heads; ++head) {
        std::vector<V<acc_t>> t(d / L, V<acc_t>{});
        for (int64_t p = 0; p < positions; ++p) {
          to_buffer(dk + at(head, p), d, g.data());
          to_buffer(k + at(head, p), d, y.data());
          for (int64_t j = 0; j < d; j += L) t[j / L] += S::load(g.data() + j) * S::load(y.data() + j);
        }
        for (int64_t j = 0; j < d; j += L) S::store(kdot.data() + head * d + j, t[j / L]);
      }
      for (int64_t p = 0; p < positions; ++p) {
        scalar_t* dst = dqkv + (s * positions + p) * 3 * hd;
        for (int64_t head = 0; head < heads; ++head) {
          acc_t* oq = out.data() + head * d;
          to_buffer(dq + at(head, p), d, g.data());
          to_buffer(q + at(head, p), d, y.data());
          V<acc_t> dot{};
          for (int64_t j = 0; j < d; j += L) dot += S::load(g.data() + j) * S::load(y.data() + j);
          const acc_t t = hsum<acc_t>(dot);
          for (int64_t j = 0; j < d; j += L)
            S::store(oq + j, S::load(y.data() + j) * (S::load(g.data() + j) - t));
          acc_t* ok = out.data() + hd + head * d;
          to_buffer(dk + at(head, p), d, g.data());
          to_buffer(k + at(head, p), d, y.data());
          for (int64_t j = 0; j < d; j += L)
            S::store(ok + j, S::load(y.data() + j) *
                                 (S::load(g.data() + j) - S::load(kdot.data() + head * d + j)));
          std::copy(dv + at(head, p), dv + at(head, p) + d, dst + 2 * hd + head * d);
        }
        from_buffer(out.data(), 2 * hd, dst);
      }
    }
  });
}

void check_qkv(const at::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() >= 3 && qkv.is_contiguous(),
              "qkv must be a contiguous (n, ..., 3 * heads * d) CPU tensor");
  TORCH_CHECK(heads > 0 && qkv.size(-1) % (3 * heads) == 0,
              "qkv's last dimension must be 3 * heads * d");
  TORCH_CHECK(qkv.size(-1) / (3 * heads) % 16 == 0, "d must be a multiple of 16");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_attention_softmax_forward(
    const at::Tensor& qkv, int64_t heads) {
  check_qkv(qkv, heads);
  const int64_t n = qkv.size(0), d = qkv.size(-1) / (3 * heads);
  const int64_t positions = qkv.numel() / (n * 3 * heads * d);
  at::Tensor q = at::empty({n, heads, positions, d}, qkv.options());
  at::Tensor k = at::empty_like(q), v = at::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "la_softmax", [&] {
    forward_kernel<scalar_t>(qkv.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                             k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), n, positions, heads,
                             d);
  });
  return {q, k, v};
}

// -> the gradient of qkv, as (n, positions, 3 * heads * d).
at::Tensor linear_attention_softmax_backward(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                             const at::Tensor& grad_v, const at::Tensor& q,
                                             const at::Tensor& k) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.device().is_cpu(),
              "q must be a contiguous (n, heads, positions, d) CPU tensor");
  const int64_t n = q.size(0), heads = q.size(1), positions = q.size(2), d = q.size(3);
  TORCH_CHECK(d % 16 == 0, "d must be a multiple of 16");
  for (const at::Tensor* t : {&grad_q, &grad_k, &grad_v, &k})
    TORCH_CHECK(t->sizes() == q.sizes() && t->is_contiguous() &&
                    t->scalar_type() == q.scalar_type() && t->device().is_cpu(),
                "the gradients and k must be contiguous CPU tensors of q's shape and dtype");
  at::Tensor grad_qkv = at::empty({n, positions, 3 * heads * d}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "la_softmax_bwd", [&] {
    backward_kernel<scalar_t>(grad_q.data_ptr<scalar_t>(), grad_k.data_ptr<scalar_t>(),
                              grad_v.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                              k.data_ptr<scalar_t>(), grad_qkv.data_ptr<scalar_t>(), n, positions,
                              heads, d);
  });
  return grad_qkv;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vdm_cpu, m) {
  m.def("linear_attention_softmax_forward(Tensor qkv, int heads) -> (Tensor, Tensor, Tensor)");
  m.def("linear_attention_softmax_backward(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor q, Tensor k) -> Tensor");
}

TORCH_LIBRARY_IMPL(vdm_cpu, CPU, m) {
  m.impl("linear_attention_softmax_forward", &linear_attention_softmax_forward);
  m.impl("linear_attention_softmax_backward", &linear_attention_softmax_backward);
}
