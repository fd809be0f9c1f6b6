// emu.h runs the CUDA kernel sources of kernels/cuda/csrc on the CPU, for
// the cudaemu build (tests on machines without a GPU). Each thread of a
// block is a fiber on the calling OS thread (started with makecontext, then
// switched with _setjmp/_longjmp, which unlike swapcontext makes no
// signal-mask system call); blocks run one after
// another. __syncthreads waits for every live thread of the block, warp
// shuffles and __syncwarp for every live thread of the warp, so kernels
// that rely on undefined ordering (missing barriers, divergent barriers)
// deadlock or compute wrong values here as they could on a GPU. Atomics are
// plain read-modify-writes: fibers never run at the same time.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <csetjmp>
#include <ucontext.h>
#include <utility>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    dim3() = default;
    dim3(unsigned a, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace bm_emu {

enum Wait { RUN, BLOCK, WARP, DONE };

struct Fiber {
    ucontext_t ctx; // the first entry only
    jmp_buf env;    // where the fiber resumes
    bool started;
    dim3 tid;
    int lin, warp, lane;
    Wait wait;
    unsigned long long shfl_seq;
};

struct State {
    dim3 bidx, bdim, gdim;
    Fiber *fibers = nullptr;
    int nthreads = 0;
    Fiber *cur = nullptr;
    ucontext_t sched_ctx;
    jmp_buf sched;
    // Two banks of shuffle slots per warp so a fast lane cannot overwrite a
    // value its warp-mates have not read yet.
    unsigned long long slots[32][2][32];
    char *dyn_smem = nullptr;
    const char *kernel = "";
    bool deadlock = false;
};

extern State st;

inline void yield_to_sched() {
    if (!_setjmp(st.cur->env)) _longjmp(st.sched, 1);
}

inline void sync_block() {
    st.cur->wait = BLOCK;
    yield_to_sched();
}

inline void sync_warp() {
    st.cur->wait = WARP;
    yield_to_sched();
}

template <class T>
inline T shfl(T v, int src_lane_of(int lane, int width, int arg), int arg, int width) {
    Fiber *f = st.cur;
    int bank = (int)(f->shfl_seq++ & 1);
    unsigned long long u = 0;
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    memcpy(&u, &v, sizeof(T));
    st.slots[f->warp][bank][f->lane] = u;
    sync_warp();
    int src = src_lane_of(f->lane, width, arg);
    T out;
    unsigned long long w = st.slots[f->warp][bank][src];
    memcpy(&out, &w, sizeof(T));
    return out;
}

inline int lane_xor(int lane, int width, int m) {
    int base = lane & ~(width - 1);
    int s = lane ^ m;
    return (s & ~(width - 1)) == base ? s : lane;
}
inline int lane_down(int lane, int width, int d) {
    int base = lane & ~(width - 1);
    int s = lane + d;
    return s < base + width ? s : lane;
}
inline int lane_up(int lane, int width, int d) {
    int base = lane & ~(width - 1);
    int s = lane - d;
    return s >= base ? s : lane;
}
inline int lane_idx(int lane, int width, int s) { return (lane & ~(width - 1)) + (s & (width - 1)); }

} // namespace bm_emu

#define threadIdx (bm_emu::st.cur->tid)
#define blockIdx (bm_emu::st.bidx)
#define blockDim (bm_emu::st.bdim)
#define gridDim (bm_emu::st.gdim)
#define warpSize 32

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)
#define BM_DYN_SMEM(type, name) type *name = reinterpret_cast<type *>(bm_emu::st.dyn_smem)

inline void __syncthreads() { bm_emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { bm_emu::sync_warp(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <class T> inline T __shfl_xor_sync(unsigned, T v, int m, int w = 32) { return bm_emu::shfl(v, bm_emu::lane_xor, m, w); }
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned d, int w = 32) { return bm_emu::shfl(v, bm_emu::lane_down, (int)d, w); }
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned d, int w = 32) { return bm_emu::shfl(v, bm_emu::lane_up, (int)d, w); }
template <class T> inline T __shfl_sync(unsigned, T v, int s, int w = 32) { return bm_emu::shfl(v, bm_emu::lane_idx, s, w); }
inline unsigned __ballot_sync(unsigned, int p) {
    unsigned out = 0;
    for (int i = 0; i < 32; i++) {
        int q = __shfl_sync(0xffffffffu, p, i);
        if (q) out |= 1u << i;
    }
    return out;
}
inline int __any_sync(unsigned m, int p) { return __ballot_sync(m, p) != 0; }
inline int __all_sync(unsigned m, int p) { return __ballot_sync(m, !p) == 0; }

template <class T> inline T atomicAdd(T *p, T v) { T o = *p; *p = o + v; return o; }
inline int atomicCAS(int *p, int cmp, int v) { int o = *p; if (o == cmp) *p = v; return o; }
inline unsigned atomicCAS(unsigned *p, unsigned cmp, unsigned v) { unsigned o = *p; if (o == cmp) *p = v; return o; }
inline unsigned long long atomicCAS(unsigned long long *p, unsigned long long cmp, unsigned long long v) { unsigned long long o = *p; if (o == cmp) *p = v; return o; }
template <class T> inline T atomicMax(T *p, T v) { T o = *p; if (v > o) *p = v; return o; }
template <class T> inline T atomicMin(T *p, T v) { T o = *p; if (v < o) *p = v; return o; }
template <class T> inline T atomicExch(T *p, T v) { T o = *p; *p = v; return o; }
template <class T> inline T __ldg(const T *p) { return *p; }

template <class A, class B> inline auto min(A a, B b) -> decltype(a + b) { return a < b ? a : b; }
template <class A, class B> inline auto max(A a, B b) -> decltype(a + b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0 ? 0 : (x > 1 ? 1 : x); }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline long long __double_as_longlong(double f) { long long i; memcpy(&i, &f, 8); return i; }
inline double __longlong_as_double(long long i) { double f; memcpy(&f, &i, 8); return f; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline void sincospif(float x, float *s, float *c) { *s = sinf((float)M_PI * x); *c = cosf((float)M_PI * x); }
inline void sincospi(double x, double *s, double *c) { *s = sin(M_PI * x); *c = cos(M_PI * x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
