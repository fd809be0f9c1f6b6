package cpu

import (
	"math/rand/v2"
	"testing"
)

// matmulNTTiled is the pure-Go alternative to gonum's Sgemm that
// BenchmarkMatMulImpl measures: out = x·wᵀ with 4×4 register blocking, all
// operands walked along contiguous K. It loses (see matmul.go), so it lives
// in a test file only.
func matmulNTTiled(out, x, w []float32, Rw, N, K int) {
	parallel(Rw/4+1, N*K*8, func(_, lo, hi int) {
		for ib := lo; ib < hi; ib++ {
			i0 := ib * 4
			if i0 >= Rw {
				break
			}
			if i0+4 > Rw {
				for i := i0; i < Rw; i++ {
					for j := 0; j < N; j++ {
						out[i*N+j] = dot(x[i*K:(i+1)*K], w[j*K:(j+1)*K])
					}
				}
				continue
			}
			x0, x1, x2, x3 := x[i0*K:(i0+1)*K], x[(i0+1)*K:(i0+2)*K], x[(i0+2)*K:(i0+3)*K], x[(i0+3)*K:(i0+4)*K]
			j := 0
			for ; j+4 <= N; j += 4 {
				w0, w1, w2, w3 := w[j*K:(j+1)*K], w[(j+1)*K:(j+2)*K], w[(j+2)*K:(j+3)*K], w[(j+3)*K:(j+4)*K]
				var c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23, c30, c31, c32, c33 float32
				for k := range x0 {
					a0, a1, a2, a3 := x0[k], x1[k], x2[k], x3[k]
					b0, b1, b2, b3 := w0[k], w1[k], w2[k], w3[k]
					c00 += a0 * b0
					c01 += a0 * b1
					c02 += a0 * b2
					c03 += a0 * b3
					c10 += a1 * b0
					c11 += a1 * b1
					c12 += a1 * b2
					c13 += a1 * b3
					c20 += a2 * b0
					c21 += a2 * b1
					c22 += a2 * b2
					c23 += a2 * b3
					c30 += a3 * b0
					c31 += a3 * b1
					c32 += a3 * b2
					c33 += a3 * b3
				}
				o := out[i0*N+j:]
				o[0], o[1], o[2], o[3] = c00, c01, c02, c03
				o = out[(i0+1)*N+j:]
				o[0], o[1], o[2], o[3] = c10, c11, c12, c13
				o = out[(i0+2)*N+j:]
				o[0], o[1], o[2], o[3] = c20, c21, c22, c23
				o = out[(i0+3)*N+j:]
				o[0], o[1], o[2], o[3] = c30, c31, c32, c33
			}
			for ; j < N; j++ {
				for i := i0; i < i0+4; i++ {
					out[i*N+j] = dot(x[i*K:(i+1)*K], w[j*K:(j+1)*K])
				}
			}
		}
	})
}

func BenchmarkMatMulImpl(b *testing.B) {
	const Rw, N, K = 4096, 256, 256
	rng := rand.New(rand.NewPCG(1, 2))
	x, w, out := make([]float32, Rw*K), make([]float32, N*K), make([]float32, Rw*N)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	for i := range w {
		w[i] = float32(rng.NormFloat64())
	}
	flops := 2 * float64(Rw*N*K)
	b.Run("gonum", func(b *testing.B) {
		for b.Loop() {
			gemm(false, true, Rw, N, K, x, K, w, K, 0, out, N)
		}
		b.ReportMetric(flops*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
	})
	b.Run("tiled4x4", func(b *testing.B) {
		for b.Loop() {
			matmulNTTiled(out, x, w, Rw, N, K)
		}
		b.ReportMetric(flops*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
	})
}

func TestMatMulTiledAgrees(t *testing.T) {
	const Rw, N, K = 13, 10, 7
	rng := rand.New(rand.NewPCG(1, 2))
	x, w := make([]float32, Rw*K), make([]float32, N*K)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	for i := range w {
		w[i] = float32(rng.NormFloat64())
	}
	a, b := make([]float32, Rw*N), make([]float32, Rw*N)
	matmulNTTiled(a, x, w, Rw, N, K)
	gemm(false, true, Rw, N, K, x, K, w, K, 0, b, N)
	for i := range a {
		if d := a[i] - b[i]; d > 1e-4 || d < -1e-4 {
			t.Fatalf("out[%d]: tiled %v, gonum %v", i, a[i], b[i])
		}
	}
}

// BenchmarkGemmForms times the three gemm shapes MatMul and MatMulBackward
// issue at Rw=4096, N=K=256.
func BenchmarkGemmForms(b *testing.B) {
	const Rw, N, K = 4096, 256, 256
	rng := rand.New(rand.NewPCG(1, 2))
	mk := func(n int) []float32 {
		x := make([]float32, n)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		return x
	}
	x, w, dout, dx, dw, doutT := mk(Rw*K), mk(N*K), mk(Rw*N), mk(Rw*K), mk(N*K), mk(N*Rw)
	flops := 2 * float64(Rw*N*K)
	rep := func(b *testing.B) { b.ReportMetric(flops*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s") }
	b.Run("NT_out", func(b *testing.B) {
		for b.Loop() {
			gemm(false, true, Rw, N, K, x, K, w, K, 0, dout, N)
		}
		rep(b)
	})
	b.Run("NN_dx", func(b *testing.B) {
		for b.Loop() {
			gemm(false, false, Rw, K, N, dout, N, w, K, 1, dx, K)
		}
		rep(b)
	})
	b.Run("TN_dw", func(b *testing.B) {
		for b.Loop() {
			gemm(true, false, N, K, Rw, dout, N, x, K, 1, dw, K)
		}
		rep(b)
	})
	wT, xT := mk(K*N), mk(K*Rw)
	b.Run("NT_dx_via_wT", func(b *testing.B) {
		for b.Loop() {
			transpose(wT, w, N, K)
			gemm(false, true, Rw, K, N, dout, N, wT, N, 1, dx, K)
		}
		rep(b)
	})
	b.Run("NT_dw_via_transposes", func(b *testing.B) {
		for b.Loop() {
			transpose(doutT, dout, Rw, N)
			transpose(xT, x, Rw, K)
			gemm(false, true, N, K, Rw, doutT, Rw, xT, Rw, 1, dw, K)
		}
		rep(b)
	})
	b.Run("NN_dw_pretransposed", func(b *testing.B) {
		for b.Loop() {
			for r := 0; r < Rw; r++ {
				for n := 0; n < N; n++ {
					doutT[n*Rw+r] = dout[r*N+n]
				}
			}
			gemm(false, false, N, K, Rw, doutT, Rw, x, K, 1, dw, K)
		}
		rep(b)
	})
}
