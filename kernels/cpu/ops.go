package cpu

import (
	"math"
	"runtime"
	"slices"

	"github.com/bmojo/bmojo/kernels"
)

// Embedding implements kernels.Backend.
func (be *Backend[F]) Embedding(out, table kernels.Buffer, tokens kernels.IntBuffer, Rw, d int) {
	c := be.check("embedding")
	c.dims("Rw,d", Rw, d)
	o := c.buf("out", out, Rw*d, "Rw*d")
	tok := c.ints("tokens", tokens, Rw, "Rw")
	if !c.ok {
		return
	}
	if d == 0 {
		return
	}
	if table == nil {
		c.failf("table is nil")
		return
	}
	tab := c.table("table", table, d, tok)
	if !c.ok {
		return
	}
	parallel(Rw, d, func(_, lo, hi int) {
		for r := lo; r < hi; r++ {
			t := int(tok[r])
			copy(o[r*d:(r+1)*d], tab[t*d:(t+1)*d])
		}
	})
}

// table checks an embedding table [V,d] (V taken from its length) and that
// every token indexes a row of it.
func (c *checker[F]) table(name string, b kernels.Buffer, d int, tok []int32) []F {
	c.cond(b.Len()%d == 0, "%s has %d elements, not a multiple of d=%d", name, b.Len(), d)
	tab := c.buf(name, b, b.Len(), "V*d")
	V := len(tab) / d
	for r, tk := range tok {
		if tk < 0 || int(tk) >= V {
			c.failf("tokens[%d]=%d out of range [0,%d)", r, tk, V)
			return nil
		}
	}
	return tab
}

// EmbeddingBackward implements kernels.Backend. Tokens repeat, so workers
// split the columns, not the rows.
func (be *Backend[F]) EmbeddingBackward(dtable, dout kernels.Buffer, tokens kernels.IntBuffer, Rw, d int) {
	c := be.check("embedding_backward")
	c.dims("Rw,d", Rw, d)
	do := c.buf("dout", dout, Rw*d, "Rw*d")
	tok := c.ints("tokens", tokens, Rw, "Rw")
	if !c.ok || dtable == nil || d == 0 {
		return
	}
	dt := c.table("dtable", dtable, d, tok)
	if !c.ok {
		return
	}
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
	c := be.check("rmsnorm")
	c.dims("Rw,d", Rw, d)
	o := c.buf("out", out, Rw*d, "Rw*d")
	rs := c.buf("rstd", rstd, Rw, "Rw")
	xs := c.buf("x", x, Rw*d, "Rw*d")
	gs := c.buf("g", g, d, "d")
	if !c.ok || d == 0 {
		return
	}
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
	c := be.check("rmsnorm_backward")
	c.dims("Rw,d", Rw, d)
	dxs := c.opt("dx", dx, Rw*d, "Rw*d")
	dgs := c.opt("dg", dg, d, "d")
	do := c.buf("dout", dout, Rw*d, "Rw*d")
	xs := c.buf("x", x, Rw*d, "Rw*d")
	gs := c.buf("g", g, d, "d")
	rs := c.buf("rstd", rstd, Rw, "Rw")
	if !c.ok || d == 0 {
		return
	}
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
	c := be.check("conv1d")
	c.dims("B,T,E,K", B, T, E, K)
	o := c.buf("out", out, B*T*E, "B*T*E")
	xs := c.buf("x", x, B*T*E, "B*T*E")
	ws := c.buf("w", w, E*K, "E*K")
	bs := c.buf("bias", bias, E, "E")
	if !c.ok {
		return
	}
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
	c := be.check("conv1d_backward")
	c.dims("B,T,E,K", B, T, E, K)
	dxs := c.opt("dx", dx, B*T*E, "B*T*E")
	dws := c.opt("dw", dw, E*K, "E*K")
	dbs := c.opt("dbias", dbias, E, "E")
	do := c.buf("dout", dout, B*T*E, "B*T*E")
	xs := c.buf("x", x, B*T*E, "B*T*E")
	ws := c.buf("w", w, E*K, "E*K")
	if !c.ok {
		return
	}
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
	c := be.check("silu")
	if out == nil {
		c.failf("out is nil")
		return
	}
	n := out.Len()
	o := c.buf("out", out, n, "out.Len()")
	xs := c.buf("x", x, n, "out.Len()")
	if !c.ok {
		return
	}
	parallel(n, 20, func(_, lo, hi int) {
		for i := lo; i < hi; i++ {
			v := float64(xs[i])
			o[i] = F(v * sigmoid[F](v))
		}
	})
}

// SiLUBackward implements kernels.Backend.
func (be *Backend[F]) SiLUBackward(dx, dout, x kernels.Buffer) {
	c := be.check("silu_backward")
	if dout == nil {
		c.failf("dout is nil")
		return
	}
	n := dout.Len()
	do := c.buf("dout", dout, n, "dout.Len()")
	xs := c.buf("x", x, n, "dout.Len()")
	dxs := c.opt("dx", dx, n, "dout.Len()")
	if !c.ok || dxs == nil {
		return
	}
	siluBackward(dxs, do, xs)
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
	c := be.check("swiglu")
	if h == nil {
		c.failf("h is nil")
		return
	}
	n := h.Len()
	hs := c.buf("h", h, n, "h.Len()")
	gs := c.buf("gate", gate, n, "h.Len()")
	us := c.buf("up", up, n, "h.Len()")
	if !c.ok {
		return
	}
	parallel(n, 20, func(_, lo, hi int) {
		for i := lo; i < hi; i++ {
			v := float64(gs[i])
			hs[i] = F(v * sigmoid[F](v) * float64(us[i]))
		}
	})
}

// SwiGLUBackward implements kernels.Backend.
func (be *Backend[F]) SwiGLUBackward(dgate, dup, dh, gate, up kernels.Buffer) {
	c := be.check("swiglu_backward")
	if dh == nil {
		c.failf("dh is nil")
		return
	}
	n := dh.Len()
	dhs := c.buf("dh", dh, n, "dh.Len()")
	gs := c.buf("gate", gate, n, "dh.Len()")
	us := c.buf("up", up, n, "dh.Len()")
	dgs := c.opt("dgate", dgate, n, "dh.Len()")
	dus := c.opt("dup", dup, n, "dh.Len()")
	if !c.ok {
		return
	}
	parallel(n, 25, func(_, lo, hi int) {
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

func (be *Backend[F]) rope(op string, out, x kernels.Buffer, B, T, nh, D int, theta float64, sign float64, accumulate bool) {
	c := be.check(op)
	c.dims("B,T,nh,D", B, T, nh, D)
	c.cond(D%2 == 0, "head width D=%d is odd", D)
	n := B * T * nh * D
	o := c.opt("out", out, n, "B*T*nh*D")
	xs := c.buf("x", x, n, "B*T*nh*D")
	if !c.ok || o == nil || D == 0 {
		return
	}
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
	if out == nil {
		be.failf("rope: out is nil")
		return
	}
	be.rope("rope", out, x, B, T, nh, D, theta, 1, false)
}

// RoPEBackward implements kernels.Backend.
func (be *Backend[F]) RoPEBackward(dx, dout kernels.Buffer, B, T, nh, D int, theta float64) {
	be.rope("rope_backward", dx, dout, B, T, nh, D, theta, -1, true)
}

// ShiftRows implements kernels.Backend. Rows move from the end backwards so
// out may alias x.
func (be *Backend[F]) ShiftRows(out, x kernels.Buffer, B, T, d int) {
	c := be.check("shift_rows")
	c.dims("B,T,d", B, T, d)
	o := c.buf("out", out, B*T*d, "B*T*d")
	xs := c.buf("x", x, B*T*d, "B*T*d")
	if !c.ok || T == 0 {
		return
	}
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
	c := be.check("innovation")
	c.dims("Rw,d", Rw, d)
	es := c.buf("e", e, Rw, "Rw")
	us := c.buf("u", u, Rw*d, "Rw*d")
	ps := c.buf("p", p, Rw*d, "Rw*d")
	c.cond(d > 0, "d=%d, want > 0", d)
	if !c.ok {
		return
	}
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
	c := be.check("innovation_backward")
	c.dims("Rw,d", Rw, d)
	dps := c.opt("dp", dp, Rw*d, "Rw*d")
	des := c.buf("de", de, Rw, "Rw")
	us := c.buf("u", u, Rw*d, "Rw*d")
	ps := c.buf("p", p, Rw*d, "Rw*d")
	c.cond(d > 0, "d=%d, want > 0", d)
	if !c.ok || dps == nil {
		return
	}
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
	c := be.check("select_chunks")
	c.dims("B,T,C,S", B, T, C, S)
	c.cond(C > 0, "chunk length C=%d, want > 0", C)
	c.cond(S <= C, "S=%d selected per chunk exceeds chunk length C=%d", S, C)
	if !c.ok {
		return
	}
	nC := T / C
	ss := c.ints("sel", sel, B*nC*S, "B*(T/C)*S")
	es := c.buf("e", e, B*T, "B*T")
	if !c.ok {
		return
	}
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
	c := be.check("cross_entropy")
	c.dims("Rw,V", Rw, V)
	ls := c.buf("loss", loss, Rw, "Rw")
	lg := c.buf("logits", logits, Rw*V, "Rw*V")
	tg := c.ints("targets", targets, Rw, "Rw")
	be.checkTargets(c, tg, V)
	if !c.ok {
		return
	}
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

func (be *Backend[F]) checkTargets(c *checker[F], tg []int32, V int) {
	for r, t := range tg {
		if int(t) >= V {
			c.failf("targets[%d]=%d out of range [0,%d)", r, t, V)
			return
		}
	}
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
	c := be.check("cross_entropy_backward")
	c.dims("Rw,V", Rw, V)
	dl := c.opt("dlogits", dlogits, Rw*V, "Rw*V")
	lg := c.buf("logits", logits, Rw*V, "Rw*V")
	tg := c.ints("targets", targets, Rw, "Rw")
	be.checkTargets(c, tg, V)
	if !c.ok || dl == nil {
		return
	}
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
	c := be.check("adamw")
	if param == nil {
		c.failf("param is nil")
		return
	}
	n := param.Len()
	ps := c.buf("param", param, n, "param.Len()")
	gs := c.buf("grad", grad, n, "param.Len()")
	ms := c.buf("m", m, n, "param.Len()")
	vs := c.buf("v", v, n, "param.Len()")
	c.cond(h.Step >= 1, "step=%d, want >= 1 (1-based)", h.Step)
	if !c.ok {
		return
	}
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
