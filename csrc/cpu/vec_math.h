// Vector math shared by the CPU kernels (AVX-512, called only where cpu::detect() allows):
// exp2, exact-erf GELU, masks and bf16 <-> fp32 lanes.
#pragma once
#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#ifndef CCTK_X86
#define CCTK_X86 1
#endif
#endif

#define CCTK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define CCTK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define CCTK_AVX2 __attribute__((target("avx2,fma")))

namespace cctk {
namespace vec {

#ifdef CCTK_X86
inline __mmask16 tail_mask(int64_t n) {
  return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (n <= 0 ? 0 : ((1u << n) - 1)));
}

// 2^x; DEG = Taylor degree of e^y on |y| <= ln2/2 (7: ~1e-8 relative, fp32 results; 5: ~3e-6 and
// 4: ~2e-5, enough where the result is rounded to bf16). CLAMP: x clamped to [-126, 126] (needed for
// infinite x; finite x <= 0 needs none: scalef flushes tiny results to 0).
template <int DEG, bool CLAMP = true>
CCTK_AVX512 inline __m512 exp2_ps(__m512 x) {
  if (CLAMP) x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.f)), _mm512_set1_ps(126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 y = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p;
  if (DEG >= 7) {
    p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 24.f));
  } else if (DEG >= 5) {
    p = _mm512_set1_ps(1.f / 120.f);
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 24.f));
  } else {
    p = _mm512_set1_ps(1.f / 24.f);
  }
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// GELU with the exact erf: 0.5 x (1 + erf(x / sqrt 2)); erf by Abramowitz-Stegun 7.1.26
// (|error| <= 1.5e-7). PRECISE (fp32 outputs): reciprocal refined by a Newton step, e^-z^2 by the
// degree-7 exp2, |gelu error| <= ~1e-7 |x|. !PRECISE (bf16 outputs, 8-bit mantissa): the 14-bit
// reciprocal and a degree-4 exp2, |error| <= ~3e-5 |x|, a third fewer FMA-port operations.
template <bool PRECISE = true>
CCTK_AVX512 inline __m512 gelu_erf_ps(__m512 x) {
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(x), _mm512_set1_ps(0.70710678118654752f));
  const __m512 den = _mm512_fmadd_ps(z, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.f));
  __m512 t = _mm512_rcp14_ps(den);  // t = 1 / (1 + p z)
  if (PRECISE) t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.f)));
  __m512 poly = _mm512_set1_ps(1.061405429f);
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
  poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
  poly = _mm512_mul_ps(poly, t);
  // e^{-z^2} = 2^{-x^2 log2(e) / 2}
  const __m512 arg = _mm512_mul_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(-0.72134752044448170f));
  const __m512 e = PRECISE ? exp2_ps<7>(arg) : exp2_ps<4>(arg);  // clamped: x^2 may overflow to inf
  const __m512 erf_abs = _mm512_fnmadd_ps(poly, e, _mm512_set1_ps(1.f));  // erf(|z|)
  // 0.5 x (1 + sign(x) erf|z|)
  const __m512 erf_signed = _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(erf_abs), _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(int32_t(0x80000000u)))));
  return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(erf_signed, _mm512_set1_ps(1.f)));
}

// AVX2 twins (8 lanes) of exp2_ps<7> and gelu_erf_ps<true>, for the AVX2 micro-kernels' fused
// epilogue. 2^n is built in the exponent bits (AVX2 has no scalef): x is clamped to [-126, 126].
CCTK_AVX2 inline __m256 exp2_ps_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.f)), _mm256_set1_ps(126.f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 y = _mm256_mul_ps(_mm256_sub_ps(x, n), _mm256_set1_ps(0.69314718055994531f));
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

CCTK_AVX2 inline __m256 gelu_erf_ps_avx2(__m256 x) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(0x80000000u)));
  const __m256 z = _mm256_mul_ps(_mm256_andnot_ps(sign, x), _mm256_set1_ps(0.70710678118654752f));
  const __m256 den = _mm256_fmadd_ps(z, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.f));
  __m256 t = _mm256_rcp_ps(den);
  t = _mm256_mul_ps(t, _mm256_fnmadd_ps(den, t, _mm256_set1_ps(2.f)));  // Newton: 12 -> 23 bits
  __m256 poly = _mm256_set1_ps(1.061405429f);
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-1.453152027f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(1.421413741f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(-0.284496736f));
  poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(0.254829592f));
  poly = _mm256_mul_ps(poly, t);
  const __m256 e = exp2_ps_avx2(_mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(-0.72134752044448170f)));
  const __m256 erf_abs = _mm256_fnmadd_ps(poly, e, _mm256_set1_ps(1.f));
  const __m256 erf_signed = _mm256_or_ps(erf_abs, _mm256_and_ps(x, sign));
  return _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5f)), _mm256_add_ps(erf_signed, _mm256_set1_ps(1.f)));
}

// 16 fp32 lanes -> 16 bf16 (uint16), round to nearest even (finite values), as
// _mm512_cvtneps_pbh does, for CPUs without AVX512-BF16
CCTK_AVX512 inline __m256i ps_to_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// 16 bf16 (uint16) -> 16 fp32 lanes
CCTK_AVX512 inline __m512 bf16_to_ps(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#endif  // CCTK_X86

}  // namespace vec
}  // namespace cctk
