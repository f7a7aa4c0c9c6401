// Tile backends for the AMX kernels: one kernel body (a template over the backend) runs either on
// the hardware (AmxTiles: the real tile instructions) or over a scalar emulator with the same
// semantics (EmulatedTiles: tile configuration, tileloadd, tdpbf16ps, tilestored, tilezero, rows
// and column bytes included), so the packing, indexing and tail logic of the AMX kernels run and
// are tested on machines without AMX (cpu_features.h: CCTK_CPU_CAPABILITY=amx_emulated).
//
// Tile registers are named by literals: GCC's tile intrinsics paste the tile number into the
// assembly text, so a backend's operations take the numbers as template arguments and an
// `if constexpr` ladder picks the literal instruction.
//
// The tile configuration (palette 1) is per thread: a kernel configures the tiles at the start of
// each parallel chunk and releases them at its end (TileScope), so no thread leaves the tile
// state dirty (it would slow every later context switch of that thread).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/Exception.h>

#include "cpu/vec_math.h"

#define CCTK_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
// GCC's tileloadd / tilestored / tilezero / tdpbf16ps intrinsics are inline assembly: they need no
// target attribute, so these helpers inline into the (untargeted) kernel templates.
#define CCTK_TILE_OP inline __attribute__((always_inline))

namespace cctk {
namespace tiles {

// The 64-byte tile configuration of LDTILECFG (palette 1): per tile, rows (<= 16) and bytes per
// row (<= 64).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  void set(int t, int r, int cb) {
    rows[t] = static_cast<uint8_t>(r);
    colsb[t] = static_cast<uint16_t>(cb);
  }
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even (NaN kept quiet), as VCVTNEPS2BF16 does.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// ---------------------------------------------------------------------------------------------
// Scalar emulator. Each thread has its own tile file and configuration, as on the hardware.
// What the hardware would fault on (a tile used beyond its configured shape, mismatched
// tdpbf16ps operands, no configuration loaded) is a TORCH_CHECK failure here.
struct EmulatedTiles {
  static constexpr bool kHardware = false;
  struct State {
    TileConfig cfg;
    bool configured = false;
    alignas(64) uint8_t t[8][16 * 64];
  };
  static State& state() {
    static thread_local State s;
    return s;
  }
  static void configure(const TileConfig& c) {
    for (int i = 0; i < 8; ++i)
      TORCH_CHECK(c.rows[i] <= 16 && c.colsb[i] <= 64 && c.colsb[i] % 4 == 0,
                  "amx emulator: tile ", i, " configured as ", int(c.rows[i]), " x ", c.colsb[i], " bytes");
    state().cfg = c;
    state().configured = true;
    std::memset(state().t, 0, sizeof(state().t));
  }
  static void release() { state().configured = false; }
  static void check(int t) {
    TORCH_CHECK(state().configured, "amx emulator: tile ", t, " used without a loaded configuration");
    TORCH_CHECK(state().cfg.rows[t] > 0, "amx emulator: tile ", t, " is not configured");
  }
  template <int T>
  static void zero() {
    check(T);
    std::memset(state().t[T], 0, sizeof(state().t[T]));
  }
  template <int T>
  static void load(const void* base, int64_t stride) {
    check(T);
    const int rows = state().cfg.rows[T], cb = state().cfg.colsb[T];
    std::memset(state().t[T], 0, sizeof(state().t[T]));
    for (int r = 0; r < rows; ++r)
      std::memcpy(state().t[T] + r * 64, static_cast<const uint8_t*>(base) + r * stride, cb);
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    check(T);
    const int rows = state().cfg.rows[T], cb = state().cfg.colsb[T];
    for (int r = 0; r < rows; ++r) std::memcpy(static_cast<uint8_t*>(base) + r * stride, state().t[T] + r * 64, cb);
  }
  // C[m][n] += sum_k A[m].bf16[2k] * B[k].bf16[2n] + A[m].bf16[2k+1] * B[k].bf16[2n+1]
  template <int C, int A, int B>
  static void dpbf16() {
    check(C), check(A), check(B);
    const TileConfig& c = state().cfg;
    const int M = c.rows[C], N = c.colsb[C] / 4, K = c.colsb[A] / 4;
    TORCH_CHECK(c.rows[A] == M && c.rows[B] == K && c.colsb[B] == c.colsb[C], "amx emulator: tdpbf16ps operands ",
                "C ", M, "x", c.colsb[C], ", A ", int(c.rows[A]), "x", c.colsb[A], ", B ", int(c.rows[B]), "x",
                c.colsb[B], " do not fit");
    float* acc = reinterpret_cast<float*>(state().t[C]);
    const uint16_t* a = reinterpret_cast<const uint16_t*>(state().t[A]);
    const uint16_t* b = reinterpret_cast<const uint16_t*>(state().t[B]);
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        float s = acc[m * 16 + n];
        for (int k = 0; k < K; ++k) {
          s += bf16_bits_to_float(a[m * 32 + 2 * k]) * bf16_bits_to_float(b[k * 32 + 2 * n]);
          s += bf16_bits_to_float(a[m * 32 + 2 * k + 1]) * bf16_bits_to_float(b[k * 32 + 2 * n + 1]);
        }
        acc[m * 16 + n] = s;
      }
  }
};

#if defined(CCTK_X86) && defined(__linux__)
// ---------------------------------------------------------------------------------------------
// The hardware. Called only where cpu::detect() is AMX (the permission was granted).
struct AmxTiles {
  static constexpr bool kHardware = true;
  CCTK_AMX static void configure(const TileConfig& c) { _tile_loadconfig(&c); }
  CCTK_AMX static void release() { _tile_release(); }
  template <int T>
  CCTK_TILE_OP static void zero() {
    if constexpr (T == 0) _tile_zero(0);
    else if constexpr (T == 1) _tile_zero(1);
    else if constexpr (T == 2) _tile_zero(2);
    else if constexpr (T == 3) _tile_zero(3);
    else if constexpr (T == 4) _tile_zero(4);
    else if constexpr (T == 5) _tile_zero(5);
    else if constexpr (T == 6) _tile_zero(6);
    else _tile_zero(7);
  }
  template <int T>
  CCTK_TILE_OP static void load(const void* p, int64_t s) {
    if constexpr (T == 0) _tile_loadd(0, p, s);
    else if constexpr (T == 1) _tile_loadd(1, p, s);
    else if constexpr (T == 2) _tile_loadd(2, p, s);
    else if constexpr (T == 3) _tile_loadd(3, p, s);
    else if constexpr (T == 4) _tile_loadd(4, p, s);
    else if constexpr (T == 5) _tile_loadd(5, p, s);
    else if constexpr (T == 6) _tile_loadd(6, p, s);
    else _tile_loadd(7, p, s);
  }
  template <int T>
  CCTK_TILE_OP static void store(void* p, int64_t s) {
    if constexpr (T == 0) _tile_stored(0, p, s);
    else if constexpr (T == 1) _tile_stored(1, p, s);
    else if constexpr (T == 2) _tile_stored(2, p, s);
    else if constexpr (T == 3) _tile_stored(3, p, s);
    else if constexpr (T == 4) _tile_stored(4, p, s);
    else if constexpr (T == 5) _tile_stored(5, p, s);
    else if constexpr (T == 6) _tile_stored(6, p, s);
    else _tile_stored(7, p, s);
  }
  // The kernels use C tiles 0-3, A tiles 4-5, B tiles 6-7.
#define CCTK_TDP_B(c, a)                                 \
  if constexpr (B == 6) _tile_dpbf16ps(c, a, 6);         \
  else _tile_dpbf16ps(c, a, 7);
#define CCTK_TDP_A(c)                                    \
  if constexpr (A == 4) { CCTK_TDP_B(c, 4) }             \
  else { CCTK_TDP_B(c, 5) }
  template <int C, int A, int B>
  CCTK_TILE_OP static void dpbf16() {
    static_assert(C >= 0 && C <= 3 && (A == 4 || A == 5) && (B == 6 || B == 7), "tile roles: C 0-3, A 4-5, B 6-7");
    if constexpr (C == 0) { CCTK_TDP_A(0) }
    else if constexpr (C == 1) { CCTK_TDP_A(1) }
    else if constexpr (C == 2) { CCTK_TDP_A(2) }
    else { CCTK_TDP_A(3) }
  }
#undef CCTK_TDP_A
#undef CCTK_TDP_B
};
#endif

// Configure at construction, release at destruction: one per parallel chunk.
template <typename Tiles>
struct TileScope {
  explicit TileScope(const TileConfig& c) { Tiles::configure(c); }
  ~TileScope() { Tiles::release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

}  // namespace tiles
}  // namespace cctk
