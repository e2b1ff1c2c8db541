// y = x @ W^T for weights kept in fp32, bf16, or int8 with one fp32 scale per output row (weight-only quant).
//
// Decode (a few tokens) is a matrix-vector product bound by memory bandwidth: every weight byte is read once
// per token, so the kernel streams rows of W once, converts them to fp32 in registers, and reuses x from L1.
// Prefill (many tokens) is compute bound. On CPUs with AVX512-BF16 a bf16 model runs the matmul natively in
// bf16 (about 2x the fp32 sgemm there); elsewhere (plain AVX2) the weight is converted to fp32 once per call
// and handed to the fp32 matmul (matmul_fp32), far faster than the bf16 or int8 matmuls on such CPUs.
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>
#include <torch/version.h>

#include <atomic>
#include <optional>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "argmax.h"
#include "gguf_blocks.h"
#include "kernels.h"
#include "vec.h"

namespace gemma3_fast {
namespace {

// Up to this many tokens the decode kernel (one pass over the weight for all of them) wins; beyond, the matmul on a
// converted copy. The kernel's cost grows by a token's dot products, the matmul's starts with the conversion and
// its oneDNN setup (and ~20 MiB of buffers). Whole-model prefill, 2-core EPYC, kernel vs matmul, ms, at 10 / 16 /
// 24 / 32 tokens. AVX-512 build: fp32 43-45 / 63-65 / 78-86 / 95-97 vs 71-72 / 72-77 / 73-74 / 73-74; bf16 (the
// AVX512-BF16 dot) 20-23 / 26-28 / 35-38 / 43-45 vs 37-42 / 39-41 / 39-42 / 40-43; int8 (VNNI) 14-16 / 19-21 /
// 24-27 / 29-32 vs 39-46 / 43-47 / 43-49 / 42-47. x86-64-v3 build: fp32 41-48 / 59-61 at 10 / 16 vs 66-77 / 68-70;
// bf16 35 / 48 at 10 / 16 vs 42-50 / 43-44; int8 18 / 25-26 / 37-39 / 49-56 vs 44-45 / 40-47 / 42-50 / 40-45.
// Builds without these SIMD paths keep the limit of 8 this was first measured at.
constexpr int64_t max_gemv_tokens(at::ScalarType weight_type) {
#if defined(GEMMA3_AVX2)
  if (weight_type == at::kChar) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 32;
#else
    return 24;
#endif
  }
  if (weight_type == at::kBFloat16) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    return 24;
#else
    return 12;
#endif
  }
  return 16;
#else
  (void)weight_type;
  return 8;
#endif
}

inline float to_f32_w(int8_t x) { return static_cast<float>(x); }
inline float to_f32_w(float x) { return x; }
inline float to_f32_w(vec::bf16 x) { return static_cast<float>(x); }

// The activation row, prepared once per call in the form each weight type's inner loop wants.
struct PreparedX {
  const vec::bf16* bf16_row = nullptr;  // the row itself when x is bf16 (AVX512-BF16 dot products)
  std::vector<float> deinterleaved;  // bf16 weights, AVX2: per 16 inputs, the 8 even then the 8 odd ones
  vec::aligned_vector<int16_t> q;    // int8 weights: x quantized to int16 ...
  float q_scale = 0.f;               // ... with x ~= q * q_scale
};

// A token's result from its vector sum: sum * scale + dot(x[i0:k], w[i0:k]), the scalar tail (and the whole dot
// without SIMD), in fp32. The tail is not inlined: inlined into dot_tokens<8>, the compiler vectorized the 8
// tokens' tails together and fused the multiply and add differently than for one token's (batch-invariance).
template <typename TW>
__attribute__((noinline)) float dot_tail(float sum, float scale, const float* x, const TW* w, int64_t i0,
                                         int64_t k) {
  float s = 0.f;
  for (int64_t i = i0; i < k; ++i) s += x[i] * to_f32_w(w[i]);
  return sum * scale + s;
}

template <typename TW>
inline float finish_dot(float sum, float scale, const float* x, const TW* w, int64_t i0, int64_t k) {
  return i0 < k ? dot_tail(sum, scale, x, w, i0, k) : sum * scale;  // no call per row and token without a tail
}

// R tokens against one weight row at once, out[j] = dot(x[j], w) in fp32: the row is loaded (and widened) once
// for all R, and each token has its own accumulators, updated in the same order whatever R is, so a token's
// result does not depend on the others (batch-invariance: R = 1 is the batch-1 decode). Several rows read side
// by side as separate streams for one token were measured before (2-core EPYC, guided chunks): one stream per
// chunk was best, by 1.03-1.10x.
template <int R>
inline void dot_tokens(const float* const* x, const PreparedX* const*, const float* w, int64_t k,
                       float* out) {
  int64_t i = 0;
  float sum[R] = {};
#if defined(__AVX512F__)
  __m512 a[R];
  for (int j = 0; j < R; ++j) a[j] = _mm512_setzero_ps();
  for (; i + 16 <= k; i += 16) {
    const __m512 wv = _mm512_loadu_ps(w + i);
    for (int j = 0; j < R; ++j) a[j] = _mm512_fmadd_ps(_mm512_loadu_ps(x[j] + i), wv, a[j]);
  }
  for (int j = 0; j < R; ++j) sum[j] = _mm512_reduce_add_ps(a[j]);
#elif defined(GEMMA3_AVX2)
  __m256 a[R];
  for (int j = 0; j < R; ++j) a[j] = _mm256_setzero_ps();
  for (; i + 8 <= k; i += 8) {
    const __m256 wv = _mm256_loadu_ps(w + i);
    for (int j = 0; j < R; ++j) a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x[j] + i), wv, a[j]);
  }
  for (int j = 0; j < R; ++j) sum[j] = vec::vhsum(a[j]);
#elif defined(GEMMA3_NEON)
  float32x4_t a[R], b[R];  // two accumulators per row: one would wait on the FMA latency
  for (int j = 0; j < R; ++j) a[j] = b[j] = vdupq_n_f32(0.f);
  for (; i + 8 <= k; i += 8) {
    const float32x4_t w0 = vld1q_f32(w + i), w1 = vld1q_f32(w + i + 4);
    for (int j = 0; j < R; ++j) {
      a[j] = vfmaq_f32(a[j], vld1q_f32(x[j] + i), w0);
      b[j] = vfmaq_f32(b[j], vld1q_f32(x[j] + i + 4), w1);
    }
  }
  for (int j = 0; j < R; ++j) sum[j] = vaddvq_f32(vaddq_f32(a[j], b[j]));
#endif
  for (int j = 0; j < R; ++j) out[j] = finish_dot(sum[j], 1.f, x[j], w, i, k);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// bf16 x and bf16 W: vdpbf16ps multiplies 32 pairs into fp32 sums in one instruction (exact products). Two
// accumulators per row and token (even and odd 32-weight steps): one waited on vdpbf16ps's latency.
// RR rows (w, w + ldw, ...) against R tokens: v[r * R + j] = row r's lane sums with token j (their
// _mm512_reduce_add_ps is the dot) over weights [0, returned index). Each accumulator sees its weights in the
// same order whatever RR and R are, so the rows taken together change the speed, not one bit of the sums.
template <int RR, int R>
inline int64_t dot_vecs(const PreparedX* const* px, const vec::bf16* w, int64_t ldw, int64_t k, __m512* v) {
  int64_t i = 0;
  __m512 a[RR][R], b[RR][R];
  for (int r = 0; r < RR; ++r)
    for (int j = 0; j < R; ++j) a[r][j] = b[r][j] = _mm512_setzero_ps();
  auto load = [](const vec::bf16* p) { return (__m512bh)_mm512_loadu_si512(p); };
  const vec::bf16* xb[R];
  for (int j = 0; j < R; ++j) xb[j] = px[j]->bf16_row;
  for (; i + 64 <= k; i += 64) {
    __m512bh w0[RR], w1[RR];
    for (int r = 0; r < RR; ++r) {
      w0[r] = load(w + r * ldw + i);
      w1[r] = load(w + r * ldw + i + 32);
    }
    for (int j = 0; j < R; ++j) {
      const __m512bh x0 = load(xb[j] + i), x1 = load(xb[j] + i + 32);
      for (int r = 0; r < RR; ++r) {
        a[r][j] = _mm512_dpbf16_ps(a[r][j], x0, w0[r]);
        b[r][j] = _mm512_dpbf16_ps(b[r][j], x1, w1[r]);
      }
    }
  }
  for (; i + 32 <= k; i += 32) {
    for (int r = 0; r < RR; ++r) {
      const __m512bh w0 = load(w + r * ldw + i);
      for (int j = 0; j < R; ++j) a[r][j] = _mm512_dpbf16_ps(a[r][j], load(xb[j] + i), w0);
    }
  }
  for (int r = 0; r < RR; ++r)
    for (int j = 0; j < R; ++j) v[r * R + j] = _mm512_add_ps(a[r][j], b[r][j]);
  return i;
}
#endif

template <int R>
inline void dot_tokens(const float* const* x, const PreparedX* const* px, const vec::bf16* w, int64_t k,
                       float* out) {
  int64_t i = 0;
  float sum[R] = {};
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  if (px[0]->bf16_row != nullptr) {  // the pairs' x all have one dtype
    __m512 v[R];
    i = dot_vecs<1, R>(px, w, k, k, v);
    for (int j = 0; j < R; ++j) out[j] = finish_dot(_mm512_reduce_add_ps(v[j]), 1.f, x[j], w, i, k);
    return;
  }
#endif
#ifdef GEMMA3_AVX2
  // A bf16 is the top half of an fp32: the even elements of 16 weights are (v << 16), the odd ones (v & hi);
  // x was deinterleaved to match (8 even, then 8 odd inputs per 16).
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  __m256 a[R];
  for (int j = 0; j < R; ++j) a[j] = _mm256_setzero_ps();
  const float* xd[R];
  for (int j = 0; j < R; ++j) xd[j] = px[j]->deinterleaved.data();
  for (; i + 16 <= k; i += 16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
    const __m256 w_even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    const __m256 w_odd = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
    for (int j = 0; j < R; ++j) {
      a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(xd[j] + i), w_even, a[j]);
      a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(xd[j] + i + 8), w_odd, a[j]);
    }
  }
  for (int j = 0; j < R; ++j) sum[j] = vec::vhsum(a[j]);
#elif defined(GEMMA3_NEON)
  // 8 bf16 weights widen to two fp32 vectors in order (ushll / ushll2 by 16): no deinterleaved x needed.
  float32x4_t a[R], b[R];
  for (int j = 0; j < R; ++j) a[j] = b[j] = vdupq_n_f32(0.f);
  for (; i + 8 <= k; i += 8) {
    const uint16x8_t v = vld1q_u16(reinterpret_cast<const uint16_t*>(w + i));
    const float32x4_t w0 = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(v), 16));
    const float32x4_t w1 = vreinterpretq_f32_u32(vshll_high_n_u16(v, 16));
    for (int j = 0; j < R; ++j) {
      a[j] = vfmaq_f32(a[j], vld1q_f32(x[j] + i), w0);
      b[j] = vfmaq_f32(b[j], vld1q_f32(x[j] + i + 4), w1);
    }
  }
  for (int j = 0; j < R; ++j) sum[j] = vaddvq_f32(vaddq_f32(a[j], b[j]));
#endif
  for (int j = 0; j < R; ++j) out[j] = finish_dot(sum[j], 1.f, x[j], w, i, k);
}

// int8 weights: int16 x times int8 w summed in int32 lanes. Each lane adds at most 2 * 32767 * 127 per step, so
// the int32 sums are moved to fp32 every kFlush weights, long before they could overflow.
constexpr int64_t kFlush = 4096;

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// The int8 kernel's AVX-512 loop, RR rows (w, w + ldw, ...) against R tokens: v[r * R + j] = row r's lane sums
// with token j over weights [0, returned index), in units of the token's int16 quantum (q_scale). The sums are
// exact integers until each kFlush, so taking rows together changes no bit of them.
template <int RR, int R>
inline int64_t dot_vecs(const PreparedX* const* px, const int8_t* w, int64_t ldw, int64_t k, __m512* v) {
  int64_t i = 0;
  const int16_t* xq[R];
  for (int j = 0; j < R; ++j) xq[j] = px[j]->q.data();
  // vpdpwssd multiplies 32 int16 pairs and adds them into int32 lanes in one instruction. Two accumulators per
  // row (even and odd 32-weight steps): with one, the kernel waited on vpdpwssd's latency and ran at ~45 GB/s
  // from cache on 2 cores, below what DRAM delivers here in a fast phase.
  __m512 f[RR][R];
  for (int r = 0; r < RR; ++r)
    for (int j = 0; j < R; ++j) f[r][j] = _mm512_setzero_ps();
  auto widen = [](const int8_t* p) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  };
  while (i + 32 <= k) {
    __m512i a[RR][R], b[RR][R];
    for (int r = 0; r < RR; ++r)
      for (int j = 0; j < R; ++j) a[r][j] = b[r][j] = _mm512_setzero_si512();
    const int64_t stop = std::min(k, i + kFlush);
    for (; i + 64 <= stop; i += 64) {
      __m512i w0[RR], w1[RR];
      for (int r = 0; r < RR; ++r) {
        w0[r] = widen(w + r * ldw + i);
        w1[r] = widen(w + r * ldw + i + 32);
      }
      for (int j = 0; j < R; ++j) {
        const __m512i x0 = _mm512_loadu_si512(xq[j] + i), x1 = _mm512_loadu_si512(xq[j] + i + 32);
        for (int r = 0; r < RR; ++r) {
          a[r][j] = _mm512_dpwssd_epi32(a[r][j], x0, w0[r]);
          b[r][j] = _mm512_dpwssd_epi32(b[r][j], x1, w1[r]);
        }
      }
    }
    for (; i + 32 <= stop; i += 32) {
      for (int r = 0; r < RR; ++r) {
        const __m512i w0 = widen(w + r * ldw + i);
        for (int j = 0; j < R; ++j) a[r][j] = _mm512_dpwssd_epi32(a[r][j], _mm512_loadu_si512(xq[j] + i), w0);
      }
    }
    for (int r = 0; r < RR; ++r)
      for (int j = 0; j < R; ++j)
        f[r][j] = _mm512_add_ps(f[r][j], _mm512_cvtepi32_ps(_mm512_add_epi32(a[r][j], b[r][j])));
  }
  for (int r = 0; r < RR; ++r)
    for (int j = 0; j < R; ++j) v[r * R + j] = f[r][j];
  return i;
}
#endif

template <int R>
inline void dot_tokens(const float* const* x, const PreparedX* const* px, const int8_t* w, int64_t k,
                       float* out) {
  int64_t i = 0;
  float sum[R] = {};
  const int16_t* xq[R];
  for (int j = 0; j < R; ++j) xq[j] = px[j]->q.data();
  (void)xq;  // read by the AVX2 and NEON loops
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 v[R];
  i = dot_vecs<1, R>(px, w, k, k, v);
  for (int j = 0; j < R; ++j) sum[j] = _mm512_reduce_add_ps(v[j]);
#elif defined(GEMMA3_AVX2)
  __m256 f[R];
  for (int j = 0; j < R; ++j) f[j] = _mm256_setzero_ps();
  // 32 weights per step into two accumulators (16 per step into one ran at ~25 GB/s from L2 on the 2-core EPYC's
  // x86-64-v3 build, and its speed moved by 25% with the loop's placement in the binary). Each lane still adds
  // at most 2 products per 16 weights, so the kFlush bound holds for a + b.
  auto widen = [](const int8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  };
  while (i + 16 <= k) {
    __m256i a[R], b[R];
    for (int j = 0; j < R; ++j) a[j] = b[j] = _mm256_setzero_si256();
    const int64_t stop = std::min(k, i + kFlush);
    auto xv = [&](int j, int64_t at) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[j] + at)); };
    for (; i + 32 <= stop; i += 32) {
      const __m256i w0 = widen(w + i), w1 = widen(w + i + 16);
      for (int j = 0; j < R; ++j) {
        a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(xv(j, i), w0));
        b[j] = _mm256_add_epi32(b[j], _mm256_madd_epi16(xv(j, i + 16), w1));
      }
    }
    for (; i + 16 <= stop; i += 16) {
      const __m256i w0 = widen(w + i);
      for (int j = 0; j < R; ++j) a[j] = _mm256_add_epi32(a[j], _mm256_madd_epi16(xv(j, i), w0));
    }
    for (int j = 0; j < R; ++j) f[j] = _mm256_add_ps(f[j], _mm256_cvtepi32_ps(_mm256_add_epi32(a[j], b[j])));
  }
  for (int j = 0; j < R; ++j) sum[j] = vec::vhsum(f[j]);
#elif defined(GEMMA3_NEON)
  // smlal / smlal2: int16 x times int8 w (widened to int16) into int32 lanes, one product per lane per 8
  // weights in each of a and b, as the AVX2 madd path adds two per lane per 16: the same kFlush bound holds.
  float32x4_t f[R];
  for (int j = 0; j < R; ++j) f[j] = vdupq_n_f32(0.f);
  while (i + 8 <= k) {
    int32x4_t a[R], b[R];
    for (int j = 0; j < R; ++j) a[j] = b[j] = vdupq_n_s32(0);
    for (const int64_t stop = std::min(k, i + kFlush); i + 8 <= stop; i += 8) {
      const int16x8_t wv = vmovl_s8(vld1_s8(w + i));
      for (int j = 0; j < R; ++j) {
        const int16x8_t xv = vld1q_s16(xq[j] + i);
        a[j] = vmlal_s16(a[j], vget_low_s16(xv), vget_low_s16(wv));
        b[j] = vmlal_high_s16(b[j], xv, wv);
      }
    }
    for (int j = 0; j < R; ++j) f[j] = vaddq_f32(f[j], vaddq_f32(vcvtq_f32_s32(a[j]), vcvtq_f32_s32(b[j])));
  }
  for (int j = 0; j < R; ++j) sum[j] = vaddvq_f32(f[j]);
#endif
  for (int j = 0; j < R; ++j) out[j] = finish_dot(sum[j], px[j]->q_scale, x[j], w, i, k);
}

PreparedX prepare(const float* x, const vec::bf16* x_bf16, int64_t k, at::ScalarType wt) {
  PreparedX px;
  if (wt == at::kBFloat16) px.bf16_row = x_bf16;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  const bool native_bf16_dot = x_bf16 != nullptr;  // dot1 reads the bf16 row itself, no fp32 copy needed
#else
  const bool native_bf16_dot = false;
#endif
#ifdef GEMMA3_AVX2
  const bool deinterleave = wt == at::kBFloat16 && !native_bf16_dot;  // the AVX2 bf16 loop's x layout
#else
  const bool deinterleave = false;
  (void)native_bf16_dot;
#endif
  if (deinterleave) {
    px.deinterleaved.resize(k);
    for (int64_t i = 0; i + 16 <= k; i += 16)
      for (int64_t j = 0; j < 8; ++j) {
        px.deinterleaved[i + j] = x[i + 2 * j];
        px.deinterleaved[i + 8 + j] = x[i + 2 * j + 1];
      }
  } else if (wt == at::kChar) {
    px.q.resize(k);
    px.q_scale = vec::quantize_int16(x, k, px.q.data());
  }
  return px;
}

// out[t][r] = scale[r] * dot(x[t], W[r]) for rows [r0, r1); x stays in L1 while W streams past. Each row is read
// once for all tokens, taken kTokenGroup at a time (dot_tokens' accumulators must fit the vector registers).
#if defined(__AVX512F__)
constexpr int64_t kTokenGroup = 8;
#else
constexpr int64_t kTokenGroup = 4;  // 16 vector registers (AVX2, NEON's 32 of half the width)
#endif

template <int T, typename TW, typename TO>
inline void row_tokens(const float* x, const std::vector<PreparedX>& px, int64_t t0, const TW* row,
                       const float* scales, TO* out, int64_t n, int64_t k, int64_t r) {
  const float* xs[T];
  const PreparedX* ps[T];
  for (int j = 0; j < T; ++j) {
    xs[j] = x + (t0 + j) * k;
    ps[j] = &px[t0 + j];
  }
  float s[T];
  dot_tokens<T>(xs, ps, row, k, s);
  for (int j = 0; j < T; ++j) out[(t0 + j) * n + r] = vec::from_f32<TO>(scales ? s[j] * scales[r] : s[j]);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    (defined(__AVX512VNNI__) || defined(__AVX512BF16__))
#define GEMMA3_ROWS16 1
// The weight types whose dot_vecs exists (int8 with VNNI; bf16 with AVX512-BF16, when x is bf16 too).
template <typename TW>
constexpr bool kHasRows16 = false;
#if defined(__AVX512VNNI__)
template <>
constexpr bool kHasRows16<int8_t> = true;
#endif
#if defined(__AVX512BF16__)
template <>
constexpr bool kHasRows16<vec::bf16> = true;
#endif

// 16 rows' lane sums (one token each) -> one vector of their 16 sums, row r in lane r. Each row is added up in
// the order of GCC's _mm512_reduce_add_ps (lanes l + (l + 8), then + 4, then {0, 1} + {2, 3}, then 0 + 1), with
// shuffles that serve all 16 rows at each level: 45 instructions for 16 sums instead of ~8 a sum, and one vector
// store of the results instead of 16 scalar ones.
inline __m512 reduce16(const __m512* v) {
  __m512 p[8], q[4], r[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: row 2i's sums of lanes l and l + 8; lanes 8-15: row 2i + 1's
    p[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lane c: row 4i + c's 4 sums (l + 4)
    q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(p[2 * i], p[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // 128-bit lane c: rows 8i + c, 8i + 4 + c, 2 sums each
    r[i] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // lane 4c + e: row 4e + c; permuted back to row order.
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(r[0], r[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(r[0], r[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), s);
}

inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(vec::bf16* p, __m512 v, __mmask16 m) {  // rounded as c10::BFloat16 rounds, NaN -> 0x7fc0
  __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
  x = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  x = _mm512_mask_mov_epi32(x, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(x));
}

template <int RR, int T, typename TW>
inline void tokens_vecs(const std::vector<PreparedX>& px, int64_t t0, const TW* row, int64_t k, __m512* v) {
  const PreparedX* ps[T];
  for (int j = 0; j < T; ++j) ps[j] = &px[t0 + j];
  dot_vecs<RR, T>(ps, row, k, k, v);
}

// int8 weights with several tokens: rows go 2 at a time against 4 tokens at a time, so each x vector loaded
// serves both rows. One row against 8 tokens loaded an x vector for every vpdpwssd, and those loads, more than
// the dot products, bounded the kernel (2-core EPYC, 8 tokens, alternating processes: 1.15-1.25x on the layers'
// shapes and the head). bf16 weights keep one row: two rows measured the same on the layers' shapes and slower
// on the head (15 against 13-14 ms), whose bf16 stream is twice as many bytes.
template <typename TW>
constexpr int64_t kRowBlock = 1;
template <>
constexpr int64_t kRowBlock<int8_t> = 2;

// gemv_rows for k a multiple of 32 with a dot_vecs: rows taken 16 at a time, each row's vector sums kept, then
// reduced, scaled and stored 16 rows at once (reduce16). Every token count, 1 included, runs this path, so a
// token's outputs do not depend on the others (batch-invariance). At 8 tokens the per-row reductions, scalar
// scaling and strided scalar stores had been about a third of the kernel's instructions at k = 640.
template <typename TW, typename TO>
void gemv_rows16(const std::vector<PreparedX>& px, int64_t tokens, const TW* w, const float* scales, TO* out,
                 int64_t n, int64_t k, int64_t r0, int64_t r1) {
  __m512 acc[kTokenGroup][16];
  for (int64_t rb = r0; rb < r1; rb += 16) {
    const int64_t rows = std::min<int64_t>(16, r1 - rb);
    const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1);
    const __m512 sc = scales != nullptr ? _mm512_maskz_loadu_ps(mask, scales + rb) : _mm512_set1_ps(1.f);
    for (int64_t t = 0; t < tokens; t += kTokenGroup) {
      const int64_t g = std::min(kTokenGroup, tokens - t);
      for (int64_t i = 0; i < 16;) {
        const TW* row = w + (rb + i) * k;
        if (i >= rows) {
          for (int64_t j = 0; j < g; ++j) acc[j][i] = _mm512_setzero_ps();
          ++i;
          continue;
        }
        constexpr int64_t kRows = kRowBlock<TW>, kRowTokens = kTokenGroup / kRows;
        const int64_t rr = g > 1 && i + kRows <= rows ? kRows : 1;
        for (int64_t q = 0; q < rr && tokens > 1; ++q)
          if (rb + i + q + vec::kPrefetchRows < r1)
            vec::prefetch_l2(row + (q + vec::kPrefetchRows) * k, k * static_cast<int64_t>(sizeof(TW)));
        if (rr == 1) {
          __m512 v[kTokenGroup];
          vec::with_token_count<kTokenGroup>(g, [&](auto c) { tokens_vecs<1, decltype(c)::value>(px, t, row, k, v); });
          for (int64_t j = 0; j < g; ++j) acc[j][i] = v[j];
        } else if constexpr (kRows > 1) {
          for (int64_t s = 0; s < g; s += kRowTokens)
            vec::with_token_count<kRowTokens>(std::min(kRowTokens, g - s), [&](auto c) {
              constexpr int C = decltype(c)::value;
              __m512 v[kRows * C];
              tokens_vecs<kRows, C>(px, t + s, row, k, v);
              for (int64_t q = 0; q < kRows; ++q)
                for (int j = 0; j < C; ++j) acc[s + j][i + q] = v[q * C + j];
            });
        }
        i += rr;
      }
      for (int64_t j = 0; j < g; ++j) {
        __m512 s = reduce16(acc[j]);
        if constexpr (std::is_same_v<TW, int8_t>) s = _mm512_mul_ps(s, _mm512_set1_ps(px[t + j].q_scale));
        if (scales != nullptr) s = _mm512_mul_ps(s, sc);
        store16(out + (t + j) * n + rb, s, mask);
      }
    }
  }
}
#endif

template <typename TW, typename TO>
void gemv_rows(const float* x, const std::vector<PreparedX>& px, int64_t tokens, const TW* w, const float* scales,
               TO* out, int64_t n, int64_t k, int64_t r0, int64_t r1) {
#ifdef GEMMA3_ROWS16
  if constexpr (kHasRows16<TW>) {
    if (k % 32 == 0 && (!std::is_same_v<TW, vec::bf16> || px[0].bf16_row != nullptr))
      return gemv_rows16(px, tokens, w, scales, out, n, k, r0, r1);
  }
#endif
  for (int64_t r = r0; r < r1; ++r) {
    const TW* row = w + r * k;
    if (tokens > 1 && r + vec::kPrefetchRows < r1)
      vec::prefetch_l2(row + vec::kPrefetchRows * k, k * static_cast<int64_t>(sizeof(TW)));
    for (int64_t t = 0; t < tokens; t += kTokenGroup) {
      vec::with_token_count<kTokenGroup>(std::min(kTokenGroup, tokens - t), [&](auto c) {
        row_tokens<decltype(c)::value>(x, px, t, row, scales, out, n, k, r);
      });
    }
  }
}

}  // namespace

namespace {

// oneDNN keeps state for every distinct matmul shape it has run, about 3 MB each, never freed: a server
// prefilling prompts of every length grew by that per new length (RSS +260 MB over 80 lengths, flat with MKL).
// Rows are padded with zeros to a multiple of kRowBucket, which bounds the shapes; each output row is still its
// own x row times W. Costs at most kRowBucket - 1 rows of work, a few % at prompt lengths.
constexpr int64_t kRowBucket = 32;

template <typename F>
at::Tensor with_padded_rows(const at::Tensor& x2, const F& matmul) {
  const int64_t m = x2.size(0), padded = (m + kRowBucket - 1) / kRowBucket * kRowBucket;
  if (padded == m) return matmul(x2);
  at::Tensor xp = at::zeros({padded, x2.size(1)}, x2.options());
  xp.narrow(0, 0, m).copy_(x2);
  return matmul(xp).narrow(0, 0, m);
}

}  // namespace

// fp32 x @ W^T for prefill. torch's matmul goes to MKL's sgemm; oneDNN's fp32 matmul, which torch ships and
// calls through the mkldnn::_linear_pointwise op, runs the model's prefill shapes (512 tokens x 640..4096) at
// ~200-215 GFLOP/s on the 2-core EPYC against MKL's ~130-185, same fp32 arithmetic. Builds of torch without
// oneDNN (or with it switched off) keep MKL.
at::Tensor matmul_fp32(const at::Tensor& x, const at::Tensor& w) {
  using Fn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::string_view,
                        c10::List<std::optional<c10::Scalar>>, std::optional<c10::string_view>);
  static const std::optional<c10::TypedOperatorHandle<Fn>> onednn = []() -> std::optional<c10::TypedOperatorHandle<Fn>> {
    const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
    if (!op.has_value() || !op->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    return op->typed<Fn>();
  }();
  if (!onednn.has_value() || !at::globalContext().userEnabledMkldnn() || x.numel() == 0) return at::matmul(x, w.t());
  const at::Tensor x2 = x.reshape({-1, x.size(-1)});
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  return with_padded_rows(x2, [&](const at::Tensor& xp) {
           return onednn->call(xp, w, std::nullopt, "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
         }).reshape(shape);
}

namespace {

// torch.backends.mkldnn.matmul.fp32_precision = "bf16" is torch's switch that lets oneDNN's fp32 matmuls compute
// in bf16 (fp32 accumulation), and the fp32 prefill matmul here is oneDNN's. On CPUs with AVX512-BF16 it then
// runs in bf16, about 2x the fp32 rate, the output rounded to bf16 on the way. fp32 prefill otherwise runs at
// ~90% of the 2-core FMA peak: this is the only way past it. Off by default ("none"/"ieee"): exact fp32.
// That switch came with torch 2.9, read by strings there and by enums from 2.10 (set_float32_matmul_precision
// ("medium") also sets it); before 2.9, "medium" is the switch.
bool fp32_matmul_in_bf16() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL) ==
         at::Float32Precision::BF16;
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9
  return at::globalContext().float32Precision("mkldnn", "matmul") == "bf16";
#else
  return at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM;
#endif
}

// w[r][i] * scales[r] in dtype (fp32 or bf16): an int8 weight as the prefill matmuls take it, in one pass. The same
// values as weight.to(float).mul_(scales).to(dtype) (an fp32 product, then bf16 rounded to nearest even), without
// its three passes and fp32 copy: a 128-token bf16 x int8 linear (4096 x 640, 2-core EPYC) took 2.3-2.5 ms
// against bf16 weights' 1.6-1.7; now 1.8.
at::Tensor dequantize_int8(const at::Tensor& weight, const at::Tensor& scales, at::ScalarType dtype) {
  at::Tensor out = at::empty(weight.sizes(), weight.options().dtype(dtype));
  const int64_t n = weight.size(0), k = weight.size(1);
  const int8_t* wp = weight.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  dispatch_float_bf16(dtype, [&](auto o_tag) {
    using TO = decltype(o_tag);
    TO* op = out.data_ptr<TO>();
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int8_t* q = wp + r * k;
        TO* o = op + r * k;
        const float s = sp[r];
        int64_t i = 0;
#ifdef GEMMA3_SIMD
        for (; i + vec::kW <= k; i += vec::kW) vec::vstore(o + i, vec::vmul(vec::vload(q + i), vec::vset(s)));
#endif
        for (; i < k; ++i) o[i] = vec::from_f32<TO>(static_cast<float>(q[i]) * s);
      }
    });
  });
  return out;
}

// With an ArgmaxSink, the argmax of a one-token decode's output is gathered chunk by chunk while each chunk is still
// in L1 (the argmax op, reading the logits back from two cores' caches and DRAM, took 56-65 us of a decode step).
at::Tensor linear_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales,
                       ArgmaxSink* argmax);

}  // namespace

// GGUF block weights (uint8 [rows, blocks, block_bytes]) go to gguf_linear.cpp; their scales are in the blocks.
void check_no_scales_for_blocks(const at::Tensor& weight, const std::optional<at::Tensor>& scales) {
  TORCH_CHECK(!scales.has_value(), "gemma3_fast: scales are only for int8 weights, but weight holds GGUF blocks");
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales) {
  if (gguf::is_block_weight(weight)) {
    check_no_scales_for_blocks(weight, scales);
    return block_linear_cpu(x, weight);
  }
  return linear_impl(x, weight, scales, nullptr);
}

int64_t gemv_token_limit(const at::Tensor& weight) {
  return gguf::is_block_weight(weight) ? block_gemv_token_limit() : max_gemv_tokens(weight.scalar_type());
}

int64_t linear_argmax_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales) {
  if (gguf::is_block_weight(weight)) {
    check_no_scales_for_blocks(weight, scales);
    return block_linear_argmax_cpu(x, weight);
  }
  TORCH_CHECK(x.numel() == x.size(-1), "gemma3_fast: linear_argmax takes one token, got x of shape ", x.sizes());
  ArgmaxSink sink;
  linear_impl(x, weight, scales, &sink);
  return sink.best.index;
}

namespace {

at::Tensor linear_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scales,
                       ArgmaxSink* argmax) {
  check_float_tensor(x, "x");
  check_contiguous(x, "x");
  TORCH_CHECK(x.dim() >= 1, "gemma3_fast: x must have a feature dimension, got shape ", x.sizes());
  check_dim(weight, 2, "weight", "[out_features, in_features] (or GGUF blocks: uint8 [rows, blocks, bytes])");
  check_contiguous(weight, "weight");
  check_same_device(weight, x, "weight");
  const int64_t k = x.size(-1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k, "gemma3_fast: weight has in_features ", weight.size(1), " but x has ", k,
              " features");
  const auto wt = weight.scalar_type();
  if (wt == at::kChar) {
    TORCH_CHECK(scales.has_value(), "gemma3_fast: int8 weight needs scales (one float32 per output row)");
  } else {
    TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16, "gemma3_fast: weight must be float32, bfloat16 or int8, got ",
                wt);
    TORCH_CHECK(!scales.has_value(), "gemma3_fast: scales are only for int8 weights, but weight is ", wt);
  }
  if (scales.has_value()) {
    TORCH_CHECK(scales->scalar_type() == at::kFloat, "gemma3_fast: scales must be float32, got ", scales->scalar_type());
    check_shape(*scales, {n}, "scales");
    check_contiguous(*scales, "scales");
    check_same_device(*scales, x, "scales");
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  const int64_t tokens = x.numel() / k;

  if (tokens > max_gemv_tokens(wt)) {  // compute bound: a BLAS matmul on a one-off converted copy of the weight
    static const bool native_bf16 = [] {  // a bf16 matmul at about 2x the fp32 rate (oneDNN's AVX512-BF16)
#if defined(__x86_64__) || defined(__i386__)
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512bf16") != 0;
#else
      return false;
#endif
    }();
    const bool bf16_matmul = native_bf16 && x.scalar_type() == at::kBFloat16;
    auto weight_as = [&](at::ScalarType dt) {
      return scales.has_value() ? dequantize_int8(weight, *scales, dt) : weight.to(dt);
    };
    auto bf16_mm = [&](const at::Tensor& xb) {  // oneDNN's bf16 matmul: rows padded as in matmul_fp32
      const at::Tensor wb = weight_as(at::kBFloat16);
      return with_padded_rows(xb.reshape({-1, k}), [&](const at::Tensor& xp) { return at::matmul(xp, wb.t()); })
          .reshape(out_shape);
    };
    if (bf16_matmul) return bf16_mm(x);
    if (native_bf16 && fp32_matmul_in_bf16())  // the user's opt-in: see fp32_matmul_in_bf16
      return bf16_mm(x.to(at::kBFloat16)).to(x.scalar_type());
    return matmul_fp32(x.to(at::kFloat), weight_as(at::kFloat)).to(x.scalar_type());
  }

  at::Tensor out = at::empty(out_shape, x.options());
  // x in fp32, converted here rather than with x.to(): at decode an ATen call costs more than the conversion.
  const vec::bf16* xb = x.scalar_type() == at::kBFloat16 ? x.data_ptr<vec::bf16>() : nullptr;
  std::vector<float> x32;
  if (xb != nullptr) x32.assign(xb, xb + tokens * k);
  const float* xp = xb != nullptr ? x32.data() : x.data_ptr<float>();
  std::vector<PreparedX> px;
  for (int64_t t = 0; t < tokens; ++t) px.push_back(prepare(xp + t * k, xb ? xb + t * k : nullptr, k, wt));
  const float* sp = scales.has_value() ? scales->data_ptr<float>() : nullptr;
  // Rows are handed out from a shared counter, in guided chunks: each takes half of an even share of the rows
  // still left (remaining / (2 * threads), whole blocks of 64 rows). The first chunks are long sequential
  // streams; the last ones are short, so the thread that finishes first waits little for the other at the end
  // of every matrix. Whole decode steps, one process, alternating with the fixed chunks (8 per thread) used
  // before: bf16 1.02-1.04x, fp32 1.01-1.04x, int8 1.03x; remaining / threads was no better than fixed chunks.
  const int64_t grain = 64;
  const int64_t threads = at::get_num_threads();
  auto run = [&](auto w_tag, auto o_tag) {
    using TW = decltype(w_tag);
    using TO = decltype(o_tag);
    const TW* wp = static_cast<const TW*>(weight.data_ptr());
    TO* op = out.data_ptr<TO>();
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, (n + grain - 1) / grain), 1, [&](int64_t, int64_t) {
      for (;;) {
        int64_t r0 = next.load(std::memory_order_relaxed), len = 0;
        do {
          if (r0 >= n) return;
          const int64_t share = (n - r0) / (2 * threads);
          len = std::min(n - r0, std::max(grain, (share + grain - 1) / grain * grain));
        } while (!next.compare_exchange_weak(r0, r0 + len, std::memory_order_relaxed));
        gemv_rows<TW, TO>(xp, px, tokens, wp, sp, op, n, k, r0, r0 + len);
        if (argmax != nullptr) argmax->add(range_argmax(op, r0, r0 + len));  // one token: out[r] is row r
      }
    });
  };
  dispatch_float_bf16(x.scalar_type(), [&](auto o_tag) {
    if (wt == at::kFloat) run(float{}, o_tag);
    else if (wt == at::kBFloat16) run(vec::bf16{}, o_tag);
    else run(int8_t{}, o_tag);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) { m.impl("linear", &linear_cpu); }

}  // namespace gemma3_fast
