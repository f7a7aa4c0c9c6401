// Run-time choice of the CPU code path. Kernels compiled with
// __attribute__((target("avx512f,..."))) are only called when detect() says the CPU has them,
// so one binary runs on any x86-64 (and on other architectures through the scalar path).
//
// Levels, lowest first: scalar, AVX2+FMA, AVX-512 (F/BW/VL/DQ), AVX512-BF16, AMX (tiles +
// AMX-BF16 on top of AVX512-BF16). AMX is chosen only when cpuid reports amx-tile and amx-bf16,
// the OS enables the tile state in XCR0, **and** the kernel grants this process the tile data
// (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)); a CPU without AMX never reports it.
//
// CCTK_CPU_CAPABILITY=scalar|avx2|avx512|avx512_bf16|amx caps the level (never raises it).
// CCTK_CPU_CAPABILITY=amx_emulated keeps the best real level for every other kernel and runs the
// AMX tile kernels over a scalar emulator of the tile instructions (csrc/cpu/amx_tiles.h), so
// their packing, indexing and tail logic are tested on machines without AMX.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace cctk {
namespace cpu {

enum class Capability { Scalar = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3, AMX = 4 };

// cpuid leaf 7: AMX-BF16 (EDX bit 22), AMX-TILE (EDX bit 24); XCR0 bits 17 (XTILECFG) and 18
// (XTILEDATA) set by the OS; then ask Linux for permission to use the tile data (since 5.16).
inline bool amx_usable() {
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool tile = (d >> 24) & 1u, bf16 = (d >> 22) & 1u;
  if (!tile || !bf16) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1u)) return false;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3u) != 3u) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

struct Detected {
  Capability cap = Capability::Scalar;
  bool amx_emulated = false;  // tile kernels over the scalar emulator (tests)
};

inline Detected detect_uncached() {
  const char* env = std::getenv("CCTK_CPU_CAPABILITY");
  Detected r;
  Capability& cap = r.cap;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) cap = Capability::AVX2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    cap = Capability::AVX512;
#if defined(__GNUC__) && (__GNUC__ >= 10)
  if (cap == Capability::AVX512 && __builtin_cpu_supports("avx512bf16")) cap = Capability::AVX512_BF16;
#endif
  const std::string s = env ? std::string(env) : std::string();
  // only ask the kernel for the tile state when the AMX level may be used
  if (cap == Capability::AVX512_BF16 && (s.empty() || s == "amx") && amx_usable()) cap = Capability::AMX;
#endif
  if (env != nullptr) {
    std::string s(env);
    Capability want = cap;
    if (s == "scalar") want = Capability::Scalar;
    else if (s == "avx2") want = Capability::AVX2;
    else if (s == "avx512") want = Capability::AVX512;
    else if (s == "avx512_bf16") want = Capability::AVX512_BF16;
    else if (s == "amx_emulated") r.amx_emulated = cap < Capability::AMX;
    if (static_cast<int>(want) < static_cast<int>(cap)) cap = want;
  }
  return r;
}

inline const Detected& detected() {
  static const Detected d = detect_uncached();
  return d;
}

inline Capability detect() { return detected().cap; }

// True when the AMX tile kernels run (on the hardware, or over the emulator).
inline bool use_tiles() { return detected().cap >= Capability::AMX || detected().amx_emulated; }

inline std::string capability_name(Capability c) {
  switch (c) {
    case Capability::AMX: return "amx";
    case Capability::AVX512_BF16: return "avx512_bf16";
    case Capability::AVX512: return "avx512";
    case Capability::AVX2: return "avx2";
    default: return "scalar";
  }
}

inline std::string detected_name() {
  return capability_name(detect()) + (detected().amx_emulated ? "+amx_emulated" : "");
}

}  // namespace cpu
}  // namespace cctk
