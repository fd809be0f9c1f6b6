// Elementwise ops, reductions, embedding, RMSNorm, SwiGLU, cross-entropy and
// AdamW. Semantics: kernels/backend.go and the CPU backend kernels/cpu.
#include "common.cuh"

extern "C" __global__ void bm_accumulate(float *dst, const float *src, long long n) {
    BM_FOR(i, n) dst[i] += src[i];
}

// bm_copy_cols: dst[r, dc+j] = src[r, sc+j] for r < rows, j < n (row
// lengths dld, sld).
// Blocks stride over rows, each thread over columns j ≡ threadIdx.x % n of
// the block's 256/n rows (no per-element division).
extern "C" __global__ void bm_copy_cols(float *dst, const float *src, long long rows, int n, int dld, int dc, int sld, int sc) {
    const int per = max(1, (int)blockDim.x / n); // rows per block step
    const int ry = threadIdx.x / n, j0 = threadIdx.x % n;
    if (ry >= per) return;
    for (long long r = (long long)blockIdx.x * per + ry; r < rows; r += (long long)gridDim.x * per)
        for (int j = j0; j < n; j += blockDim.x)
            dst[r * dld + dc + j] = src[r * sld + sc + j];
}

extern "C" __global__ void bm_scale(float *x, double s, long long n) {
    BM_FOR(i, n) x[i] = (float)((double)x[i] * s);
}

// bm_sum_squares adds Σ x² (double) of this block's share into *acc.
extern "C" __global__ void bm_sum_squares(double *acc, const float *x, long long n) {
    __shared__ double shm[32];
    double s = 0;
    BM_FOR(i, n) {
        double v = x[i];
        s += v * v;
    }
    s = bm_block_sum(s, shm);
    if (threadIdx.x == 0) atomicAdd(acc, s);
}

// One block per row; threads stride over d.
extern "C" __global__ void bm_embedding(float *out, const float *table, const int *tokens, int Rw, int d, int V, int *status) {
    int r = blockIdx.x;
    int t = tokens[r];
    if (t < 0 || t >= V) {
        if (threadIdx.x == 0) bm_report(status, BM_BAD_TOKEN, t, r);
        return;
    }
    const float *src = table + (long long)t * d;
    float *dst = out + (long long)r * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
}

// Tokens repeat, so rows are summed with atomics (fp32 add; the order of a
// few terms per element is the only difference from the CPU).
extern "C" __global__ void bm_embedding_backward(float *dtable, const float *dout, const int *tokens, int Rw, int d, int V, int *status) {
    int r = blockIdx.x;
    int t = tokens[r];
    if (t < 0 || t >= V) {
        if (threadIdx.x == 0) bm_report(status, BM_BAD_TOKEN, t, r);
        return;
    }
    const float *src = dout + (long long)r * d;
    float *dst = dtable + (long long)t * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) atomicAdd(dst + i, src[i]);
}

// RMSNorm: one warp per row (the rows stride over the grid's warps), so a
// row needs no block barrier; the warp reads its row twice, the second time
// from cache. out16, when set, gets a bf16 copy of out (a matrix product's
// operand).
extern "C" __global__ void bm_rmsnorm(float *out, float *rstd, const float *x, const float *g, int Rw, int d, unsigned short *out16) {
    const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    for (long long r = (long long)blockIdx.x * wpb + (threadIdx.x >> 5); r < Rw; r += (long long)gridDim.x * wpb) {
        const float *xr = x + r * d;
        float ss = 0;
        for (int i = lane; i < d; i += 32) ss += xr[i] * xr[i];
        ss = bm_warp_sum(ss);
        const float s = rsqrtf(ss / d + 1e-5f);
        if (lane == 0) rstd[r] = s;
        for (int i = lane; i < d; i += 32) {
            const float v = xr[i] * s * g[i];
            out[r * d + i] = v;
            if (out16) out16[r * d + i] = (unsigned short)bm_bf16_bits(v);
        }
    }
}

// dx: a block per rowsPer rows, one row at a time. With dg set it also
// sums dg's terms for its rows in shared memory (d floats, each column
// owned by one thread) and adds them with one atomic per column.
extern "C" __global__ void bm_rmsnorm_backward_dx(float *dx, float *dg, const float *dout, const float *x, const float *g, const float *rstd, int Rw,
                                                   int d, int rowsPer, unsigned short *dx16) {
    __shared__ float shm[32];
    BM_DYN_SMEM(float, gacc);
    if (dg)
        for (int i = threadIdx.x; i < d; i += blockDim.x) gacc[i] = 0.f;
    const int r1 = min(Rw, (blockIdx.x + 1) * rowsPer);
    for (int r = blockIdx.x * rowsPer; r < r1; r++) {
        const float *xr = x + (long long)r * d, *dr = dout + (long long)r * d;
        const float s = rstd[r];
        float dot = 0;
        for (int i = threadIdx.x; i < d; i += blockDim.x) dot += dr[i] * g[i] * xr[i];
        dot = bm_block_sum(dot, shm);
        const float k = dot * s * s * s / d;
        float *dxr = dx + (long long)r * d;
        for (int i = threadIdx.x; i < d; i += blockDim.x) {
            const float v = dxr[i] + dr[i] * g[i] * s - xr[i] * k;
            dxr[i] = v;
            if (dx16) dx16[(long long)r * d + i] = (unsigned short)bm_bf16_bits(v);
            if (dg) gacc[i] += dr[i] * xr[i] * s;
        }
    }
    if (dg)
        for (int i = threadIdx.x; i < d; i += blockDim.x) atomicAdd(dg + i, gacc[i]);
}

// dg[i] += Σ_r dout[r,i]·x[r,i]·rstd[r]. Block (32 columns × 8 row lanes)
// per column tile and row slab; one atomic per column per block.
#define RMS_ROWS_PER_BLOCK 256
extern "C" __global__ void bm_rmsnorm_backward_dg(float *dg, const float *dout, const float *x, const float *rstd, int Rw, int d) {
    __shared__ float part[8][33];
    int col = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * RMS_ROWS_PER_BLOCK;
    int r1 = min(Rw, r0 + RMS_ROWS_PER_BLOCK);
    float acc = 0;
    if (col < d)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) {
            long long i = (long long)r * d + col;
            acc += dout[i] * x[i] * rstd[r];
        }
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < d) {
        float s = 0;
        for (int j = 0; j < 8; j++) s += part[j][threadIdx.x];
        atomicAdd(dg + col, s);
    }
}

// h16, when set, gets a bf16 copy of h (a matrix product's operand).
extern "C" __global__ void bm_swiglu(float *h, const float *gate, const float *up, long long n, unsigned short *h16) {
    BM_FOR(i, n) {
        float v = gate[i];
        const float r = v * bm_sigmoid(v) * up[i];
        h[i] = r;
        if (h16) h16[i] = (unsigned short)bm_bf16_bits(r);
    }
}

// SwiGLUPacked: h[r,i] = SiLU(gu[r,i])·gu[r,F+i], gu [Rw,2F] (one product
// with W_gate and W_up stacked). Blocks stride over rows (blockIdx.y) and
// cover a row's F columns (blockIdx.x); the arithmetic is bm_swiglu's.
extern "C" __global__ void bm_swiglu_packed(float *h, const float *gu, int Rw, int F, unsigned short *h16) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= F) return;
    for (long long r = blockIdx.y; r < Rw; r += gridDim.y) {
        const float v = gu[r * 2 * F + i];
        const float o = v * bm_sigmoid(v) * gu[r * 2 * F + F + i];
        h[r * F + i] = o;
        if (h16) h16[r * F + i] = (unsigned short)bm_bf16_bits(o);
    }
}

// SwiGLUPackedBackward: bm_swiglu_backward into the halves of dgu [Rw,2F]
// (dgu = when over, the host's deferred zero); dgu16, when set, gets the
// bf16 copy (the stacked product's operand). SiLU is recomputed from gu.
extern "C" __global__ void bm_swiglu_packed_backward(float *dgu, const float *dh, const float *gu, int Rw, int F, int over,
                                                     unsigned short *dgu16) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= F) return;
    for (long long r = blockIdx.y; r < Rw; r += gridDim.y) {
        const long long ig = r * 2 * F + i, iu = ig + F;
        const float v = gu[ig], s = bm_sigmoid(v), g = dh[r * F + i];
        const float rg = (over ? 0.f : dgu[ig]) + g * gu[iu] * s * (1.f + v * (1.f - s));
        const float ru = (over ? 0.f : dgu[iu]) + g * v * s;
        dgu[ig] = rg;
        dgu[iu] = ru;
        if (dgu16) {
            dgu16[ig] = (unsigned short)bm_bf16_bits(rg);
            dgu16[iu] = (unsigned short)bm_bf16_bits(ru);
        }
    }
}

// dgate += dh·up·silu'(gate), dup += dh·silu(gate); bit 0 of over makes
// dgate, bit 1 dup, written instead (the host's deferred zero). dgate16 and
// dup16, when set, get bf16 copies of the results (the matrix products'
// operands).
extern "C" __global__ void bm_swiglu_backward(float *dgate, float *dup, const float *dh, const float *gate, const float *up,
                                              long long n, int over, unsigned short *dgate16, unsigned short *dup16) {
    BM_FOR(i, n) {
        float v = gate[i], s = bm_sigmoid(v), g = dh[i];
        if (dgate) {
            const float r = (over & 1 ? 0.f : dgate[i]) + g * up[i] * s * (1.f + v * (1.f - s));
            dgate[i] = r;
            if (dgate16) dgate16[i] = (unsigned short)bm_bf16_bits(r);
        }
        if (dup) {
            const float r = (over & 2 ? 0.f : dup[i]) + g * v * s;
            dup[i] = r;
            if (dup16) dup16[i] = (unsigned short)bm_bf16_bits(r);
        }
    }
}

// Cross-entropy, one block per row: loss[r] = lse(row) − row[target], 0
// for ignored rows (target < 0). With dlogits != NULL it instead adds
// scale·(softmax − onehot) to dlogits (ignored rows get nothing).
extern "C" __global__ void bm_cross_entropy(float *loss, float *dlogits, const float *logits, const int *targets, float scale, int Rw, int V, int *status) {
    __shared__ float shm[32];
    int r = blockIdx.x;
    int t = targets[r];
    if (t >= V) {
        if (threadIdx.x == 0) bm_report(status, BM_BAD_TARGET, t, r);
        return;
    }
    if (t < 0) {
        if (loss && threadIdx.x == 0) loss[r] = 0;
        return;
    }
    const float *row = logits + (long long)r * V;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) m = fmaxf(m, row[i]);
    m = bm_block_max(m, shm);
    float s = 0;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += expf(row[i] - m);
    s = bm_block_sum(s, shm);
    float lse = m + logf(s);
    if (loss && threadIdx.x == 0) loss[r] = lse - row[t];
    if (dlogits) {
        float *drow = dlogits + (long long)r * V;
        for (int i = threadIdx.x; i < V; i += blockDim.x) {
            float p = expf(row[i] - lse);
            if (i == t) p -= 1.f;
            drow[i] += scale * p;
        }
    }
}

// AdamW with decoupled weight decay at element i; bc1, bc2 are the bias
// corrections, grad is read as grad·gs, rounded as bm_scale rounds. The one
// update of bm_adamw and bm_adamw_tiles, so the two agree bit for bit; it
// returns the new parameter.
__device__ __forceinline__ float bm_adamw_at(float *p, const float *g, float *m, float *v, long long i, float lr, float b1, float b2, float eps,
                                            float wd, float bc1, float bc2, double gs) {
    float gi = gs == 1.0 ? g[i] : (float)((double)g[i] * gs);
    float mi = b1 * m[i] + (1.f - b1) * gi;
    float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float pi = p[i];
    const float r = pi - lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * pi);
    p[i] = r;
    return r;
}

extern "C" __global__ void bm_adamw(float *p, const float *g, float *m, float *v, float lr, float b1, float b2, float eps, float wd, float bc1, float bc2,
                                    double gs, long long n) {
    BM_FOR(i, n) bm_adamw_at(p, g, m, v, i, lr, b1, b2, eps, wd, bc1, bc2, gs);
}

// bm_adamw_tile is one tile of bm_adamw_tiles: n ≤ BM_ADAMW_TILE elements
// from off, all of one segment (weight decay wd) and of at most one kept
// bf16 copy of a weight: p16, when set, is where element off's copy goes.
// The host builds the table (ops_basic.go, adamWTiles) and keeps it on the
// device.
struct bm_adamw_tile {
    long long off;
    int n;
    float wd;
    unsigned short *p16;
};
#define BM_ADAMW_TILE 4096

// bm_adamw_tiles is AdamWSteps: the update of every parameter tensor in
// one launch (a multi-tensor apply over a table of tiles), where bm_adamw
// takes one launch per run of tensors of one decay group; it also writes
// the bf16 copies the products keep of the weights, which the first
// product of each weight would otherwise convert again. Blocks stride over
// the tiles; a tile's threads over its elements.
extern "C" __global__ void bm_adamw_tiles(float *p, const float *g, float *m, float *v, const bm_adamw_tile *tiles, int ntiles, float lr, float b1,
                                          float b2, float eps, float bc1, float bc2, double gs) {
    for (int t = blockIdx.x; t < ntiles; t += gridDim.x) {
        const bm_adamw_tile d = tiles[t];
        for (int j = threadIdx.x; j < d.n; j += blockDim.x) {
            const float r = bm_adamw_at(p, g, m, v, d.off + j, lr, b1, b2, eps, d.wd, bc1, bc2, gs);
            if (d.p16) d.p16[j] = (unsigned short)bm_bf16_bits(r);
        }
    }
}

// bm_to_bf16 rounds n floats to bfloat16 (bm_bf16_bits), two per thread,
// packed into 32-bit words: the inputs of the tensor-core matrix products.

extern "C" __global__ void bm_to_bf16(unsigned *dst, const float *src, long long n) {
    BM_FOR(i, (n + 1) / 2) {
        const float lo = src[2 * i];
        const float hi = 2 * i + 1 < n ? src[2 * i + 1] : 0.f;
        dst[i] = bm_bf16_bits(lo) | (bm_bf16_bits(hi) << 16);
    }
}
