// CPU kernel of cctk::attention: o = softmax(q k^T * scale) v per (batch, head), flash style.
// Schema and reference twin: cctk/ops/attention.py.
//
// Work units are (batch, head, range of query tiles), split over the threads with
// at::parallel_for. A unit first packs its head's K and V once into cache-friendly layouts
// (zero-padded to 16 keys and 16 head dims):
//
//   fp32:  Kt[d][j] = k[j, d]            (the keys of a d contiguous: 16 keys per vector)
//          Vp[j][d] = v[j, d]
//   bf16:  Kp[p][j] = (k[j, 2p], k[j, 2p+1])      uint32 pairs along d   (vdpbf16ps operand)
//          Vp[r][d] = (v[2r, d], v[2r+1, d])      uint32 pairs along keys
//
// then walks its query tiles of MR rows. For each key block of up to KB = 256 keys:
//   S  = q_tile K_blk^T                          (MR x 16..64 key register tiles, broadcast FMA)
//   m' = max(m, rowmax(S) * c)                    c = scale * log2(e): base-2 online softmax
//   P  = exp2(S * c - m'),  l = l * exp2(m - m') + rowsum(P),  O = O * exp2(m - m')
//   O += P V_blk                                 (MR x 16..64 head-dim register tiles)
// and finally o = O / l. Softmax statistics and O are fp32; in the bf16 path P is rounded to
// bf16 for the P V product (as flash-attention does on tensor cores) while l sums the fp32 P.
// q/k/v may be any strided (B, H, T, D) views with a unit last stride (the model's
// qkv.reshape().permute() views are); the output is (B, H, T, D) with the memory layout of a
// contiguous (B, T, H, D) tensor, so the model's o.transpose(1, 2).reshape(B, T, H*D) is free.
//
// Code paths (cpu_features.h; env CCTK_CPU_CAPABILITY caps them): AMX tiles for bf16 (QK^T and
// P V as tdpbf16ps; also over the tile emulator for tests), AVX-512 fp32, AVX512-BF16
// (vdpbf16ps) for bf16, bf16 through the fp32 AVX-512 kernel where AVX512-BF16 is missing, and a
// portable scalar path for every dtype (float64 and float16 always; AVX2-only CPUs).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/amx_tiles.h"
#include "cpu/cpu_features.h"
#include "cpu/vec_math.h"

namespace cctk {
namespace {

using cpu::Capability;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

constexpr int64_t KB = 256;  // keys per online-softmax block
#ifndef CCTK_ATTN_MR
#define CCTK_ATTN_MR 6
#endif
constexpr int MR = CCTK_ATTN_MR;        // query rows per register tile
constexpr int NVMAX = MR <= 6 ? 4 : 2;  // 16-wide vectors per tile row: MR x NVMAX <= 24 accumulators

struct Attn {
  int64_t B, H, Tq, Tk, D;
  int64_t DP, TP;  // D and Tk rounded up to 16
  double scale;
  // element strides of q, k, v (batch, head, token); the last stride is 1
  int64_t qs[3], ks[3], vs[3];
};

// ------------------------------------------------------------------------------------------
// Portable scalar path (any dtype): one query row at a time, exact softmax per key block.
template <typename T>
void attention_scalar(const Attn& a, const T* q, const T* k, const T* v, T* o) {
  using acc_t = at::opmath_type<T>;
  at::parallel_for(0, a.B * a.H, 1, [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> s(a.Tk), acc(a.D);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t b = u / a.H, h = u % a.H;
      const T* qh = q + b * a.qs[0] + h * a.qs[1];
      const T* kh = k + b * a.ks[0] + h * a.ks[1];
      const T* vh = v + b * a.vs[0] + h * a.vs[1];
      for (int64_t i = 0; i < a.Tq; ++i) {
        const T* qi = qh + i * a.qs[2];
        acc_t m = -std::numeric_limits<acc_t>::infinity();
        for (int64_t j = 0; j < a.Tk; ++j) {
          const T* kj = kh + j * a.ks[2];
          acc_t dot = 0;
          for (int64_t d = 0; d < a.D; ++d) dot += static_cast<acc_t>(qi[d]) * static_cast<acc_t>(kj[d]);
          s[j] = dot * static_cast<acc_t>(a.scale);
          m = std::max(m, s[j]);
        }
        acc_t l = 0;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t j = 0; j < a.Tk; ++j) {
          const acc_t p = std::exp(s[j] - m);
          l += p;
          const T* vj = vh + j * a.vs[2];
          for (int64_t d = 0; d < a.D; ++d) acc[d] += p * static_cast<acc_t>(vj[d]);
        }
        T* oi = o + ((b * a.Tq + i) * a.H + h) * a.D;
        for (int64_t d = 0; d < a.D; ++d) oi[d] = static_cast<T>(acc[d] / l);
      }
    }
  });
}

#ifdef CCTK_X86
using vec::exp2_ps;
using vec::tail_mask;

// In-register transpose of a 16 x 16 matrix of 32-bit elements (r[a] = row a -> r[e] = column e).
CCTK_AVX512 inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + c], 128-bit lane L: column 4L + c of rows 4i .. 4i+3
  for (int i = 0; i < 4; ++i) {
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i + 0], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // 4 x 4 transpose of the 128-bit lanes of u[c], u[4+c], u[8+c], u[12+c]
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// dst[e * ld_dst + j] = src row j, 32-bit element e, for j < n_rows (rows src + j * ld_src) and
// e < n_cols; in 16 x 16 tiles; rows past n_rows and columns past n_cols of a tile are zero.
CCTK_AVX512 void pack_transpose_u32(const uint32_t* src, int64_t ld_src, int64_t n_rows, int64_t n_cols,
                                    uint32_t* dst, int64_t ld_dst) {
  for (int64_t j0 = 0; j0 < n_rows; j0 += 16) {
    for (int64_t e0 = 0; e0 < n_cols; e0 += 16) {
      const __mmask16 cm = tail_mask(n_cols - e0);
      __m512i r[16];
      for (int a = 0; a < 16; ++a)
        r[a] = j0 + a < n_rows ? _mm512_maskz_loadu_epi32(cm, src + (j0 + a) * ld_src + e0) : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      const int64_t ne = std::min<int64_t>(16, n_cols - e0);
      for (int64_t e = 0; e < ne; ++e) _mm512_storeu_si512(dst + (e0 + e) * ld_dst + j0, r[e]);
    }
  }
}

// Vp[r][d] = (v[2r, d], v[2r+1, d]) for r < ceil(Tk / 2), d < D (a missing row 2r+1 is zero)
CCTK_AVX512 void pack_v_pairs(const uint16_t* v, int64_t ld, int64_t Tk, int64_t D, uint32_t* Vp, int64_t DP) {
  alignas(64) uint16_t idx_lo[32];
  for (int t = 0; t < 16; ++t) idx_lo[2 * t] = static_cast<uint16_t>(t), idx_lo[2 * t + 1] = static_cast<uint16_t>(32 + t);
  const __m512i idx = _mm512_load_si512(idx_lo);
  for (int64_t r = 0; 2 * r < Tk; ++r) {
    const uint16_t* v0 = v + 2 * r * ld;
    const bool has1 = 2 * r + 1 < Tk;
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = tail_mask(D - d);
      const __m512i a = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, v0 + d));
      const __m512i b = has1 ? _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, v0 + ld + d)) : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(Vp + r * DP + d, m, _mm512_permutex2var_epi16(a, idx, b));
    }
  }
}

// Online-softmax step for MR rows of one key block. S: MR x ldS fp32 scores (first nk valid);
// rmax / rmin: per row, 16 lanes whose max / min is the row's max / min score (the S tiles
// track them as they are computed). Overwrites S with P (fp32; cols >= nk zeroed up to nkp).
// exp2's argument s*c - m is <= 0 and finite, so it needs no clamp (scalef flushes to 0).
template <int DEG>
CCTK_AVX512 inline void softmax_block(float* S, int64_t ldS, int64_t nk, int64_t nkp, float c, const float* rmax,
                                      const float* rmin, float* m, float* l, float* alpha) {
  const __m512 vc = _mm512_set1_ps(c);
  for (int i = 0; i < MR; ++i) {
    float* s = S + i * ldS;
    const float top = c >= 0.f ? _mm512_reduce_max_ps(_mm512_loadu_ps(rmax + 16 * i)) * c
                               : _mm512_reduce_min_ps(_mm512_loadu_ps(rmin + 16 * i)) * c;
    const float mnew = std::max(m[i], top);
    alpha[i] = std::exp2(m[i] - mnew);  // m = -inf on the first block: alpha = 0
    m[i] = mnew;
    const __m512 vm = _mm512_set1_ps(mnew);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < nkp; j += 16) {
      __m512 p = exp2_ps<DEG, false>(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vc, vm));
      if (j + 16 > nk) p = _mm512_maskz_mov_ps(tail_mask(nk - j), p);
      vsum = _mm512_add_ps(vsum, p);
      _mm512_storeu_ps(s + j, p);
    }
    l[i] = l[i] * alpha[i] + _mm512_reduce_add_ps(vsum);
  }
}

// Fold an MR x NV tile of scores into the running per-row max / min lanes (valid columns only).
template <int NV>
CCTK_AVX512 inline void track_extremes(const __m512 (&acc)[MR][NV], int64_t valid, float* rmax, float* rmin) {
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    __m512 hi = _mm512_loadu_ps(rmax + 16 * i), lo = _mm512_loadu_ps(rmin + 16 * i);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = tail_mask(valid - 16 * v);
      hi = _mm512_mask_max_ps(hi, mk, hi, acc[i][v]);
      lo = _mm512_mask_min_ps(lo, mk, lo, acc[i][v]);
    }
    _mm512_storeu_ps(rmax + 16 * i, hi);
    _mm512_storeu_ps(rmin + 16 * i, lo);
  }
}

inline void reset_extremes(float* rmax, float* rmin) {
  std::fill_n(rmax, 16 * MR, -std::numeric_limits<float>::infinity());
  std::fill_n(rmin, 16 * MR, std::numeric_limits<float>::infinity());
}

// ---- fp32 micro-kernels
// S[i][jS + 16v] = sum_d q[i][d] * Kt[d][j + 16v]
template <int NV>
CCTK_AVX512 inline void s_tile_f32(const float* qb, int64_t DP, const float* Kt, int64_t TP, int64_t j, float* S,
                                   int64_t ldS, int64_t jS, int64_t valid, float* rmax, float* rmin) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t d = 0; d < DP; ++d) {
    __m512 w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(Kt + d * TP + j + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = _mm512_set1_ps(qb[i * DP + d]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xv, w[v], acc[i][v]);
    }
  }
  track_extremes<NV>(acc, valid, rmax, rmin);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(S + i * ldS + jS + 16 * v, acc[i][v]);
}

// O[i][dc + 16v] = O[i][..] * alpha[i] + sum_j P[i][j] * Vp[j][dc + 16v]   (j < nkp)
template <int NV>
CCTK_AVX512 inline void o_tile_f32(const float* P, int64_t ldP, int64_t nkp, const float* Vp, int64_t DP, int64_t dc,
                                   const float* alpha, float* O) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m512 a = _mm512_set1_ps(alpha[i]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_mul_ps(_mm512_loadu_ps(O + i * DP + dc + 16 * v), a);
  }
  for (int64_t j = 0; j < nkp; ++j) {
    __m512 w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(Vp + j * DP + dc + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512 pv = _mm512_set1_ps(P[i * ldP + j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(pv, w[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(O + i * DP + dc + 16 * v, acc[i][v]);
}

// P (MR x ldS fp32, first nkp columns) -> bf16 (round to nearest even), 32 per instruction
CCTK_AVX512BF16 inline void p_to_bf16(const float* S, int64_t ldS, int64_t nkp, uint16_t* Pb) {
  for (int i = 0; i < MR; ++i) {
    int64_t j = 0;
    for (; j + 32 <= nkp; j += 32)
      _mm512_storeu_si512(Pb + i * ldS + j, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(S + i * ldS + j + 16),
                                                                         _mm512_loadu_ps(S + i * ldS + j)));
    if (j < nkp)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(Pb + i * ldS + j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(S + i * ldS + j)));
  }
}

// ---- bf16 micro-kernels (vdpbf16ps: acc += a.lo * b.lo + a.hi * b.hi per fp32 lane)
// S[i][jS + 16v] = sum_p qpair[i][p] . Kp[p][j + 16v]
template <int NV>
CCTK_AVX512BF16 inline void s_tile_bf16(const uint32_t* qb, int64_t DP2, const uint32_t* Kp, int64_t TP, int64_t j,
                                        float* S, int64_t ldS, int64_t jS, int64_t valid, float* rmax, float* rmin) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < DP2; ++p) {
    __m512i w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(Kp + p * TP + j + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_set1_epi32(static_cast<int32_t>(qb[i * DP2 + p]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)xv, (__m512bh)w[v]);
    }
  }
  track_extremes<NV>(acc, valid, rmax, rmin);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(S + i * ldS + jS + 16 * v, acc[i][v]);
}

// O[i][dc + 16v] = O * alpha + sum_r Ppair[i][r] . Vp[r][dc + 16v]   (r < nkp / 2)
template <int NV>
CCTK_AVX512BF16 inline void o_tile_bf16(const uint16_t* Pb, int64_t ldP, int64_t nkp, const uint32_t* Vp, int64_t DP,
                                        int64_t dc, const float* alpha, float* O) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const __m512 a = _mm512_set1_ps(alpha[i]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_mul_ps(_mm512_loadu_ps(O + i * DP + dc + 16 * v), a);
  }
  for (int64_t r = 0; r < nkp / 2; ++r) {
    __m512i w[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(Vp + r * DP + dc + 16 * v);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      int32_t pair;
      std::memcpy(&pair, Pb + i * ldP + 2 * r, sizeof(pair));
      const __m512i pv = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)pv, (__m512bh)w[v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(O + i * DP + dc + 16 * v, acc[i][v]);
}

// Call F<NV> for column chunks of up to 16 * NVMAX (NV = 1..NVMAX vectors of 16) covering [0, n).
template <typename F>
CCTK_AVX512 inline void for_chunks(int64_t n, F&& f) {
  int64_t c = 0;
  for (; c + 16 * NVMAX <= n; c += 16 * NVMAX) f(std::integral_constant<int, NVMAX>{}, c);
  const int64_t rest = (n - c) / 16;
  if (rest == 3) f(std::integral_constant<int, 3>{}, c);
  else if (rest == 2) f(std::integral_constant<int, 2>{}, c);
  else if (rest == 1) f(std::integral_constant<int, 1>{}, c);
}

// Per-thread scratch, reused across a thread's units.
struct Scratch {
  std::vector<float> kf, vf, q, S, O;  // fp32 path (kf/vf also hold packed bf16 pairs as bytes)
  std::vector<uint16_t> Pb;
  float m[MR], l[MR], alpha[MR];
  float rmax[16 * MR], rmin[16 * MR];
};

// Store o rows (fp32 O / l) into the (B, Tq, H, D) output, 16 head dims per step.
CCTK_AVX512 inline void store_rows_f32(const Attn& a, const Scratch& sc, int64_t b, int64_t h, int64_t i0,
                                       int64_t rows, float* o) {
  for (int64_t i = 0; i < rows; ++i) {
    float* oi = o + ((b * a.Tq + i0 + i) * a.H + h) * a.D;
    const __m512 inv = _mm512_set1_ps(1.f / sc.l[i]);
    const float* Oi = sc.O.data() + i * a.DP;
    for (int64_t d = 0; d < a.D; d += 16)
      _mm512_mask_storeu_ps(oi + d, tail_mask(a.D - d), _mm512_mul_ps(_mm512_loadu_ps(Oi + d), inv));
  }
}

CCTK_AVX512BF16 inline void store_rows_bf16(const Attn& a, const Scratch& sc, int64_t b, int64_t h, int64_t i0,
                                            int64_t rows, uint16_t* o) {
  for (int64_t i = 0; i < rows; ++i) {
    uint16_t* oi = o + ((b * a.Tq + i0 + i) * a.H + h) * a.D;
    const __m512 inv = _mm512_set1_ps(1.f / sc.l[i]);
    const float* Oi = sc.O.data() + i * a.DP;
    for (int64_t d = 0; d < a.D; d += 16)
      _mm256_mask_storeu_epi16(oi + d, tail_mask(a.D - d),
                               (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(Oi + d), inv)));
  }
}

CCTK_AVX512 void attention_f32_avx512(const Attn& a, const float* q, const float* k, const float* v, float* o,
                                      int64_t tiles_per_unit) {
  const int64_t n_tiles = cdiv(a.Tq, MR);
  const int64_t upq = cdiv(n_tiles, tiles_per_unit);
  const float c = static_cast<float>(a.scale * 1.4426950408889634);
  const int64_t DP = a.DP, TP = a.TP;
  at::parallel_for(0, a.B * a.H * upq, 1, [&](int64_t u0, int64_t u1) {
    Scratch sc;
    sc.kf.assign(DP * TP, 0.f);
    sc.vf.assign(TP * DP, 0.f);
    sc.q.assign(MR * DP, 0.f);
    sc.S.assign(MR * KB, 0.f);
    sc.O.assign(MR * DP, 0.f);
    int64_t packed = -1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / upq, tu = u % upq, b = bh / a.H, h = bh % a.H;
      if (packed != bh) {  // pack this head's K^T and V (zero padding stays zero)
        const float* kh = k + b * a.ks[0] + h * a.ks[1];
        const float* vh = v + b * a.vs[0] + h * a.vs[1];
        pack_transpose_u32(reinterpret_cast<const uint32_t*>(kh), a.ks[2], a.Tk, a.D,
                           reinterpret_cast<uint32_t*>(sc.kf.data()), TP);
        for (int64_t j = 0; j < a.Tk; ++j) std::memcpy(sc.vf.data() + j * DP, vh + j * a.vs[2], a.D * sizeof(float));
        packed = bh;
      }
      const float* qh = q + b * a.qs[0] + h * a.qs[1];
      const int64_t t0 = tu * tiles_per_unit, t1 = std::min(n_tiles, t0 + tiles_per_unit);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = t * MR, rows = std::min<int64_t>(MR, a.Tq - i0);
        for (int64_t i = 0; i < MR; ++i) {
          if (i < rows) std::memcpy(sc.q.data() + i * DP, qh + (i0 + i) * a.qs[2], a.D * sizeof(float));
          else std::fill_n(sc.q.data() + i * DP, a.D, 0.f);
          sc.m[i] = -std::numeric_limits<float>::infinity();
          sc.l[i] = 0.f;
        }
        std::fill(sc.O.begin(), sc.O.end(), 0.f);
        for (int64_t j0 = 0; j0 < a.Tk; j0 += KB) {
          const int64_t nk = std::min(KB, a.Tk - j0), nkp = round_up(nk, 16);
          reset_extremes(sc.rmax, sc.rmin);
          for_chunks(nkp, [&](auto nv, int64_t jc) {
            s_tile_f32<decltype(nv)::value>(sc.q.data(), DP, sc.kf.data(), TP, j0 + jc, sc.S.data(), KB, jc, nk - jc,
                                            sc.rmax, sc.rmin);
          });
          softmax_block<7>(sc.S.data(), KB, nk, nkp, c, sc.rmax, sc.rmin, sc.m, sc.l, sc.alpha);
          for_chunks(DP, [&](auto nv, int64_t dc) {
            o_tile_f32<decltype(nv)::value>(sc.S.data(), KB, nkp, sc.vf.data() + j0 * DP, DP, dc, sc.alpha,
                                            sc.O.data());
          });
        }
        store_rows_f32(a, sc, b, h, i0, rows, o);
      }
    }
  });
}

CCTK_AVX512BF16 void attention_bf16_avx512(const Attn& a, const uint16_t* q, const uint16_t* k, const uint16_t* v,
                                           uint16_t* o, int64_t tiles_per_unit) {
  const int64_t n_tiles = cdiv(a.Tq, MR);
  const int64_t upq = cdiv(n_tiles, tiles_per_unit);
  const float c = static_cast<float>(a.scale * 1.4426950408889634);
  const int64_t DP = a.DP, TP = a.TP, DP2 = a.DP / 2;
  at::parallel_for(0, a.B * a.H * upq, 1, [&](int64_t u0, int64_t u1) {
    Scratch sc;
    // packed pairs: Kp (DP/2 x TP) uint32, Vp (TP/2 x DP) uint32; stored in float vectors
    sc.kf.assign(DP2 * TP, 0.f);
    sc.vf.assign((TP / 2) * DP, 0.f);
    sc.q.assign(MR * DP2, 0.f);
    sc.S.assign(MR * KB, 0.f);
    sc.O.assign(MR * DP, 0.f);
    sc.Pb.assign(MR * KB, 0);
    uint32_t* Kp = reinterpret_cast<uint32_t*>(sc.kf.data());
    uint32_t* Vp = reinterpret_cast<uint32_t*>(sc.vf.data());
    uint32_t* qb = reinterpret_cast<uint32_t*>(sc.q.data());
    int64_t packed = -1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / upq, tu = u % upq, b = bh / a.H, h = bh % a.H;
      if (packed != bh) {
        const uint16_t* kh = k + b * a.ks[0] + h * a.ks[1];
        const uint16_t* vh = v + b * a.vs[0] + h * a.vs[1];
        if (a.D % 2 == 0 && a.ks[2] % 2 == 0) {  // K pairs along d: 32-bit elements of k rows
          pack_transpose_u32(reinterpret_cast<const uint32_t*>(kh), a.ks[2] / 2, a.Tk, a.D / 2, Kp, TP);
        } else {
          const int64_t D2 = a.D / 2;
          for (int64_t j = 0; j < a.Tk; ++j) {
            const uint16_t* kj = kh + j * a.ks[2];
            for (int64_t p = 0; p < D2; ++p) Kp[p * TP + j] = kj[2 * p] | (static_cast<uint32_t>(kj[2 * p + 1]) << 16);
            Kp[D2 * TP + j] = kj[a.D - 1];
          }
        }
        pack_v_pairs(vh, a.vs[2], a.Tk, a.D, Vp, DP);
        packed = bh;
      }
      const uint16_t* qh = q + b * a.qs[0] + h * a.qs[1];
      const int64_t t0 = tu * tiles_per_unit, t1 = std::min(n_tiles, t0 + tiles_per_unit);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = t * MR, rows = std::min<int64_t>(MR, a.Tq - i0);
        std::fill_n(qb, MR * DP2, 0u);
        for (int64_t i = 0; i < MR; ++i) {
          if (i < rows) std::memcpy(qb + i * DP2, qh + (i0 + i) * a.qs[2], a.D * sizeof(uint16_t));
          sc.m[i] = -std::numeric_limits<float>::infinity();
          sc.l[i] = 0.f;
        }
        std::fill(sc.O.begin(), sc.O.end(), 0.f);
        for (int64_t j0 = 0; j0 < a.Tk; j0 += KB) {
          const int64_t nk = std::min(KB, a.Tk - j0), nkp = round_up(nk, 16);
          reset_extremes(sc.rmax, sc.rmin);
          for_chunks(nkp, [&](auto nv, int64_t jc) {
            s_tile_bf16<decltype(nv)::value>(qb, DP2, Kp, TP, j0 + jc, sc.S.data(), KB, jc, nk - jc, sc.rmax,
                                             sc.rmin);
          });
          softmax_block<5>(sc.S.data(), KB, nk, nkp, c, sc.rmax, sc.rmin, sc.m, sc.l, sc.alpha);
          p_to_bf16(sc.S.data(), KB, nkp, sc.Pb.data());
          for_chunks(DP, [&](auto nv, int64_t dc) {
            o_tile_bf16<decltype(nv)::value>(sc.Pb.data(), KB, nkp, Vp + (j0 / 2) * DP, DP, dc, sc.alpha,
                                             sc.O.data());
          });
        }
        store_rows_bf16(a, sc, b, h, i0, rows, o);
      }
    }
  });
}
#endif  // CCTK_X86

// ------------------------------------------------------------------------------------------
// AMX bf16 attention, one body over a tile backend (csrc/cpu/amx_tiles.h: the hardware, or the
// scalar emulator tests run on any CPU). A unit packs its head's K and V once, zero-padded:
//   Kp[p][j] = (k[j, 2p], k[j, 2p+1])   p < DA/2 (DA = D rounded up to 32), j < TP32 (keys rounded
//                                        up to 32): each 16 x 16 block is a B tile of S = Q K^T
//   Vp[r][d] = (v[2r, d], v[2r+1, d])   r < TP32/2, d < DA: each 16 x 16 block is a B tile of P V
// and walks its query tiles of 16 rows (one A tile per 32 head dims, from a zero-padded copy).
// Per key block of up to KB keys: S tiles (16 queries x 16 keys, C tiles 0-3, four at a time) ->
// fp32 scratch; the online softmax (base 2, as the AVX-512 kernel) rescales O and writes P as bf16
// (zero beyond the last key); O (16 x DA fp32, scratch) is loaded into C tiles four at a time
// (64 head dims), accumulates P V over 32-key A tiles of P, and is stored back. o = O / l.
struct TileAttnScratch {
  std::vector<uint32_t> Kp, Vp, qb;
  std::vector<float> S, O;
  std::vector<uint16_t> Pb;
  float m[16], l[16], alpha[16];
};

tiles::TileConfig attn_tile_config() {
  tiles::TileConfig c;
  for (int t = 0; t < 8; ++t) c.set(t, 16, 64);  // C: 16 x 16 fp32; A: 16 x 32 bf16; B: 16 pairs x 16
  return c;
}

// One query tile's softmax over keys [0, nk) of S (16 x ldS fp32), c = scale * log2(e).
template <bool HW>
inline void tile_softmax(TileAttnScratch& sc, int64_t ldS, int64_t nk, int64_t nk32, float c, int64_t DA);

template <>
inline void tile_softmax<false>(TileAttnScratch& sc, int64_t ldS, int64_t nk, int64_t nk32, float c, int64_t DA) {
  for (int i = 0; i < 16; ++i) {
    float* s = sc.S.data() + i * ldS;
    float mx = sc.m[i];
    for (int64_t j = 0; j < nk; ++j) mx = std::max(mx, s[j] * c);
    const float alpha = std::exp2(sc.m[i] - mx);  // m = -inf at the first block: alpha = 0
    float sum = 0.f;
    uint16_t* p = sc.Pb.data() + i * ldS;
    for (int64_t j = 0; j < nk32; ++j) {
      const float e = j < nk ? std::exp2(s[j] * c - mx) : 0.f;
      sum += e;
      p[j] = tiles::float_to_bf16_bits(e);
    }
    sc.l[i] = sc.l[i] * alpha + sum;
    sc.m[i] = mx;
    float* Oi = sc.O.data() + i * DA;
    for (int64_t d = 0; d < DA; ++d) Oi[d] *= alpha;
  }
}

#ifdef CCTK_X86
template <>
CCTK_AVX512BF16 inline void tile_softmax<true>(TileAttnScratch& sc, int64_t ldS, int64_t nk, int64_t nk32, float c,
                                               int64_t DA) {
  const __m512 vc = _mm512_set1_ps(c);
  for (int i = 0; i < 16; ++i) {
    float* s = sc.S.data() + i * ldS;
    __m512 vmax = _mm512_set1_ps(sc.m[i]);
    for (int64_t j = 0; j < nk; j += 16)
      vmax = _mm512_max_ps(vmax, _mm512_mask_mul_ps(vmax, tail_mask(nk - j), _mm512_loadu_ps(s + j), vc));
    const float mx = _mm512_reduce_max_ps(vmax);
    const float alpha = std::exp2(sc.m[i] - mx);
    const __m512 vm = _mm512_set1_ps(mx);
    __m512 vsum = _mm512_setzero_ps();
    uint16_t* p = sc.Pb.data() + i * ldS;
    for (int64_t j = 0; j < nk32; j += 16) {
      const __mmask16 km = tail_mask(nk - j);
      const __m512 e = _mm512_maskz_mov_ps(km, exp2_ps<5, false>(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vc, vm)));
      vsum = _mm512_add_ps(vsum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    sc.l[i] = sc.l[i] * alpha + _mm512_reduce_add_ps(vsum);
    sc.m[i] = mx;
    float* Oi = sc.O.data() + i * DA;
    const __m512 va = _mm512_set1_ps(alpha);
    for (int64_t d = 0; d < DA; d += 16) _mm512_storeu_ps(Oi + d, _mm512_mul_ps(_mm512_loadu_ps(Oi + d), va));
  }
}
#endif

template <typename Tiles>
void attention_bf16_tiles(const Attn& a, const uint16_t* q, const uint16_t* k, const uint16_t* v, uint16_t* o,
                          int64_t tiles_per_unit) {
  constexpr int64_t QR = 16;  // query rows per tile
  const int64_t n_tiles = cdiv(a.Tq, QR);
  const int64_t upq = cdiv(n_tiles, tiles_per_unit);
  const float c = static_cast<float>(a.scale * 1.4426950408889634);
  const int64_t DA = round_up(a.D, 32), TP32 = round_up(a.Tk, 32), KB2 = round_up(std::min(KB, TP32), 32);
  const tiles::TileConfig cfg = attn_tile_config();
  at::parallel_for(0, a.B * a.H * upq, 1, [&](int64_t u0, int64_t u1) {
    tiles::TileScope<Tiles> scope(cfg);
    TileAttnScratch sc;
    sc.Kp.assign((DA / 2) * TP32, 0u);
    sc.Vp.assign((TP32 / 2) * DA, 0u);
    sc.qb.assign(QR * DA / 2, 0u);
    sc.S.assign(QR * KB2, 0.f);
    sc.Pb.assign(QR * KB2, 0);
    sc.O.assign(QR * DA, 0.f);
    int64_t packed = -1;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t bh = u / upq, tu = u % upq, b = bh / a.H, h = bh % a.H;
      if (packed != bh) {  // pad entries stay zero: only [0, Tk) x [0, D) is ever written
        const uint16_t* kh = k + b * a.ks[0] + h * a.ks[1];
        const uint16_t* vh = v + b * a.vs[0] + h * a.vs[1];
        for (int64_t j = 0; j < a.Tk; ++j) {
          const uint16_t* kj = kh + j * a.ks[2];
          for (int64_t d = 0; d < a.D; ++d) {
            uint32_t& w = sc.Kp[(d / 2) * TP32 + j];
            w = (d & 1) ? ((w & 0xFFFFu) | (static_cast<uint32_t>(kj[d]) << 16)) : ((w & 0xFFFF0000u) | kj[d]);
          }
          const uint16_t* vj = vh + j * a.vs[2];
          uint32_t* vr = sc.Vp.data() + (j / 2) * DA;
          for (int64_t d = 0; d < a.D; ++d)
            vr[d] = (j & 1) ? ((vr[d] & 0xFFFFu) | (static_cast<uint32_t>(vj[d]) << 16)) : ((vr[d] & 0xFFFF0000u) | vj[d]);
        }
        packed = bh;
      }
      const uint16_t* qh = q + b * a.qs[0] + h * a.qs[1];
      const int64_t t0 = tu * tiles_per_unit, t1 = std::min(n_tiles, t0 + tiles_per_unit);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t i0 = t * QR, rows = std::min<int64_t>(QR, a.Tq - i0);
        std::fill(sc.qb.begin(), sc.qb.end(), 0u);
        for (int64_t i = 0; i < rows; ++i)
          std::memcpy(sc.qb.data() + i * (DA / 2), qh + (i0 + i) * a.qs[2], a.D * sizeof(uint16_t));
        for (int i = 0; i < 16; ++i) sc.m[i] = -std::numeric_limits<float>::infinity(), sc.l[i] = 0.f;
        std::fill(sc.O.begin(), sc.O.end(), 0.f);
        for (int64_t j0 = 0; j0 < a.Tk; j0 += KB) {
          const int64_t nk = std::min(KB, a.Tk - j0), nk32 = round_up(nk, 32);
          // S = Q K^T for keys [j0, j0 + nk32), four 16-key C tiles at a time
          for (int64_t jc = 0; jc < nk32; jc += 64) {
            const int nt = static_cast<int>(std::min<int64_t>(4, (nk32 - jc) / 16));
            Tiles::template zero<0>();
            Tiles::template zero<1>();
            if (nt > 2) Tiles::template zero<2>();
            if (nt > 3) Tiles::template zero<3>();
            for (int64_t d0 = 0; d0 < DA; d0 += 32) {
              Tiles::template load<4>(sc.qb.data() + d0 / 2, DA * 2);
              const uint32_t* kb = sc.Kp.data() + (d0 / 2) * TP32 + j0 + jc;
              Tiles::template load<6>(kb, TP32 * 4);
              Tiles::template dpbf16<0, 4, 6>();
              Tiles::template load<7>(kb + 16, TP32 * 4);
              Tiles::template dpbf16<1, 4, 7>();
              if (nt > 2) {
                Tiles::template load<6>(kb + 32, TP32 * 4);
                Tiles::template dpbf16<2, 4, 6>();
              }
              if (nt > 3) {
                Tiles::template load<7>(kb + 48, TP32 * 4);
                Tiles::template dpbf16<3, 4, 7>();
              }
            }
            float* sb = sc.S.data() + jc;
            Tiles::template store<0>(sb, KB2 * 4);
            Tiles::template store<1>(sb + 16, KB2 * 4);
            if (nt > 2) Tiles::template store<2>(sb + 32, KB2 * 4);
            if (nt > 3) Tiles::template store<3>(sb + 48, KB2 * 4);
          }
          tile_softmax<Tiles::kHardware>(sc, KB2, nk, nk32, c, DA);
          // O += P V, 64 head dims (four C tiles) at a time, 32 keys per A tile of P
          for (int64_t dc = 0; dc < DA; dc += 64) {
            const int nt = static_cast<int>(std::min<int64_t>(4, (DA - dc) / 16));
            float* ob = sc.O.data() + dc;
            Tiles::template load<0>(ob, DA * 4);
            Tiles::template load<1>(ob + 16, DA * 4);
            if (nt > 2) Tiles::template load<2>(ob + 32, DA * 4);
            if (nt > 3) Tiles::template load<3>(ob + 48, DA * 4);
            for (int64_t kk = 0; kk < nk32; kk += 32) {
              Tiles::template load<5>(sc.Pb.data() + kk, KB2 * 2);
              const uint32_t* vb = sc.Vp.data() + ((j0 + kk) / 2) * DA + dc;
              Tiles::template load<6>(vb, DA * 4);
              Tiles::template dpbf16<0, 5, 6>();
              Tiles::template load<7>(vb + 16, DA * 4);
              Tiles::template dpbf16<1, 5, 7>();
              if (nt > 2) {
                Tiles::template load<6>(vb + 32, DA * 4);
                Tiles::template dpbf16<2, 5, 6>();
              }
              if (nt > 3) {
                Tiles::template load<7>(vb + 48, DA * 4);
                Tiles::template dpbf16<3, 5, 7>();
              }
            }
            Tiles::template store<0>(ob, DA * 4);
            Tiles::template store<1>(ob + 16, DA * 4);
            if (nt > 2) Tiles::template store<2>(ob + 32, DA * 4);
            if (nt > 3) Tiles::template store<3>(ob + 48, DA * 4);
          }
        }
        for (int64_t i = 0; i < rows; ++i) {
          uint16_t* oi = o + ((b * a.Tq + i0 + i) * a.H + h) * a.D;
          const float inv = 1.f / sc.l[i];
          const float* Oi = sc.O.data() + i * DA;
          for (int64_t d = 0; d < a.D; ++d) oi[d] = tiles::float_to_bf16_bits(Oi[d] * inv);
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
at::Tensor unit_last_stride(const at::Tensor& t) { return t.stride(3) == 1 || t.size(3) == 1 ? t : t.contiguous(); }

at::Tensor attention_cpu(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                         c10::optional<double> scale) {
  const char* op = "cctk::attention";
  TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4, op, ": q, k, v must be 4-D (B, H, T, D), got ",
              q_.sizes(), ", ", k_.sizes(), ", ", v_.sizes());
  TORCH_CHECK(q_.device().is_cpu() && k_.device().is_cpu() && v_.device().is_cpu(), op,
              ": tensors must be on the CPU");
  TORCH_CHECK(q_.scalar_type() == k_.scalar_type() && q_.scalar_type() == v_.scalar_type(), op,
              ": q, k, v must share one dtype, got ", q_.scalar_type(), ", ", k_.scalar_type(), ", ",
              v_.scalar_type());
  TORCH_CHECK(at::isFloatingType(q_.scalar_type()), op, ": floating-point tensors expected, got ",
              q_.scalar_type());
  TORCH_CHECK(k_.sizes() == v_.sizes(), op, ": k and v must have the same shape, got ", k_.sizes(), " and ",
              v_.sizes());
  TORCH_CHECK(q_.size(0) == k_.size(0) && q_.size(1) == k_.size(1) && q_.size(3) == k_.size(3), op,
              ": q (B, H, Tq, D) and k (B, H, Tk, D) disagree: ", q_.sizes(), " vs ", k_.sizes());
  const int64_t B = q_.size(0), H = q_.size(1), Tq = q_.size(2), Tk = k_.size(2), D = q_.size(3);
  TORCH_CHECK(D >= 1, op, ": head dim must be positive");
  TORCH_CHECK(Tk >= 1 || Tq == 0, op, ": k and v need at least one token");
  auto out = at::empty({B, Tq, H, D}, q_.options());
  if (B == 0 || H == 0 || Tq == 0) return out.permute({0, 2, 1, 3});
  auto q = unit_last_stride(q_), k = unit_last_stride(k_), v = unit_last_stride(v_);
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(double(D));
  Attn a{B, H, Tq, Tk, D, round_up(D, 16), round_up(Tk, 16), sc,
         {q.stride(0), q.stride(1), q.stride(2)}, {k.stride(0), k.stride(1), k.stride(2)},
         {v.stride(0), v.stride(1), v.stride(2)}};
  const auto st = q.scalar_type();
  const Capability cap = cpu::detect();
#ifdef CCTK_X86
  // units: (b, h, group of query tiles); enough of them for every thread, packing amortised
  const int64_t n_tiles = cdiv(Tq, MR);
  // one unit per head (each head's K/V packed once) when the heads already split evenly over the
  // threads or are plentiful; else split heads into query-tile groups (each group packs again)
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const bool per_head = (B * H) % threads == 0 || B * H >= 4 * threads;
  const int64_t groups = per_head ? 1 : std::max<int64_t>(1, std::min<int64_t>(n_tiles, cdiv(4 * threads, B * H)));
  const int64_t tiles_per_unit = cdiv(n_tiles, groups);
  if (D <= 256 && st == at::kBFloat16 && cpu::use_tiles()) {
    const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
    const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
    const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
    auto* op_ = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    const int64_t tiles16 = cdiv(Tq, 16);
    const int64_t tpu = cdiv(tiles16, per_head ? 1 : std::max<int64_t>(1, std::min<int64_t>(tiles16, cdiv(4 * threads, B * H))));
#if defined(__linux__)
    if (cap >= Capability::AMX) attention_bf16_tiles<tiles::AmxTiles>(a, qp, kp, vp, op_, tpu);
    else
#endif
      attention_bf16_tiles<tiles::EmulatedTiles>(a, qp, kp, vp, op_, tpu);
    return out.permute({0, 2, 1, 3});
  }
  if (D <= 256 && st == at::kBFloat16 && cap >= Capability::AVX512_BF16) {
    attention_bf16_avx512(a, reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>()),
                          reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>()),
                          reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>()),
                          reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), tiles_per_unit);
    return out.permute({0, 2, 1, 3});
  }
  if (D <= 256 && (st == at::kFloat || st == at::kBFloat16) && cap >= Capability::AVX512) {
    if (st == at::kFloat) {
      attention_f32_avx512(a, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
                           tiles_per_unit);
      return out.permute({0, 2, 1, 3});
    }
    // bf16 without AVX512-BF16: compute in fp32, round once
    auto q32 = q.to(at::kFloat).contiguous(), k32 = k.to(at::kFloat).contiguous(), v32 = v.to(at::kFloat).contiguous();
    Attn a32 = a;
    for (int i = 0; i < 3; ++i) a32.qs[i] = q32.stride(i), a32.ks[i] = k32.stride(i), a32.vs[i] = v32.stride(i);
    auto out32 = at::empty({B, Tq, H, D}, q.options().dtype(at::kFloat));
    attention_f32_avx512(a32, q32.data_ptr<float>(), k32.data_ptr<float>(), v32.data_ptr<float>(),
                         out32.data_ptr<float>(), tiles_per_unit);
    out.copy_(out32);
    return out.permute({0, 2, 1, 3});
  }
#endif
  (void)cap;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "attention_cpu", [&] {
    attention_scalar<scalar_t>(a, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>());
  });
  return out.permute({0, 2, 1, 3});
}

}  // namespace

TORCH_LIBRARY_IMPL(cctk, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace cctk
