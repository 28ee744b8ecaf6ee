// Paged decode attention on the CPU: one-token queries against their context read in place from the
// paged KV cache, without first gathering the blocks into a copy. Built by cpu_paged_decode.py
// (torch.utils.cpp_extension, with the vector ISA inductor picks for this machine: ATen's
// Vectorized<float> is then 16 lanes on AVX-512, 8 on AVX2). Tested against attention in float64
// (tests/unit/test_cpu_paged_decode.py) and, through the cpu backend, against torch_native.
//
// One task per (request, KV head), the query heads sharing that KV head together; at batch (at least
// four requests a thread) one task per request and all its KV heads, so that a task reads whole
// cache rows, contiguous within a block, instead of one head's part of each. With AVX-512 the
// scores come 16 keys at a time (each key's dot product as a vector of partial sums, the 16 summed
// by one transposing add tree); with AVX512-BF16 they are bf16 dot products of the query and key
// rows as stored, and the value pass adds two rows a step with the probabilities rounded to bf16
// (as SDPA's bf16 kernel rounds them); otherwise rows are widened to float32 and the query scaled
// in float32. The scores' maximum and exp(score - max) are vector passes; the value sums stay in
// registers. Everything accumulates in float32; the output is rounded to the model's dtype once.
// The rows lie block by block anywhere in the pool, so the loops prefetch the key rows ahead and
// the value rows while scoring (at 1,000 tokens of context, 1.3x without it).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_bf16.h"
#include "cpu_flash_prefill.h"

namespace {

using Vec = at::vec::Vectorized<float>;

// widen(): a row of the cache (or a query) in float32. bf16 is the top half of a float32, so
// widening it is a shift, which the compiler vectorises.
template <typename T>
inline void widen(const T* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

template <>
inline void widen<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<uint32_t>(bits[d]) << 16;
}

// scores[0:n] = exp(scores - max); returns their sum.
inline float exp_and_sum(float* scores, int64_t n, float max) {
  const Vec shift(max);
  Vec sum(0.f);
  int64_t t = 0;
  for (; t + Vec::size() <= n; t += Vec::size()) {
    const Vec e = (Vec::loadu(scores + t) - shift).exp_u20();
    e.store(scores + t);
    sum = sum + e;
  }
  float total = sum.reduce_add();
  for (; t < n; ++t) {
    scores[t] = std::exp(scores[t] - max);
    total += scores[t];
  }
  return total;
}

// The most float vectors a head may span (head_dim 256 on AVX2).
constexpr int64_t kMaxChunks = 32;

// A row of `chunks` float vectors widened in registers. bf16 and half load two vectors' worth at once.
template <typename T>
inline void load_row(const T* src, int64_t chunks, Vec* out) {
  constexpr int64_t W = Vec::size();
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t c = 0; c < chunks; ++c) out[c] = Vec::loadu(src + c * W);
  } else {
    using Wide = at::vec::Vectorized<T>;
    for (int64_t c = 0; c < chunks; c += 2) {
      const Wide half_row = c + 1 < chunks ? Wide::loadu(src + c * W) : Wide::loadu(src + c * W, W);
      auto [lo, hi] = at::vec::convert_to_float<T>(half_row);
      out[c] = lo;
      if (c + 1 < chunks) out[c + 1] = hi;
    }
  }
}

constexpr int64_t kPrefetchAhead = 8;

// The tree path's key prefetch: this many chunks of 16 rows ahead.
constexpr int64_t kChunksAhead = 2;

template <typename T>
inline void prefetch_row(const T* row, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(row);
  const int64_t size = n * static_cast<int64_t>(sizeof(T));
  for (int64_t offset = 0; offset < size; offset += 64) __builtin_prefetch(bytes + offset);
}

// Where a request's cache rows lie: block by block anywhere in the pool, a row per token.
template <typename T>
struct Rows {
  const T* base;
  const int32_t* blocks;
  int64_t block_size, block_stride, row_stride;
  const T* at(int64_t t) const { return base + blocks[t / block_size] * block_stride + (t % block_size) * row_stride; }
};

// `bytes` from `row` on, prefetched into L2 (`prefetcht1`: on Zen 4 a chunk's L1-targeted prefetches
// ran out of L1's miss buffers and stalled the loop).
template <typename T>
inline void prefetch_span(const T* row, int64_t bytes) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(p + offset, 0, 2);
}

// What one task attends: `heads` query heads (those of `heads / group` consecutive KV heads, `group`
// to a KV head; query head i reads KV head i / group, `kv_stride` elements from the previous one)
// against `len` rows of one request.
struct Task {
  int64_t heads, group, kv_stride, len;
};

// The scores of a task, one key row at a time, each dot product ending in a horizontal sum (the
// path for builds without AVX-512). query: [heads, head_dim] float32, already scaled; scores:
// [heads, len]; maxima: [heads].
template <typename T, int64_t CHUNKS>
void score_rowwise(const float* query, int64_t chunks, const Task& task, const Rows<T>& keys, const Rows<T>& values,
                   float* scores, float* maxima) {
  constexpr int64_t W = Vec::size();
  const int64_t n = CHUNKS ? CHUNKS : chunks, len = task.len;
  const int64_t span = (task.heads / task.group - 1) * task.kv_stride + n * W;  // the task's part of a row
  Vec row[CHUNKS ? CHUNKS : kMaxChunks];
  for (int64_t t = 0; t < len; ++t) {
    // The rows lie block by block anywhere in the pool, where the hardware prefetcher cannot
    // follow: the key row kPrefetchAhead tokens on, and this token's value row for the pass below.
    if (t + kPrefetchAhead < len) prefetch_row(keys.at(t + kPrefetchAhead), span);
    prefetch_row(values.at(t), span);
    for (int64_t h = 0; h < task.heads; ++h) {
      if (h % task.group == 0) load_row<T>(keys.at(t) + h / task.group * task.kv_stride, n, row);
      const float* qh = query + h * n * W;
      Vec sum = Vec::loadu(qh) * row[0];
      for (int64_t c = 1; c < n; ++c) sum = at::vec::fmadd(Vec::loadu(qh + c * W), row[c], sum);
      const float score = sum.reduce_add();
      scores[h * len + t] = score;
      maxima[h] = std::max(maxima[h], score);
    }
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Lane j of the result: the sum of the 16 lanes of s[j]. A transposing tree of 15 vector adds
// (and their shuffles) in place of 16 horizontal sums.
inline __m512 sum16(const __m512* s) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // each 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] of x = s[2i], y = s[2i+1]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(s[2 * i], s[2 * i + 1]), _mm512_unpackhi_ps(s[2 * i], s[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // each 128-bit lane: keys 4i..4i+3, that lane's part of each sum
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: keys 8i..8i+3 twice (two halves), then keys 8i+4..8i+7 twice
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

// The 16 key rows from t0 on (the last valid row repeated past len, so no load leaves the
// request's blocks); the task's part of the next 16 key rows prefetched, and of these value rows
// (into L2: the value pass comes after every score).
template <typename T>
inline int64_t key_chunk(const Rows<T>& keys, const Rows<T>& values, int64_t t0, int64_t len, int64_t span,
                         const T** rows) {
  const int64_t m = std::min<int64_t>(16, len - t0);
  for (int64_t j = 0; j < 16; ++j) rows[j] = keys.at(t0 + std::min(j, m - 1));
  const int64_t bytes = span * static_cast<int64_t>(sizeof(T));
  for (int64_t t = t0 + 16 * kChunksAhead; t < std::min(len, t0 + 16 * kChunksAhead + 16); ++t)
    prefetch_span(keys.at(t), bytes);
  for (int64_t j = 0; j < m; ++j) prefetch_span(values.at(t0 + j), bytes);
  return m;
}

// A key row's dot product with one query head as a vector of 16 partial sums: the query widened to
// float32 and scaled (any dtype, any AVX-512 CPU).
template <typename T, int64_t CHUNKS>
struct FloatDot {
  const float* query;  // [heads, head_dim], scaled
  int64_t n;           // head_dim in float vectors
  const float* qh = nullptr;
  static constexpr bool kScaled = true;
  void head(int64_t h) { qh = query + h * n * Vec::size(); }
  __m512 operator()(const T* key) const {
    Vec row[CHUNKS ? CHUNKS : kMaxChunks];
    load_row<T>(key, n, row);
    Vec sum = Vec::loadu(qh) * row[0];
    for (int64_t c = 1; c < n; ++c) sum = at::vec::fmadd(Vec::loadu(qh + c * Vec::size()), row[c], sum);
    return sum;
  }
};

// The same for bf16 on CPUs with AVX512-BF16: the query stays bf16 (as the model produced it) and
// each pair of products is one `vdpbf16ps` lane step (bf16 x bf16 is exact in float32, the sums
// float32), so key rows are never widened; the scale multiplies the scores after.
struct Bf16Dot {
  const c10::BFloat16* q;  // query head h at q + h * stride
  int64_t stride, pairs;   // pairs: head_dim / 32, bf16 vectors a row
  __m512bh qv[kMaxChunks / 2];
  static constexpr bool kScaled = false;
  TOKENMILL_BF16 void head(int64_t h) {
    for (int64_t c = 0; c < pairs; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + h * stride + 32 * c);
  }
  TOKENMILL_BF16 __m512 operator()(const c10::BFloat16* key) const {
    __m512 sum = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(key));
    for (int64_t c = 1; c < pairs; ++c) sum = _mm512_dpbf16_ps(sum, qv[c], (__m512bh)_mm512_loadu_si512(key + 32 * c));
    return sum;
  }
};

// score_rowwise, 16 keys a vector: each key's partial sums (`dot`) reduced together by sum16. Built
// for bf16 instructions so that Bf16Dot inlines; FloatDot's code uses none of them.
template <typename T, typename Dot>
TOKENMILL_BF16 void score_tree(Dot& dot, float scale, int64_t head_dim, const Task& task, const Rows<T>& keys,
                               const Rows<T>& values, float* scores, float* maxima) {
  const int64_t len = task.len;
  const int64_t span = (task.heads / task.group - 1) * task.kv_stride + head_dim;
  const T* rows[16];
  __m512 partial[16];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int64_t m = key_chunk(keys, values, t0, len, span, rows);
    const __mmask16 valid = static_cast<__mmask16>((1u << m) - 1);
    for (int64_t h = 0; h < task.heads; ++h) {
      const int64_t offset = h / task.group * task.kv_stride;
      dot.head(h);
      for (int64_t j = 0; j < 16; ++j) partial[j] = dot(rows[j] + offset);
      __m512 s = sum16(partial);
      if constexpr (!Dot::kScaled) s = _mm512_mul_ps(s, vscale);
      _mm512_mask_storeu_ps(scores + h * len + t0, valid, s);
      maxima[h] = std::max(maxima[h], _mm512_mask_reduce_max_ps(valid, s));
    }
  }
}

// The value pass of H query heads of one KV head for bf16 on CPUs with AVX512-BF16: two value rows
// at a time interleaved into (row t, row t+1) pairs, each pair weighted by the two tokens'
// probabilities rounded to bf16 (as SDPA's bf16 kernel rounds them) in one `vdpbf16ps` step, half
// the instructions of widening every row to float32. weights: [H, len]; pairs: [H, len / 2 rounded
// up] scratch; acc: [H, head_dim] float32.
template <int PAIRS, int H>
TOKENMILL_BF16
void accumulate_heads_dp(const float* weights, int64_t len, const Rows<c10::BFloat16>& values, uint32_t* pairs,
                         float* acc) {
  const int64_t half = (len + 1) / 2;
  for (int h = 0; h < H; ++h) {
    const float* w = weights + h * len;
    uint32_t* p = pairs + h * half;
    int64_t i = 0;
    for (; i + 16 <= len / 2; i += 16) {  // 32 weights -> 16 bf16 pairs, in token order
      const __m512 a = _mm512_loadu_ps(w + 2 * i), b = _mm512_loadu_ps(w + 2 * i + 16);
      const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a);  // bf16 of a in the low half, of b in the high
      _mm512_storeu_si512(p + i, ab);
    }
    for (; i < half; ++i) {
      const c10::BFloat16 first(w[2 * i]), second(2 * i + 1 < len ? w[2 * i + 1] : 0.f);  // rounded to nearest even
      p[i] = static_cast<uint32_t>(first.x) | static_cast<uint32_t>(second.x) << 16;
    }
  }
  __m512 sum[H][2 * PAIRS];
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < 2 * PAIRS; ++c) sum[h][c] = _mm512_setzero_ps();
  __m512i lo[PAIRS], hi[PAIRS];
  for (int64_t t = 0; t < len; t += 2) {
    const c10::BFloat16* r0 = values.at(t);
    const c10::BFloat16* r1 = t + 1 < len ? values.at(t + 1) : r0;  // weight 0
    for (int c = 0; c < PAIRS; ++c) {
      const __m512i a = _mm512_loadu_si512(r0 + 32 * c), b = _mm512_loadu_si512(r1 + 32 * c);
      lo[c] = _mm512_unpacklo_epi16(a, b);
      hi[c] = _mm512_unpackhi_epi16(a, b);
    }
    for (int h = 0; h < H; ++h) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(pairs[h * half + t / 2]));
      for (int c = 0; c < PAIRS; ++c) {
        sum[h][2 * c] = _mm512_dpbf16_ps(sum[h][2 * c], (__m512bh)lo[c], w);
        sum[h][2 * c + 1] = _mm512_dpbf16_ps(sum[h][2 * c + 1], (__m512bh)hi[c], w);
      }
    }
  }
  // Lane i of lo[c] holds dimension 32c + 8(i / 4) + i % 4, of hi[c] that + 4: back to order.
  const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int h = 0; h < H; ++h)
    for (int c = 0; c < PAIRS; ++c) {
      float* out = acc + h * 32 * PAIRS + 32 * c;
      _mm512_storeu_ps(out, _mm512_permutex2var_ps(sum[h][2 * c], first, sum[h][2 * c + 1]));
      _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(sum[h][2 * c], second, sum[h][2 * c + 1]));
    }
}

// accumulate_heads_dp over `group` heads, in blocks whose accumulators fit 16 registers.
template <int64_t CHUNKS>
void accumulate_dp(const float* weights, int64_t group, int64_t len, const Rows<c10::BFloat16>& values,
                   uint32_t* pairs, float* acc) {
  constexpr int PAIRS = static_cast<int>(CHUNKS / 2), kBlock = static_cast<int>(16 / CHUNKS);
  const int64_t half = (len + 1) / 2;
  for (int64_t g = 0; g < group; g += kBlock) {
    const float* w = weights + g * len;
    float* a = acc + g * CHUNKS * 16;
    uint32_t* p = pairs + g * half;
    switch (std::min<int64_t>(kBlock, group - g)) {
      case 1: accumulate_heads_dp<PAIRS, 1>(w, len, values, p, a); break;
      case 2: if constexpr (kBlock >= 2) accumulate_heads_dp<PAIRS, 2>(w, len, values, p, a); break;
      case 3: if constexpr (kBlock >= 3) accumulate_heads_dp<PAIRS, 3>(w, len, values, p, a); break;
      case 4: if constexpr (kBlock >= 4) accumulate_heads_dp<PAIRS, 4>(w, len, values, p, a); break;
      case 5: if constexpr (kBlock >= 5) accumulate_heads_dp<PAIRS, 5>(w, len, values, p, a); break;
      case 6: if constexpr (kBlock >= 6) accumulate_heads_dp<PAIRS, 6>(w, len, values, p, a); break;
      case 7: if constexpr (kBlock >= 7) accumulate_heads_dp<PAIRS, 7>(w, len, values, p, a); break;
      default: if constexpr (kBlock >= 8) accumulate_heads_dp<PAIRS, 8>(w, len, values, p, a); break;
    }
  }
}

using tokenmill_cpu::has_avx512_bf16;
#endif

// acc[h] = sum over t of weights[h * len + t] * value row t, for H heads at once with the
// accumulators in registers (H * CHUNKS <= 16 vectors).
template <typename T, int64_t CHUNKS, int H>
void accumulate_heads(const float* weights, int64_t len, const Rows<T>& values, float* acc) {
  constexpr int64_t W = Vec::size();
  Vec sum[H][CHUNKS];
  for (int h = 0; h < H; ++h)
    for (int64_t c = 0; c < CHUNKS; ++c) sum[h][c] = Vec(0.f);
  Vec row[CHUNKS];
  for (int64_t t = 0; t < len; ++t) {
    load_row<T>(values.at(t), CHUNKS, row);
    for (int h = 0; h < H; ++h) {
      const Vec weight(weights[h * len + t]);
      for (int64_t c = 0; c < CHUNKS; ++c) sum[h][c] = at::vec::fmadd(weight, row[c], sum[h][c]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int64_t c = 0; c < CHUNKS; ++c) sum[h][c].store(acc + (h * CHUNKS + c) * W);
}

// The same for any head size: accumulators in memory.
template <typename T>
void accumulate_any(const float* weights, int64_t heads, int64_t n, int64_t len, const Rows<T>& values, float* acc) {
  constexpr int64_t W = Vec::size();
  Vec row[kMaxChunks];
  std::fill(acc, acc + heads * n * W, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    load_row<T>(values.at(t), n, row);
    for (int64_t h = 0; h < heads; ++h) {
      const Vec weight(weights[h * len + t]);
      float* ah = acc + h * n * W;
      for (int64_t c = 0; c < n; ++c) at::vec::fmadd(weight, row[c], Vec::loadu(ah + c * W)).store(ah + c * W);
    }
  }
}

// The value pass of the `group` query heads of one KV head, in blocks of heads whose accumulators
// fit 16 registers.
template <typename T, int64_t CHUNKS>
void accumulate(const float* weights, int64_t group, int64_t chunks, int64_t len, const Rows<T>& values, float* acc) {
  constexpr int64_t W = Vec::size();
  if constexpr (CHUNKS == 0 || CHUNKS > 8) {
    accumulate_any<T>(weights, group, chunks, len, values, acc);
  } else {
    constexpr int kBlock = static_cast<int>(16 / CHUNKS);
    for (int64_t g = 0; g < group; g += kBlock) {
      const float* w = weights + g * len;
      float* a = acc + g * CHUNKS * W;
      switch (std::min<int64_t>(kBlock, group - g)) {
        case 1: accumulate_heads<T, CHUNKS, 1>(w, len, values, a); break;
        case 2: accumulate_heads<T, CHUNKS, 2>(w, len, values, a); break;
        case 3: if constexpr (kBlock >= 3) accumulate_heads<T, CHUNKS, 3>(w, len, values, a); break;
        case 4: if constexpr (kBlock >= 4) accumulate_heads<T, CHUNKS, 4>(w, len, values, a); break;
        default: accumulate_any<T>(w, std::min<int64_t>(kBlock, group - g), CHUNKS, len, values, a);
      }
    }
  }
}

// The attention of one task. CHUNKS: head_dim in float vectors, fixed at compile time for the
// common head sizes (the loops unroll, rows and accumulators stay in registers); 0: `chunks` at run
// time. query: [heads, head_dim] float32, already scaled (q_raw: the same rows unscaled, in the
// model's dtype, `q_head_stride` apart); scores: [heads, len]; acc: [heads, head_dim]. `keys` and
// `values` point at the task's first KV head.
template <typename T, int64_t CHUNKS>
void attend(const float* query, const T* q_raw, int64_t q_head_stride, float scale, int64_t chunks, const Task& task,
            const Rows<T>& keys, const Rows<T>& values, float* scores, float* maxima, float* acc, float* inverse,
            uint32_t* pairs) {
  constexpr int64_t W = Vec::size();
  const int64_t n = CHUNKS ? CHUNKS : chunks, len = task.len;
  for (int64_t h = 0; h < task.heads; ++h) maxima[h] = -std::numeric_limits<float>::infinity();
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(Vec::size() == 16, "the tree reduces 16-lane vectors");
  bool scored = false;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (has_avx512_bf16() && n % 2 == 0) {
      Bf16Dot dot{q_raw, q_head_stride, n / 2};
      score_tree(dot, scale, n * W, task, keys, values, scores, maxima);
      scored = true;
    }
  }
  if (!scored) {
    FloatDot<T, CHUNKS> dot{query, n};
    score_tree(dot, 1.f, n * W, task, keys, values, scores, maxima);
  }
#else
  score_rowwise<T, CHUNKS>(query, chunks, task, keys, values, scores, maxima);
#endif
  for (int64_t h = 0; h < task.heads; ++h) {
    const float total = exp_and_sum(scores + h * len, len, maxima[h]);
    inverse[h] = total > 0.f ? 1.f / total : 0.f;
  }
  for (int64_t kv = 0; kv < task.heads / task.group; ++kv) {
    Rows<T> head_values = values;
    head_values.base += kv * task.kv_stride;
    const float* weights = scores + kv * task.group * len;
    float* head_acc = acc + kv * task.group * n * W;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16> && (CHUNKS == 2 || CHUNKS == 4 || CHUNKS == 8)) {
      if (has_avx512_bf16()) {
        accumulate_dp<CHUNKS>(weights, task.group, len, head_values, pairs, head_acc);
        continue;
      }
    }
#endif
    accumulate<T, CHUNKS>(weights, task.group, chunks, len, head_values, head_acc);
  }
}

// Tasks: each request whole where there are enough requests to share among the threads, so that a
// task reads every KV head of a cache row (contiguous: the memory system streams it, where a
// KV head's part alone is a strided read); else one task per (request, KV head).
template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const at::Tensor& block_table, const at::Tensor& seq_lens, double scale, at::Tensor& out) {
  const int64_t num_reqs = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads, chunks = head_dim / Vec::size();
  const T* q_data = q.data_ptr<T>();
  const T* k_data = k_cache.data_ptr<T>();
  const T* v_data = v_cache.data_ptr<T>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  T* out_data = out.data_ptr<T>();
  const int64_t table_stride = block_table.stride(0);
  const int64_t q_stride = q.stride(0), q_head_stride = q.stride(1);
  const int64_t k_block = k_cache.stride(0), k_row = k_cache.stride(1), k_head = k_cache.stride(2);
  const int64_t v_block = v_cache.stride(0), v_row = v_cache.stride(1), v_head = v_cache.stride(2);
  TORCH_CHECK(k_head == v_head, "paged_decode: K and V caches must share their layout");
  const float fscale = static_cast<float>(scale);
  const auto task_attend = chunks == 2 ? attend<T, 2> : chunks == 4 ? attend<T, 4> : chunks == 8 ? attend<T, 8>
                                                                                                 : attend<T, 0>;
  const int64_t kv_per_task = num_reqs >= 4 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t tasks_per_req = num_kv_heads / kv_per_task, task_heads = kv_per_task * group;

  const int64_t span_bytes = ((kv_per_task - 1) * k_head + head_dim) * static_cast<int64_t>(sizeof(T));
  const auto prefetch_first = [&](int64_t task) {
    const int64_t req = task / tasks_per_req, kv0 = task % tasks_per_req * kv_per_task;
    const Rows<T> keys{k_data + kv0 * k_head, table + req * table_stride, block_size, k_block, k_row};
    for (int64_t t = 0; t < std::min<int64_t>(lens[req], 16 * kChunksAhead); ++t) prefetch_span(keys.at(t), span_bytes);
  };

  at::parallel_for(0, num_reqs * tasks_per_req, 1, [&](int64_t begin, int64_t end) {
    // Each thread's scratch, kept between calls (a step calls the kernel once per layer).
    thread_local std::vector<float> query_buffer, acc_buffer, score_buffer, max_buffer, inverse_buffer;
    thread_local std::vector<uint32_t> pair_buffer;
    float* query = tokenmill_cpu::scratch(query_buffer, task_heads * head_dim);
    float* acc = tokenmill_cpu::scratch(acc_buffer, task_heads * head_dim);
    float* maxima = tokenmill_cpu::scratch(max_buffer, task_heads);
    float* inverse = tokenmill_cpu::scratch(inverse_buffer, task_heads);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t req = task / tasks_per_req, kv0 = task % tasks_per_req * kv_per_task;
      const int64_t len = lens[req];
      const T* q_task = q_data + req * q_stride + kv0 * group * q_head_stride;
      for (int64_t h = 0; h < task_heads; ++h) {
        float* dst = query + h * head_dim;
        widen(q_task + h * q_head_stride, dst, head_dim);
        for (int64_t d = 0; d < head_dim; ++d) dst[d] *= fscale;
      }
      float* scores = tokenmill_cpu::scratch(score_buffer, task_heads * len);
      uint32_t* pairs = tokenmill_cpu::scratch(pair_buffer, task_heads * ((len + 1) / 2));
      const Rows<T> keys{k_data + kv0 * k_head, table + req * table_stride, block_size, k_block, k_row};
      const Rows<T> values{v_data + kv0 * v_head, table + req * table_stride, block_size, v_block, v_row};
      // The first key rows of this thread's next task load while this one computes.
      if (task == begin) prefetch_first(task);
      if (task + 1 < end) prefetch_first(task + 1);
      task_attend(query, q_task, q_head_stride, fscale, chunks, Task{task_heads, group, k_head, len}, keys, values,
                  scores, maxima, acc, inverse, pairs);
      for (int64_t h = 0; h < task_heads; ++h) {
        T* dst = out_data + (req * num_heads + kv0 * group + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<T>(acc[h * head_dim + d] * inverse[h]);
      }
    }
  });
}

// q [B, heads, head_dim]; k_cache / v_cache [blocks, block_size, kv_heads, head_dim] (head_dim
// contiguous); block_table [>= B, >= blocks] int32; seq_lens [B] int32, each >= 1. Returns
// [B, heads, head_dim].
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "paged_decode: bad ranks");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "paged_decode: q and the cache must share a dtype");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_decode: head_dim must be contiguous");
  TORCH_CHECK(q.size(2) % Vec::size() == 0 && q.size(2) / Vec::size() <= kMaxChunks,
              "paged_decode: head_dim must be a multiple of ", Vec::size(), " and at most ", kMaxChunks * Vec::size());
  TORCH_CHECK(block_table.dim() == 2 && block_table.stride(1) == 1, "paged_decode: block table rows contiguous");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt,
              "paged_decode: int32 block table and lengths");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "paged_decode: heads not a multiple of KV heads");
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  const at::Tensor lens = seq_lens.contiguous();
  switch (q.scalar_type()) {
    case at::kBFloat16: decode<c10::BFloat16>(q, k_cache, v_cache, block_table, lens, scale, out); break;
    case at::kHalf: decode<c10::Half>(q, k_cache, v_cache, block_table, lens, scale, out); break;
    case at::kFloat: decode<float>(q, k_cache, v_cache, block_table, lens, scale, out); break;
    default: TORCH_CHECK(false, "paged_decode: unsupported dtype ", q.scalar_type());
  }
  return out;
}

// The step's k or v rows [T, kv_heads, head_dim] into their cache slots: a row copy each where the
// row is contiguous (index_copy_'s set-up cost ~12 us a call, 60 calls a step), else index_copy_.
void write_rows(const at::Tensor& x, at::Tensor& cache, const at::Tensor& slot_mapping, int64_t num_tokens) {
  const int64_t num_kv_heads = cache.size(2), head_dim = cache.size(3), row = num_kv_heads * head_dim;
  if (x.stride(2) != 1 || x.stride(1) != head_dim || !cache.is_contiguous() || slot_mapping.stride(0) != 1) {
    cache.view({-1, num_kv_heads, head_dim}).index_copy_(0, slot_mapping.slice(0, 0, num_tokens), x);
    return;
  }
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t bytes = row * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(cache.data_ptr());
  const int64_t src_stride = x.stride(0) * x.element_size();
  const int64_t capacity = cache.numel() / row;
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < capacity, "KV slot ", slots[t], " outside the cache");
    std::memcpy(dst + slots[t] * bytes, src + t * src_stride, bytes);
  }
}

// A layer's attention step, as `tokenmill::cpu_paged_attention` (model/attention/cpu.py) computes it,
// for the steps that are decodes and fresh prefills (nothing cached before the prompt) into a cache
// of q's dtype: the KV write, the decodes through the kernel above and each prefill on its own
// k / v, through the AMX flash kernel (cpu_flash_prefill.cpp) for bf16 where the machine has
// the tile units, else causal SDPA as the Python op does, without entering Python (~50 us a layer for
// a decode step, ~100 us for a prefill). Every other step (a chunk after cached tokens, an encoder,
// an fp8 cache) goes to that Python op, through the dispatcher.
at::Tensor attention_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache,
                          at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_table,
                          const at::Tensor& seq_lens, const at::Tensor& query_start_loc, double scale, double k_scale,
                          double v_scale, bool causal) {
  const int64_t num_tokens = q.size(0), num_reqs = query_start_loc.size(0) - 1;
  bool native = k_cache.scalar_type() == q.scalar_type() && k.scalar_type() == q.scalar_type() &&
                query_start_loc.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt &&
                slot_mapping.scalar_type() == at::kLong && q.size(2) % Vec::size() == 0;
  int64_t num_decodes = 0;
  if (native) {
    const int32_t* starts = query_start_loc.data_ptr<int32_t>();
    const int32_t* lens = seq_lens.data_ptr<int32_t>();
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    for (int64_t i = 0; i < num_tokens && native; ++i) native = slots[i] >= 0;
    while (num_decodes < num_reqs && starts[num_decodes + 1] - starts[num_decodes] == 1) ++num_decodes;
    for (int64_t i = num_decodes; i < num_reqs && native; ++i)  // fresh causal prefills only
      native = causal && lens[i] == starts[i + 1] - starts[i];
  }
  if (!native) {
    static auto general = c10::Dispatcher::singleton()
        .findSchemaOrThrow("tokenmill::cpu_paged_attention", "")
        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double,
                          double, bool, bool)>();
    return general.call(q, k, v, k_cache, v_cache, slot_mapping, block_table, seq_lens, query_start_loc, scale,
                        k_scale, v_scale, causal, true);
  }
  const int64_t num_kv_heads = k_cache.size(2), head_dim = k_cache.size(3);
  write_rows(k, k_cache, slot_mapping, num_tokens);
  write_rows(v, v_cache, slot_mapping, num_tokens);
  if (num_decodes == num_tokens)
    return paged_decode(q, k_cache, v_cache, block_table, seq_lens.slice(0, 0, num_decodes), scale);
  at::Tensor out = at::empty_like(q);
  if (num_decodes)
    out.slice(0, 0, num_decodes).copy_(paged_decode(q.slice(0, 0, num_decodes), k_cache, v_cache, block_table,
                                                    seq_lens.slice(0, 0, num_decodes), scale));
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const bool grouped = q.size(1) != num_kv_heads;
  const bool flash = q.scalar_type() == at::kBFloat16 && tokenmill_cpu::flash_prefill_supported(head_dim);
  for (int64_t i = num_decodes; i < num_reqs; ++i) {
    const int64_t begin = starts[i], end = starts[i + 1];
    if (flash) {
      // `out` is empty_like(q): contiguous, unless q is a dense permutation of [T, H, D].
      at::Tensor rows = out.slice(0, begin, end);
      if (rows.is_contiguous()) {
        tokenmill_cpu::flash_prefill_into(q.slice(0, begin, end), k.slice(0, begin, end), v.slice(0, begin, end),
                                          scale, rows);
      } else {
        rows.copy_(tokenmill_cpu::flash_prefill(q.slice(0, begin, end), k.slice(0, begin, end),
                                                v.slice(0, begin, end), scale));
      }
      continue;
    }
    const auto heads_first = [&](const at::Tensor& x) { return x.slice(0, begin, end).transpose(0, 1).unsqueeze(0); };
    const at::Tensor attended = at::scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v),
                                                                 std::nullopt, 0.0, true, scale, grouped);
    out.slice(0, begin, end).copy_(attended.squeeze(0).transpose(0, 1));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("cpu_paged_attention_native(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot_mapping, Tensor block_table, Tensor seq_lens, Tensor query_start_loc, float scale, "
        "float k_scale, float v_scale, bool causal) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("cpu_paged_attention_native", &attention_step);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention, the cache read in place");
  m.def("vector_width", [] { return static_cast<int64_t>(Vec::size()); });
  m.def("flash_prefill", &tokenmill_cpu::flash_prefill, "causal bf16 prefill attention (AMX tiles or AVX512-BF16)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("dots") = false);
  m.def("flash_prefill_supported", &tokenmill_cpu::flash_prefill_supported, py::arg("head_dim"),
        py::arg("dots") = false);
}
