// Shared pieces of vdm's CPU kernels: 64-byte vectors, dtype conversions, a vector exp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace vdm_kernels {

// GCC/Clang vector extensions, lowered to whatever SIMD the CPU has (-march=native).
template <typename acc_t>
struct Simd {
  typedef acc_t V __attribute__((vector_size(64)));
  static constexpr int kLanes = 64 / sizeof(acc_t);
  static inline V load(const acc_t* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void store(acc_t* p, V v) { std::memcpy(p, &v, sizeof(V)); }
};

// Element conversions to and from the accumulation dtype. bf16 by its bits (the top half of an
// fp32, rounded to nearest even, NaN kept), which the compiler vectorises; c10's conversion
// operators compiled to scalar code here.
template <typename acc_t>
inline acc_t to_acc(acc_t x) { return x; }
inline float to_acc(c10::Half x) { return static_cast<float>(x); }
inline float to_acc(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename scalar_t, typename acc_t>
inline scalar_t from_acc(acc_t x) { return static_cast<scalar_t>(x); }
template <>
inline c10::BFloat16 from_acc<c10::BFloat16, float>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

// exp(x) on a vector, x clamped to [-87, 88] (fp32's normal range), as 2^n * p(r) with
// r = x - n ln2 in [-ln2/2, ln2/2] and Cephes' polynomial for p (relative error ~1e-7). In vector
// arithmetic because the compiler left the scalar form (and std::exp) unvectorised, and the
// exponentials then took most of the attention kernel's time.
typedef int32_t IntV __attribute__((vector_size(64)));
inline Simd<float>::V exp_clamped(Simd<float>::V x) {
  using V = Simd<float>::V;
  x = x < -87.0f ? V{} - 87.0f : x;  // exp(-87) ~ 1.6e-38: as good as 0 next to a softmax's 1
  x = x > 88.0f ? V{} + 88.0f : x;
  const float round = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const V n = (x * 1.44269504088896341f + round) - round;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const IntV bits = (__builtin_convertvector(n, IntV) + 127) << 23;
  V two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));  // the bits as floats, without aliasing
  return p * two_n;
}
inline Simd<double>::V exp_clamped(Simd<double>::V x) {  // fp64 (gradcheck): libm
  for (int j = 0; j < Simd<double>::kLanes; ++j) x[j] = std::exp(x[j]);
  return x;
}

inline int64_t padded(int64_t f, int64_t lanes) { return (f + lanes - 1) / lanes * lanes; }

}  // namespace vdm_kernels
