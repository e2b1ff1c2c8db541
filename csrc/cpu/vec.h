// Small SIMD helpers for the CPU kernels: fp32 math on fp32 or bf16 data.
// AVX2+FMA or NEON when the compiler targets it, a plain scalar loop otherwise (same results up to summation
// order).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define GEMMA3_AVX2 1
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define GEMMA3_NEON 1
#endif
#if defined(GEMMA3_AVX2) || defined(GEMMA3_NEON)
#define GEMMA3_SIMD 1  // the vf type below exists: the loops in this file and the kernels' generic vector paths
#endif

namespace gemma3_fast {
namespace vec {

using bf16 = c10::BFloat16;

inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) { return static_cast<float>(x); }
template <typename T> inline T from_f32(float x) { return static_cast<T>(x); }  // bf16: round to nearest even

// Asks for the cache lines of p[0, bytes) without waiting for them (a hint: no fault, no result), into L1 (and
// L2), or into L2 only for streams read a little later, without evicting what L1 holds. Written as inline asm on
// x86-64 because in one build of attention.cpp GCC dropped a __builtin_prefetch loop (no instruction left in the
// object file, checked with objdump).
template <bool l2_only = false>
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if constexpr (l2_only) {
      asm volatile("prefetcht1 %0" : : "m"(*(c + off)));
    } else {
      asm volatile("prefetcht0 %0" : : "m"(*(c + off)));
    }
#else
    __builtin_prefetch(c + off, 0, l2_only ? 2 : 3);
#endif
  }
}
inline void prefetch_l2(const void* p, int64_t bytes) { prefetch<true>(p, bytes); }

// The decode kernels' weight stream with several tokens: each row's compute is long, and the hardware prefetcher
// alone left the stream stalling. Rows are asked for kPrefetchRows ahead, into L2 (prefetch_l2). The 8-token bf16
// head (2-core EPYC, same process): 21.0 ms with the row after next prefetched into L1, 12.0 with rows 8 ahead into
// L2; into L1 at any distance, or non-temporal, 18-21 ms. One token needs none: the stream keeps up.
constexpr int64_t kPrefetchRows = 8;

// One vector of fp32 lanes, the same operations on each ISA: 8 lanes (__m256) with AVX2 + FMA, 4 (float32x4_t)
// with NEON. The loops below, and the kernels' generic vector paths, are written once on these; AVX-512 paths
// (16 lanes, bf16 and int8 dot products) stay ISA-specific in the kernels that have them.
#ifdef GEMMA3_AVX2
using vf = __m256;
constexpr int64_t kW = 8;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const bf16* p) {
  // bf16 is the high half of an fp32: widen to 32 bits and shift left.
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vf vload(const int8_t* p) {  // 8 int8, widened to fp32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline void vstore(bf16* p, vf v) {
  // Round to nearest even, as c10::BFloat16 does (NaN payloads are not preserved; activations have none).
  __m256i x = _mm256_castps_si256(v);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  x = _mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  x = _mm256_srli_epi32(x, 16);
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(x, x), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vabs(vf a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }    // a b + c, one rounding
inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b, one rounding
inline float vhsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vhmax(vf v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float m = lanes[0];
  for (float x : lanes) m = std::max(m, x);
  return m;
}
inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n for integral n in [-126, 127], built in the exponent field.
inline vf vpow2i(vf n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
// Lanes that are NaN, or'ed into acc (all bits set where a NaN was seen); any() tells whether one was.
inline vf vnan_or(vf acc, vf v) { return _mm256_or_ps(acc, _mm256_cmp_ps(v, v, _CMP_UNORD_Q)); }
inline bool vany(vf mask) { return _mm256_movemask_ps(mask) != 0; }
// Bit i set where a[i] == b[i].
inline unsigned veq_bits(vf a, vf b) {
  return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)));
}
// q[0..kW) = round_to_nearest_even(v / s), saturated to int16.
inline void vquantize_i16(int16_t* q, vf v, vf s) {
  const __m256i i = _mm256_cvtps_epi32(_mm256_div_ps(v, s));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q),
                   _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1)));
}
#elif defined(GEMMA3_NEON)
using vf = float32x4_t;
constexpr int64_t kW = 4;
inline vf vzero() { return vdupq_n_f32(0.f); }
inline vf vset(float x) { return vdupq_n_f32(x); }
inline vf vload(const float* p) { return vld1q_f32(p); }
inline vf vload(const bf16* p) {  // bf16 is the high half of an fp32: widen to 32 bits, shifted left by 16
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}
inline vf vload(const int8_t* p) {  // 4 int8, widened to fp32
  int8_t b[8] = {p[0], p[1], p[2], p[3]};
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(vld1_s8(b)))));
}
inline void vstore(float* p, vf v) { vst1q_f32(p, v); }
inline void vstore(bf16* p, vf v) {  // round to nearest even, as c10::BFloat16 does (and the AVX2 store)
  uint32x4_t x = vreinterpretq_u32_f32(v);
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(x, 16), vdupq_n_u32(1));
  x = vaddq_u32(x, vaddq_u32(lsb, vdupq_n_u32(0x7fff)));
  vst1_u16(reinterpret_cast<uint16_t*>(p), vshrn_n_u32(x, 16));
}
inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
inline vf vdiv(vf a, vf b) { return vdivq_f32(a, b); }
inline vf vmin(vf a, vf b) { return vminq_f32(a, b); }
inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }
inline vf vabs(vf a) { return vabsq_f32(a); }
inline vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
inline vf vfnma(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); }
inline float vhsum(vf v) { return vaddvq_f32(v); }
inline float vhmax(vf v) { return vmaxvq_f32(v); }
inline vf vround(vf a) { return vrndnq_f32(a); }
inline vf vpow2i(vf n) {
  return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23));
}
inline vf vnan_or(vf acc, vf v) {
  return vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(acc), vmvnq_u32(vceqq_f32(v, v))));
}
inline bool vany(vf mask) { return vmaxvq_u32(vreinterpretq_u32_f32(mask)) != 0; }
inline unsigned veq_bits(vf a, vf b) {
  const uint32x4_t bit = {1, 2, 4, 8};
  return vaddvq_u32(vandq_u32(vceqq_f32(a, b), bit));
}
inline void vquantize_i16(int16_t* q, vf v, vf s) {
  vst1_s16(q, vqmovn_s32(vcvtnq_s32_f32(vdivq_f32(v, s))));  // FCVTNS: nearest, ties to even, as cvtps2dq
}
#endif

#ifdef GEMMA3_SIMD
// exp(x) per lane, Cephes' expf: x = n ln2 + r with |r| <= ln2/2, a degree-5 polynomial for e^r, times 2^n.
// Relative error ~2e-7 (about 1 ulp). Inputs are clamped to [-87.3, 88]: below, ~1e-38 instead of 0
// (negligible in a softmax, whose inputs here are <= 0).
inline vf vexp(vf x) {
  x = vmax(vmin(x, vset(88.0f)), vset(-87.3365447504f));
  const vf n = vround(vmul(x, vset(1.44269504088896341f)));
  vf r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  vf y = vset(1.9875691500e-4f);
  y = vfma(y, r, vset(1.3981999507e-3f));
  y = vfma(y, r, vset(8.3334519073e-3f));
  y = vfma(y, r, vset(4.1665795894e-2f));
  y = vfma(y, r, vset(1.6666665459e-1f));
  y = vfma(y, r, vset(5.0000001201e-1f));
  y = vfma(y, vmul(r, r), vadd(r, vset(1.f)));
  return vmul(y, vpow2i(n));
}
#endif

// s[i] = exp(s[i] - shift); returns the sum of the new s[i].
inline float exp_shift_sum(float* s, float shift, int64_t n) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef GEMMA3_SIMD
  const vf vs = vset(shift);
  vf acc = vzero();
  for (; i + kW <= n; i += kW) {
    const vf e = vexp(vsub(vload(s + i), vs));
    vstore(s + i, e);
    acc = vadd(acc, e);
  }
  sum = vhsum(acc);
#endif
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - shift);
    sum += s[i];
  }
  return sum;
}

// out[i] = gelu_tanh(gate[i]) * up[i] in fp32, rounded once to TO. gelu_tanh(x) = 0.5 x (1 + tanh(u)) with
// u = sqrt(2/pi) (x + 0.044715 x^3), and 1 + tanh(u) = 2 - 2 / (1 + e^(2u)) (vexp clamps: no inf, no NaN).
template <typename TO, typename TI>
inline void gelu_tanh_mul(TO* out, const TI* gate, const TI* up, int64_t n) {
  constexpr float kC = 0.7978845608028654f, kA = 0.044715f;
  int64_t i = 0;
#ifdef GEMMA3_SIMD
  const vf c = vset(kC), a = vset(kA), one = vset(1.f), two = vset(2.f), half = vset(0.5f);
  for (; i + kW <= n; i += kW) {
    const vf x = vload(gate + i);
    const vf u = vmul(c, vfma(vmul(a, x), vmul(x, x), x));
    const vf e = vexp(vadd(u, u));
    const vf one_plus_tanh = vsub(two, vdiv(two, vadd(one, e)));
    vstore(out + i, vmul(vmul(vmul(half, x), one_plus_tanh), vload(up + i)));
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
#ifdef GEMMA3_SIMD
  vf vm = vset(init);
  for (; i + kW <= n; i += kW) vm = vmax(vm, vload(s + i));
  mx = std::max(mx, vhmax(vm));
#endif
  for (; i < n; ++i) mx = std::max(mx, s[i]);
  return mx;
}

// f(std::integral_constant<int, g>{}) for 1 <= g <= kMax (4 or 8; larger g as kMax): the multi-token decode
// kernels take their token count as a constant, so each token's accumulators stay in registers.
template <int kMax, typename F>
inline void with_token_count(int64_t g, const F& f) {
  static_assert(kMax == 4 || kMax == 8, "token groups of 4 or 8");
  using std::integral_constant;
  switch (g) {
    case 1: return f(integral_constant<int, 1>{});
    case 2: return f(integral_constant<int, 2>{});
    case 3: return f(integral_constant<int, 3>{});
    default: break;
  }
  if constexpr (kMax == 8) {
    switch (g) {
      case 4: return f(integral_constant<int, 4>{});
      case 5: return f(integral_constant<int, 5>{});
      case 6: return f(integral_constant<int, 6>{});
      case 7: return f(integral_constant<int, 7>{});
      default: return f(integral_constant<int, 8>{});
    }
  } else {
    return f(integral_constant<int, 4>{});
  }
}

// A std::vector whose data starts on a cache line. The kernels' 64-byte loads of a row that straddles two lines
// cost two loads: the int16 activations of the int8 and GGUF kernels, in a plain vector (16-byte aligned), ran
// the int8 kernel at 8 tokens at 0.8-0.85x the speed of the same data aligned (2-core EPYC, AVX-512).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using aligned_vector = std::vector<T, CacheLineAllocator<T>>;

// Symmetric int16 quantization of x[0..n): q[i] = round_to_nearest_even(x[i] / scale) with
// scale = max|x| / 32767 (1 when x is all zeros); returns scale. The scalar loop is the specification; the
// vector loop gives the same q (same division, same rounding: cvtps2dq, FCVTNS and lrint all round to nearest
// even). It runs on every int8 linear at decode, ~80k activations per token: scalar lrint calls cost ~0.3 ms a
// step.
inline float quantize_int16(const float* x, int64_t n, int16_t* q) {
  int64_t i = 0;
  float amax = 0.f;
#ifdef GEMMA3_SIMD
  vf vm = vzero();
  for (; i + kW <= n; i += kW) vm = vmax(vm, vabs(vload(x + i)));
  amax = vhmax(vm);
#endif
  for (; i < n; ++i) amax = std::max(amax, std::abs(x[i]));
  const float scale = amax > 0.f ? amax / 32767.f : 1.f;
  i = 0;
#ifdef GEMMA3_SIMD
  const vf vs = vset(scale);
  for (; i + kW <= n; i += kW) vquantize_i16(q + i, vload(x + i), vs);
#endif
  for (; i < n; ++i) q[i] = static_cast<int16_t>(std::lrint(x[i] / scale));
  return scale;
}

// sum_i a[i] * b[i]
template <typename TA, typename TB>
inline float dot(const TA* a, const TB* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef GEMMA3_SIMD
  vf acc0 = vzero(), acc1 = vzero();
  for (; i + 2 * kW <= n; i += 2 * kW) {
    acc0 = vfma(vload(a + i), vload(b + i), acc0);
    acc1 = vfma(vload(a + i + kW), vload(b + i + kW), acc1);
  }
  for (; i + kW <= n; i += kW) acc0 = vfma(vload(a + i), vload(b + i), acc0);
  s = vhsum(vadd(acc0, acc1));
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
#ifdef GEMMA3_SIMD
  const vf va = vset(a);
  for (; i + kW <= n; i += kW) vstore(y + i, vfma(va, vload(x + i), vload(y + i)));
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
#ifdef GEMMA3_SIMD
  const vf vinv = vset(inv), one = vset(1.f);
  for (; i + kW <= n; i += kW) vstore(out + i, vmul(vmul(vload(x + i), vinv), vadd(one, vload(w + i))));
#endif
  for (; i < n; ++i) out[i] = from_f32<TO>(to_f32(x[i]) * inv * (1.f + to_f32(w[i])));
}

// out[i] = round(a[i] + b[i])
template <typename TA, typename TB, typename TO>
inline void add(TO* out, const TA* a, const TB* b, int64_t n) {
  int64_t i = 0;
#ifdef GEMMA3_SIMD
  for (; i + kW <= n; i += kW) vstore(out + i, vadd(vload(a + i), vload(b + i)));
#endif
  for (; i < n; ++i) out[i] = from_f32<TO>(to_f32(a[i]) + to_f32(b[i]));
}

// out[i] = round(x[i]) (dtype conversion of a row)
template <typename TX, typename TO>
inline void convert(TO* out, const TX* x, int64_t n) {
  int64_t i = 0;
#ifdef GEMMA3_SIMD
  for (; i + kW <= n; i += kW) vstore(out + i, vload(x + i));
#endif
  for (; i < n; ++i) out[i] = from_f32<TO>(to_f32(x[i]));
}

}  // namespace vec
}  // namespace gemma3_fast
