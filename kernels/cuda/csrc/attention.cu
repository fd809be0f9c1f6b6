// B'MOJO attention (docs/model.md §4) and its companions: RoPE, ShiftRows,
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
// when sel repeats a position). These CUDA-core kernels compute in fp32;
// when the backend rounds matrix products to bf16 the Go side takes the
// tensor-core kernels instead (section "tensor-core attention" below: the
// same block roles and guarantees, flash-attention-2 on mma.sync).
#include "common.cuh"

#define BM_FULL 0xffffffffu

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

// bm_key_block_queries sets [tA, tB], the queries that can see a key of
// the block [j0, j1]: context/fading keys (qa, qb the window offsets) or,
// for MEM, memory entries (bounds non-decreasing in t: binary searches).
template <bool MEM>
__device__ __forceinline__ void bm_key_block_queries(int &tA, int &tB, int j0, int j1, int qa, int qb, const int *bpre,
                                                     const BmAttn &s) {
    if (!MEM) {
        tA = j0 + qa;
        tB = min(s.T - 1, j1 + qb);
        return;
    }
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
    bm_key_block_queries<MEM>(tA, tB, j0, j1, qa, qb, bpre, s);

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

// ------------------------------------------------- tensor-core attention
//
// The flash-attention-2 structure on bf16 tensor cores (mma.sync m16n8k16,
// common.cuh), for padded head widths DM = 32 and 64; the Go side takes
// these kernels when the backend rounds matrix products to bf16 and the
// CUDA-core kernels above otherwise. Inputs are rounded to bf16 (to nearest
// even), products accumulate in fp32, and the softmax statistics (running
// max and sum, lse, dd) stay fp32; P and dS are rounded to bf16 as the A
// operand of P·V, dS·K, Pᵀ·dO and dSᵀ·Q.
//
// The operands read as staged tiles (k, v, kf, vf, km in the forward and dq
// kernels; q, qm, dout in dk/dv) come as bf16 copies made once per call by
// bm_attn_to_bf16: rows padded with zeros to DM columns, so a tile row is
// DM/8 aligned 16-byte words, copied to shared memory with cp.async (no
// registers, no conversion) into one of two buffers while the warps compute
// on the other. The operands a warp keeps in registers (Q and dO in the
// forward and dq kernels, K and V in dk/dv) are read once from the fp32
// buffers.
//
// Forward and dq: one block of 4 warps per (64 queries, h, b); warp w owns
// queries 16w..16w+15 of the tile, its Q (and dO) fragments in registers,
// and the block walks the keys of the context, fading and memory parts 64
// at a time. dk/dv: one block of 4 warps per (64 keys, g, b); warp w owns
// 16 keys (K and V fragments in registers) and the block walks 64 queries
// at a time, of every head of the kv group; it computes the transposed
// products Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, so Pᵀ and dSᵀ are already the A
// operands of dV += Pᵀ·dO and dK += dSᵀ·Q. A warp skips the tiles none of
// its rows can see (the band of the context and fading windows).

#define BM_TC_T 64   // queries (forward, dq) or keys (dk/dv) per block
#define BM_TC_KT 64  // keys (forward, dq) or queries (dk/dv) per staged tile
#define BM_TC_NT 128 // threads per block: 4 warps of 16 rows
#define BM_LOG2E 1.4426950408889634f
#define BM_LN2 0.6931471805599453f

// bm_attn_to_bf16_d<DM>: dst [rows][DM] bf16 (zero beyond D) = src [rows][D]
// rounded to nearest even; one thread per pair of columns.
template <int DM>
__device__ __forceinline__ void bm_attn_to_bf16_impl(unsigned *dst, const float *src, long long rows, int D) {
    constexpr int HP = DM / 2;
    BM_FOR(i, rows * HP) {
        const long long r = i / HP;
        const int d = 2 * (int)(i % HP);
        const float *row = src + r * D;
        dst[i] = bm_bf16x2(d < D ? row[d] : 0.f, d + 1 < D ? row[d + 1] : 0.f);
    }
}

extern "C" __global__ void bm_attn_to_bf16_d32(unsigned *dst, const float *src, long long rows, int D) {
    bm_attn_to_bf16_impl<32>(dst, src, rows, D);
}
extern "C" __global__ void bm_attn_to_bf16_d64(unsigned *dst, const float *src, long long rows, int D) {
    bm_attn_to_bf16_impl<64>(dst, src, rows, D);
}

// bm_attn_bwd_dot_bf16_d<DM>: dd[r] = Σ dout[r]·out[r] over D (one warp per
// row, like bm_attn_bwd_dot) and do16 = dout as bm_attn_to_bf16_d<DM>
// writes it, for the tensor-core backward.
template <int DM>
__device__ __forceinline__ void bm_attn_bwd_dot_bf16_impl(float *dd, unsigned *do16, const float *dout, const float *out, int rows, int D) {
    const int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (r >= rows) return; // whole warps leave
    const long long o = (long long)r * D;
    float a = 0.f;
#pragma unroll
    for (int p = lane; p < DM / 2; p += 32) {
        const int d = 2 * p;
        float x0 = 0.f, x1 = 0.f;
        if (d < D) x0 = dout[o + d], a = fmaf(x0, out[o + d], a);
        if (d + 1 < D) x1 = dout[o + d + 1], a = fmaf(x1, out[o + d + 1], a);
        do16[(long long)r * (DM / 2) + p] = bm_bf16x2(x0, x1);
    }
    a = bm_warp_sum(a);
    if (lane == 0) dd[r] = a;
}

extern "C" __global__ void bm_attn_bwd_dot_bf16_d32(float *dd, unsigned *do16, const float *dout, const float *out, int rows, int D) {
    bm_attn_bwd_dot_bf16_impl<32>(dd, do16, dout, out, rows, D);
}
extern "C" __global__ void bm_attn_bwd_dot_bf16_d64(float *dd, unsigned *do16, const float *dout, const float *out, int rows, int D) {
    bm_attn_bwd_dot_bf16_impl<64>(dd, do16, dout, out, rows, D);
}

// bm_tc_load starts the cp.async copies of a BM_TC_KT×DM tile xs (row stride
// DM+8: the 16-byte pad puts the 8 rows an ldmatrix reads in different
// banks) from the padded bf16 tensor x: row r holds entry idx = first+r, at
// base + map[idx]·stride (map nullptr: idx·stride; base and stride in bf16
// elements), and zeros when idx > last.
template <int DM>
__device__ __forceinline__ void bm_tc_load(uint16_t *xs, const uint16_t *x, int first, int last, const int *map, long long base,
                                           long long stride) {
    constexpr int NCH = DM / 8, LD = DM + 8, IT = BM_TC_KT * NCH / BM_TC_NT;
#pragma unroll
    for (int it = 0; it < IT; it++) {
        const int i = threadIdx.x + it * BM_TC_NT, r = i / NCH, d = 8 * (i % NCH), idx = first + r;
        const bool ok = idx <= last;
        const uint16_t *src = ok ? x + base + (long long)(map ? map[idx] : idx) * stride + d : x;
        bm_cp_async<16>(xs + r * LD + d, src, ok);
    }
}

// bm_tc_afrag loads the lane's A fragments of a 16×DM bf16 operand straight
// from global memory: rows row0 (= g of the fragment) and row1 (= g+8),
// zero when invalid or beyond D.
template <int NK>
__device__ __forceinline__ void bm_tc_afrag(unsigned (&f)[NK][4], const float *src, long long row0, long long row1, bool v0, bool v1,
                                            int D, int c) {
    auto ld = [&](bool ok, long long row, int d) { return ok && d < D ? src[row + d] : 0.f; };
#pragma unroll
    for (int kk = 0; kk < NK; kk++) {
        const int d = 16 * kk + 2 * c;
        f[kk][0] = bm_bf16x2(ld(v0, row0, d), ld(v0, row0, d + 1));
        f[kk][1] = bm_bf16x2(ld(v1, row1, d), ld(v1, row1, d + 1));
        f[kk][2] = bm_bf16x2(ld(v0, row0, d + 8), ld(v0, row0, d + 9));
        f[kk][3] = bm_bf16x2(ld(v1, row1, d + 8), ld(v1, row1, d + 9));
    }
}

// bm_tc_qk: sc[2·NJ][4] (16 rows × 16·NJ columns) += A·Xᵀ, A the warp's
// fragments, X rows 0..16·NJ−1 of a staged [·][DM] tile (ldmatrix without
// .trans: matrix i of lane l is rows 8·(l/16)+l%8, columns 8·((l/8)%2) of a
// 16×16 block, i.e. the B fragments of two 8-column tiles).
template <int DM, int NJ>
__device__ __forceinline__ void bm_tc_qk(float (&sc)[2 * NJ][4], const unsigned (&a)[DM / 16][4], const uint16_t *xs, int lane) {
    constexpr int LD = DM + 8;
    const uint16_t *base = xs + ((lane & 7) + 8 * (lane >> 4)) * LD + 8 * ((lane >> 3) & 1);
#pragma unroll
    for (int j2 = 0; j2 < NJ; j2++)
#pragma unroll
        for (int kk = 0; kk < DM / 16; kk++) {
            unsigned bx[4];
            bm_ldsm_x4(bx, base + 16 * j2 * LD + 16 * kk);
            bm_mma_16816(sc[2 * j2], a[kk], bx[0], bx[1]);
            bm_mma_16816(sc[2 * j2 + 1], a[kk], bx[2], bx[3]);
        }
}

// bm_tc_pv: acc[DM/8][4] (16 rows × DM) += P·X, P the 16×16·NJ bf16 A
// fragments pa (from the C fragments of bm_tc_qk), X rows 0..16·NJ−1 of a
// staged [·][DM] tile (ldmatrix .trans: matrix i of lane l is rows
// 8·((l/8)%2)+l%8, columns 8·(l/16) of a 16×16 block).
template <int DM, int NJ>
__device__ __forceinline__ void bm_tc_pv(float (&acc)[DM / 8][4], const unsigned (&pa)[NJ][4], const uint16_t *xs, int lane) {
    constexpr int LD = DM + 8;
    const uint16_t *base = xs + ((lane & 7) + 8 * ((lane >> 3) & 1)) * LD + 8 * (lane >> 4);
#pragma unroll
    for (int dp = 0; dp < DM / 16; dp++)
#pragma unroll
        for (int kk = 0; kk < NJ; kk++) {
            unsigned bx[4];
            bm_ldsm_x4_t(bx, base + 16 * kk * LD + 16 * dp);
            bm_mma_16816(acc[2 * dp], pa[kk], bx[0], bx[1]);
            bm_mma_16816(acc[2 * dp + 1], pa[kk], bx[2], bx[3]);
        }
}

// bm_tc_pack turns the C fragments of 16×16·NJ fp32 values into the bf16
// A fragments of the same matrix (NJ 16-column steps).
template <int NJ>
__device__ __forceinline__ void bm_tc_pack(unsigned (&pa)[NJ][4], const float (&x)[2 * NJ][4]) {
#pragma unroll
    for (int kk = 0; kk < NJ; kk++) {
        pa[kk][0] = bm_bf16x2(x[2 * kk][0], x[2 * kk][1]);
        pa[kk][1] = bm_bf16x2(x[2 * kk][2], x[2 * kk][3]);
        pa[kk][2] = bm_bf16x2(x[2 * kk + 1][0], x[2 * kk + 1][1]);
        pa[kk][3] = bm_bf16x2(x[2 * kk + 1][2], x[2 * kk + 1][3]);
    }
}

// bm_tc_ranges sets the key ranges lo, hi of part for the lane's query rows
// rt (g and g+8 of its warp's 16; empty for a row past T), the union range
// [wlo, whi] of the warp's rows w0..w0+15 (empty when it has none) and their
// intersection [flo, fhi] (empty unless all 16 rows exist): a key tile
// inside it needs no mask.
__device__ __forceinline__ void bm_tc_ranges(int part, const int (&rt)[2], int w0, const BmAttn &s, const int *bpre, int (&lo)[2],
                                             int (&hi)[2], int &wlo, int &whi, int &flo, int &fhi) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
        lo[i] = 1, hi[i] = 0;
        if (rt[i] < s.T) bm_attn_range(part, rt[i], s, bpre, lo[i], hi[i]);
    }
    wlo = 1, whi = 0, flo = 1, fhi = 0;
    if (w0 < s.T) {
        bm_attn_range(part, w0, s, bpre, wlo, fhi);
        bm_attn_range(part, min(s.T - 1, w0 + 15), s, bpre, flo, whi);
        if (w0 + 15 >= s.T) flo = 1, fhi = 0;
    }
}

// The block's common setup of the forward and dq kernels.
struct BmTcQ {
    int lane, c, b, h, t0, tl, w0, rt[2];
    long long kbase, qrow[2];
    const int *bpre, *bcomp;
};

__device__ __forceinline__ BmTcQ bm_tc_qsetup(const int *comp, const int *pre, const BmAttn &s) {
    BmTcQ x;
    x.lane = threadIdx.x & 31, x.c = x.lane & 3;
    x.b = blockIdx.z, x.h = blockIdx.y, x.t0 = blockIdx.x * BM_TC_T;
    x.tl = min(s.T - 1, x.t0 + BM_TC_T - 1);
    x.w0 = x.t0 + 16 * (threadIdx.x >> 5);
    x.rt[0] = x.w0 + (x.lane >> 2), x.rt[1] = x.rt[0] + 8;
    const int g = x.h * s.G / s.H;
    x.kbase = (long long)x.b * s.T * s.G * s.D + (long long)g * s.D;
#pragma unroll
    for (int i = 0; i < 2; i++) x.qrow[i] = (((long long)x.b * s.T + x.rt[i]) * s.H + x.h) * s.D;
    x.bpre = s.M > 0 ? pre + (long long)x.b * (s.nC + 1) : nullptr;
    x.bcomp = s.M > 0 ? comp + (long long)x.b * s.nCS : nullptr;
    return x;
}


// BmTcSeq is a position in the key tiles a forward or dq block walks: part
// (3 once past the last), the first key kt of the tile and the last key khi
// of the part's union range. Parts not in mask, off (Wf or M zero) or empty
// for the block are skipped.
struct BmTcSeq {
    int part, kt, khi;
};

// bm_tc_seq_from moves q to the first tile of the first part ≥ part.
__device__ __forceinline__ void bm_tc_seq_from(BmTcSeq &q, int part, int mask, const BmTcQ &x, const BmAttn &s) {
    for (; part < 3; part++) {
        if (!((mask >> part) & 1) || (part == 1 && s.Wf == 0) || (part == 2 && s.M == 0)) continue;
        int unused;
        bm_attn_range(part, x.t0, s, x.bpre, q.kt, unused);
        bm_attn_range(part, x.tl, s, x.bpre, unused, q.khi);
        if (q.kt <= q.khi) break;
    }
    q.part = part;
}

__device__ __forceinline__ void bm_tc_seq_next(BmTcSeq &q, int mask, const BmTcQ &x, const BmAttn &s) {
    q.kt += BM_TC_KT;
    if (q.kt > q.khi) bm_tc_seq_from(q, q.part + 1, mask, x, s);
}

// bm_tc_seq_load starts the copies of tile q's keys and values (part 0: k,
// v; 1: kf, vf; 2: km and v at the compacted positions).
template <int DM>
__device__ __forceinline__ void bm_tc_seq_load(uint16_t *ks, uint16_t *vs, const BmTcSeq &q, const BmTcQ &x, const BmAttn &s,
                                               const uint16_t *k, const uint16_t *v, const uint16_t *kf, const uint16_t *vf,
                                               const uint16_t *km, long long kb16) {
    const uint16_t *kb = q.part == 0 ? k : q.part == 1 ? kf : km, *vb = q.part == 1 ? vf : v;
    const int *map = q.part == 2 ? x.bcomp : nullptr;
    bm_tc_load<DM>(ks, kb, q.kt, q.khi, map, kb16, (long long)s.G * DM);
    bm_tc_load<DM>(vs, vb, q.kt, q.khi, map, kb16, (long long)s.G * DM);
}

// The kv head's first element in the padded bf16 key tensors.
__device__ __forceinline__ long long bm_tc_kb16(const BmTcQ &x, const BmAttn &s, int DM) {
    return ((long long)x.b * s.T * s.G + x.h * s.G / s.H) * DM;
}

template <int DM>
__device__ __forceinline__ void bm_attn_fwd_tc_impl(float *out, float *lse, const float *q, const uint16_t *k, const uint16_t *v,
                                                    const uint16_t *kf, const uint16_t *vf, const float *qm, const uint16_t *km,
                                                    const int *comp, const int *pre, const BmAttn s, float scale,
                                                    uint16_t *out16) {
    constexpr int NK = DM / 16, ND = DM / 8, LD = DM + 8;
    alignas(16) __shared__ uint16_t ks[2][BM_TC_KT * LD], vs[2][BM_TC_KT * LD];
    const BmTcQ x = bm_tc_qsetup(comp, pre, s);
    const long long kb16 = bm_tc_kb16(x, s, DM);
    const float sl2 = scale * BM_LOG2E; // scores in log2 units: exp2f
    float o[ND][4];
#pragma unroll
    for (int j = 0; j < ND; j++) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}; // l: this lane's partial sums
    unsigned qf[NK][4];
    int lo[2], hi[2], wlo, whi, flo, fhi, cur = -1; // cur: the part of the last computed tile
    BmTcSeq nx;
    bm_tc_seq_from(nx, 0, 7, x, s);
    if (nx.part < 3) bm_tc_seq_load<DM>(ks[0], vs[0], nx, x, s, k, v, kf, vf, km, kb16);
    bm_cp_async_commit();
    for (int bf = 0; nx.part < 3; bf ^= 1) {
        const BmTcSeq t = nx;
        bm_tc_seq_next(nx, 7, x, s);
        // The next tile's copies run while the warps compute this one.
        if (nx.part < 3) bm_tc_seq_load<DM>(ks[bf ^ 1], vs[bf ^ 1], nx, x, s, k, v, kf, vf, km, kb16);
        bm_cp_async_commit();
        bm_cp_async_wait<1>(); // this thread's copies of tile t are done
        __syncthreads();       // and every thread's
        if (t.part != cur) {
            if (cur < 0 || t.part == 2)
                bm_tc_afrag<NK>(qf, t.part == 2 ? qm : q, x.qrow[0], x.qrow[1], x.rt[0] < s.T, x.rt[1] < s.T, s.D, x.c);
            bm_tc_ranges(t.part, x.rt, x.w0, s, x.bpre, lo, hi, wlo, whi, flo, fhi);
            cur = t.part;
        }
        const int kt = t.kt;
        if (wlo <= whi && whi >= kt && wlo <= kt + BM_TC_KT - 1) { // else no row of the warp sees a key of the tile
            float sc[8][4];
#pragma unroll
            for (int j = 0; j < 8; j++) sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.f;
            bm_tc_qk<DM, 4>(sc, qf, ks[bf], x.lane);
            const bool full = kt >= flo && kt + BM_TC_KT - 1 <= fhi; // no key of the tile masked for the warp
            float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = kt + 8 * j + 2 * x.c + (e & 1), i = e >> 1;
                    const float y = (full || (key >= lo[i] && key <= hi[i])) ? sc[j][e] * sl2 : -INFINITY;
                    sc[j][e] = y;
                    mt[i] = fmaxf(mt[i], y);
                }
            float mu[2];
#pragma unroll
            for (int i = 0; i < 2; i++) { // the 4 lanes of a row agree on m
                mt[i] = fmaxf(mt[i], __shfl_xor_sync(BM_FULL, mt[i], 1));
                mt[i] = fmaxf(mt[i], __shfl_xor_sync(BM_FULL, mt[i], 2));
                const float mn = fmaxf(m[i], mt[i]);
                mu[i] = mn == -INFINITY ? 0.f : mn; // a row with no key yet: exp2f(−∞) = 0
                const float alpha = exp2f(m[i] - mu[i]);
                m[i] = mn;
                l[i] *= alpha;
#pragma unroll
                for (int j = 0; j < ND; j++) o[j][2 * i] *= alpha, o[j][2 * i + 1] *= alpha;
            }
#pragma unroll
            for (int j = 0; j < 8; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float p = exp2f(sc[j][e] - mu[e >> 1]);
                    l[e >> 1] += p;
                    sc[j][e] = p;
                }
            unsigned pa[4][4];
            bm_tc_pack<4>(pa, sc);
            bm_tc_pv<DM, 4>(o, pa, vs[bf], x.lane);
        }
        __syncthreads(); // every warp is done with buffer bf before it is refilled
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(BM_FULL, l[i], 1);
        l[i] += __shfl_xor_sync(BM_FULL, l[i], 2);
    }
    // A valid query always has its own context key, so l > 0.
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (x.rt[i] >= s.T) continue;
#pragma unroll
        for (int j = 0; j < ND; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int d = 8 * j + 2 * x.c + e;
                if (d < s.D) {
                    const float r = o[j][2 * i + e] / l[i];
                    out[x.qrow[i] + d] = r;
                    if (out16) out16[x.qrow[i] + d] = (uint16_t)bm_bf16_bits(r);
                }
            }
        if (x.c == 0) lse[((long long)x.b * s.T + x.rt[i]) * s.H + x.h] = m[i] * BM_LN2 + logf(l[i]);
    }
}

#define BM_ATTN_FWD_TC(NAME, DM)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(BM_TC_NT, 3)                                                                        \
        NAME(float *out, float *lse, const float *q, const uint16_t *k, const uint16_t *v, const uint16_t *kf, const uint16_t *vf, \
             const float *qm, const uint16_t *km, const int *comp, const int *pre, int T, int H, int G, int D, int Wc, int Wf,     \
             int C, int M, int Delta, int nC, int nCS, float scale, uint16_t *out16) {                                            \
        const BmAttn s = {T, H, G, D, Wc, Wf, C, M, Delta, nC, nCS};                                                              \
        bm_attn_fwd_tc_impl<DM>(out, lse, q, k, v, kf, vf, qm, km, comp, pre, s, scale, out16);                                   \
    }

BM_ATTN_FWD_TC(bm_attn_fwd_tc_d32, 32)
BM_ATTN_FWD_TC(bm_attn_fwd_tc_d64, 64)

// bm_tc_add_rows: dst[row + d] += acc (= when over) for the lane's rows
// (past T: none) and dims (< D).
template <int ND>
__device__ __forceinline__ void bm_tc_add_rows(float *dst, const float (&acc)[ND][4], const BmTcQ &x, const BmAttn &s, int over) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (x.rt[i] >= s.T) continue;
#pragma unroll
        for (int j = 0; j < ND; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int d = 8 * j + 2 * x.c + e;
                if (d < s.D) dst[x.qrow[i] + d] = (over ? 0.f : dst[x.qrow[i] + d]) + acc[j][2 * i + e];
            }
    }
}

// bm_attn_dq_tc_impl: dq += the context and fading parts, then dqm += the
// memory part, each from a fresh accumulator (the same lane adds both, so
// dqm may alias dq). p = exp(q·k·scale − lse), ds = p·(dout·v − dd)·scale,
// dq += ds·k. over: dq = instead (every query sees its own key, so every
// row of dq is written; the host's deferred zero).
template <int DM>
__device__ __forceinline__ void bm_attn_dq_tc_impl(float *dq, float *dqm, const float *dout, const float *lse, const float *Dd,
                                                   const float *q, const uint16_t *k, const uint16_t *v, const uint16_t *kf,
                                                   const uint16_t *vf, const float *qm, const uint16_t *km, const int *comp,
                                                   const int *pre, const BmAttn s, float scale, int over) {
    constexpr int NK = DM / 16, ND = DM / 8, LD = DM + 8;
    alignas(16) __shared__ uint16_t ks[2][BM_TC_KT * LD], vs[2][BM_TC_KT * LD];
    const BmTcQ x = bm_tc_qsetup(comp, pre, s);
    const long long kb16 = bm_tc_kb16(x, s, DM);
    const float sl2 = scale * BM_LOG2E;
    const int mask = (dq ? 3 : 0) | (dqm ? 4 : 0);
    BmTcSeq nx;
    bm_tc_seq_from(nx, 0, mask, x, s);
    if (nx.part < 3) bm_tc_seq_load<DM>(ks[0], vs[0], nx, x, s, k, v, kf, vf, km, kb16);
    bm_cp_async_commit();
    float lt[2], dd[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const long long lr = ((long long)x.b * s.T + x.rt[i]) * s.H + x.h;
        const bool ok = x.rt[i] < s.T;
        lt[i] = ok ? lse[lr] * BM_LOG2E : 0.f;
        dd[i] = ok ? Dd[lr] : 0.f;
    }
    unsigned of[NK][4], qf[NK][4];
    bm_tc_afrag<NK>(of, dout, x.qrow[0], x.qrow[1], x.rt[0] < s.T, x.rt[1] < s.T, s.D, x.c);
    float acc[ND][4];
#pragma unroll
    for (int j = 0; j < ND; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    int lo[2], hi[2], wlo, whi, flo, fhi, cur = -1; // cur: the part of the last computed tile
    for (int bf = 0; nx.part < 3; bf ^= 1) {
        const BmTcSeq t = nx;
        bm_tc_seq_next(nx, mask, x, s);
        if (nx.part < 3) bm_tc_seq_load<DM>(ks[bf ^ 1], vs[bf ^ 1], nx, x, s, k, v, kf, vf, km, kb16);
        bm_cp_async_commit();
        bm_cp_async_wait<1>();
        __syncthreads();
        if (t.part != cur) {
            if (t.part == 2 && cur >= 0) { // dq is complete: the memory part goes to dqm
                bm_tc_add_rows<ND>(dq, acc, x, s, over);
#pragma unroll
                for (int j = 0; j < ND; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
            }
            if (cur < 0 || t.part == 2)
                bm_tc_afrag<NK>(qf, t.part == 2 ? qm : q, x.qrow[0], x.qrow[1], x.rt[0] < s.T, x.rt[1] < s.T, s.D, x.c);
            bm_tc_ranges(t.part, x.rt, x.w0, s, x.bpre, lo, hi, wlo, whi, flo, fhi);
            cur = t.part;
        }
        const int kt = t.kt;
        if (wlo <= whi && whi >= kt && wlo <= kt + BM_TC_KT - 1) { // else no row of the warp sees a key of the tile
            const bool full = kt >= flo && kt + BM_TC_KT - 1 <= fhi; // no key of the tile masked for the warp
            const uint16_t *kss = ks[bf], *vss = vs[bf];
            // Two halves of 32 keys: fewer live registers.
#pragma unroll 1
            for (int k0 = 0; k0 < BM_TC_KT; k0 += 32) {
                float sc[4][4], dp[4][4];
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) sc[j][e] = dp[j][e] = 0.f;
                bm_tc_qk<DM, 2>(sc, qf, kss + k0 * LD, x.lane);
                bm_tc_qk<DM, 2>(dp, of, vss + k0 * LD, x.lane);
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int key = kt + k0 + 8 * j + 2 * x.c + (e & 1), i = e >> 1;
                        const float ds = exp2f(sc[j][e] * sl2 - lt[i]) * (dp[j][e] - dd[i]) * scale;
                        sc[j][e] = (full || (key >= lo[i] && key <= hi[i])) ? ds : 0.f; // a select: a masked ds may be inf or NaN
                    }
                unsigned da[2][4];
                bm_tc_pack<2>(da, sc);
                bm_tc_pv<DM, 2>(acc, da, kss + k0 * LD, x.lane);
            }
        }
        __syncthreads(); // every warp is done with buffer bf before it is refilled
    }
    if (cur >= 0) bm_tc_add_rows<ND>(cur == 2 ? dqm : dq, acc, x, s, cur == 2 ? 0 : over);
}

#define BM_ATTN_DQ_TC(NAME, DM)                                                                                                      \
    extern "C" __global__ void __launch_bounds__(BM_TC_NT, 3)                                                                           \
        NAME(float *dq, float *dqm, const float *dout, const float *lse, const float *Dd, const float *q, const uint16_t *k,          \
             const uint16_t *v, const uint16_t *kf, const uint16_t *vf, const float *qm, const uint16_t *km, const int *comp,       \
             const int *pre, int T, int H, int G, int D, int Wc, int Wf, int C, int M, int Delta, int nC, int nCS, float scale,   \
             int over) {                                                                                                              \
        const BmAttn s = {T, H, G, D, Wc, Wf, C, M, Delta, nC, nCS};                                                                 \
        bm_attn_dq_tc_impl<DM>(dq, dqm, dout, lse, Dd, q, k, v, kf, vf, qm, km, comp, pre, s, scale, over);                          \
    }

BM_ATTN_DQ_TC(bm_attn_bwd_dq_tc_d32, 32)
BM_ATTN_DQ_TC(bm_attn_bwd_dq_tc_d64, 64)

// bm_attn_dkv_tc_impl: key-centric dk, dv over the same key sets as
// bm_attn_dkv_impl (MEM, qa, qb, dup as there); q and dout are the padded
// bf16 copies, k and v fp32. over bits 1, 2: dk, dv = instead of +=
// (without MEM the blocks cover every key; the host's deferred zero).
template <int DM, bool MEM>
__device__ __forceinline__ void bm_attn_dkv_tc_impl(float *dk, float *dv, const float *k, const float *v, const uint16_t *q,
                                                    const uint16_t *dout, const float *lse, const float *Dd, const int *comp,
                                                    const int *pre, const int *dup, const BmAttn s, int qa, int qb, float scale,
                                                    int over) {
    constexpr int NK = DM / 16, ND = DM / 8, LD = DM + 8;
    alignas(16) __shared__ uint16_t qs[2][BM_TC_KT * LD], os[2][BM_TC_KT * LD];
    alignas(16) __shared__ float ls[2][BM_TC_KT], dds[2][BM_TC_KT];
    __shared__ int qlo[MEM ? 2 : 1][BM_TC_KT], qhi[MEM ? 2 : 1][BM_TC_KT];
    const int lane = threadIdx.x & 31, c = lane & 3;
    const int b = blockIdx.z, g = blockIdx.y, j0 = blockIdx.x * BM_TC_T;
    const int *bpre = MEM ? pre + (long long)b * (s.nC + 1) : nullptr;
    const int *bcomp = MEM ? comp + (long long)b * s.nCS : nullptr;
    const int nkeys = MEM ? bpre[s.nC] : s.T;
    if (j0 >= nkeys) return; // the whole block
    const int j1 = min(nkeys, j0 + BM_TC_T) - 1;

    // Queries that can see a key of this block: [tA, tB].
    int tA, tB;
    bm_key_block_queries<MEM>(tA, tB, j0, j1, qa, qb, bpre, s);
    // Query heads of kv head g: h with h·G/H == g. The block walks (h, tq)
    // for h in [hA, hE), tq = tA, tA+BM_TC_KT, … ≤ tB.
    const int hA = (g * s.H + s.G - 1) / s.G, hE = ((g + 1) * s.H + s.G - 1) / s.G;
    // load starts the copies of tile (h, tq) into buffer bf: the rows of q
    // and dout, lse and dd (zeros past tB), and for memory keys each query's
    // index range (written directly).
    auto load = [&](int h, int tq, int bf) {
        const long long base = ((long long)b * s.T * s.H + h) * DM, stride = (long long)s.H * DM;
        bm_tc_load<DM>(qs[bf], q, tq, tB, nullptr, base, stride);
        bm_tc_load<DM>(os[bf], dout, tq, tB, nullptr, base, stride);
        if (threadIdx.x < BM_TC_KT) {
            const int t = tq + threadIdx.x;
            const bool ok = t <= tB;
            const long long lr = ok ? ((long long)b * s.T + t) * s.H + h : 0;
            bm_cp_async<4>(&ls[bf][threadIdx.x], lse + lr, ok);
            bm_cp_async<4>(&dds[bf][threadIdx.x], Dd + lr, ok);
            if (MEM) {
                int lo = 1, hi = 0;
                if (ok) bm_attn_range(2, t, s, bpre, lo, hi);
                qlo[bf][threadIdx.x] = lo;
                qhi[bf][threadIdx.x] = hi;
            }
        }
    };
    int nh = hA, ntq = tA; // the next tile to load
    if (tA <= tB && hA < hE) load(nh, ntq, 0);
    bm_cp_async_commit();

    const int kw0 = j0 + 16 * (threadIdx.x >> 5), kw1 = min(nkeys - 1, kw0 + 15); // the warp's keys (none when kw0 > kw1)
    int key[2];
    bool kvalid[2];
    long long krow[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        key[i] = kw0 + (lane >> 2) + 8 * i;
        kvalid[i] = key[i] < nkeys;
        const int pos = kvalid[i] ? (MEM ? bcomp[key[i]] : key[i]) : 0;
        krow[i] = (((long long)b * s.T + pos) * s.G + g) * s.D;
    }
    unsigned kfr[NK][4], vfr[NK][4];
    bm_tc_afrag<NK>(kfr, k, krow[0], krow[1], kvalid[0], kvalid[1], s.D, c);
    bm_tc_afrag<NK>(vfr, v, krow[0], krow[1], kvalid[0], kvalid[1], s.D, c);
    float dka[ND][4], dva[ND][4];
#pragma unroll
    for (int j = 0; j < ND; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[j][e] = dva[j][e] = 0.f;
    const float sl2 = scale * BM_LOG2E;

    for (int bf = 0; tA <= tB && nh < hE; bf ^= 1) {
        const int tq = ntq;
        ntq += BM_TC_KT;
        if (ntq > tB) nh++, ntq = tA;
        if (nh < hE) load(nh, ntq, bf ^ 1);
        bm_cp_async_commit();
        bm_cp_async_wait<1>(); // this thread's copies of tile tq are done
        __syncthreads();       // and every thread's
        // full: every key of the warp sees every query of the tile.
        const bool full = !MEM && kw1 == kw0 + 15 && tq + BM_TC_KT - 1 <= tB && tq >= kw1 + qa && tq + BM_TC_KT - 1 <= kw0 + qb;
        if (kw0 <= kw1 && (MEM || (tq <= kw1 + qb && tq + BM_TC_KT - 1 >= kw0 + qa))) { // else no key of the warp sees the tile
            const uint16_t *qss = qs[bf], *oss = os[bf];
            const float *lss = ls[bf], *ddss = dds[bf];
            const int *qlos = qlo[MEM ? bf : 0], *qhis = qhi[MEM ? bf : 0];
            // Two halves of 32 queries: fewer live registers.
#pragma unroll 1
            for (int q0 = 0; q0 < BM_TC_KT; q0 += 32) {
                float st[4][4], dpt[4][4];
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) st[j][e] = dpt[j][e] = 0.f;
                bm_tc_qk<DM, 2>(st, kfr, qss + q0 * LD, lane); // Sᵀ: rows keys, columns queries
                bm_tc_qk<DM, 2>(dpt, vfr, oss + q0 * LD, lane);
#pragma unroll
                for (int j = 0; j < 4; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int col = q0 + 8 * j + 2 * c + (e & 1), t = tq + col, i = e >> 1;
                        const bool ok = full || (kvalid[i] && t <= tB &&
                                                 (MEM ? (key[i] >= qlos[col] && key[i] <= qhis[col]) : (t >= key[i] + qa && t <= key[i] + qb)));
                        const float p = exp2f(st[j][e] * sl2 - lss[col] * BM_LOG2E);
                        const float ds = p * (dpt[j][e] - ddss[col]) * scale;
                        st[j][e] = ok ? p : 0.f; // selects: a masked p may be inf
                        dpt[j][e] = ok ? ds : 0.f;
                    }
                unsigned pa[2][4];
                bm_tc_pack<2>(pa, st);
                bm_tc_pv<DM, 2>(dva, pa, oss + q0 * LD, lane);
                bm_tc_pack<2>(pa, dpt);
                bm_tc_pv<DM, 2>(dka, pa, qss + q0 * LD, lane);
            }
        }
        __syncthreads(); // every warp is done with buffer bf before it is refilled
    }
    const bool atomic = MEM && *dup != 0;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (!kvalid[i]) continue;
#pragma unroll
        for (int j = 0; j < ND; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int d = 8 * j + 2 * c + e;
                if (d >= s.D) continue;
                const long long o = krow[i] + d;
                if (atomic) {
                    if (dk) atomicAdd(dk + o, dka[j][2 * i + e]);
                    if (dv) atomicAdd(dv + o, dva[j][2 * i + e]);
                } else {
                    if (dk) dk[o] = ((over & 1) ? 0.f : dk[o]) + dka[j][2 * i + e];
                    if (dv) dv[o] = ((over & 2) ? 0.f : dv[o]) + dva[j][2 * i + e];
                }
            }
    }
}

#define BM_ATTN_DKV_TC(NAME, DM)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(BM_TC_NT, 3)                                                                        \
        NAME(float *dk, float *dv, const float *k, const float *v, const uint16_t *q, const uint16_t *dout, const float *lse,     \
             const float *Dd, int T, int H, int G, int D, int qa, int qb, float scale, int over) {                               \
        const BmAttn s = {T, H, G, D, 1, 0, 1, 0, 0, 0, 0};                                                                      \
        bm_attn_dkv_tc_impl<DM, false>(dk, dv, k, v, q, dout, lse, Dd, nullptr, nullptr, nullptr, s, qa, qb, scale, over);       \
    }

#define BM_ATTN_DKV_MEM_TC(NAME, DM)                                                                                              \
    extern "C" __global__ void __launch_bounds__(BM_TC_NT, 3)                                                                        \
        NAME(float *dk, float *dv, const float *k, const float *v, const uint16_t *q, const uint16_t *dout, const float *lse,     \
             const float *Dd, const int *comp, const int *pre, const int *dup, int T, int H, int G, int D, int C, int M, int Delta, \
             int nC, int nCS, float scale) {                                                                                     \
        const BmAttn s = {T, H, G, D, 1, 0, C, M, Delta, nC, nCS};                                                               \
        bm_attn_dkv_tc_impl<DM, true>(dk, dv, k, v, q, dout, lse, Dd, comp, pre, dup, s, 0, 0, scale, 0);                        \
    }

BM_ATTN_DKV_TC(bm_attn_bwd_dkv_tc_d32, 32)
BM_ATTN_DKV_TC(bm_attn_bwd_dkv_tc_d64, 64)
BM_ATTN_DKV_MEM_TC(bm_attn_bwd_dkv_mem_tc_d32, 32)
BM_ATTN_DKV_MEM_TC(bm_attn_bwd_dkv_mem_tc_d64, 64)

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
// into out (out += when accumulate), in float64 like the CPU backend. One
// thread per (b, t, i): the angle is computed once for the nh heads. out may
// alias x. out16, when set, gets a bf16 copy of out (a product's operand).
extern "C" __global__ void bm_rope(float *out, const float *x, int T, int nh, int D, double theta, double sign, int accumulate,
                                   long long npairs, unsigned short *out16) {
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
            const float fa = accumulate ? out[o] + (float)ra : (float)ra;
            const float fb = accumulate ? out[o + half] + (float)rb : (float)rb;
            out[o] = fa;
            out[o + half] = fb;
            if (out16) {
                out16[o] = (unsigned short)bm_bf16_bits(fa);
                out16[o + half] = (unsigned short)bm_bf16_bits(fb);
            }
        }
    }
}

// ------------------------------------------------------ shift, innovation

// bm_shift_rows: out[b,t,:] = x[b,t-1,:], out[b,0,:] = 0 (out must not
// overlap x; the host stages in-place calls through a copy).
// out16, when set, gets a bf16 copy of out (a matrix product's operand).
// Blocks stride over rows, threads over a row (no per-element division).
extern "C" __global__ void bm_shift_rows(float *out, const float *x, int T, int d, long long rows, unsigned short *out16) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const bool first = r % T == 0;
        const long long o = r * d;
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            const float v = first ? 0.f : x[o - d + i];
            out[o + i] = v;
            if (out16) out16[o + i] = (unsigned short)bm_bf16_bits(v);
        }
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

// bm_innovation_backward: dp += de[r]·(−2/d)·(u − p), or dp = when over
// (the host's deferred zero); one block per row. dp16, when set, gets a
// bf16 copy of dp (a matrix product's operand).
extern "C" __global__ void bm_innovation_backward(float *dp, const float *de, const float *u, const float *p, int d,
                                                  int over, unsigned short *dp16) {
    const long long r = blockIdx.x;
    const double k = (double)de[r] * (-2.0 / d);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const long long o = r * d + i;
        const float g = (over ? 0.f : dp[o]) + (float)(k * ((double)u[o] - (double)p[o]));
        dp[o] = g;
        if (dp16) dp16[o] = (unsigned short)bm_bf16_bits(g);
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
