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

// Conversion of whole rows to and from an accumulation-dtype buffer: a vector at a time (bf16 by
// widening and shifting its bits in registers), the tail element by element. Element-wise loops
// were vectorised by GCC in 32-byte halves, and the kernels' 64-byte loads of what two 32-byte
// stores had just written stalled on store forwarding: that took most of GroupNorm's time.
template <typename scalar_t, typename acc_t>
inline void to_acc_vector(const scalar_t* src, acc_t* dst) {
  for (int j = 0; j < Simd<acc_t>::kLanes; ++j) dst[j] = to_acc(src[j]);
}
template <typename scalar_t, typename acc_t>
inline void from_acc_vector(const acc_t* src, scalar_t* dst) {
  for (int j = 0; j < Simd<acc_t>::kLanes; ++j) dst[j] = from_acc<scalar_t>(src[j]);
}

typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));

template <>
inline void to_acc_vector<c10::BFloat16, float>(const c10::BFloat16* src, float* dst) {
  U16x16 h;
  std::memcpy(&h, src, sizeof(h));
  const U32x16 bits = __builtin_convertvector(h, U32x16) << 16;
  std::memcpy(dst, &bits, sizeof(bits));
}
template <>
inline void from_acc_vector<c10::BFloat16, float>(const float* src, c10::BFloat16* dst) {
  Simd<float>::V x = Simd<float>::load(src);
  U32x16 bits;
  std::memcpy(&bits, &x, sizeof(bits));
  U32x16 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;  // as from_acc: nearest even
  rounded = x != x ? U32x16{} + 0x7fc0u : rounded;                 // NaN stays NaN
  const U16x16 h = __builtin_convertvector(rounded, U16x16);
  std::memcpy(dst, &h, sizeof(h));
}

template <typename scalar_t, typename acc_t>
inline void to_buffer(const scalar_t* src, int64_t len, acc_t* dst) {
  constexpr int L = Simd<acc_t>::kLanes;
  int64_t i = 0;
  for (; i + L <= len; i += L) to_acc_vector(src + i, dst + i);
  for (; i < len; ++i) dst[i] = to_acc(src[i]);
}
template <typename scalar_t, typename acc_t>
inline void from_buffer(const acc_t* src, int64_t len, scalar_t* dst) {
  constexpr int L = Simd<acc_t>::kLanes;
  int64_t i = 0;
  for (; i + L <= len; i += L) from_acc_vector(src + i, dst + i);
  for (; i < len; ++i) dst[i] = from_acc<scalar_t>(src[i]);
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
