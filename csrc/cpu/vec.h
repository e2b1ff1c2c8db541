// Small SIMD helpers for the CPU kernels: fp32 math on fp32 or bf16 data.
// AVX2+FMA when the compiler targets it, a plain scalar loop otherwise (same results up to summation order).
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GEMMA3_AVX2 1
#endif

namespace gemma3_fast {
namespace vec {

using bf16 = c10::BFloat16;

inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) { return static_cast<float>(x); }
template <typename T> inline T from_f32(float x) { return static_cast<T>(x); }  // bf16: round to nearest even

// Asks for the cache lines of p[0, bytes) without waiting for them (a hint: no fault, no result). Written as
// inline asm on x86-64 because in one build of attention.cpp GCC dropped a __builtin_prefetch loop (no
// instruction left in the object file, checked with objdump).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    asm volatile("prefetcht0 %0" : : "m"(*(c + off)));
#else
    __builtin_prefetch(c + off, 0, 3);
#endif
  }
}

#ifdef GEMMA3_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  // bf16 is the high half of an fp32: widen to 32 bits and shift left.
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) {
  // Round to nearest even, as c10::BFloat16 does (NaN payloads are not preserved; activations have none).
  __m256i x = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  x = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  x = _mm256_srli_epi32(x, 16);
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(x, x), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#ifdef GEMMA3_AVX2
// exp(x) for 8 floats, Cephes' expf: x = n ln2 + r with |r| <= ln2/2, a degree-5 polynomial for e^r, times 2^n.
// Relative error ~2e-7 (about 1 ulp). Inputs are clamped to [-87.3, 88]: below, ~1e-38 instead of 0
// (negligible in a softmax, whose inputs here are <= 0).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.3365447504f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// s[i] = exp(s[i] - shift); returns the sum of the new s[i].
inline float exp_shift_sum(float* s, float shift, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef GEMMA3_AVX2
  const __m256 vs = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vs));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  sum = hsum(acc);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - shift);
    sum += s[i];
  }
  return sum;
}

// out[i] = gelu_tanh(gate[i]) * up[i] in fp32, rounded once to TO. gelu_tanh(x) = 0.5 x (1 + tanh(u)) with
// u = sqrt(2/pi) (x + 0.044715 x^3), and 1 + tanh(u) = 2 - 2 / (1 + e^(2u)) (exp8 clamps: no inf, no NaN).
template <typename TO, typename TI>
inline void gelu_tanh_mul(TO* out, const TI* gate, const TI* up, int64_t n) {
  constexpr float kC = 0.7978845608028654f, kA = 0.044715f;
  int64_t i = 0;
#ifdef GEMMA3_AVX2
  const __m256 c = _mm256_set1_ps(kC), a = _mm256_set1_ps(kA), one = _mm256_set1_ps(1.f),
               two = _mm256_set1_ps(2.f), half = _mm256_set1_ps(0.5f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = load8(gate + i);
    const __m256 u = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(a, x), _mm256_mul_ps(x, x), x));
    const __m256 e = exp8(_mm256_add_ps(u, u));
    const __m256 one_plus_tanh = _mm256_sub_ps(two, _mm256_div_ps(two, _mm256_add_ps(one, e)));
    store8(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(half, x), one_plus_tanh), load8(up + i)));
  }
#endif
  for (; i < n; ++i) {
    const float x = to_f32(gate[i]);
    out[i] = from_f32<TO>(0.5f * x * (1.f + std::tanh(kC * (x + kA * x * x * x))) * to_f32(up[i]));
  }
}

// max(init, s[0..n)), vectorized (std::max in a loop is not: the compiler keeps its NaN ordering).
inline float max_value(const float* s, int64_t n, float init) {
  int64_t i = 0;
  float mx = init;
#ifdef GEMMA3_AVX2
  __m256 vm = _mm256_set1_ps(init);
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(s + i));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vm);
  for (float x : lanes) mx = std::max(mx, x);
#endif
  for (; i < n; ++i) mx = std::max(mx, s[i]);
  return mx;
}

// Symmetric int16 quantization of x[0..n): q[i] = round_to_nearest_even(x[i] / scale) with
// scale = max|x| / 32767 (1 when x is all zeros); returns scale. The scalar loop is the specification; the
// vector loop gives the same q (same division, same rounding: cvtps2dq and lrint both round to nearest even).
// It runs on every int8 linear at decode, ~80k activations per token: scalar lrint calls cost ~0.3 ms a step.
inline float quantize_int16(const float* x, int64_t n, int16_t* q) {
  int64_t i = 0;
  float amax = 0.f;
#ifdef GEMMA3_AVX2
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vm = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vm);
  for (float v : lanes) amax = std::max(amax, v);
#endif
  for (; i < n; ++i) amax = std::max(amax, std::abs(x[i]));
  const float scale = amax > 0.f ? amax / 32767.f : 1.f;
  i = 0;
#ifdef GEMMA3_AVX2
  const __m256 vs = _mm256_set1_ps(scale);
  for (; i + 8 <= n; i += 8) {
    const __m256i v = _mm256_cvtps_epi32(_mm256_div_ps(_mm256_loadu_ps(x + i), vs));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i),
                     _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1)));
  }
#endif
  for (; i < n; ++i) q[i] = static_cast<int16_t>(std::lrint(x[i] / scale));
  return scale;
}

// sum_i a[i] * b[i]
template <typename TA, typename TB>
inline float dot(const TA* a, const TB* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef GEMMA3_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(load8(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(load8(a + i + 8), load8(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(load8(a + i), load8(b + i), acc0);
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += to_f32(a[i]) * to_f32(b[i]);
  return s;
}

template <typename T>
inline float sum_squares(const T* x, int64_t n) { return dot(x, x, n); }

// y[i] += a * x[i]
template <typename T>
inline void axpy(float* y, float a, const T* x, int64_t n) {
  int64_t i = 0;
#ifdef GEMMA3_AVX2
  __m256 va = _mm256_set1_ps(a);
  for (; i + 8 <= n; i += 8) store8(y + i, _mm256_fmadd_ps(va, load8(x + i), load8(y + i)));
#endif
  for (; i < n; ++i) y[i] += a * to_f32(x[i]);
}

// y[i] *= a
inline void scale(float* y, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

// out[i] = round(x[i] * inv * (1 + w[i])): the (1 + w) RMSNorm scale, fp32 math, one rounding.
template <typename TX, typename TW, typename TO>
inline void norm_scale(TO* out, const TX* x, const TW* w, float inv, int64_t n) {
  int64_t i = 0;
#ifdef GEMMA3_AVX2
  __m256 vinv = _mm256_set1_ps(inv), one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8)
    store8(out + i, _mm256_mul_ps(_mm256_mul_ps(load8(x + i), vinv), _mm256_add_ps(one, load8(w + i))));
#endif
  for (; i < n; ++i) out[i] = from_f32<TO>(to_f32(x[i]) * inv * (1.f + to_f32(w[i])));
}

// out[i] = round(a[i] + b[i])
template <typename TA, typename TB, typename TO>
inline void add(TO* out, const TA* a, const TB* b, int64_t n) {
  int64_t i = 0;
#ifdef GEMMA3_AVX2
  for (; i + 8 <= n; i += 8) store8(out + i, _mm256_add_ps(load8(a + i), load8(b + i)));
#endif
  for (; i < n; ++i) out[i] = from_f32<TO>(to_f32(a[i]) + to_f32(b[i]));
}

// out[i] = round(x[i]) (dtype conversion of a row)
template <typename TX, typename TO>
inline void convert(TO* out, const TX* x, int64_t n) {
  int64_t i = 0;
#ifdef GEMMA3_AVX2
  for (; i + 8 <= n; i += 8) store8(out + i, load8(x + i));
#endif
  for (; i < n; ++i) out[i] = from_f32<TO>(to_f32(x[i]));
}

}  // namespace vec
}  // namespace gemma3_fast
