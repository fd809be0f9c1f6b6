//go:build cuda

package cuda

import "github.com/bmojo/bmojo/kernels"

// The backend's matrices are row-major; cuBLAS is column-major. A row-major
// [R,C] matrix is a column-major [C,R] one, so out[Rw,N] = x[Rw,K]·w[N,K]ᵀ
// is, in cuBLAS terms, outᶜ[N,Rw] = wᶜᵀ·xᶜ with wᶜ [K,N] and xᶜ [K,Rw].

// MatMul implements kernels.Backend.
func (b *Backend) MatMul(out, x, w kernels.Buffer, Rw, N, K int, accumulate bool) {
	c := b.check("matmul")
	c.dims("Rw,N,K", Rw, N, K)
	o := c.buf("out", out, Rw*N, "Rw·N")
	xb := c.buf("x", x, Rw*K, "Rw·K")
	wb := c.buf("w", w, N*K, "N·K")
	if !c.ok || Rw*N == 0 {
		return
	}
	if K == 0 {
		if !accumulate {
			b.Zero(out)
		}
		return
	}
	beta := float32(0)
	if accumulate {
		beta = 1
	}
	b.run("matmul", func() error {
		return b.d.drv.gemm(true, false, N, Rw, K, 1, wb.ptr, K, xb.ptr, K, beta, o.ptr, N)
	})
}

// MatMulBackward implements kernels.Backend.
func (b *Backend) MatMulBackward(dx, dw, dout, x, w kernels.Buffer, Rw, N, K int) {
	c := b.check("matmul_backward")
	c.dims("Rw,N,K", Rw, N, K)
	dxb := c.opt("dx", dx, Rw*K, "Rw·K")
	dwb := c.opt("dw", dw, N*K, "N·K")
	do := c.buf("dout", dout, Rw*N, "Rw·N")
	xb := c.buf("x", x, Rw*K, "Rw·K")
	wb := c.buf("w", w, N*K, "N·K")
	if !c.ok || Rw*N*K == 0 {
		return
	}
	b.run("matmul_backward", func() error {
		if dxb != nil { // dxᶜ[K,Rw] += wᶜ[K,N]·doutᶜ[N,Rw]
			if err := b.d.drv.gemm(false, false, K, Rw, N, 1, wb.ptr, K, do.ptr, N, 1, dxb.ptr, K); err != nil {
				return err
			}
		}
		if dwb != nil { // dwᶜ[K,N] += xᶜ[K,Rw]·doutᶜᵀ[Rw,N]
			return b.d.drv.gemm(false, true, K, N, Rw, 1, xb.ptr, K, do.ptr, N, 1, dwb.ptr, K)
		}
		return nil
	})
}
