// The SSM kernels: SiLU, the causal depthwise Conv1d and the Mamba-1
// selective scan (docs/model.md §3), forward and backward. Backward kernels
// ACCUMULATE (+=) into their gradient outputs; a null gradient is skipped.
#include "common.cuh"

// ---------------------------------------------------------------- helpers

// bm_softplus_sig returns softplus(v) = log(1+eᵛ) and sets sig to its
// derivative sigmoid(v), from one exponential, exactly as the CPU's
// softplusSig: no threshold, log1p of e^(−|v|) keeps full precision.
static __device__ __forceinline__ float bm_softplus_sig(float v, float &sig) {
    const float y = expf(-fabsf(v)); // in (0, 1]
    const float l = log1pf(y);
    const float inv = 1.f / (1.f + y);
    if (v >= 0.f) {
        sig = inv;
        return v + l;
    }
    sig = y * inv;
    return l;
}

// bm_sum16 sums v over the 16 lanes of each half-warp (every lane of the
// warp must call it; each half gets its own sum).
static __device__ __forceinline__ float bm_sum16(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 8);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v;
}

// ---------------------------------------------------------------- SiLU

// out[i] = x[i]·sigmoid(x[i]) (float: within 1e-7 relative of the CPU's
// float64; double costs 40% more time here).
// out16, when set, gets a bf16 copy of out (a matrix product's operand).
extern "C" __global__ void bm_silu_fwd(float *out, const float *x, long long n, unsigned short *out16) {
    BM_FOR(i, n) {
        const float v = x[i];
        const float r = v / (1.f + expf(-v));
        out[i] = r;
        if (out16) out16[i] = (unsigned short)bm_bf16_bits(r);
    }
}

// bm_silu_grad is SiLUBackward's term g·silu'(x) = g·s·(1 + x·(1−s)),
// s = sigmoid(x), in double (the factor cancels near x ≈ −1.28, where float
// would lose digits).
__device__ __forceinline__ float bm_silu_grad(float g, float x) {
    const double v = x;
    const double s = 1.0 / (1.0 + exp(-v));
    return (float)((double)g * s * (1.0 + v * (1.0 - s)));
}

// dx[i] += bm_silu_grad(dout[i], x[i]); dx = when over (the host's deferred
// zero).
extern "C" __global__ void bm_silu_bwd(float *dx, const float *dout, const float *x, long long n, int over) {
    BM_FOR(i, n) {
        const float g = bm_silu_grad(dout[i], x[i]);
        dx[i] = over ? g : dx[i] + g;
    }
}

// bm_silu_matmul_bwd: dx[r,k] (+)= (dr[r,k] + Σ_n dout[r,n]·w[n,k])·silu'(x[r,k])
// (SiLUMatMulBackward; = when over). dout16 [Rw,N] and w16 [N,K] are bf16
// copies: the sum runs on tensor cores (mma.m16n8k16, fp32 accumulation)
// and is never stored in global memory. A block of 8 warps computes 64
// rows × 128 columns, warp w rows 16·(w%4).. and columns 64·(w/4)..; the
// n terms pass through shared memory 32 at a time. The finished tile goes
// to shared memory, where the elementwise part reads it row by row with
// x, dr and dx in 16-byte loads (whole 512-byte rows per warp).
#define SMB_ROWS 64
#define SMB_COLS 128
#define SMB_KC 32
#define SMB_ALD (SMB_KC + 8)   // bf16 row pitch of the dout chunk (no bank conflicts in ldmatrix)
#define SMB_BLD (SMB_COLS + 8) // bf16 row pitch of the w chunk
#define SMB_TLD (SMB_COLS + 4) // float row pitch of the finished tile
extern "C" __global__ void __launch_bounds__(256) bm_silu_matmul_bwd(float *dx, const float *dr, const uint16_t *dout16,
                                                                    const uint16_t *w16, const float *x, int Rw, int N, int K,
                                                                    int over) {
    // The operand chunks and, after the main loop, the finished tile share
    // one buffer.
    alignas(16) __shared__ unsigned char smem[SMB_ROWS * SMB_TLD * 4];
    uint16_t(*sa)[SMB_ALD] = (uint16_t(*)[SMB_ALD])smem;
    uint16_t(*sb)[SMB_BLD] = (uint16_t(*)[SMB_BLD])(smem + SMB_ROWS * SMB_ALD * 2);
    float(*tile)[SMB_TLD] = (float(*)[SMB_TLD])smem;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int r0 = blockIdx.y * SMB_ROWS, k0 = blockIdx.x * SMB_COLS;
    const int wr = (warp & 3) * 16, wc = (warp >> 2) * 64;
    // 16-byte loads need rows that start 16-byte aligned and whole groups.
    const bool vecA = N % 8 == 0 && bm_aligned16(dout16), vecB = K % 8 == 0 && k0 + SMB_COLS <= K && bm_aligned16(w16);
    float acc[8][4];
    for (int j = 0; j < 8; j++)
        for (int i = 0; i < 4; i++) acc[j][i] = 0.f;
    for (int n0 = 0; n0 < N; n0 += SMB_KC) {
        if (vecA) { // 64 rows × 4 groups of 8: one per thread
            const int rr = tid >> 2, q = (tid & 3) * 8, r = r0 + rr, n = n0 + q;
            bm_u4 v = {0, 0, 0, 0};
            if (r < Rw && n < N) v = bm_vec16<bm_u4>(dout16 + (long long)r * N + n);
            bm_vec16<bm_u4>(&sa[rr][q]) = v;
        } else {
            for (int i = tid; i < SMB_ROWS * SMB_KC; i += 256) {
                const int rr = i / SMB_KC, nn = i % SMB_KC, r = r0 + rr, n = n0 + nn;
                sa[rr][nn] = (r < Rw && n < N) ? dout16[(long long)r * N + n] : 0;
            }
        }
        if (vecB) { // 32 rows × 16 groups of 8: two per thread
            for (int i = tid; i < SMB_KC * SMB_COLS / 8; i += 256) {
                const int nn = i >> 4, q = (i & 15) * 8, n = n0 + nn;
                bm_u4 v = {0, 0, 0, 0};
                if (n < N) v = bm_vec16<bm_u4>(w16 + (long long)n * K + k0 + q);
                bm_vec16<bm_u4>(&sb[nn][q]) = v;
            }
        } else {
            for (int i = tid; i < SMB_KC * SMB_COLS; i += 256) {
                const int nn = i / SMB_COLS, cc = i % SMB_COLS, n = n0 + nn, k = k0 + cc;
                sb[nn][cc] = (n < N && k < K) ? w16[(long long)n * K + k] : 0;
            }
        }
        __syncthreads();
        for (int kk = 0; kk < SMB_KC && n0 + kk < N; kk += 16) {
            // ldmatrix: lane l addresses row l%8 of 8×8 matrix l/8.
            const int mi = lane >> 3;
            unsigned a[4];
            bm_ldsm_x4(a, &sa[wr + (lane & 7) + 8 * (mi & 1)][kk + 8 * (mi >> 1)]);
            for (int j = 0; j < 8; j += 2) {
                unsigned b[4]; // b0, b1 of column tiles j and j+1
                bm_ldsm_x4_t(b, &sb[kk + (lane & 7) + 8 * (mi & 1)][wc + 8 * j + 8 * (mi >> 1)]);
                bm_mma_16816(acc[j], a, b[0], b[1]);
                bm_mma_16816(acc[j + 1], a, b[2], b[3]);
            }
        }
        __syncthreads();
    }
    // acc[j][2h+e] is row wr+g+8h, column wc+8j+2c+e of the tile.
    const int g = lane >> 2, cq = lane & 3;
    for (int j = 0; j < 8; j++)
        for (int h = 0; h < 2; h++) {
            tile[wr + g + 8 * h][wc + 8 * j + 2 * cq] = acc[j][2 * h];
            tile[wr + g + 8 * h][wc + 8 * j + 2 * cq + 1] = acc[j][2 * h + 1];
        }
    __syncthreads();
    if (K % 4 == 0 && bm_aligned16(x) && bm_aligned16(dr) && bm_aligned16(dx) && r0 + SMB_ROWS <= Rw && k0 + SMB_COLS <= K) {
        // Whole tile, 16-byte aligned rows: each thread takes 8 float4 (a
        // warp, one 512-byte row),
        // four at a time, every load issued before any store (dr or x may
        // be dx itself: each element is read and written by one thread).
        for (int half = 0; half < 2; half++) {
            bm_f4 xv[4], rv[4], ov[4];
            long long at[4];
            int tr[4], tc[4];
            for (int u = 0; u < 4; u++) {
                const int idx = ((half * 4 + u) * 256 + tid) * 4; // element in the tile
                tr[u] = idx / SMB_COLS;
                tc[u] = idx % SMB_COLS;
                at[u] = (long long)(r0 + tr[u]) * K + k0 + tc[u];
                xv[u] = bm_vec16<bm_f4>(x + at[u]);
                rv[u] = bm_vec16<bm_f4>(dr + at[u]);
                if (!over) ov[u] = bm_vec16<bm_f4>(dx + at[u]);
            }
            for (int u = 0; u < 4; u++) {
                const float *p = &tile[tr[u]][tc[u]];
                bm_f4 o;
                o.x = bm_silu_grad(rv[u].x + p[0], xv[u].x);
                o.y = bm_silu_grad(rv[u].y + p[1], xv[u].y);
                o.z = bm_silu_grad(rv[u].z + p[2], xv[u].z);
                o.w = bm_silu_grad(rv[u].w + p[3], xv[u].w);
                if (!over) {
                    o.x += ov[u].x;
                    o.y += ov[u].y;
                    o.z += ov[u].z;
                    o.w += ov[u].w;
                }
                bm_vec16<bm_f4>(dx + at[u]) = o;
            }
        }
    } else {
        for (int i = tid; i < SMB_ROWS * SMB_COLS; i += 256) {
            const int rr = i / SMB_COLS, cc = i % SMB_COLS, r = r0 + rr, k = k0 + cc;
            if (r >= Rw || k >= K) continue;
            const long long at = (long long)r * K + k;
            const float gr = bm_silu_grad(dr[at] + tile[rr][cc], x[at]);
            dx[at] = over ? gr : dx[at] + gr;
        }
    }
}

// ---------------------------------------------------------------- Conv1d

// The conv kernels run a 2-D grid: blockIdx.x·blockDim.x + threadIdx.x is
// the channel e (blocks cover E), and the rows r = b·T + t are cut into
// gridDim.y (or gridDim.y·blockDim.y) contiguous segments, one per thread.
// A thread walks its segment in order and keeps the rows it reads again in
// a register window of KW values (KW ≥ K, a template parameter), so each
// element of x or dout is loaded about once, not K times. The newest row
// sits at window index KW−1; a term enters a sum only when its row lies in
// the same sequence, in the order of the reference's k loop.

// bm_conv_segment is the thread's segment [r0, r1) of rows among n.
__device__ __forceinline__ void bm_conv_segment(int &r0, int &r1, int rows, int seg, int n) {
    const int L = (rows + n - 1) / n;
    r0 = min(rows, seg * L);
    r1 = min(rows, r0 + L);
}

// out[b,t,e] = bias[e] + Σ_k w[e,k]·x[b,t−K+1+k,e] (x at t<0 is 0). With
// act set (Conv1dSiLU) it also writes act = SiLU(out) as bm_silu_fwd
// computes it, and act16, when set, act's bf16 copy: the SiLU's pass over
// out is saved.
template <int KW>
__device__ __forceinline__ void bm_conv1d_fwd_impl(float *out, const float *x, const float *w, const float *bias, int B, int T,
                                                   int E, int K, float *act, unsigned short *act16) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E) return;
    int r0, r1;
    bm_conv_segment(r0, r1, B * T, blockIdx.y, gridDim.y);
    if (r0 >= r1) return;
    float wk[KW], xw[KW]; // xw[j]: x at row r − (KW−1) + j; wk[j] its weight
#pragma unroll
    for (int j = 0; j < KW; j++) {
        const int k = j - (KW - K), row = r0 - (KW - 1) + j;
        wk[j] = k >= 0 ? w[(long long)e * K + k] : 0.f;
        xw[j] = k >= 0 && j < KW - 1 && row >= 0 ? x[(long long)row * E + e] : 0.f;
    }
    const float b0 = bias[e];
    int t = r0 % T;
    for (int r = r0; r < r1; r++) {
        const long long i = (long long)r * E + e;
        xw[KW - 1] = x[i];
        float acc = b0;
        const int j0 = max(KW - K, KW - 1 - t); // k = j − (KW−K) ≥ max(0, K−1−t)
#pragma unroll
        for (int j = 0; j < KW; j++)
            if (j >= j0) acc += wk[j] * xw[j];
        out[i] = acc;
        if (act) {
            const float a = acc / (1.f + expf(-acc));
            act[i] = a;
            if (act16) act16[i] = (unsigned short)bm_bf16_bits(a);
        }
#pragma unroll
        for (int j = 0; j < KW - 1; j++) xw[j] = xw[j + 1];
        if (++t == T) t = 0;
    }
}

// dx[b,s,e] += Σ_k dout[b,s+K−1−k,e]·w[e,k] (terms past T−1 vanish): the
// transpose of the forward, a gather with one writer per element; dx = when
// over (the host's deferred zero). dx16, when set, gets a bf16 copy of dx.
template <int KW>
__device__ __forceinline__ void bm_conv1d_bwd_dx_impl(float *dx, const float *dout, const float *w, int B, int T, int E, int K,
                                                      int over, unsigned short *dx16) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E) return;
    const int rows = B * T;
    int r0, r1;
    bm_conv_segment(r0, r1, rows, blockIdx.y, gridDim.y);
    if (r0 >= r1) return;
    float wk[KW], dw[KW]; // dw[KW−1−m]: dout at row r + K−1−m; wk[k] = w[e,k]
#pragma unroll
    for (int j = 0; j < KW; j++) {
        wk[j] = j < K ? w[(long long)e * K + j] : 0.f;
        const int row = r0 + j - (KW - K); // slots KW−K … KW−2 hold rows r0 … r0+K−2
        dw[j] = j >= KW - K && j < KW - 1 && row < rows ? dout[(long long)row * E + e] : 0.f;
    }
    int s = r0 % T;
    for (int r = r0; r < r1; r++) {
        const long long i = (long long)r * E + e;
        dw[KW - 1] = r + K - 1 < rows ? dout[i + (long long)(K - 1) * E] : 0.f;
        float acc = 0.f;
        const int k0 = max(0, s + K - T);
#pragma unroll
        for (int k = 0; k < KW; k++)
            if (k >= k0 && k < K) acc += dw[KW - 1 - k] * wk[k];
        const float v = over ? acc : dx[i] + acc;
        dx[i] = v;
        if (dx16) dx16[i] = (unsigned short)bm_bf16_bits(v);
#pragma unroll
        for (int j = 0; j < KW - 1; j++) dw[j] = dw[j + 1];
        if (++s == T) s = 0;
    }
}

#define BM_CONV_RY 8 // row segments per block of the dw, dbias stage 1 (blockDim.y)

// Stage 1 of dw, dbias: block (32, BM_CONV_RY) covers 32 channels
// (blockIdx.x); thread (tx, ty) walks row segment blockIdx.y·BM_CONV_RY + ty
// summing in registers, then the block sums its BM_CONV_RY segments in
// shared memory and writes part[blockIdx.y][e][k] for the K+1 columns
// (column K is the bias): P = gridDim.y partial sums, no atomics.
template <int KW>
__device__ __forceinline__ void bm_conv1d_bwd_wpart_impl(float *part, const float *dout, const float *x, int B, int T, int E, int K) {
    __shared__ float sh[BM_CONV_RY][KW + 1][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int e = blockIdx.x * 32 + tx;
    float acc[KW + 1]; // acc[j]: window slot j, i.e. k = j − (KW−K); acc[KW]: the bias
#pragma unroll
    for (int j = 0; j <= KW; j++) acc[j] = 0.f;
    if (e < E) {
        int r0, r1;
        bm_conv_segment(r0, r1, B * T, blockIdx.y * BM_CONV_RY + ty, gridDim.y * BM_CONV_RY);
        float xw[KW]; // xw[j]: x at row r − (KW−1) + j
#pragma unroll
        for (int j = 0; j < KW - 1; j++) {
            const int row = r0 - (KW - 1) + j;
            xw[j] = j >= KW - K && row >= 0 && r0 < r1 ? x[(long long)row * E + e] : 0.f;
        }
        int t = r1 > r0 ? r0 % T : 0;
        for (int r = r0; r < r1; r++) {
            const long long i = (long long)r * E + e;
            const float g = dout[i];
            xw[KW - 1] = x[i];
            acc[KW] += g;
            const int j0 = max(KW - K, KW - 1 - t);
#pragma unroll
            for (int j = 0; j < KW; j++)
                if (j >= j0) acc[j] += g * xw[j];
#pragma unroll
            for (int j = 0; j < KW - 1; j++) xw[j] = xw[j + 1];
            if (++t == T) t = 0;
        }
    }
#pragma unroll
    for (int j = 0; j <= KW; j++) sh[ty][j][tx] = acc[j];
    __syncthreads();
    // 32 channels × (K+1) columns, one sum each over the row segments.
    for (int idx = ty * 32 + tx; idx < 32 * (K + 1); idx += 32 * BM_CONV_RY) {
        const int c = idx & 31, k = idx >> 5, j = k == K ? KW : k + KW - K;
        const int ec = blockIdx.x * 32 + c;
        if (ec < E) {
            float s = 0.f;
#pragma unroll
            for (int y = 0; y < BM_CONV_RY; y++) s += sh[y][j][c];
            part[((long long)blockIdx.y * E + ec) * (K + 1) + k] = s;
        }
    }
}

// Instances for windows of 4, 8, 16 and 32 rows (the host picks the
// smallest KW ≥ K).
#define BM_CONV_KERNELS(KW)                                                                                                    \
    extern "C" __global__ void bm_conv1d_fwd_k##KW(float *out, const float *x, const float *w, const float *bias, int B, int T, \
                                                   int E, int K, float *act, unsigned short *act16) {                           \
        bm_conv1d_fwd_impl<KW>(out, x, w, bias, B, T, E, K, act, act16);                                                        \
    }                                                                                                                           \
    extern "C" __global__ void bm_conv1d_bwd_dx_k##KW(float *dx, const float *dout, const float *w, int B, int T, int E, int K, \
                                                      int over, unsigned short *dx16) {                                         \
        bm_conv1d_bwd_dx_impl<KW>(dx, dout, w, B, T, E, K, over, dx16);                                                         \
    }                                                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * BM_CONV_RY)                                                               \
        bm_conv1d_bwd_wpart_k##KW(float *part, const float *dout, const float *x, int B, int T, int E, int K) {                 \
        bm_conv1d_bwd_wpart_impl<KW>(part, dout, x, B, T, E, K);                                                                \
    }

BM_CONV_KERNELS(4)
BM_CONV_KERNELS(8)
BM_CONV_KERNELS(16)
BM_CONV_KERNELS(32)

// Stage 2: dw[e,k] += Σ_p part[p][e][k], dbias[e] += Σ_p part[p][e][K], in
// a fixed order (deterministic).
extern "C" __global__ void bm_conv1d_bwd_wsum(float *dw, float *dbias, const float *part, int P, int E, int K) {
    const long long n = (long long)E * (K + 1);
    BM_FOR(i, n) {
        float s = 0.f;
        for (int p = 0; p < P; p++) s += part[(long long)p * n + i];
        const int e = (int)(i / (K + 1)), k = (int)(i % (K + 1));
        if (k < K) {
            if (dw) dw[(long long)e * K + k] += s;
        } else if (dbias) {
            dbias[e] += s;
        }
    }
}

// ---------------------------------------------------------------- selective scan, generic N
//
// The generic path (N > 16; the models' N = 16 takes the fast path below).
// Both scan kernels use blocks of 256 threads = 16 channels × 16 lanes,
// blockIdx.x the channel group (e = 16·blockIdx.x + threadIdx.x/16) and
// blockIdx.y the sequence b. Lane l of a channel owns the states
// n = l + 16p, p < NP (NP = ceil(N/16), a template parameter); lanes whose
// n ≥ N hold A = 0, B = C = 0 and so stay at h = 0 and contribute nothing.
// Channels past E (the last group) compute on clamped inputs with dout = 0
// and write nothing, so they too contribute nothing to shared sums. Every
// thread runs every step: sums over n are half-warp shuffles. The state is
// fp32 (docs/model.md §5).

#define BM_SCAN_THREADS 256

// out[b,t,e] = (Σ_n h_t[e,n]·Cm[b,t,n] + Dskip[e]·x)·SiLU(z).
template <int NP>
static __device__ __forceinline__ void scan_fwd(float *out, const float *x, const float *dt, const float *dtBias,
                                                const float *Alog, const float *Bm, const float *Cm,
                                                const float *Dskip, const float *z, int B, int T, int E, int N) {
    const int ch = threadIdx.x >> 4, lane = threadIdx.x & 15;
    const int e = blockIdx.x * 16 + ch, b = blockIdx.y;
    const bool active = e < E;
    const int ec = active ? e : E - 1;
    float A[NP], h[NP];
#pragma unroll
    for (int p = 0; p < NP; p++) {
        const int n = lane + 16 * p;
        A[p] = n < N ? -expf(Alog[(long long)ec * N + n]) : 0.f;
        h[p] = 0.f;
    }
    const float bias = dtBias[ec], D = Dskip[ec];
    const long long r0 = (long long)b * T;
#pragma unroll 2
    for (int t = 0; t < T; t++) {
        const long long r = r0 + t, i = r * E + ec;
        float sig;
        const float delta = bm_softplus_sig(dt[i] + bias, sig);
        const float xv = x[i];
        const float dx = delta * xv;
        float y = 0.f;
#pragma unroll
        for (int p = 0; p < NP; p++) {
            const int n = lane + 16 * p;
            const float bm = n < N ? Bm[r * N + n] : 0.f;
            const float cm = n < N ? Cm[r * N + n] : 0.f;
            h[p] = expf(delta * A[p]) * h[p] + dx * bm;
            y += h[p] * cm;
        }
        y = bm_sum16(y);
        if (lane == 0 && active) {
            const float zv = z[i];
            out[i] = (y + D * xv) * (zv / (1.f + expf(-zv)));
        }
    }
}

// Backward with recomputed states. Pass 1 runs the recurrence forward and
// stores the state entering every chunk of L steps but the first into ck
// ([nC−1][B][E][N], nC = ceil(T/L)). Pass 2 walks the chunks in reverse:
// it recomputes the chunk's L states into registers (fully unrolled, so
// hs stays in registers) from its checkpoint, then back-propagates through
// them, carrying dh = a_{t+1}·dh_{t+1} across chunks.
//
// Reductions: over n (y, dx, dΔ) by half-warp shuffles; over e for dBm and
// dCm: the two channels of a warp by one shuffle, the 8 warps of the block
// through shared memory once per chunk, then one atomicAdd per block and
// element; over b, t for dAlog, ddtBias, dDskip: registers, one atomicAdd
// per thread (lane 0 for the per-channel ones) at the end.
template <int NP, int L>
static __device__ __forceinline__ void scan_bwd(float *ck, float *dx, float *ddt, float *ddtBias, float *dAlog,
                                                float *dBm, float *dCm, float *dDskip, float *dz,
                                                const float *dout, const float *x, const float *dt,
                                                const float *dtBias, const float *Alog, const float *Bm,
                                                const float *Cm, const float *Dskip, const float *z,
                                                int B, int T, int E, int N) {
    constexpr int NW = BM_SCAN_THREADS / 32; // warps per block
    constexpr int NL = 16 * NP;              // state slots per channel
    __shared__ float stB[L][NW][NL], stC[L][NW][NL];

    const int ch = threadIdx.x >> 4, lane = threadIdx.x & 15;
    const int warp = threadIdx.x >> 5, wl = threadIdx.x & 31;
    const int e = blockIdx.x * 16 + ch, b = blockIdx.y;
    const bool active = e < E;
    const int ec = active ? e : E - 1;
    const bool wantBC = dBm != nullptr || dCm != nullptr;

    float A[NP], h[NP];
#pragma unroll
    for (int p = 0; p < NP; p++) {
        const int n = lane + 16 * p;
        A[p] = n < N ? -expf(Alog[(long long)ec * N + n]) : 0.f;
        h[p] = 0.f;
    }
    const float bias = dtBias[ec], D = Dskip[ec];
    const long long r0 = (long long)b * T;
    const int nC = (T + L - 1) / L;
    // ck index of (chunk c ≥ 1, state p) of this thread.
    auto ckAt = [&](int c, int p) -> long long {
        return (((long long)(c - 1) * B + b) * E + ec) * N + lane + 16 * p;
    };

    // Pass 1: checkpoints h_{cL−1} for c = 1 … nC−1.
    for (int c = 0; c + 1 < nC; c++) {
#pragma unroll 4
        for (int j = 0; j < L; j++) {
            const long long r = r0 + c * L + j, i = r * E + ec;
            float sig;
            const float delta = bm_softplus_sig(dt[i] + bias, sig);
            const float dxv = delta * x[i];
#pragma unroll
            for (int p = 0; p < NP; p++) {
                const int n = lane + 16 * p;
                const float bm = n < N ? Bm[r * N + n] : 0.f;
                h[p] = expf(delta * A[p]) * h[p] + dxv * bm;
            }
        }
        if (active) {
#pragma unroll
            for (int p = 0; p < NP; p++)
                if (lane + 16 * p < N) ck[ckAt(c + 1, p)] = h[p];
        }
    }
    // Pass 1 leaves every thread's global stores to ck visible to itself
    // (same thread reads them back), so no fence is needed.

    // Pass 2.
    float dh[NP], dA[NP];
#pragma unroll
    for (int p = 0; p < NP; p++) dh[p] = dA[p] = 0.f;
    float dBias = 0.f, dD = 0.f;
    for (int c = nC - 1; c >= 0; c--) {
        const int t0 = c * L;
        float h0[NP];
#pragma unroll
        for (int p = 0; p < NP; p++)
            h0[p] = (c > 0 && active && lane + 16 * p < N) ? ck[ckAt(c, p)] : 0.f;
        // Recompute the chunk's states.
        float hs[L][NP];
        {
            float hc[NP];
#pragma unroll
            for (int p = 0; p < NP; p++) hc[p] = h0[p];
#pragma unroll
            for (int j = 0; j < L; j++) {
                if (t0 + j < T) {
                    const long long r = r0 + t0 + j, i = r * E + ec;
                    float sig;
                    const float delta = bm_softplus_sig(dt[i] + bias, sig);
                    const float dxv = delta * x[i];
#pragma unroll
                    for (int p = 0; p < NP; p++) {
                        const int n = lane + 16 * p;
                        const float bm = n < N ? Bm[r * N + n] : 0.f;
                        hc[p] = expf(delta * A[p]) * hc[p] + dxv * bm;
                        hs[j][p] = hc[p];
                    }
                } else {
#pragma unroll
                    for (int p = 0; p < NP; p++) hs[j][p] = 0.f;
                }
            }
        }
        // Back-propagate through the chunk.
#pragma unroll
        for (int j = L - 1; j >= 0; j--) {
            if (t0 + j < T) {
                const long long r = r0 + t0 + j, i = r * E + ec;
                const float xv = x[i], zv = z[i];
                const float g = active ? dout[i] : 0.f;
                float sig;
                const float delta = bm_softplus_sig(dt[i] + bias, sig);
                const float sz = 1.f / (1.f + expf(-zv));
                const float dy = g * zv * sz; // ∂L/∂y, y = Σ h·C + D·x
                const float dxv = delta * xv;
                float ypart = 0.f, dxpart = 0.f, ddpart = 0.f;
                float cB[NP], cC[NP];
#pragma unroll
                for (int p = 0; p < NP; p++) {
                    const int n = lane + 16 * p;
                    const float bm = n < N ? Bm[r * N + n] : 0.f;
                    const float cm = n < N ? Cm[r * N + n] : 0.f;
                    const float a = expf(delta * A[p]);
                    const float ht = hs[j][p];
                    const float hp = j > 0 ? hs[j > 0 ? j - 1 : 0][p] : h0[p];
                    const float dhn = dh[p] + dy * cm; // ∂L/∂h_t
                    ypart += ht * cm;
                    cC[p] = dy * ht;
                    cB[p] = dhn * dxv;
                    dxpart += dhn * bm;
                    const float pa = hp * a;
                    ddpart += dhn * (xv * bm + pa * A[p]);
                    dA[p] += dhn * pa * delta;
                    dh[p] = dhn * a;
                }
                ypart = bm_sum16(ypart);
                dxpart = bm_sum16(dxpart);
                ddpart = bm_sum16(ddpart);
                if (wantBC) {
#pragma unroll
                    for (int p = 0; p < NP; p++) {
                        cB[p] += __shfl_xor_sync(0xffffffffu, cB[p], 16);
                        cC[p] += __shfl_xor_sync(0xffffffffu, cC[p], 16);
                    }
                    if (wl < 16) {
#pragma unroll
                        for (int p = 0; p < NP; p++) {
                            stB[j][warp][lane + 16 * p] = cB[p];
                            stC[j][warp][lane + 16 * p] = cC[p];
                        }
                    }
                }
                if (lane == 0 && active) {
                    const float y = ypart + D * xv;
                    const float du = ddpart * sig; // ∂L/∂dt
                    if (dz) dz[i] += g * y * sz * (1.f + zv * (1.f - sz));
                    if (dx) dx[i] += dy * D + delta * dxpart;
                    if (ddt) ddt[i] += du;
                    dBias += du;
                    dD += dy * xv;
                }
            }
        }
        if (wantBC) {
            __syncthreads();
            for (int idx = threadIdx.x; idx < L * NL; idx += BM_SCAN_THREADS) {
                const int j = idx / NL, n = idx % NL;
                if (t0 + j < T && n < N) {
                    float sB = 0.f, sC = 0.f;
#pragma unroll
                    for (int w = 0; w < NW; w++) {
                        sB += stB[j][w][n];
                        sC += stC[j][w][n];
                    }
                    const long long o = (r0 + t0 + j) * N + n;
                    if (dBm) atomicAdd(dBm + o, sB);
                    if (dCm) atomicAdd(dCm + o, sC);
                }
            }
            __syncthreads();
        }
    }
    if (!active) return;
    if (dAlog) {
#pragma unroll
        for (int p = 0; p < NP; p++) {
            const int n = lane + 16 * p;
            if (n < N) atomicAdd(dAlog + (long long)e * N + n, dA[p] * A[p]); // dA/dAlog = A
        }
    }
    if (lane == 0) {
        if (ddtBias) atomicAdd(ddtBias + e, dBias);
        if (dDskip) atomicAdd(dDskip + e, dD);
    }
}

// One kernel per NP (states per lane) with backward chunk length L and at
// least MINB resident blocks per SM: for N ≤ 32, L·NP = 16 registers of
// recomputed states keep 3 blocks of 256 threads per SM without spills
// (16 KiB of staging shared memory each); larger N keep L·NP = 32 with 2
// blocks (N ≤ 64) or 1 (N ≤ 128).
#define BM_SCAN_KERNELS(NP, L, MINB)                                                                               \
    extern "C" __global__ void __launch_bounds__(BM_SCAN_THREADS)                                                  \
        bm_selective_scan_fwd_np##NP(float *out, const float *x, const float *dt, const float *dtBias,             \
                                     const float *Alog, const float *Bm, const float *Cm, const float *Dskip,      \
                                     const float *z, int B, int T, int E, int N) {                                 \
        scan_fwd<NP>(out, x, dt, dtBias, Alog, Bm, Cm, Dskip, z, B, T, E, N);                                      \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(BM_SCAN_THREADS, MINB) bm_selective_scan_bwd_np##NP(            \
        float *ck, float *dx, float *ddt, float *ddtBias, float *dAlog, float *dBm, float *dCm, float *dDskip,     \
        float *dz, const float *dout, const float *x, const float *dt, const float *dtBias, const float *Alog,     \
        const float *Bm, const float *Cm, const float *Dskip, const float *z, int B, int T, int E, int N) {        \
        scan_bwd<NP, L>(ck, dx, ddt, ddtBias, dAlog, dBm, dCm, dDskip, dz, dout, x, dt, dtBias, Alog, Bm, Cm,      \
                        Dskip, z, B, T, E, N);                                                                     \
    }

BM_SCAN_KERNELS(2, 8, 3)
BM_SCAN_KERNELS(4, 8, 2)
BM_SCAN_KERNELS(8, 4, 1)

// ---------------------------------------------------------------- selective scan, N ≤ 16
//
// The fast path for N ≤ 16 (the models' N). Blocks of 256 threads cover
// BM_SS_CH = 32 channels of one sequence b (blockIdx.z) and one segment of
// time (blockIdx.y). Each thread has two roles:
//   compute: channel ch = tid/8 of the block, lane l = tid%8 owning the
//     states n = 2l, 2l+1 (slots n ≥ N hold A = 0, B = C = 0 and stay 0);
//     sums over n are 8-lane shuffles.
//   staging: channel sc = tid%32, row sj = tid/32 of each group of 8
//     timesteps; it loads x, dt, z, dout with coalesced 128-byte rows (the
//     next tile's while the current one is scanned), computes the
//     per-element softplus and sigmoid once, and writes the per-element
//     results back.
// So the sequential loop reads only shared memory and waits on nothing but
// exp2 and FMA. Timesteps past T and channels past E are staged as Δ = 0,
// x = 0, dout = 0: a = 1, no input, no gradient.
//
// Time parallelism: the recurrence h_t = a_t·h_{t−1} + u_t composes over a
// segment as h_end = exp(A·ΣΔ)·h_in + h_local, and the backward one of dh
// the same way, so T splits into segments scanned in parallel from zero
// (bm_selective_scan_loc16), a cheap sequential fix-up over segments per
// (b, e, n) turns the local results into each segment's entering state and
// entering gradient (bm_selective_scan_fix16), and the main kernels run
// every segment from its true boundary values. That is only worth its extra
// passes when B·E/32 blocks leave the GPU short of work; otherwise one block
// walks all of T (the forward with one segment; the backward through
// bm_selective_scan_ck16 and bm_selective_scan_bwdw16).
//
// Reductions are deterministic: per-block partial sums go to scratch and
// bm_scan_sum_parts adds them in a fixed order (no atomics).

#define BM_SS_T 256    // threads per block
#define BM_SS_NL 16    // state slots per channel (8 lanes × 2)
#define BM_SS_CH 32    // channels per block
#define BM_SS_TT 32    // timesteps per staged tile (forward, local pass)
#define BM_SS_L 8      // backward sub-chunk: states recomputed into registers
#define BM_SS_NCK 8    // sub-chunks per backward segment
#define BM_SS_SEG (BM_SS_L * BM_SS_NCK) // backward segment length (64)
#define BM_LOG2E 1.4426950408889634f
#define BM_LN2 0.6931471805599453f

// bm_ex2 is 2^x from one MUFU.EX2 (ex2.approx.ftz: 2 ulp, results below
// 2^−126 flush to 0, which a decay factor may); exp2f adds a denormal
// fix-up of three instructions per call. The emulation uses exp2f.
#ifdef __CUDACC__
static __device__ __forceinline__ float bm_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#else
static inline float bm_ex2(float x) { return exp2f(x); }
#endif

// bm_softplus_sig16 is bm_softplus_sig with the reciprocal from one
// MUFU.RCP (__fdividef, within 2 ulp; 1 + y is in [1, 2]) instead of an
// IEEE division with its slow-path branch; bm_sigmoid16 likewise (for
// 1 + e^(−z) > 2^126, z < −87, it gives 0, as it should).
static __device__ __forceinline__ float bm_softplus_sig16(float v, float &sig) {
    const float y = expf(-fabsf(v)); // in (0, 1]
    const float l = log1pf(y);
    const float inv = __fdividef(1.f, 1.f + y);
    if (v >= 0.f) {
        sig = inv;
        return v + l;
    }
    sig = y * inv;
    return l;
}
static __device__ __forceinline__ float bm_sigmoid16(float z) { return __fdividef(1.f, 1.f + expf(-z)); }

// bm_sum8 sums v over the 8 lanes of each group (every lane must call it).
static __device__ __forceinline__ float bm_sum8(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    v += __shfl_xor_sync(0xffffffffu, v, 2);
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    return v;
}

// ScanF2, ScanF4: two or four floats moved as one 8- or 16-byte access (the
// emulation has no float2, float4).
struct alignas(8) ScanF2 {
    float x, y;
};
struct alignas(16) ScanF4 {
    float x, y, z, w;
};

// ScanRaw holds one tile of TT timesteps as loaded from global memory by
// one staging thread: KE elements of its channel, KB slots of the tile's
// B and C rows (laid out as the shared sBC[2][TT][16]).
template <int TT> struct ScanRaw {
    static constexpr int KE = TT * BM_SS_CH / BM_SS_T;
    static constexpr int KB = TT * BM_SS_NL * 2 / BM_SS_T;
    float x[KE], dt[KE], z[KE], g[KE], bc[KB];
};

// scan_load fills r with the tile starting at t0 of sequence b (zeros past
// T, past E and for n ≥ N); z and g (dout) only when WZ / WG.
template <int TT, bool WZ, bool WG>
static __device__ __forceinline__ void scan_load(ScanRaw<TT> &r, const float *x, const float *dt, const float *z,
                                                 const float *g, const float *Bm, const float *Cm, int b, int t0,
                                                 int T, int E, int N, int es, bool sact) {
    const int sj = threadIdx.x >> 5;
#pragma unroll
    for (int k = 0; k < ScanRaw<TT>::KE; k++) {
        const int t = t0 + k * 8 + sj;
        const bool v = sact && t < T;
        const long long i = ((long long)b * T + t) * E + es;
        r.x[k] = v ? x[i] : 0.f;
        r.dt[k] = v ? dt[i] : 0.f;
        r.z[k] = WZ && v ? z[i] : 0.f;
        r.g[k] = WG && v ? g[i] : 0.f;
    }
#pragma unroll
    for (int k = 0; k < ScanRaw<TT>::KB; k++) {
        const int idx = threadIdx.x + k * BM_SS_T;
        const int which = idx / (TT * BM_SS_NL), rem = idx % (TT * BM_SS_NL);
        const int t = t0 + rem / BM_SS_NL, n = rem % BM_SS_NL;
        const bool v = t < T && n < N;
        const float *src = which ? Cm : Bm;
        r.bc[k] = v ? src[((long long)b * T + t) * N + n] : 0.f;
    }
}

// scan_lane_A sets A (and A2 = A·log₂e, so exp(Δ·A) = exp2(Δ·A2)) of the
// compute thread's two states.
static __device__ __forceinline__ void scan_lane_A(float A[2], float A2[2], const float *Alog, int ec, int l, int N) {
#pragma unroll
    for (int p = 0; p < 2; p++) {
        const int n = 2 * l + p;
        A[p] = n < N ? -expf(Alog[(long long)ec * N + n]) : 0.f;
        A2[p] = A[p] * BM_LOG2E;
    }
}

// Forward: out[b,t,e] = (Σ_n h_t[e,n]·Cm[b,t,n] + Dskip[e]·x)·SiLU(z) over
// the segment [seg·Ls, seg·Ls+Ls) (Ls a multiple of BM_SS_TT), starting
// from hin[b][seg][e][16] (null: from 0, one segment).
extern "C" __global__ void __launch_bounds__(BM_SS_T, 3)
bm_selective_scan_fwd16(float *out, const float *x, const float *dt, const float *dtBias, const float *Alog,
                        const float *Bm, const float *Cm, const float *Dskip, const float *z, const float *hin,
                        int B, int T, int E, int N, int Ls, unsigned short *out16) {
    constexpr int TT = BM_SS_TT;
    using Raw = ScanRaw<TT>;
    __shared__ float sD[TT][BM_SS_CH], sU[TT][BM_SS_CH], sY[TT][BM_SS_CH];
    __shared__ float sBC[2 * TT * BM_SS_NL];
    const int tid = threadIdx.x, ch = tid >> 3, l = tid & 7, sj = tid >> 5, sc = tid & 31;
    const int e0 = blockIdx.x * BM_SS_CH, seg = blockIdx.y, nSeg = gridDim.y, b = blockIdx.z;
    const int e = e0 + ch, es = e0 + sc;
    const bool act = e < E, sact = es < E;
    const int ec = act ? e : E - 1, esc = sact ? es : E - 1;
    float A[2], A2[2], h[2];
    scan_lane_A(A, A2, Alog, ec, l, N);
#pragma unroll
    for (int p = 0; p < 2; p++) h[p] = hin && act ? hin[(((long long)b * nSeg + seg) * E + e) * BM_SS_NL + 2 * l + p] : 0.f;
    const float bias = dtBias[esc], D = Dskip[esc];
    const int tBeg = seg * Ls, tEnd = min(T, tBeg + Ls);
    Raw r;
    scan_load<TT, true, false>(r, x, dt, z, nullptr, Bm, Cm, b, tBeg, T, E, N, es, sact);
    float xs[Raw::KE], gz[Raw::KE]; // x and SiLU(z) of the staged elements
    float *yc = &sY[0][ch];          // this channel's column of sY
    for (int t0 = tBeg; t0 < tEnd; t0 += TT) {
#pragma unroll
        for (int k = 0; k < Raw::KE; k++) {
            const int j = k * 8 + sj;
            float d = 0.f;
            xs[k] = r.x[k];
            gz[k] = 0.f;
            if (sact && t0 + j < T) {
                float sig;
                d = bm_softplus_sig16(r.dt[k] + bias, sig);
                gz[k] = r.z[k] * bm_sigmoid16(r.z[k]);
            }
            sD[j][sc] = d;
            sU[j][sc] = d * r.x[k];
        }
#pragma unroll
        for (int k = 0; k < Raw::KB; k++) sBC[tid + k * BM_SS_T] = r.bc[k];
        if (t0 + TT < tEnd) scan_load<TT, true, false>(r, x, dt, z, nullptr, Bm, Cm, b, t0 + TT, T, E, N, es, sact);
        __syncthreads();
#pragma unroll 8
        for (int j = 0; j < TT; j++) {
            const float d = sD[j][ch], u = sU[j][ch];
            float y = 0.f;
#pragma unroll
            for (int p = 0; p < 2; p++) {
                const float bm = sBC[j * BM_SS_NL + 2 * l + p], cm = sBC[(TT + j) * BM_SS_NL + 2 * l + p];
                h[p] = fmaf(bm_ex2(d * A2[p]), h[p], u * bm);
                y = fmaf(h[p], cm, y);
            }
            y = bm_sum8(y);
            if (l == 0) yc[j * BM_SS_CH] = y;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < Raw::KE; k++) {
            const int j = k * 8 + sj, t = t0 + j;
            if (sact && t < T) {
                const long long i = ((long long)b * T + t) * E + es;
                const float v = (sY[j][sc] + D * xs[k]) * gz[k];
                out[i] = v;
                if (out16) out16[i] = (unsigned short)bm_bf16_bits(v);
            }
        }
    }
}

// scan_dbc_lane sums dB, dC over the warp's 4 channels, transposed: after
// lane bit 4 (dB | dC) and bit 3 (state 2l | 2l+1) each lane holds one sum,
// its entry of sP[j][warp] (every lane of the warp must call it).
static __device__ __forceinline__ float scan_dbc_lane(const float cB[2], const float cC[2], bool hi16, bool hi8) {
    float k0 = hi16 ? cC[0] : cB[0], k1 = hi16 ? cC[1] : cB[1];
    const float s0 = hi16 ? cB[0] : cC[0], s1 = hi16 ? cB[1] : cC[1];
    k0 += __shfl_xor_sync(0xffffffffu, s0, 16);
    k1 += __shfl_xor_sync(0xffffffffu, s1, 16);
    const float snd = hi8 ? k0 : k1, kp = hi8 ? k1 : k0;
    return kp + __shfl_xor_sync(0xffffffffu, snd, 8);
}

// scan_dbc_store writes dB, dC of the sub-chunk starting at t0 summed over
// the block's channels (the NW warps' entries of sP): thread (j, which, n)
// writes one partial.
template <int L, int NW>
static __device__ __forceinline__ void scan_dbc_store(const float (*sP)[NW][32], float *partB, float *partC, int t0, int T,
                                                      int N, int B, int b) {
    const int tid = threadIdx.x, j = tid >> 5, which = (tid >> 4) & 1, n = tid & 15;
    const int k = which * 16 + (n & 1) * 8 + (n >> 1);
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < NW; w++) s += sP[j][w][k];
    float *part = which ? partC : partB;
    const int t = t0 + j;
    if (part && t < T && n < N) part[(((long long)blockIdx.x * B + b) * T + t) * N + n] = s;
}

// Local pass over segment seg (length Ls, a multiple of BM_SS_TT) from zero:
// hloc[b][seg][e][16] = the state after the segment, S[b][seg][e] = ΣΔ over
// it and, when WQ, Q[b][seg][e][16] = Σ_t (Π_{s ≤ t in the segment} a_s)·
// dy_t·C_t, the gradient the segment passes to the state before it when
// nothing comes from its right (dy = dout·z·sigmoid(z), a_s = exp(Δ_s·A)).
// scan_bias_d_store sums ∂dtBias and ∂Dskip over the block's L rows of each
// channel in a fixed order (no atomics: reproducible) and stores the sums
// at partBias[at], partD[at]. Earlier reads of sR must be behind a barrier.
template <int L>
static __device__ __forceinline__ void scan_bias_d_store(float (&sR)[2][L][BM_SS_CH], int sj, int sc, bool sact, float accBias,
                                                         float accD, float *partBias, float *partD, long long at) {
    sR[0][sj][sc] = accBias;
    sR[1][sj][sc] = accD;
    __syncthreads();
    if (sj == 0 && sact) {
        float sb = 0.f, sd = 0.f;
#pragma unroll
        for (int j = 0; j < L; j++) {
            sb += sR[0][j][sc];
            sd += sR[1][j][sc];
        }
        if (partBias) partBias[at] = sb;
        if (partD) partD[at] = sd;
    }
}

template <bool WQ>
static __device__ __forceinline__ void scan_loc(float *hloc, float *Q, float *S, const float *x, const float *dt,
                                                const float *dtBias, const float *Alog, const float *Bm,
                                                const float *Cm, const float *z, const float *dout, int B, int T,
                                                int E, int N, int Ls) {
    constexpr int TT = BM_SS_TT;
    using Raw = ScanRaw<TT>;
    __shared__ float sD[TT][BM_SS_CH], sU[TT][BM_SS_CH], sDY[TT][BM_SS_CH];
    __shared__ float sBC[2 * TT * BM_SS_NL];
    const int tid = threadIdx.x, ch = tid >> 3, l = tid & 7, sj = tid >> 5, sc = tid & 31;
    const int e0 = blockIdx.x * BM_SS_CH, seg = blockIdx.y, nSeg = gridDim.y, b = blockIdx.z;
    const int e = e0 + ch, es = e0 + sc;
    const bool act = e < E, sact = es < E;
    const int ec = act ? e : E - 1, esc = sact ? es : E - 1;
    float A[2], A2[2], h[2] = {0.f, 0.f}, P[2] = {1.f, 1.f}, acc[2] = {0.f, 0.f};
    scan_lane_A(A, A2, Alog, ec, l, N);
    const float bias = dtBias[esc];
    const int tBeg = seg * Ls, tEnd = min(T, tBeg + Ls);
    float sum = 0.f;
    Raw r;
    scan_load<TT, WQ, WQ>(r, x, dt, z, dout, Bm, Cm, b, tBeg, T, E, N, es, sact);
    for (int t0 = tBeg; t0 < tEnd; t0 += TT) {
#pragma unroll
        for (int k = 0; k < Raw::KE; k++) {
            const int j = k * 8 + sj;
            float d = 0.f, dy = 0.f;
            if (sact && t0 + j < T) {
                float sig;
                d = bm_softplus_sig16(r.dt[k] + bias, sig);
                if (WQ) dy = r.g[k] * r.z[k] * bm_sigmoid16(r.z[k]);
            }
            sD[j][sc] = d;
            sU[j][sc] = d * r.x[k];
            if (WQ) sDY[j][sc] = dy;
        }
#pragma unroll
        for (int k = 0; k < Raw::KB; k++) sBC[tid + k * BM_SS_T] = r.bc[k];
        if (t0 + TT < tEnd) scan_load<TT, WQ, WQ>(r, x, dt, z, dout, Bm, Cm, b, t0 + TT, T, E, N, es, sact);
        __syncthreads();
#pragma unroll 8
        for (int j = 0; j < TT; j++) {
            const float d = sD[j][ch], u = sU[j][ch];
            sum += d;
#pragma unroll
            for (int p = 0; p < 2; p++) {
                const float a = bm_ex2(d * A2[p]);
                h[p] = fmaf(a, h[p], u * sBC[j * BM_SS_NL + 2 * l + p]);
                if (WQ) {
                    P[p] *= a;
                    acc[p] = fmaf(P[p], sDY[j][ch] * sBC[(TT + j) * BM_SS_NL + 2 * l + p], acc[p]);
                }
            }
        }
        __syncthreads();
    }
    if (!act) return;
    const long long o = ((long long)b * nSeg + seg) * E + e;
#pragma unroll
    for (int p = 0; p < 2; p++) {
        hloc[o * BM_SS_NL + 2 * l + p] = h[p];
        if (WQ) Q[o * BM_SS_NL + 2 * l + p] = acc[p];
    }
    if (l == 0) S[o] = sum;
}

extern "C" __global__ void __launch_bounds__(BM_SS_T, 3)
bm_selective_scan_loc16(float *hloc, float *S, const float *x, const float *dt, const float *dtBias,
                        const float *Alog, const float *Bm, int B, int T, int E, int N, int Ls) {
    scan_loc<false>(hloc, nullptr, S, x, dt, dtBias, Alog, Bm, Bm, nullptr, nullptr, B, T, E, N, Ls);
}

extern "C" __global__ void __launch_bounds__(BM_SS_T, 3)
bm_selective_scan_locq16(float *hloc, float *Q, float *S, const float *x, const float *dt, const float *dtBias,
                         const float *Alog, const float *Bm, const float *Cm, const float *z, const float *dout,
                         int B, int T, int E, int N, int Ls) {
    scan_loc<true>(hloc, Q, S, x, dt, dtBias, Alog, Bm, Cm, z, dout, B, T, E, N, Ls);
}

// Fix-up over the nSeg segments, one thread per (b, e, slot n), in place:
// hloc[b][s][e][n] becomes the state entering segment s (h_in[0] = 0,
// h_in[s+1] = exp(A·S_s)·h_in[s] + hloc_s) and, when Q is not null,
// Q[b][s][e][n] the gradient carried into segment s's backward walk from
// its right (D[nSeg−1] = 0, D[s] = Q_{s+1} + exp(A·S_{s+1})·D[s+1]).
extern "C" __global__ void bm_selective_scan_fix16(float *hloc, float *Q, const float *S, const float *Alog, int B,
                                                   int E, int N, int nSeg) {
    const long long n16 = (long long)B * E * BM_SS_NL;
    BM_FOR(i, n16) {
        const int n = (int)(i % BM_SS_NL);
        const long long be = i / BM_SS_NL; // b·E + e
        const int e = (int)(be % E), b = (int)(be / E);
        const float A2 = n < N ? -expf(Alog[(long long)e * N + n]) * BM_LOG2E : 0.f;
        float h = 0.f;
#pragma unroll 4
        for (int s = 0; s < nSeg; s++) {
            const long long o = ((long long)b * nSeg + s) * E + e;
            const float hl = hloc[o * BM_SS_NL + n];
            hloc[o * BM_SS_NL + n] = h;
            h = fmaf(bm_ex2(A2 * S[o]), h, hl);
        }
        if (!Q) continue;
        float c = 0.f;
#pragma unroll 4
        for (int s = nSeg - 1; s >= 0; s--) {
            const long long o = ((long long)b * nSeg + s) * E + e;
            const float q = Q[o * BM_SS_NL + n];
            Q[o * BM_SS_NL + n] = c;
            c = fmaf(bm_ex2(A2 * S[o]), c, q);
        }
    }
}

// Backward over one segment of BM_SS_SEG steps, entering state hin and
// carried gradient din ([b][seg][e][16], from the fix-up; null: zero, one
// segment). Phase 1 runs the segment forward and keeps the state entering
// each sub-chunk of BM_SS_L steps in shared memory; phase 2 walks the
// sub-chunks in reverse, recomputing each one's states into registers and
// back-propagating through them. dx, ddt, dz are accumulated (one writer
// per element); everything summed across blocks goes to scratch:
// partB/partC[blockIdx.x][b][t][n] (the block's 32 channels),
// partA[b][seg][e][n] (= dAlog's terms), partBias/partD[b][seg][e].
extern "C" __global__ void __launch_bounds__(BM_SS_T, 3)
bm_selective_scan_bwd16(float *dx, float *ddt, float *dz, float *partB, float *partC, float *partA,
                        float *partBias, float *partD, const float *hin, const float *din, const float *dout,
                        const float *x, const float *dt, const float *dtBias, const float *Alog, const float *Bm,
                        const float *Cm, const float *Dskip, const float *z, int B, int T, int E, int N) {
    constexpr int L = BM_SS_L;
    constexpr int NW = BM_SS_T / 32; // warps per block
    using Raw = ScanRaw<L>;
    __shared__ float sD[L][BM_SS_CH], sX[L][BM_SS_CH], sDY[L][BM_SS_CH];
    __shared__ float sBC[2 * L * BM_SS_NL];
    __shared__ float sCk[BM_SS_NCK][BM_SS_CH][BM_SS_NL];
    // Sums over n, half done: sQ[j][ch][slot] holds, for lane l < 4, (y, dx)
    // of states {2l, 2l+1, 2l+8, 2l+9} and for l ≥ 4 (dΔ, −) of states
    // {2l−8, 2l−7, 2l, 2l+1}; slot = l ^ ((ch/2)%8) keeps both the compute
    // threads' 8-byte writes and the staging threads' reads conflict-free.
    __shared__ ScanF2 sQ[L][BM_SS_CH][8];
    // dB, dC summed over each warp's 4 channels: sP[j][warp][k] is which =
    // k/16 (0: dB, 1: dC) of state n = 2(k%8) + (k/8)%2.
    __shared__ float sP[L][NW][32];
    __shared__ float sR[2][L][BM_SS_CH];

    const int tid = threadIdx.x, ch = tid >> 3, l = tid & 7, sj = tid >> 5, sc = tid & 31;
    const int warp = tid >> 5, wl = tid & 31;
    const bool hi4 = l & 4, hi8 = wl & 8, hi16 = wl & 16;
    const int qslot = l ^ ((ch >> 1) & 7), rslot = (sc >> 1) & 7; // sQ swizzle (write, read)
    const int e0 = blockIdx.x * BM_SS_CH, seg = blockIdx.y, nSeg = gridDim.y, b = blockIdx.z;
    const int e = e0 + ch, es = e0 + sc;
    const bool act = e < E, sact = es < E;
    const int ec = act ? e : E - 1, esc = sact ? es : E - 1;
    float A[2], A2[2], h[2];
    scan_lane_A(A, A2, Alog, ec, l, N);
    const long long so = ((long long)b * nSeg + seg) * E; // [b][seg] row of the per-segment arrays
#pragma unroll
    for (int p = 0; p < 2; p++) h[p] = hin && act ? hin[(so + e) * BM_SS_NL + 2 * l + p] : 0.f;
    const float bias = dtBias[esc], D = Dskip[esc];
    const int tBeg = seg * BM_SS_SEG;
    const int nc = min(BM_SS_NCK, (T - tBeg + L - 1) / L); // sub-chunks that start before T

    // Phase 1: the state entering each sub-chunk (each thread reads back
    // only its own sCk slots, so they need no barrier).
    Raw r;
    scan_load<L, false, false>(r, x, dt, z, dout, Bm, Cm, b, tBeg, T, E, N, es, sact);
    for (int c = 0; c < nc; c++) {
        const int t0 = tBeg + c * L;
#pragma unroll
        for (int p = 0; p < 2; p++) sCk[c][ch][2 * l + p] = h[p];
        {
            float d = 0.f;
            if (sact && t0 + sj < T) {
                float sig;
                d = bm_softplus_sig16(r.dt[0] + bias, sig);
            }
            sD[sj][sc] = d;
            sX[sj][sc] = d * r.x[0]; // Δ·x here
            sBC[tid] = r.bc[0];
        }
        if (c + 1 < nc) scan_load<L, false, false>(r, x, dt, z, dout, Bm, Cm, b, t0 + L, T, E, N, es, sact);
        __syncthreads();
#pragma unroll
        for (int j = 0; j < L; j++) {
            const float d = sD[j][ch], u = sX[j][ch];
#pragma unroll
            for (int p = 0; p < 2; p++) h[p] = fmaf(bm_ex2(d * A2[p]), h[p], u * sBC[j * BM_SS_NL + 2 * l + p]);
        }
        __syncthreads();
    }

    // Phase 2.
    float dh[2], dA[2] = {0.f, 0.f};
#pragma unroll
    for (int p = 0; p < 2; p++) dh[p] = din && act ? din[(so + e) * BM_SS_NL + 2 * l + p] : 0.f;
    float accBias = 0.f, accD = 0.f; // staging role: channel sc
    scan_load<L, true, true>(r, x, dt, z, dout, Bm, Cm, b, tBeg + (nc - 1) * L, T, E, N, es, sact);
    for (int c = nc - 1; c >= 0; c--) {
        const int t0 = tBeg + c * L;
        // Stage this thread's element (t0+sj, es); keep what the write-back needs.
        const int tw = t0 + sj;
        const long long iw = ((long long)b * T + tw) * E + es; // the staged element
        const bool vw = sact && tw < T;
        const float xw = r.x[0], zw = r.z[0], gw = r.g[0];
        float dw = 0.f, sigw = 0.f, szw = 0.f, dyw = 0.f;
        if (vw) {
            dw = bm_softplus_sig16(r.dt[0] + bias, sigw);
            szw = bm_sigmoid16(zw);
            dyw = gw * zw * szw;
        }
        sD[sj][sc] = dw;
        sX[sj][sc] = vw ? xw : 0.f;
        sDY[sj][sc] = dyw;
        sBC[tid] = r.bc[0];
        if (c > 0) scan_load<L, true, true>(r, x, dt, z, dout, Bm, Cm, b, t0 - L, T, E, N, es, sact);
        __syncthreads();

        // Recompute the sub-chunk's states from its checkpoint.
        float h0[2], hs[L][2];
#pragma unroll
        for (int p = 0; p < 2; p++) h0[p] = sCk[c][ch][2 * l + p];
        {
            float hc[2] = {h0[0], h0[1]};
#pragma unroll
            for (int j = 0; j < L; j++) {
                const float d = sD[j][ch], u = d * sX[j][ch];
#pragma unroll
                for (int p = 0; p < 2; p++) {
                    hc[p] = fmaf(bm_ex2(d * A2[p]), hc[p], u * sBC[j * BM_SS_NL + 2 * l + p]);
                    hs[j][p] = hc[p];
                }
            }
        }
        // Back-propagate through it.
#pragma unroll
        for (int j = L - 1; j >= 0; j--) {
            const float d = sD[j][ch], xv = sX[j][ch], dy = sDY[j][ch];
            const float u = d * xv;
            float yp = 0.f, dxp = 0.f, ddp = 0.f, cB[2], cC[2];
#pragma unroll
            for (int p = 0; p < 2; p++) {
                const float bm = sBC[j * BM_SS_NL + 2 * l + p], cm = sBC[(L + j) * BM_SS_NL + 2 * l + p];
                const float a = bm_ex2(d * A2[p]);
                const float ht = hs[j][p], hp = j > 0 ? hs[j > 0 ? j - 1 : 0][p] : h0[p];
                const float dhn = fmaf(dy, cm, dh[p]); // ∂L/∂h_t
                yp = fmaf(ht, cm, yp);
                cC[p] = dy * ht;
                cB[p] = dhn * u;
                dxp = fmaf(dhn, bm, dxp);
                const float pa = hp * a;
                ddp = fmaf(dhn, fmaf(pa, A[p], xv * bm), ddp);
                dA[p] = fmaf(dhn * pa, d, dA[p]);
                dh[p] = dhn * a;
            }
            // y, dx, dΔ over n: one exchange of a transposed reduction
            // (lanes l and l^4 swap halves), the rest in the write-back.
            {
                const float snd = hi4 ? yp : ddp, kp = hi4 ? ddp : yp;
                const float r0 = __shfl_xor_sync(0xffffffffu, snd, 4);
                const float r1 = __shfl_xor_sync(0xffffffffu, dxp, 4);
                sQ[j][ch][qslot] = ScanF2{kp + r0, dxp + r1};
            }
            sP[j][warp][wl] = scan_dbc_lane(cB, cC, hi16, hi8);
        }
        __syncthreads();
        scan_dbc_store<L, NW>(sP, partB, partC, t0, T, N, B, b);
        // Per-element gradients of the staged element.
        if (vw) {
            float ys = 0.f, dxs = 0.f, dds = 0.f;
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const ScanF2 lo = sQ[sj][sc][q ^ rslot], hi = sQ[sj][sc][(q + 4) ^ rslot];
                ys += lo.x;
                dxs += lo.y;
                dds += hi.x;
            }
            const float y = ys + D * xw;
            if (dz) dz[iw] += gw * y * szw * (1.f + zw * (1.f - szw));
            if (dx) dx[iw] += dyw * D + dw * dxs;
            const float du = dds * sigw; // ∂L/∂dt
            if (ddt) ddt[iw] += du;
            accBias += du;
            accD += dyw * xw;
        }
    }
    if (act && partA) {
#pragma unroll
        for (int p = 0; p < 2; p++) {
            const int n = 2 * l + p;
            if (n < N) partA[(so + e) * N + n] = dA[p] * A[p]; // dA/dAlog = A
        }
    }
    __syncthreads(); // sR is written below
    scan_bias_d_store<L>(sR, sj, sc, sact, accBias, accD, partBias, partD, so + es);
}

// ---------------------------------------------------------------- N ≤ 16 backward, one block per (channels, b)
//
// When B·E/32 blocks fill the GPU the backward needs neither the local pass
// nor the fix-up: bm_selective_scan_ck16 runs the recurrence forward over T
// once and stores the state entering every sub-chunk of BM_SS_L steps, then
// bm_selective_scan_bwdw16 walks the sub-chunks of its (32 channels, b) in
// reverse, recomputing each one's states from its checkpoint and carrying
// ∂L/∂h in registers into the one before. Per step that is two forward
// recurrences and the backward one; the segmented path runs three forward
// ones (local pass with its Q terms, phase 1, recompute) and the fix-up.
// The checkpoints cost 2·B·T·E words of scratch, written once and read once.

// ck[b][c−1][e][16] = the state entering sub-chunk c (steps c·L …) for
// 1 ≤ c < ceil(T/L), L = BM_SS_L; one block per (32 channels, b) walks T in
// tiles of BM_SS_TT steps (Bm only: C is not needed).
extern "C" __global__ void __launch_bounds__(BM_SS_T, 3)
bm_selective_scan_ck16(float *ck, const float *x, const float *dt, const float *dtBias, const float *Alog,
                       const float *Bm, int B, int T, int E, int N) {
    constexpr int TT = BM_SS_TT, L = BM_SS_L;
    constexpr int KE = TT * BM_SS_CH / BM_SS_T, KB = TT * BM_SS_NL / BM_SS_T;
    __shared__ ScanF2 sDU[TT][BM_SS_CH]; // Δ, Δ·x
    __shared__ float sB[TT * BM_SS_NL];
    const int tid = threadIdx.x, ch = tid >> 3, l = tid & 7, sj = tid >> 5, sc = tid & 31;
    const int e0 = blockIdx.x * BM_SS_CH, b = blockIdx.y;
    const int e = e0 + ch, es = e0 + sc;
    const bool act = e < E, sact = es < E;
    const int ec = act ? e : E - 1, esc = sact ? es : E - 1;
    float A[2], A2[2], h[2] = {0.f, 0.f};
    scan_lane_A(A, A2, Alog, ec, l, N);
    const float bias = dtBias[esc];
    const int nC = (T + L - 1) / L;
    // This thread's slots of the next checkpoint (sub-chunk 1 first).
    ScanF2 *ckp = (ScanF2 *)(ck + ((long long)b * (nC - 1) * E + e) * BM_SS_NL + 2 * l);
    const long long ckRow = (long long)E * BM_SS_NL / 2; // one sub-chunk of ck, in ScanF2
    float rx[KE], rdt[KE], rb[KB];
    auto load = [&](int t0) {
#pragma unroll
        for (int k = 0; k < KE; k++) {
            const int t = t0 + k * 8 + sj;
            const bool v = sact && t < T;
            const long long i = ((long long)b * T + t) * E + es;
            rx[k] = v ? x[i] : 0.f;
            rdt[k] = v ? dt[i] : 0.f;
        }
#pragma unroll
        for (int k = 0; k < KB; k++) {
            const int idx = tid + k * BM_SS_T, t = t0 + idx / BM_SS_NL, n = idx % BM_SS_NL;
            rb[k] = t < T && n < N ? Bm[((long long)b * T + t) * N + n] : 0.f;
        }
    };
    load(0);
    for (int t0 = 0; t0 < T; t0 += TT) {
#pragma unroll
        for (int k = 0; k < KE; k++) {
            const int j = k * 8 + sj;
            float d = 0.f;
            if (sact && t0 + j < T) {
                float sig;
                d = bm_softplus_sig16(rdt[k] + bias, sig);
            }
            sDU[j][sc] = ScanF2{d, d * rx[k]};
        }
#pragma unroll
        for (int k = 0; k < KB; k++) sB[tid + k * BM_SS_T] = rb[k];
        if (t0 + TT < T) load(t0 + TT);
        __syncthreads();
#pragma unroll 1
        for (int j0 = 0; j0 < TT; j0 += L) {
#pragma unroll
            for (int j = j0; j < j0 + L; j++) {
                const ScanF2 du = sDU[j][ch];
                const ScanF2 bm = *(const ScanF2 *)&sB[j * BM_SS_NL + 2 * l];
                h[0] = fmaf(bm_ex2(du.x * A2[0]), h[0], du.y * bm.x);
                h[1] = fmaf(bm_ex2(du.x * A2[1]), h[1], du.y * bm.y);
            }
            if (act && (t0 + j0) / L + 1 < nC) *ckp = ScanF2{h[0], h[1]}; // h enters sub-chunk (t0+j0)/L+1
            ckp += ckRow;
        }
        __syncthreads();
    }
}

// Backward over all of T for one (32 channels, b), the sub-chunks of BM_SS_L
// steps in reverse, each from its checkpoint in ck (above). Roles as in
// bm_selective_scan_bwd16; what saves instructions per step: Δ, Δ·x, dy of
// a (step, channel) and B, C of a (step, lane) are one 16-byte shared load
// each; dΔ's sum over n splits into Σ dh·pa·A here and x·Σ dh·B in the
// write-back (Σ dh·B is dx's sum anyway), and dh·pa is the new dh times
// h_{t−1}; the sums over n go to shared memory unreduced (the write-back
// adds 8 partials instead of exchanging halves per step). The next
// sub-chunk's inputs, checkpoint and the old values of dx, ddt, dz are
// loaded while this one runs, so the write-back waits on no load (dx, ddt,
// dz must not overlap: ops_scan.go checks). Sums across blocks go to
// scratch: partB/partC[blockIdx.x][b][t][n], partA[b][e][n],
// partBias/partD[b][e].
extern "C" __global__ void __launch_bounds__(BM_SS_T, 3)
bm_selective_scan_bwdw16(float *dx, float *ddt, float *dz, float *partB, float *partC, float *partA,
                         float *partBias, float *partD, const float *ck, const float *dout, const float *x,
                         const float *dt, const float *dtBias, const float *Alog, const float *Bm, const float *Cm,
                         const float *Dskip, const float *z, int B, int T, int E, int N, int over,
                         unsigned short *dz16, unsigned short *ddt16) {
    constexpr int L = BM_SS_L;
    constexpr int NW = BM_SS_T / 32; // warps per block
    // over: bits 0, 1, 2 make dx, ddt, dz written instead of added to (the
    // host's deferred zero): their old values are not read. dz16 and ddt16,
    // when set, get bf16 copies of dz and ddt (matrix products' operands).
    const bool ax = dx && !(over & 1), adt = ddt && !(over & 2), az = dz && !(over & 4);
    // Per staged element (step, channel): Δ, Δ·x, dy = dout·z·sigmoid(z),
    // kz = ∂(dz)/∂y; and what its write-back needs besides the sums over n
    // (kept here, not in registers, which the loop needs for states).
    __shared__ ScanF4 sE[L][BM_SS_CH], sW[L][BM_SS_CH];
    __shared__ ScanF4 sBC[L][BM_SS_NL / 2]; // B[2l], B[2l+1], C[2l], C[2l+1] of lane l
    // The compute threads' partial sums over their two states, summed over
    // the 8 lanes by the write-back: sQ[j][l][ch] = (y, dx), sQd[j][l][ch] =
    // Σ dh·pa·A2; rows padded to 36 so that a warp's writes (4 channels × 8
    // lanes) hit every bank equally, while the write-back reads whole rows.
    __shared__ ScanF2 sQ[L][8][BM_SS_CH + 4];
    __shared__ float sQd[L][8][BM_SS_CH + 4];
    __shared__ float sP[L][NW][32];             // as in bm_selective_scan_bwd16
    __shared__ float sR[2][L][BM_SS_CH];

    const int tid = threadIdx.x, ch = tid >> 3, l = tid & 7, sj = tid >> 5, sc = tid & 31;
    const int warp = tid >> 5, wl = tid & 31;
    const bool hi8 = wl & 8, hi16 = wl & 16;
    const int e0 = blockIdx.x * BM_SS_CH, b = blockIdx.y;
    const int e = e0 + ch, es = e0 + sc;
    const bool act = e < E, sact = es < E;
    const int ec = act ? e : E - 1, esc = sact ? es : E - 1;
    float A[2], A2[2]; // only A2: sums of ·A are taken as ·A2 times ln 2
    scan_lane_A(A, A2, Alog, ec, l, N);
    const float bias = dtBias[esc], D = Dskip[esc];
    const int nC = (T + L - 1) / L;
    // This thread's B/C slot of a sub-chunk's sBC (flat index tid): step sj,
    // lane (sc/4), B or C ((sc/2)%2), state 2·lane + sc%2.
    const int bcn = 2 * (sc >> 2) + (sc & 1);
    const bool bcv = bcn < N, bcC = sc & 2;
    const ScanF2 *ckp = (const ScanF2 *)(ck + ((long long)b * (nC - 1) * E + e) * BM_SS_NL + 2 * l);
    const long long ckRow = (long long)E * BM_SS_NL / 2; // one sub-chunk of ck, in ScanF2

    // The raw inputs of one sub-chunk for this thread: its staged element,
    // its B/C slot, its checkpoint.
    struct {
        float x, dt, z, g, ox, odt, oz, bc;
        ScanF2 h;
    } r;
    // Element index of the staged element of sub-chunk c (one row of L·E per
    // sub-chunk) and of the B/C slot (L·N), kept running.
    const long long rowE = (long long)L * E, rowN = (long long)L * N;
    long long iw = ((long long)b * T + (nC - 1) * L + sj) * E + es;
    long long ibc = ((long long)b * T + (nC - 1) * L + sj) * N + bcn;
    auto load = [&](int c, long long i, long long ib) {
        const int t = c * L + sj;
        const bool v = sact && t < T;
        r.x = v ? x[i] : 0.f;
        r.dt = v ? dt[i] : 0.f;
        r.z = v ? z[i] : 0.f;
        r.g = v ? dout[i] : 0.f;
        r.ox = v && ax ? dx[i] : 0.f;
        r.odt = v && adt ? ddt[i] : 0.f;
        r.oz = v && az ? dz[i] : 0.f;
        r.bc = bcv && t < T ? (bcC ? Cm : Bm)[ib] : 0.f;
        r.h = c > 0 && act ? ckp[(c - 1) * ckRow] : ScanF2{0.f, 0.f};
    };

    float dh[2] = {0.f, 0.f}, dA[2] = {0.f, 0.f};
    float accBias = 0.f, accD = 0.f; // staging role: channel sc
    load(nC - 1, iw, ibc);
    for (int c = nC - 1; c >= 0; c--, iw -= rowE, ibc -= rowN) {
        const int t0 = c * L;
        // Stage this thread's element (t0+sj, es); keep what the write-back needs.
        const int tw = t0 + sj;
        const bool vw = sact && tw < T;
        const float odtw = r.odt;
        {
            const float xw = r.x;
            float dw = 0.f, sigw = 0.f, dyw = 0.f, kz = 0.f;
            if (vw) {
                dw = bm_softplus_sig16(r.dt + bias, sigw);
                const float sz = bm_sigmoid16(r.z);
                dyw = r.g * r.z * sz;
                kz = r.g * sz * (1.f + r.z * (1.f - sz)); // ∂L/∂z = kz·(y + D·x)
            }
            accD = fmaf(dyw, xw, accD);
            sE[sj][sc] = ScanF4{dw, dw * xw, dyw, kz};
            // dz = kz·(Σ h·C) + (old dz + kz·D·x); dx = Δ·Σ dh·B + (old dx + dy·D);
            // ∂L/∂dt = sig·(x·Σ dh·B + ln 2·Σ dh·pa·A2).
            sW[sj][sc] = ScanF4{fmaf(kz * D, xw, r.oz), fmaf(dyw, D, r.ox), xw * sigw, sigw * BM_LN2};
        }
        (&sBC[0][0].x)[tid] = r.bc;
        float h0[2] = {r.h.x, r.h.y};
        if (c > 0) load(c - 1, iw - rowE, ibc - rowN);
        __syncthreads();

        // Recompute the sub-chunk's states from its checkpoint.
        float hs[L][2];
        {
            float hc[2] = {h0[0], h0[1]};
#pragma unroll
            for (int j = 0; j < L; j++) {
                const float d = sE[j][ch].x, u = sE[j][ch].y;
                const float b0 = sBC[j][l].x, b1 = sBC[j][l].y;
                hc[0] = fmaf(bm_ex2(d * A2[0]), hc[0], u * b0);
                hc[1] = fmaf(bm_ex2(d * A2[1]), hc[1], u * b1);
                hs[j][0] = hc[0];
                hs[j][1] = hc[1];
            }
        }
        // Back-propagate through it.
#pragma unroll
        for (int j = L - 1; j >= 0; j--) {
            const ScanF4 v = sE[j][ch], bc = sBC[j][l];
            const float d = v.x, u = v.y, dy = v.z;
            const float bm[2] = {bc.x, bc.y}, cm[2] = {bc.z, bc.w};
            float yp = 0.f, dxp = 0.f, ddp = 0.f, cB[2], cC[2];
#pragma unroll
            for (int p = 0; p < 2; p++) {
                const float a = bm_ex2(d * A2[p]);
                const float ht = hs[j][p], hp = j > 0 ? hs[j > 0 ? j - 1 : 0][p] : h0[p];
                const float dhn = fmaf(dy, cm[p], dh[p]); // ∂L/∂h_t
                yp = fmaf(ht, cm[p], yp);
                cC[p] = dy * ht;
                cB[p] = dhn * u;
                dxp = fmaf(dhn, bm[p], dxp);
                dh[p] = dhn * a;
                const float q = dh[p] * hp; // ∂L/∂h_t · pa, pa = h_{t−1}·a
                ddp = fmaf(q, A2[p], ddp);
                dA[p] = fmaf(q, d, dA[p]);
            }
            sQ[j][l][ch] = ScanF2{yp, dxp};
            sQd[j][l][ch] = ddp;
            sP[j][warp][wl] = scan_dbc_lane(cB, cC, hi16, hi8);
        }
        __syncthreads();
        scan_dbc_store<L, NW>(sP, partB, partC, t0, T, N, B, b);
        // Per-element gradients of the staged element.
        if (vw) {
            float ys = 0.f, dxs = 0.f, dds = 0.f;
#pragma unroll
            for (int q = 0; q < 8; q++) {
                const ScanF2 v = sQ[sj][q][sc];
                ys += v.x;
                dxs += v.y;
                dds += sQd[sj][q][sc];
            }
            const ScanF4 v = sE[sj][sc], w = sW[sj][sc];
            if (dz) {
                const float g = fmaf(v.w, ys, w.x);
                dz[iw] = g;
                if (dz16) dz16[iw] = (unsigned short)bm_bf16_bits(g);
            }
            if (dx) dx[iw] = fmaf(v.x, dxs, w.y);
            const float du = fmaf(w.z, dxs, w.w * dds); // ∂L/∂dt
            if (ddt) {
                const float g = odtw + du;
                ddt[iw] = g;
                if (ddt16) ddt16[iw] = (unsigned short)bm_bf16_bits(g);
            }
            accBias += du;
        }
    }
    if (act && partA) {
#pragma unroll
        for (int p = 0; p < 2; p++) {
            const int n = 2 * l + p;
            if (n < N) partA[((long long)b * E + e) * N + n] = dA[p] * (A2[p] * BM_LN2); // dA/dAlog = A
        }
    }
    scan_bias_d_store<L>(sR, sj, sc, sact, accBias, accD, partBias, partD, (long long)b * E + es);
}

// dst[i] += Σ_p part[p·n + i] for i < n, p < P, in a fixed order: 32
// columns per block, 8 row slices summed in registers, then in shared memory.
extern "C" __global__ void __launch_bounds__(BM_SS_T) bm_scan_sum_parts(float *dst, const float *part, int P,
                                                                        long long n) {
    __shared__ float sh[8][33];
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const long long i = (long long)blockIdx.x * 32 + tx;
    float s = 0.f;
    if (i < n) {
#pragma unroll 4
        for (int p = ty; p < P; p += 8) s += part[(long long)p * n + i];
    }
    sh[ty][tx] = s;
    __syncthreads();
    if (ty == 0 && i < n) {
        float t = 0.f;
#pragma unroll
        for (int y = 0; y < 8; y++) t += sh[y][tx];
        dst[i] += t;
    }
}
