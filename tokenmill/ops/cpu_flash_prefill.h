// Causal bf16 prefill attention on the AMX tile units or as AVX512-BF16 dot products (cpu_flash_prefill.cpp).
#pragma once
#include <torch/extension.h>

namespace tokenmill_cpu {

// Whether the kernel runs here (AMX tiles granted, or AVX512-BF16) for this head size; `dots`: with
// its dot-product path (what machines without the tile units run; tests take it on AMX machines).
bool flash_prefill_supported(int64_t head_dim, bool dots = false);

// Causal attention of a fresh prompt: q [T, H, D], k and v [T, KVH, D] (bf16; KVH divides H; each
// token's heads contiguous) -> [T, H, D] bf16.
at::Tensor flash_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool dots = false);

// The same into `out`, a contiguous bf16 [T, H, D] (a slice of the layer step's output).
void flash_prefill_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, at::Tensor& out,
                        bool dots = false);

}  // namespace tokenmill_cpu
