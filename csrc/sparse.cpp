// Sparse decode, gather-dot, the deterministic CSR row scatter and the prefix norms on the CPU.
// Parallel over rows (or latent buckets); every output element is reduced by one thread in a fixed order,
// so results do not depend on the number of threads. Accumulation in fp32.
#include "common.h"

#include <vector>

namespace sae_cpp {
namespace {

inline int64_t checked_index(int32_t i, int64_t n) {
  TORCH_CHECK(i >= 0 && i < n, "indices: expected ids in [0, ", n, "), got ", i);
  return i;
}

void check_code(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W) {
  TORCH_CHECK(values.device().is_cpu() && indices.device().is_cpu() && W.device().is_cpu(),
              "values, indices, W: expected CPU tensors");
  TORCH_CHECK(values.dim() == 2 && values.sizes() == indices.sizes(), "values, indices: expected one [B, K] shape");
  TORCH_CHECK(indices.scalar_type() == at::kInt, "indices: expected int32");
  TORCH_CHECK(W.dim() == 2, "W: expected [n, d]");
}

template <typename T>
inline void axpy(float* acc, float a, const T* w, int64_t d) {
  for (int64_t c = 0; c < d; ++c) acc[c] += a * static_cast<float>(w[c]);
}

template <typename T>
inline float dot(const float* g, const T* w, int64_t d) {
  float s = 0.0f;
  for (int64_t c = 0; c < d; ++c) s += g[c] * static_cast<float>(w[c]);
  return s;
}

}  // namespace

// out [B, d] (W.dtype) = bias + sum_j values[b, j] W[indices[b, j]]; slots of value 0 are skipped.
void gather_matmul(const at::Tensor& values_in, const at::Tensor& indices_in, const at::Tensor& W_in,
                   const c10::optional<at::Tensor>& bias_in, at::Tensor& out) {
  check_code(values_in, indices_in, W_in);
  const at::Tensor values = values_in.to(at::kFloat).contiguous(), indices = indices_in.contiguous();
  const at::Tensor W = W_in.contiguous(), bias = f32(bias_in);
  const int64_t B = values.size(0), K = values.size(1), n = W.size(0), d = W.size(1);
  check_out(out, "out", {B, d}, W.scalar_type());
  const float* v = values.data_ptr<float>();
  const int32_t* idx = indices.data_ptr<int32_t>();
  const float* bs = bias.defined() ? bias.data_ptr<float>() : nullptr;
  dispatch(W, "W", [&](auto zero) {
    using T = decltype(zero);
    const T* w = W.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(d);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t c = 0; c < d; ++c) acc[c] = bs ? bs[c] : 0.0f;
        for (int64_t j = 0; j < K; ++j) {
          const float a = v[b * K + j];
          const int64_t i = checked_index(idx[b * K + j], n);
          if (a != 0.0f) axpy(acc.data(), a, w + i * d, d);
        }
        for (int64_t c = 0; c < d; ++c) o[b * d + c] = static_cast<T>(acc[c]);
      }
    });
  });
}

// out [B, K] fp32 = g[b] . W[indices[b, j]].
void gather_dot(const at::Tensor& g_in, const at::Tensor& indices_in, const at::Tensor& W_in, at::Tensor& out) {
  check_code(indices_in, indices_in, W_in);
  const at::Tensor g = g_in.to(at::kFloat).contiguous(), indices = indices_in.contiguous(), W = W_in.contiguous();
  const int64_t B = indices.size(0), K = indices.size(1), n = W.size(0), d = W.size(1);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == B && g.size(1) == d, "g: expected [", B, ", ", d, "], got ", g.sizes());
  check_out(out, "out", {B, K}, at::kFloat);
  const float* gp = g.data_ptr<float>();
  const int32_t* idx = indices.data_ptr<int32_t>();
  float* o = out.data_ptr<float>();
  dispatch(W, "W", [&](auto zero) {
    using T = decltype(zero);
    const T* w = W.data_ptr<T>();
    at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b)
        for (int64_t j = 0; j < K; ++j) o[b * K + j] = dot(gp + b * d, w + checked_index(idx[b * K + j], n) * d, d);
    });
  });
}

// dW [n, d] (X.dtype) with dW[i] = sum over (b, j) with indices[b, j] = i of coef[b, j] X[b], and, when dsum
// has n elements, dsum[i] = sum of those coef (fp32). The slots are bucketed by latent with a stable counting
// sort (CSR), and each latent's bucket is reduced in slot order: no atomics, the same bits for any thread count.
void scatter_rows(const at::Tensor& coef_in, const at::Tensor& indices_in, const at::Tensor& X_in, int64_t n,
                  at::Tensor& dW, at::Tensor& dsum) {
  check_code(coef_in, indices_in, X_in);
  const at::Tensor coef = coef_in.to(at::kFloat).contiguous(), indices = indices_in.contiguous();
  const at::Tensor X = X_in.contiguous();
  const int64_t B = coef.size(0), K = coef.size(1), d = X.size(1);
  TORCH_CHECK(X.size(0) == B, "X: expected ", B, " rows, got ", X.size(0));
  check_out(dW, "dW", {n, d}, X.scalar_type());
  const bool with_sum = dsum.numel() > 0;
  if (with_sum) check_out(dsum, "dsum", {n}, at::kFloat);
  const int32_t* idx = indices.data_ptr<int32_t>();
  std::vector<int64_t> offsets(n + 1, 0), order(B * K);
  for (int64_t s = 0; s < B * K; ++s) ++offsets[checked_index(idx[s], n) + 1];
  for (int64_t i = 0; i < n; ++i) offsets[i + 1] += offsets[i];
  {
    std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
    for (int64_t s = 0; s < B * K; ++s) order[next[idx[s]]++] = s;
  }
  const float* cf = coef.data_ptr<float>();
  float* ds = with_sum ? dsum.data_ptr<float>() : nullptr;
  dispatch(X, "X", [&](auto zero) {
    using T = decltype(zero);
    const T* x = X.data_ptr<T>();
    T* out = dW.data_ptr<T>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(d);
      for (int64_t i = begin; i < end; ++i) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        float total = 0.0f;
        for (int64_t e = offsets[i]; e < offsets[i + 1]; ++e) {
          const int64_t s = order[e];
          axpy(acc.data(), cf[s], x + (s / K) * d, d);
          total += cf[s];
        }
        for (int64_t c = 0; c < d; ++c) out[i * d + c] = static_cast<T>(acc[c]);
        if (ds) ds[i] = total;
      }
    });
  });
}

namespace {

// Residuals r_t = r0 - sum_{j < t} v_j W[i_j] of one row, t = 0..K, into res [(K + 1) * d].
template <typename T>
void residuals(const float* v, const int32_t* idx, const T* w, const float* r0, int64_t K, int64_t n, int64_t d,
               float* res) {
  std::copy(r0, r0 + d, res);
  for (int64_t j = 0; j < K; ++j) {
    float* r = res + (j + 1) * d;
    std::copy(r - d, r, r);
    axpy(r, -v[j], w + checked_index(idx[j], n) * d, d);
  }
}

}  // namespace

// E [B, K + 1] fp32: E[b, t] = ||r_t[b]||^2 (see kernels/prefix.py).
void prefix_norms(const at::Tensor& values_in, const at::Tensor& indices_in, const at::Tensor& W_in,
                  const at::Tensor& r0_in, at::Tensor& E) {
  check_code(values_in, indices_in, W_in);
  const at::Tensor values = values_in.to(at::kFloat).contiguous(), indices = indices_in.contiguous();
  const at::Tensor W = W_in.contiguous(), r0 = r0_in.to(at::kFloat).contiguous();
  const int64_t B = values.size(0), K = values.size(1), n = W.size(0), d = W.size(1);
  TORCH_CHECK(r0.dim() == 2 && r0.size(0) == B && r0.size(1) == d, "r0: expected [", B, ", ", d, "]");
  check_out(E, "E", {B, K + 1}, at::kFloat);
  float* e = E.data_ptr<float>();
  dispatch(W, "W", [&](auto zero) {
    using T = decltype(zero);
    at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> res((K + 1) * d);
      for (int64_t b = begin; b < end; ++b) {
        residuals(values.data_ptr<float>() + b * K, indices.data_ptr<int32_t>() + b * K, W.data_ptr<T>(),
                  r0.data_ptr<float>() + b * d, K, n, d, res.data());
        for (int64_t t = 0; t <= K; ++t) e[b * (K + 1) + t] = dot(res.data() + t * d, res.data() + t * d, d);
      }
    });
  });
}

// G = grad [B, K + 1] -> dv [B, K] fp32, dr0 [B, d] fp32 and, when S has B * K * d elements, S [B, K, d]
// fp32, with S_j = sum_{t > j} G_t r_t, dv_j = -2 W[i_j] . S_j, dr0 = 2 sum_t G_t r_t.
void prefix_norms_backward(const at::Tensor& values_in, const at::Tensor& indices_in, const at::Tensor& W_in,
                           const at::Tensor& r0_in, const at::Tensor& grad_in, at::Tensor& dv, at::Tensor& dr0,
                           at::Tensor& S) {
  check_code(values_in, indices_in, W_in);
  const at::Tensor values = values_in.to(at::kFloat).contiguous(), indices = indices_in.contiguous();
  const at::Tensor W = W_in.contiguous(), r0 = r0_in.to(at::kFloat).contiguous();
  const at::Tensor grad = grad_in.to(at::kFloat).contiguous();
  const int64_t B = values.size(0), K = values.size(1), n = W.size(0), d = W.size(1);
  TORCH_CHECK(r0.dim() == 2 && r0.size(0) == B && r0.size(1) == d, "r0: expected [", B, ", ", d, "]");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == K + 1, "grad: expected [", B, ", ", K + 1, "]");
  check_out(dv, "dv", {B, K}, at::kFloat);
  check_out(dr0, "dr0", {B, d}, at::kFloat);
  const bool write_s = S.numel() > 0;
  if (write_s) check_out(S, "S", {B, K, d}, at::kFloat);
  float* dvp = dv.data_ptr<float>();
  float* dr = dr0.data_ptr<float>();
  float* sp = write_s ? S.data_ptr<float>() : nullptr;
  const float* G = grad.data_ptr<float>();
  dispatch(W, "W", [&](auto zero) {
    using T = decltype(zero);
    const T* w = W.data_ptr<T>();
    const int32_t* idx = indices.data_ptr<int32_t>();
    at::parallel_for(0, B, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> res((K + 1) * d), acc(d);
      for (int64_t b = begin; b < end; ++b) {
        residuals(values.data_ptr<float>() + b * K, idx + b * K, w, r0.data_ptr<float>() + b * d, K, n, d,
                  res.data());
        const float* g = G + b * (K + 1);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t j = K - 1; j >= 0; --j) {  // acc = S_j = sum_{t > j} G_t r_t
          axpy(acc.data(), g[j + 1], res.data() + (j + 1) * d, d);
          dvp[b * K + j] = -2.0f * dot(acc.data(), w + idx[b * K + j] * static_cast<int64_t>(d), d);
          if (sp) std::copy(acc.begin(), acc.end(), sp + (b * K + j) * d);
        }
        axpy(acc.data(), g[0], res.data(), d);
        for (int64_t c = 0; c < d; ++c) dr[b * d + c] = 2.0f * acc[c];
      }
    });
  });
}

TORCH_LIBRARY_IMPL(sae_kernels_cpp, CPU, m) {
  m.impl("gather_matmul", &gather_matmul);
  m.impl("gather_dot", &gather_dot);
  m.impl("scatter_rows", &scatter_rows);
  m.impl("prefix_norms", &prefix_norms);
  m.impl("prefix_norms_backward", &prefix_norms_backward);
}

}  // namespace sae_cpp
