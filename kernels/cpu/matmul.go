package cpu

import (
	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/gonum"

	"github.com/bmojo/bmojo/kernels"
)

var blasImpl gonum.Implementation

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
	c := be.check("matmul")
	c.dims("Rw,N,K", Rw, N, K)
	o := c.buf("out", out, Rw*N, "Rw*N")
	xs := c.buf("x", x, Rw*K, "Rw*K")
	ws := c.buf("w", w, N*K, "N*K")
	if !c.ok || Rw == 0 || N == 0 {
		return
	}
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

// MatMulBackward implements kernels.Backend.
func (be *Backend[F]) MatMulBackward(dx, dw, dout, x, w kernels.Buffer, Rw, N, K int) {
	c := be.check("matmul_backward")
	c.dims("Rw,N,K", Rw, N, K)
	dxs := c.opt("dx", dx, Rw*K, "Rw*K")
	dws := c.opt("dw", dw, N*K, "N*K")
	do := c.buf("dout", dout, Rw*N, "Rw*N")
	xs := c.buf("x", x, Rw*K, "Rw*K")
	ws := c.buf("w", w, N*K, "N*K")
	if !c.ok || Rw == 0 || N == 0 || K == 0 {
		return
	}
	if dxs != nil {
		gemm(false, false, Rw, K, N, do, N, ws, K, 1, dxs, K)
	}
	if dws != nil {
		gemm(true, false, N, K, Rw, do, N, xs, K, 1, dws, K)
	}
}
