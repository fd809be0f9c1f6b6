package cpu

import (
	"math"
	"runtime"
	"slices"

	"github.com/bmojo/bmojo/kernels"
)

// Embedding implements kernels.Backend.
func (be *Backend[F]) Embedding(out, table kernels.Buffer, tokens kernels.IntBuffer, Rw, d int) {
	c := be.check(kernels.OpEmbedding, []int{Rw, d}, out, table, tokens)
	if !c.ok || d == 0 || !c.tokensIn(len(c.f[1])/d) {
		return
	}
	o, tab, tok := c.f[0], c.f[1], c.i[2]
	parallel(Rw, d, func(_, lo, hi int) {
		for r := lo; r < hi; r++ {
			t := int(tok[r])
			copy(o[r*d:(r+1)*d], tab[t*d:(t+1)*d])
		}
	})
}

// tokensIn reports whether every token (argument 2 of the embedding ops)
// indexes one of the table's V rows, recording the first that does not.
func (c *checker[F]) tokensIn(V int) bool {
	for r, tk := range c.i[2] {
		if tk < 0 || int(tk) >= V {
			c.failf("tokens[%d]=%d out of range [0,%d)", r, tk, V)
			return false
		}
	}
	return true
}

// EmbeddingBackward implements kernels.Backend. Tokens repeat, so workers
// split the columns, not the rows.
func (be *Backend[F]) EmbeddingBackward(dtable, dout kernels.Buffer, tokens kernels.IntBuffer, Rw, d int) {
	c := be.check(kernels.OpEmbeddingBackward, []int{Rw, d}, dtable, dout, tokens)
	if !c.ok || c.f[0] == nil || d == 0 || !c.tokensIn(len(c.f[0])/d) {
		return
	}
	dt, do, tok := c.f[0], c.f[1], c.i[2]
	parallel(d, Rw, func(_, lo, hi int) {
		for r := 0; r < Rw; r++ {
			t := int(tok[r])
			src := do[r*d+lo : r*d+hi]
			dst := dt[t*d+lo : t*d+hi]
			for i := range dst {
				dst[i] += src[i]
			}
		}
	})
}

const rmsEps = 1e-5

// RMSNorm implements kernels.Backend.
func (be *Backend[F]) RMSNorm(out, rstd, x, g kernels.Buffer, Rw, d int) {
	c := be.check(kernels.OpRMSNorm, []int{Rw, d}, out, rstd, x, g)
	if !c.ok || d == 0 {
		return
	}
	o, rs, xs, gs := c.f[0], c.f[1], c.f[2], c.f[3]
	parallel(Rw, 3*d, func(_, lo, hi int) {
		for r := lo; r < hi; r++ {
			xr := xs[r*d : (r+1)*d]
			var ss float64
			for _, v := range xr {
				ss += float64(v) * float64(v)
			}
			s := 1 / math.Sqrt(ss/float64(d)+rmsEps)
			rs[r] = F(s)
			or := o[r*d : (r+1)*d]
			for i, v := range xr {
				or[i] = F(float64(v) * s * float64(gs[i]))
			}
		}
	})
}

// RMSNormBackward implements kernels.Backend. dg is summed per worker and
// reduced in worker order to stay race-free and deterministic.
func (be *Backend[F]) RMSNormBackward(dx, dg, dout, x, g, rstd kernels.Buffer, Rw, d int) {
	c := be.check(kernels.OpRMSNormBackward, []int{Rw, d}, dx, dg, dout, x, g, rstd)
	if !c.ok || d == 0 {
		return
	}
	dxs, dgs, do, xs, gs, rs := c.f[0], c.f[1], c.f[2], c.f[3], c.f[4], c.f[5]
	nw := runtime.GOMAXPROCS(0)
	var part [][]float64
	if dgs != nil {
		part = make([][]float64, nw)
	}
	parallel(Rw, 6*d, func(w, lo, hi int) {
		var pg []float64
		if part != nil {
			pg = make([]float64, d)
			part[w] = pg
		}
		for r := lo; r < hi; r++ {
			xr, dr := xs[r*d:(r+1)*d], do[r*d:(r+1)*d]
			s := float64(rs[r])
			if pg != nil {
				for i := range xr {
					pg[i] += float64(dr[i]) * float64(xr[i]) * s
				}
			}
			if dxs == nil {
				continue
			}
			var dot float64
			for i := range xr {
				dot += float64(dr[i]) * float64(gs[i]) * float64(xr[i])
			}
			k := dot * s * s * s / float64(d)
			dxr := dxs[r*d : (r+1)*d]
			for i := range xr {
				dxr[i] += F(float64(dr[i])*float64(gs[i])*s - float64(xr[i])*k)
			}
		}
	})
	for _, pg := range part {
		for i, v := range pg {
			dgs[i] += F(v)
		}
	}
}

// Conv1d implements kernels.Backend.
func (be *Backend[F]) Conv1d(out, x, w, bias kernels.Buffer, B, T, E, K int) {
	c := be.check(kernels.OpConv1d, []int{B, T, E, K}, out, x, w, bias)
	if !c.ok {
		return
	}
	o, xs, ws, bs := c.f[0], c.f[1], c.f[2], c.f[3]
	parallel(B*T, E*K, func(_, lo, hi int) {
		for bt := lo; bt < hi; bt++ {
			b, t := bt/T, bt%T
			or := o[bt*E : (bt+1)*E]
			copy(or, bs)
			for k := 0; k < K; k++ {
				ts := t - K + 1 + k
				if ts < 0 {
					continue
				}
				xr := xs[(b*T+ts)*E : (b*T+ts+1)*E]
				for e := range or {
					or[e] += ws[e*K+k] * xr[e]
				}
			}
		}
	})
}

// Conv1dBackward implements kernels.Backend. Workers split channels so dw
// and dbias have one writer each.
func (be *Backend[F]) Conv1dBackward(dx, dw, dbias, dout, x, w kernels.Buffer, B, T, E, K int) {
	c := be.check(kernels.OpConv1dBackward, []int{B, T, E, K}, dx, dw, dbias, dout, x, w)
	if !c.ok {
		return
	}
	dxs, dws, dbs, do, xs, ws := c.f[0], c.f[1], c.f[2], c.f[3], c.f[4], c.f[5]
	parallel(E, B*T*K*2, func(_, lo, hi int) {
		acc := make([]float64, K+1)
		for e := lo; e < hi; e++ {
			clear(acc)
			for b := 0; b < B; b++ {
				for t := 0; t < T; t++ {
					g := do[(b*T+t)*E+e]
					acc[K] += float64(g)
					for k := 0; k < K; k++ {
						ts := t - K + 1 + k
						if ts < 0 {
							continue
						}
						i := (b*T+ts)*E + e
						acc[k] += float64(g) * float64(xs[i])
						if dxs != nil {
							dxs[i] += g * ws[e*K+k]
						}
					}
				}
			}
			if dws != nil {
				for k := 0; k < K; k++ {
					dws[e*K+k] += F(acc[k])
				}
			}
			if dbs != nil {
				dbs[e] += F(acc[K])
			}
		}
	})
}

// Conv1dSiLU implements kernels.Backend: Conv1d, then SiLU over its
// output (the unfused reference; the CPU gains nothing from one pass).
func (be *Backend[F]) Conv1dSiLU(out, act, x, w, bias kernels.Buffer, B, T, E, K int) {
	c := be.check(kernels.OpConv1dSiLU, []int{B, T, E, K}, out, act, x, w, bias)
	if !c.ok {
		return
	}
	if overlap(c.f[0], c.f[1]) || overlap(c.f[0], c.f[2]) || overlap(c.f[1], c.f[2]) {
		c.failf("out, act and x overlap")
		return
	}
	be.Conv1d(out, x, w, bias, B, T, E, K)
	be.SiLU(act, out)
}

// expOf is exp in the precision F needs: expFast for float32 backends,
// math.Exp for float64 ones (see expFast).
func expOf[F kernels.Float](x float64) float64 {
	if is32[F]() {
		return expFast(x)
	}
	return math.Exp(x)
}

func sigmoid[F kernels.Float](x float64) float64 { return 1 / (1 + expOf[F](-x)) }

// SiLU implements kernels.Backend.
func (be *Backend[F]) SiLU(out, x kernels.Buffer) {
	c := be.check(kernels.OpSiLU, nil, out, x)
	if !c.ok {
		return
	}
	o, xs := c.f[0], c.f[1]
	parallel(len(o), 20, func(_, lo, hi int) {
		for i := lo; i < hi; i++ {
			v := float64(xs[i])
			o[i] = F(v * sigmoid[F](v))
		}
	})
}

// SiLUBackward implements kernels.Backend.
func (be *Backend[F]) SiLUBackward(dx, dout, x kernels.Buffer) {
	c := be.check(kernels.OpSiLUBackward, nil, dx, dout, x)
	if !c.ok || c.f[0] == nil {
		return
	}
	siluBackward(c.f[0], c.f[1], c.f[2])
}

// siluBackward is dx += dout·silu'(x) (SiLUBackward, SiLUMatMulBackward).
func siluBackward[F kernels.Float](dxs, do, xs []F) {
	parallel(len(do), 20, func(_, lo, hi int) {
		for i := lo; i < hi; i++ {
			v := float64(xs[i])
			s := sigmoid[F](v)
			dxs[i] += F(float64(do[i]) * s * (1 + v*(1-s)))
		}
	})
}

// SwiGLU implements kernels.Backend.
func (be *Backend[F]) SwiGLU(h, gate, up kernels.Buffer) {
	c := be.check(kernels.OpSwiGLU, nil, h, gate, up)
	if !c.ok {
		return
	}
	hs, gs, us := c.f[0], c.f[1], c.f[2]
	parallel(len(hs), 20, func(_, lo, hi int) {
		for i := lo; i < hi; i++ {
			v := float64(gs[i])
			hs[i] = F(v * sigmoid[F](v) * float64(us[i]))
		}
	})
}

// SwiGLUBackward implements kernels.Backend.
func (be *Backend[F]) SwiGLUBackward(dgate, dup, dh, gate, up kernels.Buffer) {
	c := be.check(kernels.OpSwiGLUBackward, nil, dgate, dup, dh, gate, up)
	if !c.ok {
		return
	}
	dgs, dus, dhs, gs, us := c.f[0], c.f[1], c.f[2], c.f[3], c.f[4]
	parallel(len(dhs), 25, func(_, lo, hi int) {
		for i := lo; i < hi; i++ {
			v := float64(gs[i])
			s := sigmoid[F](v)
			g := float64(dhs[i])
			if dgs != nil {
				dgs[i] += F(g * float64(us[i]) * s * (1 + v*(1-s)))
			}
			if dus != nil {
				dus[i] += F(g * v * s)
			}
		}
	})
}

// SwiGLUPacked implements kernels.Backend.
func (be *Backend[F]) SwiGLUPacked(h, gu kernels.Buffer, Rw, Fw int) {
	c := be.check(kernels.OpSwiGLUPacked, []int{Rw, Fw}, h, gu)
	if !c.ok {
		return
	}
	hs, gus := c.f[0], c.f[1]
	if overlap(hs, gus) {
		c.failf("h overlaps gu")
		return
	}
	parallel(Rw, 20*Fw, func(_, lo, hi int) {
		for r := lo; r < hi; r++ {
			gs, us, hr := gus[2*r*Fw:(2*r+1)*Fw], gus[(2*r+1)*Fw:(2*r+2)*Fw], hs[r*Fw:(r+1)*Fw]
			for i := range hr {
				v := float64(gs[i])
				hr[i] = F(v * sigmoid[F](v) * float64(us[i]))
			}
		}
	})
}

// SwiGLUPackedBackward implements kernels.Backend.
func (be *Backend[F]) SwiGLUPackedBackward(dgu, dh, gu kernels.Buffer, Rw, Fw int) {
	c := be.check(kernels.OpSwiGLUPackedBackward, []int{Rw, Fw}, dgu, dh, gu)
	if !c.ok || c.f[0] == nil {
		return
	}
	dgus, dhs, gus := c.f[0], c.f[1], c.f[2]
	if overlap(dgus, dhs) || overlap(dgus, gus) {
		c.failf("dgu overlaps dh or gu")
		return
	}
	parallel(Rw, 25*Fw, func(_, lo, hi int) {
		for r := lo; r < hi; r++ {
			gs, us, dr := gus[2*r*Fw:(2*r+1)*Fw], gus[(2*r+1)*Fw:(2*r+2)*Fw], dhs[r*Fw:(r+1)*Fw]
			dgs, dus := dgus[2*r*Fw:(2*r+1)*Fw], dgus[(2*r+1)*Fw:(2*r+2)*Fw]
			for i := range dr {
				v := float64(gs[i])
				s := sigmoid[F](v)
				g := float64(dr[i])
				dgs[i] += F(g * float64(us[i]) * s * (1 + v*(1-s)))
				dus[i] += F(g * v * s)
			}
		}
	})
}

// ropeTable returns cos and sin of t·theta^(-2i/D) as [T, D/2], computed in
// float64 so long sequences keep full-precision angles.
func ropeTable(T, D int, theta float64) (cos, sin []float64) {
	h := D / 2
	cos, sin = make([]float64, T*h), make([]float64, T*h)
	for i := 0; i < h; i++ {
		f := math.Pow(theta, -2*float64(i)/float64(D))
		for t := 0; t < T; t++ {
			sin[t*h+i], cos[t*h+i] = math.Sincos(float64(t) * f)
		}
	}
	return cos, sin
}

func (be *Backend[F]) rope(op *kernels.Op, out, x kernels.Buffer, B, T, nh, D int, theta float64, sign float64, accumulate bool) {
	c := be.check(op, []int{B, T, nh, D}, out, x)
	if !c.ok || c.f[0] == nil || D == 0 {
		return
	}
	o, xs := c.f[0], c.f[1]
	cos, sin := ropeTable(T, D, theta)
	h := D / 2
	parallel(B*T, nh*D*2, func(_, lo, hi int) {
		for bt := lo; bt < hi; bt++ {
			t := bt % T
			cs, sn := cos[t*h:(t+1)*h], sin[t*h:(t+1)*h]
			for hd := 0; hd < nh; hd++ {
				base := (bt*nh + hd) * D
				xr, or := xs[base:base+D], o[base:base+D]
				for i := 0; i < h; i++ {
					a, b := float64(xr[i]), float64(xr[i+h])
					s := sign * sn[i]
					ra, rb := a*cs[i]-b*s, b*cs[i]+a*s
					if accumulate {
						or[i] += F(ra)
						or[i+h] += F(rb)
					} else {
						or[i], or[i+h] = F(ra), F(rb)
					}
				}
			}
		}
	})
}

// RoPE implements kernels.Backend. out may alias x.
func (be *Backend[F]) RoPE(out, x kernels.Buffer, B, T, nh, D int, theta float64) {
	be.rope(kernels.OpRoPE, out, x, B, T, nh, D, theta, 1, false)
}

// RoPEBackward implements kernels.Backend.
func (be *Backend[F]) RoPEBackward(dx, dout kernels.Buffer, B, T, nh, D int, theta float64) {
	be.rope(kernels.OpRoPEBackward, dx, dout, B, T, nh, D, theta, -1, true)
}

// ShiftRows implements kernels.Backend. Rows move from the end backwards so
// out may alias x.
func (be *Backend[F]) ShiftRows(out, x kernels.Buffer, B, T, d int) {
	c := be.check(kernels.OpShiftRows, []int{B, T, d}, out, x)
	if !c.ok || T == 0 {
		return
	}
	o, xs := c.f[0], c.f[1]
	parallel(B, T*d, func(_, lo, hi int) {
		for b := lo; b < hi; b++ {
			for t := T - 1; t > 0; t-- {
				copy(o[(b*T+t)*d:(b*T+t+1)*d], xs[(b*T+t-1)*d:(b*T+t)*d])
			}
			clear(o[b*T*d : (b*T+1)*d])
		}
	})
}

// Innovation implements kernels.Backend.
func (be *Backend[F]) Innovation(e, u, p kernels.Buffer, Rw, d int) {
	c := be.check(kernels.OpInnovation, []int{Rw, d}, e, u, p)
	if !c.ok {
		return
	}
	es, us, ps := c.f[0], c.f[1], c.f[2]
	parallel(Rw, 3*d, func(_, lo, hi int) {
		for r := lo; r < hi; r++ {
			var s float64
			for i := r * d; i < (r+1)*d; i++ {
				df := float64(us[i]) - float64(ps[i])
				s += df * df
			}
			es[r] = F(s / float64(d))
		}
	})
}

// InnovationBackward implements kernels.Backend.
func (be *Backend[F]) InnovationBackward(dp, de, u, p kernels.Buffer, Rw, d int) {
	c := be.check(kernels.OpInnovationBackward, []int{Rw, d}, dp, de, u, p)
	if !c.ok || c.f[0] == nil {
		return
	}
	dps, des, us, ps := c.f[0], c.f[1], c.f[2], c.f[3]
	parallel(Rw, 3*d, func(_, lo, hi int) {
		for r := lo; r < hi; r++ {
			k := float64(des[r]) * (-2 / float64(d))
			for i := r * d; i < (r+1)*d; i++ {
				dps[i] += F(k * (float64(us[i]) - float64(ps[i])))
			}
		}
	})
}

// SelectChunks implements kernels.Backend.
func (be *Backend[F]) SelectChunks(sel kernels.IntBuffer, e kernels.Buffer, B, T, C, S int) {
	c := be.check(kernels.OpSelectChunks, []int{B, T, C, S}, sel, e)
	if !c.ok {
		return
	}
	ss, es, nC := c.i[0], c.f[1], T/C
	parallel(B*nC, C*8, func(_, lo, hi int) {
		idx := make([]int, C)
		for bc := lo; bc < hi; bc++ {
			b, ch := bc/nC, bc%nC
			t0 := ch * C
			row := es[b*T+t0 : b*T+t0+C]
			for i := range idx {
				idx[i] = i
			}
			// Largest first; among equal values the later position first.
			slices.SortFunc(idx, func(i, j int) int {
				switch vi, vj := row[i], row[j]; {
				case vi > vj:
					return -1
				case vi < vj:
					return 1
				}
				return j - i
			})
			top := idx[:S]
			slices.Sort(top)
			out := ss[bc*S : (bc+1)*S]
			for i, p := range top {
				out[i] = int32(t0 + p)
			}
		}
	})
}

// CrossEntropy implements kernels.Backend.
func (be *Backend[F]) CrossEntropy(loss, logits kernels.Buffer, targets kernels.IntBuffer, Rw, V int) {
	c := be.check(kernels.OpCrossEntropy, []int{Rw, V}, loss, logits, targets)
	if !c.ok || !c.targetsIn(V) {
		return
	}
	ls, lg, tg := c.f[0], c.f[1], c.i[2]
	parallel(Rw, 25*V, func(_, lo, hi int) {
		for r := lo; r < hi; r++ {
			if tg[r] < 0 {
				ls[r] = 0
				continue
			}
			row := lg[r*V : (r+1)*V]
			ls[r] = F(logSumExp(row) - float64(row[tg[r]]))
		}
	})
}

// targetsIn reports whether every target (argument 2 of the cross-entropy
// ops) is below V, recording the first that is not; negative targets mark
// ignored rows.
func (c *checker[F]) targetsIn(V int) bool {
	for r, t := range c.i[2] {
		if int(t) >= V {
			c.failf("targets[%d]=%d out of range [0,%d)", r, t, V)
			return false
		}
	}
	return true
}

func logSumExp[F kernels.Float](row []F) float64 {
	m := math.Inf(-1)
	for _, v := range row {
		m = max(m, float64(v))
	}
	var s float64
	for _, v := range row {
		s += expOf[F](float64(v) - m)
	}
	return m + math.Log(s)
}

// CrossEntropyBackward implements kernels.Backend.
func (be *Backend[F]) CrossEntropyBackward(dlogits, logits kernels.Buffer, targets kernels.IntBuffer, scale float64, Rw, V int) {
	c := be.check(kernels.OpCrossEntropyBackward, []int{Rw, V}, dlogits, logits, targets)
	if !c.ok || !c.targetsIn(V) || c.f[0] == nil {
		return
	}
	dl, lg, tg := c.f[0], c.f[1], c.i[2]
	parallel(Rw, 30*V, func(_, lo, hi int) {
		for r := lo; r < hi; r++ {
			if tg[r] < 0 {
				continue
			}
			row, drow := lg[r*V:(r+1)*V], dl[r*V:(r+1)*V]
			lse := logSumExp(row)
			for i, v := range row {
				p := expOf[F](float64(v) - lse)
				if i == int(tg[r]) {
					p--
				}
				drow[i] += F(scale * p)
			}
		}
	})
}

// AdamWStep implements kernels.Backend.
func (be *Backend[F]) AdamWStep(param, grad, m, v kernels.Buffer, h kernels.AdamW) {
	c := be.check(kernels.OpAdamWStep, []int{h.Step}, param, grad, m, v)
	if !c.ok {
		return
	}
	adamW(c.f[0], c.f[1], c.f[2], c.f[3], h)
}

// AdamWSteps implements kernels.Backend: AdamWStep's loop per segment.
func (be *Backend[F]) AdamWSteps(param, grad, m, v kernels.Buffer, segs []kernels.AdamWSegment, h kernels.AdamW) {
	c := be.check(kernels.OpAdamWSteps, []int{h.Step}, param, grad, m, v)
	if !c.ok {
		return
	}
	ps, gs, ms, vs := c.f[0], c.f[1], c.f[2], c.f[3]
	if err := kernels.CheckSegments(segs, len(ps)); err != nil {
		c.failf("%v", err)
		return
	}
	for _, s := range segs {
		e := s.Off + s.N
		hs := h
		hs.WeightDecay = s.WeightDecay
		adamW(ps[s.Off:e], gs[s.Off:e], ms[s.Off:e], vs[s.Off:e], hs)
	}
}

// adamW is the update of AdamWStep and AdamWSteps.
func adamW[F kernels.Float](ps, gs, ms, vs []F, h kernels.AdamW) {
	n := len(ps)
	bc1 := 1 - math.Pow(h.Beta1, float64(h.Step))
	bc2 := 1 - math.Pow(h.Beta2, float64(h.Step))
	parallel(n, 20, func(_, lo, hi int) {
		for i := lo; i < hi; i++ {
			g := float64(gs[i])
			if h.GradScale != 0 {
				g = float64(gs[i] * F(h.GradScale)) // as Scale rounds
			}
			mi := h.Beta1*float64(ms[i]) + (1-h.Beta1)*g
			vi := h.Beta2*float64(vs[i]) + (1-h.Beta2)*g*g
			ms[i], vs[i] = F(mi), F(vi)
			p := float64(ps[i])
			p -= h.LR * ((mi/bc1)/(math.Sqrt(vi/bc2)+h.Eps) + h.WeightDecay*p)
			ps[i] = F(p)
		}
	})
}
