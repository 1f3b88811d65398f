// Run-time ISA dispatch for the CPU kernels: functions marked LT_MULTIVERSION are compiled for
// AVX-512, AVX2 and the baseline, and the loader picks the best one (GCC target_clones).
#pragma once

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define LT_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LT_MULTIVERSION
#endif
#define LT_ALWAYS_INLINE inline __attribute__((always_inline))
