// Fused GroupNorm -> per-sample scale and shift -> SiLU for CPUs, forward and backward: the tail of
// every ResNet block's conv in the Unet3D (see vdm/model/cpu_kernels.py),
//   out = silu((GN(x) * gamma + beta) * (1 + scale) + shift),
// GN's statistics per (sample, group), scale and shift per (sample, channel).
//
// Why by hand: in eager PyTorch under bf16 autocast this tail is a cast of the conv output to
// fp32, GroupNorm, addcmul, SiLU, and in the backward SiLU's and GroupNorm's backward, the
// scale-shift products and their sums, each a full pass over the activation in fp32; on the
// 64x64 level they took about two thirds of a ResNet block's time, its convolutions one third.
// Here the forward reads x three times (mean, variance, output) and writes the output once; the
// backward reads x and grad twice (sums, gradient) and writes one gradient; all math in fp32
// (fp64 for fp64 inputs).
//
// Layout: x (n, positions, c) contiguous, i.e. (n, c, h, w) in channels-last memory; out and
// grad_out the same, in x's dtype; gamma, beta (c,), scale, shift (n, c), mean and rstd
// (n, groups) in the accumulation dtype.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common.h"

namespace {

using namespace vdm_kernels;

// One sample's rows are processed a row (c channels) at a time in fp32 buffers padded to whole
// vectors; a and b are the per-channel affine map GN, gamma, beta, scale and shift compose to:
// y = x * a + b.
template <typename acc_t>
inline typename Simd<acc_t>::V sigmoid(typename Simd<acc_t>::V y) {
  return acc_t(1) / (acc_t(1) + exp_clamped(-y));
}

// a, b for one sample: mean and rstd per group, scale and shift the sample's (c,).
template <typename acc_t>
inline void affine_map(const acc_t* mean, const acc_t* rstd, int64_t cpg, const acc_t* gamma,
                       const acc_t* beta, const acc_t* scale, const acc_t* shift, int64_t c,
                       acc_t* a, acc_t* b) {
  for (int64_t ch = 0; ch < c; ++ch) {
    const acc_t m = mean[ch / cpg], r = rstd[ch / cpg], k = 1 + scale[ch];
    a[ch] = r * gamma[ch] * k;
    b[ch] = (beta[ch] - m * r * gamma[ch]) * k + shift[ch];
  }
}

// Per-channel sums over a sample's rows: vector adds into fp32 partials, which are added into
// double totals every 512 rows (and at the end), so long sums keep their precision.
template <typename acc_t>
struct ChannelSums {
  using S = Simd<acc_t>;
  std::vector<acc_t> part;
  std::vector<double> total;
  int64_t rows = 0;

  ChannelSums(int64_t c, int64_t cp) : part(cp, acc_t(0)), total(c, 0.0) {}
  void reset() {
    std::fill(part.begin(), part.end(), acc_t(0));
    std::fill(total.begin(), total.end(), 0.0);
    rows = 0;
  }
  void add(int64_t v, typename S::V x) { S::store(part.data() + v, S::load(part.data() + v) + x); }
  void end_row() {
    if (++rows % 512 == 0) flush();
  }
  void flush() {
    for (size_t ch = 0; ch < total.size(); ++ch) total[ch] += part[ch];
    std::fill(part.begin(), part.end(), acc_t(0));
  }
  double group(int64_t g, int64_t cpg) const {  // the total over group g's channels
    double t = 0;
    for (int64_t ch = g * cpg; ch < (g + 1) * cpg; ++ch) t += total[ch];
    return t;
  }
};

template <typename scalar_t>
void forward_kernel(const scalar_t* x, const at::opmath_type<scalar_t>* gamma,
                    const at::opmath_type<scalar_t>* beta, const at::opmath_type<scalar_t>* scale,
                    const at::opmath_type<scalar_t>* shift, scalar_t* out,
                    at::opmath_type<scalar_t>* mean, at::opmath_type<scalar_t>* rstd, int64_t n,
                    int64_t positions, int64_t c, int64_t groups, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  using S = Simd<acc_t>;
  using V = typename S::V;
  const int64_t cp = padded(c, S::kLanes), cpg = c / groups;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(cp, 0), a(cp, 0), b(cp, 0);
    ChannelSums<acc_t> sums(c, cp);
    for (int64_t s = begin; s < end; ++s) {
      const scalar_t* xs = x + s * positions * c;
      acc_t *mean_s = mean + s * groups, *rstd_s = rstd + s * groups;
      auto channel_sums = [&](auto f) {  // of f(row) over the rows
        sums.reset();
        for (int64_t p = 0; p < positions; ++p) {
          to_buffer(xs + p * c, c, row.data());
          for (int64_t v = 0; v < cp; v += S::kLanes) sums.add(v, f(S::load(row.data() + v), v));
          sums.end_row();
        }
        sums.flush();
      };
      // Mean, then variance around it (two passes: no cancellation when |mean| >> std).
      const double count = static_cast<double>(positions * cpg);
      channel_sums([](V xv, int64_t) { return xv; });
      for (int64_t g = 0; g < groups; ++g) mean_s[g] = static_cast<acc_t>(sums.group(g, cpg) / count);
      for (int64_t ch = 0; ch < c; ++ch) a[ch] = mean_s[ch / cpg];  // the mean, per channel
      channel_sums([&](V xv, int64_t v) {
        const V d = xv - S::load(a.data() + v);
        return d * d;
      });
      for (int64_t g = 0; g < groups; ++g)
        rstd_s[g] = static_cast<acc_t>(1.0 / std::sqrt(sums.group(g, cpg) / count + eps));
      affine_map(mean_s, rstd_s, cpg, gamma, beta, scale + s * c, shift + s * c, c, a.data(),
                 b.data());
      scalar_t* os = out + s * positions * c;
      for (int64_t p = 0; p < positions; ++p) {
        to_buffer(xs + p * c, c, row.data());
        for (int64_t v = 0; v < cp; v += S::kLanes) {
          const V y = S::load(row.data() + v) * S::load(a.data() + v) + S::load(b.data() + v);
          S::store(row.data() + v, y * sigmoid<acc_t>(y));
        }
        from_buffer(row.data(), c, os + p * c);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* grad_out, const scalar_t* x,
                     const at::opmath_type<scalar_t>* gamma, const at::opmath_type<scalar_t>* beta,
                     const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift,
                     const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
                     scalar_t* grad_x, at::opmath_type<scalar_t>* grad_scale,
                     at::opmath_type<scalar_t>* grad_shift, at::opmath_type<scalar_t>* grad_gamma_n,
                     at::opmath_type<scalar_t>* grad_beta_n, int64_t n, int64_t positions, int64_t c,
                     int64_t groups) {
  using acc_t = at::opmath_type<scalar_t>;
  using S = Simd<acc_t>;
  using V = typename S::V;
  const int64_t cp = padded(c, S::kLanes), cpg = c / groups;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    // a, b: the forward's affine map; m, r: mean and rstd per channel; w = gamma * (1 + scale).
    std::vector<acc_t> xr(cp, 0), gr(cp, 0), gy(cp, 0), z(cp, 0), a(cp, 0), b(cp, 0), m(cp, 0),
        r(cp, 0), w(cp, 0), c1(cp, 0), c2(cp, 0);
    ChannelSums<acc_t> s1(c, cp), s2(c, cp);
    for (int64_t s = begin; s < end; ++s) {
      const acc_t *mean_s = mean + s * groups, *rstd_s = rstd + s * groups;
      affine_map(mean_s, rstd_s, cpg, gamma, beta, scale + s * c, shift + s * c, c, a.data(),
                 b.data());
      for (int64_t ch = 0; ch < c; ++ch) {
        m[ch] = mean_s[ch / cpg];
        r[ch] = rstd_s[ch / cpg];
        w[ch] = gamma[ch] * (1 + scale[s * c + ch]);
      }
      const scalar_t* xs = x + s * positions * c;
      const scalar_t* gs = grad_out + s * positions * c;
      // gy = d(loss)/d(pre-activation y), z = the normalised x; both are recomputed per pass.
      auto load_row = [&](int64_t p) {
        to_buffer(xs + p * c, c, xr.data());
        to_buffer(gs + p * c, c, gr.data());
        for (int64_t v = 0; v < cp; v += S::kLanes) {
          const V xv = S::load(xr.data() + v);
          const V y = xv * S::load(a.data() + v) + S::load(b.data() + v);
          const V sg = sigmoid<acc_t>(y);
          S::store(gy.data() + v, S::load(gr.data() + v) * sg * (acc_t(1) + y * (acc_t(1) - sg)));
          S::store(z.data() + v, (xv - S::load(m.data() + v)) * S::load(r.data() + v));
        }
      };
      // Sums over positions per channel: s1 = sum gy, s2 = sum gy z.
      s1.reset();
      s2.reset();
      for (int64_t p = 0; p < positions; ++p) {
        load_row(p);
        for (int64_t v = 0; v < cp; v += S::kLanes) {
          const V g = S::load(gy.data() + v);
          s1.add(v, g);
          s2.add(v, g * S::load(z.data() + v));
        }
        s1.end_row();
        s2.end_row();
      }
      s1.flush();
      s2.flush();
      const std::vector<double>&t1 = s1.total, &t2 = s2.total;
      // y = (z gamma + beta)(1 + scale) + shift, so d shift = s1, d scale = gamma s2 + beta s1,
      // and d(GN output) = (1 + scale) gy, whose sums give gamma's and beta's gradients.
      std::vector<acc_t> mg1(groups, 0), mg2(groups, 0);
      const double count = static_cast<double>(positions * cpg);
      for (int64_t ch = 0; ch < c; ++ch) {
        const acc_t k = 1 + scale[s * c + ch];
        grad_shift[s * c + ch] = static_cast<acc_t>(t1[ch]);
        grad_scale[s * c + ch] = static_cast<acc_t>(gamma[ch] * t2[ch] + beta[ch] * t1[ch]);
        grad_beta_n[s * c + ch] = static_cast<acc_t>(k * t1[ch]);
        grad_gamma_n[s * c + ch] = static_cast<acc_t>(k * t2[ch]);
        mg1[ch / cpg] += static_cast<acc_t>(w[ch] * t1[ch] / count);
        mg2[ch / cpg] += static_cast<acc_t>(w[ch] * t2[ch] / count);
      }
      // GroupNorm's backward: dx = rstd (w gy - mean_group(w gy) - z mean_group(w gy z)).
      for (int64_t ch = 0; ch < c; ++ch) {
        c1[ch] = mg1[ch / cpg];
        c2[ch] = mg2[ch / cpg];
      }
      scalar_t* dxs = grad_x + s * positions * c;
      for (int64_t p = 0; p < positions; ++p) {
        load_row(p);
        for (int64_t v = 0; v < cp; v += S::kLanes)
          S::store(xr.data() + v,
                   S::load(r.data() + v) *
                       (S::load(w.data() + v) * S::load(gy.data() + v) - S::load(c1.data() + v) -
                        S::load(z.data() + v) * S::load(c2.data() + v)));
        from_buffer(xr.data(), c, dxs + p * c);
      }
    }
  });
}

struct Dims {
  int64_t n, positions, c;
};

Dims check(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta,
           const at::Tensor& scale, const at::Tensor& shift, int64_t groups) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "x must be an (n, c, h, w) CPU tensor in channels-last memory");
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(groups > 0 && c % groups == 0, "groups must divide the channels");
  const auto acc = at::toOpMathType(x.scalar_type());
  for (const at::Tensor* t : {&gamma, &beta})
    TORCH_CHECK(t->numel() == c && t->scalar_type() == acc && t->is_contiguous(),
                "gamma and beta must be contiguous (c,) tensors in the accumulation dtype");
  for (const at::Tensor* t : {&scale, &shift})
    TORCH_CHECK(t->numel() == n * c && t->scalar_type() == acc && t->is_contiguous(),
                "scale and shift must be contiguous (n, c) tensors in the accumulation dtype");
  return {n, x.size(2) * x.size(3), c};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_silu_forward(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& scale,
    const at::Tensor& shift, int64_t groups, double eps) {
  const Dims d = check(x, gamma, beta, scale, shift, groups);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({d.n, groups}, gamma.options());
  at::Tensor rstd = at::empty({d.n, groups}, gamma.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gn_silu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(
        x.data_ptr<scalar_t>(), gamma.data_ptr<acc_t>(), beta.data_ptr<acc_t>(),
        scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), d.n, d.positions, d.c, groups, eps);
  });
  return {out, mean, rstd};
}

// -> grad_x, grad_gamma, grad_beta, grad_scale (n, c), grad_shift (n, c)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_silu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t groups) {
  const Dims d = check(x, gamma, beta, scale, shift, groups);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type() &&
                  grad_out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "grad_out must have x's shape and dtype, in channels-last memory");
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor grad_scale = at::empty({d.n, d.c}, gamma.options());
  at::Tensor grad_shift = at::empty({d.n, d.c}, gamma.options());
  at::Tensor grad_gamma_n = at::empty({d.n, d.c}, gamma.options());
  at::Tensor grad_beta_n = at::empty({d.n, d.c}, gamma.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gn_silu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t>(
        grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gamma.data_ptr<acc_t>(),
        beta.data_ptr<acc_t>(), scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(),
        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), grad_x.data_ptr<scalar_t>(),
        grad_scale.data_ptr<acc_t>(), grad_shift.data_ptr<acc_t>(),
        grad_gamma_n.data_ptr<acc_t>(), grad_beta_n.data_ptr<acc_t>(), d.n, d.positions, d.c,
        groups);
  });
  return {grad_x, grad_gamma_n.sum(0), grad_beta_n.sum(0), grad_scale, grad_shift};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vdm_cpu, m) {
  m.def("gn_silu_forward(Tensor x, Tensor gamma, Tensor beta, Tensor scale, Tensor shift, int groups, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("gn_silu_backward(Tensor grad_out, Tensor x, Tensor gamma, Tensor beta, Tensor scale, Tensor shift, Tensor mean, Tensor rstd, int groups) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vdm_cpu, CPU, m) {
  m.impl("gn_silu_forward", &gn_silu_forward);
  m.impl("gn_silu_backward", &gn_silu_backward);
}
