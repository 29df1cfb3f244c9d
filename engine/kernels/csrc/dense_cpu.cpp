// The CPU backend's dense-side ops: bf16 matmuls of a few tokens (the decode step's qkv, out,
// router and unembedding), RMSNorm, RoPE and attention over the paged KV cache.
//
// A decode step reads two thirds of its bytes through the bf16 matmuls; at one to four tokens
// they are matrix-vector products, bound by memory bandwidth. `linear` streams each weight row
// once for all tokens, prefetching rows ahead into L2, and multiplies with vdpbf16ps where the CPU
// has AVX512-BF16, else converting bf16 to fp32 in registers (exact) for FMAs; PyTorch's bf16
// GEMV reached 7 GB/s on one Sapphire Rapids core, the widening loop 12.
//
// The other ops exist to cut what a decode step spends between the big matmuls: the reference
// states each of them in 7 to 40 small tensor ops, so a 24-layer step issued ~1,800 of them. Here
// each is one call, reads its inputs where they lie (the cache through the block table, without
// gathering keys into a new tensor) and keeps dtypes as the reference does (`reference.py` is the
// spec).
//
// Attention computes the sequences whose chunk has at most `max_queries` tokens (decodes, short
// chunks): flash-style, keys in chunks with a running maximum, fp32 throughout, the learned sink
// joining the softmax at the end; K/V of every token of the step are written to the cache first.
// Longer chunks (prefill) are left to the caller, which hands them to a batched matmul.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "simd.h"

namespace gptoss_cpu {

namespace {

// Reads and writes one element of a bf16 or fp32 tensor's storage as fp32.
struct Elems {
  void* data;
  bool bf16;
  explicit Elems(const at::Tensor& t)
      : data(t.data_ptr()), bf16(t.scalar_type() == at::kBFloat16) {}
  float get(int64_t i) const {
    return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(data)[i])
                : static_cast<const float*>(data)[i];
  }
  void set(int64_t i, float v) const {
    if (bf16)
      static_cast<uint16_t*>(data)[i] = f32_to_bf16(v);
    else
      static_cast<float*>(data)[i] = v;
  }
  // A value as the reference's dtype holds it (a bf16 op rounds its result).
  float round(float v) const { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }
};

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat, what,
              " must be bf16 or fp32");
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
}

}  // namespace

#if GPTOSS_X86

// y[t * ys + r + i] = sum_c W[r + i, c] x[t, c] for i < NR: W bf16 [., cols], x fp32 [NT, cols].
//
// Rows are prefetched ~96 KB ahead into L2, not L1: on a Zen 4 core a stream prefetched into L1
// ran at a fraction of the memory's speed (the MoE kernel: 11 GB/s per core against 19 into L2;
// likely each L1 prefetch holds one of the core's few L1 miss slots until its line arrives). Here
// (2 cores, the 20b shapes): 48 KB into L1 streamed 25 GB/s for q/k/v, 96 KB into L2 ~33, as fast
// as the read probe; on Sapphire Rapids 48 KB into L1 had streamed 26-27 (the loop alone 27.5).
constexpr int64_t kPrefetchBytes = 96 << 10;

template <int NR, int NT>
GPTOSS_AVX512 void linear_rows_tile(const uint16_t* w, int64_t cols, int64_t r, const float* x,
                                    float* y, int64_t ys) {
  const int64_t ahead = std::max<int64_t>(NR, kPrefetchBytes / (2 * cols)) * cols;
  __m512 acc[NR][NT];
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < cols; c += 16) {
    const __mmask16 m = tail_mask16(cols - c);
    __m512 wv[NR];
    for (int i = 0; i < NR; ++i) {
      const uint16_t* p = w + (r + i) * cols + c;
      if ((c & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T1);
      wv[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
    }
    for (int t = 0; t < NT; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + t * cols + c);
      for (int i = 0; i < NR; ++i) acc[i][t] = _mm512_fmadd_ps(wv[i], xv, acc[i][t]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < NT; ++t) y[t * ys + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

#define GPTOSS_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))

// The same product with AVX512-BF16, x bf16 [NT, cols]: vdpbf16ps multiplies 32 bf16 weights by
// 32 bf16 inputs (each product exact in fp32) and adds them in pairs into 16 fp32 lanes: one
// instruction per 64 bytes of weights where the loop above needs a widening load, a shift and an
// FMA per 32. Only the order of the fp32 sum differs, and the instruction treats bf16 subnormals
// (below 2^-126) as zero. At four tokens the loop above is compute-bound (~20 GB/s on Zen 4),
// this one streams at the memory's speed (~33).
template <int NR, int NT>
GPTOSS_AVX512BF16 void linear_rows_tile_dot(const uint16_t* w, int64_t cols, int64_t r,
                                           const uint16_t* x, float* y, int64_t ys) {
  const int64_t ahead = std::max<int64_t>(NR, kPrefetchBytes / (2 * cols)) * cols;
  __m512 acc[NR][NT];
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < NT; ++t) acc[i][t] = _mm512_setzero_ps();
  for (int64_t c = 0; c < cols; c += 32) {
    const int64_t left = cols - c;
    const __mmask32 m = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
    __m512bh wv[NR];
    for (int i = 0; i < NR; ++i) {
      const uint16_t* p = w + (r + i) * cols + c;
      _mm_prefetch(reinterpret_cast<const char*>(p + ahead), _MM_HINT_T1);
      wv[i] = (__m512bh)_mm512_maskz_loadu_epi16(m, p);
    }
    for (int t = 0; t < NT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + t * cols + c);
      for (int i = 0; i < NR; ++i) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], wv[i], xv);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int t = 0; t < NT; ++t) y[t * ys + r + i] = _mm512_reduce_add_ps(acc[i][t]);
}

// Rows [0, n) of W, four at a time and then one by one, by the loop `dot` picks (x as bf16 for
// vdpbf16ps, as fp32 for the widening loop).
template <int NT>
void linear_rows(bool dot, const uint16_t* w, int64_t cols, int64_t n, const uint16_t* xb,
                 const float* xf, float* y, int64_t ys) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    if (dot)
      linear_rows_tile_dot<4, NT>(w, cols, r, xb, y, ys);
    else
      linear_rows_tile<4, NT>(w, cols, r, xf, y, ys);
  }
  for (; r < n; ++r) {
    if (dot)
      linear_rows_tile_dot<1, NT>(w, cols, r, xb, y, ys);
    else
      linear_rows_tile<1, NT>(w, cols, r, xf, y, ys);
  }
}

// Lines [l0, l1) of 64 bytes summed as fp32 lanes, four independent sums, prefetching into L2
// as the kernels do.
GPTOSS_AVX512 double read_lines_avx512(const uint8_t* base, int64_t l0, int64_t l1) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t l = l0;
  for (; l + 4 <= l1; l += 4) {
    const uint8_t* p = base + l * 64;
    for (int k = 0; k < 4; ++k)
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes + 64 * k), _MM_HINT_T1);
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(reinterpret_cast<const float*>(p)));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(reinterpret_cast<const float*>(p + 64)));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(reinterpret_cast<const float*>(p + 128)));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(reinterpret_cast<const float*>(p + 192)));
  }
  for (; l < l1; ++l) a0 = _mm512_add_ps(a0, _mm512_loadu_ps(reinterpret_cast<const float*>(base + l * 64)));
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

#endif  // GPTOSS_X86

bool linear_supported();
bool linear_bf16_dot_supported();

// x [T, cols] bf16 @ W.T (+ bias) for each of several W [rows_m, cols] bf16 (q, k and v: one
// pass over the three, one parallel region), T <= 4: fp32 accumulation, each result rounded to
// bf16 once (as PyTorch's bf16 matmul does). Needs AVX-512 (callers check `linear_supported`);
// bf16_dot picks the vdpbf16ps loop (AVX512-BF16, `linear_bf16_dot_supported`).
std::vector<at::Tensor> linear_many(const at::Tensor& x_in, at::TensorList weights_in,
                                    at::ArrayRef<c10::optional<at::Tensor>> biases,
                                    bool bf16_dot) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "linear: bf16 x [T, cols]");
  TORCH_CHECK(biases.size() == weights_in.size(), "linear: one bias (or None) per weight");
  const int64_t T = x_in.size(0), cols = x_in.size(1);
  TORCH_CHECK(T >= 1 && T <= 4, "linear: 1 to 4 tokens");
  TORCH_CHECK(linear_supported(), "linear needs AVX-512");
  TORCH_CHECK(!bf16_dot || linear_bf16_dot_supported(), "linear: bf16_dot needs AVX512-BF16");
  const at::Tensor x = x_in.contiguous();
  constexpr int64_t kRows = 64;  // rows per work item: whole cache lines of output
  struct Matrix {
    at::Tensor weight, bias, out;
    int64_t rows, first_chunk;
  };
  std::vector<Matrix> ms;
  int64_t chunks = 0;
  for (size_t m = 0; m < weights_in.size(); ++m) {
    const at::Tensor& w = weights_in[m];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == cols && w.scalar_type() == at::kBFloat16,
                "linear: bf16 weights [rows, cols]");
    Matrix mat{w.contiguous(), at::Tensor(), at::empty({T, w.size(0)}, x.options()), w.size(0),
               chunks};  // contiguous(): a no-op for the mapped weights
    if (biases[m].has_value()) {
      check_float(*biases[m], "linear: bias");
      mat.bias = biases[m]->contiguous();
      TORCH_CHECK(mat.bias.numel() == mat.rows, "linear: bias [rows]");
    }
    chunks += (mat.rows + kRows - 1) / kRows;
    ms.push_back(std::move(mat));
  }
#if GPTOSS_X86
  const auto* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  std::vector<float> xf(bf16_dot ? 0 : T * cols);
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = bf16_to_f32(xb[i]);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    float tile[4 * kRows];
    size_t m = 0;
    for (int64_t c = c0; c < c1; ++c) {
      while (m + 1 < ms.size() && c >= ms[m + 1].first_chunk) ++m;
      const Matrix& mat = ms[m];
      const int64_t r0 = (c - mat.first_chunk) * kRows, n = std::min(mat.rows, r0 + kRows) - r0;
      const uint16_t* wc =
          reinterpret_cast<const uint16_t*>(mat.weight.data_ptr<at::BFloat16>()) + r0 * cols;
      const float* xfp = xf.data();
      switch (T) {
        case 1: linear_rows<1>(bf16_dot, wc, cols, n, xb, xfp, tile, kRows); break;
        case 2: linear_rows<2>(bf16_dot, wc, cols, n, xb, xfp, tile, kRows); break;
        case 3: linear_rows<3>(bf16_dot, wc, cols, n, xb, xfp, tile, kRows); break;
        default: linear_rows<4>(bf16_dot, wc, cols, n, xb, xfp, tile, kRows); break;
      }
      auto* yp = reinterpret_cast<uint16_t*>(mat.out.data_ptr<at::BFloat16>());
      const std::optional<Elems> be =
          mat.bias.defined() ? std::optional<Elems>(Elems(mat.bias)) : std::nullopt;
      for (int64_t t = 0; t < T; ++t)
        for (int64_t i = 0; i < n; ++i)
          yp[t * mat.rows + r0 + i] =
              f32_to_bf16(tile[t * kRows + i] + (be ? be->get(r0 + i) : 0.0f));
    }
  });
#endif
  std::vector<at::Tensor> outs;
  for (auto& mat : ms) outs.push_back(mat.out);
  return outs;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& bias, bool bf16_dot) {
  const c10::optional<at::Tensor> biases[] = {bias};
  return linear_many(x, {weight}, biases, bf16_dot)[0];
}

bool linear_supported() {
#if GPTOSS_X86
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

bool linear_bf16_dot_supported() {
#if GPTOSS_X86
  return linear_supported() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

// Reads every byte of a buffer with all threads (prefetching ahead, as the kernels do) and
// returns a sum of its 64-byte lines as fp32: the machine's read bandwidth, for the benchmarks'
// ceilings, measured the way the kernels read.
double read_probe(const at::Tensor& buffer) {
  TORCH_CHECK(buffer.is_contiguous() && buffer.device().is_cpu(), "a contiguous CPU buffer");
  const auto* base = static_cast<const uint8_t*>(buffer.data_ptr());
  const int64_t lines = buffer.numel() * buffer.element_size() / 64;
  std::vector<double> partial(at::get_num_threads() + 1, 0.0);
  at::parallel_for(0, lines, 4096, [&](int64_t l0, int64_t l1) {
    double total = 0.0;
#if GPTOSS_X86
    if (__builtin_cpu_supports("avx512f")) {
      total = read_lines_avx512(base, l0, l1);
    } else
#endif
    {
      for (int64_t l = l0; l < l1; ++l) total += base[l * 64];
    }
    partial[at::get_thread_num()] += total;
  });
  double sum = 0.0;
  for (const double p : partial) sum += p;
  return sum;
}

// x * rsqrt(mean(x^2) + eps) * weight over the last dim, in fp32 (weight fp32), in x's dtype.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight_in, double eps) {
  check_float(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.to(at::kFloat).contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / std::max<int64_t>(n, 1);
  TORCH_CHECK(weight.numel() == n, "weight must have the last dim's size");
  at::Tensor out = at::empty_like(x);
  const Elems in(x), res(out);
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(n);
    for (int64_t r = r0; r < r1; ++r) {
      double sum = 0.0;  // a long fp32 sum drifts by ~n ulps; the reference sums pairwise
      for (int64_t i = 0; i < n; ++i) {
        row[i] = in.get(r * n + i);
        sum += double(row[i]) * row[i];
      }
      const float scale = 1.0f / std::sqrt(float(sum / double(n)) + float(eps));
      for (int64_t i = 0; i < n; ++i) res.set(r * n + i, (row[i] * scale) * w[i]);
    }
  });
  return out;
}

// Rotate x [T, heads, d] by position: halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with
// cos and sin [T, d / 2] (fp32) first rounded to x's dtype and every product and sum rounded to
// it, as the reference's ops in that dtype do.
at::Tensor apply_rope(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  check_float(x_in, "x");
  TORCH_CHECK(x_in.dim() == 3, "x must be [T, heads, head_dim]");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
  const int64_t T = x.size(0), heads = x.size(1), d = x.size(2), half = d / 2;
  TORCH_CHECK(cos.size(0) == T && cos.size(1) == half && sin.sizes() == cos.sizes(),
              "cos and sin must be [T, head_dim / 2]");
  at::Tensor out = at::empty_like(x);
  const Elems in(x), res(out);
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  at::parallel_for(0, T * heads, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = i / heads, base = i * d;
      for (int64_t j = 0; j < half; ++j) {
        const float cj = in.round(c[t * half + j]), sj = in.round(s[t * half + j]);
        const float x1 = in.get(base + j), x2 = in.get(base + half + j);
        res.set(base + j, in.round(in.round(x1 * cj) - in.round(x2 * sj)));
        res.set(base + half + j, in.round(in.round(x2 * cj) + in.round(x1 * sj)));
      }
    }
  });
  return out;
}

namespace {

constexpr int64_t kKeyChunk = 128;

// One query position's attention for the `group` query heads of KV head `g`, online softmax over
// its visible keys [lo, hi], then the sink. q: group * d fp32 (already scaled); out: group * d.
struct Attend {
  const uint8_t* k_base;  // the caches' storage
  const uint8_t* v_base;
  const int64_t* table;  // this sequence's block table
  int64_t block_size, row_bytes, head_bytes, d, group, g;

  // Where position `pos`'s row for KV head g lies in a cache (block_size is a power of two in
  // practice, but a division per key is cheap next to the 2 * d * group FLOPs it serves).
  int64_t offset(int64_t pos) const {
    const int64_t slot = table[pos / block_size] * block_size + pos % block_size;
    return slot * row_bytes + g * head_bytes;
  }
  const void* key(int64_t pos) const { return k_base + offset(pos); }
  const void* value(int64_t pos) const { return v_base + offset(pos); }
};

template <typename KV>
inline float load_kv(const void* p, int64_t i) {
  if constexpr (std::is_same_v<KV, uint16_t>)
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  else
    return static_cast<const float*>(p)[i];
}

template <typename KV>
void attend_one(const Attend& a, const float* q, int64_t lo, int64_t hi, const float* sinks,
                float* out) {
  const int64_t d = a.d, group = a.group;
  std::vector<float> m(group, -std::numeric_limits<float>::infinity()), l(group, 0.0f);
  std::vector<float> acc(group * d, 0.0f), scores(group * kKeyChunk), key(d);
  for (int64_t c0 = lo; c0 <= hi; c0 += kKeyChunk) {
    const int64_t n = std::min<int64_t>(kKeyChunk, hi + 1 - c0);
    for (int64_t j = 0; j < n; ++j) {
      const void* kp = a.key(c0 + j);
      for (int64_t e = 0; e < d; ++e) key[e] = load_kv<KV>(kp, e);
      for (int64_t h = 0; h < group; ++h) {
        float dot = 0.0f;
        for (int64_t e = 0; e < d; ++e) dot += q[h * d + e] * key[e];
        scores[h * kKeyChunk + j] = dot;
      }
    }
    for (int64_t h = 0; h < group; ++h) {
      float chunk_max = m[h];
      for (int64_t j = 0; j < n; ++j) chunk_max = std::max(chunk_max, scores[h * kKeyChunk + j]);
      const float rescale = std::exp(m[h] - chunk_max);  // exp(-inf) = 0 on the first chunk
      l[h] *= rescale;
      for (int64_t e = 0; e < d; ++e) acc[h * d + e] *= rescale;
      m[h] = chunk_max;
      for (int64_t j = 0; j < n; ++j) {
        const float p = std::exp(scores[h * kKeyChunk + j] - chunk_max);
        scores[h * kKeyChunk + j] = p;
        l[h] += p;
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const void* vp = a.value(c0 + j);
      for (int64_t e = 0; e < d; ++e) key[e] = load_kv<KV>(vp, e);  // the value row
      for (int64_t h = 0; h < group; ++h) {
        const float p = scores[h * kKeyChunk + j];
        float* o = acc.data() + h * d;
        for (int64_t e = 0; e < d; ++e) o[e] += p * key[e];
      }
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    // The sink is one more logit in the softmax, with no value.
    const float sink = sinks[a.g * group + h];
    const float top = std::max(m[h], sink);
    const float keep = std::exp(m[h] - top);
    const float total = l[h] * keep + std::exp(sink - top);
    for (int64_t e = 0; e < d; ++e) out[h * d + e] = acc[h * d + e] * keep / total;
  }
}

#if GPTOSS_X86

GPTOSS_AVX512 inline __m512 load16(const uint16_t* p) {  // 16 bf16 -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
GPTOSS_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

// Lane i of the result = the sum of the 16 lanes of v[i]: pairs interleaved and added within
// 128-bit lanes, then the 128-bit lanes transposed and added (45 instructions for 16 sums).
GPTOSS_AVX512 inline __m512 sum16(const __m512* v) {
  __m512 t[4];
  for (int g = 0; g < 4; ++g) {
    const __m512* w = v + 4 * g;
    const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    // Each 128-bit lane L now holds (sum_L w[0], sum_L w[1], sum_L w[2], sum_L w[3]).
    t[g] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
  }
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(t[0], t[1], 0x44),
                                   _mm512_shuffle_f32x4(t[0], t[1], 0xEE));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(t[2], t[3], 0x44),
                                   _mm512_shuffle_f32x4(t[2], t[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88), _mm512_shuffle_f32x4(u01, u23, 0xDD));
}

// Rows c0 .. c0 + n - 1 of the cache (keys or values: `row(i)` points at row i) as fp32 in `rows`.
template <typename KV, int DV, typename RowOf>
GPTOSS_AVX512 inline void widen_rows(RowOf row, int64_t c0, int64_t n, float* rows) {
  for (int64_t j = 0; j < n; ++j) {
    const auto* p = static_cast<const KV*>(row(c0 + j));
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(rows + j * 16 * DV + 16 * c, load16(p + 16 * c));
  }
}

// attend_one, vectorised for head_dim = 16 * DV: each chunk's keys (then values) are widened to
// fp32 once into `rows` (kKeyChunk x d, stays in L1) and then read by every head of the group.
template <typename KV, int DV>
GPTOSS_AVX512 void attend_avx512(const Attend& a, const float* q, int64_t lo, int64_t hi,
                                 const float* sinks, float* out, float* rows, float* scores) {
  constexpr int64_t d = 16 * DV;
  const int64_t group = a.group;
  float m[64], l[64];  // group <= 64 (checked by the caller)
  for (int64_t h = 0; h < group; ++h) {
    m[h] = -std::numeric_limits<float>::infinity();
    l[h] = 0.0f;
    for (int c = 0; c < DV; ++c) _mm512_storeu_ps(out + h * d + 16 * c, _mm512_setzero_ps());
  }
  for (int64_t c0 = lo; c0 <= hi; c0 += kKeyChunk) {
    const int64_t n = std::min<int64_t>(kKeyChunk, hi + 1 - c0);
    widen_rows<KV, DV>([&](int64_t i) { return a.key(i); }, c0, n, rows);
    for (int64_t h = 0; h < group; ++h) {
      __m512 qh[DV];
      for (int c = 0; c < DV; ++c) qh[c] = _mm512_loadu_ps(q + h * d + 16 * c);
      // 16 keys at a time: 16 partial-sum registers reduced together (sum16), not one by one.
      for (int64_t j0 = 0; j0 < n; j0 += 16) {
        __m512 acc[16];
        for (int j = 0; j < 16; ++j) {
          const float* k = rows + std::min<int64_t>(j0 + j, n - 1) * d;  // past n: a repeat
          acc[j] = _mm512_mul_ps(qh[0], _mm512_loadu_ps(k));
          for (int c = 1; c < DV; ++c) acc[j] = _mm512_fmadd_ps(qh[c], _mm512_loadu_ps(k + 16 * c), acc[j]);
        }
        _mm512_storeu_ps(scores + h * kKeyChunk + j0, sum16(acc));
      }
    }
    for (int64_t h = 0; h < group; ++h) {
      float* sc = scores + h * kKeyChunk;
      __m512 vmax = _mm512_set1_ps(m[h]);
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = tail_mask16(n - j);
        vmax = _mm512_mask_max_ps(vmax, k, vmax, _mm512_maskz_loadu_ps(k, sc + j));
      }
      const float top = _mm512_reduce_max_ps(vmax);
      const float rescale = std::exp(m[h] - top);  // 0 on the first chunk (m = -inf)
      l[h] *= rescale;
      for (int c = 0; c < DV; ++c) {
        float* o = out + h * d + 16 * c;
        _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), _mm512_set1_ps(rescale)));
      }
      m[h] = top;
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = tail_mask16(n - j);
        const __m512 p = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + j), _mm512_set1_ps(top)));
        _mm512_mask_storeu_ps(sc + j, k, p);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, p));
      }
      l[h] += _mm512_reduce_add_ps(sum);
    }
    widen_rows<KV, DV>([&](int64_t i) { return a.value(i); }, c0, n, rows);
    for (int64_t h = 0; h < group; ++h) {
      __m512 o[DV];
      for (int c = 0; c < DV; ++c) o[c] = _mm512_loadu_ps(out + h * d + 16 * c);
      const float* sc = scores + h * kKeyChunk;
      for (int64_t j = 0; j < n; ++j) {
        const __m512 p = _mm512_set1_ps(sc[j]);
        for (int c = 0; c < DV; ++c)
          o[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(rows + j * d + 16 * c), o[c]);
      }
      for (int c = 0; c < DV; ++c) _mm512_storeu_ps(out + h * d + 16 * c, o[c]);
    }
  }
  for (int64_t h = 0; h < group; ++h) {
    const float sink = sinks[a.g * group + h];
    const float top = std::max(m[h], sink);
    const float keep = std::exp(m[h] - top);
    const __m512 factor = _mm512_set1_ps(keep / (l[h] * keep + std::exp(sink - top)));
    for (int c = 0; c < DV; ++c) {
      float* o = out + h * d + 16 * c;
      _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), factor));
    }
  }
}

#endif  // GPTOSS_X86

// One query's attention for one KV head's group: the AVX-512 version where it applies.
void attend(const Attend& a, bool bf16_cache, bool vector, const float* q, int64_t lo, int64_t hi,
            const float* sinks, float* out, float* rows, float* scores) {
#if GPTOSS_X86
  if (vector) {
#define GPTOSS_ATTEND_DV(DV)                                                                  \
  case DV:                                                                                    \
    return bf16_cache ? attend_avx512<uint16_t, DV>(a, q, lo, hi, sinks, out, rows, scores)  \
                      : attend_avx512<float, DV>(a, q, lo, hi, sinks, out, rows, scores);
    switch (a.d / 16) {
      GPTOSS_ATTEND_DV(1)
      GPTOSS_ATTEND_DV(2)
      GPTOSS_ATTEND_DV(4)
      GPTOSS_ATTEND_DV(8)
      default:
        break;
    }
#undef GPTOSS_ATTEND_DV
  }
#else
  (void)vector, (void)rows, (void)scores;
#endif
  if (bf16_cache)
    attend_one<uint16_t>(a, q, lo, hi, sinks, out);
  else
    attend_one<float>(a, q, lo, hi, sinks, out);
}

}  // namespace

// Writes K and V of every token of the step to the cache (slot_mapping), then computes attention
// for the queries of every sequence whose chunk has at most `max_queries` tokens; rows of longer
// chunks are returned zeroed, for the caller to fill. q [T, Hq, d]; k, v [T, Hkv, d]; caches
// [blocks, block_size, Hkv, d]; sinks [Hq] fp32; block_tables [B, max_blocks]; query_lens and
// seq_lens per sequence; window 0 means full attention. Returns [T, Hq, d] in q's dtype.
at::Tensor paged_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                           const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& sinks_in, const at::Tensor& slot_mapping_in,
                           const at::Tensor& block_tables_in, at::IntArrayRef query_lens,
                           at::IntArrayRef seq_lens, int64_t window, double sm_scale,
                           int64_t max_queries) {
  check_float(q_in, "q");
  check_float(k_cache, "the K cache");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.dim() == 4,
              "K and V caches must be contiguous [blocks, block_size, Hkv, d] of one dtype");
  const at::Tensor q = q_in.contiguous();
  const int64_t T = q.size(0), n_heads = q.size(1), d = q.size(2);
  const int64_t block_size = k_cache.size(1), n_kv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d && n_heads % n_kv == 0, "head shapes do not match");
  TORCH_CHECK(int64_t(query_lens.size()) == int64_t(seq_lens.size()), "one length per sequence");
  const at::Tensor k = k_in.to(k_cache.scalar_type()).contiguous();
  const at::Tensor v = v_in.to(v_cache.scalar_type()).contiguous();
  const at::Tensor slots = slot_mapping_in.to(at::kLong).contiguous();
  const at::Tensor tables = block_tables_in.to(at::kLong).contiguous();
  const at::Tensor sinks = sinks_in.to(at::kFloat).contiguous();
  TORCH_CHECK(k.size(0) == T && slots.numel() == T, "one cache slot per token");

  // The cache write: rows of Hkv * d elements, same dtype on both sides.
  const int64_t row_bytes = n_kv * d * k_cache.element_size();
  const int64_t n_slots = k_cache.size(0) * block_size;
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < n_slots, "cache slot ", slot[t], " out of range");
    std::memcpy(static_cast<uint8_t*>(k_cache.data_ptr()) + slot[t] * row_bytes,
                static_cast<const uint8_t*>(k.data_ptr()) + t * row_bytes, row_bytes);
    std::memcpy(static_cast<uint8_t*>(v_cache.data_ptr()) + slot[t] * row_bytes,
                static_cast<const uint8_t*>(v.data_ptr()) + t * row_bytes, row_bytes);
  }

  // Tasks: (query token, KV head) of the sequences computed here.
  struct Task {
    int64_t token, seq, pos;
  };
  std::vector<Task> tasks;
  int64_t start = 0;
  for (int64_t s = 0; s < int64_t(query_lens.size()); ++s) {
    const int64_t n_q = query_lens[s];
    if (n_q <= max_queries)
      for (int64_t i = 0; i < n_q; ++i) tasks.push_back({start + i, s, seq_lens[s] - n_q + i});
    start += n_q;
  }
  TORCH_CHECK(start == T, "query lengths must add up to the tokens of q");
  at::Tensor out = at::zeros_like(q);
  const int64_t group = n_heads / n_kv;
  const float scale = float(sm_scale);
  const Elems qe(q), oe(out);
  const bool bf16_cache = k_cache.scalar_type() == at::kBFloat16;
  const int64_t width = tables.size(1);
#if GPTOSS_X86
  const bool vector = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && d % 16 == 0 && d <= 128 &&
                      group <= 64;
#else
  const bool vector = false;
#endif
  const auto* k_base = static_cast<const uint8_t*>(k_cache.data_ptr());
  const auto* v_base = static_cast<const uint8_t*>(v_cache.data_ptr());
  const int64_t* table_base = tables.data_ptr<int64_t>();
  const int64_t element = k_cache.element_size();
  at::parallel_for(0, int64_t(tasks.size()) * n_kv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(group * d), of(group * d);
    std::vector<float> rows(kKeyChunk * d), scores(group * kKeyChunk);
    for (int64_t i = i0; i < i1; ++i) {
      const Task& task = tasks[i / n_kv];
      const int64_t g = i % n_kv;
      const Attend a{k_base, v_base, table_base + task.seq * width, block_size,
                     n_kv * d * element, d * element, d, group, g};
      for (int64_t e = 0; e < group * d; ++e)
        qf[e] = qe.get((task.token * n_heads + g * group) * d + e) * scale;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, task.pos - window + 1) : 0;
      attend(a, bf16_cache, vector, qf.data(), lo, task.pos, sinks.data_ptr<float>(), of.data(),
             rows.data(), scores.data());
      for (int64_t e = 0; e < group * d; ++e)
        oe.set((task.token * n_heads + g * group) * d + e, of[e]);
    }
  });
  return out;
}

}  // namespace gptoss_cpu

TORCH_LIBRARY_FRAGMENT(gpt_oss_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, bool bf16_dot) -> Tensor",
        &gptoss_cpu::linear);
  m.def("linear_many(Tensor x, Tensor[] weights, Tensor?[] biases, bool bf16_dot) -> Tensor[]",
        &gptoss_cpu::linear_many);
  m.def("linear_supported() -> bool", &gptoss_cpu::linear_supported);
  m.def("linear_bf16_dot_supported() -> bool", &gptoss_cpu::linear_bf16_dot_supported);
  m.def("read_probe(Tensor buffer) -> float", &gptoss_cpu::read_probe);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &gptoss_cpu::rms_norm);
  m.def("apply_rope(Tensor x, Tensor cos, Tensor sin) -> Tensor", &gptoss_cpu::apply_rope);
  m.def(
      "paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
      "Tensor sinks, Tensor slot_mapping, Tensor block_tables, int[] query_lens, int[] seq_lens, "
      "int window, float sm_scale, int max_queries) -> Tensor",
      &gptoss_cpu::paged_attention);
}
