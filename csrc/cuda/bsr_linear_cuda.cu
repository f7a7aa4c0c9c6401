// CUDA kernels of the block-sparse linear ops (cctk::bsr_linear, cctk::bsr_linear_backward_input,
// cctk::bsr_linear_backward_weight). Layout and schemas: cctk/ops/bsr_linear.py.
//
//   forward          out[m, r*B + a] = bias[r*B + a] + sum_{i in row r} sum_b x[m, col[i]*B + b] * V[i][a, b]
//   input gradient   gin[m, c*B + b] = sum_{j in col c} sum_a gout[m, row[j]*B + a] * V[perm[j]][a, b]
//   weight gradient  gV[i][a, b]     = sum_m gout[m, r*B + a] * x[m, col[i]*B + b]       (kept blocks only)
//
// Forward and input gradient are one "gather GEMM": an output block (block-row of W for the
// forward, block-col for the input gradient) is the sum over its kept blocks of an activation
// tile times a B x B weight block (transposed for the forward). Each CTA owns a tile of BM tokens
// (rows of x: the MMA M dimension) by 64 output columns, i.e. G = 64 / B output blocks (1 block of
// 64, 2 of 32, 4 of 16: several block-rows per CTA when blocks are small). At step s it stages,
// for each of its G blocks with more than s kept blocks, the s-th activation tile (BM x B) and
// weight block (B x B) in shared memory, then every warp multiplies its 32 token rows.
//
// Load balance: the output blocks are taken in order of decreasing kept-block count (an argsort of
// the row/col pointer differences, cached per index tensor), so the G blocks of one CTA have
// similar counts (few idle steps) and the heaviest CTAs are launched first. CTAs are numbered with
// the output-block group varying fastest, so all groups that read one token tile of x run close in
// time and find it in L2. Small inputs (few token tiles) use 32-token tiles (1 warp per CTA) to
// put more CTAs on the chip.
//
// Arithmetic:
//   * bf16 / fp16 (compute capability >= 8.0): tensor cores through nvcuda::wmma 16x16x16
//     (mma.sync HMMA on sm_80 and sm_90; no wgmma), fp32 accumulation, one rounding at the end.
//   * fp32 / fp64: plain FFMA / DFMA (IEEE, no tf32): the same numbers as F.linear with
//     torch.backends.cuda.matmul.allow_tf32 = False (PyTorch's default).
// Weight gradient: one CTA per (kept block, token split); each writes an fp32 (fp64 for double)
// partial B x B block, summed over the splits afterwards (deterministic, no atomics).
//
// Index contents (crow/col/ccol/row/perm values) are trusted: ANDCLinear builds and checks them in
// Python; checking them here would cost a device-to-host sync per call. Shapes, dtypes, devices are
// checked (TORCH_CHECK) before anything is written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <unordered_map>

namespace cctk {
namespace {

constexpr int kCols = 64;             // output columns per CTA (G blocks of B)
constexpr int kSimtThreads = 256;     // FFMA kernels
constexpr int kSimtBM = 64;           // FFMA token tile
constexpr int kWgradRows = 64;        // tokens per staged chunk in the tensor-core weight gradient
constexpr int kWgradSimtRows = 32;    // same, FFMA weight gradient

// ------------------------------------------------------------------------------------------------
// Element helpers

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Two rounded 16-bit values in one 32-bit word (lo in the low half: memory order).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  return uint32_t(__half_as_ushort(__float2half_rn(lo))) | (uint32_t(__half_as_ushort(__float2half_rn(hi))) << 16);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (uint32_t(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}


// Copy 8 consecutive 16-bit elements a[k .. k+8) of one row into shared memory, zero-filling past
// k_lim (or everything when the row is out of range). 16-byte vector load when allowed.
template <typename T>
__device__ __forceinline__ void stage8(T* dst, const T* __restrict__ src_row, int64_t k, int64_t k_lim,
                                       bool row_ok, bool vec_ok) {
  static_assert(sizeof(T) == 2, "16-bit elements");
  if (row_ok && vec_ok && k + 8 <= k_lim) {
    *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src_row + k));
    return;
  }
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src_row);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma unroll
  for (int t = 0; t < 8; ++t) d[t] = (row_ok && k + t < k_lim) ? s[k + t] : uint16_t(0);
}

// ------------------------------------------------------------------------------------------------
// Gather GEMM on tensor cores (bf16 / fp16)
//
// CTA: WARPS_M warps, BM = 32 * WARPS_M tokens x 64 columns (G = 64 / B output blocks). Per warp:
// 32 token rows x 64 columns = 2 x 4 accumulator fragments (64 fp32 registers per thread).

template <typename NT, int B, int WARPS_M>
struct GatherMmaSmem {
  static constexpr int G = kCols / B;
  static constexpr int BM = 32 * WARPS_M;
  static constexpr int LDS = B + 8;          // padded row (16-bit elements): 16-byte multiple, fewer bank conflicts
  static constexpr int LDC = kCols + 4;      // fp32 epilogue row
  static constexpr size_t x_elems = size_t(G) * BM * LDS;
  static constexpr size_t w_elems = size_t(G) * B * LDS;
  static constexpr size_t stage_bytes = (x_elems + w_elems) * sizeof(NT);
  static constexpr size_t epi_bytes = size_t(BM) * LDC * sizeof(float);
  static constexpr size_t bytes = stage_bytes > epi_bytes ? stage_bytes : epi_bytes;
};

template <typename NT, int B, int WARPS_M, bool TRANS_V, bool HAS_PERM>
__global__ void __launch_bounds__(32 * WARPS_M)
bsr_gather_mma_kernel(const NT* __restrict__ a, int64_t lda, const NT* __restrict__ v,
                      const int* __restrict__ ptr, const int* __restrict__ idx, const int* __restrict__ perm,
                      const int* __restrict__ order, const NT* __restrict__ bias, NT* __restrict__ out,
                      int64_t ldo, int64_t M, int64_t k_features, int64_t n_features, int n_block_out,
                      int n_groups, bool vec_ok, bool vec_out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using S = GatherMmaSmem<NT, B, WARPS_M>;
  constexpr int G = S::G, BM = S::BM, LDS = S::LDS, LDC = S::LDC;
  constexpr int KF = B / 16;        // k steps per block
  constexpr int NF = B / 16;        // n fragments per output block
  constexpr int THREADS = 32 * WARPS_M;
  constexpr int CH = B / 8;         // 8-element chunks per row of a block

  extern __shared__ __align__(128) unsigned char smem_raw[];
  NT* xs = reinterpret_cast<NT*>(smem_raw);
  NT* ws = xs + S::x_elems;
  float* cs = reinterpret_cast<float*>(smem_raw);

  const int warp = threadIdx.x >> 5;
  const int group = blockIdx.x % n_groups;
  const int64_t m0 = int64_t(blockIdx.x / n_groups) * BM;

  int beg[G], cnt[G];
  int max_cnt = 0;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int q = group * G + g;
    if (q < n_block_out) {
      const int o = order[q];
      beg[g] = ptr[o];
      cnt[g] = ptr[o + 1] - beg[g];
    } else {
      beg[g] = 0;
      cnt[g] = 0;
    }
    max_cnt = max(max_cnt, cnt[g]);
  }

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][G * NF];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int f = 0; f < G * NF; ++f) wmma::fill_fragment(acc[mi][f], 0.0f);

  for (int s = 0; s < max_cnt; ++s) {
    // ---- stage the s-th activation tile and weight block of every active output block
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (s < cnt[g]) {
        const int e = beg[g] + s;
        const int64_t kb = idx[e];
        const int64_t vi = HAS_PERM ? perm[e] : e;
        NT* xg = xs + size_t(g) * BM * LDS;
        for (int c = threadIdx.x; c < BM * CH; c += THREADS) {
          const int row = c / CH, ch = c % CH;
          const int64_t gm = m0 + row;
          stage8(xg + row * LDS + ch * 8, a + (gm < M ? gm : 0) * lda, kb * B + ch * 8, k_features, gm < M,
                 vec_ok);
        }
        NT* wg = ws + size_t(g) * B * LDS;
        const NT* vb = v + vi * (B * B);
        for (int c = threadIdx.x; c < B * CH; c += THREADS) {
          const int row = c / CH, ch = c % CH;
          *reinterpret_cast<uint4*>(wg + row * LDS + ch * 8) =
              __ldg(reinterpret_cast<const uint4*>(vb + row * B + ch * 8));
        }
      }
    }
    __syncthreads();
    // ---- tensor-core products: warp rows [32*warp, 32*warp + 32) of the tile
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (s < cnt[g]) {
        const NT* xg = xs + size_t(g) * BM * LDS + size_t(warp) * 32 * LDS;
        const NT* wg = ws + size_t(g) * B * LDS;
#pragma unroll
        for (int kk = 0; kk < KF; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, NT, wmma::row_major> af[2];
          wmma::load_matrix_sync(af[0], xg + kk * 16, LDS);
          wmma::load_matrix_sync(af[1], xg + 16 * LDS + kk * 16, LDS);
#pragma unroll
          for (int j = 0; j < NF; ++j) {
            if constexpr (TRANS_V) {
              // op(V)[k, n] = V[n, k]: V row-major in smem is op(V) column-major
              wmma::fragment<wmma::matrix_b, 16, 16, 16, NT, wmma::col_major> bf;
              wmma::load_matrix_sync(bf, wg + (j * 16) * LDS + kk * 16, LDS);
              wmma::mma_sync(acc[0][g * NF + j], af[0], bf, acc[0][g * NF + j]);
              wmma::mma_sync(acc[1][g * NF + j], af[1], bf, acc[1][g * NF + j]);
            } else {
              wmma::fragment<wmma::matrix_b, 16, 16, 16, NT, wmma::row_major> bf;
              wmma::load_matrix_sync(bf, wg + (kk * 16) * LDS + j * 16, LDS);
              wmma::mma_sync(acc[0][g * NF + j], af[0], bf, acc[0][g * NF + j]);
              wmma::mma_sync(acc[1][g * NF + j], af[1], bf, acc[1][g * NF + j]);
            }
          }
        }
      }
    }
    __syncthreads();
  }

  // ---- epilogue: fragments -> smem (fp32) -> bias, rounding, bounds-checked stores of 8 elements
  //      (one 16-byte store when aligned and inside out_features)
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int f = 0; f < G * NF; ++f)
      wmma::store_matrix_sync(cs + size_t(warp * 32 + mi * 16) * LDC + f * 16, acc[mi][f], LDC,
                              wmma::mem_row_major);
  __syncthreads();
  constexpr int C8 = kCols / 8;  // 8-column chunks (never straddle two output blocks: B >= 16)
  for (int c = threadIdx.x; c < BM * C8; c += THREADS) {
    const int row = c / C8, col = (c % C8) * 8;
    const int g = col / B, b = col % B;
    const int q = group * G + g;
    const int64_t gm = m0 + row;
    if (q >= n_block_out || gm >= M) continue;
    const int64_t n = int64_t(order[q]) * B + b;
    if (n >= n_features) continue;
    const float4 lo = *reinterpret_cast<const float4*>(cs + row * LDC + col);
    const float4 hi = *reinterpret_cast<const float4*>(cs + row * LDC + col + 4);
    float acc8[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    if (bias != nullptr) {
#pragma unroll
      for (int t = 0; t < 8; ++t)
        if (n + t < n_features) acc8[t] += to_float(bias[n + t]);
    }
    NT* dst = out + gm * ldo + n;
    if (vec_out && n + 8 <= n_features) {
      // one 16-byte store: 8 rounded values packed in pairs
      // (__stcg: a plain uint4 assignment was split into four 32-bit stores by NVVM)
      __stcg(reinterpret_cast<uint4*>(dst), make_uint4(pack2<NT>(acc8[0], acc8[1]), pack2<NT>(acc8[2], acc8[3]),
                                                       pack2<NT>(acc8[4], acc8[5]), pack2<NT>(acc8[6], acc8[7])));
    } else {
#pragma unroll
      for (int t = 0; t < 8; ++t)
        if (n + t < n_features) dst[t] = from_acc<NT>(acc8[t]);
    }
  }
#else
  __trap();  // launched only on compute capability >= 8.0 (checked on the host)
#endif
}

// ------------------------------------------------------------------------------------------------
// Gather GEMM with FFMA (fp32, fp64): CTA of 256 threads, 64 tokens x 64 columns, 4 x 4 outputs
// per thread (all inside one output block since B >= 16).

template <typename T, int B>
struct GatherSimtSmem {
  static constexpr int G = kCols / B;
  static constexpr int LDX = B + 1;   // x tile row (odd: conflict-free column reads)
  static constexpr int LDW = B + 4;   // w tile row [k][n], 4 consecutive n per thread
  static constexpr size_t x_elems = size_t(G) * kSimtBM * LDX;
  static constexpr size_t w_elems = size_t(G) * B * LDW;
  static constexpr size_t bytes = (x_elems + w_elems) * sizeof(T);
};

template <typename T, int B, bool TRANS_V, bool HAS_PERM>
__global__ void __launch_bounds__(kSimtThreads)
bsr_gather_simt_kernel(const T* __restrict__ a, int64_t lda, const T* __restrict__ v,
                       const int* __restrict__ ptr, const int* __restrict__ idx, const int* __restrict__ perm,
                       const int* __restrict__ order, const T* __restrict__ bias, T* __restrict__ out,
                       int64_t ldo, int64_t M, int64_t k_features, int64_t n_features, int n_block_out,
                       int n_groups) {
  using S = GatherSimtSmem<T, B>;
  constexpr int G = S::G, LDX = S::LDX, LDW = S::LDW, BM = kSimtBM;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  T* ws = xs + S::x_elems;

  const int tid = threadIdx.x;
  const int tm = tid / 16, tn = tid % 16;          // 16 x 16 threads, 4 x 4 outputs each
  const int my_g = (tn * 4) / B, my_b0 = (tn * 4) % B;
  const int group = blockIdx.x % n_groups;
  const int64_t m0 = int64_t(blockIdx.x / n_groups) * BM;

  int beg[G], cnt[G];
  int max_cnt = 0, my_cnt = 0;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int q = group * G + g;
    if (q < n_block_out) {
      const int o = order[q];
      beg[g] = ptr[o];
      cnt[g] = ptr[o + 1] - beg[g];
    } else {
      beg[g] = 0;
      cnt[g] = 0;
    }
    max_cnt = max(max_cnt, cnt[g]);
    if (g == my_g) my_cnt = cnt[g];
  }

  T acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = T(0);

  for (int s = 0; s < max_cnt; ++s) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (s < cnt[g]) {
        const int e = beg[g] + s;
        const int64_t kb = idx[e];
        const int64_t vi = HAS_PERM ? perm[e] : e;
        T* xg = xs + size_t(g) * BM * LDX;
        for (int c = tid; c < BM * B; c += kSimtThreads) {
          const int row = c / B, k = c % B;
          const int64_t gm = m0 + row, gk = kb * B + k;
          xg[row * LDX + k] = (gm < M && gk < k_features) ? a[gm * lda + gk] : T(0);
        }
        T* wg = ws + size_t(g) * B * LDW;   // wg[k][n] = op(V)[k, n]
        const T* vb = v + vi * (B * B);
        for (int c = tid; c < B * B; c += kSimtThreads) {
          const int r = c / B, q2 = c % B;  // V[r][q2]
          if constexpr (TRANS_V) wg[q2 * LDW + r] = vb[c];
          else wg[r * LDW + q2] = vb[c];
        }
      }
    }
    __syncthreads();
    if (s < my_cnt) {
      const T* xg = xs + size_t(my_g) * BM * LDX + size_t(tm) * 4 * LDX;
      const T* wg = ws + size_t(my_g) * B * LDW + my_b0;
#pragma unroll 8
      for (int k = 0; k < B; ++k) {
        T av[4], wv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = xg[i * LDX + k];
#pragma unroll
        for (int j = 0; j < 4; ++j) wv[j] = wg[k * LDW + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fma(av[i], wv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

  const int q = group * G + my_g;
  if (q >= n_block_out) return;
  const int64_t n0 = int64_t(order[q]) * B + my_b0;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gm = m0 + tm * 4 + i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + j;
      if (n < n_features) out[gm * ldo + n] = acc[i][j] + (bias != nullptr ? bias[n] : T(0));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Weight gradient on tensor cores: CTA (kept block i, token split s), 4 warps.
// part[s, i] = gout[m_s, r*B : r*B+B]^T @ x[m_s, c*B : c*B+B]  (fp32)

template <typename NT, int B>
struct WgradMmaSmem {
  static constexpr int LDS = B + 8;
  static constexpr int LDC = B + 4;
  static constexpr int FR = (B / 16) * (B / 16);          // output fragments
  static constexpr int KG = FR >= 4 ? 1 : 4 / FR;         // warps splitting the k (token) steps
  static constexpr size_t stage_bytes = size_t(2) * kWgradRows * LDS * sizeof(NT);
  static constexpr size_t epi_bytes = size_t(KG) * B * LDC * sizeof(float);
  static constexpr size_t bytes = stage_bytes > epi_bytes ? stage_bytes : epi_bytes;
};

template <typename NT, int B>
__global__ void __launch_bounds__(128)
bsr_wgrad_mma_kernel(const NT* __restrict__ gout, int64_t ldg, const NT* __restrict__ x, int64_t ldx,
                     const int* __restrict__ brow, const int* __restrict__ col, float* __restrict__ part,
                     int64_t M, int64_t rows_per_split, int64_t out_features, int64_t in_features, int nnz,
                     bool vec_g, bool vec_x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  using S = WgradMmaSmem<NT, B>;
  constexpr int LDS = S::LDS, LDC = S::LDC, FR = S::FR, KG = S::KG;
  constexpr int NB = B / 16;                     // fragments per side
  constexpr int FPW = FR >= 4 ? FR / 4 : 1;      // fragments per warp
  constexpr int KSTEPS = kWgradRows / 16;
  constexpr int CH = B / 8;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  NT* gs = reinterpret_cast<NT*>(smem_raw);
  NT* xs = gs + kWgradRows * LDS;
  float* cs = reinterpret_cast<float*>(smem_raw);

  const int warp = threadIdx.x >> 5;
  const int i = blockIdx.x;
  const int64_t r = brow[i], c = col[i];
  const int64_t m_lo = int64_t(blockIdx.y) * rows_per_split;
  const int64_t m_hi = min(M, m_lo + rows_per_split);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FPW];
#pragma unroll
  for (int f = 0; f < FPW; ++f) wmma::fill_fragment(acc[f], 0.0f);

  for (int64_t m0 = m_lo; m0 < m_hi; m0 += kWgradRows) {
    for (int t = threadIdx.x; t < kWgradRows * CH; t += 128) {
      const int row = t / CH, ch = t % CH;
      const int64_t gm = m0 + row;
      const bool ok = gm < m_hi;
      stage8(gs + row * LDS + ch * 8, gout + (ok ? gm : 0) * ldg, r * B + ch * 8, out_features, ok, vec_g);
      stage8(xs + row * LDS + ch * 8, x + (ok ? gm : 0) * ldx, c * B + ch * 8, in_features, ok, vec_x);
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < FPW; ++f) {
      const int frag = FR >= 4 ? warp * FPW + f : warp % FR;
      const int fa = frag / NB, fb = frag % NB;
#pragma unroll
      for (int ks = 0; ks < KSTEPS; ++ks) {
        if (FR < 4 && (ks % KG) != warp / FR) continue;
        // A = gout^T: A[a, m] = gs[m][a] -> column-major with leading dimension LDS
        wmma::fragment<wmma::matrix_a, 16, 16, 16, NT, wmma::col_major> af;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, NT, wmma::row_major> bf;
        wmma::load_matrix_sync(af, gs + (ks * 16) * LDS + fa * 16, LDS);
        wmma::load_matrix_sync(bf, xs + (ks * 16) * LDS + fb * 16, LDS);
        wmma::mma_sync(acc[f], af, bf, acc[f]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int f = 0; f < FPW; ++f) {
    const int frag = FR >= 4 ? warp * FPW + f : warp % FR;
    const int fa = frag / NB, fb = frag % NB;
    const int kg = FR >= 4 ? 0 : warp / FR;
    wmma::store_matrix_sync(cs + size_t(kg) * B * LDC + (fa * 16) * LDC + fb * 16, acc[f], LDC,
                            wmma::mem_row_major);
  }
  __syncthreads();
  float* dst = part + (int64_t(blockIdx.y) * nnz + i) * (B * B);
  for (int t = threadIdx.x; t < B * B; t += 128) {
    const int aa = t / B, bb = t % B;
    float sum = 0.f;
#pragma unroll
    for (int kg = 0; kg < KG; ++kg) sum += cs[size_t(kg) * B * LDC + aa * LDC + bb];
    dst[t] = sum;
  }
#else
  __trap();
#endif
}

// Weight gradient with FFMA (fp32 / fp64): 256 threads, (B/16) x (B/16) outputs per thread.
template <typename T, int B>
__global__ void __launch_bounds__(kSimtThreads)
bsr_wgrad_simt_kernel(const T* __restrict__ gout, int64_t ldg, const T* __restrict__ x, int64_t ldx,
                      const int* __restrict__ brow, const int* __restrict__ col, T* __restrict__ part,
                      int64_t M, int64_t rows_per_split, int64_t out_features, int64_t in_features, int nnz) {
  constexpr int R = B / 16;
  constexpr int LD = B + 1;
  constexpr int CHR = kWgradSimtRows;
  __shared__ T gs[CHR * LD];
  __shared__ T xs[CHR * LD];
  const int tid = threadIdx.x;
  const int ta = tid / 16, tb = tid % 16;
  const int i = blockIdx.x;
  const int64_t r = brow[i], c = col[i];
  const int64_t m_lo = int64_t(blockIdx.y) * rows_per_split;
  const int64_t m_hi = min(M, m_lo + rows_per_split);
  T acc[R][R];
#pragma unroll
  for (int p = 0; p < R; ++p)
#pragma unroll
    for (int q = 0; q < R; ++q) acc[p][q] = T(0);
  for (int64_t m0 = m_lo; m0 < m_hi; m0 += CHR) {
    for (int t = tid; t < CHR * B; t += kSimtThreads) {
      const int row = t / B, k = t % B;
      const int64_t gm = m0 + row;
      const bool ok = gm < m_hi;
      const int64_t na = r * B + k, kb = c * B + k;
      gs[row * LD + k] = (ok && na < out_features) ? gout[gm * ldg + na] : T(0);
      xs[row * LD + k] = (ok && kb < in_features) ? x[gm * ldx + kb] : T(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int m = 0; m < CHR; ++m) {
      T gv[R], xv[R];
#pragma unroll
      for (int p = 0; p < R; ++p) gv[p] = gs[m * LD + ta * R + p];
#pragma unroll
      for (int q = 0; q < R; ++q) xv[q] = xs[m * LD + tb * R + q];
#pragma unroll
      for (int p = 0; p < R; ++p)
#pragma unroll
        for (int q = 0; q < R; ++q) acc[p][q] = fma(gv[p], xv[q], acc[p][q]);
    }
    __syncthreads();
  }
  T* dst = part + (int64_t(blockIdx.y) * nnz + i) * (B * B);
#pragma unroll
  for (int p = 0; p < R; ++p)
#pragma unroll
    for (int q = 0; q < R; ++q) dst[(ta * R + p) * B + tb * R + q] = acc[p][q];
}

// ------------------------------------------------------------------------------------------------
// Host side

bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

void check_index(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like,
                 int64_t length) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but the inputs are on ",
              like.device());
  TORCH_CHECK(length < 0 || t.size(0) == length, op, ": ", name, " must have ", length, " entries, got ",
              t.size(0));
}

int64_t check_values(const at::Tensor& values, const at::Tensor& like, const char* op) {
  TORCH_CHECK(values.dim() == 3 && values.size(1) == values.size(2), op,
              ": values must be (nnz, B, B), got shape ", values.sizes());
  const int64_t B = values.size(1);
  TORCH_CHECK(B == 16 || B == 32 || B == 64, op, ": block size must be 16, 32 or 64, got ", B);
  TORCH_CHECK(values.scalar_type() == like.scalar_type(), op, ": values dtype ", values.scalar_type(),
              " differs from the input dtype ", like.scalar_type());
  TORCH_CHECK(values.device() == like.device(), op, ": values is on ", values.device(), " but the inputs are on ",
              like.device());
  return B;
}

void check_activation(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (rows, features), got shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " dtype must be float32, float64, float16 or bfloat16, got ", st);
}

// Contiguous, 16-byte aligned copy of values when needed (the tensor-core kernels read it in
// 16-byte vectors).
at::Tensor values_for_kernel(const at::Tensor& values) {
  auto v = values.contiguous();
  if (!is_aligned16(v.data_ptr())) v = v.clone();
  return v;
}

bool tensor_cores_ok(const at::Tensor& t) {
  const auto st = t.scalar_type();
  if (st != at::kHalf && st != at::kBFloat16) return false;
  const auto* prop = at::cuda::getDeviceProperties(t.device().index());
  return prop->major >= 8;
}

// ---- order of the output blocks by decreasing kept-block count, cached per pointer tensor.
// A stale cache entry (same storage re-filled) can only yield a different permutation of the
// output blocks: scheduling quality, never correctness, depends on it.
struct OrderKey {
  const void* data;
  int64_t numel;
  int64_t version;
  int device;
  bool operator==(const OrderKey& o) const {
    return data == o.data && numel == o.numel && version == o.version && device == o.device;
  }
};
struct OrderKeyHash {
  size_t operator()(const OrderKey& k) const {
    return std::hash<const void*>()(k.data) ^ (std::hash<int64_t>()(k.numel) * 31) ^
           (std::hash<int64_t>()(k.version) * 131) ^ (size_t(k.device) << 7);
  }
};

at::Tensor compute_order(const at::Tensor& ptr) {
  auto counts = ptr.slice(0, 1).sub(ptr.slice(0, 0, ptr.size(0) - 1));
  return std::get<1>(counts.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)).to(at::kInt);
}

// A cached order computed on one stream and used on another: the user's stream waits for the
// event recorded after its computation, and the tensor is marked used there (record_stream), so
// neither a read-before-write nor a reuse of its memory after eviction can race.
// CUDA-graph capture uses the cache too (else every captured call would sort), but may neither
// wait on an event recorded outside the capture nor query one, so it takes only an entry already
// seen complete by an eager call (`done`, set from a query outside capture) and pins it: a graph
// may replay it at any later time, so a pinned entry is never evicted. An entry not yet seen
// complete is recomputed inside the capture (in the graph's private pool), as without a cache.
struct OrderEntry {
  at::Tensor order;
  cudaStream_t stream;
  std::shared_ptr<at::cuda::CUDAEvent> ready;
  bool done = false;    // the event was seen complete (queried outside capture)
  bool pinned = false;  // read by a captured graph: kept for the life of the process
};

at::Tensor block_order(const at::Tensor& ptr) {
  static std::mutex mu;
  static std::unordered_map<OrderKey, OrderEntry, OrderKeyHash> cache;
  static std::list<OrderKey> fifo;  // insertion order of the unpinned entries
  constexpr size_t kCap = 256;
  auto cur = at::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(cur.stream(), &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;
  // Inference tensors have no version counter (_version() throws): key them with -1. A stale
  // entry can only change the schedule (any permutation of the blocks gives the same result).
  const int64_t version = ptr.is_inference() ? -1 : int64_t(ptr._version());
  OrderKey key{ptr.data_ptr(), ptr.numel(), version, int(ptr.device().index())};
  if (capturing) {
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = cache.find(key);
      if (it != cache.end() && it->second.done) {
        if (!it->second.pinned) {
          it->second.pinned = true;
          fifo.remove(key);
        }
        return it->second.order;
      }
    }
    return compute_order(ptr);
  }
  std::optional<OrderEntry> hit;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) {
      if (!it->second.done && it->second.ready->query()) it->second.done = true;
      hit = it->second;
    }
  }
  if (hit) {
    if (hit->stream != cur.stream() && !hit->done) hit->ready->block(cur);
    if (hit->stream != cur.stream() && !hit->pinned) hit->order.record_stream(cur);
    return hit->order;
  }
  at::Tensor order = compute_order(ptr);
  auto ready = std::make_shared<at::cuda::CUDAEvent>();
  ready->record(cur);
  std::lock_guard<std::mutex> lock(mu);
  if (fifo.size() >= kCap) {
    cache.erase(fifo.front());
    fifo.pop_front();
  }
  if (cache.emplace(key, OrderEntry{order, cur.stream(), ready}).second) fifo.push_back(key);
  return order;
}

int sm_count(const at::Tensor& t) { return at::cuda::getDeviceProperties(t.device().index())->multiProcessorCount; }

void set_smem(const void* kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
}

// out (M, n_features) = gather GEMM of a (M, k_features) over the pointer list (ptr, idx[, perm]).
template <bool TRANS_V, bool HAS_PERM>
void launch_gather(const at::Tensor& a, const at::Tensor& values, const at::Tensor& ptr, const at::Tensor& idx,
                   const at::Tensor* perm, const at::Tensor* bias, at::Tensor& out, int64_t k_features,
                   int64_t n_features) {
  const int64_t M = a.size(0);
  const int64_t B = values.size(1);
  const int n_block_out = int(ptr.size(0) - 1);
  if (M == 0 || n_features == 0) return;
  const int G = int(kCols / B);
  const int n_groups = (n_block_out + G - 1) / G;
  at::Tensor order = block_order(ptr);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int* perm_p = HAS_PERM ? perm->data_ptr<int>() : nullptr;

  if (tensor_cores_ok(a)) {
    const bool vec_ok = (a.stride(0) % 8 == 0) && is_aligned16(a.data_ptr());
    const bool vec_out = (out.stride(0) % 8 == 0) && is_aligned16(out.data_ptr());
    // 128-token tiles when they give >= 2 CTAs per SM, else 32-token tiles (more, smaller CTAs).
    const int64_t ctas128 = ((M + 127) / 128) * n_groups;
    const bool big = ctas128 >= 2 * sm_count(a);
    auto run = [&](auto nt_tag, auto b_tag, auto wm_tag) {
      using NT = decltype(nt_tag);
      constexpr int BB = decltype(b_tag)::value;
      constexpr int WM = decltype(wm_tag)::value;
      using S = GatherMmaSmem<NT, BB, WM>;
      const int64_t tiles = (M + S::BM - 1) / S::BM;
      const int64_t grid = tiles * n_groups;
      TORCH_CHECK(grid < (int64_t(1) << 31), "cctk::bsr_linear: too many rows (", M, ") for one launch");
      auto kernel = bsr_gather_mma_kernel<NT, BB, WM, TRANS_V, HAS_PERM>;
      set_smem(reinterpret_cast<const void*>(kernel), S::bytes);
      kernel<<<unsigned(grid), 32 * WM, S::bytes, stream>>>(
          reinterpret_cast<const NT*>(a.data_ptr()), a.stride(0), reinterpret_cast<const NT*>(values.data_ptr()),
          ptr.data_ptr<int>(), idx.data_ptr<int>(), perm_p, order.data_ptr<int>(),
          bias ? reinterpret_cast<const NT*>(bias->data_ptr()) : nullptr, reinterpret_cast<NT*>(out.data_ptr()),
          out.stride(0), M, k_features, n_features, n_block_out, n_groups, vec_ok, vec_out);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto by_block = [&](auto nt_tag, auto wm_tag) {
      if (B == 16) run(nt_tag, std::integral_constant<int, 16>{}, wm_tag);
      else if (B == 32) run(nt_tag, std::integral_constant<int, 32>{}, wm_tag);
      else run(nt_tag, std::integral_constant<int, 64>{}, wm_tag);
    };
    auto by_tile = [&](auto nt_tag) {
      if (big) by_block(nt_tag, std::integral_constant<int, 4>{});
      else by_block(nt_tag, std::integral_constant<int, 1>{});
    };
    if (a.scalar_type() == at::kHalf) by_tile(__half{});
    else by_tile(__nv_bfloat16{});
    return;
  }

  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "cctk::bsr_linear (CUDA): float16/bfloat16 need compute capability 8.0+ (tensor cores); this GPU is ",
              at::cuda::getDeviceProperties(a.device().index())->major, ".",
              at::cuda::getDeviceProperties(a.device().index())->minor,
              ". Use float32, or backend='triton' / 'torch'");
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "bsr_linear_cuda_simt", [&] {
    auto run = [&](auto b_tag) {
      constexpr int BB = decltype(b_tag)::value;
      using S = GatherSimtSmem<scalar_t, BB>;
      const int64_t grid = ((M + kSimtBM - 1) / kSimtBM) * n_groups;
      TORCH_CHECK(grid < (int64_t(1) << 31), "cctk::bsr_linear: too many rows (", M, ") for one launch");
      auto kernel = bsr_gather_simt_kernel<scalar_t, BB, TRANS_V, HAS_PERM>;
      set_smem(reinterpret_cast<const void*>(kernel), S::bytes);
      kernel<<<unsigned(grid), kSimtThreads, S::bytes, stream>>>(
          a.data_ptr<scalar_t>(), a.stride(0), values.data_ptr<scalar_t>(), ptr.data_ptr<int>(),
          idx.data_ptr<int>(), perm_p, order.data_ptr<int>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(), out.stride(0), M, k_features, n_features, n_block_out, n_groups);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (B == 16) run(std::integral_constant<int, 16>{});
    else if (B == 32) run(std::integral_constant<int, 32>{});
    else run(std::integral_constant<int, 64>{});
  });
}

at::Tensor bsr_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow_indices,
                           const at::Tensor& col_indices, const std::optional<at::Tensor>& bias,
                           int64_t out_features) {
  constexpr const char* op = "cctk::bsr_linear (CUDA)";
  check_activation(x, op, "x");
  const int64_t B = check_values(values, x, op);
  TORCH_CHECK(out_features >= 0, op, ": out_features must be >= 0, got ", out_features);
  const int64_t n_rows = (out_features + B - 1) / B;
  check_index(crow_indices, op, "crow_indices", x, n_rows + 1);
  check_index(col_indices, op, "col_indices", x, values.size(0));
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op, ": bias must be (", out_features,
                "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->device() == x.device(), op,
                ": bias must have x's dtype and device");
  }
  c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto vc = values_for_kernel(values);
  auto crow = crow_indices.contiguous();
  auto col = col_indices.contiguous();
  at::Tensor bc;
  if (bias.has_value()) bc = bias->contiguous();
  auto out = at::empty({xc.size(0), out_features}, xc.options());
  launch_gather</*TRANS_V=*/true, /*HAS_PERM=*/false>(xc, vc, crow, col, nullptr, bias.has_value() ? &bc : nullptr,
                                                      out, xc.size(1), out_features);
  return out;
}

at::Tensor bsr_linear_backward_input_cuda(const at::Tensor& grad_out, const at::Tensor& values,
                                          const at::Tensor& ccol_indices, const at::Tensor& row_indices,
                                          const at::Tensor& block_perm, int64_t in_features) {
  constexpr const char* op = "cctk::bsr_linear_backward_input (CUDA)";
  check_activation(grad_out, op, "grad_out");
  const int64_t B = check_values(values, grad_out, op);
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  const int64_t n_cols = (in_features + B - 1) / B;
  check_index(ccol_indices, op, "ccol_indices", grad_out, n_cols + 1);
  check_index(row_indices, op, "row_indices", grad_out, values.size(0));
  check_index(block_perm, op, "block_perm", grad_out, values.size(0));
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto gc = grad_out.contiguous();
  auto vc = values_for_kernel(values);
  auto ccol = ccol_indices.contiguous();
  auto row = row_indices.contiguous();
  auto perm = block_perm.contiguous();
  auto gin = at::empty({gc.size(0), in_features}, gc.options());
  launch_gather</*TRANS_V=*/false, /*HAS_PERM=*/true>(gc, vc, ccol, row, &perm, nullptr, gin, gc.size(1),
                                                      in_features);
  return gin;
}

at::Tensor bsr_linear_backward_weight_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& crow_indices, const at::Tensor& col_indices,
                                           int64_t block_size) {
  constexpr const char* op = "cctk::bsr_linear_backward_weight (CUDA)";
  check_activation(grad_out, op, "grad_out");
  check_activation(x, op, "x");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(), op,
              ": grad_out and x must have one dtype and device");
  TORCH_CHECK(grad_out.size(0) == x.size(0), op, ": grad_out has ", grad_out.size(0), " rows but x has ",
              x.size(0));
  const int64_t B = block_size;
  TORCH_CHECK(B == 16 || B == 32 || B == 64, op, ": block size must be 16, 32 or 64, got ", B);
  const int64_t M = x.size(0), in_features = x.size(1), out_features = grad_out.size(1);
  const int64_t n_rows = (out_features + B - 1) / B;
  check_index(crow_indices, op, "crow_indices", x, n_rows + 1);
  check_index(col_indices, op, "col_indices", x, -1);
  const int64_t nnz = col_indices.size(0);
  TORCH_CHECK(nnz < (int64_t(1) << 31), op, ": too many kept blocks");
  c10::cuda::CUDAGuard guard(x.device());
  if (nnz == 0) return at::empty({0, B, B}, x.options());
  if (M == 0) return at::zeros({nnz, B, B}, x.options());
  auto gc = grad_out.contiguous();
  auto xc = x.contiguous();
  auto crow = crow_indices.contiguous();
  auto col = col_indices.contiguous();
  // block-row of each kept block
  auto counts = crow.slice(0, 1).sub(crow.slice(0, 0, n_rows)).to(at::kLong);
  auto brow = at::repeat_interleave(at::arange(n_rows, crow.options().dtype(at::kLong)), counts, /*dim=*/0,
                                    /*output_size=*/nnz)
                  .to(at::kInt)
                  .contiguous();

  const bool tc = tensor_cores_ok(xc);
  const int64_t chunk = tc ? kWgradRows : kWgradSimtRows;
  // splits of the token dimension: ~4 CTAs per SM in all, each with >= 4 chunks of tokens
  const int64_t want = (4 * int64_t(sm_count(xc)) + nnz - 1) / nnz;
  const int64_t max_splits = std::max<int64_t>(1, (M + 4 * chunk - 1) / (4 * chunk));
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, max_splits, 65535}));
  int64_t rows_per_split = ((M + splits - 1) / splits + chunk - 1) / chunk * chunk;
  splits = (M + rows_per_split - 1) / rows_per_split;
  const dim3 grid{unsigned(nnz), unsigned(splits), 1u};
  auto stream = at::cuda::getCurrentCUDAStream();

  if (tc) {
    auto part = at::empty({splits, nnz, B, B}, xc.options().dtype(at::kFloat));
    const bool vec_g = (gc.stride(0) % 8 == 0) && is_aligned16(gc.data_ptr());
    const bool vec_x = (xc.stride(0) % 8 == 0) && is_aligned16(xc.data_ptr());
    auto run = [&](auto nt_tag, auto b_tag) {
      using NT = decltype(nt_tag);
      constexpr int BB = decltype(b_tag)::value;
      using S = WgradMmaSmem<NT, BB>;
      auto kernel = bsr_wgrad_mma_kernel<NT, BB>;
      set_smem(reinterpret_cast<const void*>(kernel), S::bytes);
      kernel<<<grid, 128, S::bytes, stream>>>(
          reinterpret_cast<const NT*>(gc.data_ptr()), gc.stride(0), reinterpret_cast<const NT*>(xc.data_ptr()),
          xc.stride(0), brow.data_ptr<int>(), col.data_ptr<int>(), part.data_ptr<float>(), M, rows_per_split,
          out_features, in_features, int(nnz), vec_g, vec_x);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto by_block = [&](auto nt_tag) {
      if (B == 16) run(nt_tag, std::integral_constant<int, 16>{});
      else if (B == 32) run(nt_tag, std::integral_constant<int, 32>{});
      else run(nt_tag, std::integral_constant<int, 64>{});
    };
    if (xc.scalar_type() == at::kHalf) by_block(__half{});
    else by_block(__nv_bfloat16{});
    return (splits == 1 ? part.select(0, 0) : part.sum(0)).to(x.scalar_type());
  }

  TORCH_CHECK(xc.scalar_type() == at::kFloat || xc.scalar_type() == at::kDouble, op,
              ": float16/bfloat16 need compute capability 8.0+ (tensor cores); use float32, or backend='triton' / "
              "'torch'");
  auto part = at::empty({splits, nnz, B, B}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "bsr_linear_backward_weight_cuda_simt", [&] {
    auto run = [&](auto b_tag) {
      constexpr int BB = decltype(b_tag)::value;
      bsr_wgrad_simt_kernel<scalar_t, BB><<<grid, kSimtThreads, 0, stream>>>(
          gc.data_ptr<scalar_t>(), gc.stride(0), xc.data_ptr<scalar_t>(), xc.stride(0), brow.data_ptr<int>(),
          col.data_ptr<int>(), part.data_ptr<scalar_t>(), M, rows_per_split, out_features, in_features, int(nnz));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (B == 16) run(std::integral_constant<int, 16>{});
    else if (B == 32) run(std::integral_constant<int, 32>{});
    else run(std::integral_constant<int, 64>{});
  });
  return splits == 1 ? part.select(0, 0).contiguous() : part.sum(0);
}

}  // namespace

TORCH_LIBRARY_IMPL(cctk, CUDA, m) {
  m.impl("bsr_linear", &bsr_linear_cuda);
  m.impl("bsr_linear_backward_input", &bsr_linear_backward_input_cuda);
  m.impl("bsr_linear_backward_weight", &bsr_linear_backward_weight_cuda);
}

}  // namespace cctk
