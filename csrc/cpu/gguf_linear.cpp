// y = x @ W^T straight from GGUF blocks (gguf_blocks.h), activations in fp32.
//
// Decode (a few tokens) streams each block once: its integers are unpacked in registers (AVX2 byte ops, shared by
// the AVX-512 build), widened to fp32 and multiplied with x; the block's scale multiplies the 32-weight sum once,
// and a Q4_K/Q5_K min multiplies the sum of x over those 32 inputs (computed once per token, not per row).
// That is linear on the dequantized weight with the products regrouped: equal up to fp32 rounding order.
// Prefill (many tokens) dequantizes tiles of rows into an fp32 buffer and runs the fp32 matmul on each.
// Without AVX2 (NEON, scalar builds), the reference decoding feeds plain loops the compiler vectorizes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "argmax.h"
#include "gguf_blocks.h"
#include "kernels.h"
#include "vec.h"

namespace gemma3_fast {
namespace {

using gguf::Format;
using gguf::Type;

constexpr int64_t block_bytes(Type t) { return gguf::format_for(t).block_bytes; }
constexpr bool has_mins(Type t) { return t == Type::Q4_K || t == Type::Q5_K; }

// f(std::integral_constant<Type, t>{}) for the runtime format t: one switch for every per-format kernel table.
template <typename F>
auto with_type(Type t, const F& f) {
  switch (t) {
    case Type::Q4_0: return f(std::integral_constant<Type, Type::Q4_0>{});
    case Type::Q5_0: return f(std::integral_constant<Type, Type::Q5_0>{});
    case Type::Q8_0: return f(std::integral_constant<Type, Type::Q8_0>{});
    case Type::Q4_K: return f(std::integral_constant<Type, Type::Q4_K>{});
    case Type::Q5_K: return f(std::integral_constant<Type, Type::Q5_K>{});
    case Type::Q6_K: break;
  }
  return f(std::integral_constant<Type, Type::Q6_K>{});
}

#ifdef GEMMA3_AVX2
inline float fp16_at(const uint8_t* p) {
#ifdef __F16C__
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
#else
  return gguf::fp16(p);
#endif
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i low_nibbles(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline __m256i high_nibbles(__m256i v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }

// Byte i of the result is 0xFF where bit i of the 32-bit word at p is set, else 0.
inline __m256i bits_to_bytes(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select);
}

// The 16 weights of the nibbles in v (16 bytes): low nibbles first, then high ones, as Q4_0/Q5_0 order them.
inline __m256i nibbles_in_order(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
}

// A run's 32 int8 weights widened to fp32 once (widen32), then multiplied with each token's x (dot32): with
// several tokens the widening is shared, and each token's arithmetic is the same as alone.
#if defined(__AVX512F__)
using acc_t = __m512;
struct Widened {
  __m512 w[2];  // weights 0-15, 16-31
};
inline acc_t acc_zero() { return _mm512_setzero_ps(); }
inline Widened widen32(__m256i q) {
  return {{_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))),
           _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)))}};
}
// x[0:32] times the 32 weights: the products of weights 0-15 summed lane-wise into lo, 16-31 into hi.
inline void dot32(const float* x, const Widened& q, acc_t& lo, acc_t& hi) {
  lo = _mm512_mul_ps(_mm512_loadu_ps(x), q.w[0]);
  hi = _mm512_mul_ps(_mm512_loadu_ps(x + 16), q.w[1]);
}
// x[0:32] . q summed lane-wise into one vector: one multiply and one FMA (the FP pipes are the limit here).
inline acc_t dot32(const float* x, const Widened& q) {
  return _mm512_fmadd_ps(_mm512_loadu_ps(x + 16), q.w[1], _mm512_mul_ps(_mm512_loadu_ps(x), q.w[0]));
}
inline acc_t acc_add(acc_t a, acc_t b) { return _mm512_add_ps(a, b); }
inline acc_t acc_fma(acc_t p, float d, acc_t acc) { return _mm512_fmadd_ps(p, _mm512_set1_ps(d), acc); }
inline float acc_sum(acc_t a) { return _mm512_reduce_add_ps(a); }
constexpr int kTokenGroup = 8;
#else
using acc_t = __m256;
struct Widened {
  __m256 w[4];  // weights 0-7, 8-15, 16-23, 24-31
};
inline acc_t acc_zero() { return _mm256_setzero_ps(); }
inline Widened widen32(__m256i q) {
  const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
  auto widen = [](__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); };
  return {{widen(q0), widen(_mm_srli_si128(q0, 8)), widen(q1), widen(_mm_srli_si128(q1, 8))}};
}
inline void dot32(const float* x, const Widened& q, acc_t& lo, acc_t& hi) {
  lo = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), q.w[1], _mm256_mul_ps(_mm256_loadu_ps(x), q.w[0]));
  hi = _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), q.w[3], _mm256_mul_ps(_mm256_loadu_ps(x + 16), q.w[2]));
}
inline acc_t dot32(const float* x, const Widened& q) {
  acc_t a, b;
  dot32(x, q, a, b);
  return _mm256_add_ps(a, b);
}
inline acc_t acc_add(acc_t a, acc_t b) { return _mm256_add_ps(a, b); }
inline acc_t acc_fma(acc_t p, float d, acc_t acc) { return _mm256_fmadd_ps(p, _mm256_set1_ps(d), acc); }
inline float acc_sum(acc_t a) { return vec::vhsum(a); }
constexpr int kTokenGroup = 4;  // 16 vector registers
#endif

// Calls f(j, q, scale_lo, scale_hi, min) for each run j of 32 weights of `blocks` blocks of format T: q their
// integers (32 int8 in a __m256i), weights 0-15 of the run scaled by scale_lo, 16-31 by scale_hi (equal but for
// Q6_K, which has a scale per 16), minus min (Q4_K/Q5_K). The scales are computed as decode_block computes them.
template <Type T, typename F>
inline void for_each_run(const uint8_t* b, int64_t blocks, const F& f) {
  if constexpr (T == Type::Q8_0 || T == Type::Q4_0 || T == Type::Q5_0) {
    for (int64_t i = 0; i < blocks; ++i, b += block_bytes(T)) {
      __m256i q;
      if constexpr (T == Type::Q8_0) {
        q = load32(b + 2);
      } else if constexpr (T == Type::Q4_0) {
        q = _mm256_sub_epi8(nibbles_in_order(b + 2), _mm256_set1_epi8(8));
      } else {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
        // Q5_0's fifth bits as a mask register: weight = nibble where the bit is set, nibble - 16 where not.
        uint32_t bits;
        std::memcpy(&bits, b + 2, 4);
        const __m256i nib = nibbles_in_order(b + 6);
        q = _mm256_mask_sub_epi8(nib, _cvtu32_mask32(~bits), nib, _mm256_set1_epi8(16));
#else
        const __m256i high = _mm256_and_si256(bits_to_bytes(b + 2), _mm256_set1_epi8(0x10));
        q = _mm256_sub_epi8(_mm256_or_si256(nibbles_in_order(b + 6), high), _mm256_set1_epi8(16));
#endif
      }
      const float d = fp16_at(b);
      f(i, q, d, d, 0.f);
    }
  } else if constexpr (T == Type::Q4_K || T == Type::Q5_K) {
    constexpr bool five = T == Type::Q5_K;
    for (int64_t i = 0; i < blocks; ++i, b += block_bytes(T)) {
      const float d = fp16_at(b), dmin = fp16_at(b + 2);
      const uint8_t* qs = b + (five ? 48 : 16);
      __m256i qh;
      if constexpr (five) qh = load32(b + 16);
      for (int p = 0; p < 4; ++p) {  // runs 2p (low nibbles) and 2p + 1 (high nibbles) of 32 bytes
        int sc0, m0, sc1, m1;
        gguf::k4_scale_min(2 * p, b + 4, sc0, m0);
        gguf::k4_scale_min(2 * p + 1, b + 4, sc1, m1);
        const __m256i v = load32(qs + 32 * p);
        __m256i q0 = low_nibbles(v), q1 = high_nibbles(v);
        if constexpr (five) {
          const __m256i bit0 = _mm256_set1_epi8(static_cast<char>(1 << (2 * p)));
          const __m256i bit1 = _mm256_set1_epi8(static_cast<char>(1 << (2 * p + 1)));
          const __m256i sixteen = _mm256_set1_epi8(0x10);
          q0 = _mm256_or_si256(q0, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit0), bit0), sixteen));
          q1 = _mm256_or_si256(q1, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit1), bit1), sixteen));
        }
        const float d0 = d * static_cast<float>(sc0), d1 = d * static_cast<float>(sc1);
        f(8 * i + 2 * p, q0, d0, d0, dmin * static_cast<float>(m0));
        f(8 * i + 2 * p + 1, q1, d1, d1, dmin * static_cast<float>(m1));
      }
    }
  } else {  // Q6_K: ql[128], qh[64], int8 scales[16] (one per 16 weights), d
    for (int64_t i = 0; i < blocks; ++i, b += block_bytes(T)) {
      const float d = fp16_at(b + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      for (int n = 0; n < 2; ++n) {
        const __m256i l0 = load32(b + 64 * n), l1 = load32(b + 64 * n + 32), h = load32(b + 128 + 32 * n);
        const __m256i three0 = _mm256_set1_epi8(0x30), off = _mm256_set1_epi8(32);
        const __m256i q[4] = {
            _mm256_or_si256(low_nibbles(l0), _mm256_and_si256(_mm256_slli_epi16(h, 4), three0)),
            _mm256_or_si256(low_nibbles(l1), _mm256_and_si256(_mm256_slli_epi16(h, 2), three0)),
            _mm256_or_si256(high_nibbles(l0), _mm256_and_si256(h, three0)),
            _mm256_or_si256(high_nibbles(l1), _mm256_and_si256(_mm256_srli_epi16(h, 2), three0)),
        };
        const int8_t* s = sc + 8 * n;
        for (int j = 0; j < 4; ++j)
          f(8 * i + 4 * n + j, _mm256_sub_epi8(q[j], off), d * static_cast<float>(s[2 * j]),
            d * static_cast<float>(s[2 * j + 1]), 0.f);
      }
    }
  }
}

// out[t] = dot(x[t], row) for N tokens against one row of `blocks` blocks of format T, each run unpacked once for
// all N; xsum[t][j] = sum of x[t] over inputs [32j, 32j + 32). Each token's sums run in the same order whatever N
// is (N = 1 is the batch-1 decode): a token's result does not depend on the others.
template <Type T, int N>
void row_dot(const float* const* x, const float* const* xsum, const uint8_t* b, int64_t blocks, float* out) {
  acc_t acc[N];
  float mins[N] = {};
  for (int t = 0; t < N; ++t) acc[t] = acc_zero();
  for_each_run<T>(b, blocks, [&](int64_t j, __m256i q, float d_lo, float d_hi, float min) {
    const Widened w = widen32(q);
    for (int t = 0; t < N; ++t) {
      if constexpr (T == Type::Q6_K) {
        acc_t lo, hi;
        dot32(x[t] + 32 * j, w, lo, hi);
        acc[t] = acc_fma(hi, d_hi, acc_fma(lo, d_lo, acc[t]));
      } else {
        acc[t] = acc_fma(dot32(x[t] + 32 * j, w), d_lo, acc[t]);
      }
      if constexpr (has_mins(T)) mins[t] += min * xsum[t][j];
    }
  });
  for (int t = 0; t < N; ++t) out[t] = acc_sum(acc[t]) - mins[t];
}

// The fast mode's dot: x quantized to int16 (xq, one scale per token, applied by the caller), each run's 32
// weights widened to int16 and multiplied with it in int32 lanes (2 products per lane: no overflow), the run's
// scale applied to the lanes in fp32. About half the vector work of row_dot per run. The mins' term stays exact
// (fp32 sums of x), scaled down here to the int16 units of the rest. N tokens at once, as row_dot.
template <Type T, int N>
void row_dot_i16(const int16_t* const* xq, const float* const* xsum, const float* inv_scale, const uint8_t* b,
                 int64_t blocks, float* out) {
  acc_t acc[N];
  float mins[N] = {};
  for (int t = 0; t < N; ++t) acc[t] = acc_zero();
  for_each_run<T>(b, blocks, [&](int64_t j, __m256i q, float d_lo, float d_hi, float min) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512i w = _mm512_cvtepi8_epi16(q);
    const __m512 d = T == Type::Q6_K ? _mm512_insertf32x8(_mm512_set1_ps(d_lo), _mm256_set1_ps(d_hi), 1)
                                     : _mm512_set1_ps(d_lo);
    for (int t = 0; t < N; ++t) {
      const __m512 p = _mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_loadu_si512(xq[t] + 32 * j), w));  // lanes
      acc[t] = _mm512_fmadd_ps(p, d, acc[t]);  // 0-7: weights 0-15, 8-15: 16-31
      if constexpr (has_mins(T)) mins[t] += min * xsum[t][j];
    }
#else
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1));
    for (int t = 0; t < N; ++t) {
      const __m256i* x = reinterpret_cast<const __m256i*>(xq[t] + 32 * j);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_loadu_si256(x), w0)),
                               _mm256_set1_ps(d_lo), acc[t]);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_loadu_si256(x + 1), w1)),
                               _mm256_set1_ps(d_hi), acc[t]);
      if constexpr (has_mins(T)) mins[t] += min * xsum[t][j];
    }
#endif
  });
  for (int t = 0; t < N; ++t) out[t] = acc_sum(acc[t]) - mins[t] * inv_scale[t];
}
constexpr bool kHasInt16Path = true;

// The row dequantized into out: d * q (- min), each product rounded once, as decode_block's reference computes it.
template <Type T>
void dequantize_row(const uint8_t* b, int64_t blocks, float* out) {
  for_each_run<T>(b, blocks, [&](int64_t j, __m256i q, float d_lo, float d_hi, float min) {
    float* o = out + 32 * j;
    const __m128i halves[2] = {_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)};
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_set1_ps(h == 0 ? d_lo : d_hi);
      for (int e = 0; e < 2; ++e) {
        const __m128i bytes = e == 0 ? halves[h] : _mm_srli_si128(halves[h], 8);
        __m256 w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)));
        if constexpr (has_mins(T)) w = _mm256_sub_ps(w, _mm256_set1_ps(min));
        _mm256_storeu_ps(o + 16 * h + 8 * e, w);
      }
    }
  });
}
#else
// Plain loops on the reference decoding: the compiler vectorizes the 32-weight products. Each block is decoded
// once for the N tokens.
template <Type T, int N>
void row_dot(const float* const* x, const float* const* xsum, const uint8_t* b, int64_t blocks, float* out) {
  const Format& f = gguf::format_for(T);
  gguf::Decoded dec;
  float total[N] = {};
  for (int64_t i = 0; i < blocks; ++i, b += f.block_bytes) {
    gguf::decode_block(T, b, dec);
    for (int t = 0; t < N; ++t) {
      const float* xb = x[t] + i * f.block_elems;
      for (int64_t g = 0; g < f.block_elems / dec.group; ++g) {
        float s = 0.f;
        for (int l = 0; l < dec.group; ++l) s += xb[g * dec.group + l] * static_cast<float>(dec.q[g * dec.group + l]);
        total[t] += dec.scale[g] * s;
      }
      for (int64_t j = 0; j < f.block_elems / 32; ++j) total[t] -= dec.min[j] * xsum[t][i * (f.block_elems / 32) + j];
    }
  }
  for (int t = 0; t < N; ++t) out[t] = total[t];
}

template <Type T>
void dequantize_row(const uint8_t* b, int64_t blocks, float* out) {
  gguf::dequantize_blocks(gguf::format_for(T), b, blocks, out);
}

template <Type T, int N>
void row_dot_i16(const int16_t* const*, const float* const*, const float*, const uint8_t*, int64_t, float*) {
  // not reached: without AVX2 the fast mode is refused (kHasInt16Path)
}
constexpr bool kHasInt16Path = false;
constexpr int kTokenGroup = 4;
#endif

using DequantizeRow = void (*)(const uint8_t*, int64_t, float*);

std::atomic<bool> g_int16_activations{false};

// Up to this many tokens, one pass over the blocks for all of them (each run unpacked and widened once); beyond,
// dequantized tiles and the fp32 matmul. The default model's prefill on the 2-core EPYC, pass vs tiles, ms:
// AVX-512 build, 9-10 tokens 27-30 vs 52-68, 16 tokens 41 vs 49-108, 24 tokens 55-56 vs 50-110, 32 tokens 70-71
// vs 50-102; x86-64-v3 build, 10 tokens 30-32 vs 63-103, 16 tokens 41-43 vs 60-106. The tiles also hold ~20 MiB (a
// 16 MB tile, oneDNN's buffers) that the default run's peak then carries. Builds without the AVX2 block loops
// keep the limit of 8 this was first measured at.
#if defined(GEMMA3_AVX2)
constexpr int64_t kMaxGemvTokens = 16;
#else
constexpr int64_t kMaxGemvTokens = 8;
#endif

// Rows [r0, r1) of w dequantized into out [r1 - r0, k].
void dequantize_rows(const Format& f, const uint8_t* w, int64_t row_bytes, int64_t r0, int64_t r1, float* out,
                     int64_t k) {
  const DequantizeRow dequantize =
      with_type(f.type, [](auto t) -> DequantizeRow { return dequantize_row<decltype(t)::value>; });
  at::parallel_for(r0, r1, 16, [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) dequantize(w + r * row_bytes, k / f.block_elems, out + (r - r0) * k);
  });
}

at::Tensor block_linear(const at::Tensor& x_in, const at::Tensor& weight, ArgmaxSink* argmax) {
  const Format& f = gguf::block_format(weight, "weight");
  check_float_tensor(x_in, "x");
  check_contiguous(x_in, "x");
  check_same_device(weight, x_in, "weight");
  TORCH_CHECK(x_in.dim() >= 1, "gemma3_fast: x must have a feature dimension, got shape ", x_in.sizes());
  const int64_t k = x_in.size(-1), n = weight.size(0), blocks = weight.size(1), row_bytes = blocks * f.block_bytes;
  TORCH_CHECK(blocks * f.block_elems == k, "gemma3_fast: weight (", f.name, " blocks) has in_features ",
              blocks * f.block_elems, " (", blocks, " blocks of ", f.block_elems, ") but x has ", k, " features");
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = n;
  const at::Tensor x = x_in.scalar_type() == at::kFloat ? x_in : x_in.to(at::kFloat);
  const int64_t tokens = x.numel() / k;
  const uint8_t* w = weight.data_ptr<uint8_t>();

  if (tokens > kMaxGemvTokens) {
    const at::Tensor x2 = x.reshape({tokens, k});
    at::Tensor out = at::empty({tokens, n}, x.options());
    // Tiles of ~4M weights (16 MB in fp32): a whole projection of the 270M model in one matmul, the output head
    // in ~40 tiles.
    const int64_t tile = std::max<int64_t>(64, (int64_t{1} << 22) / k);
    at::Tensor buf = at::empty({std::min(tile, n), k}, x.options());
    for (int64_t r0 = 0; r0 < n; r0 += tile) {
      const int64_t r1 = std::min(n, r0 + tile);
      at::Tensor wt = buf.narrow(0, 0, r1 - r0);
      dequantize_rows(f, w, row_bytes, r0, r1, wt.data_ptr<float>(), k);
      const at::Tensor y = matmul_fp32(x2, wt);
      if (r0 == 0 && r1 == n) out = y;
      else out.narrow(1, r0, r1 - r0).copy_(y);
    }
    return out.view(out_shape).to(x_in.scalar_type());
  }

  const float* xp = x.data_ptr<float>();
  std::vector<float> xsum(tokens * (k / 32));  // read only by the formats with mins
  for (int64_t t = 0; has_mins(f.type) && t < tokens; ++t)
    for (int64_t j = 0; j < k / 32; ++j) {
      float s = 0.f;
      for (int l = 0; l < 32; ++l) s += xp[t * k + 32 * j + l];
      xsum[t * (k / 32) + j] = s;
    }
  at::Tensor out = at::empty(out_shape, x.options());
  float* op = out.data_ptr<float>();
  const bool int16_x = kHasInt16Path && g_int16_activations.load(std::memory_order_relaxed);
  vec::aligned_vector<int16_t> xq(int16_x ? tokens * k : 0);
  std::vector<float> x_scale(int16_x ? tokens : 0), x_inv_scale(int16_x ? tokens : 0);
  for (int64_t t = 0; int16_x && t < tokens; ++t) {
    x_scale[t] = vec::quantize_int16(xp + t * k, k, xq.data() + t * k);
    x_inv_scale[t] = 1.f / x_scale[t];
  }
  // Per group of tokens: their x, x sums, int16 x and scales, and one pass over each row for all of them.
  with_type(f.type, [&](auto type) {
    constexpr Type T = decltype(type)::value;
    at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t t0 = 0; t0 < tokens; t0 += kTokenGroup) {
        const int64_t g = std::min<int64_t>(kTokenGroup, tokens - t0);
        const float* xs[kTokenGroup];
        const float* sums[kTokenGroup];
        const int16_t* qs[kTokenGroup];
        for (int64_t t = 0; t < g; ++t) {
          xs[t] = xp + (t0 + t) * k;
          sums[t] = xsum.data() + (t0 + t) * (k / 32);
          qs[t] = int16_x ? xq.data() + (t0 + t) * k : nullptr;
        }
        float res[kTokenGroup];
        auto rows = [&](auto n_tag) {
          constexpr int G = decltype(n_tag)::value;
          for (int64_t r = r0; r < r1; ++r) {
            const uint8_t* row = w + r * row_bytes;
            if (int16_x) {
              row_dot_i16<T, G>(qs, sums, x_inv_scale.data() + t0, row, blocks, res);
              for (int t = 0; t < G; ++t) res[t] *= x_scale[t0 + t];
            } else {
              row_dot<T, G>(xs, sums, row, blocks, res);
            }
            for (int t = 0; t < G; ++t) op[(t0 + t) * n + r] = res[t];
          }
        };
        vec::with_token_count<kTokenGroup>(g, rows);
      }
      if (argmax != nullptr) argmax->add(range_argmax(op, r0, r1));
    });
  });
  return x_in.scalar_type() == at::kFloat ? out : out.to(x_in.scalar_type());
}

}  // namespace

at::Tensor block_linear_cpu(const at::Tensor& x, const at::Tensor& weight) { return block_linear(x, weight, nullptr); }

int64_t block_gemv_token_limit() { return kMaxGemvTokens; }

void set_gguf_int16_activations(bool on) {
  TORCH_CHECK(!on || kHasInt16Path, "gemma3_fast: int16 GGUF activations have kernels only in AVX2 builds (x86-64 "
              "with AVX2 + FMA); this build runs GGUF blocks with exact fp32 activations only");
  g_int16_activations.store(on);
}
bool gguf_int16_available() { return kHasInt16Path; }
bool gguf_int16_activations() { return g_int16_activations.load(); }

int64_t block_linear_argmax_cpu(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.numel() == x.size(-1), "gemma3_fast: linear_argmax takes one token, got x of shape ", x.sizes());
  ArgmaxSink sink;
  block_linear(x, weight, &sink);
  return sink.best.index;
}

void block_embedding_rows(const at::Tensor& weight, const int64_t* ids, int64_t count, float scale, float* out) {
  const Format& f = gguf::block_format(weight, "embed_weight");
  const int64_t blocks = weight.size(1), k = blocks * f.block_elems, row_bytes = blocks * f.block_bytes;
  const uint8_t* w = weight.data_ptr<uint8_t>();
  for (int64_t i = 0; i < count; ++i) {
    gguf::dequantize_blocks(f, w + ids[i] * row_bytes, blocks, out + i * k);
    for (int64_t j = 0; j < k; ++j) out[i * k + j] *= scale;
  }
}

at::Tensor dequantize_cpu(const at::Tensor& blocks) {
  const Format& f = gguf::block_format(blocks, "blocks");
  const int64_t n = blocks.size(0), k = blocks.size(1) * f.block_elems;
  at::Tensor out = at::empty({n, k}, blocks.options().dtype(at::kFloat));
  dequantize_rows(f, blocks.data_ptr<uint8_t>(), blocks.size(1) * f.block_bytes, 0, n, out.data_ptr<float>(), k);
  return out;
}

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) { m.impl("dequantize", &dequantize_cpu); }

}  // namespace gemma3_fast
