// Just enough of CUDA C for kernels.cu to compile as host C++ and run one thread per block:
// blockDim.x = 1, so a warp holds one lane, shuffles bring in nothing and every reduction is the
// thread's own sum. What this checks is the arithmetic and the tiling (the vector and scalar
// paths, tile and chunk edges), not concurrency; the device twins (cuda_twins.rs) check that.
#pragma once
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static

struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct dim3_ { unsigned x, y, z; };
static dim3_ blockIdx, threadIdx, blockDim = {1, 1, 1}, gridDim = {1, 1, 1};

template <class T> T __shfl_down_sync(unsigned, T, int) { return 0; }
inline void __syncthreads() {}
template <class T> T atomicAdd(T *p, T v) { T old = *p; *p += v; return old; }
