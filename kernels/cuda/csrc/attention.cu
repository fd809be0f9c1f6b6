// B'MOJO attention (model.md §4) and its companions: RoPE, ShiftRows,
// Innovation, SelectChunks. Semantics: kernels/backend.go and the CPU
// reference (kernels/cpu/attention.go, kernels/cpu/ops.go).
//
// Attention layout. A query t of sequence b, head h (kv head g = h·G/H)
// attends to three key sets, each a contiguous range of key indices:
//   part 0, context: positions [max(0, t−Wc+1), t]        keys k,  values v
//   part 1, fading:  positions [max(0, t−Wc−Wf+1), t−Wc]  keys kf, values vf
//   part 2, memory:  indices [max(0, e−M), e) of the compacted selection
//                    list comp[b] (valid sel entries in chunk order), e the
//                    number of valid entries in chunks ≤ floor(t/C)−Delta;
//                    keys km and values v at position comp[b][i], query qm.
// Every bound is non-decreasing in t, so a tile of consecutive queries sees
// the union range [lo(first), hi(last)] and masks per query.
//
// Forward and dq kernels: one block per (64-query tile, h, b); TPQ threads
// per query, each owning 32 of the DM = 32·TPQ (zero-padded) head dims in
// registers; keys and values are staged 32 at a time in shared memory and
// read as broadcasts. dk/dv kernels: one block per (tile of 256/TPK keys, g,
// b); TPK threads per key, each owning 16 of DM = 16·TPK dims; queries of
// every head of the kv group are staged 32 at a time. Each key has one
// writer, so dk/dv need no atomics (memory keys fall back to atomics only
// when sel repeats a position).
#include "common.cuh"

#define BM_FULL 0xffffffffu

// Four floats read as one 16-byte shared-memory word (float4 on the GPU; a
// plain struct in the CPU emulation, which has no vector types).
#ifdef __CUDACC__
typedef float4 bm_f4;
#else
struct bm_f4 {
    float x, y, z, w;
};
#endif
#define BM_ATTN_QT 64   // queries per forward / dq block
#define BM_ATTN_BK 32   // keys per shared-memory tile (forward / dq)
#define BM_ATTN_SB 16   // keys per online-softmax step (forward)
#define BM_ATTN_QB 32   // queries per shared-memory tile (dk / dv)
#define BM_ATTN_KNT 256 // threads of a dk / dv block

// Shape of one attention call (kernel arguments; Wc, Wf, C, Delta capped by
// the host so no bound overflows; M is 0 when no memory key exists).
struct BmAttn {
    int T, H, G, D, Wc, Wf, C, M, Delta, nC, nCS;
};

// bm_mem_end returns e for query t: the valid selections in chunks up to
// floor(t/C)−Delta (pre is the sequence's [nC+1] prefix count).
__device__ __forceinline__ int bm_mem_end(const int *pre, int t, const BmAttn &s) {
    const int last = min(t / s.C - s.Delta, s.nC - 1);
    return last < 0 ? 0 : pre[last + 1];
}

// bm_attn_range sets query t's key index range [lo, hi] of part (empty when
// hi < lo).
__device__ __forceinline__ void bm_attn_range(int part, int t, const BmAttn &s, const int *pre, int &lo, int &hi) {
    if (part == 0) {
        lo = max(0, t - s.Wc + 1);
        hi = t;
    } else if (part == 1) {
        lo = max(0, t - s.Wc - s.Wf + 1);
        hi = t - s.Wc;
    } else {
        const int e = bm_mem_end(pre, t, s);
        lo = max(0, e - s.M);
        hi = e - 1;
    }
}

// Row helpers. A thread owns NJ 4-float chunks of a row: chunk j·TP+ln (ln =
// its lane within the TP threads of the row), so the TP threads of a row read
// adjacent 16-byte words of a shared row (no bank conflicts) and every other
// row group reads the same words (broadcast).
template <int NJ, int TP>
__device__ __forceinline__ void bm_load_row(float (&r)[4 * NJ], const float *src, long long row, bool valid, int D, int ln) {
#pragma unroll
    for (int j = 0; j < NJ; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int d = 4 * (j * TP + ln) + e;
            r[4 * j + e] = (valid && d < D) ? src[row + d] : 0.f;
        }
}

template <int NJ, int TP>
__device__ __forceinline__ float bm_dot_row(const float (&r)[4 * NJ], const bm_f4 *srow, int ln) {
    float a = 0.f;
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        const bm_f4 x = srow[j * TP + ln];
        a = fmaf(r[4 * j], x.x, a);
        a = fmaf(r[4 * j + 1], x.y, a);
        a = fmaf(r[4 * j + 2], x.z, a);
        a = fmaf(r[4 * j + 3], x.w, a);
    }
    return a;
}

template <int NJ, int TP>
__device__ __forceinline__ void bm_axpy_row(float (&acc)[4 * NJ], float a, const bm_f4 *srow, int ln) {
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        const bm_f4 x = srow[j * TP + ln];
        acc[4 * j] = fmaf(a, x.x, acc[4 * j]);
        acc[4 * j + 1] = fmaf(a, x.y, acc[4 * j + 1]);
        acc[4 * j + 2] = fmaf(a, x.z, acc[4 * j + 2]);
        acc[4 * j + 3] = fmaf(a, x.w, acc[4 * j + 3]);
    }
}

// bm_add_row: dst[row+d] += r (atomically when atomic) for the thread's dims.
template <int NJ, int TP>
__device__ __forceinline__ void bm_add_row(float *dst, const float (&r)[4 * NJ], long long row, int D, int ln, bool atomic) {
#pragma unroll
    for (int j = 0; j < NJ; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int d = 4 * (j * TP + ln) + e;
            if (d < D) {
                if (atomic)
                    atomicAdd(dst + row + d, r[4 * j + e]);
                else
                    dst[row + d] += r[4 * j + e];
            }
        }
}

// bm_group_sum sums x over the TP aligned lanes of a row; every lane gets
// the same bits (the xor butterfly adds the same pairs in every lane).
template <int TP>
__device__ __forceinline__ float bm_group_sum(float x) {
    if (TP > 1) x += __shfl_xor_sync(BM_FULL, x, 1);
    if (TP > 2) x += __shfl_xor_sync(BM_FULL, x, 2);
    if (TP > 4) x += __shfl_xor_sync(BM_FULL, x, 4);
    if (TP > 8) x += __shfl_xor_sync(BM_FULL, x, 8);
    return x;
}

// bm_attn_load_keys stages the BM_ATTN_BK keys kt.. (indices ≤ khi; comp
// maps memory indices to positions, nullptr for the window parts) of one kv
// head into ks, vs ([BK][DM], zero beyond khi and beyond D). The caller's
// previous tile must be finished: the first barrier here orders it.
template <int DM>
__device__ __forceinline__ void bm_attn_load_keys(float *ks, float *vs, int *kpos, const float *kb, const float *vb, const int *comp,
                                                  int kt, int khi, long long kbase, int GD, int D) {
    if (threadIdx.x < BM_ATTN_BK) {
        const int key = kt + threadIdx.x;
        int pos = -1;
        if (key <= khi) pos = comp ? comp[key] : key;
        kpos[threadIdx.x] = pos;
    }
    __syncthreads(); // kpos written; every thread is done with the previous tile
    for (int i = threadIdx.x; i < BM_ATTN_BK * DM; i += blockDim.x) {
        const int r = i / DM, d = i % DM, pos = kpos[r];
        float kx = 0.f, vx = 0.f;
        if (pos >= 0 && d < D) {
            const long long o = kbase + (long long)pos * GD + d;
            kx = kb[o];
            vx = vb[o];
        }
        ks[i] = kx;
        vs[i] = vx;
    }
    __syncthreads();
}

// ---------------------------------------------------------------- forward

template <int TPQ>
__device__ __forceinline__ void bm_attn_fwd_impl(bm_f4 *ks4, bm_f4 *vs4, int *kpos, float *out, float *lse, const float *q,
                                                 const float *k, const float *v, const float *kf, const float *vf, const float *qm,
                                                 const float *km, const int *comp, const int *pre, const BmAttn s, float scale) {
    constexpr int DM = 32 * TPQ, NC = DM / 4;
    const int tid = threadIdx.x, qi = tid / TPQ, ln = tid % TPQ;
    const int b = blockIdx.z, h = blockIdx.y, t0 = blockIdx.x * BM_ATTN_QT;
    const int g = h * s.G / s.H;
    const int t = t0 + qi, tl = min(s.T - 1, t0 + BM_ATTN_QT - 1);
    const bool valid = t < s.T;
    const long long qrow = (((long long)b * s.T + t) * s.H + h) * s.D;
    const long long kbase = (long long)b * s.T * s.G * s.D + (long long)g * s.D;
    const int GD = s.G * s.D;
    const int *bpre = s.M > 0 ? pre + (long long)b * (s.nC + 1) : nullptr;
    const int *bcomp = s.M > 0 ? comp + (long long)b * s.nCS : nullptr;

    float qr[32], acc[32];
#pragma unroll
    for (int i = 0; i < 32; i++) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;

    for (int part = 0; part < 3; part++) {
        const float *kb = k, *vb = v;
        if (part == 1) {
            if (s.Wf == 0) continue;
            kb = kf;
            vb = vf;
        } else if (part == 2) {
            if (s.M == 0) continue;
            kb = km;
        }
        if (part != 1) bm_load_row<8, TPQ>(qr, part == 2 ? qm : q, qrow, valid, s.D, ln);
        int lo = 1, hi = 0, klo, khi, unused;
        if (valid) bm_attn_range(part, t, s, bpre, lo, hi);
        bm_attn_range(part, t0, s, bpre, klo, unused);
        bm_attn_range(part, tl, s, bpre, unused, khi);
        for (int kt = klo; kt <= khi; kt += BM_ATTN_BK) {
            bm_attn_load_keys<DM>((float *)ks4, (float *)vs4, kpos, kb, vb, part == 2 ? bcomp : nullptr, kt, khi, kbase, GD, s.D);
            // Online softmax over sub-tiles of BM_ATTN_SB keys (fewer live
            // registers than a whole tile of scores).
#pragma unroll
            for (int j0 = 0; j0 < BM_ATTN_BK; j0 += BM_ATTN_SB) {
                float sc[BM_ATTN_SB];
                float mt = -INFINITY;
#pragma unroll
                for (int j = 0; j < BM_ATTN_SB; j++) {
                    const float a = bm_group_sum<TPQ>(bm_dot_row<8, TPQ>(qr, ks4 + (j0 + j) * NC, ln));
                    const int key = kt + j0 + j;
                    sc[j] = (key >= lo && key <= hi) ? a * scale : -INFINITY;
                    mt = fmaxf(mt, sc[j]);
                }
                if (mt > -INFINITY) { // the same in the TPQ lanes of a query
                    const float mn = fmaxf(m, mt), alpha = expf(m - mn);
                    l *= alpha;
#pragma unroll
                    for (int i = 0; i < 32; i++) acc[i] *= alpha;
#pragma unroll
                    for (int j = 0; j < BM_ATTN_SB; j++) {
                        const float p = expf(sc[j] - mn);
                        l += p;
                        bm_axpy_row<8, TPQ>(acc, p, vs4 + (j0 + j) * NC, ln);
                    }
                    m = mn;
                }
            }
        }
    }
    if (!valid) return;
    // A valid query always has its own context key, so l > 0.
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int d = 4 * (j * TPQ + ln) + e;
            if (d < s.D) out[qrow + d] = acc[4 * j + e] / l;
        }
    if (ln == 0) lse[((long long)b * s.T + t) * s.H + h] = m + logf(l);
}

#define BM_ATTN_FWD(NAME, TPQ)                                                                                                          \
    extern "C" __global__ void __launch_bounds__(BM_ATTN_QT *TPQ)                                                                       \
        NAME(float *out, float *lse, const float *q, const float *k, const float *v, const float *kf, const float *vf, const float *qm, \
             const float *km, const int *comp, const int *pre, int T, int H, int G, int D, int Wc, int Wf, int C, int M, int Delta,     \
             int nC, int nCS, float scale) {                                                                                            \
        __shared__ bm_f4 ks[BM_ATTN_BK * 8 * TPQ], vs[BM_ATTN_BK * 8 * TPQ];                                                           \
        __shared__ int kpos[BM_ATTN_BK];                                                                                                \
        const BmAttn s = {T, H, G, D, Wc, Wf, C, M, Delta, nC, nCS};                                                                    \
        bm_attn_fwd_impl<TPQ>(ks, vs, kpos, out, lse, q, k, v, kf, vf, qm, km, comp, pre, s, scale);                                    \
    }

BM_ATTN_FWD(bm_attn_fwd_d32, 1)
BM_ATTN_FWD(bm_attn_fwd_d64, 2)
BM_ATTN_FWD(bm_attn_fwd_d128, 4)

// --------------------------------------------------------------- backward

// bm_attn_bwd_dot: dd[r] = Σ dout[r]·out[r] over D (one warp per row).
extern "C" __global__ void bm_attn_bwd_dot(float *dd, const float *dout, const float *out, int rows, int D) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= rows) return; // whole warps leave
    const long long o = (long long)r * D;
    float a = 0.f;
    for (int i = lane; i < D; i += 32) a = fmaf(dout[o + i], out[o + i], a);
    a = bm_warp_sum(a);
    if (lane == 0) dd[r] = a;
}

// bm_attn_dq_part adds one part's contribution to the query gradient dqa:
// p = exp(q·k·scale − lse), ds = p·(dout·v − dd)·scale, dqa += ds·k.
template <int TPQ>
__device__ __forceinline__ void bm_attn_dq_part(float (&dqa)[32], const float (&qr)[32], const float (&dor)[32], bm_f4 *ks4,
                                                bm_f4 *vs4, int *kpos, int part, const float *kb, const float *vb, const int *bcomp,
                                                const int *bpre, const BmAttn &s, int t, int t0, int tl, bool valid, float lt,
                                                float dd, long long kbase, float scale, int ln) {
    constexpr int DM = 32 * TPQ, NC = DM / 4;
    int lo = 1, hi = 0, klo, khi, unused;
    if (valid) bm_attn_range(part, t, s, bpre, lo, hi);
    bm_attn_range(part, t0, s, bpre, klo, unused);
    bm_attn_range(part, tl, s, bpre, unused, khi);
    for (int kt = klo; kt <= khi; kt += BM_ATTN_BK) {
        bm_attn_load_keys<DM>((float *)ks4, (float *)vs4, kpos, kb, vb, part == 2 ? bcomp : nullptr, kt, khi, kbase, s.G * s.D, s.D);
#pragma unroll 2
        for (int j = 0; j < BM_ATTN_BK; j++) {
            const bm_f4 *kr = ks4 + j * NC;
            const float a = bm_group_sum<TPQ>(bm_dot_row<8, TPQ>(qr, kr, ln));
            const float c = bm_group_sum<TPQ>(bm_dot_row<8, TPQ>(dor, vs4 + j * NC, ln));
            const int key = kt + j;
            float ds = 0.f;
            if (key >= lo && key <= hi) ds = expf(a * scale - lt) * (c - dd) * scale;
            bm_axpy_row<8, TPQ>(dqa, ds, kr, ln);
        }
    }
}

// Query-centric: dq += context and fading parts, then dqm += memory part
// (the same thread does both, so dqm may alias dq).
template <int TPQ>
__device__ __forceinline__ void bm_attn_dq_impl(bm_f4 *ks4, bm_f4 *vs4, int *kpos, float *dq, float *dqm, const float *dout,
                                                const float *lse, const float *Dd, const float *q, const float *k, const float *v,
                                                const float *kf, const float *vf, const float *qm, const float *km, const int *comp,
                                                const int *pre, const BmAttn s, float scale) {
    const int tid = threadIdx.x, qi = tid / TPQ, ln = tid % TPQ;
    const int b = blockIdx.z, h = blockIdx.y, t0 = blockIdx.x * BM_ATTN_QT;
    const int g = h * s.G / s.H;
    const int t = t0 + qi, tl = min(s.T - 1, t0 + BM_ATTN_QT - 1);
    const bool valid = t < s.T;
    const long long lrow = ((long long)b * s.T + t) * s.H + h, qrow = lrow * s.D;
    const long long kbase = (long long)b * s.T * s.G * s.D + (long long)g * s.D;
    const int *bpre = s.M > 0 ? pre + (long long)b * (s.nC + 1) : nullptr;
    const int *bcomp = s.M > 0 ? comp + (long long)b * s.nCS : nullptr;
    const float lt = valid ? lse[lrow] : 0.f, dd = valid ? Dd[lrow] : 0.f;

    float qr[32], dor[32], dqa[32];
    bm_load_row<8, TPQ>(dor, dout, qrow, valid, s.D, ln);
    if (dq) {
#pragma unroll
        for (int i = 0; i < 32; i++) dqa[i] = 0.f;
        bm_load_row<8, TPQ>(qr, q, qrow, valid, s.D, ln);
        bm_attn_dq_part<TPQ>(dqa, qr, dor, ks4, vs4, kpos, 0, k, v, bcomp, bpre, s, t, t0, tl, valid, lt, dd, kbase, scale, ln);
        if (s.Wf > 0)
            bm_attn_dq_part<TPQ>(dqa, qr, dor, ks4, vs4, kpos, 1, kf, vf, bcomp, bpre, s, t, t0, tl, valid, lt, dd, kbase, scale, ln);
        if (valid) bm_add_row<8, TPQ>(dq, dqa, qrow, s.D, ln, false);
    }
    if (dqm && s.M > 0) {
#pragma unroll
        for (int i = 0; i < 32; i++) dqa[i] = 0.f;
        bm_load_row<8, TPQ>(qr, qm, qrow, valid, s.D, ln);
        bm_attn_dq_part<TPQ>(dqa, qr, dor, ks4, vs4, kpos, 2, km, v, bcomp, bpre, s, t, t0, tl, valid, lt, dd, kbase, scale, ln);
        if (valid) bm_add_row<8, TPQ>(dqm, dqa, qrow, s.D, ln, false);
    }
}

#define BM_ATTN_DQ(NAME, TPQ, MINB)                                                                                                     \
    extern "C" __global__ void __launch_bounds__(BM_ATTN_QT *TPQ, MINB)                                                                       \
        NAME(float *dq, float *dqm, const float *dout, const float *lse, const float *Dd, const float *q, const float *k, const float *v, \
             const float *kf, const float *vf, const float *qm, const float *km, const int *comp, const int *pre, int T, int H, int G,   \
             int D, int Wc, int Wf, int C, int M, int Delta, int nC, int nCS, float scale) {                                            \
        __shared__ bm_f4 ks[BM_ATTN_BK * 8 * TPQ], vs[BM_ATTN_BK * 8 * TPQ];                                                           \
        __shared__ int kpos[BM_ATTN_BK];                                                                                                \
        const BmAttn s = {T, H, G, D, Wc, Wf, C, M, Delta, nC, nCS};                                                                    \
        bm_attn_dq_impl<TPQ>(ks, vs, kpos, dq, dqm, dout, lse, Dd, q, k, v, kf, vf, qm, km, comp, pre, s, scale);                       \
    }

// Minimum resident blocks: at most ~168 registers (no spills with nvcc 11.8).
BM_ATTN_DQ(bm_attn_bwd_dq_d32, 1, 6)
BM_ATTN_DQ(bm_attn_bwd_dq_d64, 2, 3)
BM_ATTN_DQ(bm_attn_bwd_dq_d128, 4, 1)

// Key-centric dk, dv. MEM = false: the keys are positions j of k, v, seen by
// queries t in [j+qa, j+qb] (context: qa = 0, qb = Wc−1; fading: qa = Wc,
// qb = Wc+Wf−1). MEM = true: the keys are the entries i of comp (position
// comp[i] of km, v), seen by the queries whose memory range holds i; the
// queries read qm. dup set means some position repeats in comp: then two
// keys of one block may share a gradient row, so the adds are atomic.
template <int TPK, bool MEM>
__device__ __forceinline__ void bm_attn_dkv_impl(bm_f4 *qs4, bm_f4 *os4, float *ls, float *dds, int *qlo, int *qhi, float *dk, float *dv,
                                                 const float *k, const float *v, const float *q, const float *dout, const float *lse,
                                                 const float *Dd, const int *comp, const int *pre, const int *dup, const BmAttn s, int qa,
                                                 int qb, float scale) {
    constexpr int DM = 16 * TPK, NC = DM / 4, KT = BM_ATTN_KNT / TPK;
    const int tid = threadIdx.x, ki = tid / TPK, ln = tid % TPK;
    const int b = blockIdx.z, g = blockIdx.y, j0 = blockIdx.x * KT;
    const int *bpre = MEM ? pre + (long long)b * (s.nC + 1) : nullptr;
    const int *bcomp = MEM ? comp + (long long)b * s.nCS : nullptr;
    const int nkeys = MEM ? bpre[s.nC] : s.T;
    if (j0 >= nkeys) return; // the whole block
    const int key = j0 + ki, j1 = min(nkeys, j0 + KT) - 1;
    const bool kvalid = key < nkeys;
    const int pos = kvalid ? (MEM ? bcomp[key] : key) : 0;
    const long long krow = (((long long)b * s.T + pos) * s.G + g) * s.D;

    float kr[16], vr[16], dka[16], dva[16];
    bm_load_row<4, TPK>(kr, k, krow, kvalid, s.D, ln);
    bm_load_row<4, TPK>(vr, v, krow, kvalid, s.D, ln);
#pragma unroll
    for (int i = 0; i < 16; i++) dka[i] = dva[i] = 0.f;

    // Queries that can see a key of this block: [tA, tB].
    int tA, tB;
    if (!MEM) {
        tA = j0 + qa;
        tB = min(s.T - 1, j1 + qb);
    } else { // bounds are non-decreasing in t: binary searches
        int lo = 0, hi = s.T;
        while (lo < hi) { // first t whose range ends after j0
            const int mid = (lo + hi) >> 1;
            if (bm_mem_end(bpre, mid, s) > j0)
                hi = mid;
            else
                lo = mid + 1;
        }
        tA = lo;
        lo = 0;
        hi = s.T;
        while (lo < hi) { // first t whose range starts after j1
            const int mid = (lo + hi) >> 1;
            if (max(0, bm_mem_end(bpre, mid, s) - s.M) > j1)
                hi = mid;
            else
                lo = mid + 1;
        }
        tB = lo - 1;
    }

    // Query heads of kv head g: h with h·G/H == g.
    const int hA = (g * s.H + s.G - 1) / s.G, hE = ((g + 1) * s.H + s.G - 1) / s.G;
    for (int h = hA; h < hE; h++) {
        for (int tq = tA; tq <= tB; tq += BM_ATTN_QB) {
            __syncthreads(); // the previous tile is done
            for (int i = tid; i < BM_ATTN_QB * DM; i += BM_ATTN_KNT) {
                const int r = i / DM, d = i % DM, t = tq + r;
                float qx = 0.f, ox = 0.f;
                if (t <= tB && d < s.D) {
                    const long long o = (((long long)b * s.T + t) * s.H + h) * s.D + d;
                    qx = q[o];
                    ox = dout[o];
                }
                ((float *)qs4)[i] = qx;
                ((float *)os4)[i] = ox;
            }
            if (tid < BM_ATTN_QB) {
                const int t = tq + tid;
                float lv = 0.f, dv0 = 0.f;
                int lo = 1, hi = 0;
                if (t <= tB) {
                    const long long lr = ((long long)b * s.T + t) * s.H + h;
                    lv = lse[lr];
                    dv0 = Dd[lr];
                    if (MEM) bm_attn_range(2, t, s, bpre, lo, hi);
                }
                ls[tid] = lv;
                dds[tid] = dv0;
                qlo[tid] = lo;
                qhi[tid] = hi;
            }
            __syncthreads();
            const int nq = min(BM_ATTN_QB, tB - tq + 1);
#pragma unroll 1
            for (int i = 0; i < nq; i++) {
                const bm_f4 *qrow = qs4 + i * NC, *orow = os4 + i * NC;
                const float a = bm_group_sum<TPK>(bm_dot_row<4, TPK>(kr, qrow, ln));
                const float c = bm_group_sum<TPK>(bm_dot_row<4, TPK>(vr, orow, ln));
                const int t = tq + i;
                const bool ok = kvalid && (MEM ? (key >= qlo[i] && key <= qhi[i]) : (t >= key + qa && t <= key + qb));
                float p = 0.f, ds = 0.f;
                if (ok) {
                    p = expf(a * scale - ls[i]);
                    ds = p * (c - dds[i]) * scale;
                }
                bm_axpy_row<4, TPK>(dva, p, orow, ln);
                bm_axpy_row<4, TPK>(dka, ds, qrow, ln);
            }
        }
    }
    if (!kvalid) return;
    const bool atomic = MEM && *dup != 0;
    if (dk) bm_add_row<4, TPK>(dk, dka, krow, s.D, ln, atomic);
    if (dv) bm_add_row<4, TPK>(dv, dva, krow, s.D, ln, atomic);
}

#define BM_ATTN_DKV_SHARED(TPK)                                                 \
    __shared__ bm_f4 qs[BM_ATTN_QB * 4 * TPK], os[BM_ATTN_QB * 4 * TPK];       \
    __shared__ float ls[BM_ATTN_QB], dds[BM_ATTN_QB];                           \
    __shared__ int qlo[BM_ATTN_QB], qhi[BM_ATTN_QB];

#define BM_ATTN_DKV(NAME, TPK)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(BM_ATTN_KNT, 2)                                                                  \
        NAME(float *dk, float *dv, const float *k, const float *v, const float *q, const float *dout, const float *lse,         \
             const float *Dd, int T, int H, int G, int D, int qa, int qb, float scale) {                                       \
        BM_ATTN_DKV_SHARED(TPK)                                                                                                \
        const BmAttn s = {T, H, G, D, 1, 0, 1, 0, 0, 0, 0};                                                                    \
        bm_attn_dkv_impl<TPK, false>(qs, os, ls, dds, qlo, qhi, dk, dv, k, v, q, dout, lse, Dd, nullptr, nullptr, nullptr, s, \
                                     qa, qb, scale);                                                                           \
    }

#define BM_ATTN_DKV_MEM(NAME, TPK)                                                                                                \
    extern "C" __global__ void __launch_bounds__(BM_ATTN_KNT, 2)                                                                     \
        NAME(float *dk, float *dv, const float *k, const float *v, const float *q, const float *dout, const float *lse,            \
             const float *Dd, const int *comp, const int *pre, const int *dup, int T, int H, int G, int D, int C, int M, int Delta, \
             int nC, int nCS, float scale) {                                                                                      \
        BM_ATTN_DKV_SHARED(TPK)                                                                                                   \
        const BmAttn s = {T, H, G, D, 1, 0, C, M, Delta, nC, nCS};                                                                \
        bm_attn_dkv_impl<TPK, true>(qs, os, ls, dds, qlo, qhi, dk, dv, k, v, q, dout, lse, Dd, comp, pre, dup, s, 0, 0, scale);   \
    }

BM_ATTN_DKV(bm_attn_bwd_dkv_d32, 2)
BM_ATTN_DKV(bm_attn_bwd_dkv_d64, 4)
BM_ATTN_DKV(bm_attn_bwd_dkv_d128, 8)
BM_ATTN_DKV_MEM(bm_attn_bwd_dkv_mem_d32, 2)
BM_ATTN_DKV_MEM(bm_attn_bwd_dkv_mem_d64, 4)
BM_ATTN_DKV_MEM(bm_attn_bwd_dkv_mem_d128, 8)

// ----------------------------------------------------------- memory index

// bm_block_incl_scan returns the inclusive prefix sum of x over the block
// (blockDim.x a multiple of 32) and sets *total to the block's sum. wsum
// holds 32 ints; every thread must call it.
__device__ __forceinline__ int bm_block_incl_scan(int x, int *wsum, int *total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(BM_FULL, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads(); // wsum's previous readers are done
    if (lane == 31) wsum[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < nw ? wsum[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(BM_FULL, w, o);
            if (lane >= o) w += y;
        }
        __syncwarp();
        if (lane < nw) wsum[lane] = w;
    }
    __syncthreads();
    *total = wsum[nw - 1];
    return x + (warp > 0 ? wsum[warp - 1] : 0);
}

// bm_attn_mem_index compacts each sequence's valid selections (sel ≥ 0, in
// chunk then slot order) into comp [B, nC·S] and writes pre [B, nC+1], pre[c]
// = valid entries in chunks < c. A position ≥ T is reported (BM_BAD_SEL) and
// skipped. *dup is set when a sequence's list is not strictly increasing (a
// position might repeat). One block of 256 threads per sequence.
extern "C" __global__ void __launch_bounds__(256) bm_attn_mem_index(int *comp, int *pre, int *dup, const int *sel, int nC, int S, int T, int *status) {
    __shared__ int wsum[32];
    const int b = blockIdx.x, n = nC * S;
    const int *row = sel + (long long)b * n;
    int *cb = comp + (long long)b * n, *pb = pre + (long long)b * (nC + 1);
    for (int c = threadIdx.x; c <= nC; c += blockDim.x) pb[c] = 0;
    __syncthreads();
    int carry = 0; // the same in every thread
    for (int i0 = 0; i0 < n; i0 += blockDim.x) {
        const int i = i0 + threadIdx.x;
        int p = -1;
        if (i < n) {
            p = row[i];
            if (p >= T) {
                bm_report(status, BM_BAD_SEL, p, b * n + i);
                p = -1;
            }
        }
        int total;
        const int incl = carry + bm_block_incl_scan(p >= 0 ? 1 : 0, wsum, &total);
        if (p >= 0) cb[incl - 1] = p;
        if (i < n && (i + 1) % S == 0) pb[(i + 1) / S] = incl;
        carry += total;
    }
    __syncthreads();
    for (int i = threadIdx.x + 1; i < carry; i += blockDim.x)
        if (cb[i] <= cb[i - 1]) *dup = 1;
}

// ------------------------------------------------------------------- RoPE

// bm_rope rotates the pairs (i, i+D/2) of x[B,T,nh,D] by sign·t·theta^(−2i/D)
// into out (out += when accumulate), in float64 like the CPU reference. One
// thread per (b, t, i): the angle is computed once for the nh heads. out may
// alias x.
extern "C" __global__ void bm_rope(float *out, const float *x, int T, int nh, int D, double theta, double sign, int accumulate,
                                   long long npairs) {
    const int half = D / 2;
    BM_FOR(idx, npairs) {
        const int i = (int)(idx % half);
        const long long bt = idx / half;
        const int t = (int)(bt % T);
        const double f = pow(theta, -2.0 * i / D);
        double sn, cs;
        sincos((double)t * f, &sn, &cs);
        sn *= sign;
        for (int hd = 0; hd < nh; hd++) {
            const long long o = (bt * nh + hd) * D + i;
            const double a = x[o], c = x[o + half];
            const double ra = a * cs - c * sn, rb = c * cs + a * sn;
            if (accumulate) {
                out[o] += (float)ra;
                out[o + half] += (float)rb;
            } else {
                out[o] = (float)ra;
                out[o + half] = (float)rb;
            }
        }
    }
}

// ------------------------------------------------------ shift, innovation

// bm_shift_rows: out[b,t,:] = x[b,t-1,:], out[b,0,:] = 0 (out must not
// overlap x; the host stages in-place calls through a copy).
extern "C" __global__ void bm_shift_rows(float *out, const float *x, int T, int d, long long n) {
    BM_FOR(i, n) {
        const long long row = i / d;
        out[i] = row % T == 0 ? 0.f : x[i - d];
    }
}

// bm_innovation: e[r] = mean_i (u[r,i] − p[r,i])², float64 sums, one warp
// per row.
extern "C" __global__ void bm_innovation(float *e, const float *u, const float *p, int Rw, int d) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= Rw) return; // whole warps leave
    const long long o = (long long)r * d;
    double s = 0;
    for (int i = lane; i < d; i += 32) {
        const double df = (double)u[o + i] - (double)p[o + i];
        s += df * df;
    }
    s = bm_warp_sum(s);
    if (lane == 0) e[r] = (float)(s / d);
}

// bm_innovation_backward: dp += de[r]·(−2/d)·(u − p); one block per row.
extern "C" __global__ void bm_innovation_backward(float *dp, const float *de, const float *u, const float *p, int d) {
    const long long r = blockIdx.x;
    const double k = (double)de[r] * (-2.0 / d);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const long long o = r * d + i;
        dp[o] += (float)(k * ((double)u[o] - (double)p[o]));
    }
}

// ---------------------------------------------------------- select chunks

#define BM_SEL_TILE 2048

// bm_select_chunks: one block per (chunk, sequence). Element i of the chunk
// has rank #{j: e_j > e_i, or e_j == e_i and j > i} (largest first, ties to
// the later position); the S of rank < S are written in position order
// through a block scan. e is read in shared-memory tiles, so any C works
// (O(C²) comparisons per chunk). With NaN in e the ranks may not select
// exactly S: missing slots are −1 and BM_SHORT_CHUNK is reported.
extern "C" __global__ void __launch_bounds__(256) bm_select_chunks(int *sel, const float *e, int T, int C, int S, int nC, int *status) {
    __shared__ float es[BM_SEL_TILE];
    __shared__ int wsum[32];
    const int ch = blockIdx.x, b = blockIdx.y;
    const float *ec = e + (long long)b * T + (long long)ch * C;
    int *out = sel + ((long long)b * nC + ch) * S;
    int carry = 0;
    for (int i0 = 0; i0 < C; i0 += blockDim.x) {
        const int i = i0 + threadIdx.x;
        const float x = i < C ? ec[i] : 0.f;
        int rank = 0;
        for (int j0 = 0; j0 < C; j0 += BM_SEL_TILE) {
            const int nj = min(BM_SEL_TILE, C - j0);
            __syncthreads();
            for (int j = threadIdx.x; j < nj; j += blockDim.x) es[j] = ec[j0 + j];
            __syncthreads();
            if (i < C)
                for (int j = 0; j < nj; j++) {
                    const float y = es[j];
                    rank += (y > x || (!(y < x) && j0 + j > i)) ? 1 : 0;
                }
        }
        const bool f = i < C && rank < S;
        int total;
        const int incl = carry + bm_block_incl_scan(f ? 1 : 0, wsum, &total);
        if (f && incl <= S) out[incl - 1] = ch * C + i;
        carry += total;
    }
    if (carry < S) {
        for (int j = carry + threadIdx.x; j < S; j += blockDim.x) out[j] = -1;
        if (threadIdx.x == 0) bm_report(status, BM_SHORT_CHUNK, ch, b);
    }
}
