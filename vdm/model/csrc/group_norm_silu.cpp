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
// grad_out the same shape in out's dtype (x's, or fp32 for reduced-precision x); gamma, beta
// (c,), scale, shift (n, c), mean and rstd (n, groups) in the accumulation dtype.

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

template <typename scalar_t, typename out_t>
void forward_kernel(const scalar_t* x, const at::opmath_type<scalar_t>* gamma,
                    const at::opmath_type<scalar_t>* beta, const at::opmath_type<scalar_t>* scale,
                    const at::opmath_type<scalar_t>* shift, out_t* out,
                    at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* rstd_out,
                    int64_t n, int64_t positions, int64_t c, int64_t groups, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  using S = Simd<acc_t>;
  const int64_t cp = padded(c, S::kLanes), cpg = c / groups;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(cp, 0), a(cp, 0), b(cp, 0), part(cp, 0);
    std::vector<double> total(c);
    for (int64_t s = begin; s < end; ++s) {
      const scalar_t* xs = x + s * positions * c;
      // Per channel sum over the rows of f(row): vector adds in fp32 over blocks of 512 rows,
      // the blocks added up in double.
      auto channel_sums = [&](auto f) {
        std::fill(total.begin(), total.end(), 0.0);
        std::fill(part.begin(), part.end(), acc_t(0));
        for (int64_t p = 0; p < positions; ++p) {
          for (int64_t ch = 0; ch < c; ++ch) row[ch] = to_acc(xs[p * c + ch]);
          for (int64_t v = 0; v < cp; v += S::kLanes)
            S::store(part.data() + v, S::load(part.data() + v) + f(S::load(row.data() + v), v));
          if ((p + 1) % 512 == 0 || p + 1 == positions) {
            for (int64_t ch = 0; ch < c; ++ch) total[ch] += part[ch];
            std::fill(part.begin(), part.end(), acc_t(0));
          }
        }
      };
      // Mean, then variance around it (two passes: no cancellation when |mean| >> std).
      using V = typename S::V;
      channel_sums([](V xv, int64_t) { return xv; });
      std::vector<acc_t> mean_g(groups), rstd_g(groups);
      const double count = static_cast<double>(positions * cpg);
      for (int64_t g = 0; g < groups; ++g) {
        double t = 0;
        for (int64_t ch = g * cpg; ch < (g + 1) * cpg; ++ch) t += total[ch];
        mean_g[g] = static_cast<acc_t>(t / count);
      }
      for (int64_t ch = 0; ch < c; ++ch) a[ch] = mean_g[ch / cpg];  // the mean, per channel
      channel_sums([&](V xv, int64_t v) {
        const V d = xv - S::load(a.data() + v);
        return d * d;
      });
      for (int64_t g = 0; g < groups; ++g) {
        double t = 0;
        for (int64_t ch = g * cpg; ch < (g + 1) * cpg; ++ch) t += total[ch];
        rstd_g[g] = static_cast<acc_t>(1.0 / std::sqrt(t / count + eps));
        mean_out[s * groups + g] = mean_g[g];
        rstd_out[s * groups + g] = rstd_g[g];
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        const acc_t m = mean_g[ch / cpg], r = rstd_g[ch / cpg], k = 1 + scale[s * c + ch];
        a[ch] = r * gamma[ch] * k;
        b[ch] = (beta[ch] - m * r * gamma[ch]) * k + shift[s * c + ch];
      }
      out_t* os = out + s * positions * c;
      for (int64_t p = 0; p < positions; ++p) {
        for (int64_t ch = 0; ch < c; ++ch) row[ch] = to_acc(xs[p * c + ch]);
        for (int64_t v = 0; v < cp; v += S::kLanes) {
          const typename S::V y = S::load(row.data() + v) * S::load(a.data() + v) +
                                  S::load(b.data() + v);
          S::store(row.data() + v, y * sigmoid<acc_t>(y));
        }
        for (int64_t ch = 0; ch < c; ++ch) os[p * c + ch] = from_acc<out_t>(row[ch]);
      }
    }
  });
}

template <typename scalar_t, typename out_t>
void backward_kernel(const out_t* grad_out, const scalar_t* x,
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
        r(cp, 0), w(cp, 0), s1(cp, 0), s2(cp, 0);
    for (int64_t s = begin; s < end; ++s) {
      for (int64_t ch = 0; ch < c; ++ch) {
        m[ch] = mean[s * groups + ch / cpg];
        r[ch] = rstd[s * groups + ch / cpg];
        const acc_t k = 1 + scale[s * c + ch];
        w[ch] = gamma[ch] * k;
        a[ch] = r[ch] * w[ch];
        b[ch] = (beta[ch] - m[ch] * r[ch] * gamma[ch]) * k + shift[s * c + ch];
      }
      const scalar_t* xs = x + s * positions * c;
      const out_t* gs = grad_out + s * positions * c;
      // gy = d(loss)/d(pre-activation y), z = the normalised x; both are recomputed per pass.
      auto load_row = [&](int64_t p) {
        for (int64_t ch = 0; ch < c; ++ch) {
          xr[ch] = to_acc(xs[p * c + ch]);
          gr[ch] = to_acc(gs[p * c + ch]);
        }
        for (int64_t v = 0; v < cp; v += S::kLanes) {
          const V xv = S::load(xr.data() + v);
          const V y = xv * S::load(a.data() + v) + S::load(b.data() + v);
          const V sg = sigmoid<acc_t>(y);
          S::store(gy.data() + v, S::load(gr.data() + v) * sg * (acc_t(1) + y * (acc_t(1) - sg)));
          S::store(z.data() + v, (xv - S::load(m.data() + v)) * S::load(r.data() + v));
        }
      };
      std::fill(s1.begin(), s1.end(), acc_t(0));
      std::fill(s2.begin(), s2.end(), acc_t(0));
      // Sums over positions per channel: s1 = sum gy, s2 = sum gy z (fp32 per 512 rows, then
      // added up in double).
      std::vector<double> t1(c, 0.0), t2(c, 0.0);
      for (int64_t p = 0; p < positions; ++p) {
        load_row(p);
        for (int64_t v = 0; v < cp; v += S::kLanes) {
          const V g = S::load(gy.data() + v);
          S::store(s1.data() + v, S::load(s1.data() + v) + g);
          S::store(s2.data() + v, S::load(s2.data() + v) + g * S::load(z.data() + v));
        }
        if ((p + 1) % 512 == 0 || p + 1 == positions) {
          for (int64_t ch = 0; ch < c; ++ch) {
            t1[ch] += s1[ch];
            t2[ch] += s2[ch];
          }
          std::fill(s1.begin(), s1.end(), acc_t(0));
          std::fill(s2.begin(), s2.end(), acc_t(0));
        }
      }
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
      std::vector<acc_t> c1(cp, 0), c2(cp, 0);
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
        for (int64_t ch = 0; ch < c; ++ch) dxs[p * c + ch] = from_acc<scalar_t>(xr[ch]);
      }
    }
  });
}

struct Dims {
  int64_t n, positions, c;
};

Dims check(const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& scale, int64_t groups) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 &&
                  x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "x must be an (n, c, h, w) CPU tensor in channels-last memory");
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK(groups > 0 && c % groups == 0, "groups must divide the channels");
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(gamma.numel() == c && gamma.scalar_type() == acc && gamma.is_contiguous(),
              "gamma and beta must be contiguous (c,) tensors in the accumulation dtype");
  TORCH_CHECK(scale.numel() == n * c && scale.scalar_type() == acc && scale.is_contiguous(),
              "scale and shift must be contiguous (n, c) tensors in the accumulation dtype");
  return {n, x.size(2) * x.size(3), c};
}

// Calls fn(scalar_t, out_t) for x's dtype and an out dtype of x's or, for reduced x, fp32.
template <typename Fn>
void dispatch(const at::Tensor& x, at::ScalarType out_dtype, Fn&& fn) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "gn_silu", [&] {
    if (out_dtype == x.scalar_type()) {
      fn(scalar_t{}, scalar_t{});
    } else {
      TORCH_CHECK(out_dtype == at::kFloat, "out dtype must be x's or float32");
      fn(scalar_t{}, float{});
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gn_silu_forward(
    const at::Tensor& x, const at::Tensor& gamma, const at::Tensor& beta, const at::Tensor& scale,
    const at::Tensor& shift, int64_t groups, double eps, at::ScalarType out_dtype) {
  const Dims d = check(x, gamma, scale, groups);
  at::Tensor out = at::empty_like(x, x.options().dtype(out_dtype), at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({d.n, groups}, gamma.options());
  at::Tensor rstd = at::empty({d.n, groups}, gamma.options());
  dispatch(x, out_dtype, [&](auto s, auto o) {
    using scalar_t = decltype(s);
    using out_t = decltype(o);
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, out_t>(
        x.data_ptr<scalar_t>(), gamma.data_ptr<acc_t>(), beta.data_ptr<acc_t>(),
        scale.data_ptr<acc_t>(), shift.data_ptr<acc_t>(), out.data_ptr<out_t>(),
        mean.data_ptr<acc_t>(), rstd.data_ptr<acc_t>(), d.n, d.positions, d.c, groups, eps);
  });
  return {out, mean, rstd};
}

// -> grad_x, grad_gamma, grad_beta, grad_scale (n, c), grad_shift (n, c)
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gn_silu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& gamma,
    const at::Tensor& beta, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t groups) {
  const Dims d = check(x, gamma, scale, groups);
  TORCH_CHECK(grad_out.sizes() == x.sizes() &&
                  grad_out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "grad_out must have x's shape, in channels-last memory");
  at::Tensor grad_x = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  at::Tensor grad_scale = at::empty({d.n, d.c}, gamma.options());
  at::Tensor grad_shift = at::empty({d.n, d.c}, gamma.options());
  at::Tensor grad_gamma_n = at::empty({d.n, d.c}, gamma.options());
  at::Tensor grad_beta_n = at::empty({d.n, d.c}, gamma.options());
  dispatch(x, grad_out.scalar_type(), [&](auto s, auto o) {
    using scalar_t = decltype(s);
    using out_t = decltype(o);
    using acc_t = at::opmath_type<scalar_t>;
    backward_kernel<scalar_t, out_t>(
        grad_out.data_ptr<out_t>(), x.data_ptr<scalar_t>(), gamma.data_ptr<acc_t>(),
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
  m.def("gn_silu_forward(Tensor x, Tensor gamma, Tensor beta, Tensor scale, Tensor shift, int groups, float eps, ScalarType out_dtype) -> (Tensor, Tensor, Tensor)");
  m.def("gn_silu_backward(Tensor grad_out, Tensor x, Tensor gamma, Tensor beta, Tensor scale, Tensor shift, Tensor mean, Tensor rstd, int groups) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vdm_cpu, CPU, m) {
  m.impl("gn_silu_forward", &gn_silu_forward);
  m.impl("gn_silu_backward", &gn_silu_backward);
}
