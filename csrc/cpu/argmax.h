// The pieces of the argmax kernel (argmax.cpp) that the output head shares (linear.cpp, linear_argmax_cpu):
// the first maximum of a range as torch.argmax orders values (NaN above everything), and how two ranges' results
// combine.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>

#include "vec.h"

namespace gemma3_fast {

struct Best {
  float value = -std::numeric_limits<float>::infinity();
  int64_t index = -1;   // -1: the range was empty
  bool is_nan = false;  // value is a NaN: nothing beats it, an earlier NaN only
};

// The first maximum of x[begin, end), as torch orders values (NaN above +inf).
template <typename T>
inline Best range_argmax(const T* x, int64_t begin, int64_t end) {
  Best best;
  if (begin >= end) return best;
  int64_t i = begin;
  float mx = -std::numeric_limits<float>::infinity();
  bool any_nan = false;
#ifdef GEMMA3_SIMD
  vec::vf vmax = vec::vset(mx), vnan = vec::vzero();
  for (; i + vec::kW <= end; i += vec::kW) {
    const vec::vf v = vec::vload(x + i);
    vmax = vec::vmax(vmax, v);
    vnan = vec::vnan_or(vnan, v);
  }
  mx = std::max(mx, vec::vhmax(vmax));
  any_nan = vec::vany(vnan);
#endif
  for (; i < end; ++i) {
    const float v = vec::to_f32(x[i]);
    any_nan = any_nan || std::isnan(v);
    mx = std::max(mx, v);
  }
  if (any_nan) {  // rare: a scalar scan for the first NaN
    for (i = begin; !std::isnan(vec::to_f32(x[i])); ++i) {
    }
    best.value = std::numeric_limits<float>::quiet_NaN();
    best.index = i;
    best.is_nan = true;
    return best;
  }
  i = begin;
#ifdef GEMMA3_SIMD
  const vec::vf target = vec::vset(mx);
  for (; i + vec::kW <= end; i += vec::kW) {
    const unsigned hits = vec::veq_bits(vec::vload(x + i), target);
    if (hits != 0) {
      i += __builtin_ctz(hits);
      best.value = mx;
      best.index = i;
      return best;
    }
  }
#endif
  for (; vec::to_f32(x[i]) != mx; ++i) {
  }
  best.value = mx;
  best.index = i;
  return best;
}

// The first maximum of a part of the row and of the part after it.
inline Best combine(const Best& earlier, const Best& later) {
  if (earlier.index < 0) return later;
  if (later.index < 0 || earlier.is_nan) return earlier;
  return (later.is_nan || later.value > earlier.value) ? later : earlier;
}

// The same for two ranges in either order (each result carries its index).
inline Best combine_any(const Best& a, const Best& b) {
  if (a.index < 0) return b;
  if (b.index < 0) return a;
  return a.index < b.index ? combine(a, b) : combine(b, a);
}

// A head's running argmax, fed range by range from every thread that writes a chunk of the output: greedy
// decoding's pick without a second pass over the logits (linear.cpp and gguf_linear.cpp).
struct ArgmaxSink {
  std::mutex mutex;
  Best best;
  void add(const Best& b) {
    std::lock_guard<std::mutex> lock(mutex);
    best = combine_any(best, b);
  }
};

}  // namespace gemma3_fast
