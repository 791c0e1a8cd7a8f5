// Shared pieces of the C++ CPU kernels: dtype dispatch, fp32 loads, packed top-k keys, a min-heap.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace sae_cpp {

// Call f with a value of the tensor's element type (fp32, fp16, bf16); other dtypes are refused.
template <typename F>
void dispatch(const at::Tensor& t, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, name, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// A row-major [rows, cols] tensor of the expected size on the CPU.
inline void check_out(const at::Tensor& t, const char* name, at::IntArrayRef shape, at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor");
  TORCH_CHECK(t.sizes() == shape, name, ": expected shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

// fp32 copy of an optional vector (biases, thresholds), or an empty tensor.
inline at::Tensor f32(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

// Packed key of a non-negative fp32 value at column col: orders by value, then by lower column.
constexpr int64_t KEY_LOW = 2147483647;

inline int64_t pack(float value, int64_t col) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return (static_cast<int64_t>(bits) << 32) | (KEY_LOW - col);
}

inline float key_value(int64_t key) {
  int32_t bits = static_cast<int32_t>(key >> 32);
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline int32_t key_col(int64_t key) { return static_cast<int32_t>(KEY_LOW - (key & 0xFFFFFFFF)); }

// Replace the root of a min-heap h[0..k) by key and restore the heap.
inline void heap_replace_root(int64_t* h, int64_t k, int64_t key) {
  int64_t i = 0;
  while (true) {
    int64_t l = 2 * i + 1;
    if (l >= k) break;
    int64_t c = (l + 1 < k && h[l + 1] < h[l]) ? l + 1 : l;
    if (h[c] >= key) break;
    h[i] = h[c];
    i = c;
  }
  h[i] = key;
}

}  // namespace sae_cpp
