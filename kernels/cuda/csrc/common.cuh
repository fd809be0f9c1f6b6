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

// bm_bf16_bits rounds f to bfloat16 (to nearest, ties to even, as
// kernels.RoundBF16) and returns its 16 bits.
static __device__ __forceinline__ unsigned bm_bf16_bits(float f) {
    unsigned u = __float_as_uint(f);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Four floats (four 32-bit words) moved as one 16-byte word: float4 (uint4)
// on the GPU; a plain struct in the CPU emulation, which has no vector
// types.
#ifdef __CUDACC__
typedef float4 bm_f4;
typedef uint4 bm_u4;
#else
struct bm_f4 {
    float x, y, z, w;
};
struct bm_u4 {
    unsigned x, y, z, w;
};
#endif

// bm_vec16 is the 16-byte word at p (a global or shared address), which
// must be 16-byte aligned: the GPU faults on a misaligned vector access,
// and the emulation, which would not, stops with the kernel's name.
template <class T> __device__ __forceinline__ T &bm_vec16(const void *p) {
#ifndef __CUDACC__
    if ((uintptr_t)p & 15) {
        fprintf(stderr, "%s: 16-byte access at %p is not aligned\n", bm_emu::st.kernel, p);
        abort();
    }
#endif
    return *(T *)p;
}

// bm_aligned16 reports whether p may be read 16 bytes at a time.
__device__ __forceinline__ bool bm_aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// Grid-stride loop over n elements (64-bit index).
#define BM_FOR(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); i += (long long)gridDim.x * blockDim.x)

// ------------------------------------------------------------ tensor cores
//
// One device function per tensor-core primitive: inline PTX on the GPU and,
// in the CPU emulation, an exact model of the PTX ISA fragment layouts
// ("Matrix Fragments for mma.m16n8k16 with floating point type" and
// "Warp-level matrix load instruction: ldmatrix"), the lanes exchanging
// their fragments through a per-warp scratch between two __syncwarp. Every
// lane of the warp must call them together. Notation for lane l: g = l/4,
// c = l%4. A bf16x2 register holds the lower column (or row) index in its
// low half.
//   A (16×16, row): a0 = A[g][2c..2c+1],   a1 = A[g+8][2c..2c+1],
//                   a2 = A[g][2c+8..2c+9], a3 = A[g+8][2c+8..2c+9]
//   B (16×8, col):  b0 = B[2c..2c+1][g],   b1 = B[2c+8..2c+9][g]
//   C (16×8, f32):  c0, c1 = C[g][2c..2c+1], c2, c3 = C[g+8][2c..2c+1]
// so the C fragments of two adjacent 8-column tiles are, packed to bf16,
// the A fragment of the 16 columns (flash-attention's P·V without a trip
// through shared memory).

#ifndef __CUDACC__
namespace bm_emu {
// warp_scratch is the calling warp's exchange area: 8 words per lane.
inline unsigned long long (&warp_scratch())[32][8] {
    static unsigned long long s[32][32][8];
    return s[st.cur->warp];
}
inline unsigned bf16_bits(float x) { // round to nearest even; NaN stays NaN
    unsigned u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
inline float bf16_float(unsigned h) {
    unsigned u = (h & 0xffffu) << 16;
    float x;
    memcpy(&x, &u, 4);
    return x;
}
} // namespace bm_emu
#endif

// bm_bf16x2 rounds lo and hi to bfloat16 (to nearest even) and packs them,
// lo in the low half.
__device__ __forceinline__ unsigned bm_bf16x2(float lo, float hi) {
#ifdef __CUDACC__
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return bm_emu::bf16_bits(lo) | bm_emu::bf16_bits(hi) << 16;
#endif
}

// bm_mma_16816: c += a·b, A 16×16 and B 16×8 bf16, C 16×8 fp32
// (mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32). The emulation
// adds the 16 exact products to c in fp32, k in order.
__device__ __forceinline__ void bm_mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#ifdef __CUDACC__
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    unsigned long long(&s)[32][8] = bm_emu::warp_scratch();
    const int l = bm_emu::st.cur->lane, g = l >> 2, cq = l & 3;
    for (int i = 0; i < 4; i++) s[l][i] = a[i];
    s[l][4] = b0;
    s[l][5] = b1;
    __syncwarp();
    // A[r][k] sits in lane (r%8)·4 + (k%8)/2, register (r/8) + 2·(k/8),
    // half k%2; B[k][n] in lane n·4 + (k%8)/2, register 4 + k/8, half k%2.
    auto A = [&](int r, int k) { return bm_emu::bf16_float((unsigned)(s[(r & 7) * 4 + ((k & 7) >> 1)][(r >> 3) + 2 * (k >> 3)] >> (16 * (k & 1)))); };
    auto B = [&](int k, int n) { return bm_emu::bf16_float((unsigned)(s[n * 4 + ((k & 7) >> 1)][4 + (k >> 3)] >> (16 * (k & 1)))); };
    float out[4];
    for (int i = 0; i < 4; i++) {
        const int r = g + 8 * (i >> 1), n = 2 * cq + (i & 1);
        float acc = c[i];
        for (int k = 0; k < 16; k++) acc += A(r, k) * B(k, n);
        out[i] = acc;
    }
    __syncwarp(); // every lane has read the scratch
    for (int i = 0; i < 4; i++) c[i] = out[i];
#endif
}

#ifndef __CUDACC__
// bm_emu_ldsm_rows (emulation of ldmatrix) checks this lane's row address
// and publishes it to the warp: s[lane][0] holds every lane's row.
inline unsigned long long (&bm_emu_ldsm_rows(const void *row))[32][8] {
    unsigned long long(&s)[32][8] = bm_emu::warp_scratch();
    if ((uintptr_t)row & 15) {
        fprintf(stderr, "%s: ldmatrix row address %p is not 16-byte aligned\n", bm_emu::st.kernel, row);
        abort();
    }
    s[bm_emu::st.cur->lane][0] = (uintptr_t)row;
    __syncwarp();
    return s;
}
#endif

// bm_ldsm_x4 loads four 8×8 bf16 matrices from shared memory
// (ldmatrix.sync.aligned.m8n8.x4.shared.b16): lane l passes the address of
// row l%8 of matrix l/8 (16 bytes, 16-byte aligned) and receives in r[i]
// row l/4, columns 2(l%4), 2(l%4)+1 of matrix i. bm_ldsm_x4_t (.trans)
// delivers the transposes: r[i] = rows 2(l%4), 2(l%4)+1 of column l/4.
__device__ __forceinline__ void bm_ldsm_x4(unsigned (&r)[4], const void *row) {
#ifdef __CUDACC__
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
#else
    unsigned long long(&s)[32][8] = bm_emu_ldsm_rows(row);
    const int l = bm_emu::st.cur->lane;
    for (int i = 0; i < 4; i++) {
        const uint16_t *p = (const uint16_t *)(uintptr_t)s[8 * i + (l >> 2)][0];
        r[i] = (unsigned)p[2 * (l & 3)] | (unsigned)p[2 * (l & 3) + 1] << 16;
    }
    __syncwarp();
#endif
}

__device__ __forceinline__ void bm_ldsm_x4_t(unsigned (&r)[4], const void *row) {
#ifdef __CUDACC__
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
#else
    unsigned long long(&s)[32][8] = bm_emu_ldsm_rows(row);
    const int l = bm_emu::st.cur->lane;
    for (int i = 0; i < 4; i++) {
        const uint16_t *p0 = (const uint16_t *)(uintptr_t)s[8 * i + 2 * (l & 3)][0];
        const uint16_t *p1 = (const uint16_t *)(uintptr_t)s[8 * i + 2 * (l & 3) + 1][0];
        r[i] = (unsigned)p0[l >> 2] | (unsigned)p1[l >> 2] << 16;
    }
    __syncwarp();
#endif
}

// ------------------------------------------------------------- cp.async
//
// bm_cp_async<N> starts an asynchronous copy of N (4, 8 or 16) bytes from
// global src to shared dst, both N-byte aligned (cp.async.ca, or .cg for 16
// bytes: through L2 only); with valid false it writes N zero bytes and
// reads nothing (src-size 0; src must still be a valid address).
// bm_cp_async_commit closes the thread's group of copies started since the
// last commit; bm_cp_async_wait<N> waits until at most N of the thread's
// groups are pending. Other threads see the data only after a barrier that
// follows the wait. The emulation copies at issue time and waits for
// nothing: the barriers the kernels need on the GPU still order it.
template <int N> __device__ __forceinline__ void bm_cp_async(void *dst, const void *src, bool valid) {
    static_assert(N == 4 || N == 8 || N == 16, "cp.async copies 4, 8 or 16 bytes");
#ifdef __CUDACC__
    const unsigned a = (unsigned)__cvta_generic_to_shared(dst);
    if (N == 16)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src), "r"(valid ? 16 : 0) : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;" ::"r"(a), "l"(src), "n"(N), "r"(valid ? N : 0) : "memory");
#else
    if (((uintptr_t)dst | (uintptr_t)src) & (N - 1)) {
        fprintf(stderr, "%s: cp.async of %d bytes from %p to %p is not aligned\n", bm_emu::st.kernel, N, src, dst);
        abort();
    }
    if (valid)
        memcpy(dst, src, N);
    else
        memset(dst, 0, N);
#endif
}

__device__ __forceinline__ void bm_cp_async_commit() {
#ifdef __CUDACC__
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N> __device__ __forceinline__ void bm_cp_async_wait() {
#ifdef __CUDACC__
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}
