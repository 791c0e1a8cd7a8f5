// Fused encoders on the CPU: z = x W^T + b computed one cache-sized tile [ROWS, COLS] at a time (tile_gemm.h),
// the selection done on the tile while it is in cache; the [B, n] matrix z is never formed.
//
// Work is a fixed list of tasks (row block, column split) that depends on the shape only, and each row's
// selection walks its columns in increasing order, so results are the same for any number of threads.
// A thread takes a contiguous run of tasks and walks the W chunks of a split once for all its row blocks.
#include "common.h"
#include "tile_gemm.h"

#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace sae_cpp {
namespace {

constexpr int64_t ROWS = 64;   // rows of x per task
constexpr int64_t COLS = 128;  // latents per tile: W chunk [COLS, d] and tile [ROWS, COLS] stay in L2
constexpr int64_t MIN_TASKS = 8;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Column splits for a shape: enough tasks to fill the threads when B is small.
int64_t splits_for(int64_t B, int64_t n) {
  int64_t row_blocks = cdiv(B, ROWS);
  return std::max<int64_t>(1, std::min(cdiv(MIN_TASKS, row_blocks), cdiv(n, COLS)));
}

// For each task of [begin, end) (task = split * row_blocks + row_block), call
// tile_fn(row_block, split, r0, rows, c0, cols, tile) on every fp32 tile of x W^T of that task, in
// increasing column order. x is fp32 [B, d]; W any float dtype [n, d], packed once per chunk per thread.
template <typename TileFn>
void for_tiles(const at::Tensor& xf, const at::Tensor& W, int64_t splits, int64_t begin, int64_t end,
               TileFn&& tile_fn) {
  const int64_t B = xf.size(0), n = W.size(0), d = W.size(1);
  const int64_t row_blocks = cdiv(B, ROWS);
  const int64_t cols_per_split = cdiv(cdiv(n, COLS), splits) * COLS;
  const float* x = xf.data_ptr<float>();
  std::vector<float> tile(ROWS * COLS), packed;
  for (int64_t t0 = begin; t0 < end;) {
    const int64_t s = t0 / row_blocks;
    const int64_t t1 = std::min(end, (s + 1) * row_blocks);
    const int64_t lo = s * cols_per_split, hi = std::min(n, lo + cols_per_split);
    for (int64_t c0 = lo; c0 < hi; c0 += COLS) {
      const int64_t cols = std::min(COLS, hi - c0);
      dispatch(W, "W", [&](auto zero) { pack_panels(W.data_ptr<decltype(zero)>(), d, c0, cols, packed); });
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t rb = t % row_blocks, r0 = rb * ROWS, rows = std::min(ROWS, B - r0);
        tile_gemm(x + r0 * d, rows, d, packed, cols, tile.data());
        tile_fn(rb, s, r0, rows, c0, cols, tile.data());
      }
    }
    t0 = t1;
  }
}

// The value a candidate must reach to enter a heap whose smallest key is `key` (-1: a free slot).
float floor_of(int64_t key) { return key < 0 ? -1.0f : key_value(key); }

// The selection pre-checks a tile row PANEL columns at a time with vector compares; only the columns whose bit is
// set run the scalar per-column code, in increasing column order as before, so the results do not change.
constexpr int64_t PANEL = 32;  // one bit per column of a uint32_t
typedef int32_t ivec __attribute__((vector_size(VL * sizeof(int32_t))));  // a vector comparison's result

// Bit l set where lane l of the comparison m is true.
inline uint32_t lane_bits(const ivec& m) {
#if defined(__AVX512F__)
  return _mm512_test_epi32_mask(reinterpret_cast<__m512i>(m), reinterpret_cast<__m512i>(m));
#elif defined(__AVX__)
  return _mm256_movemask_ps(reinterpret_cast<__m256>(m));
#else
  uint32_t bits = 0;
  for (int l = 0; l < VL; ++l) bits |= static_cast<uint32_t>(m[l] & 1) << l;
  return bits;
#endif
}

// The bits of the panel of columns [c, c + width) of a tile row u (u[0] is column c): test(z, col) gets z = u + bias
// on the VL columns from col and returns their VL bits (lane_bits). A panel narrower than PANEL gets every bit.
template <typename Test>
inline uint32_t panel_bits(const float* u, const float* bias, int64_t c, int64_t width, Test&& test) {
  if (width < PANEL) return (uint32_t{1} << width) - 1;
  uint32_t bits = 0;
  for (int64_t v = 0; v < PANEL; v += VL) {
    vec z;
    std::memcpy(&z, u + v, sizeof z);
    if (bias) {
      vec b;
      std::memcpy(&b, bias + c + v, sizeof b);
      z = z + b;
    }
    bits |= test(z, c + v) << v;
  }
  return bits;
}

void check_encoder(const at::Tensor& x, const at::Tensor& W) {
  TORCH_CHECK(x.device().is_cpu() && W.device().is_cpu(), "x, W: expected CPU tensors");
  TORCH_CHECK(x.dim() == 2 && W.dim() == 2 && x.size(1) == W.size(1), "x [B, d], W [n, d]: got ", x.sizes(),
              " and ", W.sizes());
  TORCH_CHECK(x.scalar_type() == W.scalar_type(), "x, W: expected one dtype, got ", x.scalar_type(), " and ",
              W.scalar_type());
}

}  // namespace

// TopK_k(ReLU(x W^T + b)) per row: values [B, k] (x.dtype) and indices [B, k] int32, sorted by value,
// equal values by lower latent id (packed int64 keys: value bits << 32 | KEY_LOW - column).
void topk_select(const at::Tensor& x_in, const at::Tensor& W_in, const c10::optional<at::Tensor>& b_in, int64_t k,
                 at::Tensor& values, at::Tensor& indices) {
  check_encoder(x_in, W_in);
  const at::Tensor W = W_in.contiguous();
  const at::Tensor xf = x_in.to(at::kFloat).contiguous();
  const at::Tensor b = f32(b_in);
  const int64_t B = xf.size(0), n = W.size(0);
  TORCH_CHECK(k >= 1 && k <= n, "k: expected 1 <= k <= n = ", n, ", got ", k);
  check_out(values, "values", {B, k}, x_in.scalar_type());
  check_out(indices, "indices", {B, k}, at::kInt);
  const int64_t splits = splits_for(B, n);
  std::vector<int64_t> cand(static_cast<size_t>(B * splits * k), -1);  // per (row, split): a min-heap of keys
  const float* bias = b.defined() ? b.data_ptr<float>() : nullptr;
  at::parallel_for(0, splits * cdiv(B, ROWS), 1, [&](int64_t begin, int64_t end) {
    for_tiles(xf, W, splits, begin, end, [&](int64_t, int64_t s, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                                             const float* tile) {
      for (int64_t r = 0; r < rows; ++r) {
        int64_t* heap = cand.data() + ((r0 + r) * splits + s) * k;
        const float* z = tile + r * cols;
        float floor_value = floor_of(heap[0]);
        for (int64_t p = 0; p < cols; p += PANEL) {
          // A column whose value is at most the floor cannot enter: the heap's columns are lower and win ties.
          uint32_t bits = panel_bits(z + p, bias, c0 + p, std::min(PANEL, cols - p), [&](const vec& v, int64_t) {
            const vec f = v > 0.0f ? v : 0.0f;
            return lane_bits(f > floor_value);
          });
          for (; bits; bits &= bits - 1) {
            const int64_t j = p + __builtin_ctz(bits);
            float f = z[j] + (bias ? bias[c0 + j] : 0.0f);
            f = f > 0.0f ? f : 0.0f;
            if (f < floor_value) continue;
            const int64_t key = pack(f, c0 + j);
            if (key > heap[0]) {
              heap_replace_root(heap, k, key);
              floor_value = floor_of(heap[0]);
            }
          }
        }
      }
    });
  });
  int32_t* idx = indices.data_ptr<int32_t>();
  dispatch(values, "x", [&](auto zero) {
    using T = decltype(zero);
    T* val = values.data_ptr<T>();
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> keys;
      for (int64_t r = begin; r < end; ++r) {
        keys.assign(cand.begin() + r * splits * k, cand.begin() + (r + 1) * splits * k);
        std::partial_sort(keys.begin(), keys.begin() + k, keys.end(), std::greater<int64_t>());
        for (int64_t j = 0; j < k; ++j) {
          val[r * k + j] = static_cast<T>(key_value(keys[j]));
          idx[r * k + j] = key_col(keys[j]);
        }
      }
    });
  });
}

// The threshold encoders' compaction (modes as torch_ops: 0 ReLU, 1 JumpReLU with its gradient band, 2 gated):
// each row's kept entries in its first slots by latent id; counts [B] holds every kept entry of a row, also
// those beyond the capacity C (not stored). Empty slots are 0. values / gate: [B, C] x.dtype (gate: gated only),
// aux: [B, C] fp32 (pi_m for gated, else z), indices: [B, C] int32.
void threshold_select(int64_t mode, const at::Tensor& x_in, const at::Tensor& W_in,
                      const c10::optional<at::Tensor>& b_in, const c10::optional<at::Tensor>& theta_in,
                      const c10::optional<at::Tensor>& r_mag_in, const c10::optional<at::Tensor>& b_mag_in,
                      double half_band, at::Tensor& values, const c10::optional<at::Tensor>& gate_out,
                      at::Tensor& aux, at::Tensor& indices, at::Tensor& counts) {
  check_encoder(x_in, W_in);
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode: expected 0 (ReLU), 1 (JumpReLU) or 2 (gated), got ", mode);
  const at::Tensor W = W_in.contiguous();
  const at::Tensor xf = x_in.to(at::kFloat).contiguous();
  const int64_t B = xf.size(0), C = values.size(1);
  const at::Tensor b = f32(b_in), theta = f32(theta_in), b_mag = f32(b_mag_in);
  TORCH_CHECK(mode != 1 || theta.defined(), "threshold: required in JumpReLU mode");
  TORCH_CHECK(mode != 2 || (r_mag_in.has_value() && b_mag.defined() && gate_out.has_value()),
              "r_mag, b_mag, gate: required in gated mode");
  const at::Tensor scale = mode == 2 ? r_mag_in->to(at::kFloat).exp().contiguous() : at::Tensor();
  check_out(values, "values", {B, C}, x_in.scalar_type());
  check_out(aux, "aux", {B, C}, at::kFloat);
  check_out(indices, "indices", {B, C}, at::kInt);
  check_out(counts, "counts", {B}, at::kInt);
  if (mode == 2) check_out(*gate_out, "gate", {B, C}, x_in.scalar_type());
  const float* bias = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* th = theta.defined() ? theta.data_ptr<float>() : nullptr;
  const float* sc = scale.defined() ? scale.data_ptr<float>() : nullptr;
  const float* bm = b_mag.defined() ? b_mag.data_ptr<float>() : nullptr;
  const float band = static_cast<float>(half_band);
  float* ax = aux.data_ptr<float>();
  int32_t* idx = indices.data_ptr<int32_t>();
  int32_t* cnt = counts.data_ptr<int32_t>();
  dispatch(values, "x", [&](auto zero) {
    using T = decltype(zero);
    T* val = values.data_ptr<T>();
    T* gt = mode == 2 ? gate_out->data_ptr<T>() : nullptr;
    at::parallel_for(0, cdiv(B, ROWS), 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin * ROWS; r < std::min(B, end * ROWS); ++r) cnt[r] = 0;
      for_tiles(xf, W, 1, begin, end, [&](int64_t, int64_t, int64_t r0, int64_t rows, int64_t c0, int64_t cols,
                                         const float* tile) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = r0 + r;
          const float* u = tile + r * cols;
          int32_t c = cnt[row];
          for (int64_t p = 0; p < cols; p += PANEL) {
            // The keep test of the scalar code below, on VL columns at a time.
            uint32_t bits = panel_bits(u + p, bias, c0 + p, std::min(PANEL, cols - p), [&](const vec& v, int64_t col) {
              if (mode != 1) return lane_bits(v > 0.0f);
              vec t;
              std::memcpy(&t, th + col, sizeof t);
              return lane_bits((v > t) | ((v - t < band) & (v - t > -band)));
            });
            for (; bits; bits &= bits - 1) {
              const int64_t j = p + __builtin_ctz(bits), col = c0 + j;
              const float z = bias ? u[j] + bias[col] : u[j];
              bool keep;
              float f, a;
              if (mode == 0) {
                keep = z > 0.0f, f = z, a = z;
              } else if (mode == 1) {
                const bool active = z > th[col];
                keep = active || std::fabs(z - th[col]) < band, f = active ? z : 0.0f, a = z;
              } else {
                keep = z > 0.0f, a = sc[col] * u[j] + bm[col], f = a > 0.0f ? a : 0.0f;
              }
              if (!keep) continue;
              if (c < C) {
                const int64_t o = row * C + c;
                val[o] = static_cast<T>(f);
                if (gt) gt[o] = static_cast<T>(z);
                ax[o] = a;
                idx[o] = static_cast<int32_t>(col);
              }
              ++c;
            }
          }
          cnt[row] = c;
        }
      });
      for (int64_t r = begin * ROWS; r < std::min(B, end * ROWS); ++r) {
        for (int64_t c = std::min<int64_t>(cnt[r], C); c < C; ++c) {
          const int64_t o = r * C + c;
          val[o] = static_cast<T>(0.0f);
          if (gt) gt[o] = static_cast<T>(0.0f);
          ax[o] = 0.0f;
          idx[o] = 0;
        }
      }
    });
  });
}

TORCH_LIBRARY_IMPL(sae_kernels_cpp, CPU, m) {
  m.impl("topk_select", &topk_select);
  m.impl("threshold_select", &threshold_select);
}

}  // namespace sae_cpp
