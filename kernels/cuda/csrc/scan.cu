// The SSM kernels: SiLU, the causal depthwise Conv1d and the Mamba-1
// selective scan (model.md §3), forward and backward. Backward kernels
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
extern "C" __global__ void bm_silu_fwd(float *out, const float *x, long long n) {
    BM_FOR(i, n) {
        const float v = x[i];
        out[i] = v / (1.f + expf(-v));
    }
}

// dx[i] += dout[i]·s·(1 + x[i]·(1−s)), s = sigmoid(x[i]), in double (the
// factor cancels near x ≈ −1.28, where float would lose digits).
extern "C" __global__ void bm_silu_bwd(float *dx, const float *dout, const float *x, long long n) {
    BM_FOR(i, n) {
        const double v = x[i];
        const double s = 1.0 / (1.0 + exp(-v));
        dx[i] += (float)((double)dout[i] * s * (1.0 + v * (1.0 - s)));
    }
}

// ---------------------------------------------------------------- Conv1d

// out[b,t,e] = bias[e] + Σ_k w[e,k]·x[b,t−K+1+k,e] (x at t<0 is 0); one
// thread per element, grid-stride.
extern "C" __global__ void bm_conv1d_fwd(float *out, const float *x, const float *w, const float *bias,
                                         int B, int T, int E, int K) {
    const long long n = (long long)B * T * E;
    BM_FOR(i, n) {
        const int e = (int)(i % E);
        const int t = (int)((i / E) % T);
        const float *we = w + (long long)e * K;
        float acc = bias[e];
        for (int k = 0; k < K; k++) {
            const int ts = t - K + 1 + k;
            if (ts >= 0) acc += we[k] * x[i + (long long)(ts - t) * E];
        }
        out[i] = acc;
    }
}

// dx[b,s,e] += Σ_k dout[b,s+K−1−k,e]·w[e,k] (terms past T−1 vanish): the
// transpose of the forward, a gather with one writer per element.
extern "C" __global__ void bm_conv1d_bwd_dx(float *dx, const float *dout, const float *w,
                                            int B, int T, int E, int K) {
    const long long n = (long long)B * T * E;
    BM_FOR(i, n) {
        const int e = (int)(i % E);
        const int s = (int)((i / E) % T);
        const float *we = w + (long long)e * K;
        float acc = 0.f;
        for (int k = 0; k < K; k++) {
            const int t = s + K - 1 - k;
            if (t < T) acc += dout[i + (long long)(t - s) * E] * we[k];
        }
        dx[i] += acc;
    }
}

#define BM_CONV_KC 8   // (k) columns of dw / dbias per block (grid.z covers K+1)
#define BM_CONV_RY 8   // row slices per block (blockDim.y)

// Stage 1 of dw, dbias: block (32, BM_CONV_RY) covers 32 channels (blockIdx.x)
// and BM_CONV_KC of the K+1 columns (blockIdx.z; column K is the bias); its
// threads stride over the rows B·T starting at slice blockIdx.y, summing in
// registers, then the block sums its BM_CONV_RY row slices in shared memory
// and writes part[blockIdx.y][e][col]: P = gridDim.y partial sums, no atomics.
extern "C" __global__ void __launch_bounds__(32 * BM_CONV_RY)
bm_conv1d_bwd_wpart(float *part, const float *dout, const float *x, int B, int T, int E, int K) {
    __shared__ float sh[BM_CONV_RY][BM_CONV_KC][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int e = blockIdx.x * 32 + tx;
    const int k0 = blockIdx.z * BM_CONV_KC;
    const int nk = min(BM_CONV_KC, K + 1 - k0);
    float acc[BM_CONV_KC];
#pragma unroll
    for (int j = 0; j < BM_CONV_KC; j++) acc[j] = 0.f;
    if (e < E) {
        const long long rows = (long long)B * T;
        const long long step = (long long)gridDim.y * BM_CONV_RY;
        for (long long r = (long long)blockIdx.y * BM_CONV_RY + ty; r < rows; r += step) {
            const int t = (int)(r % T);
            const float g = dout[r * E + e];
#pragma unroll
            for (int j = 0; j < BM_CONV_KC; j++) {
                const int k = k0 + j;
                if (j < nk) {
                    if (k == K) {
                        acc[j] += g;
                    } else {
                        const int ts = t - K + 1 + k;
                        if (ts >= 0) acc[j] += g * x[(r + (ts - t)) * E + e];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < BM_CONV_KC; j++) sh[ty][j][tx] = acc[j];
    __syncthreads();
    // 32 channels × BM_CONV_KC columns, one sum each over the row slices.
    for (int idx = ty * 32 + tx; idx < 32 * BM_CONV_KC; idx += 32 * BM_CONV_RY) {
        const int c = idx & 31, j = idx >> 5;
        const int ec = blockIdx.x * 32 + c;
        if (ec < E && j < nk) {
            float s = 0.f;
#pragma unroll
            for (int y = 0; y < BM_CONV_RY; y++) s += sh[y][j][c];
            part[((long long)blockIdx.y * E + ec) * (K + 1) + k0 + j] = s;
        }
    }
}

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

// ---------------------------------------------------------------- selective scan
//
// Both scan kernels use blocks of 256 threads = 16 channels × 16 lanes,
// blockIdx.x the channel group (e = 16·blockIdx.x + threadIdx.x/16) and
// blockIdx.y the sequence b. Lane l of a channel owns the states
// n = l + 16p, p < NP (NP = ceil(N/16), a template parameter); lanes whose
// n ≥ N hold A = 0, B = C = 0 and so stay at h = 0 and contribute nothing.
// Channels past E (the last group) compute on clamped inputs with dout = 0
// and write nothing, so they too contribute nothing to shared sums. Every
// thread runs every step: sums over n are half-warp shuffles. The state is
// fp32 (model.md §5).

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
// least MINB resident blocks per SM: for N ≤ 32 (the models' N = 16),
// L·NP = 16 registers of recomputed states keep 3 blocks of 256 threads
// per SM without spills (16 KiB of staging shared memory each); larger N
// keep L·NP = 32 with 2 blocks (N ≤ 64) or 1 (N ≤ 128).
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

BM_SCAN_KERNELS(1, 16, 3)
BM_SCAN_KERNELS(2, 8, 3)
BM_SCAN_KERNELS(4, 8, 2)
BM_SCAN_KERNELS(8, 4, 1)
