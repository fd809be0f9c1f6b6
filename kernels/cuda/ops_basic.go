//go:build cuda

package cuda

import (
	"math"
	"unsafe"

	"github.com/bmojo/bmojo/kernels"
)

// threads is the block size of the elementwise kernels.
const threads = 256

// strideGrid covers n elements with blocks of 256 threads running a
// grid-stride loop, capped at perSM blocks per SM so huge buffers reuse
// threads rather than launch millions of blocks (0 blocks for n = 0).
func (d *Device) strideGrid(n, perSM int) dim {
	return dim{min((n+threads-1)/threads, perSM*max(1, d.info.SMs)), 1, 1}
}

// gridFor is the grid of the elementwise kernels: up to 32 blocks per SM.
func (b *Backend) gridFor(n int) dim { return b.d.strideGrid(n, 32) }

var block256 = dim{threads, 1, 1}

// Accumulate implements kernels.Backend.
func (b *Backend) Accumulate(dst, src kernels.Buffer) {
	c := b.check(kernels.OpAccumulate, nil, fresh(dst), src)
	if !c.ok || c.f[1].n == 0 {
		return
	}
	d, s := c.f[0], c.f[1]
	if c.over[0] { // dst was pending a Zero: dst = src
		b.queue("accumulate", func() error { return b.d.drv.dtod(d.ptr, s.ptr, int64(4*s.n)) })
		return
	}
	b.launch("accumulate", "bm_accumulate", b.gridFor(s.n), block256, 0, d, s, int64(s.n))
}

// CopyColumns implements kernels.Backend.
func (b *Backend) CopyColumns(dst, src kernels.Buffer, Rw, n, dCols, dc, sCols, sc int) {
	c := b.check(kernels.OpCopyColumns, []int{Rw, n, dCols, dc, sCols, sc}, dst, src)
	if !c.ok {
		return
	}
	d, s := c.f[0], c.f[1]
	c.cond(!d.span().overlaps(s.span()), "dst and src overlap")
	if !c.ok || Rw*n == 0 {
		return
	}
	per := max(1, threads/n) // rows per block (bm_copy_cols)
	b.launch("copy_columns", "bm_copy_cols", b.d.strideGrid((Rw+per-1)/per*threads, 32), block256, 0, d, s, int64(Rw), n, dCols, dc, sCols, sc)
}

// Scale implements kernels.Backend.
func (b *Backend) Scale(x kernels.Buffer, s float64) {
	c := b.check(kernels.OpScale, nil, x)
	if !c.ok || c.f[0].n == 0 {
		return
	}
	f := c.f[0]
	b.launch("scale", "bm_scale", b.gridFor(f.n), block256, 0, f, s, int64(f.n))
}

// SumSquares implements kernels.Backend. It waits for the result.
func (b *Backend) SumSquares(x kernels.Buffer) float64 {
	c := b.check(kernels.OpSumSquares, nil, x)
	if !c.ok || c.f[0].n == 0 {
		return 0
	}
	f := c.f[0]
	acc := b.Alloc(2).(*floats) // one double
	var out float64
	b.launch("sum_squares", "bm_sum_squares", b.gridFor(f.n), block256, 0, acc, f, int64(f.n))
	b.run("sum_squares", func() error {
		return b.d.drv.dtoh(unsafe.Pointer(&out), acc.ptr, 8)
	})
	return out
}

// Embedding implements kernels.Backend. Tokens are checked on the device.
func (b *Backend) Embedding(out, table kernels.Buffer, tokens kernels.IntBuffer, Rw, d int) {
	c := b.check(kernels.OpEmbedding, []int{Rw, d}, out, table, tokens)
	if !c.ok || d == 0 || Rw == 0 {
		return
	}
	o, tab, tok := c.f[0], c.f[1], c.i[2]
	b.launch("embedding", "bm_embedding", dim{Rw, 1, 1}, dim{min(256, roundUp(d, 32)), 1, 1}, 0, o, tab, tok, Rw, d, tab.n/d, b.status)
}

// EmbeddingBackward implements kernels.Backend.
func (b *Backend) EmbeddingBackward(dtable, dout kernels.Buffer, tokens kernels.IntBuffer, Rw, d int) {
	c := b.check(kernels.OpEmbeddingBackward, []int{Rw, d}, dtable, dout, tokens)
	if !c.ok || c.f[0] == nil || d == 0 || Rw == 0 {
		return
	}
	dt, do, tok := c.f[0], c.f[1], c.i[2]
	b.launch("embedding_backward", "bm_embedding_backward", dim{Rw, 1, 1}, dim{min(256, roundUp(d, 32)), 1, 1}, 0, dt, do, tok, Rw, d, dt.n/d, b.status)
}

func roundUp(n, m int) int { return (n + m - 1) / m * m }

// rowBlock is the block size of one-block-per-row kernels over width n.
func rowBlock(n int) dim { return dim{min(1024, max(32, roundUp(n, 32))), 1, 1} }

// RMSNorm implements kernels.Backend.
func (b *Backend) RMSNorm(out, rstd, x, g kernels.Buffer, Rw, d int) {
	c := b.check(kernels.OpRMSNorm, []int{Rw, d}, out, rstd, x, g)
	if !c.ok || d == 0 || Rw == 0 {
		return
	}
	o, rs, xs, gs := c.f[0], c.f[1], c.f[2], c.f[3]
	b.launch("rmsnorm", "bm_rmsnorm", dim{min((Rw+7)/8, 32*max(1, b.d.info.SMs)), 1, 1}, block256, 0, o, rs, xs, gs, Rw, d, b.d.shadows.produce(o))
}

// RMSNormBackward implements kernels.Backend.
func (b *Backend) RMSNormBackward(dx, dg, dout, x, g, rstd kernels.Buffer, Rw, d int) {
	c := b.check(kernels.OpRMSNormBackward, []int{Rw, d}, dx, dg, dout, x, g, rstd)
	if !c.ok || d == 0 || Rw == 0 {
		return
	}
	dxs, dgs, do, xs, gs, rs := c.f[0], c.f[1], c.f[2], c.f[3], c.f[4], c.f[5]
	if dxs != nil {
		// Blocks of rows, about 8 per SM; dg rides along when its d
		// partial sums fit in shared memory.
		var fused *floats
		shm := 0
		if dgs != nil && 4*d <= 48<<10 {
			fused, shm, dgs = dgs, 4*d, nil
		}
		per := max(1, (Rw+8*b.d.info.SMs-1)/max(1, 8*b.d.info.SMs))
		b.launch("rmsnorm_backward", "bm_rmsnorm_backward_dx", dim{(Rw + per - 1) / per, 1, 1}, rowBlock(min(d, 256)), shm, dxs, fused, do, xs, gs, rs, Rw, d,
			per, b.d.shadows.produce(dxs))
	}
	if dgs != nil {
		const rowsPerBlock = 256 // RMS_ROWS_PER_BLOCK in basic.cu
		b.launch("rmsnorm_backward", "bm_rmsnorm_backward_dg", dim{(d + 31) / 32, (Rw + rowsPerBlock - 1) / rowsPerBlock, 1}, dim{32, 8, 1}, 0, dgs, do, xs, rs, Rw, d)
	}
}

// SwiGLU implements kernels.Backend.
func (b *Backend) SwiGLU(h, gate, up kernels.Buffer) {
	c := b.check(kernels.OpSwiGLU, nil, h, gate, up)
	if !c.ok || c.f[0].n == 0 {
		return
	}
	hs, gs, us := c.f[0], c.f[1], c.f[2]
	n := hs.n
	b.launch("swiglu", "bm_swiglu", b.gridFor(n), block256, 0, hs, gs, us, int64(n), b.d.shadows.produce(hs))
}

// SwiGLUBackward implements kernels.Backend.
func (b *Backend) SwiGLUBackward(dgate, dup, dh, gate, up kernels.Buffer) {
	c := b.check(kernels.OpSwiGLUBackward, nil, fresh(dgate), fresh(dup), dh, gate, up)
	if !c.ok || c.f[2].n == 0 || (c.f[0] == nil && c.f[1] == nil) {
		return
	}
	dgs, dus, dhs, gs, us := c.f[0], c.f[1], c.f[2], c.f[3], c.f[4]
	n := dhs.n
	over := boolInt(c.over[0]) | boolInt(c.over[1])<<1 // outputs pending a Zero are written, not added to
	b.launch("swiglu_backward", "bm_swiglu_backward", b.gridFor(n), block256, 0, dgs, dus, dhs, gs, us, int64(n), over,
		b.d.shadows.produce(dgs), b.d.shadows.produce(dus))
}

// CrossEntropy implements kernels.Backend. Targets ≥ V are found on the
// device and reported by Err.
func (b *Backend) CrossEntropy(loss, logits kernels.Buffer, targets kernels.IntBuffer, Rw, V int) {
	c := b.check(kernels.OpCrossEntropy, []int{Rw, V}, loss, logits, targets)
	if !c.ok || Rw == 0 {
		return
	}
	ls, lg, tg := c.f[0], c.f[1], c.i[2]
	b.launch("cross_entropy", "bm_cross_entropy", dim{Rw, 1, 1}, rowBlock(min(V, 512)), 0, ls, (*floats)(nil), lg, tg, float32(0), Rw, V, b.status)
}

// CrossEntropyBackward implements kernels.Backend.
func (b *Backend) CrossEntropyBackward(dlogits, logits kernels.Buffer, targets kernels.IntBuffer, scale float64, Rw, V int) {
	c := b.check(kernels.OpCrossEntropyBackward, []int{Rw, V}, dlogits, logits, targets)
	if !c.ok || c.f[0] == nil || Rw == 0 {
		return
	}
	dl, lg, tg := c.f[0], c.f[1], c.i[2]
	b.launch("cross_entropy_backward", "bm_cross_entropy", dim{Rw, 1, 1}, rowBlock(min(V, 512)), 0, (*floats)(nil), dl, lg, tg, float32(scale), Rw, V, b.status)
}

// AdamWStep implements kernels.Backend.
func (b *Backend) AdamWStep(param, grad, m, v kernels.Buffer, h kernels.AdamW) {
	c := b.check(kernels.OpAdamWStep, []int{h.Step}, param, grad, m, v)
	if !c.ok || c.f[0].n == 0 {
		return
	}
	ps, gs, ms, vs := c.f[0], c.f[1], c.f[2], c.f[3]
	n := ps.n
	bc1 := 1 - math.Pow(h.Beta1, float64(h.Step))
	bc2 := 1 - math.Pow(h.Beta2, float64(h.Step))
	gscale := h.GradScale
	if gscale == 0 {
		gscale = 1
	}
	b.launch("adamw", "bm_adamw", b.gridFor(n), block256, 0, ps, gs, ms, vs,
		float32(h.LR), float32(h.Beta1), float32(h.Beta2), float32(h.Eps), float32(h.WeightDecay), float32(bc1), float32(bc2), gscale, int64(n))
}
