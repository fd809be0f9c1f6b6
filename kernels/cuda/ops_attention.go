//go:build cuda

package cuda

import (
	"fmt"
	"math"

	"github.com/bmojo/bmojo/kernels"
)

// Attention, RoPE, ShiftRows, Innovation and SelectChunks; kernels in
// csrc/attention.cu (its header comment describes the tiling).

// attnMaxD is the widest head the attention kernels take: a forward/dq
// thread keeps 32 dims of a query row and up to 4 threads share one row.
const attnMaxD = 128

// attnQT is the query tile of the forward and dq kernels (BM_ATTN_QT).
const attnQT = 64

// attnKNT is the block size of the dk/dv kernels (BM_ATTN_KNT); a block
// covers attnKNT·16/DM keys.
const attnKNT = 256

// The tensor-core kernels (csrc/attention.cu, "tensor-core attention"): a
// block of attnTCThreads threads covers attnTCRows queries (forward, dq) or
// keys (dk/dv), for padded head widths up to attnTCMaxDM.
const (
	attnTCRows    = 64  // BM_TC_T
	attnTCThreads = 128 // BM_TC_NT
	attnTCMaxDM   = 64
)

// maxGridYZ is CUDA's limit on gridDim.y and gridDim.z.
const maxGridYZ = 65535

// attnArgs are the checked buffers of one Attention(Backward) call and the
// kernel arguments derived from its shape.
type attnArgs struct {
	q, k, v, kf, vf, qm, km *floats
	sel                     *ints
	// d is the head width, dm the padded head width of the kernels (32,
	// 64 or 128).
	d, dm int
	// Bounds capped to T so nothing overflows a C int; every capped value
	// selects the same keys as the original.
	wc, wf, cc, delta int
	nC, nCS, m        int // complete chunks, sel row length nC·S, memory keys (0 = none)
	scale             float32
}

// attnInputs returns the attention inputs of a checked call, q to sel, from
// argument in on (kernels.OpAttention and OpAttentionBackward), with the
// bounds the kernels take; nil when the call failed, or the shape is
// beyond the CUDA kernels.
func attnInputs(c *checker, in int, s kernels.AttnShape) *attnArgs {
	if !c.ok {
		return nil
	}
	c.cond(s.D <= attnMaxD, "head width D=%d exceeds the CUDA kernels' limit of %d", s.D, attnMaxD)
	c.cond(s.B <= maxGridYZ && s.H <= maxGridYZ, "B=%d, H=%d: the CUDA grid takes at most %d of each", s.B, s.H, maxGridYZ)
	if !c.ok {
		return nil
	}
	f := c.f[in:]
	a := &attnArgs{q: f[0], k: f[1], v: f[2], kf: f[3], vf: f[4], qm: f[5], km: f[6], sel: c.i[in+7]}
	if s.M > 0 {
		a.nC = s.T / s.C
		a.nCS = a.nC * s.S
		a.m = min(s.M, a.nCS)
		a.cc = min(s.C, s.T+1)
		a.delta = min(s.Delta, s.T+1)
	}
	a.d, a.dm = s.D, 32
	for a.dm < s.D {
		a.dm *= 2
	}
	a.wc = min(s.Wc, s.T)
	if s.Wf > 0 {
		a.wf = min(s.Wf, s.T)
	}
	if a.cc == 0 {
		a.cc = 1 // unused without memory keys, but never a divisor of 0
	}
	a.scale = float32(1 / math.Sqrt(float64(s.D)))
	return a
}

// AttentionBF16 tells the conformance suite that attention rounds the
// operands of its matrix products (q, k, v, dout, and the probabilities and
// score gradients) to bfloat16 and accumulates in float32: true when the
// backend computes matrix products in bf16.
func (b *Backend) AttentionBF16() bool { return b.d.opt.MatMul == "bf16" }

// attnTC reports whether a call takes the tensor-core kernels: bf16 matrix
// products and a padded head width they cover; other calls take the fp32
// CUDA-core kernels.
func (b *Backend) attnTC(a *attnArgs) bool { return b.AttentionBF16() && a.dm <= attnTCMaxDM }

// attnMemIndex builds the memory-key index on the device (sel positions
// outside [0,T) are reported there): comp [B, nC·S] the valid selections in
// chunk order, pre [B, nC+1] their prefix counts per chunk, dup set when a
// position may repeat. It runs whenever M > 0, so bad sel is always caught.
func (b *Backend) attnMemIndex(op string, a *attnArgs, s kernels.AttnShape) (comp, pre, dup *ints) {
	comp = b.AllocInt(s.B * a.nCS).(*ints)
	pre = b.AllocInt(s.B * (a.nC + 1)).(*ints)
	dup = b.AllocInt(1).(*ints)
	b.launch(op, "bm_attn_mem_index", dim{s.B, 1, 1}, dim{256, 1, 1}, 0, comp, pre, dup, a.sel, a.nC, s.S, s.T, b.status)
	return comp, pre, dup
}

// Attention implements kernels.Backend: one block per (64 queries, head,
// sequence) runs one online softmax over the context, fading and memory
// keys, staged through shared memory 32 keys at a time (fp32), or, for the
// tensor-core kernels (attnTC), 64 at a time with cp.async from bf16 copies
// of the keys and values made first (attnConv), double-buffered.
func (b *Backend) Attention(out, lse, q, k, v, kf, vf, qm, km kernels.Buffer, sel kernels.IntBuffer, s kernels.AttnShape) {
	const op = "attention"
	c := b.check(kernels.OpAttention, s.Dims(), out, lse, q, k, v, kf, vf, qm, km, sel)
	a := attnInputs(c, 2, s)
	if a == nil || s.B*s.T == 0 {
		return
	}
	o, ls := c.f[0], c.f[1]
	var comp, pre *ints
	if s.M > 0 {
		comp, pre, _ = b.attnMemIndex(op, a, s)
	}
	if b.attnTC(a) {
		cv := b.attnConverter(op, a)
		kr := s.B * s.T * s.G
		k16, v16, kf16, vf16, km16 := cv.bf16(a.k, kr), cv.bf16(a.v, kr), cv.bf16(a.kf, kr), cv.bf16(a.vf, kr), any((*floats)(nil))
		if a.m > 0 {
			km16 = cv.bf16(a.km, kr)
		}
		b.launch(op, fmt.Sprintf("bm_attn_fwd_tc_d%d", a.dm), dim{(s.T + attnTCRows - 1) / attnTCRows, s.H, s.B}, dim{attnTCThreads, 1, 1}, 0,
			o, ls, a.q, k16, v16, kf16, vf16, a.qm, km16, comp, pre,
			s.T, s.H, s.G, s.D, a.wc, a.wf, a.cc, a.m, a.delta, a.nC, a.nCS, a.scale, b.d.shadows.produce(o))
		return
	}
	b.launch(op, fmt.Sprintf("bm_attn_fwd_d%d", a.dm), dim{(s.T + attnQT - 1) / attnQT, s.H, s.B}, dim{attnQT * a.dm / 32, 1, 1}, 0,
		o, ls, a.q, a.k, a.v, a.kf, a.vf, a.qm, a.km, comp, pre,
		s.T, s.H, s.G, s.D, a.wc, a.wf, a.cc, a.m, a.delta, a.nC, a.nCS, a.scale)
}

// attnConv makes the padded bf16 copies the tensor-core kernels stage
// with cp.async (csrc/attention.cu, bm_attn_to_bf16): rows of D floats
// become rows of dm bf16 (zeros beyond D), held in a float32 buffer of half
// the length. A buffer passed twice (km = k, qm = q) is converted once.
type attnConv struct {
	b    *Backend
	op   string
	d    int
	dm   int
	done map[attnConvKey]any
}

type attnConvKey struct {
	ptr  devptr
	rows int
}

func (b *Backend) attnConverter(op string, a *attnArgs) *attnConv {
	return &attnConv{b: b, op: op, d: a.d, dm: a.dm, done: map[attnConvKey]any{}}
}

// bf16 returns the copy of x [rows, D] (nil for nil). Unpadded copies
// (D = dm) are the kept copies of shadow.go, shared with the backward and
// with matrix products, and written beside x by RoPE.
func (c *attnConv) bf16(x *floats, rows int) any {
	if x == nil {
		return (*floats)(nil)
	}
	if c.d == c.dm && x.n == rows*c.d {
		return c.b.keptBF16(c.op, x)
	}
	key := attnConvKey{x.ptr, rows}
	if y, ok := c.done[key]; ok {
		return y
	}
	y := c.b.scratch(rows * c.dm / 2)
	c.b.launch(c.op, fmt.Sprintf("bm_attn_to_bf16_d%d", c.dm), grid1(rows*c.dm/2, 256), dim{256, 1, 1}, 0, y, x, int64(rows), c.d)
	c.done[key] = y
	return y
}

// AttentionBackward implements kernels.Backend. dq and dqm are query-centric
// (one kernel, the same thread adds both, so they may alias); dk/dv of the
// context keys, dkf/dvf of the fading keys and dkm/dv of the memory keys are
// key-centric, each key summing over the queries (of every head of its kv
// group) that see it, in three launches in that order on the one stream: dv
// and an aliased dkm = dk are added to one launch after another, without
// atomics.
func (b *Backend) AttentionBackward(dq, dk, dv, dkf, dvf, dqm, dkm, dout, out, lse, q, k, v, kf, vf, qm, km kernels.Buffer, sel kernels.IntBuffer, s kernels.AttnShape) {
	const op = "attention_backward"
	// The gradients pending a Zero that a launch below writes whole are
	// overwritten instead (over); the rest are zeroed before it (flush).
	c := b.check(kernels.OpAttentionBackward, s.Dims(), fresh(dq), fresh(dk), fresh(dv), fresh(dkf), fresh(dvf), dqm, dkm,
		dout, out, lse, q, k, v, kf, vf, qm, km, sel)
	a := attnInputs(c, 10, s)
	if a == nil {
		return
	}
	g := c.f
	gq, gk, gv, gkf, gvf, gqm, gkm, do, os, ls := g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9]
	fq, fk, fv, fkf, fvf := c.over[0], c.over[1], c.over[2], c.over[3], c.over[4]
	pending := [5]bool{fq, fk, fv, fkf, fvf}
	flush := func(over ...bool) { // the pending gradients no launch overwrites
		for i, g := range []*floats{gq, gk, gv, gkf, gvf} {
			if pending[i] && !over[i] {
				b.zeroNow([]span{g.span()})
			}
		}
	}
	c.cond(s.G <= maxGridYZ, "G=%d: the CUDA grid takes at most %d", s.G, maxGridYZ)
	if !c.ok {
		return
	}
	if s.B*s.T == 0 {
		flush(false, false, false, false, false)
		return
	}
	var comp, pre, dup *ints
	if s.M > 0 {
		comp, pre, dup = b.attnMemIndex(op, a, s)
	}
	hasMem := a.m > 0
	if !hasMem {
		gqm, gkm = nil, nil
	}
	if gq == nil && gk == nil && gv == nil && gkf == nil && gvf == nil && gqm == nil && gkm == nil {
		flush(false, false, false, false, false)
		return
	}
	// dd = Σ dout·out per query row.
	rows := s.B * s.T * s.H
	dd := b.scratch(rows)
	if !b.attnTC(a) {
		b.launch(op, "bm_attn_bwd_dot", grid1(rows, 8), dim{256, 1, 1}, 0, dd, do, os, rows, s.D)
	}

	doK := gk != nil || gv != nil                 // context keys: queries [j, j+Wc-1]
	doF := a.wf > 0 && (gkf != nil || gvf != nil) // fading keys: queries [j+Wc, j+Wc+Wf-1]
	doM := hasMem && (gkm != nil || gv != nil)    // memory keys, after the context launch (dv, dkm = dk)
	kgrid := func(keys, kt int) dim { return dim{(keys + kt - 1) / kt, s.G, s.B} }
	if b.attnTC(a) {
		// The query-centric dq launch writes every row of dq, the context
		// and fading launches every key of dk, dv and dkf, dvf: they take
		// the pending Zeros (the memory launch then adds to dk and dv).
		flush(gq != nil, doK, doK, doF, doF)
		// The operands staged as tiles, as padded bf16 copies: k, v, kf,
		// vf, km for dq; q, qm, dout for dk/dv (dout's written by the dd
		// kernel, which reads it anyway).
		cv := b.attnConverter(op, a)
		kr, qr := s.B*s.T*s.G, s.B*s.T*s.H
		do16 := b.scratch(qr * a.dm / 2)
		cv.done[attnConvKey{do.ptr, qr}] = do16
		b.launch(op, fmt.Sprintf("bm_attn_bwd_dot_bf16_d%d", a.dm), grid1(rows, 8), dim{256, 1, 1}, 0, dd, do16, do, os, rows, s.D)
		if gq != nil || gqm != nil {
			var kf16, vf16, km16 any = (*floats)(nil), (*floats)(nil), (*floats)(nil)
			if gq != nil {
				kf16, vf16 = cv.bf16(a.kf, kr), cv.bf16(a.vf, kr)
			}
			if gqm != nil {
				km16 = cv.bf16(a.km, kr)
			}
			b.launch(op, fmt.Sprintf("bm_attn_bwd_dq_tc_d%d", a.dm), dim{(s.T + attnTCRows - 1) / attnTCRows, s.H, s.B}, dim{attnTCThreads, 1, 1}, 0,
				gq, gqm, do, ls, dd, a.q, cv.bf16(a.k, kr), cv.bf16(a.v, kr), kf16, vf16, a.qm, km16, comp, pre,
				s.T, s.H, s.G, s.D, a.wc, a.wf, a.cc, a.m, a.delta, a.nC, a.nCS, a.scale, boolInt(fq))
		}
		dkv, block := fmt.Sprintf("bm_attn_bwd_dkv_tc_d%d", a.dm), dim{attnTCThreads, 1, 1}
		if doK {
			b.launch(op, dkv, kgrid(s.T, attnTCRows), block, 0,
				gk, gv, a.k, a.v, cv.bf16(a.q, qr), do16, ls, dd, s.T, s.H, s.G, s.D, 0, a.wc-1, a.scale, boolInt(fk)|boolInt(fv)<<1)
		}
		if doF {
			b.launch(op, dkv, kgrid(s.T, attnTCRows), block, 0,
				gkf, gvf, a.kf, a.vf, cv.bf16(a.q, qr), do16, ls, dd, s.T, s.H, s.G, s.D, a.wc, a.wc+a.wf-1, a.scale, boolInt(fkf)|boolInt(fvf)<<1)
		}
		if doM {
			b.launch(op, fmt.Sprintf("bm_attn_bwd_dkv_mem_tc_d%d", a.dm), kgrid(a.nCS, attnTCRows), block, 0,
				gkm, gv, a.km, a.v, cv.bf16(a.qm, qr), do16, ls, dd, comp, pre, dup, s.T, s.H, s.G, s.D, a.cc, a.m, a.delta, a.nC, a.nCS, a.scale)
		}
		return
	}
	flush(false, false, false, false, false)
	if gq != nil || gqm != nil {
		b.launch(op, fmt.Sprintf("bm_attn_bwd_dq_d%d", a.dm), dim{(s.T + attnQT - 1) / attnQT, s.H, s.B}, dim{attnQT * a.dm / 32, 1, 1}, 0,
			gq, gqm, do, ls, dd, a.q, a.k, a.v, a.kf, a.vf, a.qm, a.km, comp, pre,
			s.T, s.H, s.G, s.D, a.wc, a.wf, a.cc, a.m, a.delta, a.nC, a.nCS, a.scale)
	}
	kt := attnKNT * 16 / a.dm // keys per dk/dv block
	block := dim{attnKNT, 1, 1}
	if doK {
		b.launch(op, fmt.Sprintf("bm_attn_bwd_dkv_d%d", a.dm), kgrid(s.T, kt), block, 0,
			gk, gv, a.k, a.v, a.q, do, ls, dd, s.T, s.H, s.G, s.D, 0, a.wc-1, a.scale)
	}
	if doF {
		b.launch(op, fmt.Sprintf("bm_attn_bwd_dkv_d%d", a.dm), kgrid(s.T, kt), block, 0,
			gkf, gvf, a.kf, a.vf, a.q, do, ls, dd, s.T, s.H, s.G, s.D, a.wc, a.wc+a.wf-1, a.scale)
	}
	if doM {
		b.launch(op, fmt.Sprintf("bm_attn_bwd_dkv_mem_d%d", a.dm), kgrid(a.nCS, kt), block, 0,
			gkm, gv, a.km, a.v, a.qm, do, ls, dd, comp, pre, dup, s.T, s.H, s.G, s.D, a.cc, a.m, a.delta, a.nC, a.nCS, a.scale)
	}
}

// rope is RoPE (sign 1, overwrite) and its backward (sign −1, accumulate).
func (b *Backend) rope(op *kernels.Op, out, x kernels.Buffer, B, T, nh, D int, theta, sign float64, accumulate bool) {
	c := b.check(op, []int{B, T, nh, D}, fresh(out), x) // x is read first: a pending Zero of x is done
	n := B * T * nh * D
	if !c.ok || c.f[0] == nil || n == 0 {
		return
	}
	o, xs, zeroed := c.f[0], c.f[1], c.over[0]
	pairs := B * T * (D / 2)
	acc := 0
	if accumulate && !zeroed {
		acc = 1
	}
	b.launch(op.Name, "bm_rope", grid1(pairs, 256), dim{256, 1, 1}, 0, o, xs, T, nh, D, theta, sign, acc, int64(pairs), b.d.shadows.produce(o))
}

// RoPE implements kernels.Backend. out may alias x.
func (b *Backend) RoPE(out, x kernels.Buffer, B, T, nh, D int, theta float64) {
	b.rope(kernels.OpRoPE, out, x, B, T, nh, D, theta, 1, false)
}

// RoPEBackward implements kernels.Backend.
func (b *Backend) RoPEBackward(dx, dout kernels.Buffer, B, T, nh, D int, theta float64) {
	b.rope(kernels.OpRoPEBackward, dx, dout, B, T, nh, D, theta, -1, true)
}

// ShiftRows implements kernels.Backend. out may alias x: x is then staged
// through a copy, since the rows of one sequence shift in parallel.
func (b *Backend) ShiftRows(out, x kernels.Buffer, B, T, d int) {
	const op = "shift_rows"
	c := b.check(kernels.OpShiftRows, []int{B, T, d}, out, x)
	n := B * T * d
	if !c.ok || n == 0 {
		return
	}
	o, xs := c.f[0], c.f[1]
	if o.span().overlaps(xs.span()) {
		tmp := b.Alloc(n).(*floats)
		b.Copy(tmp, xs)
		xs = tmp
	}
	rows := B * T
	b.launch(op, "bm_shift_rows", dim{min(rows, 64*max(1, b.d.info.SMs)), 1, 1}, dim{256, 1, 1}, 0, o, xs, T, d, int64(rows), b.d.shadows.produce(o))
}

// Innovation implements kernels.Backend: one warp per row, float64 sums.
func (b *Backend) Innovation(e, u, p kernels.Buffer, Rw, d int) {
	const op = "innovation"
	c := b.check(kernels.OpInnovation, []int{Rw, d}, e, u, p)
	if !c.ok || Rw == 0 {
		return
	}
	es, us, ps := c.f[0], c.f[1], c.f[2]
	b.launch(op, "bm_innovation", grid1(Rw, 8), dim{256, 1, 1}, 0, es, us, ps, Rw, d)
}

// InnovationBackward implements kernels.Backend: one block per row.
func (b *Backend) InnovationBackward(dp, de, u, p kernels.Buffer, Rw, d int) {
	const op = "innovation_backward"
	c := b.check(kernels.OpInnovationBackward, []int{Rw, d}, fresh(dp), de, u, p)
	if !c.ok || c.f[0] == nil || Rw == 0 {
		return
	}
	dps, des, us, ps, over := c.f[0], c.f[1], c.f[2], c.f[3], c.over[0]
	threads := min(256, (d+31)/32*32)
	b.launch(op, "bm_innovation_backward", dim{Rw, 1, 1}, dim{threads, 1, 1}, 0, dps, des, us, ps, d,
		boolInt(over), b.d.shadows.produce(dps))
}

// SelectChunks implements kernels.Backend: one block per (chunk, sequence)
// ranks the chunk's e (O(C²) comparisons from shared memory) and writes the
// top S in position order.
func (b *Backend) SelectChunks(sel kernels.IntBuffer, e kernels.Buffer, B, T, C, S int) {
	const op = "select_chunks"
	c := b.check(kernels.OpSelectChunks, []int{B, T, C, S}, sel, e)
	if !c.ok {
		return
	}
	c.cond(B <= maxGridYZ, "B=%d: the CUDA grid takes at most %d", B, maxGridYZ)
	nC := T / C
	if !c.ok || B*nC*S == 0 {
		return
	}
	ss, es := c.i[0], c.f[1]
	b.launch(op, "bm_select_chunks", dim{nC, B, 1}, dim{256, 1, 1}, 0, ss, es, T, C, S, nC, b.status)
}
