// Shared helpers of the CUDA kernels. Every kernel is extern "C" so the Go
// side finds it by name; float buffers are float32, int buffers int32.
#pragma once
#include <stdint.h>

// BM_DYN_SMEM declares the dynamic shared memory of a kernel; the CPU
// emulation (emu/emu.h) defines its own.
#ifndef BM_DYN_SMEM
#define BM_DYN_SMEM(type, name) extern __shared__ __align__(16) type name[]
#endif

// Status codes a kernel reports through the backend's status words
// (backend.go's statusMessages keeps the same list).
#define BM_BAD_TOKEN 1
#define BM_BAD_SEL 2
#define BM_BAD_TARGET 3
#define BM_SHORT_CHUNK 4

// bm_report records the first bad value a kernel meets: status[0] = code,
// status[1] = value, status[2] = index. Later reports are dropped.
__device__ __forceinline__ void bm_report(int *status, int code, int value, int index) {
    if (atomicCAS(status, 0, code) == 0) {
        status[1] = value;
        status[2] = index;
    }
}

// bm_warp_sum returns the sum of v over the warp to every lane (T float or
// double).
template <class T> __device__ __forceinline__ T bm_warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float bm_warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// bm_block_sum returns the sum of v over the block (blockDim.x a multiple
// of 32, at most 1024) to every thread. shm holds 32 values of T.
template <class T> __device__ __forceinline__ T bm_block_sum(T v, T *shm) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = bm_warp_sum(v);
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    v = lane < nw ? shm[lane] : T(0);
    return bm_warp_sum(v);
}

__device__ __forceinline__ float bm_block_max(float v, float *shm) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = bm_warp_max(v);
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    v = lane < nw ? shm[lane] : -INFINITY;
    return bm_warp_max(v);
}

__device__ __forceinline__ float bm_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Grid-stride loop over n elements (64-bit index).
#define BM_FOR(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); i += (long long)gridDim.x * blockDim.x)
