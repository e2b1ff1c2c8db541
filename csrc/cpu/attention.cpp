// Sliding-window / global causal attention over the preallocated KV cache, flash-style: keys are visited in
// blocks with an online softmax in fp32, and no [queries, keys] mask or score matrix is materialized.
//
// Decode (few queries): work item = (token, kv head, key split). The G = Hq/Hk query heads sharing a KV head are processed together,
// so each key/value row is read once for all of them. When there are fewer (token, kv head) rows than threads
// (decode: one row), the key range is split and the partial softmax states are merged at the end.
// Prefill (many queries): blocks of 32 queries x 128 keys; scores and P @ V of a block are GEMMs, the
// online softmax runs on the [rows, 128] score block, and masks are applied only where a block straddles
// the causal diagonal or the window edge.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "kernels.h"
#include "vec.h"

namespace gemma3_fast {

int64_t check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& positions, int64_t window) {
  check_float_tensor(q, "q");
  check_dim(q, 3, "q", "[tokens, q_heads, head_dim]");
  check_contiguous(q, "q");
  check_kv_args(k_cache, v_cache, k, v);
  check_same_dtype(k, q, "k", "q");
  check_same_device(k, q, "k");
  TORCH_CHECK(k.size(0) == q.size(0), "gemma3_fast: k has ", k.size(0), " tokens but q has ", q.size(0));
  TORCH_CHECK(k.size(2) == q.size(2), "gemma3_fast: k has head_dim ", k.size(2), " but q has ", q.size(2));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "gemma3_fast: q_heads (", q.size(1),
              ") must be a multiple of kv_heads (", k.size(1), ")");
  TORCH_CHECK(window >= 0, "gemma3_fast: window must be >= 0 (0 = global attention), got ", window);
  const int64_t t = q.size(0);
  TORCH_CHECK(t > 0, "gemma3_fast: attention needs at least one query token");
  TORCH_CHECK(positions.scalar_type() == at::kLong, "gemma3_fast: positions must be int64, got ",
              positions.scalar_type());
  check_shape(positions, {t}, "positions");
  check_contiguous(positions, "positions");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t start = pos[0];
  TORCH_CHECK(start >= 0, "gemma3_fast: positions[0] = ", start, " is negative");
  for (int64_t i = 1; i < t; ++i)
    TORCH_CHECK(pos[i] == start + i, "gemma3_fast: positions must be consecutive; positions[", i, "] = ", pos[i],
                " after positions[0] = ", start);
  const int64_t lo = window > 0 ? std::max<int64_t>(0, start - window + 1) : 0;
  TORCH_CHECK(start - lo <= k_cache.size(0), "gemma3_fast: the queries need the cached keys of positions ", lo,
              "..", start - 1, " (", start - lo, " keys) but k_cache holds only ", k_cache.size(0), " slots");
  return start;
}

namespace {

constexpr int64_t kBlock = 32;  // keys per online-softmax step (a bf16 V block of 16 KB stays in L1)

// Online-softmax update of one query group's state (m, l, acc) with the block's scores s[G][kBlock]; turns s
// into the block's probabilities (relative to the new max).
inline void softmax_update(float* s, int64_t nb, float& m, float& l, float* acc, int64_t d) {
  float mnew = m;
  for (int64_t jj = 0; jj < nb; ++jj) mnew = std::max(mnew, s[jj]);
  const float corr = std::exp(m - mnew);  // 0 on the first block (m = -inf)
  vec::scale(acc, corr, d);
  l = l * corr + vec::exp_shift_sum(s, mnew, nb);
  m = mnew;
}

// The same as decode_block below, one key and one head at a time: any group size, any head_dim, no SIMD.
template <typename T, typename KeyFn, typename ValFn>
void decode_block_any(const float* qf, const KeyFn& key, const ValFn& val, int64_t j0, int64_t nb, int64_t d,
                      int64_t g, float* scores, float* m, float* l, float* acc) {
  for (int64_t jj = 0; jj < nb; ++jj)
    for (int64_t h = 0; h < g; ++h) scores[h * kBlock + jj] = vec::dot(qf + h * d, key(j0 + jj), d);
  for (int64_t h = 0; h < g; ++h) softmax_update(scores + h * kBlock, nb, m[h], l[h], acc + h * d, d);
  for (int64_t jj = 0; jj < nb; ++jj)
    for (int64_t h = 0; h < g; ++h) vec::axpy(acc + h * d, scores[h * kBlock + jj], val(j0 + jj), d);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const vec::bf16* p) {  // bf16 is the high half of an fp32
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif
#if defined(__AVX512BF16__) && defined(__AVX512F__)
constexpr bool kBf16Dot = true;
inline __m512bh load32_bf16(const vec::bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
#else
constexpr bool kBf16Dot = false;
#endif

// Value rows: P @ V below reads them 16 (AVX2: 8) columns at a time across the block's 32 rows. At decode they
// come from DRAM (the weights streaming past between two steps evict them), and in that column order the
// hardware prefetchers did not fetch ahead: the lines came one miss at a time. Each value row is prefetched
// while its key is scored, so those misses overlap the q.k work. One call per layer, cache cold (18 layers'
// caches, 64 MB read between rounds), 2-core EPYC: position 600, bf16 48 -> 34 us, fp32 91 -> 72 us;
// position 4000 (global), bf16 106 -> 76 us. Whole decode steps (positions 200-1000), one process, steps
// alternating: bf16 1.017-1.019x, fp32 1.010-1.018x. Prefetching the next block's keys and values as well,
// or into L2 only (prefetcht1), was no better.
// One block of nb keys (j0 ...) for the G query heads that share a KV head: scores, softmax, P @ V.
// Each key row is loaded once for all G heads, and the output accumulators are updated 8 (AVX-512: 16, NEON: 4)
// columns at a time across the whole block, so they stay in registers instead of a load/store per key.
// qf: the G query rows in fp32, already scaled; qraw: the same rows unscaled, in T (for bf16 dot products).
template <int G, typename T, typename KeyFn, typename ValFn>
void decode_block(const float* qf, const T* qraw, float scale, const KeyFn& key, const ValFn& val, int64_t j0,
                  int64_t nb, int64_t d, float* scores, float* m, float* l, float* acc) {
#if defined(__AVX512F__)
  // 16 columns per instruction instead of 8. With bf16 keys and AVX512-BF16, q.k runs on vdpbf16ps: 32 exact
  // bf16 products per instruction into fp32 sums, scaled after. One call on the 2-core EPYC, cache hot, AVX2
  // path -> this one: global layer at position 4000, bf16 218 -> 118 us, fp32 186 -> 164 us; sliding layer
  // (512 keys) bf16 25 -> 18 us, fp32 35 -> 23 us.
  if (d % 32 == 0) {
    const T* vrows[kBlock];  // resolved once per block: a ring slot costs an integer division
    for (int64_t jj = 0; jj < nb; ++jj) {
      const T* krow = key(j0 + jj);
      vrows[jj] = val(j0 + jj);
      vec::prefetch(vrows[jj], d * static_cast<int64_t>(sizeof(T)));  // see "Value rows" above
      __m512 a[G];
      for (int h = 0; h < G; ++h) a[h] = _mm512_setzero_ps();
      if constexpr (kBf16Dot && std::is_same_v<T, vec::bf16>) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
        for (int64_t x = 0; x < d; x += 32) {
          const __m512bh kv = load32_bf16(krow + x);
          for (int h = 0; h < G; ++h) a[h] = _mm512_dpbf16_ps(a[h], load32_bf16(qraw + h * d + x), kv);
        }
        for (int h = 0; h < G; ++h) scores[h * kBlock + jj] = _mm512_reduce_add_ps(a[h]) * scale;
#endif
      } else {
        for (int64_t x = 0; x < d; x += 16) {
          const __m512 kv = load16(krow + x);
          for (int h = 0; h < G; ++h) a[h] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + h * d + x), kv, a[h]);
        }
        for (int h = 0; h < G; ++h) scores[h * kBlock + jj] = _mm512_reduce_add_ps(a[h]);
      }
    }
    for (int h = 0; h < G; ++h) softmax_update(scores + h * kBlock, nb, m[h], l[h], acc + h * d, d);
    for (int64_t x0 = 0; x0 < d; x0 += 16) {
      __m512 o[G];
      for (int h = 0; h < G; ++h) o[h] = _mm512_loadu_ps(acc + h * d + x0);
      for (int64_t jj = 0; jj < nb; ++jj) {
        const __m512 vv = load16(vrows[jj] + x0);
        for (int h = 0; h < G; ++h) o[h] = _mm512_fmadd_ps(_mm512_set1_ps(scores[h * kBlock + jj]), vv, o[h]);
      }
      for (int h = 0; h < G; ++h) _mm512_storeu_ps(acc + h * d + x0, o[h]);
    }
    return;
  }
#endif
  (void)qraw;
  (void)scale;
#ifdef GEMMA3_SIMD
  if (d % vec::kW == 0) {  // AVX2: 8 columns per instruction, NEON: 4
    using namespace vec;
    const T* vrows[kBlock];  // resolved once per block: a ring slot costs an integer division
    for (int64_t jj = 0; jj < nb; ++jj) {
      const T* krow = key(j0 + jj);
      vrows[jj] = val(j0 + jj);
      prefetch(vrows[jj], d * static_cast<int64_t>(sizeof(T)));  // see "Value rows" above
      vf a[G];
      for (int h = 0; h < G; ++h) a[h] = vzero();
      for (int64_t x = 0; x < d; x += kW) {
        const vf kv = vload(krow + x);
        for (int h = 0; h < G; ++h) a[h] = vfma(vload(qf + h * d + x), kv, a[h]);
      }
      for (int h = 0; h < G; ++h) scores[h * kBlock + jj] = vhsum(a[h]);
    }
    for (int h = 0; h < G; ++h) softmax_update(scores + h * kBlock, nb, m[h], l[h], acc + h * d, d);
    for (int64_t x0 = 0; x0 < d; x0 += kW) {
      vf o[G];
      for (int h = 0; h < G; ++h) o[h] = vload(acc + h * d + x0);
      for (int64_t jj = 0; jj < nb; ++jj) {
        const vf vv = vload(vrows[jj] + x0);
        for (int h = 0; h < G; ++h) o[h] = vfma(vset(scores[h * kBlock + jj]), vv, o[h]);
      }
      for (int h = 0; h < G; ++h) vstore(acc + h * d + x0, o[h]);
    }
    return;
  }
#endif
  decode_block_any<T>(qf, key, val, j0, nb, d, G, scores, m, l, acc);
}

template <typename T>
void attention_kernel(const T* q, const T* k, const T* v, const T* kc, const T* vc, T* out, int64_t t, int64_t hq,
                      int64_t hk, int64_t d, int64_t slots, int64_t start, int64_t window, float scale) {
  const int64_t g = hq / hk;
  const int64_t rows = t * hk;
  const int64_t max_keys = window > 0 ? std::min(window, start + t) : start + t;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = rows >= threads ? 1 : std::clamp<int64_t>(max_keys / 128, 1, threads);
  const int64_t state = g * (d + 2);  // per work item: m[g], l[g], acc[g][d]
  std::vector<float> partial(rows * splits * state);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, rows * splits, 1, [&](int64_t b, int64_t e) {
    std::vector<float> qf(g * d), scores(g * kBlock);
    for (int64_t item = b; item < e; ++item) {
      const int64_t ti = item / (hk * splits), gi = (item / splits) % hk, p = item % splits;
      const int64_t i = start + ti;  // absolute position of this query
      const int64_t lo = window > 0 ? std::max<int64_t>(0, i - window + 1) : 0;
      const int64_t n = i - lo + 1;
      const int64_t jb = lo + n * p / splits, je = lo + n * (p + 1) / splits;
      float* st = partial.data() + item * state;
      float *m = st, *l = st + g, *acc = st + 2 * g;
      for (int64_t h = 0; h < g; ++h) {
        m[h] = kNegInf;
        l[h] = 0.f;
        const T* qrow = q + (ti * hq + gi * g + h) * d;
        for (int64_t x = 0; x < d; ++x) qf[h * d + x] = vec::to_f32(qrow[x]) * scale;
      }
      std::fill(acc, acc + g * d, 0.f);
      auto key = [&](int64_t j) { return j < start ? kc + ((j % slots) * hk + gi) * d : k + ((j - start) * hk + gi) * d; };
      auto val = [&](int64_t j) { return j < start ? vc + ((j % slots) * hk + gi) * d : v + ((j - start) * hk + gi) * d; };
      for (int64_t j0 = jb; j0 < je; j0 += kBlock) {
        const int64_t nb = std::min(kBlock, je - j0);
        auto block = [&](auto g_tag) {
          constexpr int G = decltype(g_tag)::value;
          decode_block<G, T>(qf.data(), q + (ti * hq + gi * g) * d, scale, key, val, j0, nb, d, scores.data(), m,
                             l, acc);
        };
        switch (g) {  // the query heads per KV head as a constant: their accumulators stay in registers
          case 1: block(std::integral_constant<int, 1>{}); break;
          case 2: block(std::integral_constant<int, 2>{}); break;
          case 4: block(std::integral_constant<int, 4>{}); break;
          case 8: block(std::integral_constant<int, 8>{}); break;
          default: decode_block_any<T>(qf.data(), key, val, j0, nb, d, g, scores.data(), m, l, acc);
        }
      }
    }
  });

  // Merge the splits: out = sum_p acc_p e^(m_p - M) / sum_p l_p e^(m_p - M).
  at::parallel_for(0, rows * g, 4, [&](int64_t b, int64_t e) {
    std::vector<float> o(d);
    for (int64_t r = b; r < e; ++r) {
      const int64_t row = r / g, h = r % g, ti = row / hk, gi = row % hk;
      float mmax = kNegInf;
      for (int64_t p = 0; p < splits; ++p) mmax = std::max(mmax, partial[(row * splits + p) * state + h]);
      float denom = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t p = 0; p < splits; ++p) {
        const float* st = partial.data() + (row * splits + p) * state;
        if (st[h] == kNegInf) continue;  // an empty split
        const float w = std::exp(st[h] - mmax);
        denom += st[g + h] * w;
        vec::axpy(o.data(), w, st + 2 * g + h * d, d);
      }
      T* orow = out + (ti * hq + gi * g + h) * d;
      const float inv = 1.f / denom;
      for (int64_t x = 0; x < d; ++x) orow[x] = vec::from_f32<T>(o[x] * inv);
    }
  });
}


constexpr int64_t kPrefillMinTokens = 16;
constexpr int64_t kQueryBlock = 32, kKeyBlock = 128;

template <typename T>
void attention_prefill_kernel(const T* q, const T* k, const T* v, const T* kc, const T* vc, T* out, int64_t t,
                              int64_t hq, int64_t hk, int64_t d, int64_t slots, int64_t start, int64_t window,
                              float scale, float* lse = nullptr) {
  auto blob = [](float* p, int64_t r, int64_t c) { return at::from_blob(p, {r, c}, at::kFloat); };
  const int64_t g = hq / hk;
  const int64_t lo0 = window > 0 ? std::max<int64_t>(0, start - window + 1) : 0;
  const int64_t nkeys = start + t - lo0;  // keys of positions lo0 .. start + t - 1
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int64_t gi = 0; gi < hk; ++gi) {
    // This KV head's keys and values as contiguous fp32 rows, cached ones gathered from the ring first.
    std::vector<float> keys(nkeys * d), vals(nkeys * d);
    at::parallel_for(0, nkeys, 64, [&](int64_t b, int64_t e) {
      for (int64_t idx = b; idx < e; ++idx) {
        const int64_t j = lo0 + idx;
        const T* kr = j < start ? kc + ((j % slots) * hk + gi) * d : k + ((j - start) * hk + gi) * d;
        const T* vr = j < start ? vc + ((j % slots) * hk + gi) * d : v + ((j - start) * hk + gi) * d;
        vec::convert(keys.data() + idx * d, kr, d);
        vec::convert(vals.data() + idx * d, vr, d);
      }
    });
    const int64_t nblocks = (t + kQueryBlock - 1) / kQueryBlock;
    // Causal: a later query block sees more keys, so an even split of blocks between threads is uneven work
    // (2 threads, 16 blocks: 36 vs 100 key blocks). Threads take blocks from a shared counter, last (largest)
    // first.
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), nblocks), 1, [&](int64_t, int64_t) {
      const int64_t rows_max = kQueryBlock * g;
      std::vector<float> qb(rows_max * d), acc(rows_max * d), sc(rows_max * kKeyBlock), m(rows_max), l(rows_max);
      for (int64_t taken; (taken = next.fetch_add(1, std::memory_order_relaxed)) < nblocks;) {
        const int64_t blk = nblocks - 1 - taken;
        const int64_t t0 = blk * kQueryBlock, t1 = std::min(t, t0 + kQueryBlock);
        const int64_t rows = (t1 - t0) * g;  // row r = (token t0 + r / g, head gi * g + r % g)
        for (int64_t r = 0; r < rows; ++r) {
          const T* qr = q + ((t0 + r / g) * hq + gi * g + r % g) * d;
          for (int64_t x = 0; x < d; ++x) qb[r * d + x] = vec::to_f32(qr[x]) * scale;
        }
        std::fill(acc.begin(), acc.begin() + rows * d, 0.f);
        std::fill(m.begin(), m.begin() + rows, kNegInf);
        std::fill(l.begin(), l.begin() + rows, 0.f);
        const int64_t i_first = start + t0, i_last = start + t1 - 1;
        const int64_t j_begin = window > 0 ? std::max(lo0, i_first - window + 1) : lo0;
        for (int64_t j0 = j_begin; j0 <= i_last; j0 += kKeyBlock) {
          const int64_t nb = std::min(kKeyBlock, i_last + 1 - j0);
          at::Tensor scores = blob(sc.data(), rows, nb);  // (scale * q) @ k^T for this block
          at::mm_out(scores, blob(qb.data(), rows, d), blob(keys.data() + (j0 - lo0) * d, nb, d).t());
          const bool needs_mask = j0 + nb - 1 > i_first || (window > 0 && i_last - j0 >= window);
          for (int64_t r = 0; r < rows; ++r) {
            float* s = sc.data() + r * nb;
            const int64_t i = start + t0 + r / g;
            if (needs_mask)
              for (int64_t c = 0; c < nb; ++c) {
                const int64_t j = j0 + c;
                if (j > i || (window > 0 && i - j >= window)) s[c] = kNegInf;
              }
            const float mx = vec::max_value(s, nb, m[r]);
            if (mx == kNegInf) {  // nothing visible to this row in this block
              std::fill(s, s + nb, 0.f);
              continue;
            }
            const float corr = std::exp(m[r] - mx);
            l[r] = l[r] * corr + vec::exp_shift_sum(s, mx, nb);  // masked scores (-inf) become ~1e-38: negligible
            m[r] = mx;
            if (corr != 1.f) vec::scale(acc.data() + r * d, corr, d);
          }
          blob(acc.data(), rows, d).addmm_(scores, blob(vals.data() + (j0 - lo0) * d, nb, d));  // acc += P @ V
        }
        for (int64_t r = 0; r < rows; ++r) {
          T* orow = out + ((t0 + r / g) * hq + gi * g + r % g) * d;
          const float inv = 1.f / l[r];
          for (int64_t x = 0; x < d; ++x) orow[x] = vec::from_f32<T>(acc[r * d + x] * inv);
          if (lse != nullptr) lse[(t0 + r / g) * hq + gi * g + r % g] = m[r] + std::log(l[r]);  // for the backward
        }
      }
    });
  }
}

}  // namespace

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                         const at::Tensor& v_cache, const at::Tensor& positions, int64_t window, double scale) {
  const int64_t start = check_attention_args(q, k, v, k_cache, v_cache, positions, window);
  at::Tensor out = at::empty_like(q);
  dispatch_float_bf16(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto kernel = [&](auto f) {
      f(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),
        out.data_ptr<T>(), q.size(0), q.size(1), k.size(1), q.size(2), k_cache.size(0), start, window,
        static_cast<float>(scale));
    };
    if (q.size(0) >= kPrefillMinTokens) {
      kernel([](auto... a) { attention_prefill_kernel<T>(a...); });
    } else {
      kernel(attention_kernel<T>);
    }
  });
  return out;
}

void check_causal_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window) {
  check_float_tensor(q, "q");
  check_dim(q, 4, "q", "[batch, tokens, q_heads, head_dim]");
  check_dim(k, 4, "k", "[batch, tokens, kv_heads, head_dim]");
  check_dim(v, 4, "v", "[batch, tokens, kv_heads, head_dim]");
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_contiguous(*t, name);
    check_same_dtype(*t, q, name, "q");
    check_same_device(*t, q, name);
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "gemma3_fast: k has shape ", k.sizes(), " but v has ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3), "gemma3_fast: k has shape ",
              k.sizes(), " but q has ", q.sizes(), " (batch, tokens and head_dim must match)");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "gemma3_fast: q_heads (", q.size(2),
              ") must be a multiple of kv_heads (", k.size(2), ")");
  TORCH_CHECK(q.size(1) > 0, "gemma3_fast: attention needs at least one token");
  TORCH_CHECK(window >= 0, "gemma3_fast: window must be >= 0 (0 = global attention), got ", window);
}

// Training attention: each batch row a sequence from position 0, no cache. The prefill kernel per row, which also
// writes each query's log-sum-exp (lse [batch, tokens, q_heads], fp32) for the backward to rebuild the
// probabilities from.
std::tuple<at::Tensor, at::Tensor> causal_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        int64_t window, double scale) {
  check_causal_attention_args(q, k, v, window);
  const int64_t b = q.size(0), t = q.size(1), hq = q.size(2), hk = k.size(2), d = q.size(3);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({b, t, hq}, q.options().dtype(at::kFloat));
  dispatch_float_bf16(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    for (int64_t i = 0; i < b; ++i) {
      const T *kp = k.data_ptr<T>() + i * t * hk * d, *vp = v.data_ptr<T>() + i * t * hk * d;
      attention_prefill_kernel<T>(q.data_ptr<T>() + i * t * hq * d, kp, vp, kp, vp, out.data_ptr<T>() + i * t * hq * d,
                                  t, hq, hk, d, 1, 0, window, static_cast<float>(scale),
                                  lse.data_ptr<float>() + i * t * hq);
    }
  });
  return {out, lse};
}

TORCH_LIBRARY_IMPL(gemma3_fast, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("causal_attention", &causal_attention_cpu);
}

}  // namespace gemma3_fast
