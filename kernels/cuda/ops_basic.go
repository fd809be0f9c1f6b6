//go:build cuda

package cuda

import (
	"math"
	"slices"
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

// SwiGLUPacked implements kernels.Backend (reference: SwiGLU on the two
// halves of each row, kernels/cpu). With W_gate and W_up stacked, the
// model's gate and up are one product [Rw,2F] instead of two, whose input
// copy is read once; this kernel reads its two halves and writes h with its
// bf16 copy (down's operand) as bm_swiglu does.
func (b *Backend) SwiGLUPacked(h, gu kernels.Buffer, Rw, F int) {
	c := b.check(kernels.OpSwiGLUPacked, []int{Rw, F}, h, gu)
	if !c.ok || Rw*F == 0 {
		return
	}
	hs, gus := c.f[0], c.f[1]
	c.cond(!hs.span().overlaps(gus.span()), "h overlaps gu")
	if !c.ok {
		return
	}
	b.launch("swiglu", "bm_swiglu_packed", b.rowsGrid(Rw, F), block256, 0, hs, gus, Rw, F, b.d.shadows.produce(hs))
}

// SwiGLUPackedBackward implements kernels.Backend (reference:
// SwiGLUBackward into the halves of dgu, kernels/cpu). It writes dgu's bf16
// copy, which the stacked product's backward reads, and recomputes SiLU
// from gu.
func (b *Backend) SwiGLUPackedBackward(dgu, dh, gu kernels.Buffer, Rw, F int) {
	c := b.check(kernels.OpSwiGLUPackedBackward, []int{Rw, F}, fresh(dgu), dh, gu)
	if !c.ok || c.f[0] == nil || Rw*F == 0 {
		return
	}
	dgus, dhs, gus := c.f[0], c.f[1], c.f[2]
	c.cond(!dgus.span().overlaps(dhs.span()) && !dgus.span().overlaps(gus.span()), "dgu overlaps dh or gu")
	if !c.ok {
		return
	}
	b.launch("swiglu_backward", "bm_swiglu_packed_backward", b.rowsGrid(Rw, F), block256, 0, dgus, dhs, gus, Rw, F, boolInt(c.over[0]),
		b.d.shadows.produce(dgus))
}

// rowsGrid is the grid of the row kernels of basic.cu over Rw rows of F
// columns: blocks of 256 columns (x) by row strides (y), about 32 blocks
// per SM.
func (b *Backend) rowsGrid(Rw, F int) dim {
	xb := (F + threads - 1) / threads
	return dim{xb, max(1, min(Rw, maxGridYZ, (32*max(1, b.d.info.SMs)+xb-1)/xb)), 1}
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

// adamWTile mirrors BM_ADAMW_TILE in basic.cu: the most elements of one
// tile of bm_adamw_tiles.
const adamWTile = 4096

// AdamWSteps implements kernels.Backend (reference: AdamWStep on each
// segment, kernels/cpu): one launch of bm_adamw_tiles for every segment,
// where AdamWStep takes one per segment (64 for bmojo-130m), bit for bit
// the same update. The same pass writes the bf16 copies that products keep
// of the weights inside param (shadow.go), so the next step's products
// convert none of them (one bm_to_bf16 launch and a read of the float32
// weight each, otherwise). Its tiles are built on the device thread and
// kept on the device while the segments and copies stay the same
// (adamWTiles).
func (b *Backend) AdamWSteps(param, grad, m, v kernels.Buffer, segs []kernels.AdamWSegment, h kernels.AdamW) {
	c := b.check(kernels.OpAdamWSteps, []int{h.Step}, param, grad, m, v)
	if !c.ok {
		return
	}
	ps, gs, ms, vs := c.f[0], c.f[1], c.f[2], c.f[3]
	if err := kernels.CheckSegments(segs, ps.n); err != nil {
		c.failf("%v", err)
		return
	}
	segs = slices.Clone(segs)
	copies := b.d.shadows.inside(ps, segs)
	bc1 := 1 - math.Pow(h.Beta1, float64(h.Step))
	bc2 := 1 - math.Pow(h.Beta2, float64(h.Step))
	gscale := h.GradScale
	if gscale == 0 {
		gscale = 1
	}
	b.queueKernel("adamw", "bm_adamw_tiles", func() error {
		tiles, nt, err := b.adamWTiles(segs, copies)
		if err != nil || nt == 0 {
			return err
		}
		return b.d.launch("bm_adamw_tiles", dim{min(nt, 32*max(1, b.d.info.SMs)), 1, 1}, block256, 0, ps, gs, ms, vs, uint64(tiles), nt,
			float32(h.LR), float32(h.Beta1), float32(h.Beta2), float32(h.Eps), float32(bc1), float32(bc2), gscale)
	})
}

// adamWTable is AdamWSteps' last tile table on the device and what it was
// built from (device thread only).
type adamWTable struct {
	key   []int64 // the segments, then each copy's range and storage
	tiles *allocation
	n     int
}

// adamWWords is the size of struct bm_adamw_tile in 32-bit words.
const adamWWords = 6

// adamWTiles returns the device address of the tiles of segs with copies
// and their number: tiles of up to adamWTile elements of one segment and
// at most one copy, each struct bm_adamw_tile {off, n, wd, p16}. The table
// is uploaded again only when the segments or a copy's storage changed.
// Device thread only.
func (b *Backend) adamWTiles(segs []kernels.AdamWSegment, copies []innerCopy) (devptr, int, error) {
	key := make([]int64, 0, 3*len(segs)+3*len(copies))
	for _, s := range segs {
		key = append(key, int64(s.Off), int64(s.N), int64(math.Float64bits(s.WeightDecay)))
	}
	store := make([]devptr, len(copies))
	for i, c := range copies {
		store[i] = b.d.storage(c.s) // 0 without memory for it: the product converts
		key = append(key, int64(c.off), int64(c.n), int64(store[i]))
	}
	t := &b.adamw
	if t.tiles != nil && slices.Equal(t.key, key) {
		return t.tiles.ptr, t.n, nil
	}
	var words []int32
	tile := func(off, n int, wd float64, p16 devptr) {
		for o := 0; o < n; o += adamWTile {
			at, dst := uint64(off+o), uint64(0)
			if p16 != 0 {
				dst = uint64(p16) + 2*uint64(o)
			}
			words = append(words, int32(uint32(at)), int32(uint32(at>>32)), int32(min(adamWTile, n-o)),
				int32(math.Float32bits(float32(wd))), int32(uint32(dst)), int32(uint32(dst>>32)))
		}
	}
	ci := 0
	for _, s := range segs {
		for at, end := s.Off, s.Off+s.N; at < end; {
			for ci < len(copies) && copies[ci].off < at {
				ci++ // copies lie inside one segment each, in order (shadowTable.inside)
			}
			if ci < len(copies) && copies[ci].off == at {
				tile(at, copies[ci].n, s.WeightDecay, store[ci])
				at += copies[ci].n
				continue
			}
			next := end
			if ci < len(copies) && copies[ci].off < end {
				next = copies[ci].off
			}
			tile(at, next-at, s.WeightDecay, 0)
			at = next
		}
	}
	n := len(words) / adamWWords
	if n == 0 {
		t.key, t.n = key, 0
		return 0, 0, nil
	}
	if t.tiles == nil || t.tiles.size < int64(4*len(words)) {
		a, err := b.d.mem.alloc(int64(4 * len(words)))
		if err != nil {
			return 0, 0, err
		}
		t.tiles = a // the old table returns to the cache once unreachable; queued work still finds it intact
	}
	// Stream-ordered: the copy waits for the launches that read the old table.
	if err := b.d.drv.htod(t.tiles.ptr, unsafe.Pointer(&words[0]), int64(4*len(words))); err != nil {
		return 0, 0, err
	}
	t.key, t.n = key, n
	return t.tiles.ptr, n, nil
}
