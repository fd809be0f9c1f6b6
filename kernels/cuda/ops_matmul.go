//go:build cuda

package cuda

import (
	"sort"

	"github.com/bmojo/bmojo/kernels"
)

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

// operand is one matrix-product input as cuBLAS reads it.
type operand struct {
	ptr  devptr
	bf16 bool
}

// gemmIn is one product input as the calling goroutine resolved it: the
// float32 source, and in bf16 mode the shadow that keeps its copy (nil: a
// scratch copy made for this product only) and whether it is stale.
type gemmIn struct {
	x       *floats
	s       *shadow
	convert bool
}

// input resolves x for a product: in bf16 mode its copy is kept in the
// shadow table (read again before x changes, like weights and saved
// activations, or written beside x by its producer).
func (b *Backend) input(x *floats) gemmIn {
	if b.d.opt.MatMul != "bf16" {
		return gemmIn{x: x}
	}
	s, convert := b.d.shadows.lookup(x)
	return gemmIn{x: x, s: s, convert: convert}
}

// operand returns in as the product reads it: the float32 source in fp32
// mode, else its bf16 shadow (converted when stale) or a copy in scratch
// slot (0..2). Device thread only.
func (d *Device) operand(slot int, in gemmIn) (operand, error) {
	if d.opt.MatMul != "bf16" {
		return operand{in.x.ptr, false}, nil
	}
	if p, err := d.keptCopy(in); err != nil || p != 0 {
		return operand{p, true}, err
	}
	// No memory for a kept copy: convert into scratch, and again next time.
	n := int64(in.x.n)
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
	}
	if err := d.toBF16(d.half[slot].ptr, in.x); err != nil {
		return operand{}, err
	}
	return operand{d.half[slot].ptr, true}, nil
}

// keptCopy returns the address of in's kept bf16 copy, converted first when
// stale or newly stored; 0 when in has no shadow (fp32 mode) or there is no
// memory for one. Device thread only.
func (d *Device) keptCopy(in gemmIn) (devptr, error) {
	s := in.s
	if s == nil {
		return 0, nil
	}
	convert := in.convert || s.a == nil
	p := d.storage(s)
	if p != 0 && convert {
		return p, d.toBF16(p, in.x)
	}
	return p, nil
}

// bf16Ref is a bf16 copy that a later launch of the same op reads (a launch
// argument), resolved on the device thread: a kept copy, or a temporary.
// It holds the copy's allocation: a kept copy dropped under memory pressure
// between the two must not return to the cache (and be freed) before the
// launch that reads it is queued.
type bf16Ref struct {
	ptr devptr
	a   *allocation
}

// keptBF16 returns x's bf16 copy for the kernels of op: the kept copy
// (shadow.go), converted first when stale, or without memory for one a
// temporary copy.
func (b *Backend) keptBF16(op string, x *floats) *bf16Ref {
	in, r := b.input(x), &bf16Ref{}
	b.queue(op, func() error {
		if p, err := b.d.keptCopy(in); err != nil || p != 0 {
			r.ptr, r.a = p, in.s.a
			return err
		}
		a, err := b.d.mem.alloc(2 * int64(x.n))
		if err != nil {
			return err
		}
		r.ptr, r.a = a.ptr, a
		return b.d.toBF16(a.ptr, x)
	})
	return r
}

// toBF16 queues the rounding of x into the bf16 array at dst, one thread
// per pair of values (packed into one 32-bit word).
func (d *Device) toBF16(dst devptr, x *floats) error {
	n := int64(x.n)
	return d.launch("bm_to_bf16", d.strideGrid(int((n+1)/2), 32), block256, 0, uint64(dst), x, n)
}

// ForgetInputCopies drops every kept bf16 copy, so the next products
// convert their inputs again (bench kernels times products both ways).
func (b *Backend) ForgetInputCopies() { b.d.shadows.forget() }

// InputCopies reports the bf16 copies of product inputs the device keeps.
func (b *Backend) InputCopies() InputCopyStats { return b.d.InputCopies() }

// gemm is the driver's product of two operands (both bf16 or both fp32).
func (d *Device) gemm(transA, transB bool, m, n, k int, A operand, lda int, B operand, ldb int, beta float32, C devptr, ldc int) error {
	return d.drv.gemm(transA, transB, m, n, k, 1, A.ptr, lda, B.ptr, ldb, beta, C, 0, ldc, A.bf16)
}

// MatMul implements kernels.Backend.
func (b *Backend) MatMul(out, x, w kernels.Buffer, Rw, N, K int, accumulate bool) {
	c := b.check(kernels.OpMatMul, []int{Rw, N, K}, fresh(out), x, w)
	if !c.ok || Rw*N == 0 {
		return
	}
	o, xb, wb, zeroed := c.f[0], c.f[1], c.f[2], c.over[0]
	if K == 0 {
		if !accumulate || zeroed {
			b.Zero(out)
		}
		return
	}
	beta := float32(0)
	if accumulate && !zeroed {
		beta = 1
	}
	b.product("matmul", o, xb, wb, Rw, N, K, beta, 0)
}

// product queues out[Rw,N] = x·wᵀ + beta·(cin, or out when cin is 0): in
// cuBLAS terms outᶜ[N,Rw] = wᶜᵀ·xᶜ (MatMul, MatMulAdd).
func (b *Backend) product(op string, o, xb, wb *floats, Rw, N, K int, beta float32, cin devptr) {
	wi, xi := b.input(wb), b.input(xb)
	b.queue(op, func() error {
		wh, err := b.d.operand(0, wi)
		if err != nil {
			return err
		}
		xh, err := b.d.operand(1, xi)
		if err != nil {
			return err
		}
		return b.d.drv.gemm(true, false, N, Rw, K, 1, wh.ptr, K, xh.ptr, K, beta, o.ptr, cin, N, wh.bf16)
	})
}

// MatMulAdd implements kernels.Backend: the product reads r as its C and
// writes out (cuBLASLt's separate C and D), instead of a copy first.
func (b *Backend) MatMulAdd(out, r, x, w kernels.Buffer, Rw, N, K int) {
	c := b.check(kernels.OpMatMulAdd, []int{Rw, N, K}, fresh(out), r, x, w) // out is written whole
	if !c.ok {
		return
	}
	o, rs, xb, wb := c.f[0], c.f[1], c.f[2], c.f[3]
	inPlace := rs.span() == o.span()
	c.cond(inPlace || !rs.span().overlaps(o.span()), "r overlaps out without being it")
	if !c.ok || Rw*N == 0 {
		return
	}
	if K == 0 {
		if !inPlace {
			b.queue("matmul_add", func() error { return b.d.drv.dtod(o.ptr, rs.ptr, int64(4*Rw*N)) })
		}
		return
	}
	cin := rs.ptr
	if inPlace {
		cin = 0
	}
	b.product("matmul_add", o, xb, wb, Rw, N, K, 1, cin)
}

// MatMulBackward implements kernels.Backend.
func (b *Backend) MatMulBackward(dx, dw, dout, x, w kernels.Buffer, Rw, N, K int) {
	c := b.check(kernels.OpMatMulBackward, []int{Rw, N, K}, fresh(dx), dw, dout, x, w)
	if !c.ok {
		return
	}
	dxb, dwb, do, xb, wb, dxZeroed := c.f[0], c.f[1], c.f[2], c.f[3], c.f[4], c.over[0]
	if Rw*N*K == 0 || (dxb == nil && dwb == nil) {
		if dxZeroed {
			b.Zero(dx) // still pending
		}
		return
	}
	// dout is a gradient: its bf16 copy is kept too, so that the op that
	// writes it next step can write the copy beside it (shadowTable.produce).
	doi, wi, xi := b.input(do), b.input(wb), b.input(xb)
	b.queue("matmul_backward", func() error {
		doh, err := b.d.operand(2, doi)
		if err != nil {
			return err
		}
		if dxb != nil { // dxᶜ[K,Rw] += wᶜ[K,N]·doutᶜ[N,Rw]
			wh, err := b.d.operand(0, wi)
			if err != nil {
				return err
			}
			beta := float32(1)
			if dxZeroed {
				beta = 0 // dx was pending a Zero: write it
			}
			if err := b.d.gemm(false, false, K, Rw, N, wh, K, doh, N, beta, dxb.ptr, K); err != nil {
				return err
			}
		}
		if dwb != nil { // dwᶜ[K,N] += xᶜ[K,Rw]·doutᶜᵀ[Rw,N]
			xh, err := b.d.operand(1, xi)
			if err != nil {
				return err
			}
			return b.d.gemm(false, true, K, N, Rw, xh, K, doh, N, 1, dwb.ptr, K)
		}
		return nil
	})
}

// GemmTunings reports how the algorithm of each product shape run so far
// was chosen (Options.NoGemmTune), largest time saved first.
func (d *Device) GemmTunings() []GemmTuning {
	var out []GemmTuning
	d.do(func() { out = d.drv.tunings() })
	sort.Slice(out, func(i, j int) bool {
		return out[i].HeuristicMs-out[i].ChosenMs > out[j].HeuristicMs-out[j].ChosenMs
	})
	return out
}
