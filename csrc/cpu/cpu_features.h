// Run-time choice of the CPU code path. Kernels compiled with
// __attribute__((target("avx512f,..."))) are only called when detect() says the CPU has them,
// so one binary runs on any x86-64 (and on other architectures through the scalar path).
#pragma once
#include <cstdlib>
#include <string>

namespace cctk {
namespace cpu {

enum class Capability { Scalar = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };

inline Capability detect_uncached() {
  // CCTK_CPU_CAPABILITY=scalar|avx2|avx512 caps the path (tests use it to exercise fallbacks).
  const char* env = std::getenv("CCTK_CPU_CAPABILITY");
  Capability cap = Capability::Scalar;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) cap = Capability::AVX2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    cap = Capability::AVX512;
#if defined(__GNUC__) && (__GNUC__ >= 10)
  if (cap == Capability::AVX512 && __builtin_cpu_supports("avx512bf16")) cap = Capability::AVX512_BF16;
#endif
#endif
  if (env != nullptr) {
    std::string s(env);
    Capability want = cap;
    if (s == "scalar") want = Capability::Scalar;
    else if (s == "avx2") want = Capability::AVX2;
    else if (s == "avx512") want = Capability::AVX512;
    if (static_cast<int>(want) < static_cast<int>(cap)) cap = want;
  }
  return cap;
}

inline Capability detect() {
  static Capability cap = detect_uncached();
  return cap;
}

inline std::string capability_name(Capability c) {
  switch (c) {
    case Capability::AVX512_BF16: return "avx512_bf16";
    case Capability::AVX512: return "avx512";
    case Capability::AVX2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace cpu
}  // namespace cctk
