// What the CPU kernels' sources share: bf16 conversions, the x86 detection, target attributes, and vector math.
//
// Everything vectorised is compiled for baseline x86-64 and carries a target attribute, so one
// library runs on any x86-64 CPU and each path is chosen at run time.

#pragma once

#include <cstdint>
#include <cstring>

namespace gptoss_cpu {

// bf16 <-> fp32 on bit patterns (portable: the scalar paths and every ISA's tails use them).
inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

}  // namespace gptoss_cpu

#if defined(__x86_64__) || defined(_M_X64)
#define GPTOSS_X86 1
#include <immintrin.h>

#define GPTOSS_AVX2 __attribute__((target("avx2,fma")))
#define GPTOSS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

namespace gptoss_cpu {

// The lanes of a 16-lane step that hold data when `count` elements are left (all 16 past that).
inline __mmask16 tail_mask16(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// exp(x) for fp32 lanes, to about 1 ulp: x = n ln2 + r with |r| <= ln2 / 2, a degree-7 polynomial
// for exp(r) (Cephes' expf coefficients), then scalef multiplies by 2^n without overflow.
GPTOSS_AVX512 inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

}  // namespace gptoss_cpu

#endif  // x86
