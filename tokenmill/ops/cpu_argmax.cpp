// Greedy picks on the CPU: the index of each logits row's maximum, as torch.argmax gives it (the
// first of equal maxima; a row holding NaN gives its first NaN). ATen's CPU argmax walks a row at
// ~1.5 G elements/s on one thread (1 ms a step for 32 rows of a 49k vocabulary); here one vector
// pass finds the maximum and a second, stopping at the first hit, its index, the rows split over
// the threads. Built with cpu_paged_decode.cpp by ops/cpu_extension.py; tested against torch.argmax
// (tests/unit/test_cpu_argmax.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace {

using Vec = at::vec::Vectorized<float>;

int64_t first_index_of(const float* x, int64_t n, float target) {
  const bool nan = std::isnan(target);
  constexpr int64_t W = Vec::size();
  const Vec wanted(target);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const Vec v = Vec::loadu(x + i);
    // zero_mask(): a bit per lane that compares false, i.e. is not the target.
    const int misses = (nan ? v.isnan() : v == wanted).zero_mask();
    if (misses != (1 << W) - 1) return i + __builtin_ctz(~misses);
  }
  for (; i < n; ++i)
    if (nan ? std::isnan(x[i]) : x[i] == target) return i;
  return 0;
}

int64_t row_argmax(const float* x, int64_t n) {
  constexpr int64_t W = Vec::size();
  Vec best(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + W <= n; i += W) best = at::vec::maximum(best, Vec::loadu(x + i));  // NaN propagates
  float lanes[W];
  best.store(lanes);
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < W; ++l) top = std::isnan(lanes[l]) || std::isnan(top) ? NAN : std::max(top, lanes[l]);
  for (; i < n; ++i) top = std::isnan(x[i]) || std::isnan(top) ? NAN : std::max(top, x[i]);
  return first_index_of(x, n, top);
}

// logits [rows, vocab] float32 with contiguous rows -> int64 [rows].
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "cpu_argmax: float32 [rows, vocab] with contiguous rows");
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  TORCH_CHECK(vocab > 0, "cpu_argmax: an empty row has no maximum");
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const float* data = logits.data_ptr<float>();
  int64_t* picks = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) picks[r] = row_argmax(data + r * stride, vocab);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) { m.def("cpu_argmax(Tensor logits) -> Tensor"); }

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("cpu_argmax", &argmax_rows); }
