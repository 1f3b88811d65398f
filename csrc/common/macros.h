// Portability macros shared by CPU, CUDA and emulator builds of the same headers.
#pragma once

#if defined(__CUDACC__)
#define LT_HD __host__ __device__ __forceinline__
#define LT_DEV __device__ __forceinline__
#define LT_UNROLL _Pragma("unroll")
#else
#define LT_HD inline
#define LT_DEV inline
#define LT_UNROLL
#endif
