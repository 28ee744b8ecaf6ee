// One-row products on the CPU: y [1, N] = x [1, K] @ W[N, K].T (+ bias) for bf16 weights, the
// linears of a batch-1 decode step. They read each weight once and do two flops a weight, so the
// memory stream sets their time. oneDNN's packed GEMM spends ~15 us a call on its own set-up (a
// 576 x 64 weight takes 17 us hot) and streams a 576 x 576 weight at ~17 GB/s from memory; here
// the set-up is one parallel region and each thread streams its rows with software prefetch into
// L2 a few rows ahead (23-26 GB/s on the same weight on an AMX Xeon, 25-34 on Zen 4, where
// prefetching into L1 stalled on its miss buffers at 16-20; python -m
// tokenmill.benchmarks.kernels.cpu_gemv).
//
// Rows go four at a time (four independent sums per loaded x vector); each row's products
// accumulate in float32 vector lanes (bf16 rows on AVX512-BF16 CPUs: `vdpbf16ps` on the row and
// weights as stored), summed across the lanes at the end, plus the bias, then rounded once to the
// output dtype. Built with the other C++ kernels by ops/cpu_extension.py;
// tested against the float64 product (tests/unit/test_cpu_gemv.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "cpu_bf16.h"

namespace {

using fVec = at::vec::Vectorized<float>;
using bVec = at::vec::Vectorized<at::BFloat16>;

// How far ahead of the rows being summed each row's stream is prefetched: ~2-3 groups of four
// rows at K = 576 (the best of 1-8 KiB on the 2-core development machines).
constexpr int64_t kPrefetchBytes = 8192;
constexpr int kRows = 4;

template <int R, typename Out>
inline void rows_dot(const at::BFloat16* w, int64_t K, const float* x, const float* bias, Out* out) {
  constexpr int64_t W = bVec::size();  // bf16 lanes of a vector: two float vectors once widened
  fVec lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = fVec(0.f);
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    for (int r = 0; r < R; ++r)
      __builtin_prefetch(reinterpret_cast<const char*>(w + r * K + k) + kPrefetchBytes, 0, 2);
    const fVec x0 = fVec::loadu(x + k), x1 = fVec::loadu(x + k + fVec::size());
    for (int r = 0; r < R; ++r) {
      auto [w0, w1] = at::vec::convert_to_float<at::BFloat16>(bVec::loadu(w + r * K + k));
      lo[r] = at::vec::fmadd(w0, x0, lo[r]);
      hi[r] = at::vec::fmadd(w1, x1, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float sum = at::vec::vec_reduce_all<float>([](fVec& a, fVec& b) { return a + b; }, lo[r] + hi[r]);
    for (int64_t j = k; j < K; ++j) sum += static_cast<float>(w[r * K + j]) * x[j];
    out[r] = static_cast<Out>(bias == nullptr ? sum : sum + bias[r]);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// rows_dot for a bf16 row on CPUs with AVX512-BF16: each `vdpbf16ps` adds the exact products of 32
// weights with the row as it is (two products a float32 lane), so neither the weights nor the row
// are widened (the row is not even copied to float32 first).
template <int R, typename Out>
TOKENMILL_BF16 void rows_dot_dp(const at::BFloat16* w, int64_t K, const at::BFloat16* x, const float* bias, Out* out) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    for (int r = 0; r < R; ++r)
      __builtin_prefetch(reinterpret_cast<const char*>(w + r * K + k) + kPrefetchBytes, 0, 2);
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + k);
    for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], xv, (__m512bh)_mm512_loadu_si512(w + r * K + k));
  }
  for (int r = 0; r < R; ++r) {
    float sum = _mm512_reduce_add_ps(acc[r]);
    for (int64_t j = k; j < K; ++j) sum += static_cast<float>(w[r * K + j]) * static_cast<float>(x[j]);
    out[r] = static_cast<Out>(bias == nullptr ? sum : sum + bias[r]);
  }
}

#endif

// dot(rows, first_row) for each group of kRows rows (rows: a std::integral_constant), the last
// partial group a row at a time; the groups split over the threads.
template <typename Dot>
void over_rows(int64_t N, const Dot& dot) {
  at::parallel_for(0, (N + kRows - 1) / kRows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t row = g * kRows;
      if (row + kRows <= N) {
        dot(std::integral_constant<int, kRows>{}, row);
      } else {
        for (int64_t r = row; r < N; ++r) dot(std::integral_constant<int, 1>{}, r);
      }
    }
  });
}

// x [1, K] (bf16 or float32), weight [N, K] bf16 with contiguous rows, bias [N] or undefined ->
// [1, N] in x's dtype.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "cpu_gemv: one row [1, K]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, "cpu_gemv: a bf16 or float32 row");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "cpu_gemv: a contiguous bf16 weight [N, K]");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(1) == K, "cpu_gemv: x has ", x.size(1), " features, the weight ", K);
  at::Tensor bf;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "cpu_gemv: bias of ", bias->numel(), " for ", N, " outputs");
    bf = bias->reshape({N}).to(at::kFloat).contiguous();
  }
  // The sums are rounded once, straight into the output (no float32 copy of it).
  at::Tensor y = at::empty({1, N}, x.options());
  const float* bp = bf.defined() ? bf.data_ptr<float>() : nullptr;
  const at::BFloat16* wp = weight.data_ptr<at::BFloat16>();
#if defined(CPU_CAPABILITY_AVX512)
  if (x.scalar_type() == at::kBFloat16 && x.stride(1) == 1 && tokenmill_cpu::has_avx512_bf16()) {
    const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
    at::BFloat16* yp = y.data_ptr<at::BFloat16>();
    over_rows(N, [&](auto rows, int64_t r) {
      rows_dot_dp<decltype(rows)::value>(wp + r * K, K, xp, bp ? bp + r : nullptr, yp + r);
    });
    return y;
  }
#endif
  const at::Tensor xf = x.reshape({K}).to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  auto run = [&](auto* yp) {
    over_rows(N, [&](auto rows, int64_t r) {
      rows_dot<decltype(rows)::value>(wp + r * K, K, xp, bp ? bp + r : nullptr, yp + r);
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(y.data_ptr<float>());
  } else {
    run(y.data_ptr<at::BFloat16>());
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) { m.def("cpu_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("cpu_gemv", &gemv); }
