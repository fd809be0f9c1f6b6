//go:build cuda

package cuda

import (
	"strconv"

	"github.com/bmojo/bmojo/kernels"
)

// The SSM ops (csrc/scan.cu): SiLU, the causal depthwise Conv1d and the
// selective scan.

// scanStrideGrid is the grid of this file's elementwise kernels: 256-thread
// blocks, up to 16 per SM (each thread then handles several elements).
func (b *Backend) scanStrideGrid(n int) dim { return b.d.strideGrid(n, 16) }

// SiLU implements kernels.Backend.
func (b *Backend) SiLU(out, x kernels.Buffer) {
	c := b.check(kernels.OpSiLU, nil, out, x)
	if !c.ok || c.f[0].n == 0 {
		return
	}
	o, xb := c.f[0], c.f[1]
	n := o.n
	b.launch("silu", "bm_silu_fwd", b.scanStrideGrid(n), dim{256, 1, 1}, 0, o, xb, int64(n), b.d.shadows.produce(o))
}

// SiLUBackward implements kernels.Backend.
func (b *Backend) SiLUBackward(dx, dout, x kernels.Buffer) {
	c := b.check(kernels.OpSiLUBackward, nil, fresh(dx), dout, x)
	if !c.ok || c.f[0] == nil || c.f[1].n == 0 {
		return
	}
	dxb, do, xb, over := c.f[0], c.f[1], c.f[2], c.over[0]
	n := do.n
	b.launch("silu_backward", "bm_silu_bwd", b.scanStrideGrid(n), dim{256, 1, 1}, 0, dxb, do, xb, int64(n), boolInt(over))
}

// SiLUMatMulBackward implements kernels.Backend: one kernel multiplies
// bf16 copies of dout and w on tensor cores and adds each tile of the
// product to dr just before SiLU's backward, so dh = dr + dout·w is never
// written (for x_proj: 100 MB less read and 100 MB less written per layer
// at 130m, batch 8 × 2048). With fp32 products (Options.MatMul "fp32") it
// is the two ops it stands for, through a scratch dh.
func (b *Backend) SiLUMatMulBackward(dx, dr, dout, w, x kernels.Buffer, Rw, N, K int) {
	const op = "silu_matmul_backward"
	c := b.check(kernels.OpSiLUMatMulBackward, []int{Rw, N, K}, fresh(dx), dr, dout, w, x)
	if !c.ok {
		return
	}
	dxb, drb, do, wb, xb, over := c.f[0], c.f[1], c.f[2], c.f[3], c.f[4], c.over[0]
	c.cond(Rw <= maxGridYZ*64, "Rw is too large for one launch")
	if !c.ok || dxb == nil || Rw*K == 0 {
		if over {
			b.Zero(dx) // still pending
		}
		return
	}
	if b.d.opt.MatMul != "bf16" {
		if over {
			b.Zero(dx) // for SiLUBackward to take
		}
		dh := b.Alloc(Rw * K)
		b.Copy(dh, dr)
		b.MatMulBackward(dh, nil, dout, x, w, Rw, N, K)
		b.SiLUBackward(dx, dh, x)
		return
	}
	d16, w16 := b.keptBF16(op, do), b.keptBF16(op, wb)
	b.launch(op, "bm_silu_matmul_bwd", dim{(K + 127) / 128, (Rw + 63) / 64, 1}, dim{256, 1, 1}, 0,
		dxb, drb, d16, w16, xb, Rw, N, K, boolInt(over))
}

// Conv1d implements kernels.Backend.
func (b *Backend) Conv1d(out, x, w, bias kernels.Buffer, B, T, E, K int) {
	c := b.check(kernels.OpConv1d, []int{B, T, E, K}, out, x, w, bias)
	if !c.ok {
		return
	}
	o, xb, wb, bb := c.f[0], c.f[1], c.f[2], c.f[3]
	kw := c.convWindow(K)
	if !c.ok || B*T*E == 0 {
		return
	}
	b.launch("conv1d", "bm_conv1d_fwd_k"+kw, b.convGrid(B*T, E), dim{256, 1, 1}, 0, o, xb, wb, bb, B, T, E, K, (*floats)(nil), (*shadow)(nil))
}

// Conv1dSiLU implements kernels.Backend (reference: Conv1d, then SiLU, as
// kernels/cpu does): the conv kernel writes SiLU(out) and its bf16 copy
// (x_proj's operand) beside out, with bm_silu_fwd's arithmetic, so the
// SiLU's own pass (reading out back, B·T·E·4 bytes) and its launch are gone.
func (b *Backend) Conv1dSiLU(out, act, x, w, bias kernels.Buffer, B, T, E, K int) {
	c := b.check(kernels.OpConv1dSiLU, []int{B, T, E, K}, out, act, x, w, bias)
	if !c.ok {
		return
	}
	o, a, xb, wb, bb := c.f[0], c.f[1], c.f[2], c.f[3], c.f[4]
	c.cond(!o.span().overlaps(a.span()) && !o.span().overlaps(xb.span()) && !a.span().overlaps(xb.span()), "out, act and x overlap")
	kw := c.convWindow(K)
	if !c.ok || B*T*E == 0 {
		return
	}
	b.launch("conv1d_silu", "bm_conv1d_fwd_k"+kw, b.convGrid(B*T, E), dim{256, 1, 1}, 0, o, xb, wb, bb, B, T, E, K, a, b.d.shadows.produce(a))
}

// convMaxK is the widest conv the CUDA kernels take (their largest
// register window, scan.cu).
const convMaxK = 32

// convWindow names the kernel instance for K taps: the smallest window of
// 4, 8, 16 or 32 rows that holds K; more than convMaxK fails the op.
func (c *checker) convWindow(K int) string {
	c.cond(K <= convMaxK, "K=%d is more than the %d taps the CUDA conv takes", K, convMaxK)
	for _, kw := range []int{4, 8, 16} {
		if K <= kw {
			return strconv.Itoa(kw)
		}
	}
	return "32"
}

// convGrid is the grid of the conv kernels: blocks of 256 channels by row
// segments, about 32 blocks per SM (scan.cu).
func (b *Backend) convGrid(rows, E int) dim {
	xb := (E + 255) / 256
	return dim{xb, max(1, min(rows, maxGridYZ, (32*max(1, b.d.info.SMs)+xb-1)/xb)), 1}
}

// conv1dRY mirrors BM_CONV_RY in scan.cu.
const conv1dRY = 8

// Conv1dBackward implements kernels.Backend. dx is a gather (one writer per
// element). dw and dbias sum over the B·T rows in two stages: P blocks of
// row segments per 32 channels write partial sums to scratch, then one
// thread per (e, k) adds the P partials (in a fixed order) into dw or dbias.
func (b *Backend) Conv1dBackward(dx, dw, dbias, dout, x, w kernels.Buffer, B, T, E, K int) {
	c := b.check(kernels.OpConv1dBackward, []int{B, T, E, K}, fresh(dx), dw, dbias, dout, x, w)
	if !c.ok {
		return
	}
	dxb, dwb, dbb, do, xb, wb, over := c.f[0], c.f[1], c.f[2], c.f[3], c.f[4], c.f[5], c.over[0]
	kw := c.convWindow(K)
	if !c.ok || E == 0 {
		return
	}
	rows := B * T
	if dxb != nil && rows > 0 && K > 0 {
		b.launch("conv1d_backward", "bm_conv1d_bwd_dx_k"+kw, b.convGrid(rows, E), dim{256, 1, 1}, 0, dxb, do, wb, B, T, E, K,
			boolInt(over), b.d.shadows.produce(dxb))
	} else if over {
		b.Zero(dxb) // still pending
	}
	if (dwb == nil || K == 0) && dbb == nil || rows == 0 {
		return
	}
	// About 256 rows per block (32 per thread), at most 64 blocks of rows.
	P := min(max((rows+255)/256, 1), 64)
	part := b.scratch(P * E * (K + 1))
	grid := dim{(E + 31) / 32, P, 1}
	b.launch("conv1d_backward", "bm_conv1d_bwd_wpart_k"+kw, grid, dim{32, conv1dRY, 1}, 0, part, do, xb, B, T, E, K)
	b.launch("conv1d_backward", "bm_conv1d_bwd_wsum", b.scanStrideGrid(E*(K+1)), dim{256, 1, 1}, 0, dwb, dbb, part, P, E, K)
}

// scanMaxN is the largest N the scan kernels take: 16 lanes per channel
// with at most 8 states each.
const scanMaxN = 128

// scanBuffers are the inputs of one SelectiveScan(Backward) call.
type scanBuffers struct{ x, dt, dtBias, Alog, Bm, Cm, Dskip, z *floats }

// scanInputs returns the inputs x to z of a checked scan call, from argument
// in on (kernels.OpSelectiveScan and OpSelectiveScanBackward), and fails
// the call when N is beyond the kernels.
func (c *checker) scanInputs(in, N int) scanBuffers {
	c.cond(N <= scanMaxN, "N=%d is more than the %d states per channel the CUDA scan keeps", N, scanMaxN)
	f := c.f[in:]
	return scanBuffers{x: f[0], dt: f[1], dtBias: f[2], Alog: f[3], Bm: f[4], Cm: f[5], Dskip: f[6], z: f[7]}
}

// scanVariant picks the generic kernel instance for N > 16: NP = ceil(N/16)
// states per lane (2, 4 or 8) and the backward chunk length L of that
// instance (BM_SCAN_KERNELS in scan.cu).
func scanVariant(N int) (fwd, bwd string, L int) {
	switch {
	case N <= 32:
		return "bm_selective_scan_fwd_np2", "bm_selective_scan_bwd_np2", 8
	case N <= 64:
		return "bm_selective_scan_fwd_np4", "bm_selective_scan_bwd_np4", 8
	default:
		return "bm_selective_scan_fwd_np8", "bm_selective_scan_bwd_np8", 4
	}
}

// scanChannels is the channels per block of the generic scan kernels (16
// channels × 16 lanes = 256 threads).
const scanChannels = 16

// The fast path for N ≤ 16 (the BM_SS_* constants of scan.cu): 32
// channels per block, 16 state slots per channel, forward tiles of 32 steps,
// backward sub-chunks of 8 steps and segments of 64.
const (
	scanFastN    = 16
	scanFastCh   = 32
	scanFastNL   = 16
	scanFastTile = 32
	scanFastL    = 8
	scanFastSeg  = 64
)

// scanFastWhole reports whether the N ≤ 16 kernels run one block per
// (32 channels, b) over all of T: when eb·B such blocks give every SM two
// or more (each SM holds three). Fewer leave the GPU short of work, and T
// splits into segments scanned in parallel at the cost of extra passes.
func scanFastWhole(eb, B, SMs int) bool { return eb*B >= 2*max(1, SMs) }

// scanOverlap reports whether two of the non-nil buffers share memory.
func scanOverlap(fs ...*floats) bool {
	for i, a := range fs {
		for _, c := range fs[i+1:] {
			if a != nil && c != nil && a.span().overlaps(c.span()) {
				return true
			}
		}
	}
	return false
}

// SelectiveScan implements kernels.Backend (the CPU's SelectiveScan).
// For N ≤ 16: blocks of 32 channels × 8 lanes (2 states each) of one
// sequence run a time segment each, staging tiles of x, dt, z, Bm, Cm in
// shared memory. When B·E/32 blocks leave the GPU short of work (fewer than
// 2 per SM, scanFastWhole), T is split into segments: a local pass from zero
// per segment and a fix-up over segments give each one its entering state
// first.
// Larger N: the generic kernels, one thread per (b, e, 16-lane slot of n),
// a sequential loop over t.
func (b *Backend) SelectiveScan(out, x, dt, dtBias, Alog, Bm, Cm, Dskip, z kernels.Buffer, B, T, E, N int) {
	c := b.check(kernels.OpSelectiveScan, []int{B, T, E, N}, out, x, dt, dtBias, Alog, Bm, Cm, Dskip, z)
	if !c.ok {
		return
	}
	o, s := c.f[0], c.scanInputs(1, N)
	if !c.ok || B*T*E == 0 {
		return
	}
	if N > scanFastN {
		fwd, _, _ := scanVariant(N)
		grid := dim{(E + scanChannels - 1) / scanChannels, B, 1}
		b.launch("selective_scan", fwd, grid, dim{256, 1, 1}, 0,
			o, s.x, s.dt, s.dtBias, s.Alog, s.Bm, s.Cm, s.Dskip, s.z, B, T, E, N)
		return
	}
	eb := (E + scanFastCh - 1) / scanFastCh
	tiles := (T + scanFastTile - 1) / scanFastTile
	nSeg := 1
	if !scanFastWhole(eb, B, b.d.info.SMs) {
		want := 2 * max(1, b.d.info.SMs)
		nSeg = min((want+eb*B-1)/(eb*B), tiles)
	}
	Ls := (tiles + nSeg - 1) / nSeg * scanFastTile
	nSeg = (T + Ls - 1) / Ls
	grid := dim{eb, nSeg, B}
	var hin *floats // nil: one segment, from h = 0
	if nSeg > 1 {
		hin = b.Alloc(B * nSeg * E * scanFastNL).(*floats)
		S := b.Alloc(B * nSeg * E).(*floats)
		b.launch("selective_scan", "bm_selective_scan_loc16", grid, dim{256, 1, 1}, 0,
			hin, S, s.x, s.dt, s.dtBias, s.Alog, s.Bm, B, T, E, N, Ls)
		b.launch("selective_scan", "bm_selective_scan_fix16", b.scanStrideGrid(B*E*scanFastNL), dim{256, 1, 1}, 0,
			hin, (*floats)(nil), S, s.Alog, B, E, N, nSeg)
	}
	b.launch("selective_scan", "bm_selective_scan_fwd16", grid, dim{256, 1, 1}, 0,
		o, s.x, s.dt, s.dtBias, s.Alog, s.Bm, s.Cm, s.Dskip, s.z, hin, B, T, E, N, Ls, b.d.shadows.produce(o))
}

// SelectiveScanBackward implements kernels.Backend (the CPU's
// SelectiveScanBackward). For N ≤ 16, when B·E/32 blocks fill the GPU
// (scanFastWhole) and dx, ddt, dz do not overlap: a forward pass stores the
// state entering every sub-chunk of 8 steps ([B][ceil(T/8)−1][E][16] floats
// of scratch, 2·B·T·E words), then one block per (32 channels, b) walks the
// sub-chunks in reverse, recomputing each one's states and back-propagating,
// the gradient of the state carried in registers. Otherwise T splits into
// segments of 64 steps: a local pass per segment (state from zero, and the
// gradient it would pass left) and a fix-up over segments give every segment
// its entering state and the gradient carried into it; then one block per
// (32 channels, segment, b) recomputes its states in sub-chunks of 8 and
// back-propagates. Sums over blocks (dBm, dCm over channel groups; dAlog,
// ddtBias, dDskip over b and segments) go to scratch and are added in a
// fixed order.
// Larger N: the generic kernel, which stores the state entering every chunk
// of L steps in scratch ([ceil(T/L)−1][B][E][N] floats), then walks the
// chunks in reverse, recomputing each chunk's states in registers.
func (b *Backend) SelectiveScanBackward(dx, ddt, ddtBias, dAlog, dBm, dCm, dDskip, dz, dout, x, dt, dtBias, Alog, Bm, Cm, Dskip, z kernels.Buffer, B, T, E, N int) {
	c := b.check(kernels.OpSelectiveScanBackward, []int{B, T, E, N},
		fresh(dx), fresh(ddt), ddtBias, dAlog, dBm, dCm, dDskip, fresh(dz), dout, x, dt, dtBias, Alog, Bm, Cm, Dskip, z)
	if !c.ok {
		return
	}
	g := c.f
	gx, gdt, gbias, gA, gB, gC, gD, gz, do := g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8]
	ox, odt, oz := c.over[0], c.over[1], c.over[7]
	s := c.scanInputs(9, N)
	if !c.ok || B*T*E == 0 {
		return
	}
	if gx == nil && gdt == nil && gbias == nil && gA == nil && gB == nil && gC == nil && gD == nil && gz == nil {
		return
	}
	// dx, ddt, dz pending a Zero (o*): the whole-sequence walk writes them
	// instead of adding (over); the other kernels add, so they are zeroed
	// first.
	over := boolInt(ox) | boolInt(odt)<<1 | boolInt(oz)<<2
	zeroTaken := func() {
		for _, g := range []struct {
			f    *floats
			over bool
		}{{gx, ox}, {gdt, odt}, {gz, oz}} {
			if g.over {
				b.zeroNow([]span{g.f.span()})
			}
		}
	}
	if N > scanFastN {
		zeroTaken()
		_, bwd, L := scanVariant(N)
		var ck *floats // nil (never read) when T fits one chunk
		if nC := (T + L - 1) / L; nC > 1 && N > 0 {
			ck = b.scratch((nC - 1) * B * E * N)
		}
		grid := dim{(E + scanChannels - 1) / scanChannels, B, 1}
		b.launch("selective_scan_backward", bwd, grid, dim{256, 1, 1}, 0,
			ck, gx, gdt, gbias, gA, gB, gC, gD, gz, do,
			s.x, s.dt, s.dtBias, s.Alog, s.Bm, s.Cm, s.Dskip, s.z, B, T, E, N)
		return
	}
	const op = "selective_scan_backward"
	eb := (E + scanFastCh - 1) / scanFastCh
	part := func(g *floats, n int) *floats {
		if g == nil || n == 0 {
			return nil
		}
		return b.scratch(n)
	}
	pB, pC := part(gB, eb*B*T*N), part(gC, eb*B*T*N)
	if scanFastWhole(eb, B, b.d.info.SMs) && !scanOverlap(gx, gdt, gz) {
		// The walk reads the old dx, ddt, dz of a sub-chunk before it
		// writes any, so they must not overlap.
		grid := dim{eb, B, 1}
		var ck *floats // nil (never read) when T fits one sub-chunk
		if nC := (T + scanFastL - 1) / scanFastL; nC > 1 {
			ck = b.scratch(B * (nC - 1) * E * scanFastNL)
			b.launch(op, "bm_selective_scan_ck16", grid, dim{256, 1, 1}, 0,
				ck, s.x, s.dt, s.dtBias, s.Alog, s.Bm, B, T, E, N)
		}
		pA := part(gA, B*E*N)
		pBias, pD := part(gbias, B*E), part(gD, B*E)
		b.launch(op, "bm_selective_scan_bwdw16", grid, dim{256, 1, 1}, 0,
			gx, gdt, gz, pB, pC, pA, pBias, pD, ck, do,
			s.x, s.dt, s.dtBias, s.Alog, s.Bm, s.Cm, s.Dskip, s.z, B, T, E, N, over,
			b.d.shadows.produce(gz), b.d.shadows.produce(gdt))
		b.scanSumParts(op, gB, pB, eb, B*T*N)
		b.scanSumParts(op, gC, pC, eb, B*T*N)
		b.scanSumParts(op, gA, pA, B, E*N)
		b.scanSumParts(op, gbias, pBias, B, E)
		b.scanSumParts(op, gD, pD, B, E)
		return
	}
	zeroTaken()
	nSeg := (T + scanFastSeg - 1) / scanFastSeg
	grid := dim{eb, nSeg, B}
	var hin, din *floats // nil: one segment, nothing carried
	if nSeg > 1 {
		hin = b.Alloc(B * nSeg * E * scanFastNL).(*floats)
		din = b.Alloc(B * nSeg * E * scanFastNL).(*floats)
		S := b.Alloc(B * nSeg * E).(*floats)
		b.launch(op, "bm_selective_scan_locq16", grid, dim{256, 1, 1}, 0,
			hin, din, S, s.x, s.dt, s.dtBias, s.Alog, s.Bm, s.Cm, s.z, do, B, T, E, N, scanFastSeg)
		b.launch(op, "bm_selective_scan_fix16", b.scanStrideGrid(B*E*scanFastNL), dim{256, 1, 1}, 0,
			hin, din, S, s.Alog, B, E, N, nSeg)
	}
	pA := part(gA, B*nSeg*E*N)
	pBias, pD := part(gbias, B*nSeg*E), part(gD, B*nSeg*E)
	b.launch(op, "bm_selective_scan_bwd16", grid, dim{256, 1, 1}, 0,
		gx, gdt, gz, pB, pC, pA, pBias, pD, hin, din, do,
		s.x, s.dt, s.dtBias, s.Alog, s.Bm, s.Cm, s.Dskip, s.z, B, T, E, N)
	b.scanSumParts(op, gB, pB, eb, B*T*N)
	b.scanSumParts(op, gC, pC, eb, B*T*N)
	b.scanSumParts(op, gA, pA, B*nSeg, E*N)
	b.scanSumParts(op, gbias, pBias, B*nSeg, E)
	b.scanSumParts(op, gD, pD, B*nSeg, E)
}

// scanSumParts adds the P partial sums part[p][0:n] into dst, in a fixed
// order; nothing when dst is nil.
func (b *Backend) scanSumParts(op string, dst, part *floats, P, n int) {
	if dst == nil || part == nil || n == 0 {
		return
	}
	b.launch(op, "bm_scan_sum_parts", dim{(n + 31) / 32, 1, 1}, dim{256, 1, 1}, 0, dst, part, P, int64(n))
}
