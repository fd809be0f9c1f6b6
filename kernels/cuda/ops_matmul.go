//go:build cuda

package cuda

import "github.com/bmojo/bmojo/kernels"

// The backend's matrices are row-major; cuBLAS is column-major. A row-major
// [R,C] matrix is a column-major [C,R] one, so out[Rw,N] = x[Rw,K]·w[N,K]ᵀ
// is, in cuBLAS terms, outᶜ[N,Rw] = wᶜᵀ·xᶜ with wᶜ [K,N] and xᶜ [K,Rw].
//
// In bf16 mode (the default) each float32 input is first rounded to a
// bfloat16 copy (bm_to_bf16, a bandwidth-bound pass), and cuBLAS multiplies
// the copies on tensor cores with fp32 accumulation into the float32
// output: cuBLAS's own fp32-input path (COMPUTE_32F_FAST_16BF) converts
// inside every kernel tile and reached about 60 % of the bf16-input rate on
// an H200 (bmojo bench kernels).

// halfKey names the float32 range a bf16 copy was made from, and when.
type halfKey struct {
	src devptr
	n   int64
	gen uint64
}

// operand is one matrix-product input as cuBLAS reads it.
type operand struct {
	ptr  devptr
	bf16 bool
}

// gemmInput returns x as the matrix product should read it: x itself in
// fp32 mode, else its bf16 copy in scratch slot (0..2). Device thread only.
func (d *Device) gemmInput(slot int, x *floats) (operand, error) {
	if d.opt.MatMul != "bf16" {
		return operand{x.ptr, false}, nil
	}
	n := int64(x.n)
	// The model multiplies one activation by several weights in a row (q,
	// k, v; the halves of in_proj; the three parts of x_proj): slot 1
	// keeps its copy while no op other than matrix products has run since
	// (d.gen) and no product wrote over its source (queueMatMul).
	key := halfKey{x.ptr, n, d.gen}
	if slot == 1 && d.halfX == key {
		return operand{d.half[1].ptr, true}, nil
	}
	if d.halfN[slot] < n {
		// Grow by at least half, so slowly growing shapes do not reallocate
		// every call. The old block returns to the cache once unreachable;
		// work already queued on the stream still finds it intact.
		size := max(n, d.halfN[slot]*3/2)
		a, err := d.mem.alloc(2 * size)
		if err != nil {
			return operand{}, err
		}
		d.half[slot], d.halfN[slot] = a, size
		d.halfX = halfKey{}
	}
	dst := d.half[slot].ptr
	// One thread per pair of values (packed into one 32-bit word).
	if err := d.launch("bm_to_bf16", d.strideGrid(int((n+1)/2), 32), block256, 0, uint64(dst), x, n); err != nil {
		d.halfX = halfKey{}
		return operand{}, err
	}
	if slot == 1 {
		d.halfX = key
	}
	return operand{dst, true}, nil
}

// ForgetInputCopies drops the bf16 input copy that consecutive products
// share, so the next product converts its input again (bench kernels times
// products that way).
func (b *Backend) ForgetInputCopies() { b.queue("forget_input_copies", func() error { return nil }) }

// queueMatMul queues a matrix product. Unlike other ops (queue) it leaves
// d.gen alone, so consecutive products can share slot 1's copy, but it
// drops that copy when one of outs overlaps its source.
func (b *Backend) queueMatMul(op string, f func() error, outs ...*floats) {
	b.post(op, func() error {
		err := f()
		k := b.d.halfX
		for _, o := range outs {
			if o != nil && o.ptr < k.src+devptr(4*k.n) && k.src < o.ptr+devptr(4*o.n) {
				b.d.halfX = halfKey{}
			}
		}
		return err
	})
}

// gemm is the driver's product of two operands (both bf16 or both fp32).
func (d *Device) gemm(transA, transB bool, m, n, k int, A operand, lda int, B operand, ldb int, beta float32, C devptr, ldc int) error {
	return d.drv.gemm(transA, transB, m, n, k, 1, A.ptr, lda, B.ptr, ldb, beta, C, ldc, A.bf16)
}

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
	b.queueMatMul("matmul", func() error {
		wh, err := b.d.gemmInput(0, wb)
		if err != nil {
			return err
		}
		xh, err := b.d.gemmInput(1, xb)
		if err != nil {
			return err
		}
		return b.d.gemm(true, false, N, Rw, K, wh, K, xh, K, beta, o.ptr, N)
	}, o)
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
	if !c.ok || Rw*N*K == 0 || (dxb == nil && dwb == nil) {
		return
	}
	b.queueMatMul("matmul_backward", func() error {
		doh, err := b.d.gemmInput(2, do)
		if err != nil {
			return err
		}
		if dxb != nil { // dxᶜ[K,Rw] += wᶜ[K,N]·doutᶜ[N,Rw]
			wh, err := b.d.gemmInput(0, wb)
			if err != nil {
				return err
			}
			if err := b.d.gemm(false, false, K, Rw, N, wh, K, doh, N, 1, dxb.ptr, K); err != nil {
				return err
			}
		}
		if dwb != nil { // dwᶜ[K,N] += xᶜ[K,Rw]·doutᶜᵀ[Rw,N]
			xh, err := b.d.gemmInput(1, xb)
			if err != nil {
				return err
			}
			return b.d.gemm(false, true, K, N, Rw, xh, K, doh, N, 1, dwb.ptr, K)
		}
		return nil
	}, dxb, dwb)
}
