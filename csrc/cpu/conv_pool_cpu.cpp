// CPU kernel of cctk::conv_relu_maxpool: one CCT tokenizer stage,
//     y = MaxPool(ReLU(Conv2d(x, W, stride, padding, no bias)), pool_kernel, pool_stride, pool_padding)
// on channels-last (NHWC) images, written straight into NHWC memory (the (B, T, C) tokens when it
// is the last stage). Schema and reference: cctk/ops/conv_pool.py.
//
// ReLU commutes with the max (both non-decreasing), so the kernel pools the raw convolution
// and applies ReLU once per pooled value. Work units are (image, band of pooled rows); a unit
// computes each convolution row its pooling windows need once, into a ring of pool_kernel rows
// (fp32, L2-resident: 32 x 256 x 4 B = 32 KiB per row for CCT-7), then pools it. A convolution
// row is an im2col-free register-tiled product: per tile of 4 output positions x 64 channels
// (16 zmm accumulators), each of the k*k*C_in taps broadcasts the 4 positions' input values
// (zero padding from a small patch buffer) against one packed 64-channel weight row.
// Paths: AVX-512 (fp32 math; bf16 in and out, converted in registers) and a scalar path for
// every dtype and CPU.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/vec_math.h"

namespace cctk {
namespace {

using cpu::Capability;

struct ConvPool {
  int64_t B, H, W, Cin, Cout;      // input NHWC, output channels
  int64_t k, s, p;                 // conv kernel, stride, padding
  int64_t Hc, Wc;                  // conv output size
  int64_t pk, ps, pp;              // pool kernel, stride, padding
  int64_t Hp, Wp;                  // pooled output size
  int64_t K() const { return k * k * Cin; }
};

inline int64_t out_size(int64_t n, int64_t kernel, int64_t stride, int64_t pad) {
  return (n + 2 * pad - kernel) / stride + 1;
}

// conv row r of image b (fp32, Wc x Cout) into dst. Packed weights Wp[tap][co], tap = (ky, kx, ci).
template <typename T>
void conv_row_scalar(const ConvPool& g, const T* x, const float* Wp, int64_t b, int64_t r, float* dst) {
  for (int64_t c = 0; c < g.Wc; ++c) {
    float* o = dst + c * g.Cout;
    std::fill_n(o, g.Cout, 0.f);
    for (int64_t ky = 0; ky < g.k; ++ky) {
      const int64_t iy = r * g.s - g.p + ky;
      if (iy < 0 || iy >= g.H) continue;
      for (int64_t kx = 0; kx < g.k; ++kx) {
        const int64_t ix = c * g.s - g.p + kx;
        if (ix < 0 || ix >= g.W) continue;
        const T* xi = x + ((b * g.H + iy) * g.W + ix) * g.Cin;
        for (int64_t ci = 0; ci < g.Cin; ++ci) {
          const float xv = static_cast<float>(xi[ci]);
          const float* w = Wp + ((ky * g.k + kx) * g.Cin + ci) * g.Cout;
          for (int64_t co = 0; co < g.Cout; ++co) o[co] += xv * w[co];
        }
      }
    }
  }
}

constexpr int PT = 4;  // conv output positions per register tile (AVX-512 path)

#ifdef CCTK_X86

// patch[t][tap] (fp32, zero padded) for the PT positions c0.. of conv row r
template <typename T>
inline void gather_patch(const ConvPool& g, const T* x, int64_t b, int64_t r, int64_t c0, float* patch) {
  const int64_t K = g.K();
  for (int t = 0; t < PT; ++t) {
    float* pt = patch + t * K;
    const int64_t c = c0 + t;
    for (int64_t ky = 0; ky < g.k; ++ky) {
      const int64_t iy = r * g.s - g.p + ky;
      for (int64_t kx = 0; kx < g.k; ++kx) {
        const int64_t ix = c * g.s - g.p + kx;
        float* dst = pt + (ky * g.k + kx) * g.Cin;
        if (c >= g.Wc || iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) {
          std::fill_n(dst, g.Cin, 0.f);
          continue;
        }
        const T* xi = x + ((b * g.H + iy) * g.W + ix) * g.Cin;
        for (int64_t ci = 0; ci < g.Cin; ++ci) dst[ci] = static_cast<float>(xi[ci]);
      }
    }
  }
}

template <int NV>
CCTK_AVX512 inline void conv_tile(const float* patch, int64_t K, const float* Wp, int64_t Cout, int64_t co,
                                  float* dst /* row base: position c0, channel 0 */) {
  __m512 acc[PT][NV];
  for (int t = 0; t < PT; ++t)
    for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_setzero_ps();
  for (int64_t tap = 0; tap < K; ++tap) {
    __m512 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(Wp + tap * Cout + co + 16 * v);
    for (int t = 0; t < PT; ++t) {
      const __m512 xv = _mm512_set1_ps(patch[t * K + tap]);
      for (int v = 0; v < NV; ++v) acc[t][v] = _mm512_fmadd_ps(xv, w[v], acc[t][v]);
    }
  }
  for (int t = 0; t < PT; ++t)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(dst + t * Cout + co + 16 * v, acc[t][v]);
}

template <typename T>
void conv_row_avx512(const ConvPool& g, const T* x, const float* Wp, int64_t b, int64_t r, float* dst,
                     float* patch /* PT * K */, float* tail /* PT * Cout */) {
  const int64_t K = g.K();
  for (int64_t c0 = 0; c0 < g.Wc; c0 += PT) {
    gather_patch<T>(g, x, b, r, c0, patch);
    float* out = c0 + PT <= g.Wc ? dst + c0 * g.Cout : tail;
    int64_t co = 0;
    for (; co + 64 <= g.Cout; co += 64) conv_tile<4>(patch, K, Wp, g.Cout, co, out);
    for (; co < g.Cout; co += 16) conv_tile<1>(patch, K, Wp, g.Cout, co, out);
    if (out == tail) std::copy_n(tail, (g.Wc - c0) * g.Cout, dst + c0 * g.Cout);
  }
}

// y[c] = relu(max over the window's rows and columns of conv), 16 channels at a time
template <typename T>
CCTK_AVX512 void pool_row_avx512(const ConvPool& g, const float* const* rows, int n_rows, T* y) {
  for (int64_t px = 0; px < g.Wp; ++px) {
    const int64_t c0 = std::max<int64_t>(0, px * g.ps - g.pp), c1 = std::min(g.Wc, px * g.ps - g.pp + g.pk);
    T* yo = y + px * g.Cout;
    for (int64_t co = 0; co < g.Cout; co += 16) {
      __m512 m = _mm512_setzero_ps();  // ReLU: max with 0
      for (int i = 0; i < n_rows; ++i)
        for (int64_t c = c0; c < c1; ++c) m = _mm512_max_ps(m, _mm512_loadu_ps(rows[i] + c * g.Cout + co));
      if constexpr (std::is_same_v<T, float>) {
        _mm512_storeu_ps(yo + co, m);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(yo + co), vec::ps_to_bf16(m));
      }
    }
  }
}
#endif

template <typename T>
void pool_row_scalar(const ConvPool& g, const float* const* rows, int n_rows, T* y) {
  for (int64_t px = 0; px < g.Wp; ++px) {
    const int64_t c0 = std::max<int64_t>(0, px * g.ps - g.pp), c1 = std::min(g.Wc, px * g.ps - g.pp + g.pk);
    for (int64_t co = 0; co < g.Cout; ++co) {
      float m = 0.f;  // ReLU
      for (int i = 0; i < n_rows; ++i)
        for (int64_t c = c0; c < c1; ++c) m = std::max(m, rows[i][c * g.Cout + co]);
      y[px * g.Cout + co] = static_cast<T>(m);
    }
  }
}

template <typename T, typename XT>
void run(const ConvPool& g, const XT* x, const float* Wp, T* y, bool vec) {
  // units: (image, band of pooled rows); bands sized so every thread gets several units
  const int64_t want = 4 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t bands = std::max<int64_t>(1, std::min<int64_t>(g.Hp, (want + g.B - 1) / g.B));
  const int64_t rows_per_band = (g.Hp + bands - 1) / bands;
  at::parallel_for(0, g.B * bands, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> ring(static_cast<size_t>(g.pk) * g.Wc * g.Cout);
    std::vector<int64_t> held(g.pk, -1);
    std::vector<float> patch(PT * g.K()), tail(PT * g.Cout);
    std::vector<const float*> rows(g.pk);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / bands, band = u % bands;
      std::fill(held.begin(), held.end(), -1);
      const int64_t py0 = band * rows_per_band, py1 = std::min(g.Hp, py0 + rows_per_band);
      for (int64_t py = py0; py < py1; ++py) {
        const int64_t r0 = std::max<int64_t>(0, py * g.ps - g.pp), r1 = std::min(g.Hc, py * g.ps - g.pp + g.pk);
        int n = 0;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t slot = r % g.pk;
          float* dst = ring.data() + slot * g.Wc * g.Cout;
          if (held[slot] != r) {
#ifdef CCTK_X86
            if (vec) conv_row_avx512<XT>(g, x, Wp, b, r, dst, patch.data(), tail.data());
            else
#endif
              conv_row_scalar<XT>(g, x, Wp, b, r, dst);
            held[slot] = r;
          }
          rows[n++] = dst;
        }
        T* yr = y + (b * g.Hp + py) * g.Wp * g.Cout;
#ifdef CCTK_X86
        if (vec) {
          pool_row_avx512<T>(g, rows.data(), n, yr);
          continue;
        }
#endif
        pool_row_scalar<T>(g, rows.data(), n, yr);
      }
    }
  });
}

at::Tensor conv_relu_maxpool_cpu(const at::Tensor& x_, const at::Tensor& weight, int64_t stride, int64_t padding,
                                 int64_t pool_kernel, int64_t pool_stride, int64_t pool_padding) {
  const char* op = "cctk::conv_relu_maxpool";
  TORCH_CHECK(x_.dim() == 4 && weight.dim() == 4, op, ": x (B, C, H, W) and weight (Cout, Cin, k, k) must be 4-D, got ",
              x_.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x_.device().is_cpu() && weight.device().is_cpu(), op, ": tensors must be on the CPU");
  const auto st0 = x_.scalar_type();
  TORCH_CHECK(st0 == weight.scalar_type() && (st0 == at::kFloat || st0 == at::kBFloat16 || st0 == at::kHalf), op,
              ": x and weight must share one dtype of float32, bfloat16 or float16 (fp32 accumulation), got ",
              x_.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(weight.size(1) == x_.size(1) && weight.size(2) == weight.size(3), op, ": weight ", weight.sizes(),
              " does not fit ", x_.size(1), "-channel input with a square kernel");
  TORCH_CHECK(stride >= 1 && padding >= 0 && pool_kernel >= 1 && pool_stride >= 1 && pool_padding >= 0 &&
                  2 * pool_padding <= pool_kernel,
              op, ": bad conv / pool geometry");
  ConvPool g{};
  g.B = x_.size(0), g.Cin = x_.size(1), g.H = x_.size(2), g.W = x_.size(3), g.Cout = weight.size(0);
  g.k = weight.size(2), g.s = stride, g.p = padding, g.pk = pool_kernel, g.ps = pool_stride, g.pp = pool_padding;
  g.Hc = out_size(g.H, g.k, g.s, g.p), g.Wc = out_size(g.W, g.k, g.s, g.p);
  TORCH_CHECK(g.Hc >= 1 && g.Wc >= 1, op, ": images of ", g.H, "x", g.W, " are too small for this convolution");
  g.Hp = out_size(g.Hc, g.pk, g.ps, g.pp), g.Wp = out_size(g.Wc, g.pk, g.ps, g.pp);
  TORCH_CHECK(g.Hp >= 1 && g.Wp >= 1, op, ": the convolution output is too small for this pooling");
  // NHWC input (a channels-last tensor is already that memory)
  auto x = x_.permute({0, 2, 3, 1}).contiguous();
  // packed fp32 weights: Wp[(ky * k + kx) * Cin + ci][co]
  auto Wp = weight.to(at::kFloat).permute({2, 3, 1, 0}).contiguous();
  auto y = at::empty({g.B, g.Hp, g.Wp, g.Cout}, x_.options());
  if (g.B == 0) return y.permute({0, 3, 1, 2});
  const auto st = x.scalar_type();
  bool vec = false;
#ifdef CCTK_X86
  vec = cpu::detect() >= Capability::AVX512 && g.Cout % 16 == 0;
#endif
  if (st == at::kFloat) {
    run<float, float>(g, x.data_ptr<float>(), Wp.data_ptr<float>(), y.data_ptr<float>(), vec);
  } else if (st == at::kBFloat16 && vec) {
    run<uint16_t, at::BFloat16>(g, x.data_ptr<at::BFloat16>(), Wp.data_ptr<float>(),
                                reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), vec);
  } else {
    AT_DISPATCH_REDUCED_FLOATING_TYPES(st, "conv_relu_maxpool_cpu", [&] {
      run<scalar_t, scalar_t>(g, x.data_ptr<scalar_t>(), Wp.data_ptr<float>(), y.data_ptr<scalar_t>(), false);
    });
  }
  return y.permute({0, 3, 1, 2});  // (B, C, Hp, Wp) view of NHWC memory: channels-last
}

}  // namespace

TORCH_LIBRARY_IMPL(cctk, CPU, m) { m.impl("conv_relu_maxpool", &conv_relu_maxpool_cpu); }

}  // namespace cctk
