package cpu

import (
	"math"

	"gonum.org/v1/gonum/blas"

	"github.com/bmojo/bmojo/kernels"
)

// attnArgs are the validated slices of one Attention(Backward) call.
type attnArgs[F kernels.Float] struct {
	s                          kernels.AttnShape
	q, k, v, kf, vf, qm, km    []F
	mem                        [][]int32 // [b·nQC+c'] memory positions of query chunk c', ascending
	nQC                        int       // query chunks ceil(T/C) (1 when memory is off)
	maxKeys                    int       // upper bound on the keys of one query
	scale                      float64
	hasFading, hasMemory, okay bool
}

// attnInputs reads the attention inputs of a checked call, q to sel, from
// argument in on (kernels.OpAttention and OpAttentionBackward), checks sel's
// positions and gathers each query chunk's memory positions.
func attnInputs[F kernels.Float](c *checker[F], in int, s kernels.AttnShape) attnArgs[F] {
	a := attnArgs[F]{s: s}
	if !c.ok {
		return a
	}
	f := c.f[in:]
	a.q, a.k, a.v, a.kf, a.vf, a.qm, a.km = f[0], f[1], f[2], f[3], f[4], f[5], f[6]
	a.hasFading = s.Wf > 0
	a.hasMemory = s.M > 0
	a.nQC = 1
	if a.hasMemory {
		nC := s.T / s.C
		sl := c.i[in+7]
		for i, p := range sl {
			if int(p) >= s.T {
				c.failf("sel[%d]=%d out of range [0,T=%d)", i, p, s.T)
				return a
			}
		}
		a.nQC = (s.T + s.C - 1) / s.C
		a.mem = make([][]int32, s.B*a.nQC)
		for b := 0; b < s.B; b++ {
			for cq := 0; cq < a.nQC; cq++ {
				last := min(cq-s.Delta, nC-1)
				var list []int32
				// Walk back from the newest selection until M are found,
				// then reverse into position order.
				for ch := last; ch >= 0 && len(list) < s.M; ch-- {
					row := sl[(b*nC+ch)*s.S : (b*nC+ch+1)*s.S]
					for i := s.S - 1; i >= 0 && len(list) < s.M; i-- {
						if row[i] >= 0 {
							list = append(list, row[i])
						}
					}
				}
				for i, j := 0, len(list)-1; i < j; i, j = i+1, j-1 {
					list[i], list[j] = list[j], list[i]
				}
				a.mem[b*a.nQC+cq] = list
			}
		}
	}
	a.maxKeys = s.Wc + s.Wf + s.M
	a.scale = 1 / math.Sqrt(float64(s.D))
	a.okay = c.ok
	return a
}

// memList returns the memory positions visible to query (b,t).
func (a *attnArgs[F]) memList(b, t int) []int32 {
	if !a.hasMemory {
		return nil
	}
	return a.mem[b*a.nQC+t/a.s.C]
}

// ranges returns the context keys [c0,c1] and fading keys [f0,f1] of query
// t; an empty range has hi < lo.
func (a *attnArgs[F]) ranges(t int) (c0, c1, f0, f1 int) {
	c0, c1 = max(0, t-a.s.Wc+1), t
	f0, f1 = 0, -1
	if a.hasFading {
		f0, f1 = max(0, t-a.s.Wc-a.s.Wf+1), t-a.s.Wc
	}
	return
}

// vdot and vaxpy run gonum's SIMD level-1 kernels: at D=64 they measured
// 3-4× faster than the pure-Go loops (Sdot 10-14 ns vs 43-70 ns, Saxpy
// 21-27 ns vs 62-87 ns, BenchmarkDot64), which is most of attention's time.
func vdot[F kernels.Float](x, y []F) float64 {
	if is32[F]() {
		return float64(blasImpl.Sdot(len(x), as32(x), 1, as32(y), 1))
	}
	return blasImpl.Ddot(len(x), as64(x), 1, as64(y), 1)
}

// vaxpy sets y += a·x.
func vaxpy[F kernels.Float](a float64, x, y []F) {
	if is32[F]() {
		blasImpl.Saxpy(len(x), float32(a), as32(x), 1, as32(y), 1)
		return
	}
	blasImpl.Daxpy(len(x), a, as64(x), 1, as64(y), 1)
}

// gemv sets y = alpha·A·x + beta·y (trans: Aᵀ) for a row-major m×n A with
// leading dimension lda.
func gemv[F kernels.Float](trans bool, m, n int, a []F, lda int, x []F, beta float64, y []F) {
	t := blas.NoTrans
	if trans {
		t = blas.Trans
	}
	if is32[F]() {
		blasImpl.Sgemv(t, m, n, 1, as32(a), lda, as32(x), 1, float32(beta), as32(y), 1)
		return
	}
	blasImpl.Dgemv(t, m, n, 1, as64(a), lda, as64(x), 1, beta, as64(y), 1)
}

// ger sets A += x·yᵀ for a row-major m×n A with leading dimension lda.
func ger[F kernels.Float](m, n int, x, y, a []F, lda int) {
	if is32[F]() {
		blasImpl.Sger(m, n, 1, as32(x), 1, as32(y), 1, as32(a), lda)
		return
	}
	blasImpl.Dger(m, n, 1, as64(x), 1, as64(y), 1, as64(a), lda)
}

// keySet is one part's keys for one query as dense row-major matrices: n
// rows of width D, ld apart (G·D inside the [B,T,G,D] buffers, D for the
// gathered memory keys). dk and dv, when non-nil, are laid out the same.
type keySet[F kernels.Float] struct {
	n, ld  int
	k, v   []F
	dk, dv []F
}

// rows returns the n rows of buf that start at element off, ld apart.
func rows[F kernels.Float](buf []F, off, n, ld, D int) []F {
	if buf == nil || n == 0 {
		return nil
	}
	return buf[off : off+(n-1)*ld+D]
}

// attnScratch is one worker's per-query scratch.
type attnScratch[F kernels.Float] struct {
	sc     []float64 // scaled scores, then weights
	f1, f2 []F       // the same in F, for BLAS
}

func newAttnScratch[F kernels.Float](n int) *attnScratch[F] {
	return &attnScratch[F]{sc: make([]float64, n), f1: make([]F, n), f2: make([]F, n)}
}

// attnPart is one key set of one query row: its max scaled score m, Σ
// exp(score−m), and acc = Σ exp(score−m)·v. An empty part has m = −Inf.
type attnPart[F kernels.Float] struct {
	m, sum float64
	acc    []F
}

// partForward scores qv against ks's keys and fills p, with one BLAS-2
// call for the scores and one for the weighted values.
func partForward[F kernels.Float](p *attnPart[F], qv []F, ks keySet[F], D int, scale float64, w *attnScratch[F]) {
	p.m, p.sum = math.Inf(-1), 0
	if ks.n == 0 {
		return
	}
	sc, f := w.sc[:ks.n], w.f1[:ks.n]
	gemv(false, ks.n, D, ks.k, ks.ld, qv, 0, f)
	for i, x := range f {
		sc[i] = float64(x) * scale
		p.m = max(p.m, sc[i])
	}
	expInto[F](sc, sc, 1, p.m)
	for i, x := range sc {
		p.sum += x
		f[i] = F(x)
	}
	gemv(true, ks.n, D, ks.v, ks.ld, f, 0, p.acc)
}

// memGather copies the memory keys and values of one memory list into
// dense [len,D] scratch so memory parts use the same BLAS-2 path as the
// contiguous windows. The list is the same for every query of a chunk, so
// the gather (and, in the backward pass, the scatter-add of the gathered
// gradients back into dkm and dv) happens once per chunk and head.
type memGather[F kernels.Float] struct {
	km, v, dkm, dv   []F // sources and gradient destinations ([B,T,G,D])
	kbase, stride, D int
	list             []int32 // the loaded list; nil when none
	k, gv, gdk, gdv  []F     // gathered [M,D] rows and their gradients
}

func newMemGather[F kernels.Float](a *attnArgs[F], dkm, dv []F, kbase int) *memGather[F] {
	M, D := a.s.M, a.s.D
	g := &memGather[F]{km: a.km, v: a.v, dkm: dkm, dv: dv, kbase: kbase, stride: a.s.G * D, D: D,
		k: make([]F, M*D), gv: make([]F, M*D)}
	if dkm != nil {
		g.gdk = make([]F, M*D)
	}
	if dv != nil {
		g.gdv = make([]F, M*D)
	}
	return g
}

// keys returns list's keys, gathering them (after flushing the previous
// list's gradients) unless list is the one already loaded.
func (g *memGather[F]) keys(list []int32) keySet[F] {
	D := g.D
	if len(list) != len(g.list) || (len(list) > 0 && &list[0] != &g.list[0]) {
		g.flush()
		g.list = list
		for i, j := range list {
			o := g.kbase + int(j)*g.stride
			copy(g.k[i*D:(i+1)*D], g.km[o:o+D])
			copy(g.gv[i*D:(i+1)*D], g.v[o:o+D])
		}
	}
	n := len(list)
	return keySet[F]{n: n, ld: D, k: rows(g.k, 0, n, D, D), v: rows(g.gv, 0, n, D, D),
		dk: rows(g.gdk, 0, n, D, D), dv: rows(g.gdv, 0, n, D, D)}
}

// flush adds the gathered gradients into dkm and dv and clears them.
func (g *memGather[F]) flush() {
	D, n := g.D, len(g.list)
	for i, j := range g.list {
		o := g.kbase + int(j)*g.stride
		if g.gdk != nil {
			vaxpy(1, g.gdk[i*D:(i+1)*D], g.dkm[o:o+D])
		}
		if g.gdv != nil {
			vaxpy(1, g.gdv[i*D:(i+1)*D], g.dv[o:o+D])
		}
	}
	if g.gdk != nil {
		clear(g.gdk[:n*D])
	}
	if g.gdv != nil {
		clear(g.gdv[:n*D])
	}
	g.list = nil
}

// windowKeys returns the keys at positions [lo,hi] of the [B,T,G,D]
// buffers k, v (and gradients dk, dv) for the row base kbase.
func windowKeys[F kernels.Float](k, v, dk, dv []F, lo, hi, kbase, stride, D int) keySet[F] {
	if hi < lo {
		return keySet[F]{}
	}
	n, off := hi-lo+1, kbase+lo*stride
	return keySet[F]{n: n, ld: stride, k: rows(k, off, n, stride, D), v: rows(v, off, n, stride, D),
		dk: rows(dk, off, n, stride, D), dv: rows(dv, off, n, stride, D)}
}

// Attention implements kernels.Backend: each query row computes its
// context, fading and memory parts separately and merges them exactly with
// log-sum-exp (docs/model.md §4).
func (be *Backend[F]) Attention(out, lse, q, k, v, kf, vf, qm, km kernels.Buffer, sel kernels.IntBuffer, s kernels.AttnShape) {
	c := be.check(kernels.OpAttention, s.Dims(), out, lse, q, k, v, kf, vf, qm, km, sel)
	a := attnInputs(c, 2, s)
	if !a.okay {
		return
	}
	o, ls := c.f[0], c.f[1]
	D, kstride := s.D, s.G*s.D
	parallelDyn(s.B*s.H, s.T*a.maxKeys*s.D*2, func(_, bh int) {
		b, h := bh/s.H, bh%s.H
		g := h * s.G / s.H
		w := newAttnScratch[F](a.maxKeys)
		kbase := b*s.T*kstride + g*D
		var mem *memGather[F]
		if a.hasMemory {
			mem = newMemGather(&a, nil, nil, kbase)
		}
		var parts [3]attnPart[F]
		for i := range parts {
			parts[i].acc = make([]F, D)
		}
		for t := 0; t < s.T; t++ {
			qo := ((b*s.T+t)*s.H + h) * D
			qv := a.q[qo : qo+D]
			c0, c1, f0, f1 := a.ranges(t)
			partForward(&parts[0], qv, windowKeys(a.k, a.v, nil, nil, c0, c1, kbase, kstride, D), D, a.scale, w)
			partForward(&parts[1], qv, windowKeys(a.kf, a.vf, nil, nil, f0, f1, kbase, kstride, D), D, a.scale, w)
			parts[2].m = math.Inf(-1)
			if ml := a.memList(b, t); len(ml) > 0 {
				partForward(&parts[2], a.qm[qo:qo+D], mem.keys(ml), D, a.scale, w)
			}
			mx := math.Inf(-1)
			for _, p := range parts {
				mx = max(mx, p.m)
			}
			var tot float64
			var wts [3]float64
			for i, p := range parts {
				if p.m > math.Inf(-1) {
					wts[i] = math.Exp(p.m - mx)
					tot += p.sum * wts[i]
				}
			}
			or := o[qo : qo+D]
			for d := range or {
				var x float64
				for i, p := range parts {
					if wts[i] != 0 {
						x += float64(p.acc[d]) * wts[i]
					}
				}
				or[d] = F(x / tot)
			}
			ls[(b*s.T+t)*s.H+h] = F(mx + math.Log(tot))
		}
	})
}

// attnGrad holds the gradient outputs of one AttentionBackward call.
type attnGrad[F kernels.Float] struct {
	dq, dk, dv, dkf, dvf, dqm, dkm []F
}

// partBackward adds one key set's contribution to the gradients of query
// row qv: p = exp(score − lse), dv += p·dout, dscore = p·(dout·v − dout·out),
// dq += dscore·k/√D, dk += dscore·q/√D; two gemv for the scores and
// dout·v, one gemv for dq and one rank-1 update each for dk and dv.
func partBackward[F kernels.Float](qv, dout []F, ks keySet[F], dqacc []F, D int, scale, lse, dd float64, w *attnScratch[F]) {
	if ks.n == 0 {
		return
	}
	sc, p, ds := w.sc[:ks.n], w.f1[:ks.n], w.f2[:ks.n]
	gemv(false, ks.n, D, ks.k, ks.ld, qv, 0, p)
	for i, x := range p {
		sc[i] = float64(x)
	}
	expInto[F](sc, sc, scale, lse)
	gemv(false, ks.n, D, ks.v, ks.ld, dout, 0, ds) // dout·v_i
	for i, pi := range sc {
		p[i] = F(pi)
		ds[i] = F(pi * (float64(ds[i]) - dd) * scale)
	}
	if ks.dv != nil {
		ger(ks.n, D, p, dout, ks.dv, ks.ld)
	}
	if dqacc != nil {
		gemv(true, ks.n, D, ks.k, ks.ld, ds, 1, dqacc)
	}
	if ks.dk != nil {
		ger(ks.n, D, ds, qv, ks.dk, ks.ld)
	}
}

// AttentionBackward implements kernels.Backend. Work is split over (b, kv
// head) so that the key/value gradients of a kv head, written by every
// query head of its group, have one writer: no locks or cross-worker
// reductions, and the result does not depend on the worker count. (With
// B·G below the worker count some cores idle; the model's presets have
// G = H.)
func (be *Backend[F]) AttentionBackward(dq, dk, dv, dkf, dvf, dqm, dkm, dout, out, lse, q, k, v, kf, vf, qm, km kernels.Buffer, sel kernels.IntBuffer, s kernels.AttnShape) {
	c := be.check(kernels.OpAttentionBackward, s.Dims(), dq, dk, dv, dkf, dvf, dqm, dkm, dout, out, lse, q, k, v, kf, vf, qm, km, sel)
	a := attnInputs(c, 10, s)
	if !a.okay {
		return
	}
	g := c.f
	gr := attnGrad[F]{dq: g[0], dk: g[1], dv: g[2], dkf: g[3], dvf: g[4], dqm: g[5], dkm: g[6]}
	do, os, ls := g[7], g[8], g[9]
	D, kstride := s.D, s.G*s.D
	perGroup := (s.H + s.G - 1) / s.G
	parallelDyn(s.B*s.G, perGroup*s.T*a.maxKeys*s.D*4, func(_, bg int) {
		b, g := bg/s.G, bg%s.G
		w := newAttnScratch[F](a.maxKeys)
		dqacc := make([]F, D)
		dqmacc := make([]F, D)
		kbase := b*s.T*kstride + g*D
		var mem *memGather[F]
		if a.hasMemory {
			mem = newMemGather(&a, gr.dkm, gr.dv, kbase)
		}
		for h := 0; h < s.H; h++ {
			if h*s.G/s.H != g {
				continue
			}
			for t := 0; t < s.T; t++ {
				qo := ((b*s.T+t)*s.H + h) * D
				qv, dov := a.q[qo:qo+D], do[qo:qo+D]
				dd := vdot(dov, os[qo:qo+D])
				l := float64(ls[(b*s.T+t)*s.H+h])
				var dqa, dqma []F
				if gr.dq != nil {
					dqa = dqacc
					clear(dqa)
				}
				if gr.dqm != nil {
					dqma = dqmacc
					clear(dqma)
				}
				c0, c1, f0, f1 := a.ranges(t)
				partBackward(qv, dov, windowKeys(a.k, a.v, gr.dk, gr.dv, c0, c1, kbase, kstride, D), dqa, D, a.scale, l, dd, w)
				partBackward(qv, dov, windowKeys(a.kf, a.vf, gr.dkf, gr.dvf, f0, f1, kbase, kstride, D), dqa, D, a.scale, l, dd, w)
				if ml := a.memList(b, t); len(ml) > 0 {
					partBackward(a.qm[qo:qo+D], dov, mem.keys(ml), dqma, D, a.scale, l, dd, w)
				}
				if dqa != nil {
					vaxpy(1, dqa, gr.dq[qo:qo+D])
				}
				if dqma != nil {
					vaxpy(1, dqma, gr.dqm[qo:qo+D])
				}
			}
		}
		if mem != nil {
			mem.flush()
		}
	})
}
