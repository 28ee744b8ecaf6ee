// Causal bf16 prefill attention on the AMX tile units (cpu_flash_prefill.cpp).
#pragma once
#include <torch/extension.h>

namespace tokenmill_cpu {

// Whether this machine's brgemm runs bf16 products (AMX) and the head size fits the kernel.
bool flash_prefill_supported(int64_t head_dim);

// Causal attention of a fresh prompt: q [T, H, D], k and v [T, KVH, D] (bf16; KVH divides H; each
// token's heads contiguous) -> [T, H, D] bf16.
at::Tensor flash_prefill(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale);

// The same into `out`, a contiguous bf16 [T, H, D] (a slice of the layer step's output).
void flash_prefill_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, at::Tensor& out);

}  // namespace tokenmill_cpu
