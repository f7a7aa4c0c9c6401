// CPU kernel of cctk::layer_norm: y = (x - mean) / sqrt(var + eps) * weight + bias over the last
// dimension (biased variance, as torch.nn.LayerNorm), inference forward. Schema and reference:
// cctk/ops/layer_norm.py.
//
// One row per step, OpenMP over rows; a row (a CCT token: 128-384 features) stays in L1 across
// the three passes: sum -> mean, sum of squared deviations -> variance (two-pass: no
// cancellation), then normalise, scale, shift and store. Statistics in fp32 (fp64 for fp64).
// Paths: AVX-512 for fp32 and bf16 (bf16 converted in registers), a scalar loop for every dtype.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>

#include "cpu/cpu_features.h"
#include "cpu/vec_math.h"

namespace cctk {
namespace {

using cpu::Capability;

template <typename T>
void layer_norm_scalar(const T* x, const T* w, const T* b, T* y, int64_t rows, int64_t d, double eps) {
  using acc_t = at::opmath_type<T>;
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * d;
      acc_t s = 0;
      for (int64_t j = 0; j < d; ++j) s += static_cast<acc_t>(xr[j]);
      const acc_t mean = s / d;
      acc_t v = 0;
      for (int64_t j = 0; j < d; ++j) {
        const acc_t t = static_cast<acc_t>(xr[j]) - mean;
        v += t * t;
      }
      const acc_t rstd = acc_t(1) / std::sqrt(v / d + static_cast<acc_t>(eps));
      T* yr = y + r * d;
      for (int64_t j = 0; j < d; ++j) {
        acc_t t = (static_cast<acc_t>(xr[j]) - mean) * rstd;
        if (w) t *= static_cast<acc_t>(w[j]);
        if (b) t += static_cast<acc_t>(b[j]);
        yr[j] = static_cast<T>(t);
      }
    }
  });
}

#ifdef CCTK_X86
// Load / store 16 lanes of fp32 or bf16 (masked tail).
CCTK_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
CCTK_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return vec::bf16_to_ps(_mm256_maskz_loadu_epi16(m, p));
}
CCTK_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
CCTK_AVX512 inline void store16(uint16_t* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, vec::ps_to_bf16(v));
}

template <typename T>
CCTK_AVX512 void ln_row_avx512(const T* xr, const T* w, const T* b, T* yr, int64_t d, float eps) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += 16) s = _mm512_add_ps(s, load16(xr + j, vec::tail_mask(d - j)));
  const float mean = _mm512_reduce_add_ps(s) / static_cast<float>(d);
  const __m512 vm = _mm512_set1_ps(mean);
  __m512 v = _mm512_setzero_ps();
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = vec::tail_mask(d - j);
    const __m512 t = _mm512_maskz_sub_ps(m, load16(xr + j, m), vm);
    v = _mm512_fmadd_ps(t, t, v);
  }
  const float rstd = 1.f / std::sqrt(_mm512_reduce_add_ps(v) / static_cast<float>(d) + eps);
  const __m512 vr = _mm512_set1_ps(rstd);
  for (int64_t j = 0; j < d; j += 16) {
    const __mmask16 m = vec::tail_mask(d - j);
    __m512 t = _mm512_mul_ps(_mm512_sub_ps(load16(xr + j, m), vm), vr);
    if (w) t = _mm512_mul_ps(t, load16(w + j, m));
    if (b) t = _mm512_add_ps(t, load16(b + j, m));
    store16(yr + j, t, m);
  }
}

template <typename T>
void layer_norm_avx512(const T* x, const T* w, const T* b, T* y, int64_t rows, int64_t d, float eps) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) ln_row_avx512<T>(x + r * d, w, b, y + r * d, d, eps);
  });
}
#endif

at::Tensor layer_norm_cpu(const at::Tensor& x_, const c10::optional<at::Tensor>& weight_,
                          const c10::optional<at::Tensor>& bias_, double eps) {
  const char* op = "cctk::layer_norm";
  TORCH_CHECK(x_.dim() >= 1 && x_.size(-1) >= 1, op, ": x must have a non-empty last dimension, got ", x_.sizes());
  TORCH_CHECK(x_.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(at::isFloatingType(x_.scalar_type()), op, ": floating-point input expected, got ", x_.scalar_type());
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, got ", eps);
  const int64_t d = x_.size(-1);
  at::Tensor w, b;
  for (int i = 0; i < 2; ++i) {
    const auto& opt = i == 0 ? weight_ : bias_;
    if (!opt.has_value() || !opt->defined()) continue;
    TORCH_CHECK(opt->dim() == 1 && opt->size(0) == d && opt->scalar_type() == x_.scalar_type() &&
                    opt->device().is_cpu(),
                op, ": ", i == 0 ? "weight" : "bias", " must be a (", d, ",) CPU tensor of dtype ", x_.scalar_type(),
                ", got ", opt->scalar_type(), " ", opt->sizes());
    (i == 0 ? w : b) = opt->contiguous();
  }
  auto x = x_.contiguous();
  auto y = at::empty_like(x);
  const int64_t rows = x.numel() / d;
  if (rows == 0) return y;
  const auto st = x.scalar_type();
#ifdef CCTK_X86
  if (cpu::detect() >= Capability::AVX512) {
    if (st == at::kFloat) {
      layer_norm_avx512<float>(x.data_ptr<float>(), w.defined() ? w.data_ptr<float>() : nullptr,
                               b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), rows, d,
                               static_cast<float>(eps));
      return y;
    }
    if (st == at::kBFloat16) {
      auto u16 = [](const at::Tensor& t) -> const uint16_t* {
        return t.defined() ? reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()) : nullptr;
      };
      layer_norm_avx512<uint16_t>(u16(x), u16(w), u16(b), reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()),
                                  rows, d, static_cast<float>(eps));
      return y;
    }
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "layer_norm_cpu", [&] {
    layer_norm_scalar<scalar_t>(x.data_ptr<scalar_t>(), w.defined() ? w.data_ptr<scalar_t>() : nullptr,
                                b.defined() ? b.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), rows, d, eps);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(cctk, CPU, m) { m.impl("layer_norm", &layer_norm_cpu); }

}  // namespace cctk
