// The x W^T tile of the fused encoders: a register-blocked fp32 micro-kernel (MR rows x NR latents per
// step, FMA on GCC vector types, so -march=native picks AVX-512 or AVX2) on W packed k-major per chunk.
// No BLAS call inside a parallel region (nested runtimes spin on a loaded machine), and each tile element is
// one fixed-order sum over k: the same bits on any thread count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sae_cpp {

#ifdef __AVX512F__
constexpr int VL = 16;  // floats per vector
#else
constexpr int VL = 8;
#endif
typedef float vec __attribute__((vector_size(VL * sizeof(float))));
constexpr int MR = 6;       // rows per micro-kernel step
constexpr int NR = 2 * VL;  // latents per packed panel

// W rows [c0, c0 + cols) as panels of NR latents, k-major: packed[p][k][j] = W[c0 + p NR + j][k] (0 past cols).
template <typename T>
void pack_panels(const T* W, int64_t d, int64_t c0, int64_t cols, std::vector<float>& packed) {
  const int64_t panels = (cols + NR - 1) / NR;
  packed.assign(panels * d * NR, 0.0f);
  for (int64_t c = 0; c < cols; ++c) {
    const T* w = W + (c0 + c) * d;
    float* p = packed.data() + (c / NR) * d * NR + c % NR;
    for (int64_t k = 0; k < d; ++k) p[k * NR] = static_cast<float>(w[k]);
  }
}

template <int M>
inline void micro(const float* x, int64_t d, const float* panel, float* out, int64_t ldo, int64_t valid) {
  vec acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = vec{} ;
  for (int64_t k = 0; k < d; ++k) {
    vec w0, w1;
    std::memcpy(&w0, panel + k * NR, sizeof w0);
    std::memcpy(&w1, panel + k * NR + VL, sizeof w1);
    for (int m = 0; m < M; ++m) {
      const float a = x[m * d + k];
      acc[m][0] += a * w0;
      acc[m][1] += a * w1;
    }
  }
  for (int m = 0; m < M; ++m) {
    if (valid == NR) {
      std::memcpy(out + m * ldo, &acc[m][0], sizeof(vec));
      std::memcpy(out + m * ldo + VL, &acc[m][1], sizeof(vec));
    } else {
      float tmp[NR];
      std::memcpy(tmp, &acc[m][0], sizeof(vec));
      std::memcpy(tmp + VL, &acc[m][1], sizeof(vec));
      std::copy(tmp, tmp + valid, out + m * ldo);
    }
  }
}

// out [rows, cols] (row stride cols) = x [rows, d] (row-major fp32) times the packed chunk's latents.
inline void tile_gemm(const float* x, int64_t rows, int64_t d, const std::vector<float>& packed, int64_t cols,
                      float* out) {
  for (int64_t p = 0; p * NR < cols; ++p) {
    const float* panel = packed.data() + p * d * NR;
    const int64_t valid = std::min<int64_t>(NR, cols - p * NR);
    float* o = out + p * NR;
    int64_t r = 0;
    for (; r + MR <= rows; r += MR) micro<MR>(x + r * d, d, panel, o + r * cols, cols, valid);
    switch (rows - r) {
      case 5: micro<5>(x + r * d, d, panel, o + r * cols, cols, valid); break;
      case 4: micro<4>(x + r * d, d, panel, o + r * cols, cols, valid); break;
      case 3: micro<3>(x + r * d, d, panel, o + r * cols, cols, valid); break;
      case 2: micro<2>(x + r * d, d, panel, o + r * cols, cols, valid); break;
      case 1: micro<1>(x + r * d, d, panel, o + r * cols, cols, valid); break;
      default: break;
    }
  }
}

}  // namespace sae_cpp
