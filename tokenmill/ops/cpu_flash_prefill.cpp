// Causal prefill attention on the CPU for bf16 prompts: flash attention with both products on the
// AMX tile units (TDPBF16PS through the compiler's intrinsics) where the build targets them, else
// as AVX512-BF16 dot products (VDPBF16PS: 16 float32 lanes, each adding two bf16 products; AMD
// Zen 4 and Intel CPUs before AMX), and the softmax in float32 AVX-512 passes. Built with the other
// C++ CPU kernels (cpu_extension.py) where the build targets AVX-512, the dot-product path chosen
// at run time where the CPU has AVX512-BF16; called by cpu_paged_decode.cpp's layer step for a
// fresh prompt. Tested against attention in float64 (tests/unit/test_cpu_flash_prefill.py).
//
// SDPA's CPU flash kernel runs the same algorithm; at SmolLM2's shape (64-dim heads, 9 query heads
// on 3 KV heads) this one is faster (docs/perf-cpu.md: 1.2-2x with AMX, 2.6-3.9x with dot products
// on Zen 4) because:
// - the query heads sharing a KV head are one matrix (rows token-major, head-minor), so each key
//   and value tile is packed once per KV head and multiplied against group x 32 rows at once;
// - a diagonal tile is cut to the columns its last row can see (rounded up to 32): the masked work
//   is at most a 32-column strip, not half of a 256 x 512 tile;
// - exp is a degree-5 polynomial on 2^frac with vscalefps (relative error ~2e-7, far below the bf16
//   rounding of the probabilities), and the probabilities are rounded with one instruction per 32;
// - the products are plain tile (or register-block) loops with no per-call set-up (ATen's brgemm
//   wrapper cost ~3 us a call, as much as a 96 x 256 x 64 product on the tile units).
// The probabilities are rounded to bf16 before the value product, as SDPA's bf16 kernel does; the
// row sums are taken before rounding, as SDPA takes them.
#include "cpu_flash_prefill.h"

#include "cpu_amx.h"
#include "cpu_bf16.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <vector>

namespace tokenmill_cpu {

// The kernel needs AVX-512 and, at run time, AVX512-BF16 (with or without the tile units of
// cpu_amx.h); elsewhere only the refusal is built.
#if defined(CPU_CAPABILITY_AVX512)
#define TOKENMILL_FLASH 1
namespace {

using Vec = at::vec::Vectorized<float>;
using at::BFloat16;

constexpr int64_t kQueryRows = 32;   // query tokens a task takes (x the group's heads = the product's M)
constexpr int64_t kKeyBlock = 256;   // keys a tile holds (the score product's N)
constexpr int64_t kAlign = 32;       // a tile's columns are cut to a multiple of this

// K rows [n0, n0 + n) of one KV head as the score product's B, [head_dim / 2][kKeyBlock][2]
// (VNNI pairs along head_dim): a transpose of the rows' 32-bit pairs. Columns past n are zero.
void pack_keys(const BFloat16* k, int64_t stride_t, int64_t n, int64_t head_dim, BFloat16* out) {
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  constexpr int64_t kStrip = 16;  // keys transposed together: each output row gets 64 contiguous bytes
  for (int64_t t0 = 0; t0 < n; t0 += kStrip) {
    const int64_t t1 = std::min(n, t0 + kStrip);
    for (int64_t j = 0; j < head_dim / 2; ++j)
      for (int64_t t = t0; t < t1; ++t) dst[j * kKeyBlock + t] = reinterpret_cast<const uint32_t*>(k + t * stride_t)[j];
  }
  if (n < kKeyBlock)
    for (int64_t j = 0; j < head_dim / 2; ++j) std::memset(dst + j * kKeyBlock + n, 0, (kKeyBlock - n) * 4);
}

// V rows [n0, n0 + n) of one KV head as the value product's B, [kKeyBlock / 2][head_dim][2]
// (VNNI pairs along the keys): rows t and t + 1 interleaved. Rows past n are zero.
void pack_values(const BFloat16* v, int64_t stride_t, int64_t n, int64_t head_dim, BFloat16* out) {
  uint16_t* dst = reinterpret_cast<uint16_t*>(out);
  for (int64_t t = 0; t < n; t += 2) {
    const uint16_t* even = reinterpret_cast<const uint16_t*>(v + t * stride_t);
    const uint16_t* odd = t + 1 < n ? reinterpret_cast<const uint16_t*>(v + (t + 1) * stride_t) : nullptr;
    uint16_t* pair = dst + (t / 2) * head_dim * 2;
    if (odd != nullptr) {
      for (int64_t d = 0; d < head_dim; ++d) pair[2 * d] = even[d], pair[2 * d + 1] = odd[d];
    } else {
      for (int64_t d = 0; d < head_dim; ++d) pair[2 * d] = even[d], pair[2 * d + 1] = 0;
    }
  }
  const int64_t filled = (n + 1) / 2;
  std::memset(dst + filled * head_dim * 2, 0, (kKeyBlock / 2 - filled) * head_dim * 2 * 2);
}

#ifdef TOKENMILL_AMX
// C[M, N] (float32, row stride ldc) = (or += with kAccumulate) A[M, K] (bf16, row stride lda) x B,
// B in VNNI pairs: row j holds (B[2j][n], B[2j+1][n]) for every n, ldb elements a row. M, N, K
// multiples of 32; tiles 0-3 accumulate a 32 x 32 block of C, 4-5 hold A, 6-7 B (configure_tiles()).
template <bool kAccumulate>
void tile_gemm(int64_t M, int64_t N, int64_t K, const BFloat16* A, int64_t lda, const BFloat16* B, int64_t ldb,
               float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; m += 32) {
    for (int64_t n = 0; n < N; n += 32) {
      float* c = C + m * ldc + n;
      if constexpr (kAccumulate) {
        _tile_loadd(0, c, ldc * 4);
        _tile_loadd(1, c + 16, ldc * 4);
        _tile_loadd(2, c + 16 * ldc, ldc * 4);
        _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k = 0; k < K; k += 32) {
        _tile_loadd(4, A + m * lda + k, lda * 2);
        _tile_loadd(5, A + (m + 16) * lda + k, lda * 2);
        _tile_loadd(6, B + (k / 2) * ldb + n * 2, ldb * 2);
        _tile_loadd(7, B + (k / 2) * ldb + (n + 16) * 2, ldb * 2);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c, ldc * 4);
      _tile_stored(1, c + 16, ldc * 4);
      _tile_stored(2, c + 16 * ldc, ldc * 4);
      _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
    }
  }
}


#endif

// The same product as dot products, for CPUs without the tile units: blocks of 4 rows x 16 * CV
// columns (CV float32 vectors a row) accumulate in registers; each step takes one pair of K, CV
// vectors of B and each row's pair of A broadcast to all lanes.
template <bool kAccumulate, int CV>
TOKENMILL_BF16 inline void dp_block(int64_t K, const BFloat16* A, int64_t lda, const BFloat16* B, int64_t ldb,
                                    float* C, int64_t ldc) {
  constexpr int R = 4;
  __m512 acc[R][CV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c) acc[r][c] = kAccumulate ? _mm512_loadu_ps(C + r * ldc + 16 * c) : _mm512_setzero_ps();
  for (int64_t j = 0; j < K / 2; ++j) {
    __m512bh b[CV];
    for (int c = 0; c < CV; ++c) b[c] = (__m512bh)_mm512_loadu_si512(B + j * ldb + 32 * c);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(reinterpret_cast<const int32_t*>(A + r * lda)[j]);
      for (int c = 0; c < CV; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, b[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < CV; ++c) _mm512_storeu_ps(C + r * ldc + 16 * c, acc[r][c]);
}

template <bool kAccumulate>
TOKENMILL_BF16 void dp_gemm(int64_t M, int64_t N, int64_t K, const BFloat16* A, int64_t lda, const BFloat16* B,
                            int64_t ldb, float* C, int64_t ldc) {
  for (int64_t m0 = 0; m0 < M; m0 += 4)
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
      const BFloat16* b = B + 2 * n0;  // a column is a pair of bf16 in each row of B
      if (N - n0 >= 64) dp_block<kAccumulate, 4>(K, A + m0 * lda, lda, b, ldb, C + m0 * ldc + n0, ldc);
      else dp_block<kAccumulate, 2>(K, A + m0 * lda, lda, b, ldb, C + m0 * ldc + n0, ldc);
    }
}

inline float row_max(const float* s, int64_t n) {
  Vec m(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) m = at::vec::maximum(m, Vec::loadu(s + c));
  float out = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
  for (; c < n; ++c) out = std::max(out, s[c]);
  return out;
}

// p[0:width] = bf16(exp(s * scale - max)) for the first `n` columns and 0 after; returns the sum of
// the float32 values (before rounding, as SDPA's kernel sums them).
// exp(x) = 2^y, y = x log2(e): 2^round(y) by vscalefps (which also flushes to 0 far below the max) and
// 2^f, |f| <= 1/2, by a degree-5 polynomial (relative error ~2e-7, far below bf16's 4e-3 rounding).
TOKENMILL_BF16 inline __m512 exp2_poly(__m512 y) {
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(1.3333558e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

TOKENMILL_BF16 inline float exp_row(const float* s, int64_t n, int64_t width, float scale, float max,
                                     BFloat16* p) {
  constexpr float kLog2e = 1.4426950408889634f;
  const __m512 vscale = _mm512_set1_ps(scale * kLog2e), vshift = _mm512_set1_ps(-max * kLog2e);
  __m512 sum = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    const __m512 a = exp2_poly(_mm512_fmadd_ps(_mm512_loadu_ps(s + c), vscale, vshift));
    const __m512 b = exp2_poly(_mm512_fmadd_ps(_mm512_loadu_ps(s + c + 16), vscale, vshift));
    _mm512_storeu_si512(p + c, (__m512i)_mm512_cvtne2ps_pbh(b, a));
    sum = _mm512_add_ps(sum, _mm512_add_ps(a, b));
  }
  for (; c < n; c += 16) {  // the last columns, masked to n; the rest of the 32-column tile is zeros
    const __mmask16 keep = static_cast<__mmask16>((n - c) >= 16 ? 0xFFFF : (1u << (n - c)) - 1);
    const __m512 y = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(keep, s + c), vscale, vshift);
    const __m512 a = _mm512_maskz_mov_ps(keep, exp2_poly(y));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + c), (__m256i)_mm512_cvtneps_pbh(a));
    sum = _mm512_add_ps(sum, a);
  }
  if (c < width) std::memset(p + c, 0, (width - c) * sizeof(BFloat16));
  return _mm512_reduce_add_ps(sum);
}

}  // namespace
#endif

#ifdef TOKENMILL_FLASH
namespace {
// Which products the kernel runs here: the tile units where the build targets them and Linux grants
// them, else dot products where the CPU has AVX512-BF16.
enum class Products { kNone, kTiles, kDots };

Products products() {
#ifdef TOKENMILL_AMX
  if (tiles_granted()) return Products::kTiles;
#endif
  return has_avx512_bf16() ? Products::kDots : Products::kNone;
}
}  // namespace
#endif

bool flash_prefill_supported(int64_t head_dim, bool dots) {
#ifdef TOKENMILL_FLASH
  return (dots ? has_avx512_bf16() : products() != Products::kNone) && head_dim % kAlign == 0 && head_dim <= 256;
#else
  return false;
#endif
}

#ifdef TOKENMILL_FLASH
namespace {
// One of the two products, on the tile units or as dot products.
template <bool kTiles, bool kAccumulate>
TOKENMILL_BF16 inline void gemm(int64_t M, int64_t N, int64_t K, const BFloat16* A, int64_t lda, const BFloat16* B,
                                int64_t ldb, float* C, int64_t ldc) {
#ifdef TOKENMILL_AMX
  if constexpr (kTiles) {
    tile_gemm<kAccumulate>(M, N, K, A, lda, B, ldb, C, ldc);
    return;
  }
#endif
  dp_gemm<kAccumulate>(M, N, K, A, lda, B, ldb, C, ldc);
}

// The attention of every (KV head, query block) task, from the packed keys and values.
template <bool kTiles>
TOKENMILL_BF16 void attend_blocks(const BFloat16* qp, int64_t sq, const BFloat16* packed_k, const BFloat16* packed_v,
                                  int64_t T, int64_t H, int64_t D, int64_t KVH, float scale, BFloat16* op) {
  const int64_t group = H / KVH, M = kQueryRows * group;
  const int64_t key_blocks = (T + kKeyBlock - 1) / kKeyBlock, query_blocks = (T + kQueryRows - 1) / kQueryRows;
  const int64_t tile = D * kKeyBlock;
  // Tasks (KV head, query block), head by head so that the threads share one head's packed keys and
  // values in cache, within a head the longest (last query blocks) first; dynamically shared out
  // because causal work grows with the block's position.
  const int64_t tasks = KVH * query_blocks;
  const int threads = std::max(1, at::get_num_threads());
#pragma omp parallel num_threads(threads)
  {
    // Each thread's scratch; every element written before it is read.
    thread_local std::vector<BFloat16> query_buffer, prob_buffer;
    thread_local std::vector<float> score_buffer, acc_buffer, max_buffer, sum_buffer;
    BFloat16* qbuf = scratch(query_buffer, M * D);
    BFloat16* probs = scratch(prob_buffer, M * kKeyBlock);
    float* scores = scratch(score_buffer, M * kKeyBlock);
    float* acc = scratch(acc_buffer, M * D);
    float* maxes = scratch(max_buffer, M);
    float* sums = scratch(sum_buffer, M);
#ifdef TOKENMILL_AMX
    if constexpr (kTiles) configure_tiles();
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t g = task / query_blocks, qb = query_blocks - 1 - task % query_blocks;
      const int64_t t0 = qb * kQueryRows, rows_t = std::min(kQueryRows, T - t0);
      // The group's query rows, token-major then head: row r is token t0 + r / group, head g * group + r % group.
      for (int64_t r = 0; r < M; ++r) {
        const int64_t t = r / group;
        BFloat16* dst = qbuf + r * D;
        if (t < rows_t) std::copy_n(qp + (t0 + t) * sq + (g * group + r % group) * D, D, dst);
        else std::memset(dst, 0, D * sizeof(BFloat16));
      }
      std::fill_n(acc, M * D, 0.f);
      std::fill_n(maxes, M, -std::numeric_limits<float>::infinity());
      std::fill_n(sums, M, 0.f);
      const int64_t last_t = t0 + rows_t - 1;
      for (int64_t b = 0; b * kKeyBlock <= last_t; ++b) {
        const int64_t n0 = b * kKeyBlock;
        // Columns the block's last token can see, rounded up to the tile alignment.
        const int64_t seen = std::min(kKeyBlock, last_t - n0 + 1);
        const int64_t width = (seen + kAlign - 1) / kAlign * kAlign;
        const BFloat16* kb = packed_k + (g * key_blocks + b) * tile;
        const BFloat16* vb = packed_v + (g * key_blocks + b) * tile;
        gemm<kTiles, false>(M, width, D, qbuf, D, kb, kKeyBlock * 2, scores, kKeyBlock);
        for (int64_t r = 0; r < M; ++r) {
          const int64_t t = r / group;
          float* s = scores + r * kKeyBlock;
          BFloat16* p = probs + r * kKeyBlock;
          const int64_t n = t < rows_t ? std::min(width, t0 + t - n0 + 1) : 0;  // causal: keys <= t
          if (n <= 0) {
            std::memset(p, 0, width * sizeof(BFloat16));
            continue;
          }
          const float m_new = std::max(maxes[r], row_max(s, n) * scale);
          if (m_new != maxes[r] && sums[r] != 0.f) {
            const float correction = std::exp(maxes[r] - m_new);
            const Vec alpha(correction);
            float* a = acc + r * D;
            sums[r] *= correction;
            for (int64_t d = 0; d < D; d += Vec::size()) (Vec::loadu(a + d) * alpha).store(a + d);
          }
          maxes[r] = m_new;
          sums[r] += exp_row(s, n, width, scale, m_new, p);
        }
        gemm<kTiles, true>(M, D, width, probs, kKeyBlock, vb, D * 2, acc, D);
      }
      for (int64_t r = 0; r < rows_t * group; ++r) {
        const int64_t t = r / group;
        const Vec inv(1.f / sums[r]);
        BFloat16* dst = op + (t0 + t) * H * D + (g * group + r % group) * D;
        for (int64_t d = 0; d < D; d += 2 * Vec::size()) {
          const Vec a = Vec::loadu(acc + r * D + d) * inv;
          const Vec c = Vec::loadu(acc + r * D + d + Vec::size()) * inv;
          at::vec::convert_from_float<BFloat16>(a, c).store(dst + d);
        }
      }
    }
#ifdef TOKENMILL_AMX
    if constexpr (kTiles) _tile_release();
#endif
  }
}

}  // namespace

void flash_prefill_into(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale_d,
                        at::Tensor& out, bool dots) {
  TORCH_CHECK(q_in.scalar_type() == at::kBFloat16 && k_in.scalar_type() == at::kBFloat16 &&
              v_in.scalar_type() == at::kBFloat16, "flash_prefill takes bf16 q, k, v");
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 3 && v_in.dim() == 3, "q, k, v are [tokens, heads, head_dim]");
  // Rows of one token may be strided (views of a fused QKV output); each token's heads must be contiguous.
  const auto tokens_major = [](const at::Tensor& x) {
    return x.stride(2) == 1 && x.stride(1) == x.size(2) ? x : x.contiguous();
  };
  const at::Tensor q = tokens_major(q_in), k = tokens_major(k_in), v = tokens_major(v_in);
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1);
  TORCH_CHECK(k.size(0) == T && v.size(0) == T && v.size(1) == KVH && k.size(2) == D && v.size(2) == D &&
              H % KVH == 0, "flash_prefill: q [T, H, D], k and v [T, KVH, D] with KVH dividing H");
  TORCH_CHECK(flash_prefill_supported(D, dots),
              "flash_prefill: no AMX or AVX512-BF16 here, or an unsupported head size");
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.size(0) == T && out.size(1) == H &&
              out.size(2) == D, "flash_prefill: out must be a contiguous bf16 [T, H, D]");
  const int64_t key_blocks = (T + kKeyBlock - 1) / kKeyBlock;
  const float scale = static_cast<float>(scale_d);
  const BFloat16* qp = q.data_ptr<BFloat16>();
  const BFloat16* kp = k.data_ptr<BFloat16>();
  const BFloat16* vp = v.data_ptr<BFloat16>();
  const int64_t sq = q.stride(0), sk = k.stride(0), sv = v.stride(0);
  BFloat16* op = out.data_ptr<BFloat16>();

  // Every (KV head, key block) packed once for both products (in the calling thread's scratch).
  const int64_t tile = D * kKeyBlock;
  thread_local std::vector<BFloat16> packed;
  BFloat16* packed_k = scratch(packed, 2 * KVH * key_blocks * tile);
  BFloat16* packed_v = packed_k + KVH * key_blocks * tile;
  at::parallel_for(0, KVH * key_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = i / key_blocks, b = i % key_blocks, n0 = b * kKeyBlock, n = std::min(kKeyBlock, T - n0);
      pack_keys(kp + n0 * sk + g * D, sk, n, D, packed_k + i * tile);
      pack_values(vp + n0 * sv + g * D, sv, n, D, packed_v + i * tile);
    }
  });

  if (!dots && products() == Products::kTiles)
    attend_blocks<true>(qp, sq, packed_k, packed_v, T, H, D, KVH, scale, op);
  else
    attend_blocks<false>(qp, sq, packed_k, packed_v, T, H, D, KVH, scale, op);
}
#else
void flash_prefill_into(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, at::Tensor&, bool) {
  TORCH_CHECK(false, "flash_prefill: built without AVX-512");
}
#endif

at::Tensor flash_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool dots) {
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  flash_prefill_into(q, k, v, scale, out, dots);
  return out;
}

}  // namespace tokenmill_cpu
