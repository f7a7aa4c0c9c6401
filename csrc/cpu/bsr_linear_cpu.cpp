// CPU kernels of the block-sparse linear ops (cctk::bsr_linear, cctk::bsr_linear_backward_input,
// cctk::bsr_linear_backward_weight); layout and schemas in cctk/ops/bsr_linear.py.
//
// The forward and the input gradient are the same block-sparse GEMM
//
//     out[m, ob*B + o] = bias[ob*B + o] + sum_{e in ptr[ob] .. ptr[ob+1]} sum_k in[m, idx[e]*B + k] * P_e[k, o]
//
// with (ptr, idx, P_e) = (crow, col, values[e]^T) for the forward and (ccol, row, values[perm[e]])
// for the input gradient. The kernel packs P_e contiguously in the order it reads them (k-major,
// o contiguous: one or more vector loads per k), keeps an (MR tokens x B outputs) accumulator tile
// in registers while it streams every kept input block of the output block-row, and broadcasts
// one input value per token per k (broadcast-FMA; for bf16, a pair of k per dpbf16 step).
// Work is split over token tiles (at::parallel_for); within a group of tiles the loop runs over
// output block-rows so one block-row's packed weights stay in L1 while the group's tokens
// (L2) stream through them. Empty block-rows cost nothing but the bias store; empty block-cols
// are never read.
//
// The weight gradient dV[i][a, b] = sum_m grad_out[m, r_i*B + a] * x[m, c_i*B + b] splits
// (kept block, tile of a) units over the threads once; each thread walks the tokens in chunks
// (so a chunk stays in cache across its units) with the accumulators in registers over a chunk.
//
// Outputs of at least CCTK_BSR_STREAM bytes (env, default 4 MiB: larger than the L2s, so the
// output leaves the cache anyway) are written with non-temporal stores, which skip the
// read-for-ownership of every output line.
//
// Code paths (csrc/cpu/cpu_features.h, env CCTK_CPU_CAPABILITY caps them): AVX-512 (fp32; bf16
// by fp32 conversion), AVX-512-BF16 (bf16 via _mm512_dpbf16_ps), AVX2+FMA (fp32; bf16 by
// conversion), and a portable scalar loop for every dtype (float64 and float16 always use it).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/amx_tiles.h"
#include "cpu/cpu_features.h"
#include "cpu/vec_math.h"

namespace cctk {
namespace {

using cpu::Capability;

// ------------------------------------------------------------------------------------------
// Problem description shared by the forward and the input gradient.
struct BsrGemm {
  int64_t M;            // tokens
  int64_t in_cols;      // columns of `in` (its row stride)
  int64_t out_cols;     // columns of `out` (its row stride)
  int64_t B;            // block size
  int64_t n_out_blocks; // ceil(out_cols / B)
  const int32_t* ptr;   // n_out_blocks + 1
  const int32_t* idx;   // input block of each entry
  bool stream_out;      // large output: write it with non-temporal stores (no read-for-ownership)
  bool gelu = false;    // epilogue: out = GELU_erf(acc) (before the residual)
  const void* residual = nullptr;  // epilogue: out += residual[m, :] (same dtype and shape as out)
};

// Epilogue of one output vector: GELU then residual (nullptr: none).
#ifdef CCTK_X86
CCTK_AVX512 inline __m512 epilogue_f32(const BsrGemm& g, __m512 acc, const float* res, __mmask16 m) {
  if (g.gelu) acc = vec::gelu_erf_ps<true>(acc);
  if (res) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(m, res));
  return acc;
}
CCTK_AVX512 inline __m512 epilogue_bf16(const BsrGemm& g, __m512 acc, const uint16_t* res, __mmask16 m) {
  if (g.gelu) acc = vec::gelu_erf_ps<false>(acc);
  if (res) acc = _mm512_add_ps(acc, vec::bf16_to_ps(_mm256_maskz_loadu_epi16(m, res)));
  return acc;
}
#endif

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------
// Portable scalar path, every dtype. P is the packed (acc_t) weight: P[e][k][o].
template <typename T, typename acc_t>
void gemm_scalar(const BsrGemm& g, const T* in, const acc_t* P, const T* bias, T* out) {
  const int64_t B = g.B;
  at::parallel_for(0, g.M, 16, [&](int64_t m0, int64_t m1) {
    std::vector<acc_t> acc(B);
    for (int64_t m = m0; m < m1; ++m) {
      const T* xr = in + m * g.in_cols;
      for (int64_t ob = 0; ob < g.n_out_blocks; ++ob) {
        const int64_t ow = std::min(B, g.out_cols - ob * B);
        for (int64_t o = 0; o < ow; ++o) acc[o] = bias ? static_cast<acc_t>(bias[ob * B + o]) : acc_t(0);
        for (int64_t e = g.ptr[ob]; e < g.ptr[ob + 1]; ++e) {
          const int64_t c = g.idx[e];
          const int64_t kv = std::min(B, g.in_cols - c * B);
          const acc_t* pe = P + e * B * B;
          for (int64_t k = 0; k < kv; ++k) {
            const acc_t xv = static_cast<acc_t>(xr[c * B + k]);
            const acc_t* pk = pe + k * B;
            for (int64_t o = 0; o < ow; ++o) acc[o] += xv * pk[o];
          }
        }
        T* orow = out + m * g.out_cols + ob * B;
        for (int64_t o = 0; o < ow; ++o) orow[o] = static_cast<T>(acc[o]);
      }
    }
  });
}

// Pack P[e][k][o] (acc_t) from values (nnz, B, B) for the forward (transpose: P_e = values[e]^T)
// or the input gradient (gather: P_e = values[perm[e]]).
template <typename T, typename acc_t>
void pack_blocks(const T* values, const int32_t* perm, int64_t nnz, int64_t B, bool transpose, acc_t* P) {
  // grain: up to 256 K elements per task, so CCT-sized weights pack without a parallel region
  at::parallel_for(0, nnz, std::max<int64_t>(1, (int64_t(1) << 18) / (B * B)), [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const T* v = values + (perm ? static_cast<int64_t>(perm[e]) : e) * B * B;
      acc_t* p = P + e * B * B;
      if (transpose) {
        for (int64_t k = 0; k < B; ++k)
          for (int64_t o = 0; o < B; ++o) p[k * B + o] = static_cast<acc_t>(v[o * B + k]);
      } else {
        for (int64_t i = 0; i < B * B; ++i) p[i] = static_cast<acc_t>(v[i]);
      }
    }
  });
}

// bf16 pair packing for dpbf16: P2[e][kp][o] = (W(2kp, o) lo, W(2kp+1, o) hi), W(k, o) = v[o][k]
// (transpose) or v[k][o].
void pack_blocks_bf16_pairs(const at::BFloat16* values, const int32_t* perm, int64_t nnz, int64_t B,
                            bool transpose, uint32_t* P2) {
  at::parallel_for(0, nnz, std::max<int64_t>(1, (int64_t(1) << 18) / (B * B)), [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const uint16_t* v = reinterpret_cast<const uint16_t*>(values) + (perm ? static_cast<int64_t>(perm[e]) : e) * B * B;
      uint32_t* p = P2 + e * (B / 2) * B;
      if (transpose) {  // W(k, o) = v[o][k]: the pair (k, k+1) of row o is one uint32 of v
        uint32_t row_pairs[64 * 32];
        std::memcpy(row_pairs, v, B * B * sizeof(uint16_t));
        for (int64_t o = 0; o < B; ++o)
          for (int64_t kp = 0; kp < B / 2; ++kp) p[kp * B + o] = row_pairs[o * (B / 2) + kp];
        continue;
      }
      for (int64_t kp = 0; kp < B / 2; ++kp)
        for (int64_t o = 0; o < B; ++o) {
          const int64_t k = 2 * kp;
          const uint32_t lo = transpose ? v[o * B + k] : v[k * B + o];
          const uint32_t hi = transpose ? v[o * B + k + 1] : v[(k + 1) * B + o];
          p[kp * B + o] = lo | (hi << 16);
        }
    }
  });
}

#ifdef CCTK_X86
// ------------------------------------------------------------------------------------------
// AVX-512 fp32 micro-kernel: MR tokens x B (= 16*NV) outputs of one output block-row.
template <int MR, int NV>
CCTK_AVX512 inline void mk_f32_avx512(const BsrGemm& g, const float* x, const float* P, const float* bias,
                                      int64_t ob, float* out, const float* res) {
  constexpr int64_t B = 16 * NV;
  const int64_t ldx = g.in_cols, ldo = g.out_cols;
  const int64_t ow = std::min(B, g.out_cols - ob * B);
  __mmask16 msk[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, ow - 16 * v));
    msk[v] = static_cast<__mmask16>(n >= 16 ? 0xFFFF : ((1u << n) - 1));
  }
  __m512 acc[MR][NV];
  __m512 b0[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) b0[v] = bias ? _mm512_maskz_loadu_ps(msk[v], bias + ob * B + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = b0[v];
  const int32_t e0 = g.ptr[ob], e1 = g.ptr[ob + 1];
  for (int32_t e = e0; e < e1; ++e) {
    const int64_t c = g.idx[e];
    const float* xb = x + c * B;
    const float* pe = P + static_cast<int64_t>(e) * B * B;
    const int64_t kv = std::min(B, g.in_cols - c * B);
    for (int64_t k = 0; k < kv; ++k) {
      __m512 w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(pe + k * B + 16 * v);
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_set1_ps(xb[i * ldx + k]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xv, w[v], acc[i][v]);
      }
    }
  }
  if (g.gelu || res) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[i][v] = epilogue_f32(g, acc[i][v], res ? res + i * ldo + ob * B + 16 * v : nullptr, msk[v]);
  }
  if (g.stream_out && ow == B && ((reinterpret_cast<uintptr_t>(out + ob * B) | (ldo * 4)) & 63) == 0) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm512_stream_ps(out + i * ldo + ob * B + 16 * v, acc[i][v]);
    return;
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(out + i * ldo + ob * B + 16 * v, msk[v], acc[i][v]);
}

// AVX-512-BF16 micro-kernel: x and out bf16, P2 packed pairs, fp32 accumulators.
template <int MR, int NV>
CCTK_AVX512BF16 inline void mk_bf16_avx512(const BsrGemm& g, const uint16_t* x, const uint32_t* P2,
                                           const uint16_t* bias, int64_t ob, uint16_t* out, const uint16_t* res) {
  constexpr int64_t B = 16 * NV;
  const int64_t ldx = g.in_cols, ldo = g.out_cols;
  const int64_t ow = std::min(B, g.out_cols - ob * B);
  __mmask16 msk[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, ow - 16 * v));
    msk[v] = static_cast<__mmask16>(n >= 16 ? 0xFFFF : ((1u << n) - 1));
  }
  __m512 acc[MR][NV];
  __m512 b0[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    if (bias) {
      const __m256i bb = _mm256_maskz_loadu_epi16(msk[v], bias + ob * B + 16 * v);
      b0[v] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bb), 16));
    } else {
      b0[v] = _mm512_setzero_ps();
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[i][v] = b0[v];
  const int32_t e0 = g.ptr[ob], e1 = g.ptr[ob + 1];
  for (int32_t e = e0; e < e1; ++e) {
    const int64_t c = g.idx[e];
    const uint16_t* xb = x + c * B;
    const uint32_t* pe = P2 + static_cast<int64_t>(e) * (B / 2) * B;
    const int64_t kv = std::min(B, g.in_cols - c * B);
    const int64_t kp_full = kv / 2;
    for (int64_t kp = 0; kp < kp_full; ++kp) {
      __m512i w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(pe + kp * B + 16 * v);
#pragma GCC unroll 32
      for (int i = 0; i < MR; ++i) {
        int32_t pair;
        std::memcpy(&pair, xb + i * ldx + 2 * kp, sizeof(pair));
        const __m512i xv = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)xv, (__m512bh)w[v]);
      }
    }
    if (kv & 1) {  // odd tail of the last partial block: the upper half of the pair is zero
      const int64_t kp = kp_full;
      __m512i w[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_si512(pe + kp * B + 16 * v);
      for (int i = 0; i < MR; ++i) {
        const int32_t pair = static_cast<int32_t>(xb[i * ldx + 2 * kp]);
        const __m512i xv = _mm512_set1_epi32(pair);
        for (int v = 0; v < NV; ++v)
          acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)xv, (__m512bh)w[v]);
      }
    }
  }
  if (g.gelu || res) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        acc[i][v] = epilogue_bf16(g, acc[i][v], res ? res + i * ldo + ob * B + 16 * v : nullptr, msk[v]);
  }
  if (NV >= 2 && g.stream_out && ow == B && ((reinterpret_cast<uintptr_t>(out + ob * B) | (ldo * 2)) & 63) == 0) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        _mm256_stream_si256(reinterpret_cast<__m256i*>(out + i * ldo + ob * B + 16 * v),
                            (__m256i)_mm512_cvtneps_pbh(acc[i][v]));
    return;
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m256i r = (__m256i)_mm512_cvtneps_pbh(acc[i][v]);
      _mm256_mask_storeu_epi16(out + i * ldo + ob * B + 16 * v, msk[v], r);
    }
}

// AVX2 fp32 micro-kernel: MR tokens x 16 outputs (two ymm) at output offset o0 of block-row ob,
// with the fused epilogue (GELU, then + residual) on the output tile in registers.
template <int MR>
CCTK_AVX2 inline void mk_f32_avx2(const BsrGemm& g, const float* x, const float* P, const float* bias,
                                  int64_t ob, int64_t o0, float* out, const float* res) {
  const int64_t B = g.B;
  const int64_t ldx = g.in_cols, ldo = g.out_cols;
  const int64_t ow = std::min<int64_t>(16, g.out_cols - ob * B - o0);  // valid outputs of this chunk
  if (ow <= 0) return;
  alignas(32) float bb[16];
  for (int j = 0; j < 16; ++j) bb[j] = (bias && j < ow) ? bias[ob * B + o0 + j] : 0.f;
  // every loop over the MR rows is fully unrolled: an acc[] indexed at run time anywhere makes GCC
  // keep the accumulators in memory (a store after every FMA: half the kernel's speed)
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    acc[i][0] = _mm256_load_ps(bb);
    acc[i][1] = _mm256_load_ps(bb + 8);
  }
  for (int32_t e = g.ptr[ob]; e < g.ptr[ob + 1]; ++e) {
    const int64_t c = g.idx[e];
    const float* xb = x + c * B;
    const float* pe = P + static_cast<int64_t>(e) * B * B + o0;
    const int64_t kv = std::min(B, g.in_cols - c * B);
    for (int64_t k = 0; k < kv; ++k) {
      const __m256 w0 = _mm256_loadu_ps(pe + k * B), w1 = _mm256_loadu_ps(pe + k * B + 8);
#pragma GCC unroll 8
      for (int i = 0; i < MR; ++i) {
        const __m256 xv = _mm256_broadcast_ss(xb + i * ldx + k);
        acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
        acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
      }
    }
  }
  if (g.gelu) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      acc[i][0] = vec::gelu_erf_ps_avx2(acc[i][0]);
      acc[i][1] = vec::gelu_erf_ps_avx2(acc[i][1]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    float* o = out + i * ldo + ob * B + o0;
    const float* r = res ? res + i * ldo + ob * B + o0 : nullptr;
    if (ow == 16) {
      if (r) {
        acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(r));
        acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(r + 8));
      }
      _mm256_storeu_ps(o, acc[i][0]);
      _mm256_storeu_ps(o + 8, acc[i][1]);
    } else {
      alignas(32) float t[16];
      _mm256_store_ps(t, acc[i][0]);
      _mm256_store_ps(t + 8, acc[i][1]);
      for (int64_t j = 0; j < ow; ++j) o[j] = r ? t[j] + r[j] : t[j];
    }
  }
}
#endif  // CCTK_X86

// Drive a micro-kernel over all tokens (a Guard is constructed at the start of each parallel chunk
// and destroyed at its end: the AMX kernels configure and release the tiles there). Work units are (group of MR-token tiles) x (range of
// output block-rows): inside a unit the loop runs over block-rows, then tiles, so one block-row's
// packed weights stay in L1 while the group's tokens stream through them. Units are sized so
// that every thread gets several (few tokens: split the block-rows too). A ragged last tile is
// computed on a zero-padded copy of its rows.
struct NoGuard {
  explicit NoGuard(const void*) {}
};

template <typename T, int MR, typename Micro, typename Guard = NoGuard>
void drive_tiles(const BsrGemm& g, const T* in, T* out, Micro micro, const void* guard_arg = nullptr) {
  const T* res = static_cast<const T*>(g.residual);
  const int64_t n_tiles = cdiv(g.M, MR);
  const int64_t want_units = 8 * std::max<int64_t>(1, at::get_num_threads());
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>(8, n_tiles / want_units));
  const int64_t n_groups = cdiv(n_tiles, group);
  int64_t obs_per = g.n_out_blocks;
  if (n_groups < want_units) obs_per = cdiv(g.n_out_blocks, std::min(g.n_out_blocks, cdiv(want_units, n_groups)));
  const int64_t n_obc = cdiv(g.n_out_blocks, obs_per);
  const int64_t rem = g.M - (n_tiles - 1) * MR;  // rows in the last tile, 1..MR
  const int64_t B = g.B;
  at::parallel_for(0, n_groups * n_obc, 1, [&](int64_t u0, int64_t u1) {
    Guard guard(guard_arg);  // per-chunk state (the AMX tile configuration)
    std::vector<T> pin, pout, pres;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t gi = u / n_obc, oc = u % n_obc;
      const int64_t t0 = gi * group, t1 = std::min(n_tiles, t0 + group);
      const int64_t ob0 = oc * obs_per, ob1 = std::min(g.n_out_blocks, ob0 + obs_per);
      const bool ragged = rem < MR && t1 == n_tiles;
      if (ragged && pin.empty()) {
        pin.assign(MR * g.in_cols + 2, T(0));
        pout.assign(MR * g.out_cols, T(0));
        std::memcpy(pin.data(), in + (n_tiles - 1) * MR * g.in_cols, rem * g.in_cols * sizeof(T));
        if (res) {
          pres.assign(MR * g.out_cols, T(0));
          std::memcpy(pres.data(), res + (n_tiles - 1) * MR * g.out_cols, rem * g.out_cols * sizeof(T));
        }
      }
      for (int64_t ob = ob0; ob < ob1; ++ob)
        for (int64_t t = t0; t < t1; ++t) {
          if (ragged && t == n_tiles - 1) {
            micro(pin.data(), ob, pout.data(), res ? pres.data() : nullptr);
            continue;
          }
          micro(in + t * MR * g.in_cols, ob, out + t * MR * g.out_cols, res ? res + t * MR * g.out_cols : nullptr);
        }
#ifdef CCTK_X86
      if (g.stream_out) _mm_sfence();
#endif
      if (ragged) {
        const int64_t c0 = ob0 * B, c1 = std::min(g.out_cols, ob1 * B);
        for (int64_t i = 0; i < rem; ++i)
          std::memcpy(out + ((n_tiles - 1) * MR + i) * g.out_cols + c0, pout.data() + i * g.out_cols + c0,
                      (c1 - c0) * sizeof(T));
      }
    }
  });
}

#ifdef CCTK_X86
template <int NV>
void gemm_f32_avx512_nv(const BsrGemm& g, const float* in, const float* P, const float* bias, float* out) {
  constexpr int MR = NV == 1 ? 24 : (NV == 2 ? 12 : 6);
  // The MR input rows a call streams should stay in L1 (32 KiB): B = 16 with wide inputs takes
  // 12-token tiles instead of 24.
  if (NV == 1 && MR * g.in_cols * 4 > (24 << 10)) {
    drive_tiles<float, 12>(g, in, out, [&](const float* x, int64_t ob, float* o, const float* r) {
      mk_f32_avx512<12, NV>(g, x, P, bias, ob, o, r);
    });
    return;
  }
  drive_tiles<float, MR>(g, in, out, [&](const float* x, int64_t ob, float* o, const float* r) {
    mk_f32_avx512<MR, NV>(g, x, P, bias, ob, o, r);
  });
}

template <int NV>
void gemm_bf16_avx512_nv(const BsrGemm& g, const uint16_t* in, const uint32_t* P2, const uint16_t* bias,
                         uint16_t* out) {
  // B = 16: 16 tokens (24 made GCC spill accumulators around the pair broadcasts)
  constexpr int MR = NV == 1 ? 16 : (NV == 2 ? 12 : 6);
  drive_tiles<uint16_t, MR>(g, in, out, [&](const uint16_t* x, int64_t ob, uint16_t* o, const uint16_t* r) {
    mk_bf16_avx512<MR, NV>(g, x, P2, bias, ob, o, r);
  });
}

void gemm_f32_avx2(const BsrGemm& g, const float* in, const float* P, const float* bias, float* out) {
  constexpr int MR = 6;
  drive_tiles<float, MR>(g, in, out, [&](const float* x, int64_t ob, float* o, const float* r) {
    for (int64_t o0 = 0; o0 < g.B; o0 += 16) mk_f32_avx2<MR>(g, x, P, bias, ob, o0, o, r);
  });
}
#endif

// ------------------------------------------------------------------------------------------
// AMX bf16 GEMM, one body over a tile backend (csrc/cpu/amx_tiles.h: the hardware, or the scalar
// emulator that tests run on any CPU). A call computes 32 tokens (two 16-row A tiles) x one output
// block-row, in passes of up to 32 outputs (two 16-column C tiles per A tile: C tiles 0-3, A 4-5,
// B 6-7). Per kept block and k chunk (kc = min(B, 32) inputs: one A tile row is kc bf16) it loads
// both A tiles straight from the input rows (stride = the row) and each B tile from the packed
// pairs P2[e][kp][o] (cctk::bsr_pack's layout is already the AMX B-tile layout: row kp holds the
// pairs (W(2kp, o), W(2kp+1, o)) of 16 outputs in 64 bytes; stride B * 4 bytes), then tdpbf16ps.
// A k chunk that runs past the last input column (in_features % B) is read from zero-padded
// copies of its A rows and B pair rows, so nothing outside the tensors is read and padding can
// hold anything. The fp32 tile sums go through a 32 x 32 buffer to the epilogue: + bias, GELU,
// + residual, rounded to bf16 (AVX-512 on the hardware; a scalar loop with the same order over the
// emulator). Ragged token tiles are handled by drive_tiles (zero-padded copy).
tiles::TileConfig bf16_tile_config(int64_t B) {
  const int kc = static_cast<int>(std::min<int64_t>(B, 32));
  tiles::TileConfig c;
  for (int t = 0; t < 4; ++t) c.set(t, 16, 64);  // C: 16 tokens x 16 fp32
  c.set(4, 16, 2 * kc);                          // A: 16 tokens x kc bf16
  c.set(5, 16, 2 * kc);
  c.set(6, kc / 2, 64);                          // B: kc/2 pairs x 16 outputs
  c.set(7, kc / 2, 64);
  return c;
}

template <typename Tiles>
struct TileGuard {
  explicit TileGuard(const void* cfg) { Tiles::configure(*static_cast<const tiles::TileConfig*>(cfg)); }
  ~TileGuard() { Tiles::release(); }
};

// Epilogue of `rows` x `n` fp32 sums (row stride 32) into bf16 outputs at out (row stride ldo).
inline void tile_epilogue_scalar(const BsrGemm& g, const float* acc, int rows, int64_t n, const uint16_t* bias,
                                 const uint16_t* res, uint16_t* out, int64_t ldo) {
  for (int r = 0; r < rows; ++r)
    for (int64_t j = 0; j < n; ++j) {
      float v = acc[r * 32 + j] + (bias ? tiles::bf16_bits_to_float(bias[j]) : 0.f);
      if (g.gelu) v = 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
      if (res) v += tiles::bf16_bits_to_float(res[r * ldo + j]);
      out[r * ldo + j] = tiles::float_to_bf16_bits(v);
    }
}

#ifdef CCTK_X86
CCTK_AVX512BF16 inline void tile_epilogue_avx512(const BsrGemm& g, const float* acc, int rows, int64_t n,
                                                 const uint16_t* bias, const uint16_t* res, uint16_t* out,
                                                 int64_t ldo) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const __mmask16 m = vec::tail_mask(n - j0);
    const __m512 b = bias ? vec::bf16_to_ps(_mm256_maskz_loadu_epi16(m, bias + j0)) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(m, acc + r * 32 + j0), b);
      if (g.gelu) v = vec::gelu_erf_ps<false>(v);
      if (res) v = _mm512_add_ps(v, vec::bf16_to_ps(_mm256_maskz_loadu_epi16(m, res + r * ldo + j0)));
      _mm256_mask_storeu_epi16(out + r * ldo + j0, m, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}
#endif

template <typename Tiles>
inline void mk_bf16_tiles(const BsrGemm& g, const uint16_t* x, const uint32_t* P2, const uint16_t* bias, int64_t ob,
                          uint16_t* out, const uint16_t* res) {
  alignas(64) static thread_local float acc[32 * 32];
  alignas(64) static thread_local uint16_t apad[32 * 32];
  alignas(64) static thread_local uint32_t bpad[16 * 32];
  const int64_t B = g.B, kc = std::min<int64_t>(B, 32), ldx = g.in_cols, ldo = g.out_cols;
  const int64_t ow = std::min(B, g.out_cols - ob * B);
  for (int64_t n0 = 0; n0 < ow; n0 += 32) {
    const bool two = n0 + 16 < ow;  // a second column tile in this pass
    Tiles::template zero<0>();
    Tiles::template zero<2>();
    if (two) {
      Tiles::template zero<1>();
      Tiles::template zero<3>();
    }
    for (int32_t e = g.ptr[ob]; e < g.ptr[ob + 1]; ++e) {
      const int64_t c = g.idx[e];
      const int64_t kv = std::min(B, g.in_cols - c * B);
      const uint32_t* pe = P2 + static_cast<int64_t>(e) * (B / 2) * B;
      for (int64_t k0 = 0; k0 < kv; k0 += kc) {
        const uint16_t* a = x + c * B + k0;
        int64_t lda = ldx;
        const uint32_t* b = pe + (k0 / 2) * B + n0;
        int64_t ldb = B;
        if (k0 + kc > kv) {  // past the last input column: zero-padded copies
          const int64_t kk = kv - k0;
          std::memset(apad, 0, sizeof(apad));
          for (int r = 0; r < 32; ++r) std::memcpy(apad + r * kc, a + r * ldx, kk * sizeof(uint16_t));
          std::memset(bpad, 0, sizeof(bpad));
          for (int64_t kp = 0; kp < (kk + 1) / 2; ++kp) {
            const int64_t w = std::min<int64_t>(32, B - n0);
            std::memcpy(bpad + kp * 32, b + kp * B, w * sizeof(uint32_t));
            if (2 * kp + 1 == kk)  // odd: the upper half of the last pair is outside
              for (int64_t o = 0; o < w; ++o) bpad[kp * 32 + o] &= 0xFFFFu;
          }
          a = apad, lda = kc, b = bpad, ldb = 32;
        }
        Tiles::template load<4>(a, lda * 2);
        Tiles::template load<5>(a + 16 * lda, lda * 2);
        Tiles::template load<6>(b, ldb * 4);
        Tiles::template dpbf16<0, 4, 6>();
        Tiles::template dpbf16<2, 5, 6>();
        if (two) {
          Tiles::template load<7>(b + 16, ldb * 4);
          Tiles::template dpbf16<1, 4, 7>();
          Tiles::template dpbf16<3, 5, 7>();
        }
      }
    }
    Tiles::template store<0>(acc, 128);
    Tiles::template store<2>(acc + 16 * 32, 128);
    if (two) {
      Tiles::template store<1>(acc + 16, 128);
      Tiles::template store<3>(acc + 16 * 32 + 16, 128);
    }
    const int64_t n = std::min<int64_t>(32, ow - n0);
    const uint16_t* bb = bias ? bias + ob * B + n0 : nullptr;
    const uint16_t* rr = res ? res + ob * B + n0 : nullptr;
    uint16_t* oo = out + ob * B + n0;
#ifdef CCTK_X86
    if constexpr (Tiles::kHardware) {
      tile_epilogue_avx512(g, acc, 32, n, bb, rr, oo, ldo);
      continue;
    }
#endif
    tile_epilogue_scalar(g, acc, 32, n, bb, rr, oo, ldo);
  }
}

template <typename Tiles>
void gemm_bf16_tiles(const BsrGemm& g, const uint16_t* in, const uint32_t* P2, const uint16_t* bias, uint16_t* out) {
  const tiles::TileConfig cfg = bf16_tile_config(g.B);
  auto micro = [&](const uint16_t* x, int64_t ob, uint16_t* o, const uint16_t* r) {
    mk_bf16_tiles<Tiles>(g, x, P2, bias, ob, o, r);
  };
  drive_tiles<uint16_t, 32, decltype(micro), TileGuard<Tiles>>(g, in, out, micro, &cfg);
}

// fp32 GEMM through the best path the CPU allows.
void gemm_f32(const BsrGemm& g, const float* in, const float* P, const float* bias, float* out, Capability cap) {
#ifdef CCTK_X86
  if (cap >= Capability::AVX512) {
    if (g.B == 16) return gemm_f32_avx512_nv<1>(g, in, P, bias, out);
    if (g.B == 32) return gemm_f32_avx512_nv<2>(g, in, P, bias, out);
    if (g.B == 64) return gemm_f32_avx512_nv<4>(g, in, P, bias, out);
  }
  if (cap >= Capability::AVX2 && g.B % 16 == 0) return gemm_f32_avx2(g, in, P, bias, out);
#endif
  gemm_scalar<float, float>(g, in, P, bias, out);
}

// ------------------------------------------------------------------------------------------
// Validation (memory safety: every index the kernels follow is checked first).
void check_index(const at::Tensor& ptr, const at::Tensor& idx, int64_t n_outer, int64_t n_inner, const char* op,
                 const char* ptr_name, const char* idx_name) {
  TORCH_CHECK(ptr.scalar_type() == at::kInt && idx.scalar_type() == at::kInt, op, ": ", ptr_name, " and ",
              idx_name, " must be int32, got ", ptr.scalar_type(), " and ", idx.scalar_type());
  TORCH_CHECK(ptr.dim() == 1 && ptr.size(0) == n_outer + 1, op, ": ", ptr_name, " must have ", n_outer + 1,
              " entries, got shape ", ptr.sizes());
  TORCH_CHECK(idx.dim() == 1, op, ": ", idx_name, " must be 1-D, got shape ", idx.sizes());
  TORCH_CHECK(ptr.device().is_cpu() && idx.device().is_cpu(), op, ": index tensors must be on the CPU");
}

void check_index_values(const int32_t* p, const int32_t* ix, int64_t n_outer, int64_t n_inner, int64_t nnz,
                        const char* op) {
  TORCH_CHECK(p[0] == 0 && p[n_outer] == nnz, op, ": the compressed index must start at 0 and end at nnz=", nnz,
              ", got ", p[0], " .. ", p[n_outer]);
  for (int64_t r = 0; r < n_outer; ++r) TORCH_CHECK(p[r] <= p[r + 1], op, ": the compressed index is not monotone");
  for (int64_t e = 0; e < nnz; ++e)
    TORCH_CHECK(ix[e] >= 0 && ix[e] < n_inner, op, ": block index ", ix[e], " at entry ", e, " is outside [0, ",
                n_inner, ")");
}

int64_t check_values(const at::Tensor& values, int64_t nnz, const char* op) {
  TORCH_CHECK(values.dim() == 3 && values.size(1) == values.size(2), op,
              ": values must be (nnz, B, B), got shape ", values.sizes());
  TORCH_CHECK(values.size(0) == nnz, op, ": values holds ", values.size(0), " blocks but the index has ", nnz);
  const int64_t B = values.size(1);
  TORCH_CHECK(B > 0, op, ": block size must be positive");
  return B;
}

// Large outputs (>= 32 MiB) come from glibc as fresh mmap pages: every call would fault in
// 8192 4-KiB pages (~8-15 ms for 32 MiB here, more than the sparse GEMM itself at low density).
// Asking for transparent huge pages on the 2-MiB-aligned interior cuts that to ~16 faults (the
// same thing PyTorch does for all its allocations under THP_MEM_ALLOC_ENABLE=1). Linux only; a
// hint, harmless where THP is off.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t nbytes = t.numel() * t.element_size();
  if (nbytes < (size_t(32) << 20)) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + nbytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// ------------------------------------------------------------------------------------------
// Shared GEMM entry for the forward and the input gradient.
at::Tensor bsr_gemm_cpu(const at::Tensor& in_, const at::Tensor& values_, const at::Tensor& ptr_,
                        const at::Tensor& idx_, const at::Tensor& perm_, const c10::optional<at::Tensor>& bias_,
                        int64_t out_cols, bool forward, const char* op, bool gelu = false,
                        const at::Tensor& residual_ = at::Tensor(), const at::Tensor& packed = at::Tensor()) {
  TORCH_CHECK(in_.dim() == 2, op, ": the input must be 2-D (rows, features), got shape ", in_.sizes());
  TORCH_CHECK(in_.device().is_cpu() && values_.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(in_.scalar_type() == values_.scalar_type(), op, ": input dtype ", in_.scalar_type(),
              " differs from values dtype ", values_.scalar_type());
  TORCH_CHECK(at::isFloatingType(in_.scalar_type()), op, ": floating-point tensors expected");
  const int64_t nnz = idx_.numel();
  const int64_t B = check_values(values_, nnz, op);
  TORCH_CHECK(out_cols >= 0, op, ": the output feature count must be non-negative");
  const int64_t M = in_.size(0), in_cols = in_.size(1);
  const int64_t n_out_blocks = cdiv(out_cols, B), n_in_blocks = cdiv(in_cols, B);
  check_index(ptr_, idx_, n_out_blocks, n_in_blocks, op, forward ? "crow_indices" : "ccol_indices",
              forward ? "col_indices" : "row_indices");
  auto ptr = ptr_.contiguous(), idx = idx_.contiguous();
  check_index_values(ptr.data_ptr<int32_t>(), idx.data_ptr<int32_t>(), n_out_blocks, n_in_blocks, nnz, op);
  at::Tensor perm;
  if (!forward) {
    TORCH_CHECK(perm_.scalar_type() == at::kInt && perm_.dim() == 1 && perm_.numel() == nnz, op,
                ": block_perm must be int32 with nnz=", nnz, " entries, got ", perm_.scalar_type(), " ",
                perm_.sizes());
    perm = perm_.contiguous();
    const int32_t* pp = perm.data_ptr<int32_t>();
    for (int64_t e = 0; e < nnz; ++e)
      TORCH_CHECK(pp[e] >= 0 && pp[e] < nnz, op, ": block_perm entry ", pp[e], " is outside [0, ", nnz, ")");
  }
  at::Tensor bias;
  if (bias_.has_value() && bias_->defined()) {
    bias = bias_->contiguous();
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out_cols, op, ": bias must have ", out_cols,
                " entries, got shape ", bias.sizes());
    TORCH_CHECK(bias.scalar_type() == in_.scalar_type(), op, ": bias dtype ", bias.scalar_type(),
                " differs from the input dtype ", in_.scalar_type());
    TORCH_CHECK(bias.device().is_cpu(), op, ": bias must be on the CPU");
  }
  at::Tensor residual;
  if (residual_.defined()) {
    TORCH_CHECK(residual_.dim() == 2 && residual_.size(0) == M && residual_.size(1) == out_cols, op,
                ": residual must have the output's shape (", M, ", ", out_cols, "), got ", residual_.sizes());
    TORCH_CHECK(residual_.scalar_type() == in_.scalar_type() && residual_.device().is_cpu(), op,
                ": residual must be a CPU tensor of the input dtype ", in_.scalar_type(), ", got ",
                residual_.scalar_type(), " on ", residual_.device());
    residual = residual_.contiguous();
  }
  auto in = in_.contiguous();
  auto values = values_.contiguous();
  auto out = at::empty({M, out_cols}, in.options());
  if (M == 0 || out_cols == 0) return out;
  advise_huge_pages(out);
  // epilogue as a separate pass, for the paths whose micro-kernels have none
  auto finish = [&](at::Tensor& o) -> at::Tensor& {
    if (gelu) o = at::gelu(o);
    if (residual.defined()) o.add_(residual);
    return o;
  };
  if (in_cols == 0 || nnz == 0) {
    if (bias.defined()) out.copy_(bias.unsqueeze(0).expand({M, out_cols}));
    else out.zero_();
    // every kept block multiplies zero input columns or there are none: bias only
    return finish(out);
  }
  const char* env_stream = std::getenv("CCTK_BSR_STREAM");
  const int64_t stream_bytes = env_stream ? std::atoll(env_stream) : (int64_t(4) << 20);
  const bool stream_out = M * out_cols * static_cast<int64_t>(in.element_size()) >= stream_bytes;
  BsrGemm g{M, in_cols, out_cols, B, n_out_blocks, ptr.data_ptr<int32_t>(), idx.data_ptr<int32_t>(), stream_out};
  // the AVX-512 micro-kernels finish each output tile in registers (GELU, + residual)
  auto fuse_epilogue = [&]() {
    g.gelu = gelu;
    g.residual = residual.defined() ? residual.data_ptr() : nullptr;
  };
  const int32_t* pperm = forward ? nullptr : perm.data_ptr<int32_t>();
  const Capability cap = cpu::detect();
  const auto st = in.scalar_type();

#ifdef CCTK_X86
  if (st == at::kBFloat16 && (cap >= Capability::AVX512_BF16 || cpu::use_tiles()) && (B == 16 || B == 32 || B == 64)) {
    // weights packed once by cctk::bsr_pack (inference), else packed here for this call
    const bool prepacked = forward && packed.defined() && packed.scalar_type() == at::kInt &&
                           packed.numel() == nnz * (B / 2) * B && packed.is_contiguous();
    std::vector<uint32_t> P2v;
    if (!prepacked) {
      P2v.resize(static_cast<size_t>(nnz) * (B / 2) * B);
      pack_blocks_bf16_pairs(values.data_ptr<at::BFloat16>(), pperm, nnz, B, forward, P2v.data());
    }
    const uint32_t* P2 = prepacked ? reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>()) : P2v.data();
    fuse_epilogue();
    const uint16_t* xin = reinterpret_cast<const uint16_t*>(in.data_ptr<at::BFloat16>());
    const uint16_t* bp = bias.defined() ? reinterpret_cast<const uint16_t*>(bias.data_ptr<at::BFloat16>()) : nullptr;
    uint16_t* op_ = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
    if (cap >= Capability::AMX) {
#if defined(__linux__)
      gemm_bf16_tiles<tiles::AmxTiles>(g, xin, P2, bp, op_);
#endif
    } else if (cpu::use_tiles()) {
      gemm_bf16_tiles<tiles::EmulatedTiles>(g, xin, P2, bp, op_);
    } else if (B == 16) {
      gemm_bf16_avx512_nv<1>(g, xin, P2, bp, op_);
    } else if (B == 32) {
      gemm_bf16_avx512_nv<2>(g, xin, P2, bp, op_);
    } else {
      gemm_bf16_avx512_nv<4>(g, xin, P2, bp, op_);
    }
    return out;
  }
#endif
  if (st == at::kFloat || (st == at::kBFloat16 && cap >= Capability::AVX2)) {
    // fp32 kernels; bf16 without AVX512-BF16 is computed in fp32 and rounded once at the end.
    const bool prepacked = forward && st == at::kFloat && packed.defined() && packed.scalar_type() == at::kFloat &&
                           packed.numel() == nnz * B * B && packed.is_contiguous();
    std::vector<float> P(prepacked ? 0 : static_cast<size_t>(nnz) * B * B);
    at::Tensor in32 = st == at::kFloat ? in : in.to(at::kFloat);
    at::Tensor bias32 = bias.defined() ? (st == at::kFloat ? bias : bias.to(at::kFloat)) : bias;
    at::Tensor out32 = st == at::kFloat ? out : at::empty({M, out_cols}, in.options().dtype(at::kFloat));
    if (!prepacked) {
      if (st == at::kFloat) pack_blocks<float, float>(values.data_ptr<float>(), pperm, nnz, B, forward, P.data());
      else pack_blocks<at::BFloat16, float>(values.data_ptr<at::BFloat16>(), pperm, nnz, B, forward, P.data());
    }
    const float* Pp = prepacked ? packed.data_ptr<float>() : P.data();
    const bool fused = st == at::kFloat && ((cap >= Capability::AVX512 && (B == 16 || B == 32 || B == 64)) ||
                                            (cap == Capability::AVX2 && B % 16 == 0));
    if (fused) fuse_epilogue();
    gemm_f32(g, in32.data_ptr<float>(), Pp, bias32.defined() ? bias32.data_ptr<float>() : nullptr,
             out32.data_ptr<float>(), cap);
    if (st != at::kFloat) out.copy_(out32);
    return fused ? out : finish(out);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "bsr_gemm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> P(static_cast<size_t>(nnz) * B * B);
    pack_blocks<scalar_t, acc_t>(values.data_ptr<scalar_t>(), pperm, nnz, B, forward, P.data());
    gemm_scalar<scalar_t, acc_t>(g, in.data_ptr<scalar_t>(), P.data(),
                                 bias.defined() ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>());
  });
  return finish(out);
}

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                          const at::Tensor& col, const c10::optional<at::Tensor>& bias, int64_t out_features) {
  return bsr_gemm_cpu(x, values, crow, col, at::Tensor(), bias, out_features, true, "cctk::bsr_linear");
}

// Forward with an epilogue (inference): activation "none" | "gelu" (exact erf), then + residual.
at::Tensor bsr_linear_epilogue_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                                   const at::Tensor& col, const c10::optional<at::Tensor>& bias, int64_t out_features,
                                   c10::string_view activation, const c10::optional<at::Tensor>& residual,
                                   const c10::optional<at::Tensor>& packed) {
  const char* op = "cctk::bsr_linear_epilogue";
  TORCH_CHECK(activation == "none" || activation == "gelu", op, ": activation must be 'none' or 'gelu', got '",
              std::string(activation), "'");
  if (packed.has_value() && packed->defined() && packed->numel() > 0) {
    const int64_t B = values.dim() == 3 ? values.size(1) : 0;
    const bool bf16 = values.scalar_type() == at::kBFloat16;
    TORCH_CHECK(packed->device().is_cpu() && packed->dim() == 3 && packed->size(0) == values.size(0) &&
                    packed->scalar_type() == (bf16 ? at::kInt : at::kFloat) &&
                    packed->size(1) == (bf16 ? B / 2 : B) && packed->size(2) == B,
                op, ": packed weights ", packed->sizes(), " ", packed->scalar_type(),
                " were not made by cctk::bsr_pack from these values; pack them again");
  }
  return bsr_gemm_cpu(x, values, crow, col, at::Tensor(), bias, out_features, true, op, activation == "gelu",
                      residual.has_value() ? *residual : at::Tensor(),
                      packed.has_value() ? packed->contiguous() : at::Tensor());
}

// Forward weights in the kernel's layout, once (inference): bf16 -> int32 (nnz, B/2, B) pairs of
// W^T rows (vdpbf16ps operands); fp32 -> (nnz, B, B) W^T blocks; other dtypes: empty (no prepack).
at::Tensor bsr_pack_cpu(const at::Tensor& values_) {
  TORCH_CHECK(values_.dim() == 3 && values_.size(1) == values_.size(2) && values_.device().is_cpu(),
              "cctk::bsr_pack: values must be (nnz, B, B) on the CPU, got ", values_.sizes());
  auto values = values_.contiguous();
  const int64_t nnz = values.size(0), B = values.size(1);
  if (values.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(B % 2 == 0, "cctk::bsr_pack: block size must be even, got ", B);
    auto out = at::empty({nnz, B / 2, B}, values.options().dtype(at::kInt));
    pack_blocks_bf16_pairs(values.data_ptr<at::BFloat16>(), nullptr, nnz, B, true,
                           reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()));
    return out;
  }
  if (values.scalar_type() == at::kFloat) {
    auto out = at::empty({nnz, B, B}, values.options());
    pack_blocks<float, float>(values.data_ptr<float>(), nullptr, nnz, B, true, out.data_ptr<float>());
    return out;
  }
  return at::empty({0}, values.options().dtype(at::kFloat));
}

at::Tensor bsr_linear_backward_input_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                         const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& perm,
                                         int64_t in_features) {
  return bsr_gemm_cpu(grad_out, values, ccol, row, perm, c10::nullopt, in_features, false,
                      "cctk::bsr_linear_backward_input");
}

// ------------------------------------------------------------------------------------------
// Weight gradient: dV[i][a, b] = sum_m go[m, r_i*B + a] * x[m, c_i*B + b].
template <typename T, typename acc_t>
void grad_weight_scalar(const T* go, const T* x, int64_t M, int64_t out_cols, int64_t in_cols, int64_t B,
                        const int32_t* rows, const int32_t* cols, int64_t nnz, acc_t* dV) {
  at::parallel_for(0, nnz, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = rows[i], c = cols[i];
      const int64_t av = std::min(B, out_cols - r * B), kv = std::min(B, in_cols - c * B);
      acc_t* d = dV + i * B * B;
      for (int64_t m = 0; m < M; ++m) {
        const T* gr = go + m * out_cols + r * B;
        const T* xr = x + m * in_cols + c * B;
        for (int64_t a = 0; a < av; ++a) {
          const acc_t ga = static_cast<acc_t>(gr[a]);
          for (int64_t b = 0; b < kv; ++b) d[a * B + b] += ga * static_cast<acc_t>(xr[b]);
        }
      }
    }
  });
}

#ifdef CCTK_X86
// AT rows of a x B columns of b (NV zmm) of one block, over tokens [m0, m1); accumulates into d.
template <int AT, int NV>
CCTK_AVX512 inline void mk_gw_avx512(const float* go, const float* x, int64_t m0, int64_t m1, int64_t ldg,
                                     int64_t ldx, int64_t av, __mmask16 const* kmsk, float* d) {
  constexpr int64_t B = 16 * NV;
  __m512 acc[AT][NV];
#pragma GCC unroll 16
  for (int a = 0; a < AT; ++a)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[a][v] = _mm512_loadu_ps(d + a * B + 16 * v);
  for (int64_t m = m0; m < m1; ++m) {
    __m512 xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = _mm512_maskz_loadu_ps(kmsk[v], x + m * ldx + 16 * v);
    const float* gr = go + m * ldg;
#pragma GCC unroll 16
    for (int a = 0; a < AT; ++a) {
      if (a >= av) break;
      const __m512 gv = _mm512_set1_ps(gr[a]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[a][v] = _mm512_fmadd_ps(gv, xv[v], acc[a][v]);
    }
  }
#pragma GCC unroll 16
  for (int a = 0; a < AT; ++a)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(d + a * B + 16 * v, acc[a][v]);
}

// bf16: tokens in pairs. G2 / X2 hold two consecutive rows interleaved (uint32 = (row 2p, row 2p+1)),
// so one dpbf16 step adds go[2p, a] * x[2p, b] + go[2p+1, a] * x[2p+1, b].
template <int AT, int NV>
CCTK_AVX512BF16 inline void mk_gw_bf16_avx512(const uint32_t* go2, const uint32_t* x2, int64_t p0, int64_t p1,
                                              int64_t ldg, int64_t ldx, int64_t av, __mmask16 const* kmsk, float* d) {
  constexpr int64_t B = 16 * NV;
  __m512 acc[AT][NV];
#pragma GCC unroll 16
  for (int a = 0; a < AT; ++a)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[a][v] = _mm512_loadu_ps(d + a * B + 16 * v);
  for (int64_t p = p0; p < p1; ++p) {
    __m512i xv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) xv[v] = _mm512_maskz_loadu_epi32(kmsk[v], x2 + p * ldx + 16 * v);
    const uint32_t* gr = go2 + p * ldg;
#pragma GCC unroll 16
    for (int a = 0; a < AT; ++a) {
      if (a >= av) break;
      const __m512i gv = _mm512_set1_epi32(static_cast<int32_t>(gr[a]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[a][v] = _mm512_dpbf16_ps(acc[a][v], (__m512bh)gv, (__m512bh)xv[v]);
    }
  }
#pragma GCC unroll 16
  for (int a = 0; a < AT; ++a)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(d + a * B + 16 * v, acc[a][v]);
}

// Interleave consecutive rows of a bf16 (M, n) matrix into uint32 pairs (ceil(M/2), n); a missing
// last row is zero.
std::vector<uint32_t> pair_rows_bf16(const at::BFloat16* src_, int64_t M, int64_t n) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(src_);
  const int64_t P = cdiv(M, 2);
  std::vector<uint32_t> dst(static_cast<size_t>(P) * n);
  at::parallel_for(0, P, 64, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* r0 = src + 2 * p * n;
      uint32_t* o = dst.data() + p * n;
      if (2 * p + 1 < M) {
        const uint16_t* r1 = r0 + n;
        for (int64_t j = 0; j < n; ++j) o[j] = static_cast<uint32_t>(r0[j]) | (static_cast<uint32_t>(r1[j]) << 16);
      } else {
        for (int64_t j = 0; j < n; ++j) o[j] = static_cast<uint32_t>(r0[j]);
      }
    }
  });
  return dst;
}

// Drive a weight-gradient micro-kernel. Units (kept block, tile of AT rows a) are split over the
// threads once (one parallel region: on a busy machine every region can cost a time slice);
// each thread walks the tokens in cache-sized chunks and, per chunk, all its units, each
// accumulating into its own part of dV.
template <int NV, typename Micro>
void grad_weight_drive(int64_t n_steps, int64_t step_chunk, int64_t out_cols, int64_t in_cols, const int32_t* rows,
                       const int32_t* cols, int64_t nnz, int at_rows, float* dV, Micro micro) {
  constexpr int64_t B = 16 * NV;
  const int64_t n_at = B / at_rows;
  const int64_t units = nnz * n_at;
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t s0 = 0; s0 < n_steps; s0 += step_chunk) {
      const int64_t s1 = std::min(n_steps, s0 + step_chunk);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t i = u / n_at, a0 = (u % n_at) * at_rows;
        const int64_t r = rows[i], c = cols[i];
        const int64_t av = std::min<int64_t>(at_rows, out_cols - r * B - a0);
        if (av <= 0) continue;  // padded rows of a partial block stay zero
        const int64_t kv = std::min(B, in_cols - c * B);
        __mmask16 kmsk[NV];
        for (int v = 0; v < NV; ++v) {
          const int64_t n = std::max<int64_t>(0, std::min<int64_t>(16, kv - 16 * v));
          kmsk[v] = static_cast<__mmask16>(n >= 16 ? 0xFFFF : ((1u << n) - 1));
        }
        micro(r * B + a0, c * B, s0, s1, av, kmsk, dV + i * B * B + a0 * B);
      }
    }
  });
}

// AVX2 fp32: AT rows a x 16 columns b (two ymm) of one kept block at (a0, c0), over tokens
// [m0, m1): d[a, b] += sum_m go[m, a] * x[m, b]. The loops over the AT rows are fully unrolled
// (an accumulator indexed at run time makes GCC keep them in memory). !FULL: the columns past the
// layer's inputs are read as zero (mask loads), so a partial block's padding stays zero.
template <int AT, bool FULL>
CCTK_AVX2 inline void mk_gw_avx2(const float* go, const float* x, int64_t m0, int64_t m1, int64_t ldg,
                                 int64_t ldx, __m256i m_lo, __m256i m_hi, int64_t ldd, float* d) {
  __m256 acc[AT][2];
#pragma GCC unroll 8
  for (int a = 0; a < AT; ++a) {
    acc[a][0] = _mm256_loadu_ps(d + a * ldd);
    acc[a][1] = _mm256_loadu_ps(d + a * ldd + 8);
  }
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * ldx;
    const __m256 x0 = FULL ? _mm256_loadu_ps(xr) : _mm256_maskload_ps(xr, m_lo);
    const __m256 x1 = FULL ? _mm256_loadu_ps(xr + 8) : _mm256_maskload_ps(xr + 8, m_hi);
    const float* gr = go + m * ldg;
#pragma GCC unroll 8
    for (int a = 0; a < AT; ++a) {
      const __m256 gv = _mm256_broadcast_ss(gr + a);
      acc[a][0] = _mm256_fmadd_ps(gv, x0, acc[a][0]);
      acc[a][1] = _mm256_fmadd_ps(gv, x1, acc[a][1]);
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < AT; ++a) {
    _mm256_storeu_ps(d + a * ldd, acc[a][0]);
    _mm256_storeu_ps(d + a * ldd + 8, acc[a][1]);
  }
}

template <bool FULL>
CCTK_AVX2 inline void gw_avx2_rows(int64_t av, const float* go, const float* x, int64_t m0, int64_t m1, int64_t ldg,
                                   int64_t ldx, __m256i lo, __m256i hi, int64_t ldd, float* d) {
  switch (av) {
    case 6: return mk_gw_avx2<6, FULL>(go, x, m0, m1, ldg, ldx, lo, hi, ldd, d);
    case 5: return mk_gw_avx2<5, FULL>(go, x, m0, m1, ldg, ldx, lo, hi, ldd, d);
    case 4: return mk_gw_avx2<4, FULL>(go, x, m0, m1, ldg, ldx, lo, hi, ldd, d);
    case 3: return mk_gw_avx2<3, FULL>(go, x, m0, m1, ldg, ldx, lo, hi, ldd, d);
    case 2: return mk_gw_avx2<2, FULL>(go, x, m0, m1, ldg, ldx, lo, hi, ldd, d);
    default: return mk_gw_avx2<1, FULL>(go, x, m0, m1, ldg, ldx, lo, hi, ldd, d);
  }
}

// One unit of the AVX2 weight gradient: av (<= 6) rows x kv (<= 16) columns at d, over tokens
// [m0, m1). Scalar arguments only: it is called from code compiled without AVX2.
CCTK_AVX2 void gw_avx2_unit(int64_t av, int64_t kv, const float* go, const float* x, int64_t m0, int64_t m1,
                            int64_t ldg, int64_t ldx, int64_t ldd, float* d) {
  alignas(32) int32_t lanes[16];
  for (int j = 0; j < 16; ++j) lanes[j] = j < kv ? -1 : 0;
  const __m256i lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
  const __m256i hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes + 8));
  if (kv == 16) gw_avx2_rows<true>(av, go, x, m0, m1, ldg, ldx, lo, hi, ldd, d);
  else gw_avx2_rows<false>(av, go, x, m0, m1, ldg, ldx, lo, hi, ldd, d);
}

// The AVX2 weight gradient (B a multiple of 16): units (kept block, 6-row tile, 16-column tile),
// the tiles of a block next to each other (they share its x columns), split over the threads once;
// each thread walks the tokens in cache-sized chunks and, per chunk, all its units.
void grad_weight_f32_avx2(const float* go, const float* x, int64_t M, int64_t out_cols, int64_t in_cols, int64_t B,
                          const int32_t* rows, const int32_t* cols, int64_t nnz, float* dV) {
  constexpr int64_t AT = 6, CHUNK = 512;
  const int64_t n_at = cdiv(B, AT), n_ct = B / 16, per = n_at * n_ct;
  at::parallel_for(0, nnz * per, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t s0 = 0; s0 < M; s0 += CHUNK) {
      const int64_t s1 = std::min(M, s0 + CHUNK);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t i = u / per, t = u % per, a0 = (t / n_ct) * AT, c0 = (t % n_ct) * 16;
        const int64_t r = rows[i], c = cols[i];
        const int64_t av = std::min({AT, B - a0, out_cols - r * B - a0});
        const int64_t kv = std::min<int64_t>(16, in_cols - c * B - c0);
        if (av <= 0 || kv <= 0) continue;  // padding rows / columns of a partial block stay zero
        gw_avx2_unit(av, kv, go + r * B + a0, x + c * B + c0, s0, s1, out_cols, in_cols, B,
                     dV + i * B * B + a0 * B + c0);
      }
    }
  });
}

template <int NV>
void grad_weight_f32_avx512(const float* go, const float* x, int64_t M, int64_t out_cols, int64_t in_cols,
                            const int32_t* rows, const int32_t* cols, int64_t nnz, float* dV) {
  constexpr int AT = NV == 1 ? 16 : (NV == 2 ? 8 : 4);
  grad_weight_drive<NV>(M, 512, out_cols, in_cols, rows, cols, nnz, AT, dV,
                        [&](int64_t go_col, int64_t x_col, int64_t m0, int64_t m1, int64_t av, const __mmask16* km,
                            float* d) {
                          mk_gw_avx512<AT, NV>(go + go_col, x + x_col, m0, m1, out_cols, in_cols, av, km, d);
                        });
}

template <int NV>
void grad_weight_bf16_avx512(const at::BFloat16* go, const at::BFloat16* x, int64_t M, int64_t out_cols,
                             int64_t in_cols, const int32_t* rows, const int32_t* cols, int64_t nnz, float* dV) {
  constexpr int AT = NV == 1 ? 16 : (NV == 2 ? 8 : 4);
  const std::vector<uint32_t> go2 = pair_rows_bf16(go, M, out_cols);
  const std::vector<uint32_t> x2 = pair_rows_bf16(x, M, in_cols);
  grad_weight_drive<NV>(cdiv(M, 2), 256, out_cols, in_cols, rows, cols, nnz, AT, dV,
                        [&](int64_t go_col, int64_t x_col, int64_t p0, int64_t p1, int64_t av, const __mmask16* km,
                            float* d) {
                          mk_gw_bf16_avx512<AT, NV>(go2.data() + go_col, x2.data() + x_col, p0, p1, out_cols, in_cols,
                                                    av, km, d);
                        });
}
#endif

at::Tensor bsr_linear_backward_weight_cpu(const at::Tensor& grad_out_, const at::Tensor& x_, const at::Tensor& crow_,
                                          const at::Tensor& col_, int64_t block_size) {
  const char* op = "cctk::bsr_linear_backward_weight";
  TORCH_CHECK(grad_out_.dim() == 2 && x_.dim() == 2 && grad_out_.size(0) == x_.size(0), op,
              ": grad_out (M, out) and x (M, in) must be 2-D with the same rows, got ", grad_out_.sizes(), " and ",
              x_.sizes());
  TORCH_CHECK(grad_out_.scalar_type() == x_.scalar_type(), op, ": grad_out dtype ", grad_out_.scalar_type(),
              " differs from x dtype ", x_.scalar_type());
  TORCH_CHECK(at::isFloatingType(x_.scalar_type()), op, ": floating-point tensors expected");
  TORCH_CHECK(grad_out_.device().is_cpu() && x_.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(block_size > 0, op, ": block_size must be positive, got ", block_size);
  const int64_t B = block_size;
  const int64_t M = x_.size(0), out_cols = grad_out_.size(1), in_cols = x_.size(1);
  const int64_t nbr = cdiv(out_cols, B), nbc = cdiv(in_cols, B);
  check_index(crow_, col_, nbr, nbc, op, "crow_indices", "col_indices");
  auto crow = crow_.contiguous(), col = col_.contiguous();
  const int64_t nnz = col.numel();
  const int32_t* cp = crow.data_ptr<int32_t>();
  const int32_t* ci = col.data_ptr<int32_t>();
  check_index_values(cp, ci, nbr, nbc, nnz, op);
  std::vector<int32_t> rows(nnz);
  for (int64_t r = 0; r < nbr; ++r)
    for (int64_t e = cp[r]; e < cp[r + 1]; ++e) rows[e] = static_cast<int32_t>(r);
  const auto st = x_.scalar_type();
  auto go = grad_out_.contiguous(), x = x_.contiguous();
  const Capability cap = cpu::detect();
#ifdef CCTK_X86
  if (st == at::kBFloat16 && (cap >= Capability::AVX512_BF16 || cpu::use_tiles()) && (B == 16 || B == 32 || B == 64)) {
    auto dV = at::zeros({nnz, B, B}, x.options().dtype(at::kFloat));
    if (nnz > 0 && M > 0) {
      const at::BFloat16* g = go.data_ptr<at::BFloat16>();
      const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
      float* d = dV.data_ptr<float>();
      if (B == 16) grad_weight_bf16_avx512<1>(g, xp, M, out_cols, in_cols, rows.data(), ci, nnz, d);
      else if (B == 32) grad_weight_bf16_avx512<2>(g, xp, M, out_cols, in_cols, rows.data(), ci, nnz, d);
      else grad_weight_bf16_avx512<4>(g, xp, M, out_cols, in_cols, rows.data(), ci, nnz, d);
    }
    return dV.to(st);
  }
  if ((st == at::kFloat || st == at::kBFloat16) && cap >= Capability::AVX512 && (B == 16 || B == 32 || B == 64)) {
    // fp32 kernel; bf16 without AVX512-BF16 is converted once and rounded at the end.
    auto go32 = go.to(at::kFloat), x32 = x.to(at::kFloat);
    auto dV = at::zeros({nnz, B, B}, x.options().dtype(at::kFloat));
    if (nnz > 0 && M > 0) {
      const float* g = go32.data_ptr<float>();
      const float* xp = x32.data_ptr<float>();
      float* d = dV.data_ptr<float>();
      if (B == 16) grad_weight_f32_avx512<1>(g, xp, M, out_cols, in_cols, rows.data(), ci, nnz, d);
      else if (B == 32) grad_weight_f32_avx512<2>(g, xp, M, out_cols, in_cols, rows.data(), ci, nnz, d);
      else grad_weight_f32_avx512<4>(g, xp, M, out_cols, in_cols, rows.data(), ci, nnz, d);
    }
    return st == at::kFloat ? dV : dV.to(st);
  }
  if ((st == at::kFloat || st == at::kBFloat16) && cap >= Capability::AVX2 && B % 16 == 0) {
    // below AVX-512 (bf16 has no arithmetic units there: converted once, rounded at the end)
    auto go32 = go.to(at::kFloat), x32 = x.to(at::kFloat);
    auto dV = at::zeros({nnz, B, B}, x.options().dtype(at::kFloat));
    if (nnz > 0 && M > 0)
      grad_weight_f32_avx2(go32.data_ptr<float>(), x32.data_ptr<float>(), M, out_cols, in_cols, B, rows.data(), ci,
                           nnz, dV.data_ptr<float>());
    return st == at::kFloat ? dV : dV.to(st);
  }
#endif
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "bsr_linear_backward_weight_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto dV = at::zeros({nnz, B, B}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (nnz > 0 && M > 0)
      grad_weight_scalar<scalar_t, acc_t>(go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), M, out_cols, in_cols, B,
                                          rows.data(), ci, nnz, dV.data_ptr<acc_t>());
    result = dV.to(st);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(cctk, CPU, m) {
  m.impl("bsr_linear", &bsr_linear_cpu);
  m.impl("bsr_linear_epilogue", &bsr_linear_epilogue_cpu);
  m.impl("bsr_pack", &bsr_pack_cpu);
  m.impl("bsr_linear_backward_input", &bsr_linear_backward_input_cpu);
  m.impl("bsr_linear_backward_weight", &bsr_linear_backward_weight_cpu);
}

}  // namespace cctk
