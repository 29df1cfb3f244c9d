// Fused MXFP4 kernels for the CPU: the gpt-oss mixture of experts straight from packed weights.
//
// This file owns the compiled half of the CPU backend (`engine/kernels/cpu_mxfp4.py` builds and
// loads it; `engine/kernels/reference.py` is the specification every function here must match).
//
// MXFP4 as stored by the gpt-oss checkpoints: a weight row of `cols` values is `cols / 32` blocks
// of 16 bytes (two e2m1 codes per byte, the even element in the low nibble) plus one E8M0 scale
// byte per block, meaning 2^(s - 127). The kernels never write a decoded weight matrix: each
// block is loaded once, its nibbles go through a 16-entry lookup table inside a vector register,
// and the values meet the activations of every token routed to that expert before the next block
// is loaded. Decoding at batch 1..4 is bound by memory bandwidth, so the one thing that matters
// is streaming every selected expert's bytes exactly once per step, with few enough instructions
// per block to keep up with memory.
//
// The block's scale is a power of two, so it is factored out of the block's dot product: the
// e2m1 values are dotted with the activations, then the block's partial sum is multiplied by the
// scale in fp32 (exact over E8M0's whole range: 2^-127 is an fp32 subnormal, and 0xFF gives inf
// like the reference's exp2(128)).
//
// The order of a block's 32 products does not matter to the sum, so the activations are
// rearranged once per token to match the order in which nibbles come out of the bytes ("the
// prepared layout", below) and the weight side needs no shuffles beyond the table lookup.
//
// Instruction sets, chosen at run time (the file compiles for baseline x86-64; each path's
// functions carry their own target attribute):
//   kAvx512Vnni  bf16 activations: e2m1 values looked up as int16 (2x, so -12..12; vpermw) and
//                multiplied with activations quantized to int16 per block of 32 (vpdpwssd).
//                Not vdpbf16ps: it issues at one per two cycles here, vpdpwssd at two per cycle.
//                The activation scale is a power of two chosen per block so the block's largest
//                value uses 15 bits: every bf16 value within 2^7 of that maximum is exact, and
//                the products sum exactly in int32, so the result matches the fp32 dot product
//                of the bf16 activations to about 2^-16 of the block's largest term;
//   kAvx512      fp32: values looked up as fp32 (vpermps), FMA;
//   kAvx2        fp32: an 8-entry magnitude table (vpermps) plus the sign bit, FMA;
//   kScalar      portable C++ (also the path on non-x86 machines).
// fp32 activations always take an fp32 path (exact in fp32, as the fp32 models need).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace gptoss_cpu {

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3 };

// The 16 e2m1 code points: sign bit 3, exponent bits 2-1, mantissa bit 0.
constexpr float kFp4[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                            -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
// Twice the code points, as integers (the 1/2 goes into the activations' scale).
constexpr int16_t kFp4Twice[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

int64_t best_isa() {
#if GPTOSS_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512vnni")) return kAvx512Vnni;
  if (avx512) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

// E8M0 -> fp32 bits: 2^(s - 127); s = 0 is the subnormal 2^-127, s = 255 becomes inf.
inline uint32_t scale_bits(uint8_t s) { return s == 0 ? 0x00400000u : uint32_t(s) << 23; }
inline float scale_f32(uint8_t s) {
  const uint32_t bits = scale_bits(s);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// --- the prepared layout of activations ---------------------------------------------------------
//
// kF32 (the fp32 paths): per block, its 16 even elements then its 16 odd elements (the low and
// the high nibbles of its 16 bytes).
// kQ16 (kAvx512Vnni): blocks go in quads of 4 (128 values, a partial last quad padded with
// zeros) of 256 bytes: 128 int16, transposed 32 x 4 (x[128 g + 4 j + k] at 32 k + j). After all
// quads, one fp32 factor per block (2^e / 2, where x ~ int16 * 2^e), padded to a multiple of 16.

enum class Layout { kF32, kQ16 };
constexpr int64_t kQuadBytes = 256;

inline int64_t quads_of(int64_t cols) { return (cols / 32 + 3) / 4; }
inline int64_t factor_offset(int64_t cols) { return quads_of(cols) * kQuadBytes; }

inline int64_t prepared_bytes(int64_t cols, Layout layout) {
  if (layout == Layout::kF32) return cols * 4;
  return factor_offset(cols) + (cols / 32 + 15) / 16 * 64;
}

void prepare_q16(const float* x, int64_t cols, uint8_t* dst);  // AVX-512, below

// One token's activations x[cols] (fp32) -> the prepared layout at dst.
void prepare(const float* x, int64_t cols, Layout layout, uint8_t* dst) {
  if (layout == Layout::kQ16) return prepare_q16(x, cols, dst);
  auto* out = reinterpret_cast<float*>(dst);
  for (int64_t i = 0; i < cols; ++i) out[(i / 32) * 32 + (i & 1) * 16 + (i % 32) / 2] = x[i];
}

// Rows [t0, t1) of x [T, cols] (bf16 or fp32) prepared at dst + t * stride.
void prepare_rows(const at::Tensor& x, int64_t t0, int64_t t1, Layout layout, uint8_t* dst,
                  int64_t stride) {
  const int64_t cols = x.size(1);
  std::vector<float> row(cols);
  for (int64_t t = t0; t < t1; ++t) {
    if (x.scalar_type() == at::kBFloat16) {
      const auto* src = x.data_ptr<at::BFloat16>() + t * cols;
      for (int64_t i = 0; i < cols; ++i) row[i] = float(src[i]);
    } else {
      std::memcpy(row.data(), x.data_ptr<float>() + t * cols, cols * sizeof(float));
    }
    prepare(row.data(), cols, layout, dst + t * stride);
  }
}

// --- row kernels ----------------------------------------------------------------------------------
//
// rows(w, r0, r1, xs, nt, y, ys): y[t * ys + (r - r0)] = sum_c W[r, c] * x_t[c] for rows
// r0 <= r < r1 and the nt <= kMaxTile prepared token vectors xs[t].

struct Mx {
  const uint8_t* blocks;  // row r at blocks + r * nb * 16
  const uint8_t* scales;  // row r at scales + r * nb
  int64_t nb;
};
constexpr int kMaxTile = 4;
using RowsFn = void (*)(const Mx&, int64_t, int64_t, const void* const*, int, float*, int64_t);

void rows_scalar(const Mx& w, int64_t r0, int64_t r1, const void* const* xs, int nt, float* y,
                 int64_t ys) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* b = w.blocks + r * w.nb * 16;
    const uint8_t* s = w.scales + r * w.nb;
    float acc[kMaxTile] = {0};
    for (int64_t k = 0; k < w.nb; ++k) {
      const float sc = scale_f32(s[k]);
      for (int t = 0; t < nt; ++t) {
        const float* x = static_cast<const float*>(xs[t]) + k * 32;
        float even = 0.0f, odd = 0.0f;
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = b[k * 16 + j];
          even += kFp4[byte & 0x0F] * x[j];
          odd += kFp4[byte >> 4] * x[16 + j];
        }
        acc[t] += (even + odd) * sc;
      }
    }
    for (int t = 0; t < nt; ++t) y[t * ys + (r - r0)] = acc[t];
  }
}

#if GPTOSS_X86

#define GPTOSS_AVX512VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))

// AVX2, fp32: 8 values per register. vpermps reads 3 index bits, so the table holds the 8
// magnitudes and bit 3 of each nibble becomes the sign.
template <int NT>
GPTOSS_AVX2 void rows_avx2_t(const Mx& w, int64_t r0, int64_t r1, const float* const* xs,
                             float* y, int64_t ys) {
  const __m256 mag = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m256i sign = _mm256_set1_epi32(int(0x80000000u));
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* b = w.blocks + r * w.nb * 16;
    const uint8_t* s = w.scales + r * w.nb;
    __m256 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < w.nb; ++k) {
      const __m256 sc = _mm256_set1_ps(scale_f32(s[k]));
      __m256 dot[NT];
      for (int t = 0; t < NT; ++t) dot[t] = _mm256_setzero_ps();
      for (int half = 0; half < 2; ++half) {  // bytes 0-7, then 8-15
        const __m256i v = _mm256_cvtepu8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + k * 16 + half * 8)));
        const __m256 lo = _mm256_xor_ps(
            _mm256_permutevar8x32_ps(mag, v),
            _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 28), sign)));
        const __m256 hi = _mm256_xor_ps(
            _mm256_permutevar8x32_ps(mag, _mm256_srli_epi32(v, 4)),
            _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v, 24), sign)));
        for (int t = 0; t < NT; ++t) {
          const float* x = xs[t] + k * 32 + half * 8;
          dot[t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x), dot[t]);
          dot[t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + 16), dot[t]);
        }
      }
      for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(dot[t], sc, acc[t]);
    }
    for (int t = 0; t < NT; ++t) {
      __m128 v = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
      v = _mm_add_ps(v, _mm_movehl_ps(v, v));
      v = _mm_add_ss(v, _mm_movehdup_ps(v));
      y[t * ys + (r - r0)] = _mm_cvtss_f32(v);
    }
  }
}

// 16 scales (fp32) from 16 E8M0 bytes at s, `n` of them valid (the rest read as 0, never loaded).
GPTOSS_AVX512 inline __m512 scales16(const uint8_t* s, int64_t n) {
  const __mmask16 m = tail_mask16(n);
  const __m512i v = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, s));
  // s = 0 would give +0: the max lifts it to 2^-127's bits, all other scales are larger.
  return _mm512_castsi512_ps(
      _mm512_max_epu32(_mm512_slli_epi32(v, 23), _mm512_set1_epi32(0x00400000)));
}

// 2^n as fp32 for -149 <= n <= 127 (subnormal below -126).
inline float pow2f(int n) {
  if (n >= -126) {
    const uint32_t bits = uint32_t(n + 127) << 23;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  return std::ldexp(1.0f, n);
}

// The kQ16 layout of one token (see above). Per block: the exponent E of its largest magnitude
// (amax = m 2^E, m in [0.5, 1)) sets x ~ int16 * 2^(E - 15); vpmovsdw saturates the one value
// that could round up to 2^15. Then each quad is transposed 32 x 4 with two-source word permutes.
GPTOSS_AVX512 void prepare_q16_avx512(const float* x, int64_t cols, uint8_t* dst) {
  const int64_t nb = cols / 32, quads = (nb + 3) / 4;
  // A word permute reads two registers (64 words), a quad is four: word j < 16 of lookup k comes
  // from the first 64 values, word j >= 16 from the last 64, with the same index 4 (j % 16) + k.
  alignas(64) int16_t order[4][32];
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < 32; ++j) order[k][j] = int16_t(4 * (j % 16) + k);
  const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  std::memset(dst + factor_offset(cols), 0, (nb + 15) / 16 * 64);  // padding blocks: factor 0
  for (int64_t g = 0; g < quads; ++g) {
    alignas(64) int16_t values[128];
    uint8_t* quad = dst + g * kQuadBytes;
    auto* factor = reinterpret_cast<float*>(dst + factor_offset(cols)) + 4 * g;
    for (int b = 0; b < 4; ++b) {
      const int64_t block = 4 * g + b;
      if (block >= nb) {
        std::memset(values + 32 * b, 0, 64);
        continue;
      }
      const __m512 v0 = _mm512_loadu_ps(x + block * 32);
      const __m512 v1 = _mm512_loadu_ps(x + block * 32 + 16);
      const float amax = _mm512_reduce_max_ps(
          _mm512_max_ps(_mm512_and_ps(v0, magnitude), _mm512_and_ps(v1, magnitude)));
      int e = 0;
      if (amax > 0.0f && std::isfinite(amax)) {
        std::frexp(amax, &e);
        e -= 15;
      }
      const __m512 shift = _mm512_set1_ps(float(-e));
      const __m256i q0 = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_scalef_ps(v0, shift)));
      const __m256i q1 = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_scalef_ps(v1, shift)));
      _mm256_store_si256(reinterpret_cast<__m256i*>(values + 32 * b), q0);
      _mm256_store_si256(reinterpret_cast<__m256i*>(values + 32 * b + 16), q1);
      factor[b] = pow2f(e - 1);  // the 1/2 of the weights' doubled values
    }
    const __m512i r0 = _mm512_load_si512(values), r1 = _mm512_load_si512(values + 32);
    const __m512i r2 = _mm512_load_si512(values + 64), r3 = _mm512_load_si512(values + 96);
    for (int k = 0; k < 4; ++k) {
      const __m512i index = _mm512_load_si512(order[k]);
      const __m512i first = _mm512_permutex2var_epi16(r0, index, r1);
      const __m512i last = _mm512_permutex2var_epi16(r2, index, r3);
      _mm512_storeu_si512(quad + 64 * k, _mm512_mask_blend_epi16(0xFFFF0000u, first, last));
    }
  }
}

// SwiGLU of 16 (gate, linear) pairs, gate and linear with their biases already added.
GPTOSS_AVX512 inline __m512 swiglu512(__m512 gate, __m512 linear, float alpha, float limit) {
  gate = _mm512_min_ps(gate, _mm512_set1_ps(limit));
  linear = _mm512_max_ps(_mm512_min_ps(linear, _mm512_set1_ps(limit)), _mm512_set1_ps(-limit));
  const __m512 e = exp512(_mm512_mul_ps(gate, _mm512_set1_ps(-alpha)));
  const __m512 sig = _mm512_div_ps(gate, _mm512_add_ps(e, _mm512_set1_ps(1.0f)));
  return _mm512_mul_ps(sig, _mm512_add_ps(linear, _mm512_set1_ps(1.0f)));
}

// h[i] = swiglu(row[2i] + bias[2i], row[2i + 1] + bias[2i + 1]) for i < n (n a multiple of 16;
// bias is bf16 or fp32).
GPTOSS_AVX512 void swiglu_avx512(const float* row, const void* bias, bool bias_bf16, int64_t n,
                                 float alpha, float limit, float* h) {
  alignas(64) static const int32_t even[16] = {0,  2,  4,  6,  8,  10, 12, 14,
                                               16, 18, 20, 22, 24, 26, 28, 30};
  alignas(64) static const int32_t odd[16] = {1,  3,  5,  7,  9,  11, 13, 15,
                                              17, 19, 21, 23, 25, 27, 29, 31};
  const __m512i ie = _mm512_load_si512(even), io = _mm512_load_si512(odd);
  for (int64_t i = 0; i < n; i += 16) {
    __m512 a = _mm512_loadu_ps(row + 2 * i), b = _mm512_loadu_ps(row + 2 * i + 16);
    __m512 ba, bb;
    if (bias_bf16) {
      const auto* p = static_cast<const uint16_t*>(bias) + 2 * i;
      ba = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
      bb = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16))),
          16));
    } else {
      ba = _mm512_loadu_ps(static_cast<const float*>(bias) + 2 * i);
      bb = _mm512_loadu_ps(static_cast<const float*>(bias) + 2 * i + 16);
    }
    a = _mm512_add_ps(a, ba);
    b = _mm512_add_ps(b, bb);
    const __m512 gate = _mm512_permutex2var_ps(a, ie, b), linear = _mm512_permutex2var_ps(a, io, b);
    _mm512_storeu_ps(h + i, swiglu512(gate, linear, alpha, limit));
  }
}

// AVX-512, fp32: one block per step; vpermps reads the low 4 bits of each byte, so the low nibble
// needs no mask.
template <int NT>
GPTOSS_AVX512 void rows_avx512_t(const Mx& w, int64_t r0, int64_t r1, const float* const* xs,
                                 float* y, int64_t ys) {
  const __m512 lut = _mm512_loadu_ps(kFp4);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* b = w.blocks + r * w.nb * 16;
    const uint8_t* s = w.scales + r * w.nb;
    __m512 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < w.nb; g += 16) {
      const __m512 sg = scales16(s + g, w.nb - g);
      const int64_t end = std::min<int64_t>(w.nb, g + 16);
      for (int64_t k = g; k < end; ++k) {
        const __m512 sc = _mm512_permutexvar_ps(_mm512_set1_epi32(int(k - g)), sg);
        const __m512i v =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + k * 16)));
        const __m512 lo = _mm512_permutexvar_ps(v, lut);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
        for (int t = 0; t < NT; ++t) {
          const float* x = xs[t] + k * 32;
          __m512 d = _mm512_mul_ps(lo, _mm512_loadu_ps(x));
          d = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), d);
          acc[t] = _mm512_fmadd_ps(d, sc, acc[t]);
        }
      }
    }
    for (int t = 0; t < NT; ++t) y[t * ys + (r - r0)] = _mm512_reduce_add_ps(acc[t]);
  }
}

// Lane-to-block maps for the int16 kernel: lanes 4q..4q+3 of a quad's dot products hold block
// q's partial sums, so the quad's scale vector is {s[0] x 4, s[1] x 4, s[2] x 4, s[3] x 4}.
alignas(64) static const int32_t kQuadScaleIndex[4][16] = {
    {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3},
    {4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7},
    {8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11},
    {12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15}};

// AVX-512 VNNI: a quad of blocks (64 bytes, 128 values) per step and NR rows at once. The 64 bytes
// are read as 32 words; vpermw looks up the low 5 bits of each word in a table that holds the 16
// values twice, so a word and the word shifted right by 4 give the values of its low byte's two
// nibbles whatever the bits above; the same 64 bytes loaded one byte later give, the same way, the
// high byte's (two loads, two shifts and four lookups per 128 values). Word j covers bytes 2j and
// 2j+1, so lookup k of word j is element 4j + k of the quad, where the kQ16 layout put that
// activation. Each int32 lane sums 8 products of at most 12 * 32767: exact, and exact in fp32.
//
// Per 16 blocks, each token's activation factors are multiplied into the row's 16 weight scales
// once; per quad a permute spreads them over the lanes (block q's in lanes 4q..4q+3). Rows ~24 KB
// ahead are prefetched into L2 (`dense_cpu.cpp` says why L2): on a Zen 4 core the stream then ran
// 19 GB/s against 11 with the next 4 rows prefetched into L1 and 8 with none, and two cores
// stream the experts as fast as the read probe (~32 GB/s here).
constexpr int64_t kPrefetchBytes = 24 << 10;

template <int NR, int NT>
GPTOSS_AVX512VNNI void rows_vnni_tile(const Mx& w, int64_t r, const uint8_t* const* xs,
                                      int64_t factors_at, float* y, int64_t ys, int64_t yrow) {
  __m512i lut;
  {
    alignas(64) int16_t table[32];
    for (int i = 0; i < 32; ++i) table[i] = kFp4Twice[i & 15];
    lut = _mm512_load_si512(table);
  }
  const int64_t nb = w.nb, quads = (nb + 3) / 4, row_bytes = nb * 16;
  const int64_t ahead = std::max<int64_t>(NR, kPrefetchBytes / row_bytes);  // rows
  __m512 acc[NR][NT];
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < quads; g += 4) {  // 4 quads = 16 blocks share one scale register
    __m512 sg[NR][NT];
    for (int i = 0; i < NR; ++i) {
      const uint8_t* scales = w.scales + (r + i) * nb + 4 * g;
      _mm_prefetch(reinterpret_cast<const char*>(scales + ahead * nb), _MM_HINT_T1);
      const __m512 ws = scales16(scales, nb - 4 * g);
      for (int t = 0; t < NT; ++t)
        sg[i][t] = _mm512_mul_ps(
            ws, _mm512_loadu_ps(reinterpret_cast<const float*>(xs[t] + factors_at) + 4 * g));
    }
    const int64_t end = std::min<int64_t>(quads, g + 4);
    for (int64_t q = g; q < end; ++q) {
      // A last quad of fewer than 4 blocks loads zeros past the row's end (value 0, scale 0).
      const int64_t left = nb - 4 * q;
      const __mmask64 m = left >= 4 ? ~__mmask64(0) : (__mmask64(1) << (16 * left)) - 1;
      const __m512i index =
          _mm512_load_si512(reinterpret_cast<const void*>(kQuadScaleIndex[q - g]));
      __m512i v[NR][4];
      for (int i = 0; i < NR; ++i) {
        const uint8_t* p = w.blocks + (r + i) * row_bytes + q * 64;
        _mm_prefetch(reinterpret_cast<const char*>(p + ahead * row_bytes), _MM_HINT_T1);
        const __m512i low = _mm512_maskz_loadu_epi8(m, p);
        const __m512i high = _mm512_maskz_loadu_epi8(m >> 1, p + 1);
        v[i][0] = _mm512_permutexvar_epi16(low, lut);
        v[i][1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(low, 4), lut);
        v[i][2] = _mm512_permutexvar_epi16(high, lut);
        v[i][3] = _mm512_permutexvar_epi16(_mm512_srli_epi16(high, 4), lut);
      }
      for (int t = 0; t < NT; ++t) {
        const uint8_t* x = xs[t] + q * kQuadBytes;
        const __m512i x0 = _mm512_loadu_si512(x);
        const __m512i x1 = _mm512_loadu_si512(x + 64);
        const __m512i x2 = _mm512_loadu_si512(x + 128);
        const __m512i x3 = _mm512_loadu_si512(x + 192);
        for (int i = 0; i < NR; ++i) {
          __m512i d = _mm512_madd_epi16(v[i][0], x0);
          d = _mm512_dpwssd_epi32(d, v[i][1], x1);
          d = _mm512_dpwssd_epi32(d, v[i][2], x2);
          d = _mm512_dpwssd_epi32(d, v[i][3], x3);
          const __m512 sc = _mm512_permutexvar_ps(index, sg[i][t]);
          acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[i][t]);
        }
      }
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < NT; ++t) y[t * ys + yrow + i] = _mm512_reduce_add_ps(acc[i][t]);
}

// Four rows at a time for one token (more independent work in flight: measured fastest), two for
// more tokens (registers).
template <int NT>
GPTOSS_AVX512VNNI void rows_vnni_t(const Mx& w, int64_t r0, int64_t r1, const uint8_t* const* xs,
                                   float* y, int64_t ys) {
  const int64_t factors_at = factor_offset(w.nb * 32);
  int64_t r = r0;
  if constexpr (NT == 1)
    for (; r + 4 <= r1; r += 4) rows_vnni_tile<4, NT>(w, r, xs, factors_at, y, ys, r - r0);
  for (; r + 2 <= r1; r += 2) rows_vnni_tile<2, NT>(w, r, xs, factors_at, y, ys, r - r0);
  if (r < r1) rows_vnni_tile<1, NT>(w, r, xs, factors_at, y, ys, r - r0);
}

#define GPTOSS_DISPATCH_NT(fn, ...)  \
  switch (nt) {                      \
    case 1: fn<1>(__VA_ARGS__); break; \
    case 2: fn<2>(__VA_ARGS__); break; \
    case 3: fn<3>(__VA_ARGS__); break; \
    default: fn<4>(__VA_ARGS__); break; \
  }

void rows_avx2(const Mx& w, int64_t r0, int64_t r1, const void* const* xs, int nt, float* y,
               int64_t ys) {
  auto x = reinterpret_cast<const float* const*>(xs);
  GPTOSS_DISPATCH_NT(rows_avx2_t, w, r0, r1, x, y, ys)
}
void rows_avx512(const Mx& w, int64_t r0, int64_t r1, const void* const* xs, int nt, float* y,
                 int64_t ys) {
  auto x = reinterpret_cast<const float* const*>(xs);
  GPTOSS_DISPATCH_NT(rows_avx512_t, w, r0, r1, x, y, ys)
}
void rows_vnni(const Mx& w, int64_t r0, int64_t r1, const void* const* xs, int nt, float* y,
               int64_t ys) {
  auto x = reinterpret_cast<const uint8_t* const*>(xs);
  GPTOSS_DISPATCH_NT(rows_vnni_t, w, r0, r1, x, y, ys)
}

// Rows of an MXFP4 matrix decoded to bf16 (or fp32): the e2m1 value looked up as fp32, times the
// block's scale (exact), then its upper half (exact in bf16 over E8M0's normal range).
GPTOSS_AVX512 void dequantize_rows_avx512(const Mx& w, int64_t r0, int64_t r1, bool bf16,
                                          void* out) {
  const __m512 lut = _mm512_loadu_ps(kFp4);
  const int64_t cols = w.nb * 32;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* b = w.blocks + r * w.nb * 16;
    const uint8_t* s = w.scales + r * w.nb;
    for (int64_t k = 0; k < w.nb; ++k) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + k * 16)));
      const __m512 sc = _mm512_set1_ps(scale_f32(s[k]));
      const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(v, lut), sc);  // elements 0, 2, ...
      const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut), sc);
      const __m512 first = _mm512_permutex2var_ps(lo, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23), hi);
      const __m512 second = _mm512_permutex2var_ps(lo, _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31), hi);
      const int64_t at = (r - r0) * cols + k * 32;
      if (bf16) {
        auto* o = static_cast<uint16_t*>(out) + at;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(first), 16)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(second), 16)));
      } else {
        _mm512_storeu_ps(static_cast<float*>(out) + at, first);
        _mm512_storeu_ps(static_cast<float*>(out) + at + 16, second);
      }
    }
  }
}

#endif  // GPTOSS_X86

void prepare_q16(const float* x, int64_t cols, uint8_t* dst) {
#if GPTOSS_X86
  prepare_q16_avx512(x, cols, dst);  // kQ16 is only chosen where AVX-512 VNNI is present
#else
  (void)x, (void)cols, (void)dst;
  TORCH_CHECK(false, "the int16 layout needs AVX-512");
#endif
}

// How one ISA computes for activations of one dtype: the row kernel and the layout it reads.
struct Path {
  RowsFn rows;
  Layout layout;
};

Path path_for(int64_t isa, at::ScalarType dtype) {
#if GPTOSS_X86
  if (isa == kAvx512Vnni && dtype == at::kBFloat16) return {rows_vnni, Layout::kQ16};
  if (isa >= kAvx512) return {rows_avx512, Layout::kF32};
  if (isa == kAvx2) return {rows_avx2, Layout::kF32};
#endif
  (void)dtype;
  return {rows_scalar, Layout::kF32};
}

int64_t checked_isa(int64_t isa) {
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512Vnni, "unknown ISA ", isa);
  TORCH_CHECK(isa <= best_isa(), "ISA ", isa, " is not supported by this CPU (best: ", best_isa(),
              ")");
  return isa;
}

// Run `body(item)` for items 0..n-1 on torch's intra-op threads, each thread taking one
// contiguous range: consecutive items read consecutive rows, so each thread's weight stream stays
// sequential (handing items out one at a time, alternately, made every thread's stream jump).
template <typename F>
void parallel_items(int64_t n, const F& body) {
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i);
  });
}

void check_mx(const at::Tensor& blocks, const at::Tensor& scales, int64_t dims) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && scales.scalar_type() == at::kByte,
              "MXFP4 blocks and scales must be uint8");
  TORCH_CHECK(blocks.dim() == dims + 1 && scales.dim() == dims && blocks.size(-1) == 16,
              "MXFP4 blocks must be [..., rows, cols / 32, 16] and scales [..., rows, cols / 32]");
  for (int64_t d = 0; d < dims; ++d)
    TORCH_CHECK(blocks.size(d) == scales.size(d), "MXFP4 blocks and scales do not match");
  TORCH_CHECK(blocks.is_contiguous() && scales.is_contiguous(),
              "MXFP4 blocks and scales must be contiguous");
  TORCH_CHECK(blocks.device().is_cpu() && scales.device().is_cpu(), "CPU tensors expected");
}

void check_activations(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "activations must be [T, cols]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "activations must be bf16 or fp32");
  TORCH_CHECK(x.device().is_cpu(), "CPU tensors expected");
}

// A 64-byte aligned scratch buffer (uninitialised) from torch's allocator.
at::Tensor scratch(int64_t bytes) {
  return at::empty({std::max<int64_t>(bytes, 1)}, at::TensorOptions().dtype(at::kByte));
}

// --- ops ------------------------------------------------------------------------------------------

// x [T, cols] (bf16 or fp32) @ W.T with W [rows, cols] in MXFP4, + bias [rows] -> [T, rows] fp32.
at::Tensor mxfp4_linear(const at::Tensor& x_in, const at::Tensor& blocks, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& bias, int64_t isa) {
  check_mx(blocks, scales, 2);
  check_activations(x_in);
  isa = checked_isa(isa);
  TORCH_CHECK(x_in.size(1) == blocks.size(1) * 32, "x must be [T, cols] with cols = 32 * blocks");
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), cols = x.size(1), rows = blocks.size(0), nb = blocks.size(1);
  const Path path = path_for(isa, x.scalar_type());
  const int64_t stride = prepared_bytes(cols, path.layout);
  at::Tensor prepared = scratch(T * stride);
  uint8_t* xp = prepared.data_ptr<uint8_t>();
  prepare_rows(x, 0, T, path.layout, xp, stride);
  at::Tensor out = at::empty({T, rows}, x.options().dtype(at::kFloat));
  float* y = out.data_ptr<float>();
  const Mx w{blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), nb};
  constexpr int64_t kChunk = 64;
  parallel_items((rows + kChunk - 1) / kChunk, [&](int64_t c) {
    const int64_t r0 = c * kChunk, r1 = std::min(rows, r0 + kChunk);
    float tile[kMaxTile * kChunk];
    for (int64_t t0 = 0; t0 < T; t0 += kMaxTile) {
      const int nt = int(std::min<int64_t>(kMaxTile, T - t0));
      const void* xs[kMaxTile];
      for (int t = 0; t < nt; ++t) xs[t] = xp + (t0 + t) * stride;
      path.rows(w, r0, r1, xs, nt, tile, kChunk);
      for (int t = 0; t < nt; ++t)
        std::memcpy(y + (t0 + t) * rows + r0, tile + t * kChunk, (r1 - r0) * sizeof(float));
    }
  });
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out;
}

// Rows [r0, r1) of an MXFP4 matrix decoded into out (row-major, bf16 or fp32).
void dequantize_rows(const Mx& w, int64_t r0, int64_t r1, bool bf16, void* out, int64_t isa) {
#if GPTOSS_X86
  if (isa >= kAvx512) return dequantize_rows_avx512(w, r0, r1, bf16, out);
#endif
  (void)isa;
  const int64_t cols = w.nb * 32;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t k = 0; k < w.nb; ++k) {
      const float sc = scale_f32(w.scales[r * w.nb + k]);
      for (int j = 0; j < 16; ++j) {
        const uint8_t byte = w.blocks[(r * w.nb + k) * 16 + j];
        const int64_t at = (r - r0) * cols + k * 32 + 2 * j;
        const float lo = kFp4[byte & 0x0F] * sc, hi = kFp4[byte >> 4] * sc;
        if (bf16) {
          uint32_t bits[2];
          std::memcpy(bits, &lo, 4);
          std::memcpy(bits + 1, &hi, 4);
          static_cast<uint16_t*>(out)[at] = uint16_t(bits[0] >> 16);
          static_cast<uint16_t*>(out)[at + 1] = uint16_t(bits[1] >> 16);
        } else {
          static_cast<float*>(out)[at] = lo;
          static_cast<float*>(out)[at + 1] = hi;
        }
      }
    }
}

// `tile` rows of expert matrix w starting at r0, decoded by all threads into buffer (a tensor of
// [tile, cols] in dtype), returned as a [n, cols] view.
at::Tensor decoded_tile(const Mx& w, int64_t r0, int64_t r1, at::Tensor& buffer, int64_t isa) {
  const bool bf16 = buffer.scalar_type() == at::kBFloat16;
  void* base = buffer.data_ptr();
  const int64_t row_bytes = w.nb * 32 * buffer.element_size();
  at::parallel_for(r0, r1, 16, [&](int64_t a, int64_t b) {
    dequantize_rows(w, a, b, bf16, static_cast<uint8_t*>(base) + (a - r0) * row_bytes, isa);
  });
  return buffer.narrow(0, 0, r1 - r0);
}

// An [E, n] bias of bf16 or fp32, read as fp32.
struct Bias {
  const void* data;
  bool bf16;
  int64_t n;
  explicit Bias(const at::Tensor& t)
      : data(t.data_ptr()), bf16(t.scalar_type() == at::kBFloat16), n(t.size(1)) {}
  float at(int64_t e, int64_t i) const {
    return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(data)[e * n + i])
                : static_cast<const float*>(data)[e * n + i];
  }
  const void* ptr(int64_t e, int64_t i) const {
    return static_cast<const uint8_t*>(data) + (e * n + i) * (bf16 ? 2 : 4);
  }
};

// gpt-oss's SwiGLU on one (gate, linear) pair: both clamped, +1 on the linear half.
inline float swiglu(float gate, float linear, float alpha, float limit) {
  gate = std::min(gate, limit);
  linear = std::max(-limit, std::min(linear, limit));
  return gate / (1.0f + std::exp(-alpha * gate)) * (linear + 1.0f);
}

// An expert that sees many tokens (prefill chunks) is compute-bound, and the in-register kernel
// (one int16 dot product per token and block) is then several times slower than a matmul unit.
// So rows of its weights are decoded a tile at a time (a few MB, cache-resident, reused) and
// multiplied by PyTorch's matmul (oneDNN: AMX for bf16 where present) with every thread. The
// result goes into acc [T, H] fp32, weighted. Roundings as the reference: matmul outputs and the
// SwiGLU output in x's dtype.
constexpr int64_t kDenseMinTokens = 16;
constexpr int64_t kDenseTile = 512;

void expert_dense(const at::Tensor& x, const std::vector<int64_t>& tokens,
                  const std::vector<float>& gates, const Mx& w1, const Mx& w2, const Bias& bias1,
                  const Bias& bias2, int64_t e, float alpha, float limit, int64_t isa,
                  at::Tensor& acc) {
  const int64_t n = int64_t(tokens.size()), H = x.size(1), I2 = bias1.n, I = I2 / 2;
  const at::Tensor index = at::tensor(at::IntArrayRef(tokens), at::TensorOptions().dtype(at::kLong));
  const at::Tensor xe = x.index_select(0, index);  // [n, H]
  at::Tensor buffer1 = at::empty({std::min(kDenseTile, I2), H}, x.options());
  at::Tensor buffer2 = at::empty({std::min(kDenseTile, H), I}, x.options());
  at::Tensor h = at::empty({n, I}, x.options().dtype(at::kFloat));
  float* hp = h.data_ptr<float>();
  for (int64_t r0 = 0; r0 < I2; r0 += kDenseTile) {  // kDenseTile is even: whole pairs
    const int64_t r1 = std::min(I2, r0 + kDenseTile);
    const at::Tensor y = at::mm(xe, decoded_tile(w1, r0, r1, buffer1, isa).t()).to(at::kFloat);
    const float* yp = y.data_ptr<float>();
    at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* row = yp + t * (r1 - r0);
        float* out = hp + t * I + r0 / 2;
#if GPTOSS_X86
        if (isa >= kAvx512 && (r1 - r0) % 32 == 0) {
          swiglu_avx512(row, bias1.ptr(e, r0), bias1.bf16, (r1 - r0) / 2, alpha, limit, out);
          continue;
        }
#endif
        for (int64_t i = 0; i < (r1 - r0) / 2; ++i)
          out[i] = swiglu(row[2 * i] + bias1.at(e, r0 + 2 * i),
                          row[2 * i + 1] + bias1.at(e, r0 + 2 * i + 1), alpha, limit);
      }
    });
  }
  const at::Tensor hx = h.to(x.scalar_type());
  float* ap = acc.data_ptr<float>();
  for (int64_t r0 = 0; r0 < H; r0 += kDenseTile) {
    const int64_t r1 = std::min(H, r0 + kDenseTile);
    const at::Tensor y = at::mm(hx, decoded_tile(w2, r0, r1, buffer2, isa).t()).to(at::kFloat);
    const float* yp = y.data_ptr<float>();
    // Tokens are distinct within one expert: rows of acc are written by one thread each.
    at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        float* a = ap + tokens[t] * H;
        for (int64_t j = 0; j < r1 - r0; ++j)
          a[r0 + j] += gates[t] * (yp[t * (r1 - r0) + j] + bias2.at(e, r0 + j));
      }
    });
  }
}

// The experts of a mixture-of-experts layer after routing. x [T, H]; expert ids and routing
// weights [T, k]; mlp1 [E, 2I, H] (gate and linear rows interleaved) and mlp2 [E, H, I] in MXFP4,
// biases [E, 2I] and [E, H]. Returns sum_j weight[t, j] * mlp2(swiglu(mlp1(x_t))) as [T, H] in
// x's dtype.
//
// Phase 1 streams mlp1 of every selected expert once, over chunks of rows shared out among the
// threads, and writes each (expert, token)'s SwiGLU output; those are prepared for phase 2.
// Phase 2 splits the H output rows among the threads; a thread owns its rows for every token and
// expert, so the routing-weighted sum needs no atomics and is rounded to x's dtype once.
at::Tensor moe_experts(const at::Tensor& x_in, const at::Tensor& expert_ids,
                       const at::Tensor& expert_weights, const at::Tensor& w1_blocks,
                       const at::Tensor& w1_scales, const at::Tensor& w1_bias,
                       const at::Tensor& w2_blocks, const at::Tensor& w2_scales,
                       const at::Tensor& w2_bias, double alpha_d, double limit_d, int64_t isa) {
  check_mx(w1_blocks, w1_scales, 3);
  check_mx(w2_blocks, w2_scales, 3);
  check_activations(x_in);
  isa = checked_isa(isa);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor ids = expert_ids.to(at::kLong).contiguous();
  const at::Tensor gates = expert_weights.to(at::kFloat).contiguous();
  const at::Tensor b1 = w1_bias.contiguous(), b2 = w2_bias.contiguous();
  const int64_t T = x.size(0), H = x.size(1), E = w1_blocks.size(0);
  const int64_t I2 = w1_blocks.size(1), I = I2 / 2;
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == T && gates.sizes() == ids.sizes(),
              "expert ids and weights must be [T, k]");
  const int64_t k = ids.size(1);
  TORCH_CHECK(w1_blocks.size(2) * 32 == H && I2 % 2 == 0 && w2_blocks.size(0) == E &&
                  w2_blocks.size(1) == H && w2_blocks.size(2) * 32 == I,
              "expert shapes do not match x: mlp1 [E, 2I, H], mlp2 [E, H, I]");
  TORCH_CHECK(b1.dim() == 2 && b2.dim() == 2 && b1.size(0) == E && b1.size(1) == I2 &&
                  b2.size(0) == E && b2.size(1) == H,
              "expert biases must be [E, 2I] and [E, H]");
  for (const auto* b : {&b1, &b2})
    TORCH_CHECK(b->scalar_type() == at::kBFloat16 || b->scalar_type() == at::kFloat,
                "expert biases must be bf16 or fp32");
  const float alpha = float(alpha_d), limit = float(limit_d);
  const Bias bias1(b1), bias2(b2);

  // Route: every expert's list of (token, routing weight), and a slot per (expert, token) pair.
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* gate = gates.data_ptr<float>();
  std::vector<std::vector<int64_t>> tokens(E);
  std::vector<std::vector<float>> weights(E);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = id[t * k + j];
      TORCH_CHECK(e >= 0 && e < E, "expert id ", e, " out of range 0..", E - 1);
      tokens[e].push_back(t);
      weights[e].push_back(gate[t * k + j]);
    }
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (!tokens[e].empty()) active.push_back(e);
  // Busiest experts first, so the last items handed out are the cheap ones.
  std::stable_sort(active.begin(), active.end(),
                   [&](int64_t a, int64_t b) { return tokens[a].size() > tokens[b].size(); });

  // Experts with many tokens: decoded tiles and matmuls, one expert at a time, into acc.
  at::Tensor dense_acc = at::zeros({T, H}, x.options().dtype(at::kFloat));
  while (!active.empty() && int64_t(tokens[active.front()].size()) >= kDenseMinTokens) {
    const int64_t e = active.front();
    const Mx w1{w1_blocks.data_ptr<uint8_t>() + e * I2 * (H / 32) * 16,
                w1_scales.data_ptr<uint8_t>() + e * I2 * (H / 32), H / 32};
    const Mx w2{w2_blocks.data_ptr<uint8_t>() + e * H * (I / 32) * 16,
                w2_scales.data_ptr<uint8_t>() + e * H * (I / 32), I / 32};
    expert_dense(x, tokens[e], weights[e], w1, w2, bias1, bias2, e, alpha, limit, isa, dense_acc);
    active.erase(active.begin());
  }
  const float* dense = dense_acc.data_ptr<float>();
  std::vector<int64_t> first_slot(E, 0);  // the rest: a slot per (expert, token) pair
  int64_t slots = 0;
  for (const int64_t e : active) {
    first_slot[e] = slots;
    slots += int64_t(tokens[e].size());
  }

  // Both phases run the path of x's dtype (phase 2's input is fp32, but prepared the same way).
  const Path path = path_for(isa, x.scalar_type());
  const int64_t xs_stride = prepared_bytes(H, path.layout);
  const int64_t hs_stride = prepared_bytes(I, path.layout);
  at::Tensor x_prepared = scratch(T * xs_stride);
  at::Tensor h_values = scratch(slots * I * int64_t(sizeof(float)));
  at::Tensor h_prepared = scratch(slots * hs_stride);
  uint8_t* xp = x_prepared.data_ptr<uint8_t>();
  float* hv = reinterpret_cast<float*>(h_values.data_ptr<uint8_t>());
  uint8_t* hp = h_prepared.data_ptr<uint8_t>();
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    prepare_rows(x, t0, t1, path.layout, xp, xs_stride);
  });

  // Phase 1: h = swiglu(x @ W1[e].T + b1[e]) per (expert, token), in chunks of kPairs1 pairs.
  constexpr int64_t kPairs1 = 32;
  const int64_t chunks1 = (I + kPairs1 - 1) / kPairs1;
  parallel_items(int64_t(active.size()) * chunks1, [&](int64_t item) {
    const int64_t e = active[item / chunks1];
    const int64_t i0 = (item % chunks1) * kPairs1, i1 = std::min(I, i0 + kPairs1);
    const Mx w{w1_blocks.data_ptr<uint8_t>() + e * I2 * (H / 32) * 16,
               w1_scales.data_ptr<uint8_t>() + e * I2 * (H / 32), H / 32};
    float tile[kMaxTile * 2 * kPairs1];
    const auto& tok = tokens[e];
    for (int64_t t0 = 0; t0 < int64_t(tok.size()); t0 += kMaxTile) {
      const int nt = int(std::min<int64_t>(kMaxTile, int64_t(tok.size()) - t0));
      const void* xs[kMaxTile];
      for (int t = 0; t < nt; ++t) xs[t] = xp + tok[t0 + t] * xs_stride;
      path.rows(w, 2 * i0, 2 * i1, xs, nt, tile, 2 * kPairs1);
      for (int t = 0; t < nt; ++t) {
        float* h = hv + (first_slot[e] + t0 + t) * I;
        const float* row = tile + t * 2 * kPairs1;
#if GPTOSS_X86
        if (isa >= kAvx512) {  // i1 - i0 is a multiple of 32: I is
          swiglu_avx512(row, bias1.ptr(e, 2 * i0), bias1.bf16, i1 - i0, alpha, limit, h + i0);
          continue;
        }
#endif
        for (int64_t i = i0; i < i1; ++i)
          h[i] = swiglu(row[2 * (i - i0)] + bias1.at(e, 2 * i),
                        row[2 * (i - i0) + 1] + bias1.at(e, 2 * i + 1), alpha, limit);
      }
    }
  });
  at::parallel_for(0, slots, 16, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) prepare(hv + s * I, I, path.layout, hp + s * hs_stride);
  });

  // Phase 2: out[t, r] = sum over t's experts of weight * (h @ W2[e].T + b2[e]). Each thread owns
  // a contiguous range of rows and streams it expert after expert.
  at::Tensor out = at::empty({T, H}, x.options());
  constexpr int64_t kRows2 = 32;
  at::parallel_for(0, (H + kRows2 - 1) / kRows2, 1, [&](int64_t c0, int64_t c1) {
    const int64_t r0 = c0 * kRows2, r1 = std::min(H, c1 * kRows2), n = r1 - r0;
    std::vector<float> acc(T * n);
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(acc.data() + t * n, dense + t * H + r0, n * sizeof(float));
    float tile[kMaxTile * kRows2];
    for (const int64_t e : active) {
      const Mx w{w2_blocks.data_ptr<uint8_t>() + e * H * (I / 32) * 16,
                 w2_scales.data_ptr<uint8_t>() + e * H * (I / 32), I / 32};
      const auto& tok = tokens[e];
      for (int64_t t0 = 0; t0 < int64_t(tok.size()); t0 += kMaxTile) {
        const int nt = int(std::min<int64_t>(kMaxTile, int64_t(tok.size()) - t0));
        const void* hs[kMaxTile];
        for (int t = 0; t < nt; ++t) hs[t] = hp + (first_slot[e] + t0 + t) * hs_stride;
        for (int64_t q0 = r0; q0 < r1; q0 += kRows2) {
          const int64_t q1 = std::min(r1, q0 + kRows2);
          path.rows(w, q0, q1, hs, nt, tile, kRows2);
          for (int t = 0; t < nt; ++t) {
            const float g = weights[e][t0 + t];
            float* a = acc.data() + tok[t0 + t] * n + (q0 - r0);
            for (int64_t r = 0; r < q1 - q0; ++r)
              a[r] += g * (tile[t * kRows2 + r] + bias2.at(e, q0 + r));
          }
        }
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      if (out.scalar_type() == at::kBFloat16) {
        auto* o = out.data_ptr<at::BFloat16>() + t * H + r0;
        for (int64_t r = 0; r < n; ++r) o[r].x = f32_to_bf16(acc[t * n + r]);
      } else {
        std::memcpy(out.data_ptr<float>() + t * H + r0, acc.data() + t * n, n * sizeof(float));
      }
    }
  });
  return out;
}

}  // namespace gptoss_cpu

TORCH_LIBRARY(gpt_oss_cpu, m) {
  m.def("best_isa() -> int", &gptoss_cpu::best_isa);
  m.def("mxfp4_linear(Tensor x, Tensor blocks, Tensor scales, Tensor? bias, int isa) -> Tensor",
        &gptoss_cpu::mxfp4_linear);
  m.def(
      "moe_experts(Tensor x, Tensor expert_ids, Tensor expert_weights, Tensor w1_blocks, "
      "Tensor w1_scales, Tensor w1_bias, Tensor w2_blocks, Tensor w2_scales, Tensor w2_bias, "
      "float alpha, float limit, int isa) -> Tensor",
      &gptoss_cpu::moe_experts);
}
