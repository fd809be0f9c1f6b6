package cpu

import (
	"sync"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/gonum"

	"github.com/bmojo/bmojo/kernels"
)

var blasImpl gonum.Implementation

// Why gonum, and why everything is turned into the x·wᵀ ("NT") form:
// measured on the 2-core dev VM (BenchmarkMatMulImpl, BenchmarkGemmForms,
// Rw=4096, N=K=256, 1 core), gonum Sgemm NT ran at 11.6-15.6 GFLOP/s against
// 4.2-4.5 GFLOP/s for a pure-Go 4×4 register-tiled kernel
// (matmulNTTiled in matmul_own_test.go). gonum's NT kernel is built on SIMD
// dot products and ran ~1.5× faster than its NN and TN (axpy-based) forms
// under the same load (6.4-8.7 vs 4.0-4.2 GFLOP/s on a busy machine), far more
// than the cost of transposing the smaller operands first, so the backward
// pass transposes into pooled scratch and calls NT too.

// gemm computes c = a'·b' + beta·c, a' = a or aᵀ, for row-major matrices
// (m×k)·(k×n), dispatching on F's width. gonum's Sgemm/Dgemm is blocked,
// parallel over GOMAXPROCS and uses SIMD dot/axpy kernels.
func gemm[F kernels.Float](tA, tB bool, m, n, k int, a []F, lda int, b []F, ldb int, beta float64, c []F, ldc int) {
	ta, tb := blas.NoTrans, blas.NoTrans
	if tA {
		ta = blas.Trans
	}
	if tB {
		tb = blas.Trans
	}
	if is32[F]() {
		blasImpl.Sgemm(ta, tb, m, n, k, 1, as32(a), lda, as32(b), ldb, float32(beta), as32(c), ldc)
		return
	}
	blasImpl.Dgemm(ta, tb, m, n, k, 1, as64(a), lda, as64(b), ldb, beta, as64(c), ldc)
}

// MatMul implements kernels.Backend.
func (be *Backend[F]) MatMul(out, x, w kernels.Buffer, Rw, N, K int, accumulate bool) {
	c := be.check(kernels.OpMatMul, []int{Rw, N, K}, out, x, w)
	if !c.ok || Rw == 0 || N == 0 {
		return
	}
	o, xs, ws := c.f[0], c.f[1], c.f[2]
	if K == 0 {
		if !accumulate {
			clear(o)
		}
		return
	}
	beta := 0.0
	if accumulate {
		beta = 1
	}
	gemm(false, true, Rw, N, K, xs, K, ws, K, beta, o, N)
}

// MatMulAdd implements kernels.Backend.
func (be *Backend[F]) MatMulAdd(out, r, x, w kernels.Buffer, Rw, N, K int) {
	c := be.check(kernels.OpMatMulAdd, []int{Rw, N, K}, out, r, x, w)
	if !c.ok {
		return
	}
	o, rs := c.f[0], c.f[1]
	if overlap(o, rs) && &o[0] != &rs[0] {
		c.failf("r overlaps out without being it")
		return
	}
	copy(o, rs)
	be.MatMul(out, x, w, Rw, N, K, true)
}

// MatMulBackward implements kernels.Backend.
func (be *Backend[F]) MatMulBackward(dx, dw, dout, x, w kernels.Buffer, Rw, N, K int) {
	c := be.check(kernels.OpMatMulBackward, []int{Rw, N, K}, dx, dw, dout, x, w)
	if !c.ok || Rw == 0 || N == 0 || K == 0 {
		return
	}
	dxs, dws, do, xs, ws := c.f[0], c.f[1], c.f[2], c.f[3], c.f[4]
	if dxs != nil {
		addDoutW(dxs, do, ws, Rw, N, K)
	}
	if dws != nil {
		// dw[N,K] += doutᵀ[N,Rw]·(xᵀ[K,Rw])ᵀ
		dT, xT := getScratch[F](Rw*N), getScratch[F](Rw*K)
		transpose(*dT, do, Rw, N)
		transpose(*xT, xs, Rw, K)
		gemm(false, true, N, K, Rw, *dT, Rw, *xT, Rw, 1, dws, K)
		putScratch(dT)
		putScratch(xT)
	}
}

// addDoutW is MatMulBackward's input gradient: dx[Rw,K] += dout[Rw,N]·w[N,K]
// (as dout·(wᵀ[K,N])ᵀ).
func addDoutW[F kernels.Float](dx, dout, w []F, Rw, N, K int) {
	wT := getScratch[F](N * K)
	transpose(*wT, w, N, K)
	gemm(false, true, Rw, K, N, dout, N, *wT, N, 1, dx, K)
	putScratch(wT)
}

// SiLUMatMulBackward implements kernels.Backend: dh = dr + dout·w in a
// scratch buffer, added exactly as MatMulBackward adds its dx, then
// SiLU's backward from dh.
func (be *Backend[F]) SiLUMatMulBackward(dx, dr, dout, w, x kernels.Buffer, Rw, N, K int) {
	c := be.check(kernels.OpSiLUMatMulBackward, []int{Rw, N, K}, dx, dr, dout, w, x)
	if !c.ok || c.f[0] == nil || Rw*K == 0 {
		return
	}
	dxs, drs, do, ws, xs := c.f[0], c.f[1], c.f[2], c.f[3], c.f[4]
	dh := getScratch[F](Rw * K)
	copy(*dh, drs)
	if N > 0 {
		addDoutW(*dh, do, ws, Rw, N, K)
	}
	siluBackward(dxs, *dh, xs)
	putScratch(dh)
}

// scratchPools hold transposition buffers between calls, one pool per
// element type (index 0: float32, 1: float64).
var scratchPools [2]sync.Pool

func poolOf[F kernels.Float]() *sync.Pool {
	if is32[F]() {
		return &scratchPools[0]
	}
	return &scratchPools[1]
}

func getScratch[F kernels.Float](n int) *[]F {
	if p, ok := poolOf[F]().Get().(*[]F); ok && cap(*p) >= n {
		*p = (*p)[:n]
		return p
	}
	s := make([]F, n)
	return &s
}

func putScratch[F kernels.Float](p *[]F) { poolOf[F]().Put(p) }

// transpose sets dst[c,r] = src[r,c] for a rows×cols src, in 32×32 tiles
// so both sides stay in cache, parallel over row tiles.
func transpose[F kernels.Float](dst, src []F, rows, cols int) {
	const tile = 32
	parallel((rows+tile-1)/tile, tile*cols, func(_, lo, hi int) {
		for r0 := lo * tile; r0 < min(hi*tile, rows); r0 += tile {
			r1 := min(r0+tile, rows)
			for c0 := 0; c0 < cols; c0 += tile {
				c1 := min(c0+tile, cols)
				for r := r0; r < r1; r++ {
					row := src[r*cols : r*cols+c1]
					for c := c0; c < c1; c++ {
						dst[c*rows+r] = row[c]
					}
				}
			}
		}
	})
}
